//! μP learning rates against the semantics of the reference (mup's `MuAdam` parameter groups
//! as `MuLO_naive` uses them, SPEC.md §4), for a model with input, hidden, output, bias,
//! convolution and scalar tensors.

use mulo::backend::interp::InterpStepper;
use mulo::backend::{Hyper, TensorStepper};
use mulo::lopt::LearnedOptimizer;
use mulo::optimizer::{MuloOptimizer, OptimizerOptions, ParamSpec};
use mulo::shape::Shape;
use std::sync::Arc;

/// (name, shape, base shape, the lr multiplier mup gives it).
///
/// mup: a dimension is infinite when it differs from the base; `ninf() == 2` → the group's
/// lr is divided by `width_mult()` = size / base size of the LAST infinite dimension; every
/// other tensor keeps lr.
const MODEL: &[(&str, &[usize], &[usize], f32)] = &[
    ("input.weight", &[64, 8], &[16, 8], 1.0), // ninf 1 (fan-out only)
    ("input.bias", &[64], &[16], 1.0),         // ninf 1
    ("hidden.weight", &[64, 64], &[16, 16], 0.25), // ninf 2, width_mult 64/16
    ("hidden.bias", &[64], &[16], 1.0),
    // ninf 2 with different ratios: 96/32 = 3 on dim 0, 64/16 = 4 on dim 1 (the last): 1/4.
    ("proj.weight", &[96, 64], &[32, 16], 0.25),
    ("narrow.weight", &[64, 32], &[16, 16], 0.5), // width_mult 32/16
    ("conv.weight", &[64, 32, 3, 3], &[16, 16, 3, 3], 0.5), // fan-in is dim 1
    ("output.weight", &[5, 64], &[5, 16], 1.0),   // ninf 1 (fan-in only)
    ("output.bias", &[5], &[5], 1.0),             // ninf 0
    ("gain", &[], &[], 1.0),                      // 0-d
];

fn specs() -> Vec<ParamSpec> {
    MODEL
        .iter()
        .map(|(n, d, b, _)| ParamSpec::new(*n, d).unwrap().with_base_shape(b).unwrap())
        .collect()
}

fn data(seed: u32, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / 16777216.0
                - 0.5)
                * [1.0, 0.01, 0.1][i % 3]
        })
        .collect()
}

#[test]
fn multipliers_are_mups() {
    let opt = MuloOptimizer::new(
        &LearnedOptimizer::demo(),
        specs(),
        OptimizerOptions::default(),
    )
    .unwrap();
    let got = opt.lr_multipliers();
    for ((name, mult), (want_name, _, _, want)) in got.iter().zip(MODEL) {
        assert_eq!(name, want_name);
        assert_eq!(*mult, *want as f64, "{name}");
        let i = opt.index_of(name).unwrap();
        assert_eq!(opt.scaled_lr(i, 0.5), 0.5 * want, "{name}");
    }
}

#[test]
fn mup_step_equals_each_tensor_at_its_scaled_lr_bitwise() {
    let lopt = LearnedOptimizer::demo();
    let (lr, wd) = (0.5f32, 0.1f32);
    let mut opt = MuloOptimizer::new(&lopt, specs(), OptimizerOptions::default()).unwrap();
    let mut params: Vec<Vec<f32>> = MODEL
        .iter()
        .enumerate()
        .map(|(i, (_, d, _, _))| data(i as u32, d.iter().product()))
        .collect();
    let mut want = params.clone();
    let mut steppers: Vec<InterpStepper> = MODEL
        .iter()
        .map(|(_, d, _, _)| {
            let ir = mulo::compile_step(&Shape::new(d.to_vec()).unwrap(), &lopt).unwrap();
            InterpStepper::new(Arc::new(ir), 0)
        })
        .collect();
    for step in 0..3u32 {
        let grads: Vec<Vec<f32>> = MODEL
            .iter()
            .enumerate()
            .map(|(i, (_, d, _, _))| data(100 * step + i as u32 + 7, d.iter().product()))
            .collect();
        let grad_refs: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
        let mut param_refs: Vec<&mut [f32]> = params.iter_mut().map(|p| p.as_mut_slice()).collect();
        opt.step(&mut param_refs, &grad_refs, lr, wd).unwrap();
        for (i, (_, _, _, mult)) in MODEL.iter().enumerate() {
            // The expected lr written out: 0.5, 0.25 or 0.125, all exact in f32.
            let hyper = Hyper {
                lr: lr * mult,
                weight_decay: wd,
            };
            steppers[i].step(&mut want[i], &grads[i], hyper).unwrap();
        }
    }
    for (i, (name, _, _, _)) in MODEL.iter().enumerate() {
        let (a, b): (Vec<u32>, Vec<u32>) = (
            params[i].iter().map(|x| x.to_bits()).collect(),
            want[i].iter().map(|x| x.to_bits()).collect(),
        );
        assert_eq!(a, b, "{name}");
    }
}

#[test]
fn explicit_multipliers_equal_base_shapes() {
    let lopt = LearnedOptimizer::demo();
    let explicit: Vec<ParamSpec> = MODEL
        .iter()
        .map(|(n, d, _, m)| ParamSpec::new(*n, d).unwrap().with_lr_multiplier(*m as f64))
        .collect();
    let mut a = MuloOptimizer::new(&lopt, specs(), OptimizerOptions::default()).unwrap();
    let mut b = MuloOptimizer::new(&lopt, explicit, OptimizerOptions::default()).unwrap();
    let mut pa: Vec<Vec<f32>> = MODEL
        .iter()
        .enumerate()
        .map(|(i, (_, d, _, _))| data(i as u32, d.iter().product()))
        .collect();
    let mut pb = pa.clone();
    let grads: Vec<Vec<f32>> = MODEL
        .iter()
        .enumerate()
        .map(|(i, (_, d, _, _))| data(i as u32 + 50, d.iter().product()))
        .collect();
    let g: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
    a.step(
        &mut pa.iter_mut().map(|p| p.as_mut_slice()).collect::<Vec<_>>(),
        &g,
        0.3,
        0.0,
    )
    .unwrap();
    b.step(
        &mut pb.iter_mut().map(|p| p.as_mut_slice()).collect::<Vec<_>>(),
        &g,
        0.3,
        0.0,
    )
    .unwrap();
    assert_eq!(pa, pb);
}

#[test]
fn mup_errors_name_the_tensor() {
    let lopt = LearnedOptimizer::demo();
    for (spec, words) in [
        (
            ParamSpec::new("cube", &[4, 4, 4])
                .unwrap()
                .with_base_shape(&[2, 2, 2])
                .unwrap(),
            ["`cube`", "3 dimensions"],
        ),
        (
            ParamSpec::new("flat", &[4, 4])
                .unwrap()
                .with_base_shape(&[4])
                .unwrap(),
            ["`flat`", "rank"],
        ),
        (
            ParamSpec::new("neg", &[4])
                .unwrap()
                .with_lr_multiplier(-1.0),
            ["`neg`", "multiplier"],
        ),
    ] {
        let err = MuloOptimizer::new(&lopt, vec![spec], OptimizerOptions::default())
            .unwrap_err()
            .to_string();
        for w in words {
            assert!(err.contains(w), "{w} in {err}");
        }
    }
}
