//! Properties of the reference interpreter on random shapes and gradients.

mod common;

use mulo::backend::interp::{execute, InterpStepper};
use mulo::backend::{Hyper, TensorStepper};
use mulo::shape::{Layout, Shape};
use mulo::state::TensorState;
use proptest::prelude::*;
use std::sync::Arc;

fn shapes() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        Just(vec![]),
        prop::collection::vec(1usize..80, 1..=1),
        prop::collection::vec(1usize..40, 2..=2),
        prop::collection::vec(1usize..9, 3..=4),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// f32 and f64 runs of the same IR agree within the golden tolerance (1e-4 of the
    /// displacement) plus the rounding of the f32 parameter itself (one ulp of |p| per step,
    /// which dominates when a tensor of a few elements barely moves): the f32 path has no
    /// precision trap (means are accumulated wide) on any shape class.
    #[test]
    fn f32_run_tracks_the_f64_run(dims in shapes(), seed in 1u64..u64::MAX, start in 0u64..5000) {
        let lopt = common::fixture_lopt();
        let shape = Shape::new(dims).unwrap();
        let layout = Layout::new(shape.clone());
        let ir = mulo::compile_step(&shape, &lopt).unwrap();
        let n = layout.numel();
        let mut rng = common::Rng(seed);
        let p0: Vec<f32> = (0..n).map(|_| rng.next_f32()).collect();
        let hyper = Hyper { lr: 1.0, weight_decay: 0.01 };
        let (mut p32, mut s32) = (p0.clone(), TensorState::<f32>::zeros(&layout, start));
        let mut p64: Vec<f64> = p0.iter().map(|&x| x as f64).collect();
        let mut s64 = TensorState::<f64>::zeros(&layout, start);
        for _ in 0..4 {
            let g = rng.gradient(n);
            let g64: Vec<f64> = g.iter().map(|&x| x as f64).collect();
            (p32, s32) = execute(&ir, &p32, &g, &s32, hyper).unwrap();
            (p64, s64) = execute(&ir, &p64, &g64, &s64, hyper).unwrap();
        }
        let disp = p64.iter().zip(&p0).map(|(a, &b)| (a - b as f64).abs()).fold(0.0, f64::max);
        let err = p32.iter().zip(&p64).map(|(&a, b)| (a as f64 - b).abs()).fold(0.0, f64::max);
        prop_assert!(disp > 0.0);
        let p_max = p64.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let rounding = 4.0 * f32::EPSILON as f64 * p_max;
        prop_assert!(err <= 1e-4 * disp + rounding, "err {:e} of displacement {:e}", err / disp, disp);
        prop_assert_eq!(s32.step, start + 4);
    }
}

#[test]
fn a_rejected_step_leaves_param_and_state_untouched() {
    let lopt = common::fixture_lopt();
    let shape = Shape::parse("6x5").unwrap();
    let ir = Arc::new(mulo::compile_step(&shape, &lopt).unwrap());
    let mut stepper = InterpStepper::new(ir, 0);
    let mut p = vec![0.5f32; 30];
    let g = vec![0.1f32; 30];
    stepper
        .step(
            &mut p,
            &g,
            Hyper {
                lr: 0.1,
                weight_decay: 0.0,
            },
        )
        .unwrap();
    let (p_before, state_before) = (p.clone(), stepper.state().unwrap());

    let err = stepper
        .step(
            &mut p,
            &g[..29],
            Hyper {
                lr: 0.1,
                weight_decay: 0.0,
            },
        )
        .unwrap_err();
    assert!(
        err.to_string().contains("grad") && err.to_string().contains("6x5"),
        "{err}"
    );
    let err = stepper
        .step(
            &mut p,
            &g,
            Hyper {
                lr: f32::NAN,
                weight_decay: 0.0,
            },
        )
        .unwrap_err();
    assert!(err.to_string().contains("lr"), "{err}");
    let err = stepper
        .step(
            &mut p,
            &g,
            Hyper {
                lr: 0.1,
                weight_decay: -1.0,
            },
        )
        .unwrap_err();
    assert!(err.to_string().contains("weight_decay"), "{err}");
    let wrong = TensorState::zeros(&Layout::new(Shape::parse("5x6").unwrap()), 0);
    assert!(stepper.set_state(wrong).is_err());

    assert_eq!(p, p_before);
    assert_eq!(stepper.state().unwrap(), state_before);
    assert_eq!(state_before.step, 1);
}
