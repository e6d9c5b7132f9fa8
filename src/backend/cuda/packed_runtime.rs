//! Running a [`PackedModel`]: the whole model's step as a fixed number of launches.
//!
//! - [`PackedExecutor`] is where the arenas live and how the launches run: `CudaExecutor`
//!   on a GPU (cudarc, feature `cuda`: `packed_cuda::CudaExecutor`), or, in the tests, the generated source compiled for the CPU. It knows
//!   nothing of tensors.
//! - [`PackedBackend`] is the host logic on top of any executor: it validates a batch, packs
//!   parameters and gradients, computes the block starts, keeps the step counters (the
//!   executor writes the table: the addresses are its arenas'),
//!   and implements [`ModelBackend`] for [`MuloOptimizer`](crate::optimizer::MuloOptimizer).
//!   [`PackedBackend::step_in_place`] steps parameters and gradients already in the device
//!   arenas (a training loop on the GPU).
//! - `PackedCuda` (feature `cuda`) is the [`BackendFactory`](crate::backend::BackendFactory) to put in
//!   [`OptimizerOptions::backend`](crate::optimizer::OptimizerOptions::backend).
//!
//! Tensors that are not in arenas (a framework's) are stepped through
//! [`PackedModel::external_launch`] instead (`packed_external::ExternalCuda` on a GPU).

use super::packed::PackedModel;
use crate::backend::model::out_of_range;
use crate::backend::Hyper;
use crate::backend::{ModelBackend, TensorStep};
use crate::error::{Error, Result};
use crate::ir::Buffer;
use crate::state::TensorState;
use std::sync::Arc;

#[cfg(feature = "cuda")]
pub use super::packed_cuda::{CudaExecutor, PackedCuda};

/// Where a packed model's arenas live and how its launches run.
pub trait PackedExecutor: Send + Sync {
    /// Copies `data` into `arena` at element `offset`.
    fn write(&mut self, arena: Buffer, offset: usize, data: &[f32]) -> Result<()>;

    /// Copies `out.len()` values of `arena` from element `offset` into `out`.
    fn read(&self, arena: Buffer, offset: usize, out: &mut [f32]) -> Result<()>;

    /// Runs one model step on the arenas: writes the table ([`PackedModel::table`] of the
    /// arenas' [`PackedModel::arena_addrs`] and `steps`: per tensor its hyper-parameters and
    /// step counter, `None` when it is not stepped), uploads it and `starts`
    /// ([`PackedModel::block_starts`]) and launches every slot with a non-empty grid, in
    /// order; returns when the step is complete.
    fn run(&mut self, steps: &[Option<(Hyper, u64)>], starts: &[i64], grids: &[u32]) -> Result<()>;
}

/// The host side of a packed model on any [`PackedExecutor`].
pub struct PackedBackend<E> {
    model: Arc<PackedModel>,
    exec: E,
    steps: Vec<u64>,
    target: &'static str,
    staging: [Vec<f32>; 2],
}

impl<E: PackedExecutor> PackedBackend<E> {
    /// A backend over `exec` (whose arenas have the model's lengths, state zero), every
    /// tensor at step counter `start_step`.
    pub fn new(model: Arc<PackedModel>, exec: E, start_step: u64, target: &'static str) -> Self {
        let n = model.tensors.len();
        let len = model.arena_len[&Buffer::Param];
        PackedBackend {
            model,
            exec,
            steps: vec![start_step; n],
            target,
            staging: [vec![0.0; len], vec![0.0; len]],
        }
    }

    /// The packed model.
    pub fn model(&self) -> &Arc<PackedModel> {
        &self.model
    }

    /// The executor (on CUDA: the device arenas, e.g. to compute gradients into).
    pub fn executor(&self) -> &E {
        &self.exec
    }

    /// The executor, mutable.
    pub fn executor_mut(&mut self) -> &mut E {
        &mut self.exec
    }

    /// The step counter of tensor `index`.
    pub fn step_count(&self, index: usize) -> Result<u64> {
        self.steps
            .get(index)
            .copied()
            .ok_or_else(|| out_of_range(index, self.steps.len()))
    }

