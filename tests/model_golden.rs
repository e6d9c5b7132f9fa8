//! Whole-model golden replay: the μP CNN trained by PyLO's `MuLO_naive`
//! (`tests/fixtures/models/digits_cnn_w32.safetensors`: a 0-d gain, convolution kernels, one
//! with tied largest axes, a linear layer, a μP readout, biases) through [`MuloOptimizer`] from
//! zero state, on every CPU backend. Every tensor must follow PyLO's trajectory within 1e-4 of
//! its displacement at every step.

mod common;

use common::model::{assert_model_within_tolerance, ModelCase, Mup};
use mulo::backend::{CpuFactory, InterpFactory, PerTensor};
use mulo::optimizer::OptimizerOptions;
use std::sync::Arc;

fn options(backend: Arc<dyn mulo::backend::BackendFactory>) -> OptimizerOptions {
    OptimizerOptions {
        backend,
        ..Default::default()
    }
}

#[test]
fn digits_cnn_replays_on_the_interpreter() {
    let case = ModelCase::digits();
    let errors = case.replay(Mup::BaseShapes, options(Arc::new(PerTensor(InterpFactory))));
    assert_model_within_tolerance(&errors, "interp, μP from base shapes");
}

#[test]
fn digits_cnn_replays_on_the_cpu_backend() {
    let case = ModelCase::digits();
    let errors = case.replay(Mup::BaseShapes, options(Arc::new(PerTensor(CpuFactory))));
    assert_model_within_tolerance(&errors, "cpu, μP from base shapes");
}

#[cfg(feature = "onnx")]
#[test]
fn digits_cnn_replays_on_tract() {
    let case = ModelCase::digits();
    let errors = case.replay(
        Mup::BaseShapes,
        options(Arc::new(PerTensor(mulo::backend::OnnxFactory))),
    );
    assert_model_within_tolerance(&errors, "onnx (tract), μP from base shapes");
}

/// The recorded `lr_multiplier`s instead of the base shapes give bitwise the same run: μP
/// resolves to exactly those multipliers.
#[test]
fn recorded_lr_multipliers_give_the_same_run_as_base_shapes() {
    let case = ModelCase::digits();
    let from_shapes = case.replay(Mup::BaseShapes, options(Arc::new(PerTensor(CpuFactory))));
    let from_multipliers = case.replay(Mup::Multipliers, options(Arc::new(PerTensor(CpuFactory))));
    assert_model_within_tolerance(&from_multipliers, "cpu, recorded lr multipliers");
    assert_eq!(from_shapes, from_multipliers);
}

/// The tied kernel replays only with the recorded axes: with the default (stable) axes it is
/// far off, which is what makes the axes an input of the step.
#[test]
fn the_tied_kernel_needs_its_recorded_axes() {
    let mut case = ModelCase::digits();
    let tied = case
        .params
        .iter()
        .position(|p| p.name == "conv2.weight")
        .unwrap();
    assert_eq!(case.params[tied].factored_axes, Some([0, 1]));
    case.params[tied].factored_axes = None; // the stable order: d0 = 1, d1 = 0
    let errors = case.replay(Mup::BaseShapes, options(Arc::new(PerTensor(CpuFactory))));
    assert!(errors[tied].1 > 1e-2, "{errors:?}");
}
