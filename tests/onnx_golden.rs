//! The ONNX export run by tract: golden replay, graph invariants, error handling.

mod common;

use mulo::backend::onnx::{export, OnnxStepper, OPSET};
use mulo::backend::{Hyper, TensorStepper};
use mulo::shape::Shape;
use mulo::trajectory::{replay, Trajectory, DEFAULT_TOLERANCE};
use onnx_protobuf::{Message, ModelProto};

fn model(shape: &str) -> ModelProto {
    let ir = mulo::compile_step(&Shape::parse(shape).unwrap(), &common::fixture_lopt()).unwrap();
    ModelProto::parse_from_bytes(&export(&ir).unwrap()).expect("exported bytes parse")
}

#[test]
fn tract_replays_every_golden_case_within_tolerance() {
    let lopt = common::fixture_lopt();
    let cases = common::golden_cases();
    assert!(cases.len() >= 8, "golden cases missing: {cases:?}");
    for path in cases {
        let traj = Trajectory::load(&path).unwrap();
        let ir = mulo::compile_layout(&traj.layout, &lopt).unwrap();
        let mut stepper = OnnxStepper::new(&ir, 0).unwrap();
        let report = replay(&mut stepper, &traj).unwrap();
        common::assert_within_golden_tolerance(&report, "tract");
    }
}

#[test]
fn graph_size_does_not_depend_on_tensor_size() {
    let small = model("64x32");
    let big = model("1024x512");
    let (gs, gb) = (small.graph.as_ref().unwrap(), big.graph.as_ref().unwrap());
    assert_eq!(gs.node.len(), gb.node.len());
    assert_eq!(gs.initializer.len(), gb.initializer.len());
    let bytes = |m: &ModelProto| m.write_to_bytes().unwrap().len();
    // Only the shape constants' digits differ.
    assert!(bytes(&big).abs_diff(bytes(&small)) < 1024);
}

#[test]
fn standard_opset_and_domains_only() {
    for shape in ["1024x512", "37", "scalar", "16x8x3x3"] {
        let m = model(shape);
        assert_eq!(m.opset_import.len(), 1, "{shape}");
        assert_eq!(m.opset_import[0].domain, "");
        assert!(m.opset_import[0].version >= 17 && m.opset_import[0].version == OPSET);
        let g = m.graph.as_ref().unwrap();
        assert!(g.node.iter().all(|n| n.domain.is_empty()), "{shape}");
        let inputs: Vec<&str> = g.input.iter().map(|i| i.name.as_str()).collect();
        let outputs: Vec<&str> = g.output.iter().map(|i| i.name.as_str()).collect();
        if shape.contains('x') {
            assert_eq!(
                inputs,
                [
                    "param",
                    "grad",
                    "mom",
                    "rms",
                    "fac_row",
                    "fac_col",
                    "step",
                    "lr",
                    "weight_decay"
                ]
            );
            assert_eq!(
                outputs,
                [
                    "param_out",
                    "mom_out",
                    "rms_out",
                    "fac_row_out",
                    "fac_col_out",
                    "step_out"
                ]
            );
        } else {
            assert_eq!(
                inputs,
                [
                    "param",
                    "grad",
                    "mom",
                    "rms",
                    "fac_v",
                    "step",
                    "lr",
                    "weight_decay"
                ]
            );
            assert_eq!(
                outputs,
                ["param_out", "mom_out", "rms_out", "fac_v_out", "step_out"]
            );
        }
    }
}

