//! # mulo
//!
//! Compiles the μLO_M learned optimizer (arXiv 2406.00153, Hub model `btherien/mulo`) into
//! optimizer-step programs for one concrete tensor shape.
//!
//! The centre is the step IR ([`ir::StepIr`]), built from the math of SPEC.md by
//! [`frontend::build_step`] and optimized by the passes of `src/passes.rs`. Backends render it:
//! the reference interpreter ([`backend::interp`]) executes it on the CPU in f32 or f64.
//!
//! ```no_run
//! use mulo::{compile_step, backend::{Hyper, TensorStepper, interp::InterpStepper},
//!            lopt::LearnedOptimizer, shape::Shape};
//! use std::sync::Arc;
//!
//! let lopt = LearnedOptimizer::load("btherien/mulo")?; // or a directory, or a .safetensors file
//! let ir = compile_step(&Shape::parse("1024x512")?, &lopt)?;
//! let mut stepper = InterpStepper::new(Arc::new(ir), 0);
//! let (mut param, grad) = (vec![0.1f32; 1024 * 512], vec![0.01f32; 1024 * 512]);
//! stepper.step(&mut param, &grad, Hyper { lr: 1e-3, weight_decay: 0.0 })?;
//! # Ok::<(), mulo::Error>(())
//! ```

#![warn(missing_docs)]

pub mod backend;
pub mod bench;
pub(crate) mod digest;
pub mod error;
pub mod frontend;
pub mod fsio;
pub mod ir;
pub mod lopt;
pub mod optimizer;
pub(crate) mod passes;
pub mod plan;
pub mod shape;
pub mod shard;
pub mod state;
pub mod trajectory;

#[cfg(feature = "onnx")]
pub use backend::OnnxFactory;
pub use backend::{
    BackendFactory, CpuFactory, Hyper, InterpFactory, ModelBackend, PerTensor, StepperFactory,
    TensorStepper,
};
#[cfg(feature = "cuda")]
pub use backend::{CudaFactory, PackedCuda};
pub use error::{Error, Result};
pub use lopt::LearnedOptimizer;
pub use optimizer::{MuloOptimizer, NonFinitePolicy, OptimizerOptions, ParamSpec, StepReport};
pub use shape::{FactoredAxes, Layout, Shape};

use ir::StepIr;

/// Builds, verifies and optimizes the step IR of `lopt` for a tensor of `shape`, with the
/// default factored axes (SPEC.md §2; see [`compile_layout`] to state them).
pub fn compile_step(shape: &Shape, lopt: &LearnedOptimizer) -> Result<StepIr> {
    compile_layout(&Layout::new(shape.clone()), lopt)
}

/// Builds, verifies and optimizes the step IR of `lopt` for a tensor of `layout`: a shape with
/// its factored axes ([`Layout::with_axes`]).
pub fn compile_layout(layout: &Layout, lopt: &LearnedOptimizer) -> Result<StepIr> {
    // Zero elements: nothing to compute, and the means over an empty axis have no value.
    if layout.numel() == 0 {
        return Err(Error::Shape {
            text: layout.shape().to_string(),
            reason: "the tensor has no elements (a dimension is 0): no step program is \
                     compiled for it (MuloOptimizer leaves such a tensor as it is)"
                .into(),
        });
    }
    let ir = frontend::build_step(layout, lopt);
    ir::verify(&ir)?;
    passes::optimize(ir)
}
