//! ELO (PyLO's `ELO_naive`) golden replay: the trajectories of `tests/fixtures/golden_elo`
//! (copied from `../shared/golden/elo`, format in its README) on the interpreter (f32 and
//! f64), the CPU backend and tract, and the whole-model run with global-norm clipping over its
//! 9 tensors. Everything within 1e-4 of the displacement at every step, and PyLO's final state.

mod common;

use common::model::assert_model_within_tolerance;
use mulo::backend::cpu::{CpuStepper, Isa};
use mulo::backend::interp::{execute, InterpStepper};
use mulo::backend::{CpuFactory, Hyper, InterpFactory, PerTensor};
use mulo::lopt::{LearnedOptimizer, Rule};
use mulo::optimizer::{MuloOptimizer, OptimizerOptions, ParamSpec};
use mulo::state::TensorState;
use mulo::trajectory::{clip_global, max_abs_diff, replay, Trajectory, DEFAULT_TOLERANCE};
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::Arc;

fn elo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden_elo")
}

/// The fixture meta-network the ELO trajectories were recorded with, under ELO's rule.
fn elo_lopt() -> LearnedOptimizer {
    LearnedOptimizer::from_dir(&elo_dir().join("weights"))
        .expect("ELO fixture weights load")
        .with_rule(Rule::Elo)
}

/// Every ELO case, loaded, with the coverage the README promises checked.
fn elo_cases() -> Vec<Trajectory> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(elo_dir())
        .expect("ELO fixtures present")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    paths.sort();
    assert_eq!(paths.len(), 9, "the 9 ELO golden cases: {paths:?}");
    let cases: Vec<Trajectory> = paths.iter().map(|p| Trajectory::load(p).unwrap()).collect();
    assert!(cases.iter().all(|t| t.rule == Rule::Elo));
    assert!(cases.iter().all(|t| t.exp_mult == Some(0.001)));
    assert!(
        cases.iter().any(|t| t.clip_norm.is_some()),
        "a clipped case"
    );
    assert!(
        cases
            .iter()
            .any(|t| t.grads.iter().flatten().any(|g| g.is_nan())),
        "a case with NaN gradient entries"
    );
    cases
}

fn check(report: &mulo::trajectory::ReplayReport, context: &str) {
    println!(
        "{} ({context}): param {:.2e}, state {:?}",
        report.name, report.param_error, report.state_errors
    );
    common::assert_within_golden_tolerance(report, context);
}

#[test]
fn interpreter_f32_replays_every_elo_case() {
    let lopt = elo_lopt();
    for traj in elo_cases() {
        let ir = mulo::compile_layout(&traj.layout, &lopt).unwrap();
        let mut stepper = InterpStepper::new(Arc::new(ir), 0);
        check(&replay(&mut stepper, &traj).unwrap(), "interp f32");
    }
}

#[test]
fn interpreter_f64_replays_every_elo_case() {
    // An independent check of the f32 runs: in f64 from the same (clipped) inputs, it must land
    // within tolerance of PyLO's f32 trajectory at every step.
    let lopt = elo_lopt();
    for traj in elo_cases() {
        let ir = mulo::compile_layout(&traj.layout, &lopt).unwrap();
        let hyper = Hyper {
            lr: traj.lr,
            weight_decay: traj.weight_decay,
        };
        let mut p: Vec<f64> = traj.p0.iter().map(|&x| x as f64).collect();
        let mut state = TensorState::<f64>::zeros(&traj.layout, traj.start_step);
        let mut worst = 0f64;
        for (grad, want) in traj.grads.iter().zip(&traj.params) {
            let grad = match traj.clip_norm {
                Some(c) => clip_global(&[grad], c).pop().unwrap(),
                None => grad.clone(),
            };
            let g: Vec<f64> = grad.iter().map(|&x| x as f64).collect();
            (p, state) = execute(&ir, &p, &g, &state, hyper).unwrap();
            if let Some(want) = want {
                let p32: Vec<f32> = p.iter().map(|&x| x as f32).collect();
                worst = worst.max(max_abs_diff(&p32, want) / traj.displacement());
            }
        }
        println!("{}: f64 {worst:.2e}", traj.name);
        assert!(
            worst <= DEFAULT_TOLERANCE,
            "{}: f64 run off by {worst:e}",
            traj.name
        );
    }
}

#[test]
fn cpu_replays_every_elo_case() {
    let lopt = elo_lopt();
    for traj in elo_cases() {
        let ir = Arc::new(mulo::compile_layout(&traj.layout, &lopt).unwrap());
        for isa in [Isa::detect(), Isa::Portable] {
            let mut stepper = CpuStepper::new(ir.clone(), 0).with_isa(isa);
            check(
                &replay(&mut stepper, &traj).unwrap(),
                &format!("cpu, {isa:?}"),
            );
        }
    }
}

#[cfg(feature = "onnx")]
#[test]
fn tract_replays_every_elo_case() {
    let lopt = elo_lopt();
    for traj in elo_cases() {
        let ir = mulo::compile_layout(&traj.layout, &lopt).unwrap();
        let mut stepper = mulo::backend::onnx::OnnxStepper::new(&ir, 0).unwrap();
        check(&replay(&mut stepper, &traj).unwrap(), "onnx (tract)");
    }
}

