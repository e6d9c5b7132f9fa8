//! ONNX export of one step, and a CPU runtime that executes it with tract.
//!
//! The graph is rendered from the step IR by [`render`](render::render); nothing here knows the
//! μLO math. The I/O contract of the exported model (stable; see `docs/onnx.md`):
//!
//! | input | type, shape | | output | type, shape |
//! |---|---|---|---|---|
//! | `param` | f32 `S` | | `param_out` | f32 `S` |
//! | `grad` | f32 `S` | | | |
//! | `mom` | f32 `[3, *S]` | | `mom_out` | f32 `[3, *S]` |
//! | `rms` | f32 `S` | | `rms_out` | f32 `S` |
//! | `fac_row` (factored) | f32 `[3, *(S without d0)]` | | `fac_row_out` | same |
//! | `fac_col` (factored) | f32 `[3, *(S without d1)]` | | `fac_col_out` | same |
//! | `fac_v` (rank ≤ 1) | f32 `[3, *S]` | | `fac_v_out` | same |
//! | `step` | int64 `[]` (t, steps taken so far) | | `step_out` | int64 `[]` (t + 1) |
//! | `lr` | f32 `[]` | | | |
//! | `weight_decay` | f32 `[]` | | | |
//!
//! `S` is the parameter's shape as the user gave it (`[]` for a 0-d tensor). The state layout is
//! the canonical decay-major one of [`crate::state`].

pub mod chunked;
pub mod render;
pub mod runtime;

pub use chunked::ChunkedOnnxStepper;
pub use runtime::OnnxStepper;

use crate::backend::TensorStepper;
use crate::error::{Error, Result};
use crate::ir::{Buffer, StepIr};
use crate::shape::{Domain, Layout};
use protobuf::Message;
use std::sync::Arc;

/// The ONNX opset the exported graphs use (standard domain only).
pub const OPSET: i64 = 18;

/// Default file name of the exported model.
pub const DEFAULT_FILE_NAME: &str = "mulo_step.onnx";

/// The shape of a buffer in the ONNX I/O contract: with the leading lane axis when `with_lanes`
/// and the buffer has several lanes, else the shape of one lane. Element-domain buffers use the
/// user's shape `S` (so a 0-d parameter stays 0-d).
pub fn io_shape(buffer: Buffer, layout: &Layout, with_lanes: bool) -> Vec<usize> {
    let mut shape = if buffer.domain() == Domain::Elem {
        layout.shape().dims().to_vec()
    } else {
        layout.domain_shape(buffer.domain())
    };
    if with_lanes && buffer.lanes() > 1 {
        shape.insert(0, buffer.lanes());
    }
    shape
}

/// Renders `ir` and serializes the model to protobuf bytes (the content of `mulo_step.onnx`).
pub fn export(ir: &StepIr) -> Result<Vec<u8>> {
    let model = render::render(ir)?;
    model
        .write_to_bytes()
        .map_err(|e| Error::backend_from("onnx", "serializing the model", e))
}

/// The tract CPU runtime as a [`StepperFactory`](crate::backend::StepperFactory): the chunked runtime (statistics graph plus
/// per-chunk graphs on 2 threads) where the tensor has at least 2 rows on axis 0, the whole
/// exported graph ([`OnnxStepper`]) elsewhere.
#[derive(Clone, Copy, Debug, Default)]
pub struct OnnxFactory;

impl crate::backend::StepperFactory for OnnxFactory {
    fn target(&self) -> &'static str {
        "onnx"
    }

    fn stepper(&self, ir: Arc<StepIr>, start_step: u64) -> Result<Box<dyn TensorStepper>> {
        use chunked::DEFAULT_CHUNK_ELEMENTS;
        Ok(if ChunkedOnnxStepper::supports(&ir.layout) {
            Box::new(ChunkedOnnxStepper::new(
                &ir,
                start_step,
                DEFAULT_CHUNK_ELEMENTS,
                2,
            )?)
        } else {
            Box::new(OnnxStepper::new(&ir, start_step)?)
        })
    }
}