#[test]
fn bad_input_is_an_error_and_leaves_param_and_state_unchanged() {
    let ir = mulo::compile_step(&Shape::parse("8x4").unwrap(), &common::fixture_lopt()).unwrap();
    let mut stepper = OnnxStepper::new(&ir, 0).unwrap();
    let hyper = Hyper {
        lr: 0.1,
        weight_decay: 0.0,
    };
    let mut param: Vec<f32> = (0..32).map(|i| i as f32 * 0.01).collect();
    let grad: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) * 0.003).collect();
    stepper.step(&mut param, &grad, hyper).unwrap();
    let (param_before, state_before) = (param.clone(), stepper.state().unwrap());
    assert_eq!(state_before.step, 1);

    let err = stepper
        .step(&mut param, &grad[..31], hyper)
        .unwrap_err()
        .to_string();
    assert!(err.contains("grad"), "{err}");
    let mut short = param[..30].to_vec();
    let err = stepper
        .step(&mut short, &grad, hyper)
        .unwrap_err()
        .to_string();
    assert!(err.contains("param"), "{err}");
    let err = stepper
        .step(
            &mut param,
            &grad,
            Hyper {
                lr: f32::NAN,
                weight_decay: 0.0,
            },
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("lr"), "{err}");
    assert_eq!(param, param_before);
    assert_eq!(stepper.state().unwrap(), state_before);

    // A state for another shape is refused too.
    let other = mulo::shape::Layout::new(Shape::parse("4x8").unwrap());
    let err = stepper
        .set_state(mulo::state::TensorState::zeros(&other, 0))
        .unwrap_err()
        .to_string();
    assert!(err.contains("state"), "{err}");
    assert_eq!(stepper.state().unwrap(), state_before);

    // And the stepper still works afterwards.
    stepper.step(&mut param, &grad, hyper).unwrap();
    assert_eq!(stepper.state().unwrap().step, 2);
}

#[test]
fn zero_d_parameter_keeps_its_shape() {
    let m = model("scalar");
    let g = m.graph.as_ref().unwrap();
    let dims = |name: &str, list: &[onnx_protobuf::ValueInfoProto]| -> usize {
        let vi = list.iter().find(|v| v.name == name).unwrap();
        match &vi.type_.as_ref().unwrap().value {
            Some(onnx_protobuf::type_proto::Value::TensorType(t)) => t.shape.dim.len(),
            _ => panic!("{name} is not a tensor"),
        }
    };
    assert_eq!(dims("param", &g.input), 0);
    assert_eq!(dims("param_out", &g.output), 0);
    assert_eq!(dims("mom", &g.input), 1);
}

/// What the step depends on beyond its I/O shapes is in the model's `metadata_props`: the
/// factored axes above all (SPEC.md §2).
#[test]
fn metadata_records_the_factored_axes() {
    let lopt = common::fixture_lopt();
    let props = |layout: &mulo::shape::Layout| -> Vec<(String, String)> {
        let ir = mulo::compile_layout(layout, &lopt).unwrap();
        let m = ModelProto::parse_from_bytes(&export(&ir).unwrap()).unwrap();
        m.metadata_props
            .iter()
            .map(|p| (p.key.clone(), p.value.clone()))
            .collect()
    };
    let shape = Shape::parse("32x32x3x3").unwrap();
    let tied = mulo::shape::Layout::with_axes(
        shape.clone(),
        Some(mulo::shape::FactoredAxes { d0: 0, d1: 1 }),
    )
    .unwrap();
    let get = |props: &[(String, String)], key: &str| {
        props.iter().find(|p| p.0 == key).map(|p| p.1.clone())
    };
    assert_eq!(
        get(&props(&tied), "mulo.factored_axes").as_deref(),
        Some("[0, 1]")
    );
    let default = props(&mulo::shape::Layout::new(shape));
    assert_eq!(
        get(&default, "mulo.factored_axes").as_deref(),
        Some("[1, 0]")
    );
    assert_eq!(
        get(&default, "mulo.shape").as_deref(),
        Some("[32, 32, 3, 3]")
    );
    let vector = props(&mulo::shape::Layout::new(Shape::parse("37").unwrap()));
    assert_eq!(get(&vector, "mulo.factored_axes").as_deref(), Some("null"));
}

#[test]
fn chunked_runtime_replays_golden_cases_within_tolerance() {
    use mulo::backend::onnx::ChunkedOnnxStepper;
    let lopt = common::fixture_lopt();
    let mut ran = 0;
    for path in common::golden_cases() {
        let traj = Trajectory::load(&path).unwrap();
        let ir = mulo::compile_layout(&traj.layout, &lopt).unwrap();
        if !ChunkedOnnxStepper::supports(&ir.layout) {
            continue;
        }
        // Small chunks: several per tensor, and a shorter last one.
        let row_len = ir.layout.numel() / ir.layout.dims()[0];
        let mut stepper = ChunkedOnnxStepper::new(&ir, 0, row_len * 3, 2).unwrap();
        let report = replay(&mut stepper, &traj).unwrap();
        assert!(
            report.worst() <= DEFAULT_TOLERANCE,
            "{}: param error {:e}, state errors {:?}",
            report.name,
            report.param_error,
            report.state_errors
        );
        ran += 1;
    }
    assert!(ran >= 5, "only {ran} cases ran chunked");
}
