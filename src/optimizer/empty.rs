//! Zero-element parameters (a dimension of size 0, which PyTorch allows): accepted by
//! [`MuloOptimizer`](super::MuloOptimizer) and left as they are, with the zero-filled state
//! their layout gives (every buffer that spans the empty axis has zero length), on every
//! backend.
//!
//! No step program is compiled for them: a program over zero elements has nothing to compute,
//! and its reductions (means over the empty axis) have no value. [`WithEmpty`] wraps the
//! backend built for the other tensors and keeps the empty tensors' states itself, so that
//! no backend has to know about them and the optimizer's indices stay those of its
//! parameter list.

use crate::backend::{BackendFactory, ModelBackend, TensorStep};
use crate::error::{Error, Result};
use crate::lopt::LearnedOptimizer;
use crate::shape::Layout;
use crate::state::TensorState;

/// Where one tensor of the optimizer lives.
enum Slot {
    /// Stepped by the inner backend, at this index of it.
    Stepped(usize),
    /// A zero-element tensor: its state, never stepped (only its counter moves).
    Empty(TensorState),
}

/// The inner backend for the tensors that have elements, and the states of those that have
/// none. Built by [`WithEmpty::build`] only when some tensor is empty.
pub(super) struct WithEmpty {
    target: &'static str,
    inner: Option<Box<dyn ModelBackend>>,
    slots: Vec<Slot>,
}

impl WithEmpty {
    /// A backend for `layouts`: `factory`'s for those with elements, built as usual (when there
    /// are any), and zero-filled states at `start_step` for the others. A model without an
    /// empty tensor gets `factory`'s backend itself.
    pub(super) fn build(
        factory: &dyn BackendFactory,
        lopt: &LearnedOptimizer,
        layouts: &[Layout],
        start_step: u64,
    ) -> Result<Box<dyn ModelBackend>> {
        if layouts.iter().all(|l| l.numel() > 0) {
            return factory.build(lopt, layouts, start_step);
        }
        let stepped: Vec<Layout> = layouts.iter().filter(|l| l.numel() > 0).cloned().collect();
        let mut next = 0;
        let slots = layouts
            .iter()
            .map(|l| {
                if l.numel() > 0 {
                    next += 1;
                    Slot::Stepped(next - 1)
                } else {
                    Slot::Empty(TensorState::zeros(l, start_step))
                }
            })
            .collect();
        let inner = if stepped.is_empty() {
            None
        } else {
            Some(factory.build(lopt, &stepped, start_step)?)
        };
        Ok(Box::new(WithEmpty {
            target: factory.target(),
            inner,
            slots,
        }))
    }

    fn slot(&self, index: usize) -> Result<&Slot> {
        self.slots.get(index).ok_or_else(|| {
            Error::argument(
                "index",
                format!("tensor {index} of {} does not exist", self.slots.len()),
            )
        })
    }

    fn inner(&self) -> &dyn ModelBackend {
        self.inner
            .as_deref()
            .expect("a stepped slot exists only with an inner backend")
    }
}

