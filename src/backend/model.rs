//! The model-level backend abstraction that [`MuloOptimizer`](crate::optimizer::MuloOptimizer)
//! drives: something that steps a *batch* of a model's tensors in one call and keeps their
//! states. The optimizer knows only these traits; each backend module implements them
//! ([`InterpFactory`](crate::backend::interp::InterpFactory),
//! [`CpuFactory`](crate::backend::cpu::CpuFactory), the ONNX and CUDA factories).
//!
//! Two levels:
//!
//! * [`ModelBackend`] is what the optimizer drives: one [`ModelBackend::step`] call per
//!   optimizer step with every tensor that is stepped (skipped tensors left out), each with
//!   its own already-scaled [`Hyper`]. A packed CUDA backend implements it directly: it
//!   groups the batch's tensors by compiled plan, packs their parameters, gradients and
//!   states into a few device buffers with an offset table, and runs the whole model's step
//!   as a small fixed number of launches (one per pass of SPEC.md §5, each covering every
//!   tensor) instead of one launch sequence per tensor. Nothing in the optimizer assumes
//!   per-tensor work.
//! * [`StepperFactory`] makes one [`TensorStepper`] per tensor from a compiled
//!   [`StepIr`]; [`PerTensorBackend`] turns any such factory (the reference interpreter,
//!   tract/ONNX) into a [`ModelBackend`] by looping over the batch.
//!
//! Both compile through a [`PlanCache`]: one [`StepIr`] per distinct [`Layout`] (shape and
//! factored axes), shared by every tensor of that layout, so a model with 150 tensors of 12
//! distinct shapes compiles 12 plans.

use crate::backend::{Hyper, TensorStepper};
use crate::error::{Error, Result};
use crate::ir::StepIr;
use crate::lopt::LearnedOptimizer;
use crate::shape::Layout;
use crate::state::TensorState;
use std::collections::HashMap;
use std::sync::Arc;

/// One tensor of a batch step.
pub struct TensorStep<'a> {
    /// The tensor's index in the optimizer's parameter list.
    pub index: usize,
    /// Its parameter, updated in place.
    pub param: &'a mut [f32],
    /// Its gradient (after clipping and non-finite handling).
    pub grad: &'a [f32],
    /// Its learning rate (μP-scaled) and weight decay.
    pub hyper: Hyper,
}

/// Steps many tensors of one model and keeps their optimizer states.
///
/// Contract: the optimizer validates every argument (lengths, hyper-parameters) before it
/// calls [`step`](ModelBackend::step), so a backend error is a runtime failure (a driver
/// error, a broken device). After such an error the optimizer cannot know which tensors of
/// the batch were stepped; it refuses further steps until its state is restored (a checkpoint
/// or [`set_state`](ModelBackend::set_state) of every tensor).
///
/// `Send + Sync`, so that a [`MuloOptimizer`](crate::optimizer::MuloOptimizer) is too.
pub trait ModelBackend: Send + Sync {
    /// The backend's name (`interp`, `onnx`, `cuda`).
    fn target(&self) -> &'static str;

    /// Number of tensors.
    fn len(&self) -> usize;

    /// Whether there are no tensors.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of step programs compiled (one per distinct shape).
    fn compiled_plans(&self) -> usize;

    /// Steps every tensor of `batch` once (each index at most once).
    fn step(&mut self, batch: &mut [TensorStep<'_>]) -> Result<()>;

    /// The state of tensor `index`, canonical layout.
    fn state(&self, index: usize) -> Result<TensorState>;

    /// Replaces the state of tensor `index`.
    fn set_state(&mut self, index: usize, state: TensorState) -> Result<()>;

    /// Copies the state of tensor `index` into `into`, reusing its buffers where the backend
    /// can ([`TensorStepper::state_into`]): the guard's snapshot before every step.
    fn state_into(&self, index: usize, into: &mut Option<TensorState>) -> Result<()> {
        *into = Some(self.state(index)?);
        Ok(())
    }

    /// Whether every accumulator of tensor `index` is finite (the guard's check after every
    /// step; [`TensorStepper::state_is_finite`]).
    fn state_is_finite(&self, index: usize) -> Result<bool> {
        Ok(self
            .state(index)?
            .iter()
            .all(|(_, v)| v.iter().all(|x| x.is_finite())))
    }
}

/// Builds a [`ModelBackend`] for a model: what
/// [`OptimizerOptions::backend`](crate::optimizer::OptimizerOptions::backend) holds
/// (`Send + Sync`: one factory may build optimizers on several threads).
pub trait BackendFactory: Send + Sync {
    /// The backend's name.
    fn target(&self) -> &'static str;

    /// A backend for tensors of `layouts` (in the optimizer's order), all at step counter
    /// `start_step`, compiling `lopt` once per distinct layout.
    fn build(
        &self,
        lopt: &LearnedOptimizer,
        layouts: &[Layout],
        start_step: u64,
    ) -> Result<Box<dyn ModelBackend>>;
}

/// Makes a [`TensorStepper`] from a compiled step program.
pub trait StepperFactory: Send + Sync {
    /// The backend's name.
    fn target(&self) -> &'static str;

    /// A stepper running `ir` with zero state and step counter `start_step`.
    fn stepper(&self, ir: Arc<StepIr>, start_step: u64) -> Result<Box<dyn TensorStepper>>;
}

/// Compiled step programs, one per distinct layout (shape and factored axes).
///
/// `Send + Sync`, the programs shared as `Arc<StepIr>`: [`get`](Self::get) takes `&mut self`,
/// so threads share one cache behind a `Mutex`, and the programs it returns can be used from
/// any thread.
#[derive(Default)]
pub struct PlanCache {
    plans: HashMap<Layout, Arc<StepIr>>,
    compiled: usize,
}

impl PlanCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// The program for `layout`, compiled on first use.
    pub fn get(&mut self, lopt: &LearnedOptimizer, layout: &Layout) -> Result<Arc<StepIr>> {
        if let Some(ir) = self.plans.get(layout) {
            return Ok(ir.clone());
        }
        let ir = Arc::new(crate::compile_layout(layout, lopt)?);
        self.compiled += 1;
        self.plans.insert(layout.clone(), ir.clone());
        Ok(ir)
    }

    /// How many programs were compiled (calls to [`compile_step`](crate::compile_step)).
    pub fn compiled(&self) -> usize {
        self.compiled
    }
}

/// Any [`StepperFactory`] as a [`BackendFactory`]: one stepper per tensor, programs shared
/// per shape.
#[derive(Clone, Copy, Debug, Default)]
pub struct PerTensor<F>(pub F);

impl<F: StepperFactory> BackendFactory for PerTensor<F> {
    fn target(&self) -> &'static str {
        self.0.target()
    }

