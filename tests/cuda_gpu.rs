//! The CUDA backend on a GPU: golden replay, parity with the interpreter on random shapes,
//! bitwise determinism, and bad launches rejected before launch.
//!
//! Every test prints why it is skipped and passes when no CUDA device can be opened (or
//! libnvrtc is missing).

mod common;

use mulo::backend::cuda::nvrtc;
use mulo::backend::cuda::runtime::{CudaRuntime, CudaStepper};
use mulo::backend::interp::InterpStepper;
use mulo::backend::{Hyper, TensorStepper};
use mulo::lopt::LearnedOptimizer;
use mulo::shape::{Layout, Shape};
use mulo::trajectory::{max_abs_diff, replay, Trajectory, DEFAULT_TOLERANCE};
use proptest::prelude::*;
use std::sync::{Arc, OnceLock};

fn runtime(test: &str) -> Option<&'static CudaRuntime> {
    static RT: OnceLock<Result<CudaRuntime, String>> = OnceLock::new();
    let rt = RT.get_or_init(|| {
        if !nvrtc::nvrtc_available() {
            return Err(nvrtc::NVRTC_HELP.to_string());
        }
        CudaRuntime::new(0).map_err(|e| format!("no CUDA device: {e}"))
    });
    match rt {
        Ok(rt) => Some(rt),
        Err(why) => {
            eprintln!("SKIPPED {test}: {why}");
            None
        }
    }
}

fn stepper(rt: &CudaRuntime, shape: &Shape, lopt: &LearnedOptimizer) -> CudaStepper {
    let ir = mulo::compile_step(shape, lopt).unwrap();
    CudaStepper::new(rt.program(&ir).unwrap(), 0).unwrap()
}

#[test]
fn golden_replay_within_tolerance() {
    let Some(rt) = runtime("golden_replay_within_tolerance") else {
        return;
    };
    let lopt = common::fixture_lopt();
    for path in common::golden_cases() {
        let traj = Trajectory::load(&path).unwrap();
        let mut s = stepper(rt, &traj.shape, &lopt);
        let report = replay(&mut s, &traj).unwrap();
        eprintln!(
            "{}: param {:.3e}, state {:?}",
            report.name, report.param_error, report.state_errors
        );
        common::assert_within_golden_tolerance(&report, "cuda");
    }
}

fn data(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, .. ProptestConfig::default() })]
    #[test]
    fn random_shapes_match_the_interpreter(
        dims in prop::collection::vec(1usize..40, 0..5),
        seed in any::<u64>(),
        wd in prop_oneof![Just(0.0f32), Just(0.1f32)],
    ) {
        let Some(rt) = runtime("random_shapes_match_the_interpreter") else { return Ok(()); };
        let shape = Shape::new(dims).unwrap();
        let lopt = common::fixture_lopt();
        let ir = Arc::new(mulo::compile_step(&shape, &lopt).unwrap());
        let mut gpu = CudaStepper::new(rt.program(&ir).unwrap(), 0).unwrap();
        let mut cpu = InterpStepper::new(ir.clone(), 0);
        let n = shape.numel();
        let p0 = data(n, seed, 1.0);
        let (mut pg, mut pc) = (p0.clone(), p0.clone());
        let hyper = Hyper { lr: 1e-2, weight_decay: wd };
        for k in 0..4u64 {
            let g = data(n, seed.wrapping_add(k + 1), if k == 2 { 10.0 } else { 0.1 });
            gpu.step(&mut pg, &g, hyper).unwrap();
            cpu.step(&mut pc, &g, hyper).unwrap();
        }
        let scale = max_abs_diff(&pc, &p0).max(f64::MIN_POSITIVE);
        let err = max_abs_diff(&pg, &pc) / scale;
        prop_assert!(err <= DEFAULT_TOLERANCE, "{shape}: param error {err:e}");
        let (sg, sc) = (gpu.state().unwrap(), cpu.state().unwrap());
        prop_assert_eq!(sg.step, sc.step);
        for (b, want) in sc.iter() {
            let s = want.iter().fold(0f64, |m, v| m.max(v.abs() as f64)).max(f64::MIN_POSITIVE);
            let e = max_abs_diff(sg.get(b), want) / s;
            prop_assert!(e <= DEFAULT_TOLERANCE, "{shape}: state {b} error {e:e}");
        }
    }
}

#[test]
fn steps_are_bitwise_deterministic() {
    let Some(rt) = runtime("steps_are_bitwise_deterministic") else {
        return;
    };
    let lopt = common::fixture_lopt();
    for shape in ["1024x512", "777", "16x8x3x3"] {
        let shape = Shape::parse(shape).unwrap();
        let n = shape.numel();
        let run = || {
            let mut s = stepper(rt, &shape, &lopt);
            let mut p = data(n, 7, 1.0);
            for k in 0..3 {
                let g = data(n, 100 + k, 0.1);
                s.step(
                    &mut p,
                    &g,
                    Hyper {
                        lr: 1e-3,
                        weight_decay: 0.0,
                    },
                )
                .unwrap();
            }
            (p, s.state().unwrap())
        };
        let (p1, s1) = run();
        for _ in 0..3 {
            let (p2, s2) = run();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&p1), bits(&p2), "{shape}: param differs between runs");
            for (b, v) in s1.iter() {
                assert_eq!(bits(v), bits(s2.get(b)), "{shape}: state {b} differs");
            }
        }
    }
}

#[test]
fn bad_launches_are_rejected_before_launch() {
    let Some(rt) = runtime("bad_launches_are_rejected_before_launch") else {
        return;
    };
    let lopt = common::fixture_lopt();
    let shape = Shape::parse("64x32").unwrap();
    let layout = Layout::new(shape.clone());
    let mut s = stepper(rt, &shape, &lopt);
    let n = layout.numel();
    let mut p = data(n, 1, 1.0);
    let g = data(n, 2, 0.1);
    let hyper = Hyper {
        lr: 1e-3,
        weight_decay: 0.0,
    };
    s.step(&mut p, &g, hyper).unwrap();
    let before_state = s.state().unwrap();
    let before_p = p.clone();
    let stream = rt.stream();
    let mut short = stream.clone_htod(&p[..n - 1]).unwrap();
    let grad = stream.clone_htod(&g).unwrap();
    let err = s
        .step_device(&mut short, &grad, hyper)
        .unwrap_err()
        .to_string();
    assert!(err.contains("param"), "{err}");
    let mut param = stream.clone_htod(&p).unwrap();
    let long_grad = stream.clone_htod(&data(n + 1, 3, 0.1)).unwrap();
    let err = s
        .step_device(&mut param, &long_grad, hyper)
        .unwrap_err()
        .to_string();
    assert!(err.contains("grad"), "{err}");
    let err = s
        .step_device(
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
    let err = s
        .step(&mut p[..n - 1].to_vec(), &g, hyper)
        .unwrap_err()
        .to_string();
    assert!(err.contains("param"), "{err}");
    assert_eq!(stream.clone_dtoh(&param).unwrap(), before_p);
    assert_eq!(
        s.state().unwrap(),
        before_state,
        "state changed by a rejected step"
    );
    assert_eq!(s.step_count(), 1);
}
