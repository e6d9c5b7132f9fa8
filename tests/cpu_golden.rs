//! The native CPU backend: golden replay, bitwise determinism across thread counts and
//! instruction sets' reproducibility, error handling.

mod common;

use mulo::backend::cpu::{CpuProgram, CpuStepper, Isa};
use mulo::backend::{Hyper, TensorStepper};
use mulo::shape::Shape;
use mulo::trajectory::{replay, Trajectory};
use std::sync::Arc;

#[test]
fn cpu_replays_every_golden_case_within_tolerance() {
    let lopt = common::fixture_lopt();
    let cases = common::golden_cases();
    assert!(cases.len() >= 8, "golden cases missing: {cases:?}");
    for path in cases {
        let traj = Trajectory::load(&path).unwrap();
        let ir = Arc::new(mulo::compile_layout(&traj.layout, &lopt).unwrap());
        for isa in [Isa::detect(), Isa::Portable] {
            let mut stepper = CpuStepper::new(ir.clone(), 0).with_isa(isa);
            let report = replay(&mut stepper, &traj).unwrap();
            common::assert_within_golden_tolerance(&report, &format!("cpu, {isa:?}"));
        }
    }
}

fn data(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let h = (i as u32 ^ seed).wrapping_mul(2_654_435_761);
            ((h >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 1e-2
        })
        .collect()
}

/// The same steps on 1, 2 and 3 threads, and twice on 2: bitwise the same parameter and state.
#[test]
fn results_do_not_depend_on_thread_count() {
    let lopt = common::fixture_lopt();
    // 300x37: chunks straddle rows; 64x256: many slices; 1000: unfactored.
    for shape in ["300x37", "64x256", "1000", "5x7x3x11"] {
        let ir = Arc::new(mulo::compile_step(&Shape::parse(shape).unwrap(), &lopt).unwrap());
        let prog = Arc::new(CpuProgram::new(ir.clone()));
        let n = ir.layout.numel();
        let run = |threads: usize| {
            let mut stepper = CpuStepper::from_program(prog.clone(), 3, threads);
            let mut param = data(n, 1);
            for k in 0..3 {
                let hyper = Hyper {
                    lr: 0.05,
                    weight_decay: 0.01,
                };
                stepper.step(&mut param, &data(n, 100 + k), hyper).unwrap();
            }
            (param, stepper.state().unwrap())
        };
        let (p1, s1) = run(1);
        for threads in [2, 3, 2] {
            let (p, s) = run(threads);
            assert!(
                p.iter().zip(&p1).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{shape}: parameter differs on {threads} threads"
            );
            for (buffer, want) in s1.iter() {
                assert!(
                    s.get(buffer)
                        .iter()
                        .zip(want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{shape}: {buffer} differs on {threads} threads"
                );
            }
            assert_eq!(s.step, s1.step);
        }
    }
}

/// AVX-512 and AVX2 + FMA run the same fused multiply-adds in the same order: bitwise the
/// same parameter and state (each path is checked against the golden cases on its own above
/// and, forced with `MULO_CPU_ISA`, in CI).
#[test]
fn fma_instruction_sets_agree_bitwise() {
    let fma: Vec<Isa> = [Isa::Avx512, Isa::Avx2]
        .into_iter()
        .filter(|i| i.available())
        .collect();
    if fma.len() < 2 {
        eprintln!("skipped: this CPU has only {fma:?} of AVX-512 and AVX2 + FMA");
        return;
    }
    let lopt = common::fixture_lopt();
    for shape in ["300x37", "64x256", "1000", "5x7x3x11"] {
        let ir = Arc::new(mulo::compile_step(&Shape::parse(shape).unwrap(), &lopt).unwrap());
        let n = ir.layout.numel();
        let run = |isa: Isa| {
            let mut stepper = CpuStepper::new(ir.clone(), 3).with_isa(isa);
            assert_eq!(stepper.isa(), isa);
            let mut param = data(n, 1);
            for k in 0..3 {
                let hyper = Hyper {
                    lr: 0.05,
                    weight_decay: 0.01,
                };
                stepper.step(&mut param, &data(n, 100 + k), hyper).unwrap();
            }
            (param, stepper.state().unwrap())
        };
        let (p0, s0) = run(fma[0]);
        let (p1, s1) = run(fma[1]);
        assert!(
            p0.iter().zip(&p1).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{shape}: parameter differs between {:?} and {:?}",
            fma[0],
            fma[1]
        );
        for (buffer, want) in s0.iter() {
            assert!(
                s1.get(buffer)
                    .iter()
                    .zip(want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{shape}: {buffer} differs between instruction sets"
            );
        }
    }
}

/// `MULO_CPU_ISA` (set by CI to run these tests on each path) is honoured: a path the CPU
/// lacks would silently fall back, so this fails instead.
#[test]
fn forced_instruction_set_is_used() {
    let Ok(forced) = std::env::var("MULO_CPU_ISA") else {
        return;
    };
    let isa = Isa::detect();
    assert_eq!(
        isa.name(),
        forced,
        "MULO_CPU_ISA={forced}, but the steppers run {isa:?} (this CPU lacks it, or the name is unknown)"
    );
}

#[test]
fn bad_input_is_rejected_and_nothing_changes() {
    let lopt = common::fixture_lopt();
    let ir = Arc::new(mulo::compile_step(&Shape::parse("48x48").unwrap(), &lopt).unwrap());
    let n = ir.layout.numel();
    let mut stepper = CpuStepper::new(ir.clone(), 0);
    let good = Hyper {
        lr: 0.1,
        weight_decay: 0.0,
    };
    let mut param = data(n, 7);
    stepper.step(&mut param, &data(n, 8), good).unwrap();
    let (p_before, s_before) = (param.clone(), stepper.state().unwrap());
    let grad = data(n, 9);
    let err = stepper.step(&mut param, &grad[..n - 1], good).unwrap_err();
    assert!(err.to_string().contains("grad"), "{err}");
    let mut short = param[..n - 1].to_vec();
    assert!(stepper.step(&mut short, &grad, good).is_err());
    for bad in [
        Hyper {
            lr: f32::NAN,
            weight_decay: 0.0,
        },
        Hyper {
            lr: 0.1,
            weight_decay: -1.0,
        },
    ] {
        assert!(stepper.step(&mut param, &grad, bad).is_err());
    }
    assert_eq!(param, p_before);
    assert_eq!(stepper.state().unwrap(), s_before);
    // A state for another shape is refused.
    let other = mulo::state::TensorState::zeros(
        &mulo::shape::Layout::new(Shape::parse("48x47").unwrap()),
        0,
    );
    assert!(stepper.set_state(other).is_err());
    assert_eq!(stepper.state().unwrap(), s_before);
    assert_eq!(stepper.target(), "cpu");
}