    fn build(
        &self,
        lopt: &LearnedOptimizer,
        layouts: &[Layout],
        start_step: u64,
    ) -> Result<Box<dyn ModelBackend>> {
        Ok(Box::new(PerTensorBackend::new(
            lopt, layouts, start_step, &self.0,
        )?))
    }
}

/// A [`ModelBackend`] holding one [`TensorStepper`] per tensor and stepping them in turn.
pub struct PerTensorBackend {
    target: &'static str,
    steppers: Vec<Box<dyn TensorStepper>>,
    compiled: usize,
}

impl PerTensorBackend {
    /// Compiles `lopt` once per distinct layout of `layouts` and makes one stepper per tensor.
    pub fn new(
        lopt: &LearnedOptimizer,
        layouts: &[Layout],
        start_step: u64,
        factory: &dyn StepperFactory,
    ) -> Result<Self> {
        let mut cache = PlanCache::new();
        let steppers = layouts
            .iter()
            .map(|layout| factory.stepper(cache.get(lopt, layout)?, start_step))
            .collect::<Result<Vec<_>>>()?;
        Ok(PerTensorBackend {
            target: factory.target(),
            steppers,
            compiled: cache.compiled(),
        })
    }

    fn stepper(&self, index: usize) -> Result<&dyn TensorStepper> {
        self.steppers
            .get(index)
            .map(|s| s.as_ref())
            .ok_or_else(|| out_of_range(index, self.steppers.len()))
    }
}

/// The error for a tensor index outside a model of `len` tensors.
pub(crate) fn out_of_range(index: usize, len: usize) -> Error {
    Error::argument(
        "index",
        format!("tensor {index} does not exist (the model has {len})"),
    )
}

impl ModelBackend for PerTensorBackend {
    fn target(&self) -> &'static str {
        self.target
    }

    fn len(&self) -> usize {
        self.steppers.len()
    }

    fn compiled_plans(&self) -> usize {
        self.compiled
    }

    fn step(&mut self, batch: &mut [TensorStep<'_>]) -> Result<()> {
        let len = self.steppers.len();
        if let Some(t) = batch.iter().find(|t| t.index >= len) {
            return Err(out_of_range(t.index, len));
        }
        let total = batch.len();
        for (done, t) in batch.iter_mut().enumerate() {
            self.steppers[t.index]
                .step(t.param, t.grad, t.hyper)
                .map_err(|e| {
                    Error::backend_from(
                        self.target,
                        &format!(
                            "tensor {} failed after {done} of the batch's {total} tensors were stepped",
                            t.index
                        ),
                        e,
                    )
                })?;
        }
        Ok(())
    }

    fn state(&self, index: usize) -> Result<TensorState> {
        self.stepper(index)?.state()
    }

    fn state_into(&self, index: usize, into: &mut Option<TensorState>) -> Result<()> {
        self.stepper(index)?.state_into(into)
    }

    fn state_is_finite(&self, index: usize) -> Result<bool> {
        self.stepper(index)?.state_is_finite()
    }

    fn set_state(&mut self, index: usize, state: TensorState) -> Result<()> {
        let len = self.steppers.len();
        self.steppers
            .get_mut(index)
            .ok_or_else(|| out_of_range(index, len))?
            .set_state(state)
    }
}
