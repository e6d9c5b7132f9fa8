//! A long run with faults, on the cpu backend: a 20-tensor model is stepped with NaN, ±Inf,
//! zero and huge gradients, lr changes (jumps, zero), a checkpoint save and a restore into a
//! fresh optimizer every `MULO_LONG_EVERY` steps (rotating the non-finite policy: skip, zero,
//! error), and one restore from an older checkpoint (replaying the steps since).
//!
//! What must hold, checked against a clean run (same model, same lr schedule, same gradients
//! without faults, no checkpoints, one optimizer):
//!
//! * the tensors that never get a faulty gradient (the first ten) end bitwise equal to the
//!   clean run's, parameters and every state buffer;
//! * no clean tensor ever appears in a step report (skipped, sanitized, reverted);
//! * a fault is reported exactly where it was injected: under `skip` the tensor is skipped,
//!   under `zero` sanitized, under `error` the step fails, changes nothing, and is retried
//!   with the fault removed;
//! * at the end every parameter and every state value is finite.
//!
//! `MULO_LONG_STEPS` (default 1000, CI) and `MULO_LONG_EVERY` (default 100) set the size; the
//! recorded run is `MULO_LONG_STEPS=20000 MULO_LONG_EVERY=500`.

mod common;

use common::fixture_lopt;
use mulo::lopt::LearnedOptimizer;
use mulo::optimizer::{MuloOptimizer, NonFinitePolicy, OptimizerOptions, ParamSpec};
use std::collections::BTreeMap;
use std::time::Instant;

const TENSORS: usize = 20;
/// Tensors `0..CLEAN` never get a faulty gradient.
const CLEAN: usize = 10;

fn env(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn specs() -> Vec<ParamSpec> {
    let shapes: [&[usize]; TENSORS] = [
        &[16, 8],
        &[8],
        &[4, 4, 3],
        &[],
        &[32],
        &[12, 6],
        &[5],
        &[3, 7],
        &[1, 9],
        &[2, 2, 2, 2],
        &[9, 1],
        &[20],
        &[6, 6],
        &[],
        &[10, 3],
        &[3],
        &[8, 8],
        &[1],
        &[7, 5],
        &[2, 11],
    ];
    shapes
        .iter()
        .enumerate()
        .map(|(i, s)| ParamSpec::new(format!("t{i:02}"), s).unwrap())
        .collect()
}

fn noise(step: u64, tensor: usize, i: usize) -> f32 {
    let mut x = step
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add((tensor as u64) << 32)
        .wrapping_add(i as u64);
    x ^= x >> 31;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 29;
    ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
}

/// The clean gradient: a quadratic pull towards 0.3 plus noise; it depends only on the step
/// and the tensor's own parameter, so faults in one tensor cannot reach another.
fn gradient(step: u64, tensor: usize, param: &[f32]) -> Vec<f32> {
    param
        .iter()
        .enumerate()
        .map(|(i, p)| 0.5 * (p - 0.3) + 0.05 * noise(step, tensor, i))
        .collect()
}

/// The lr schedule (part of both runs): warm-up, jumps up and down, a stretch at zero.
fn lr(step: u64, total: u64) -> f32 {
    let f = step as f64 / total as f64;
    let base = if step < 50 {
        1e-2 * (step + 1) as f64 / 50.0
    } else if f < 0.3 {
        1e-2
    } else if f < 0.35 {
        1e-1 // a jump up
    } else if f < 0.4 {
        0.0 // a stretch at zero
    } else if f < 0.7 {
        3e-3
    } else {
        1e-2 * (1.0 - f) + 1e-5
    };
    base as f32
}

/// The fault injected into tensor `t` at `step`, if any (only tensors `CLEAN..`).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    Nan,
    PosInf,
    NegInf,
    Zero,
    Huge,
}

fn fault(step: u64, t: usize) -> Option<Fault> {
    if t < CLEAN || step % 7 != (t as u64) % 7 {
        return None;
    }
    match (step / 7 + t as u64) % 9 {
        0 => Some(Fault::Nan),
        1 => Some(Fault::PosInf),
        2 => Some(Fault::NegInf),
        3 => Some(Fault::Zero),
        4 => Some(Fault::Huge),
        _ => None,
    }
}

fn inject(g: &mut [f32], f: Fault, step: u64) {
    let at = (step as usize) % g.len();
    match f {
        Fault::Nan => g[at] = f32::NAN,
        Fault::PosInf => g[at] = f32::INFINITY,
        Fault::NegInf => g[at] = f32::NEG_INFINITY,
        Fault::Zero => g.iter_mut().for_each(|v| *v = 0.0),
        // Finite but so large that the step overflows (g² > f32::MAX): the guard's case.
        Fault::Huge => g.iter_mut().for_each(|v| *v = 3e38 * v.signum()),
    }
}

fn initial_params() -> Vec<Vec<f32>> {
    specs()
        .iter()
        .enumerate()
        .map(|(t, s)| {
            (0..s.shape.numel())
                .map(|i| 0.5 * noise(u64::MAX, t, i))
                .collect()
        })
        .collect()
}