/// The μLO_M rule on ELO's trajectories is far off: the rule, not only the weights, decides.
#[test]
fn the_mulo_rule_does_not_replay_elo() {
    let lopt = elo_lopt().with_rule(Rule::Mulo);
    let traj = Trajectory::load(&elo_dir().join("elo_mat_48x48.safetensors")).unwrap();
    let ir = mulo::compile_layout(&traj.layout, &lopt).unwrap();
    let mut stepper = InterpStepper::new(Arc::new(ir), 0);
    let report = replay(&mut stepper, &traj).unwrap();
    assert!(report.param_error > 1e-2, "{report:?}");
}

/// One tensor of the model as its `params` metadata records it.
#[derive(Deserialize)]
struct RecordedParam {
    name: String,
    shape: Vec<usize>,
    factored_axes: Option<[usize; 2]>,
}

/// `models/digits_elo_w32.safetensors` replayed through [`MuloOptimizer`] under ELO's rule,
/// every step's gradients clipped together to the recorded global norm first. Returns per
/// tensor its worst error over every step relative to its displacement.
fn replay_elo_model(backend: Arc<dyn mulo::backend::BackendFactory>) -> Vec<(String, f64)> {
    let path = elo_dir().join("models/digits_elo_w32.safetensors");
    let bytes = std::fs::read(&path).expect("ELO model fixture present");
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone().expect("metadata");
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(meta["lopt"], "elo");
    let params: Vec<RecordedParam> = serde_json::from_str(&meta["params"]).unwrap();
    let steps: usize = meta["steps"].parse().unwrap();
    let lr: f32 = meta["lr"].parse().unwrap();
    let weight_decay: f32 = meta["weight_decay"].parse().unwrap();
    let clip_norm: f32 = meta["clip_norm"].parse().unwrap();
    assert!(weight_decay > 0.0 && clip_norm > 0.0);
    let read = |key: String, shape: &[usize]| -> Vec<f32> {
        let view = tensors
            .tensor(&key)
            .unwrap_or_else(|_| panic!("{key} missing"));
        assert_eq!(view.dtype(), Dtype::F32, "{key}");
        let numel: usize = shape.iter().product();
        assert_eq!(view.shape().iter().product::<usize>(), numel, "{key}");
        view.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let all = |suffix: &str| -> Vec<Vec<f32>> {
        params
            .iter()
            .map(|p| read(format!("{}.{suffix}", p.name), &p.shape))
            .collect()
    };
    let specs: Vec<ParamSpec> = params
        .iter()
        .map(|p| {
            let spec = ParamSpec::new(&p.name, &p.shape).unwrap();
            match p.factored_axes {
                Some([d0, d1]) => spec.with_factored_axes(d0, d1).unwrap(),
                None => spec,
            }
        })
        .collect();
    let options = OptimizerOptions {
        backend,
        max_grad_norm: None,
        global_max_grad_norm: None,
        ..Default::default()
    };
    let mut opt = MuloOptimizer::new(&elo_lopt(), specs, options).unwrap();
    let mut current = all("p0");
    let after: Vec<Vec<Vec<f32>>> = (1..=steps).map(|t| all(&format!("p{t}"))).collect();
    let scales: Vec<f64> = current
        .iter()
        .zip(after.last().unwrap())
        .map(|(p0, pt)| max_abs_diff(p0, pt).max(f64::MIN_POSITIVE))
        .collect();
    let mut worst = vec![0f64; params.len()];
    for (t, want) in (1..=steps).zip(&after) {
        let raw = all(&format!("g{t}"));
        let raw: Vec<&[f32]> = raw.iter().map(|g| g.as_slice()).collect();
        let clipped = clip_global(&raw, clip_norm);
        let grads: Vec<&[f32]> = clipped.iter().map(|g| g.as_slice()).collect();
        let mut views: Vec<&mut [f32]> = current.iter_mut().map(|p| p.as_mut_slice()).collect();
        let report = opt.step(&mut views, &grads, lr, weight_decay).unwrap();
        assert!(report.skipped.is_empty(), "{:?}", report.skipped);
        for (i, (p, w)) in current.iter().zip(want).enumerate() {
            worst[i] = worst[i].max(max_abs_diff(p, w) / scales[i]);
        }
    }
    params.into_iter().map(|p| p.name).zip(worst).collect()
}

#[test]
fn elo_model_replays_on_the_interpreter() {
    let errors = replay_elo_model(Arc::new(PerTensor(InterpFactory)));
    assert_model_within_tolerance(&errors, "ELO model, interp, global clipping");
}

#[test]
fn elo_model_replays_on_the_cpu_backend() {
    let errors = replay_elo_model(Arc::new(PerTensor(CpuFactory)));
    assert_model_within_tolerance(&errors, "ELO model, cpu, global clipping");
}

/// The CLI: `replay --lopt elo` replays the fixture copy within tolerance on the CPU, and a
/// replay of an ELO file under μLO_M's rule is refused with a message naming the file and the fix.
#[test]
fn cli_replays_elo_and_refuses_a_rule_mismatch() {
    let exe = env!("CARGO_BIN_EXE_mulo-compile");
    let weights = elo_dir().join("weights");
    let case = elo_dir().join("elo_mat_64x64_clip.safetensors");
    let run = |lopt: &str| {
        std::process::Command::new(exe)
            .args(["replay", "--target", "cpu", "--lopt", lopt, "--weights"])
            .arg(&weights)
            .arg(&case)
            .output()
            .unwrap()
    };
    let ok = run("elo");
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{stdout}");
    assert!(stdout.contains("1 of 1 cases within tolerance"), "{stdout}");
    let refused = run("mulo");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("elo_mat_64x64_clip") && stderr.contains("--lopt elo"),
        "{stderr}"
    );
}