    /// One step of the tensors with `Some` hyper-parameters in `hypers` (one per tensor),
    /// on the parameters and gradients already in the executor's `param` and `grad` arenas
    /// (each tensor at [`PackedModel::param_offset`]). Hyper-parameters are checked before
    /// anything runs. The tensors' step counters advance.
    pub fn step_in_place(&mut self, hypers: &[Option<Hyper>]) -> Result<()> {
        let n = self.model.tensors.len();
        if hypers.len() != n {
            return Err(Error::argument(
                "hypers",
                format!(
                    "one entry per tensor of the model ({n}) is needed, got {}",
                    hypers.len()
                ),
            ));
        }
        for (i, h) in hypers.iter().enumerate() {
            if let Some(h) = h {
                h.validate()
                    .map_err(|e| Error::argument("hypers", format!("tensor {i}: {e}")))?;
                // A counter at its limit refuses the step before anything runs.
                crate::state::next_step(self.steps[i])
                    .map_err(|e| Error::argument("hypers", format!("tensor {i}: {e}")))?;
            }
        }
        let active: Vec<bool> = hypers.iter().map(Option::is_some).collect();
        let entries: Vec<Option<(Hyper, u64)>> = hypers
            .iter()
            .zip(&self.steps)
            .map(|(h, &s)| h.map(|h| (h, s)))
            .collect();
        let starts = self.model.block_starts(&active);
        let grids = self.model.grids(&starts)?;
        self.exec.run(&entries, &starts, &grids)?;
        for (s, on) in self.steps.iter_mut().zip(active) {
            // Cannot overflow: every stepped counter was checked above.
            *s += on as u64;
        }
        Ok(())
    }
}

impl<E: PackedExecutor> ModelBackend for PackedBackend<E> {
    fn target(&self) -> &'static str {
        self.target
    }

    fn len(&self) -> usize {
        self.model.tensors.len()
    }

    fn compiled_plans(&self) -> usize {
        self.model.plans.len()
    }

    fn step(&mut self, batch: &mut [TensorStep<'_>]) -> Result<()> {
        let n = self.model.tensors.len();
        let mut hypers: Vec<Option<Hyper>> = vec![None; n];
        for t in batch.iter() {
            let slot = hypers
                .get_mut(t.index)
                .ok_or_else(|| out_of_range(t.index, n))?;
            if slot.replace(t.hyper).is_some() {
                return Err(Error::argument(
                    "batch",
                    format!("tensor {} appears twice", t.index),
                ));
            }
            let numel = self.model.tensors[t.index].numel;
            if t.param.len() != numel || t.grad.len() != numel {
                return Err(Error::argument(
                    "batch",
                    format!(
                        "tensor {} has {numel} elements; got a parameter of {} and a gradient of {}",
                        t.index,
                        t.param.len(),
                        t.grad.len()
                    ),
                ));
            }
        }
        let [param, grad] = &mut self.staging;
        for t in batch.iter() {
            let o = self.model.param_offset(t.index);
            param[o..o + t.param.len()].copy_from_slice(t.param);
            grad[o..o + t.grad.len()].copy_from_slice(t.grad);
        }
        self.exec.write(Buffer::Param, 0, param)?;
        self.exec.write(Buffer::Grad, 0, grad)?;
        self.step_in_place(&hypers)?;
        let param = &mut self.staging[0];
        self.exec.read(Buffer::Param, 0, param)?;
        for t in batch.iter_mut() {
            let o = self.model.param_offset(t.index);
            let len = t.param.len();
            t.param.copy_from_slice(&param[o..o + len]);
        }
        Ok(())
    }

    fn state(&self, index: usize) -> Result<TensorState> {
        let n = self.model.tensors.len();
        let t = self
            .model
            .tensors
            .get(index)
            .ok_or_else(|| out_of_range(index, n))?;
        let layout = &self.model.plans[t.plan].ir.layout;
        let mut state = TensorState::zeros(layout, self.steps[index]);
        for b in Buffer::state_for_layout(layout) {
            let mut values = vec![0.0f32; b.len(layout)];
            self.exec.read(b, t.offsets[&b], &mut values)?;
            state.set(b, values)?;
        }
        Ok(state)
    }

    fn set_state(&mut self, index: usize, state: TensorState) -> Result<()> {
        let n = self.model.tensors.len();
        let t = self
            .model
            .tensors
            .get(index)
            .ok_or_else(|| out_of_range(index, n))?;
        crate::backend::check_state_layout(&self.model.plans[t.plan].ir.layout, &state)?;
        for (b, values) in state.iter() {
            self.exec.write(b, t.offsets[&b], values)?;
        }
        self.steps[index] = state.step;
        Ok(())
    }
}
