//! One CUDA program per tensor as a [`StepperFactory`]: the simple, host-copy path of the
//! optimizer on a GPU (the packed whole-model backend is
//! [`PackedCuda`](super::packed_runtime::PackedCuda)).

use crate::backend::{StepperFactory, TensorStepper};
use crate::error::Result;
use crate::ir::StepIr;
use std::sync::Arc;

/// CUDA, one [`CudaStepper`](super::runtime::CudaStepper) per tensor (programs
/// shared per shape by the runtime's cache). Each tensor's step is its own launch sequence
/// with host copies through [`TensorStepper`]: correct, not the packed whole-model backend
/// (see the module documentation).
pub struct CudaFactory {
    runtime: super::runtime::CudaRuntime,
}

impl CudaFactory {
    /// Opens CUDA device `ordinal`.
    pub fn new(ordinal: usize) -> Result<Self> {
        let _current = super::current::RestoreCurrent::new();
        Ok(CudaFactory {
            runtime: super::runtime::CudaRuntime::new(ordinal)?,
        })
    }
}

impl StepperFactory for CudaFactory {
    fn target(&self) -> &'static str {
        "cuda"
    }

    fn stepper(&self, ir: Arc<StepIr>, start_step: u64) -> Result<Box<dyn TensorStepper>> {
        let _current = super::current::RestoreCurrent::new();
        let program = self.runtime.program(&ir)?;
        Ok(Box::new(super::runtime::CudaStepper::new(
            program, start_step,
        )?))
    }
}