fn options(policy: NonFinitePolicy) -> OptimizerOptions {
    // No clipping: a huge gradient must reach the step (and the guard), not be scaled down.
    OptimizerOptions {
        nonfinite: policy,
        ..OptimizerOptions::default()
    }
}

fn step_once(
    opt: &mut MuloOptimizer,
    params: &mut [Vec<f32>],
    grads: &[Vec<f32>],
    lr: f32,
) -> mulo::Result<mulo::optimizer::StepReport> {
    let mut ps: Vec<&mut [f32]> = params.iter_mut().map(|p| p.as_mut_slice()).collect();
    let gs: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
    opt.step(&mut ps, &gs, lr, 1e-4)
}

/// Every parameter and state buffer of an optimizer, by tensor.
type Snapshot = Vec<(Vec<f32>, Vec<Vec<f32>>)>;

fn snapshot(opt: &MuloOptimizer, params: &[Vec<f32>]) -> Snapshot {
    opt.params()
        .iter()
        .zip(params)
        .map(|(spec, p)| {
            let state = opt.state(&spec.name).unwrap();
            (p.clone(), state.iter().map(|(_, v)| v.to_vec()).collect())
        })
        .collect()
}

fn clean_run(lopt: &LearnedOptimizer, total: u64) -> Snapshot {
    let mut opt = MuloOptimizer::new(lopt, specs(), options(NonFinitePolicy::Skip)).unwrap();
    let mut params = initial_params();
    for step in 0..total {
        let grads: Vec<Vec<f32>> = (0..TENSORS)
            .map(|t| gradient(step, t, &params[t]))
            .collect();
        let report = step_once(&mut opt, &mut params, &grads, lr(step, total)).unwrap();
        assert!(report.skipped.is_empty() && report.reverted.is_empty());
    }
    snapshot(&opt, &params)
}

