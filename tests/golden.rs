//! Golden fidelity: the reference interpreter replays every trajectory recorded from PyLO
//! within 1e-4 of the displacement, and ends in PyLO's state.

mod common;

use mulo::backend::interp::{execute, InterpStepper};
use mulo::backend::Hyper;
use mulo::state::TensorState;
use mulo::trajectory::{max_abs_diff, replay, Trajectory, DEFAULT_TOLERANCE};
use std::sync::Arc;

#[test]
fn interpreter_f32_replays_every_golden_case() {
    let lopt = common::fixture_lopt();
    let mut shapes_seen = Vec::new();
    for path in common::golden_cases() {
        let traj = Trajectory::load(&path).unwrap();
        let ir = mulo::compile_layout(&traj.layout, &lopt).unwrap();
        let mut stepper = InterpStepper::new(Arc::new(ir), 0);
        let report = replay(&mut stepper, &traj).unwrap();
        println!(
            "{}: param {:.2e}, state {:?}",
            report.name, report.param_error, report.state_errors
        );
        assert!(
            report.param_error <= DEFAULT_TOLERANCE,
            "{}: parameter error {:e} of the displacement",
            report.name,
            report.param_error
        );
        assert!(
            traj.final_state.is_some(),
            "{}: the golden case has a final state",
            report.name
        );
        assert!(!report.state_errors.is_empty());
        for (name, err) in &report.state_errors {
            assert!(
                *err <= DEFAULT_TOLERANCE,
                "{}: state {name} off by {err:e}",
                report.name
            );
        }
        shapes_seen.push(traj.layout.shape().dims().len());
    }
    // Shape classes: 1-d, 2-d and rank 4 are all covered.
    for rank in [1, 2, 4] {
        assert!(shapes_seen.contains(&rank), "no golden case of rank {rank}");
    }
}

#[test]
fn interpreter_f64_agrees_with_f32_and_the_reference() {
    // The f64 interpreter is an independent check of the f32 one: run in f64 from the same
    // inputs, it must also land within tolerance of PyLO's f32 trajectory.
    let lopt = common::fixture_lopt();
    for path in common::golden_cases() {
        let traj = Trajectory::load(&path).unwrap();
        let layout = traj.layout.clone();
        let ir = mulo::compile_layout(&traj.layout, &lopt).unwrap();
        let hyper = Hyper {
            lr: traj.lr,
            weight_decay: traj.weight_decay,
        };
        let mut p: Vec<f64> = traj.p0.iter().map(|&x| x as f64).collect();
        let mut state = TensorState::<f64>::zeros(&layout, traj.start_step);
        for grad in &traj.grads {
            let g: Vec<f64> = grad.iter().map(|&x| x as f64).collect();
            (p, state) = execute(&ir, &p, &g, &state, hyper).unwrap();
        }
        let p32: Vec<f32> = p.iter().map(|&x| x as f32).collect();
        let want = traj.params.last().unwrap().as_ref().unwrap();
        let err = max_abs_diff(&p32, want) / traj.displacement();
        assert!(
            err <= DEFAULT_TOLERANCE,
            "{}: f64 run off by {err:e}",
            traj.name
        );
    }
}

#[test]
fn a_late_step_counter_changes_the_trajectory() {
    // The time features matter: replaying the late case as if it started at step 0 must fail.
    let lopt = common::fixture_lopt();
    let mut traj =
        Trajectory::load(&common::golden_dir().join("mat_80x30_late.safetensors")).unwrap();
    assert_eq!(traj.start_step, 2999);
    traj.start_step = 0;
    traj.final_state = None;
    let ir = mulo::compile_layout(&traj.layout, &lopt).unwrap();
    let mut stepper = InterpStepper::new(Arc::new(ir), 0);
    let report = replay(&mut stepper, &traj).unwrap();
    assert!(
        report.param_error > 10.0 * DEFAULT_TOLERANCE,
        "{:e}",
        report.param_error
    );
}