impl ModelBackend for WithEmpty {
    fn target(&self) -> &'static str {
        self.target
    }

    fn len(&self) -> usize {
        self.slots.len()
    }

    fn compiled_plans(&self) -> usize {
        self.inner.as_ref().map_or(0, |b| b.compiled_plans())
    }

    fn step(&mut self, batch: &mut [TensorStep<'_>]) -> Result<()> {
        // An empty tensor has nothing to step; its counter is the optimizer's business (it
        // advances it for every tensor it did not hand to the backend, and sets it here after
        // a step like any skipped tensor's).
        let mut inner_batch = Vec::with_capacity(batch.len());
        let mut stepped_empty = Vec::new();
        for t in batch.iter_mut() {
            match self.slot(t.index)? {
                Slot::Stepped(j) => inner_batch.push(TensorStep {
                    index: *j,
                    param: &mut *t.param,
                    grad: t.grad,
                    hyper: t.hyper,
                }),
                Slot::Empty(_) => stepped_empty.push(t.index),
            }
        }
        if !inner_batch.is_empty() {
            self.inner
                .as_mut()
                .expect("a stepped slot exists only with an inner backend")
                .step(&mut inner_batch)?;
        }
        // A stepped empty tensor's counter moves on as a program's would.
        for i in stepped_empty {
            if let Slot::Empty(state) = &mut self.slots[i] {
                state.step += 1;
            }
        }
        Ok(())
    }

    fn state(&self, index: usize) -> Result<TensorState> {
        match self.slot(index)? {
            Slot::Stepped(j) => self.inner().state(*j),
            Slot::Empty(state) => Ok(state.clone()),
        }
    }

    fn set_state(&mut self, index: usize, state: TensorState) -> Result<()> {
        match self.slot(index)? {
            Slot::Stepped(j) => {
                let j = *j;
                self.inner
                    .as_mut()
                    .expect("a stepped slot exists only with an inner backend")
                    .set_state(j, state)
            }
            Slot::Empty(old) => {
                if state.layout() != old.layout() {
                    return Err(Error::argument(
                        format!("tensor {index}"),
                        format!(
                            "state is for shape {}, the tensor has shape {}",
                            state.layout().shape(),
                            old.layout().shape()
                        ),
                    ));
                }
                self.slots[index] = Slot::Empty(state);
                Ok(())
            }
        }
    }

    fn state_into(&self, index: usize, into: &mut Option<TensorState>) -> Result<()> {
        match self.slot(index)? {
            Slot::Stepped(j) => self.inner().state_into(*j, into),
            Slot::Empty(state) => {
                *into = Some(state.clone());
                Ok(())
            }
        }
    }

    fn state_is_finite(&self, index: usize) -> Result<bool> {
        match self.slot(index)? {
            Slot::Stepped(j) => self.inner().state_is_finite(*j),
            // No values: none of them is non-finite.
            Slot::Empty(_) => Ok(true),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::backend::{BackendFactory, CpuFactory, InterpFactory, PerTensor};
    use crate::lopt::LearnedOptimizer;
    use crate::optimizer::{MuloOptimizer, OptimizerOptions, ParamSpec};
    use std::path::Path;
    use std::sync::Arc;

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Steps a model with zero-element tensors among ordinary ones on `factory`, and checks
    /// that the ordinary ones step bitwise as in a model without the empty ones, that the empty
    /// ones keep their zero-size state (counter following the optimizer's), and that a
    /// checkpoint and the PyLO export round-trip them.
    fn zero_element_tensors_are_left_as_they_are(factory: Arc<dyn BackendFactory>) {
        let lopt = LearnedOptimizer::demo();
        let options = || OptimizerOptions {
            backend: factory.clone(),
            ..Default::default()
        };
        let full = vec![
            ParamSpec::new("w", &[3, 4]).unwrap(),
            ParamSpec::new("e", &[0, 5]).unwrap(),
            ParamSpec::new("b", &[3]).unwrap(),
            ParamSpec::new("z", &[4, 0, 2]).unwrap(),
            ParamSpec::new("v", &[0]).unwrap(),
        ];
        let plain = vec![full[0].clone(), full[2].clone()];
        let mut opt = MuloOptimizer::new(&lopt, full.clone(), options()).unwrap();
        let mut reference = MuloOptimizer::new(&lopt, plain, options()).unwrap();
        assert_eq!(opt.compiled_plans(), reference.compiled_plans());
        let (mut w, mut b) = (vec![0.5f32; 12], vec![-0.25f32; 3]);
        let (mut rw, mut rb) = (w.clone(), b.clone());
        let mut nothing: [Vec<f32>; 3] = Default::default();
        for step in 0..3 {
            let gw: Vec<f32> = (0..12).map(|i| (i + step) as f32 * 0.01 - 0.05).collect();
            let gb = vec![0.1f32 * (step + 1) as f32; 3];
            let [e, z, v] = &mut nothing;
            let report = opt
                .step(
                    &mut [&mut w, e, &mut b, z, v],
                    &[&gw, &[], &gb, &[], &[]],
                    1e-2,
                    1e-4,
                )
                .unwrap();
            assert!(report.skipped.is_empty() && report.reverted.is_empty());
            reference
                .step(&mut [&mut rw, &mut rb], &[&gw, &gb], 1e-2, 1e-4)
                .unwrap();
        }
        assert_eq!((bits(&w), bits(&b)), (bits(&rw), bits(&rb)));
        assert_ne!(w, vec![0.5f32; 12], "the ordinary tensors moved");
        for name in ["w", "b"] {
            assert_eq!(opt.state(name).unwrap(), reference.state(name).unwrap());
        }
        for name in ["e", "z", "v"] {
            let state = opt.state(name).unwrap();
            assert_eq!(state.step, 3, "{name}");
            for (buffer, values) in state.iter() {
                assert!(values.iter().all(|&x| x == 0.0), "{name} {buffer:?}");
            }
            let pylo = opt.export_pylo_state(name).unwrap();
            assert!(!pylo.is_empty(), "{name}");
            for (pname, shape, values) in &pylo {
                assert_eq!(
                    shape.iter().product::<usize>(),
                    values.len(),
                    "{name}.{pname}"
                );
            }
        }
        // `e` (0x5) keeps its column accumulators, 5 values for each of the 3 decays (axis 1
        // is not the empty one), as PyLO's state would; its row accumulators and momentum have
        // no values.
        let e: usize = opt.state("e").unwrap().iter().map(|(_, v)| v.len()).sum();
        assert_eq!(e, 3 * 5);

        // A checkpoint restores them into a fresh optimizer, bitwise (compared by content:
        // safetensors writes the metadata in hash order).
        let bytes = opt.checkpoint_bytes().unwrap();
        let mut restored = MuloOptimizer::new(&lopt, full, options()).unwrap();
        restored
            .restore_checkpoint(&bytes, Path::new("empty.ckpt"))
            .unwrap();
        assert_eq!(restored.step_count(), 3);
        for name in ["w", "e", "b", "z", "v"] {
            assert_eq!(restored.state(name).unwrap(), opt.state(name).unwrap());
        }
        // And the PyLO layout imports back.
        let exported = opt.export_pylo_state("z").unwrap();
        restored
            .import_pylo_state("z", |n| {
                exported
                    .iter()
                    .find(|(p, _, _)| p == n)
                    .map(|(_, s, v)| (s.clone(), v.clone()))
            })
            .unwrap();
        assert_eq!(restored.state("z").unwrap(), opt.state("z").unwrap());
    }

    #[test]
    fn zero_element_tensors_on_the_interpreter() {
        zero_element_tensors_are_left_as_they_are(Arc::new(PerTensor(InterpFactory)));
    }

    #[test]
    fn zero_element_tensors_on_the_cpu_backend() {
        zero_element_tensors_are_left_as_they_are(Arc::new(PerTensor(CpuFactory)));
    }

    #[cfg(feature = "onnx")]
    #[test]
    fn zero_element_tensors_on_onnx() {
        zero_element_tensors_are_left_as_they_are(Arc::new(PerTensor(crate::backend::OnnxFactory)));
    }

    /// Needs a GPU (skipped without one): per-tensor CUDA steppers and the packed backend.
    #[cfg(feature = "cuda")]
    #[test]
    fn zero_element_tensors_on_cuda() {
        let (Ok(per_tensor), Ok(packed)) = (
            crate::backend::CudaFactory::new(0),
            crate::backend::PackedCuda::new(0),
        ) else {
            eprintln!("zero_element_tensors_on_cuda: skipped, no CUDA device");
            return;
        };
        zero_element_tensors_are_left_as_they_are(Arc::new(PerTensor(per_tensor)));
        zero_element_tensors_are_left_as_they_are(Arc::new(packed));
    }

    #[test]
    fn a_model_of_empty_tensors_only_and_compiling_one_are_handled() {
        let lopt = LearnedOptimizer::demo();
        let specs = vec![ParamSpec::new("e", &[2, 0]).unwrap()];
        let mut opt = MuloOptimizer::new(&lopt, specs, Default::default()).unwrap();
        assert_eq!(opt.compiled_plans(), 0);
        let mut e: Vec<f32> = Vec::new();
        opt.step(&mut [&mut e], &[&[]], 1e-3, 0.0).unwrap();
        assert_eq!(opt.step_count(), 1);
        assert_eq!(opt.state("e").unwrap().step, 1);
        // A μP base shape makes a 0-wide tensor's lr infinite: not a reason to refuse the step.
        let specs = vec![
            ParamSpec::new("e", &[8, 0])
                .unwrap()
                .with_base_shape(&[4, 4])
                .unwrap(),
            ParamSpec::new("w", &[2, 8])
                .unwrap()
                .with_base_shape(&[2, 4])
                .unwrap(),
        ];
        let mut opt = MuloOptimizer::new(&lopt, specs, Default::default()).unwrap();
        let mut w = vec![1.0f32; 16];
        opt.step(&mut [&mut e, &mut w], &[&[], &[0.5; 16]], 1e-3, 0.0)
            .unwrap();
        // No program for zero elements; the error names the shape.
        let layout = crate::shape::Layout::new(crate::shape::Shape::new(vec![3, 0]).unwrap());
        let err = crate::compile_layout(&layout, &lopt)
            .unwrap_err()
            .to_string();
        assert!(err.contains("3x0") && err.contains("no elements"), "{err}");
        // The command line's shapes are compiled: a 0 there is still refused.
        assert!(crate::shape::Shape::parse("3x0").is_err());
    }
}