#[test]
fn long_run_with_faults_matches_the_clean_run_where_no_fault_was_injected() {
    let total = env("MULO_LONG_STEPS", 1000);
    let every = env("MULO_LONG_EVERY", 100);
    assert!(total >= 4 * every, "at least four checkpoint intervals");
    let lopt = fixture_lopt();
    let started = Instant::now();
    let clean = clean_run(&lopt, total);
    let clean_time = started.elapsed();

    let dir = tempfile::tempdir().unwrap();
    let policies = [
        NonFinitePolicy::Skip,
        NonFinitePolicy::Zero,
        NonFinitePolicy::Error,
    ];
    let mut policy_index = 0;
    let mut opt = MuloOptimizer::new(&lopt, specs(), options(policies[0])).unwrap();
    let mut params = initial_params();
    // Checkpoints by step: the file and the parameters saved with it.
    let mut saved: BTreeMap<u64, (std::path::PathBuf, Vec<Vec<f32>>)> = BTreeMap::new();
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    fn add(counts: &mut BTreeMap<String, u64>, k: &str, n: u64) {
        *counts.entry(k.to_string()).or_insert(0) += n;
    }
    // The restore from an older checkpoint: at this step, go back two intervals.
    let rewind_at = (total / 2 / every) * every + every / 2;
    let mut rewound = false;
    let mut step = 0;
    while step < total {
        if step > 0 && step % every == 0 && !saved.contains_key(&step) {
            let path = dir.path().join(format!("step{step}.ckpt"));
            opt.save_checkpoint(&path).unwrap();
            saved.insert(step, (path.clone(), params.clone()));
            // Restore into a fresh optimizer with the next policy.
            policy_index = (policy_index + 1) % policies.len();
            opt = MuloOptimizer::new(&lopt, specs(), options(policies[policy_index])).unwrap();
            opt.load_checkpoint(&path).unwrap();
            assert_eq!(opt.step_count(), step);
            add(&mut counts, "checkpoints saved and restored", 1);
        }
        if step == rewind_at && !rewound {
            let back = rewind_at - rewind_at % every - every;
            let (path, p) = saved[&back].clone();
            opt.load_checkpoint(&path).unwrap();
            params = p;
            step = back;
            rewound = true;
            add(&mut counts, "restores from an older checkpoint", 1);
            add(
                &mut counts,
                &format!("steps replayed after the rewind ({rewind_at} → {back})"),
                rewind_at - back,
            );
            continue;
        }
        let policy = policies[policy_index];
        let clean_grads: Vec<Vec<f32>> = (0..TENSORS)
            .map(|t| gradient(step, t, &params[t]))
            .collect();
        let mut grads = clean_grads.clone();
        let mut nonfinite = Vec::new();
        for (t, g) in grads.iter_mut().enumerate() {
            if let Some(f) = fault(step, t) {
                inject(g, f, step);
                add(&mut counts, &format!("fault {f:?} ({policy:?})"), 1);
                if matches!(f, Fault::Nan | Fault::PosInf | Fault::NegInf) {
                    nonfinite.push(format!("t{t:02}"));
                }
            }
        }
        let lr = lr(step, total);
        let before = snapshot(&opt, &params);
        match step_once(&mut opt, &mut params, &grads, lr) {
            Ok(report) => {
                assert!(
                    policy != NonFinitePolicy::Error || nonfinite.is_empty(),
                    "step {step}: the error policy let non-finite gradients through"
                );
                let touched = report
                    .skipped
                    .iter()
                    .chain(&report.sanitized)
                    .chain(&report.reverted);
                for name in touched {
                    let t: usize = name[1..].parse().unwrap();
                    assert!(t >= CLEAN, "step {step}: clean tensor {name} in the report");
                }
                match policy {
                    NonFinitePolicy::Skip => {
                        let mut s: Vec<&String> = report
                            .skipped
                            .iter()
                            .filter(|n| !report.reverted.contains(n))
                            .collect();
                        s.sort();
                        assert_eq!(s, nonfinite.iter().collect::<Vec<_>>(), "step {step}");
                    }
                    NonFinitePolicy::Zero => assert_eq!(report.sanitized, nonfinite),
                    NonFinitePolicy::Error => {}
                }
                for _ in &report.reverted {
                    add(&mut counts, "steps undone by the guard", 1);
                }
            }
            Err(e) => {
                assert_eq!(policy, NonFinitePolicy::Error, "step {step}: {e}");
                assert!(!nonfinite.is_empty(), "step {step}: {e}");
                for name in &nonfinite {
                    assert!(e.to_string().contains(name.as_str()), "{e}");
                }
                // Nothing changed; retry the step without the faults.
                assert!(
                    snapshot(&opt, &params) == before && opt.step_count() == step,
                    "step {step}: a failed step changed a parameter, a state or the counter"
                );
                add(
                    &mut counts,
                    "steps refused (error policy) and retried clean",
                    1,
                );
                let mut retry = grads.clone();
                for t in 0..TENSORS {
                    if retry[t].iter().any(|v| !v.is_finite()) {
                        retry[t] = clean_grads[t].clone();
                    }
                }
                // The retry's gradients are finite: nothing skipped or sanitized; the guard
                // may still undo a faulted tensor's step (a huge gradient stays in the
                // retry), never a clean tensor's.
                let report = step_once(&mut opt, &mut params, &retry, lr)
                    .unwrap_or_else(|e| panic!("step {step}: the clean retry failed: {e}"));
                // (A tensor the guard reverted is listed as skipped too.)
                assert!(
                    report.skipped.iter().all(|n| report.reverted.contains(n))
                        && report.sanitized.is_empty(),
                    "step {step}: the clean retry skipped {:?} (reverted {:?}), sanitized {:?}",
                    report.skipped,
                    report.reverted,
                    report.sanitized
                );
                for name in &report.reverted {
                    let t: usize = name[1..].parse().unwrap();
                    assert!(
                        t >= CLEAN,
                        "step {step}: the clean retry reverted clean tensor {name}"
                    );
                    add(&mut counts, "steps undone by the guard", 1);
                }
            }
        }
        step += 1;
    }
    let faulted = snapshot(&opt, &params);
    let elapsed = started.elapsed();

    // Clean tensors: bitwise the clean run's.
    let specs = specs();
    for t in 0..CLEAN {
        let (p, s) = &faulted[t];
        let (cp, cs) = &clean[t];
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(p),
            bits(cp),
            "tensor {} parameter differs from the clean run",
            specs[t].name
        );
        for (a, b) in s.iter().zip(cs) {
            assert_eq!(bits(a), bits(b), "tensor {} state differs", specs[t].name);
        }
    }
    // Everything finite.
    for (t, (p, s)) in faulted.iter().enumerate() {
        assert!(
            p.iter().all(|v| v.is_finite()),
            "{} parameter",
            specs[t].name
        );
        for b in s {
            assert!(b.iter().all(|v| v.is_finite()), "{} state", specs[t].name);
        }
    }
    // The faulted tensors did move (the run was not a no-op for them).
    let moved = (CLEAN..TENSORS)
        .filter(|&t| faulted[t].0 != initial_params()[t])
        .count();
    assert_eq!(moved, TENSORS - CLEAN, "every faulted tensor still trained");
    assert!(rewound, "the run restored an older checkpoint");
    println!(
        "long run: {total} steps of {TENSORS} tensors on {} (checkpoint every {every}), clean run \
         {clean_time:.1?}, faulted run {:.1?}",
        opt.target(),
        elapsed - clean_time
    );
    for (k, v) in &counts {
        println!("  {k}: {v}");
    }
    // The total is the sum of the per-kind lines above (printed, not typed into the report).
    let faults: u64 = counts
        .iter()
        .filter(|(k, _)| k.starts_with("fault "))
        .map(|(_, v)| v)
        .sum();
    println!("  faults injected in all (sum of the fault lines): {faults}");
    println!(
        "  result: tensors t00..t{:02} bitwise equal to the clean run; every parameter and \
         state finite",
        CLEAN - 1
    );
}
