//! Property test: the native CPU backend computes what the f32 reference interpreter
//! computes, on random shapes (rank 0 to 4, dimensions of 1, sizes that are not multiples of
//! the chunk) and gradients, over several steps.

mod common;

use mulo::backend::cpu::CpuStepper;
use mulo::backend::{interp, Hyper, TensorStepper};
use mulo::shape::Shape;
use mulo::state::TensorState;
use proptest::prelude::*;
use std::sync::Arc;

fn shapes() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        Just(vec![]),
        (1usize..1500).prop_map(|n| vec![n]),
        (1usize..70, 1usize..70).prop_map(|(a, b)| vec![a, b]),
        (1usize..600).prop_map(|n| vec![1, n]),
        (1usize..600).prop_map(|n| vec![n, 1]),
        proptest::collection::vec(1usize..9, 3..=4),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn cpu_matches_the_interpreter(
        dims in shapes(),
        seed in any::<u64>(),
        steps in 2usize..5,
        wd in prop_oneof![Just(0.0f32), Just(0.01f32)],
        start in prop_oneof![Just(0u64), Just(150u64)],
    ) {
        let shape = Shape::new(dims).unwrap();
        let ir = Arc::new(mulo::compile_step(&shape, &common::fixture_lopt()).unwrap());
        let n = shape.numel();
        let hyper = Hyper { lr: 0.1, weight_decay: wd };
        let mut stepper = CpuStepper::new(ir.clone(), start);
        let mut twin = CpuStepper::new(ir.clone(), start).with_threads(1);
        let mut param = common::spread_values(n, seed, 0);
        let mut twin_param = param.clone();
        let p0 = param.clone();
        let mut p32 = param.clone();
        let mut s32 = TensorState::<f32>::zeros(&ir.layout, start);
        for k in 1..=steps {
            let grad = common::spread_values(n, seed ^ 0xABCD, k);
            stepper.step(&mut param, &grad, hyper).unwrap();
            twin.step(&mut twin_param, &grad, hyper).unwrap();
            let (p, s) = interp::execute(&ir, &p32, &grad, &s32, hyper).unwrap();
            p32 = p;
            s32 = s;
            // Bitwise reproducible whatever the thread count.
            prop_assert!(
                param.iter().zip(&twin_param).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{shape} step {k}: 1 and many threads differ"
            );
            let displacement = p32
                .iter()
                .zip(&p0)
                .fold(0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
            // Within 1e-4 of the displacement plus a few f32 ulps of |p| per step (FMA
            // contraction and summation order differ from the interpreter).
            for (i, (&got, &want)) in param.iter().zip(&p32).enumerate() {
                let bound = 1e-4 * displacement
                    + 4.0 * k as f64 * f32::EPSILON as f64 * (want as f64).abs();
                let err = (got as f64 - want as f64).abs();
                prop_assert!(
                    err <= bound,
                    "{shape} step {k} element {i}: {got} vs {want} (error {err:e}, bound {bound:e})"
                );
            }
        }
        let state = stepper.state().unwrap();
        prop_assert_eq!(state.step, s32.step);
        for (buffer, want) in s32.iter() {
            let got = state.get(buffer);
            let scale = want.iter().fold(0f64, |m, v| m.max(v.abs() as f64)).max(1e-30);
            let err = got.iter().zip(want).fold(0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
            prop_assert!(err <= 1e-5 * scale, "{shape} {buffer}: error {err:e}, scale {scale:e}");
        }
    }
}
