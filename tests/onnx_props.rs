//! Property test: the ONNX graph run by tract computes what the reference interpreter (f64)
//! computes, on random shapes (1-d, 2-d with a dimension of 1, rank 3 and 4) and gradients,
//! over several steps. The reference is the interpreter in f64; the f32 interpreter on the same
//! inputs measures how well conditioned they are.

mod common;

use mulo::backend::onnx::{ChunkedOnnxStepper, OnnxStepper};
use mulo::backend::{interp, Hyper, TensorStepper};
use mulo::shape::Shape;
use mulo::state::TensorState;
use mulo::trajectory::DEFAULT_TOLERANCE;
use proptest::prelude::*;

fn shapes() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        Just(vec![]),
        (1usize..300).prop_map(|n| vec![n]),
        (1usize..40, 1usize..40).prop_map(|(a, b)| vec![a, b]),
        (1usize..60).prop_map(|n| vec![1, n]),
        (1usize..60).prop_map(|n| vec![n, 1]),
        proptest::collection::vec(1usize..9, 3..=4),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn tract_matches_the_interpreter(
        dims in shapes(),
        seed in any::<u64>(),
        steps in 2usize..5,
        wd in prop_oneof![Just(0.0f32), Just(0.01f32)],
        start in prop_oneof![Just(0u64), Just(150u64)],
    ) {
        let shape = Shape::new(dims).unwrap();
        let ir = mulo::compile_step(&shape, &common::fixture_lopt()).unwrap();
        let n = shape.numel();
        let hyper = Hyper { lr: 0.1, weight_decay: wd };
        let mut stepper = OnnxStepper::new(&ir, start).unwrap();
        // The chunked runtime too, with chunks of two rows (a shorter last one when odd).
        let mut chunked = ChunkedOnnxStepper::supports(&ir.layout).then(|| {
            let row_len = n / ir.layout.dims()[0];
            ChunkedOnnxStepper::new(&ir, start, 2 * row_len, 2).unwrap()
        });
        let mut param = common::spread_values(n, seed, 0);
        let mut chunked_param = param.clone();
        let p0 = param.clone();
        let mut ref_param: Vec<f64> = param.iter().map(|&x| x as f64).collect();
        let mut ref_state = TensorState::<f64>::zeros(&ir.layout, start);
        let mut trajectory = Vec::new();
        let mut p32 = param.clone();
        let mut s32 = TensorState::<f32>::zeros(&ir.layout, start);
        for k in 1..=steps {
            let grad = common::spread_values(n, seed ^ 0xABCD, k);
            stepper.step(&mut param, &grad, hyper).unwrap();
            if let Some(c) = chunked.as_mut() {
                c.step(&mut chunked_param, &grad, hyper).unwrap();
            } else {
                chunked_param.clone_from(&param);
            }
            let g64: Vec<f64> = grad.iter().map(|&x| x as f64).collect();
            let (p, s) = interp::execute(&ir, &ref_param, &g64, &ref_state, hyper).unwrap();
            ref_param = p;
            ref_state = s;
            let (p, s) = interp::execute(&ir, &p32, &grad, &s32, hyper).unwrap();
            p32 = p;
            s32 = s;
            trajectory.push((param.clone(), ref_param.clone(), p32.clone(), chunked_param.clone()));
        }
        let displacement = ref_param
            .iter()
            .zip(&p0)
            .fold(0f64, |m, (a, &b)| m.max((a - b as f64).abs()))
            .max(1e-30);
        for (k, (got, want, f32_interp, got_chunked)) in trajectory.iter().enumerate() {
            let e32 = f32_interp.iter().zip(want).fold(0f64, |m, (&a, &b)| m.max((a as f64 - b).abs()));

            let err = got
                .iter()
                .zip(want)
                .fold(0f64, |m, (&a, &b)| m.max((a as f64 - b).abs()));
            // Random inputs can be worse conditioned than the golden ones: the f32 interpreter
            // itself was seen at 1.0e-4 of the displacement from the f64 result. tract must be
            // within the golden tolerance, or at most twice as far as the f32 interpreter.
            prop_assert!(
                err <= (DEFAULT_TOLERANCE * displacement).max(2.0 * e32),
                "{shape} step {}: error {err:e}, f32 interpreter {e32:e}, displacement {displacement:e}",
                k + 1
            );
            let err_chunked = got_chunked
                .iter()
                .zip(want)
                .fold(0f64, |m, (&a, &b)| m.max((a as f64 - b).abs()));
            prop_assert!(
                err_chunked <= (DEFAULT_TOLERANCE * displacement).max(2.0 * e32),
                "{shape} step {} (chunked): error {err_chunked:e}, f32 interpreter {e32:e}",
                k + 1
            );
        }
        let state = stepper.state().unwrap();
        prop_assert_eq!(state.step, ref_state.step);
        for (buffer, want) in ref_state.iter() {
            let got = state.get(buffer);
            let scale = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
            let err = got.iter().zip(want).fold(0f64, |m, (&a, &b)| m.max((a as f64 - b).abs()));
            prop_assert!(err <= 1e-5 * scale, "{shape} {buffer}: error {err:e}, scale {scale:e}");
        }
    }
}
