//! Backends: each one renders or executes a [`StepIr`](crate::ir::StepIr); none re-derives the math.
//!
//! [`TensorStepper`] steps one tensor; [`model`] lifts steppers to a whole model
//! ([`ModelBackend`], what [`MuloOptimizer`](crate::optimizer::MuloOptimizer) drives). The
//! factories that pick a backend for the optimizer live beside their backends:
//! [`InterpFactory`], [`CpuFactory`] (the default, [`default_factory`]), `OnnxFactory` (feature
//! `onnx`), `CudaFactory` and `PackedCuda` (feature `cuda`).

pub mod cpu;
pub mod cuda;
pub mod interp;
pub mod model;
#[cfg(feature = "onnx")]
pub mod onnx;

pub use cpu::CpuFactory;
#[cfg(feature = "cuda")]
pub use cuda::factory::CudaFactory;
#[cfg(feature = "cuda")]
pub use cuda::packed_runtime::PackedCuda;
pub use interp::InterpFactory;
pub use model::{
    BackendFactory, ModelBackend, PerTensor, PerTensorBackend, PlanCache, StepperFactory,
    TensorStep,
};
#[cfg(feature = "onnx")]
pub use onnx::OnnxFactory;

use crate::error::{Error, Result};
use crate::shape::Layout;
use crate::state::TensorState;

/// The optimizer's default backend: the native CPU backend, one stepper per tensor.
pub fn default_factory() -> std::sync::Arc<dyn BackendFactory> {
    std::sync::Arc::new(PerTensor(CpuFactory))
}

/// The runtime hyper-parameters of one step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hyper {
    /// Learning rate (after any μP scaling).
    pub lr: f32,
    /// Weight decay (≥ 0), applied as `P ← P − lr·wd·P` after the update.
    pub weight_decay: f32,
}

impl Hyper {
    /// Checks that `lr` is finite and `weight_decay` finite and not negative.
    pub fn validate(&self) -> Result<()> {
        if !self.lr.is_finite() {
            return Err(Error::argument(
                "lr",
                format!("{} is not a finite number", self.lr),
            ));
        }
        if !self.weight_decay.is_finite() || self.weight_decay < 0.0 {
            return Err(Error::argument(
                "weight_decay",
                format!("{} must be a finite number ≥ 0", self.weight_decay),
            ));
        }
        Ok(())
    }
}

/// Checks a step's arguments against the layout before anything is touched.
pub fn check_step_args(layout: &Layout, param: usize, grad: usize, hyper: &Hyper) -> Result<()> {
    let n = layout.numel();
    for (name, len) in [("param", param), ("grad", grad)] {
        if len != n {
            return Err(Error::argument(
                name,
                format!(
                    "has {len} values; the program is compiled for shape {} ({n} values)",
                    layout.shape()
                ),
            ));
        }
    }
    hyper.validate()
}

/// Checks that a state handed to a stepper is for the layout the stepper was compiled for.
pub(crate) fn check_state_layout<T: Copy + Default>(
    layout: &Layout,
    state: &TensorState<T>,
) -> Result<()> {
    if state.layout() != layout {
        return Err(Error::argument(
            "state",
            format!(
                "is for shape {}, the program for {}",
                state.layout().shape(),
                layout.shape()
            ),
        ));
    }
    Ok(())
}

/// Something that steps one tensor with host-side buffers and keeps its state: what
/// `mulo-compile replay` and the property tests drive, whatever the backend.
///
/// `Send + Sync`: a stepper can be moved to another thread, and its `&self` methods (the
/// state, the layout) called from several threads at once; stepping takes `&mut self`.
pub trait TensorStepper: Send + Sync {
    /// The backend's name (`interp`, `onnx`, `cuda`).
    fn target(&self) -> &'static str;

    /// The tensor layout the stepper was compiled for.
    fn layout(&self) -> &Layout;

    /// One step: updates `param` in place and the internal state. On error, `param` and the
    /// state are left as they were.
    fn step(&mut self, param: &mut [f32], grad: &[f32], hyper: Hyper) -> Result<()>;

    /// The current state, canonical layout.
    fn state(&self) -> Result<TensorState>;

    /// Replaces the state (e.g. to start from a PyLO state or a checkpoint).
    fn set_state(&mut self, state: TensorState) -> Result<()>;

    /// Copies the current state into `into`: the optimizer's guard takes this snapshot before
    /// every step, so a stepper that can should reuse `into`'s buffers when it already holds a
    /// state of this layout (no allocation, no page faults) instead of allocating new ones.
    fn state_into(&self, into: &mut Option<TensorState>) -> Result<()> {
        *into = Some(self.state()?);
        Ok(())
    }

    /// Whether every accumulator of the current state is finite (the guard's check after
    /// every step; a stepper that can should read its buffers in place instead of copying).
    fn state_is_finite(&self) -> Result<bool> {
        Ok(self
            .state()?
            .iter()
            .all(|(_, v)| v.iter().all(|x| x.is_finite())))
    }
}
