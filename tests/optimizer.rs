//! The whole-model optimizer: one call steps every tensor exactly as the per-tensor reference
//! interpreter does, plans are compiled once per shape, arguments are checked before anything
//! changes, clipping and the non-finite policies behave as documented.

mod common;

use common::Rng;
use mulo::backend::interp::InterpStepper;
use mulo::backend::{BackendFactory, InterpFactory, PerTensor, StepperFactory};
use mulo::backend::{Hyper, TensorStepper};
use mulo::ir::Buffer;
use mulo::lopt::LearnedOptimizer;
use mulo::optimizer::{MuloOptimizer, NonFinitePolicy, OptimizerOptions, ParamSpec};
use mulo::shape::{Layout, Shape};
use mulo::state::TensorState;
use mulo::trajectory::{max_abs_diff, DEFAULT_TOLERANCE};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

fn specs(shapes: &[(&str, &[usize])]) -> Vec<ParamSpec> {
    shapes
        .iter()
        .map(|(n, d)| ParamSpec::new(*n, d).unwrap())
        .collect()
}

fn reference(lopt: &LearnedOptimizer, dims: &[usize], start: u64) -> InterpStepper {
    let ir = mulo::compile_step(&Shape::new(dims.to_vec()).unwrap(), lopt).unwrap();
    InterpStepper::new(Arc::new(ir), start)
}

/// The backends the non-finite tests run on. Add the tract/ONNX and CUDA factories here as
/// they are merged: the interpreter is compared bitwise with the per-tensor reference, the
/// others within the golden tolerance; parameters and states that must stay unchanged are
/// compared bitwise on every backend.
/// Every CPU backend, and CUDA where a device can be opened (with a printed reason otherwise).
#[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
fn backends() -> Vec<Arc<dyn BackendFactory>> {
    let mut all: Vec<Arc<dyn BackendFactory>> = vec![
        Arc::new(PerTensor(InterpFactory)),
        Arc::new(PerTensor(mulo::backend::CpuFactory)),
        #[cfg(feature = "onnx")]
        Arc::new(PerTensor(mulo::backend::OnnxFactory)),
    ];
    #[cfg(feature = "cuda")]
    match std::panic::catch_unwind(|| mulo::backend::CudaFactory::new(0)) {
        Ok(Ok(cuda)) => all.push(Arc::new(PerTensor(cuda))),
        Ok(Err(e)) => eprintln!("SKIPPED the cuda backend: {e}"),
        Err(_) => {
            eprintln!("SKIPPED the cuda backend: the CUDA driver library could not be loaded")
        }
    }
    all
}

fn on(backend: &Arc<dyn BackendFactory>) -> OptimizerOptions {
    OptimizerOptions {
        backend: backend.clone(),
        ..Default::default()
    }
}

/// `got` is the step `before → want` of the reference: bitwise on the interpreter; elsewhere
/// within the golden tolerance of the step's displacement plus two f32 ulps of |p|. One step
/// moves a parameter of size ~1 by ~4e-4 here, so one ulp of p is ~3e-4 of the displacement:
/// below that, f32 itself cannot agree (the f32 interpreter is up to 1.3e-4 of it away from
/// the f64 interpreter on these tensors, and tract within one ulp of the f32 interpreter).
fn assert_same_step(target: &str, got: &[f32], want: &[f32], before: &[f32], what: &str) {
    if target == "interp" {
        assert_eq!(bits(got), bits(want), "{what}");
    } else {
        let scale = max_abs_diff(want, before).max(f64::MIN_POSITIVE);
        let p_max = want.iter().fold(0f64, |m, x| m.max(x.abs() as f64));
        let bound = DEFAULT_TOLERANCE * scale + 2.0 * f32::EPSILON as f64 * p_max;
        let err = max_abs_diff(got, want);
        assert!(
            err <= bound,
            "{what} on {target}: {:e} of the step's displacement",
            err / scale
        );
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn refs(v: &mut [Vec<f32>]) -> Vec<&mut [f32]> {
    v.iter_mut().map(|x| x.as_mut_slice()).collect()
}

fn crefs(v: &[Vec<f32>]) -> Vec<&[f32]> {
    v.iter().map(|x| x.as_slice()).collect()
}

const MODEL: &[(&str, &[usize])] = &[
    ("emb", &[24, 8]),
    ("l0.w", &[16, 24]),
    ("l0.b", &[16]),
    ("l1.w", &[16, 24]),
    ("l1.b", &[16]),
    ("l2.w", &[16, 24]),
    ("l2.b", &[16]),
    ("gain", &[]),
    ("head", &[5, 16]),
    ("head.b", &[5]),
];

fn model_data(rng: &mut Rng) -> (Vec<Vec<f32>>, Vec<Vec<Vec<f32>>>) {
    let params = MODEL
        .iter()
        .map(|(_, d)| {
            (0..d.iter().product::<usize>())
                .map(|_| rng.next_f32())
                .collect()
        })
        .collect();
    let grads = (0..4)
        .map(|_| {
            MODEL
                .iter()
                .map(|(_, d)| rng.gradient(d.iter().product()))
                .collect()
        })
        .collect();
    (params, grads)
}

#[test]
fn one_plan_per_distinct_shape() {
    let lopt = LearnedOptimizer::demo();
    let opt = MuloOptimizer::new(&lopt, specs(MODEL), OptimizerOptions::default()).unwrap();
    // 10 tensors, 6 distinct shapes: [24,8], [16,24], [16], [], [5,16], [5].
    assert_eq!(opt.compiled_plans(), 6);
    assert_eq!(opt.target(), "cpu", "the native CPU backend is the default");
    let many: Vec<ParamSpec> = (0..40)
        .map(|i| ParamSpec::new(format!("t{i}"), &[3 + i % 4, 5]).unwrap())
        .collect();
    let opt = MuloOptimizer::new(&lopt, many, OptimizerOptions::default()).unwrap();
    assert_eq!(opt.compiled_plans(), 4);
    // The example: 150 tensors of 12 distinct shapes compile 12 plans.
    let shapes: Vec<Vec<usize>> = (0..12)
        .map(|k| match k % 3 {
            0 => vec![8 + k],
            1 => vec![4 + k, 6],
            _ => vec![2, 3, k],
        })
        .collect();
    let specs: Vec<ParamSpec> = (0..150)
        .map(|i| ParamSpec::new(format!("layer{i}"), &shapes[(i * 7) % 12]).unwrap())
        .collect();
    let opt = MuloOptimizer::new(&lopt, specs, OptimizerOptions::default()).unwrap();
    assert_eq!(opt.compiled_plans(), 12);
}

#[test]
fn whole_model_step_equals_per_tensor_reference_bitwise() {
    let lopt = common::fixture_lopt();
    let mut rng = Rng(42);
    let (mut params, grads) = model_data(&mut rng);
    let mut want = params.clone();
    let mut refs_ = MODEL
        .iter()
        .map(|(_, d)| reference(&lopt, d, 0))
        .collect::<Vec<_>>();
    // Bitwise against the interpreter: the optimizer on the interpreter backend.
    let interp: Arc<dyn BackendFactory> = Arc::new(PerTensor(InterpFactory));
    let mut opt = MuloOptimizer::new(&lopt, specs(MODEL), on(&interp)).unwrap();
    for (k, g) in grads.iter().enumerate() {
        let lr = 0.1 / (1.0 + k as f32); // a schedule
        let report = opt
            .step(&mut refs(&mut params), &crefs(g), lr, 0.01)
            .unwrap();
        assert_eq!(report.step, k as u64);
        assert!(report.skipped.is_empty() && report.clipped.is_empty());
        for i in 0..MODEL.len() {
            refs_[i]
                .step(
                    &mut want[i],
                    &g[i],
                    Hyper {
                        lr,
                        weight_decay: 0.01,
                    },
                )
                .unwrap();
        }
    }
    assert_eq!(opt.step_count(), 4);
    for (i, (name, _)) in MODEL.iter().enumerate() {
        assert_eq!(bits(&params[i]), bits(&want[i]), "{name}");
        assert_ne!(params[i], grads[0][i], "{name} moved");
        let state = opt.state(name).unwrap();
        assert_eq!(state, refs_[i].state().unwrap(), "{name}");
        assert_eq!(state.step, 4);
    }
}

#[test]
fn bad_arguments_are_refused_before_anything_changes() {
    let lopt = LearnedOptimizer::demo();
    let mut opt = MuloOptimizer::new(&lopt, specs(MODEL), OptimizerOptions::default()).unwrap();
    let mut rng = Rng(3);
    let (mut params, grads) = model_data(&mut rng);
    let before = params.clone();
    let g = crefs(&grads[0]);
    let err = opt
        .step(&mut refs(&mut params)[..9], &g, 0.1, 0.0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("params") && err.contains("9 tensors"), "{err}");
    let mut short = grads[0].clone();
    short[8].pop();
    let err = opt
        .step(&mut refs(&mut params), &crefs(&short), 0.1, 0.0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("grad `head`") && err.contains("79 values"),
        "{err}"
    );
    for (lr, wd, what) in [(f32::NAN, 0.0, "lr"), (0.1, -1.0, "weight_decay")] {
        let err = opt
            .step(&mut refs(&mut params), &g, lr, wd)
            .unwrap_err()
            .to_string();
        assert!(err.contains(what), "{err}");
    }
    assert_eq!(params, before);
    assert_eq!(opt.step_count(), 0);
    for (name, _) in MODEL {
        let s = opt.state(name).unwrap();
        assert!(s.iter().all(|(_, v)| v.iter().all(|&x| x == 0.0)));
        assert_eq!(s.step, 0);
    }
    // Construction errors name the parameter.
    let dup = specs(&[("a", &[2]), ("a", &[3])]);
    let err = MuloOptimizer::new(&lopt, dup, OptimizerOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("`a`") && err.contains("twice"), "{err}");
    let bad = OptimizerOptions {
        max_grad_norm: Some(-1.0),
        ..Default::default()
    };
    let err = MuloOptimizer::new(&lopt, specs(MODEL), bad)
        .unwrap_err()
        .to_string();
    assert!(err.contains("max_grad_norm"), "{err}");
    assert!(opt
        .state("nope")
        .unwrap_err()
        .to_string()
        .contains("`nope`"));
}

/// torch.nn.utils.clip_grad_norm_ on one list of tensors, written out independently.
fn torch_clip(grads: &mut [Vec<f32>], max_norm: f32) {
    let total: f64 = grads.iter().flatten().map(|&g| (g as f64).powi(2)).sum();
    let coef = max_norm as f64 / (total.sqrt() + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut().flatten() {
            *g *= coef as f32;
        }
    }
}

#[test]
fn per_tensor_and_global_clipping_match_torch_semantics() {
    let lopt = LearnedOptimizer::demo();
    let shapes: &[(&str, &[usize])] = &[("big", &[6, 7]), ("small", &[9]), ("mid", &[4, 3])];
    let mut grads: Vec<Vec<f32>> = vec![
        vec![3.0; 42],  // norm 19.4: clipped to 1
        vec![0.01; 9],  // norm 0.03: kept
        vec![-0.5; 12], // norm 1.73: clipped to 1
    ];
    grads[0][5] = -40.0;
    let p0: Vec<Vec<f32>> = shapes
        .iter()
        .map(|(_, d)| vec![0.25; d.iter().product()])
        .collect();
    for (per, global) in [(Some(1.0), None), (None, Some(2.0)), (Some(1.0), Some(1.2))] {
        let options = OptimizerOptions {
            max_grad_norm: per,
            global_max_grad_norm: global,
            ..Default::default()
        };
        let mut opt = MuloOptimizer::new(&lopt, specs(shapes), options).unwrap();
        let mut params = p0.clone();
        let caller = grads.clone();
        let report = opt
            .step(&mut refs(&mut params), &crefs(&caller), 0.5, 0.0)
            .unwrap();
        assert_eq!(caller, grads, "the caller's gradients are never modified");
        let mut clipped = grads.clone();
        if let Some(m) = per {
            for g in clipped.iter_mut() {
                torch_clip(std::slice::from_mut(g), m);
            }
            let names: Vec<&str> = report.clipped.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(names, ["big", "mid"]);
        }
        if let Some(m) = global {
            torch_clip(&mut clipped, m);
            assert!(report.global_clip_coef.is_some());
            let norm: f64 = clipped.iter().flatten().map(|&g| (g as f64).powi(2)).sum();
            assert!(norm.sqrt() <= m as f64 * (1.0 + 1e-6), "global norm {norm}");
        }
        for (i, (name, d)) in shapes.iter().enumerate() {
            let mut want = p0[i].clone();
            reference(&lopt, d, 0)
                .step(
                    &mut want,
                    &clipped[i],
                    Hyper {
                        lr: 0.5,
                        weight_decay: 0.0,
                    },
                )
                .unwrap();
            assert_eq!(
                bits(&params[i]),
                bits(&want),
                "{name} with {per:?} {global:?}"
            );
        }
    }
}

fn inject(grads: &mut [Vec<f32>]) {
    grads[1][3] = f32::NAN; // l0.w
    grads[4][0] = f32::INFINITY; // l1.b
    grads[7][0] = f32::NEG_INFINITY; // gain
    grads[8][2] = f32::NAN; // head
    grads[8][7] = f32::NEG_INFINITY;
}

#[test]
fn nonfinite_skip_leaves_tensors_untouched_and_reports_them() {
    for backend in backends() {
        let lopt = common::fixture_lopt();
        let mut rng = Rng(9);
        let (mut params, grads) = model_data(&mut rng);
        let mut opt = MuloOptimizer::new(&lopt, specs(MODEL), on(&backend)).unwrap();
        opt.step(&mut refs(&mut params), &crefs(&grads[0]), 0.1, 0.0)
            .unwrap();
        let before_params = params.clone();
        let before_states: Vec<TensorState> =
            MODEL.iter().map(|(n, _)| opt.state(n).unwrap()).collect();
        let mut bad = grads[1].clone();
        inject(&mut bad);
        let report = opt
            .step(&mut refs(&mut params), &crefs(&bad), 0.1, 0.0)
            .unwrap();
        assert_eq!(report.skipped, ["l0.w", "l1.b", "gain", "head"]);
        let head = &report
            .nonfinite
            .iter()
            .find(|(n, _)| n == "head")
            .unwrap()
            .1;
        assert_eq!((head.nan, head.pos_inf, head.neg_inf), (1, 0, 1));
        assert_eq!(opt.step_count(), 2);
        for (i, (name, _)) in MODEL.iter().enumerate() {
            let state = opt.state(name).unwrap();
            assert_eq!(state.step, 2, "{name}: one counter for every tensor");
            assert!(params[i].iter().all(|x| x.is_finite()), "{name}");
            let skipped = report.skipped.iter().any(|s| s == name);
            if skipped {
                assert_eq!(bits(&params[i]), bits(&before_params[i]), "{name}");
                let mut want = before_states[i].clone();
                want.step = 2;
                assert_eq!(state, want, "{name}: accumulators untouched");
            } else {
                // The clean tensors stepped exactly as alone.
                let mut r = reference(&lopt, MODEL[i].1, 0);
                r.set_state(before_states[i].clone()).unwrap();
                let mut want = before_params[i].clone();
                r.step(
                    &mut want,
                    &bad[i],
                    Hyper {
                        lr: 0.1,
                        weight_decay: 0.0,
                    },
                )
                .unwrap();
                assert_same_step(opt.target(), &params[i], &want, &before_params[i], name);
            }
        }
    }
}

#[test]
fn nonfinite_zero_is_nan_to_num() {
    for backend in backends() {
        let lopt = common::fixture_lopt();
        let mut rng = Rng(10);
        let (mut params, grads) = model_data(&mut rng);
        let p0 = params.clone();
        let options = OptimizerOptions {
            nonfinite: NonFinitePolicy::Zero,
            ..on(&backend)
        };
        let mut opt = MuloOptimizer::new(&lopt, specs(MODEL), options).unwrap();
        let mut bad = grads[0].clone();
        inject(&mut bad);
        let report = opt
            .step(&mut refs(&mut params), &crefs(&bad), 0.1, 0.0)
            .unwrap();
        assert_eq!(report.sanitized, ["l0.w", "l1.b", "gain", "head"]);
        // ±Inf becomes ±f32::MAX, whose square overflows in the f32 step: NaN everywhere in that
        // tensor. The guard undoes those tensors; the NaN-only one (l0.w) steps with zeros.
        assert_eq!(report.reverted, ["l1.b", "gain", "head"]);
        assert_eq!(report.skipped, report.reverted);
        for (i, (name, d)) in MODEL.iter().enumerate() {
            if report.reverted.contains(&name.to_string()) {
                assert_eq!(bits(&params[i]), bits(&p0[i]), "{name}");
                let s = opt.state(name).unwrap();
                assert_eq!(s.step, 1);
                assert!(s.iter().all(|(_, v)| v.iter().all(|&x| x == 0.0)), "{name}");
                continue;
            }
            let mut g = bad[i].clone();
            for x in g.iter_mut() {
                *x = if x.is_nan() {
                    0.0
                } else if *x == f32::INFINITY {
                    f32::MAX
                } else if *x == f32::NEG_INFINITY {
                    f32::MIN
                } else {
                    *x
                };
            }
            let mut want = p0[i].clone();
            let mut r = reference(&lopt, d, 0);
            r.step(
                &mut want,
                &g,
                Hyper {
                    lr: 0.1,
                    weight_decay: 0.0,
                },
            )
            .unwrap();
            assert_same_step(opt.target(), &params[i], &want, &p0[i], name);
            assert!(!params[i].iter().any(|x| x.is_nan()), "{name}");
        }
    }
}

#[test]
fn nonfinite_error_names_tensors_and_changes_nothing() {
    for backend in backends() {
        let lopt = LearnedOptimizer::demo();
        let mut rng = Rng(11);
        let (mut params, grads) = model_data(&mut rng);
        let options = OptimizerOptions {
            nonfinite: NonFinitePolicy::Error,
            ..on(&backend)
        };
        let mut opt = MuloOptimizer::new(&lopt, specs(MODEL), options).unwrap();
        opt.step(&mut refs(&mut params), &crefs(&grads[0]), 0.1, 0.0)
            .unwrap();
        let before: Vec<TensorState> = MODEL.iter().map(|(n, _)| opt.state(n).unwrap()).collect();
        let p1 = params.clone();
        let mut bad = grads[1].clone();
        inject(&mut bad);
        let err = opt
            .step(&mut refs(&mut params), &crefs(&bad), 0.1, 0.0)
            .unwrap_err()
            .to_string();
        for name in [
            "`l0.w` (1 NaN",
            "`l1.b` (0 NaN, 1 +Inf",
            "`gain` (0 NaN, 0 +Inf, 1 -Inf)",
            "`head`",
        ] {
            assert!(err.contains(name), "{name} in {err}");
        }
        assert!(!err.contains("`l0.b`"), "{err}");
        assert_eq!(params, p1);
        assert_eq!(opt.step_count(), 1);
        for (i, (n, _)) in MODEL.iter().enumerate() {
            assert_eq!(opt.state(n).unwrap(), before[i]);
        }
        // A clean step still works afterwards.
        opt.step(&mut refs(&mut params), &crefs(&grads[2]), 0.1, 0.0)
            .unwrap();
        assert_eq!(opt.step_count(), 2);
    }
}

#[test]
fn pylo_without_a_policy_would_spread_nan() {
    // Why the default is not PyLO's "do nothing": one NaN in a gradient reaches every element
    // of the parameter through the feature normalization. (Checks the premise of the policy.)
    let lopt = LearnedOptimizer::demo();
    let mut r = reference(&lopt, &[4, 5], 0);
    let mut p = vec![0.5f32; 20];
    let mut g = vec![0.1f32; 20];
    g[3] = f32::NAN;
    r.step(
        &mut p,
        &g,
        Hyper {
            lr: 0.1,
            weight_decay: 0.0,
        },
    )
    .unwrap();
    assert!(p.iter().all(|x| x.is_nan()));
}

#[test]
fn nonfinite_zero_with_clipping_steps_every_tensor() {
    for backend in backends() {
        // JAX μLO's nan_to_num followed by clipping: f32::MAX is scaled down before the step.
        let lopt = common::fixture_lopt();
        let mut rng = Rng(12);
        let (mut params, grads) = model_data(&mut rng);
        let options = OptimizerOptions {
            nonfinite: NonFinitePolicy::Zero,
            max_grad_norm: Some(1.0),
            ..on(&backend)
        };
        let mut opt = MuloOptimizer::new(&lopt, specs(MODEL), options).unwrap();
        let mut bad = grads[0].clone();
        inject(&mut bad);
        let report = opt
            .step(&mut refs(&mut params), &crefs(&bad), 0.1, 0.0)
            .unwrap();
        assert!(
            report.skipped.is_empty() && report.reverted.is_empty(),
            "{report:?}"
        );
        let clipped: Vec<&str> = report.clipped.iter().map(|(n, _)| n.as_str()).collect();
        for name in ["l1.b", "gain", "head"] {
            assert!(clipped.contains(&name), "{name} in {clipped:?}");
        }
        for (i, (name, _)) in MODEL.iter().enumerate() {
            assert!(params[i].iter().all(|x| x.is_finite()), "{name}");
            let s = opt.state(name).unwrap();
            assert!(
                s.iter().all(|(_, v)| v.iter().all(|x| x.is_finite())),
                "{name}"
            );
        }
    }
}

#[test]
fn overflowing_finite_gradient_is_undone_by_the_guard_or_fails_loudly_without_it() {
    for backend in backends() {
        let lopt = LearnedOptimizer::demo();
        let shapes: &[(&str, &[usize])] = &[("a", &[3, 4]), ("b", &[6])];
        let grads = vec![vec![0.1f32; 12], vec![1e30f32, 0.1, 0.1, 0.1, 0.1, 0.1]];
        let p0 = vec![vec![0.5f32; 12], vec![0.5f32; 6]];
        let mut opt = MuloOptimizer::new(&lopt, specs(shapes), on(&backend)).unwrap();
        let mut params = p0.clone();
        let report = opt
            .step(&mut refs(&mut params), &crefs(&grads), 0.1, 0.0)
            .unwrap();
        assert!(report.nonfinite.is_empty());
        assert_eq!(report.reverted, ["b"]);
        assert_eq!(params[1], p0[1]);
        assert_ne!(params[0], p0[0]);

        let options = OptimizerOptions {
            guard: false,
            ..on(&backend)
        };
        let mut opt = MuloOptimizer::new(&lopt, specs(shapes), options).unwrap();
        let mut params = p0.clone();
        let err = opt
            .step(&mut refs(&mut params), &crefs(&grads), 0.1, 0.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`b`") && err.contains("non-finite"), "{err}");
        // Poisoned: it refuses to go on until its state is restored.
        let err = opt
            .step(&mut refs(&mut params), &crefs(&grads), 0.1, 0.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unusable"), "{err}");
    }
}

/// A stepper that wraps the interpreter and fails on the `fail_at`-th step it is asked to do.
struct Flaky {
    inner: InterpStepper,
    calls: Arc<AtomicUsize>,
    fail_at: usize,
}

impl TensorStepper for Flaky {
    fn target(&self) -> &'static str {
        "flaky"
    }
    fn layout(&self) -> &Layout {
        self.inner.layout()
    }
    fn step(&mut self, param: &mut [f32], grad: &[f32], hyper: Hyper) -> mulo::Result<()> {
        if self.calls.fetch_add(1, Ordering::SeqCst) + 1 == self.fail_at {
            return Err(mulo::Error::backend("flaky", "device lost"));
        }
        self.inner.step(param, grad, hyper)
    }
    fn state(&self) -> mulo::Result<TensorState> {
        self.inner.state()
    }
    fn set_state(&mut self, state: TensorState) -> mulo::Result<()> {
        self.inner.set_state(state)
    }
}

struct FlakyFactory {
    calls: Arc<AtomicUsize>,
    fail_at: usize,
}

impl StepperFactory for FlakyFactory {
    fn target(&self) -> &'static str {
        "flaky"
    }
    fn stepper(
        &self,
        ir: Arc<mulo::ir::StepIr>,
        start_step: u64,
    ) -> mulo::Result<Box<dyn TensorStepper>> {
        Ok(Box::new(Flaky {
            inner: InterpStepper::new(ir, start_step),
            calls: self.calls.clone(),
            fail_at: self.fail_at,
        }))
    }
}

#[test]
fn a_backend_failure_mid_step_makes_the_optimizer_refuse_until_restored() {
    let lopt = LearnedOptimizer::demo();
    let calls = Arc::new(AtomicUsize::new(0));
    // 10 tensors: the 13th stepper call is the 3rd tensor of the second step.
    let options = OptimizerOptions {
        backend: Arc::new(PerTensor(FlakyFactory {
            calls: calls.clone(),
            fail_at: 13,
        })),
        ..Default::default()
    };
    let mut opt = MuloOptimizer::new(&lopt, specs(MODEL), options).unwrap();
    assert_eq!(opt.target(), "flaky");
    let mut rng = Rng(21);
    let (mut params, grads) = model_data(&mut rng);
    opt.step(&mut refs(&mut params), &crefs(&grads[0]), 0.1, 0.0)
        .unwrap();
    let dir = common::temp_dir("flaky");
    let path = dir.join("ckpt.safetensors");
    opt.save_checkpoint(&path).unwrap();
    let saved = params.clone();
    let err = opt
        .step(&mut refs(&mut params), &crefs(&grads[1]), 0.1, 0.0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("device lost") && err.contains("tensor 2") && err.contains("after 2 of"),
        "{err}"
    );
    let err = opt
        .step(&mut refs(&mut params), &crefs(&grads[1]), 0.1, 0.0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unusable") && err.contains("device lost"),
        "{err}"
    );
    assert!(opt.save_checkpoint(&dir.join("bad.safetensors")).is_err());
    // Restore: the checkpoint and the parameters saved with it.
    opt.load_checkpoint(&path).unwrap();
    params = saved;
    opt.step(&mut refs(&mut params), &crefs(&grads[1]), 0.1, 0.0)
        .unwrap();
    assert_eq!(opt.step_count(), 2);
}

#[test]
fn tensors_without_gradient_are_left_unchanged_and_follow_the_counter() {
    // PyTorch's parameters whose `.grad` is None (step_partial): untouched, listed, and when
    // they get a gradient again they are stepped with the optimizer's counter, as PyLO's
    // per-group counter does.
    let lopt = common::fixture_lopt();
    let mut rng = Rng(21);
    let (mut params, grads) = model_data(&mut rng);
    let mut opt = MuloOptimizer::new(
        &lopt,
        specs(MODEL),
        OptimizerOptions {
            backend: Arc::new(PerTensor(InterpFactory)),
            ..Default::default()
        },
    )
    .unwrap();
    let absent = [1usize, 7]; // l0.w and the 0-d gain
    let mut refs_alone: Vec<InterpStepper> =
        MODEL.iter().map(|(_, d)| reference(&lopt, d, 0)).collect();
    let mut want = params.clone();
    for (step, g) in grads.iter().enumerate() {
        let partial: Vec<Option<&[f32]>> = g
            .iter()
            .enumerate()
            .map(|(i, g)| (step != 1 || !absent.contains(&i)).then_some(g.as_slice()))
            .collect();
        let before = params.clone();
        let report = opt
            .step_partial(&mut refs(&mut params), &partial, 0.1, 0.01)
            .unwrap();
        for (i, r) in refs_alone.iter_mut().enumerate() {
            if partial[i].is_some() {
                let mut s = r.state().unwrap();
                s.step = step as u64;
                r.set_state(s).unwrap();
                r.step(
                    &mut want[i],
                    &g[i],
                    Hyper {
                        lr: 0.1,
                        weight_decay: 0.01,
                    },
                )
                .unwrap();
            }
            assert_eq!(
                bits(&params[i]),
                bits(&want[i]),
                "{} at step {step}",
                MODEL[i].0
            );
        }
        if step == 1 {
            assert_eq!(report.without_grad, ["l0.w", "gain"]);
            assert!(report.skipped.is_empty());
            for &i in &absent {
                assert_eq!(bits(&params[i]), bits(&before[i]));
            }
        } else {
            assert!(report.without_grad.is_empty());
        }
    }
    assert_eq!(opt.step_count(), grads.len() as u64);
    for (name, _) in MODEL {
        assert_eq!(opt.state(name).unwrap().step, grads.len() as u64, "{name}");
    }
    // A wrong length of a parameter whose gradient is absent is still refused.
    let mut short = params.clone();
    short[1].pop();
    let none: Vec<Option<&[f32]>> = vec![None; MODEL.len()];
    let err = opt
        .step_partial(&mut refs(&mut short), &none, 0.1, 0.0)
        .unwrap_err();
    assert!(err.to_string().contains("l0.w"), "{err}");
    // The clipping norm can change between steps, and is checked.
    assert!(opt.set_max_grad_norm(Some(0.0)).is_err());
    opt.set_max_grad_norm(Some(1.0)).unwrap();
    assert_eq!(opt.max_grad_norm(), Some(1.0));
}

/// The guard keeps its snapshot buffers between steps (they are reused, not reallocated): an
/// overflow at the fourth step restores exactly the parameter and state after the third, and
/// a later revert of the other tensor restores its own latest state, not an older snapshot.
#[test]
fn guard_restores_the_state_just_before_the_faulty_step_after_several_steps() {
    for backend in backends() {
        let lopt = LearnedOptimizer::demo();
        let shapes: &[(&str, &[usize])] = &[("a", &[3, 4]), ("b", &[6])];
        let clean = vec![vec![0.1f32; 12], vec![0.1f32; 6]];
        let mut opt = MuloOptimizer::new(&lopt, specs(shapes), on(&backend)).unwrap();
        let mut params = vec![vec![0.5f32; 12], vec![0.5f32; 6]];
        for _ in 0..3 {
            let report = opt
                .step(&mut refs(&mut params), &crefs(&clean), 0.1, 0.0)
                .unwrap();
            assert!(report.reverted.is_empty());
        }
        let check_revert = |opt: &mut MuloOptimizer, params: &mut Vec<Vec<f32>>, bad: usize| {
            let before_p = params[bad].clone();
            let name = shapes[bad].0;
            let before_s = opt.state(name).unwrap();
            let mut grads = clean.clone();
            grads[bad][0] = 1e30;
            let report = opt
                .step(&mut refs(params), &crefs(&grads), 0.1, 0.0)
                .unwrap();
            assert_eq!(report.reverted, [name], "{}", opt.target());
            assert_eq!(
                bits(&params[bad]),
                bits(&before_p),
                "{name} on {}",
                opt.target()
            );
            let after_s = opt.state(name).unwrap();
            assert_eq!(after_s.step, before_s.step + 1);
            for ((b, got), (_, want)) in after_s.iter().zip(before_s.iter()) {
                assert_eq!(bits(got), bits(want), "{name} {b:?} on {}", opt.target());
            }
        };
        check_revert(&mut opt, &mut params, 1);
        opt.step(&mut refs(&mut params), &crefs(&clean), 0.1, 0.0)
            .unwrap();
        check_revert(&mut opt, &mut params, 0);
        check_revert(&mut opt, &mut params, 1);
    }
}

/// A model with a factored (`w`), an unfactored (`b`) and a 0-d (`s`) tensor, stepped twice
/// so that every accumulator holds non-zero values.
fn stepped_model(backend: &Arc<dyn BackendFactory>) -> (MuloOptimizer, Vec<Vec<f32>>) {
    let lopt = common::fixture_lopt();
    let shapes: &[(&str, &[usize])] = &[("w", &[6, 5]), ("b", &[7]), ("s", &[])];
    let mut opt = MuloOptimizer::new(&lopt, specs(shapes), on(backend)).unwrap();
    let mut rng = Rng(31);
    let mut params: Vec<Vec<f32>> = shapes
        .iter()
        .map(|(_, d)| rng.gradient(d.iter().product()))
        .collect();
    for _ in 0..2 {
        let grads: Vec<Vec<f32>> = params.iter().map(|p| rng.gradient(p.len())).collect();
        opt.step(&mut refs(&mut params), &crefs(&grads), 1e-2, 0.0)
            .unwrap();
    }
    (opt, params)
}

fn all_states(opt: &MuloOptimizer) -> Vec<TensorState> {
    opt.params()
        .iter()
        .map(|p| opt.state(&p.name).unwrap())
        .collect()
}

/// One bad value per rule of an imported state: (tensor, buffer, flat index, value, words
/// the error must hold besides the tensor and the buffer).
fn bad_state_values() -> Vec<(&'static str, Buffer, usize, f32, &'static str)> {
    vec![
        ("w", Buffer::Mom, 4, f32::NAN, "non-finite"),
        ("w", Buffer::Mom, 0, f32::NEG_INFINITY, "non-finite"),
        ("b", Buffer::Rms, 2, f32::INFINITY, "non-finite"),
        ("w", Buffer::Rms, 7, -1.0, "negative"),
        ("s", Buffer::Rms, 0, -1e-30, "negative"),
        ("w", Buffer::FacRow, 3, -2.5, "negative"),
        ("w", Buffer::FacCol, 1, -1e-3, "negative"),
        ("b", Buffer::FacV, 5, -f32::MIN_POSITIVE, "negative"),
        ("w", Buffer::Mom, 9, 3e38, "2^64"),
        ("b", Buffer::Mom, 1, -18_446_744_073_709_551_616.0, "2^64"),
    ]
}

/// Every rule of an imported state (finite; `rms`, `fac_*` ≥ 0; |mom| < 2^64) is enforced by
/// `set_state`, `set_states`, `import_pylo_state` and `ShardedModel::set_state`: the error
/// names the tensor, the buffer and the rule, and nothing changes.
#[test]
fn imported_states_are_checked_by_every_rule_and_a_refusal_changes_nothing() {
    let (mut opt, _) = stepped_model(&backends()[0]);
    let lopt = common::fixture_lopt();
    let sharded_params = opt
        .params()
        .iter()
        .map(|p| mulo::shard::ShardedParam::new(&p.name, &p.shape, None, None).unwrap())
        .collect();
    let mut sharded =
        mulo::shard::ShardedModel::new(&lopt, sharded_params, None, NonFinitePolicy::Skip).unwrap();
    sharded.set_step_count(opt.step_count());
    for (i, s) in all_states(&opt).into_iter().enumerate() {
        sharded.set_state(i, s).unwrap();
    }
    let before = all_states(&opt);
    let sharded_before: Vec<TensorState> =
        (0..3).map(|i| sharded.state(i).unwrap().clone()).collect();
    let expect = |r: mulo::Result<()>, words: &[&str], how: &str| {
        let msg = r
            .expect_err(&format!("{how}: a bad state was accepted"))
            .to_string();
        for w in words {
            assert!(msg.contains(w), "{how}: `{w}` not in: {msg}");
        }
    };
    for (name, buffer, at, value, rule) in bad_state_values() {
        let i = opt.index_of(name).unwrap();
        let mut bad = before[i].clone();
        bad.get_mut(buffer)[at] = value;
        let how = format!("{name}/{} = {value}", buffer.name());
        let words = [&format!("`{name}`"), buffer.name(), rule];
        expect(opt.set_state(name, bad.clone()), &words, &how);
        // All or nothing: a good state given before the bad one is not applied either.
        let other = opt.params()[(i + 1) % 3].name.clone();
        let zeros = TensorState::zeros(before[(i + 1) % 3].layout(), opt.step_count());
        expect(
            opt.set_states(vec![(other, zeros), (name.to_string(), bad.clone())]),
            &words,
            &format!("{how} (set_states)"),
        );
        // The same state in PyLO's layout (the error names its PyLO buffer name).
        let pylo = bad.to_pylo();
        let pylo_name = mulo::state::pylo_name(buffer);
        expect(
            opt.import_pylo_state(name, |n| {
                pylo.iter()
                    .find(|t| t.0 == n)
                    .map(|t| (t.1.clone(), t.2.clone()))
            }),
            &[&format!("`{name}`"), pylo_name, rule],
            &format!("{how} (PyLO)"),
        );
        assert_eq!(
            all_states(&opt),
            before,
            "{how}: a refused import changed a state"
        );
        expect(
            sharded.set_state(i, bad),
            &words,
            &format!("{how} (sharded)"),
        );
        for (j, s) in sharded_before.iter().enumerate() {
            assert_eq!(
                sharded.state(j).unwrap(),
                s,
                "{how}: the sharded state changed"
            );
        }
    }
    // The bounds themselves are accepted: the largest |mom| below 2^64 (the largest f32
    // whose square is finite) and a -0 accumulator.
    let largest = f32::from_bits(mulo::state::MOM_LIMIT.to_bits() - 1);
    let limit = mulo::state::MOM_LIMIT;
    assert!((largest * largest).is_finite() && !(limit * limit).is_finite());
    let mut edge = before[0].clone();
    edge.get_mut(Buffer::Mom)[0] = -largest;
    edge.get_mut(Buffer::Rms)[0] = -0.0;
    opt.set_state("w", edge.clone()).unwrap();
    assert_eq!(opt.state("w").unwrap(), edge);
}

/// At `u64::MAX` the step counter cannot grow: the step is refused with an error and
/// changes nothing (parameters, states, counter), on every backend, in the whole-model
/// optimizer, a per-tensor stepper and the sharded model.
#[test]
fn a_step_counter_at_its_limit_refuses_the_step_and_changes_nothing() {
    for backend in backends() {
        let (mut opt, mut params) = stepped_model(&backend);
        let mut rng = Rng(7);
        let grads: Vec<Vec<f32>> = params.iter().map(|p| rng.gradient(p.len())).collect();
        // The last step that fits; ONNX takes the counter as an i64 and refuses a larger one
        // by itself, so there the optimizer is put at the limit directly.
        if backend.target() == "onnx" {
            opt.set_step_count(u64::MAX).unwrap();
        } else {
            opt.set_step_count(u64::MAX - 1).unwrap();
            opt.step(&mut refs(&mut params), &crefs(&grads), 1e-2, 0.0)
                .unwrap();
        }
        assert_eq!(opt.step_count(), u64::MAX);
        let (p_before, s_before) = (params.clone(), all_states(&opt));
        let err = opt
            .step(&mut refs(&mut params), &crefs(&grads), 1e-2, 0.0)
            .expect_err("a step past u64::MAX was taken")
            .to_string();
        assert!(err.contains("limit") && err.contains("step"), "{err}");
        let target = backend.target();
        assert_eq!(
            params, p_before,
            "{target}: a refused step changed a parameter"
        );
        assert_eq!(all_states(&opt), s_before, "{target}: ... changed a state");
        assert_eq!(opt.step_count(), u64::MAX, "{target}");
        // A checkpoint at the limit is in range: it saves and loads (and still cannot step).
        let bytes = opt.checkpoint_bytes().unwrap();
        opt.restore_checkpoint(&bytes, std::path::Path::new("limit.ckpt"))
            .unwrap();
        assert_eq!(opt.step_count(), u64::MAX);
    }

    // A per-tensor stepper used on its own.
    let lopt = common::fixture_lopt();
    let mut stepper = reference(&lopt, &[6, 5], u64::MAX);
    let mut p = vec![0.5f32; 30];
    let err = stepper
        .step(
            &mut p,
            &[0.1; 30],
            Hyper {
                lr: 1e-2,
                weight_decay: 0.0,
            },
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("limit"), "{err}");
    assert_eq!(p, vec![0.5f32; 30]);
    assert_eq!(stepper.state().unwrap().step, u64::MAX);

    // The sharded model: refused at `begin`, and at `finish` when the counter was set to the
    // limit while the step was in flight.
    let params: Vec<mulo::shard::ShardedParam> = [("w", vec![6, 5]), ("b", vec![7])]
        .iter()
        .map(|(n, d)| {
            mulo::shard::ShardedParam::new(*n, &Shape::new(d.clone()).unwrap(), None, None).unwrap()
        })
        .collect();
    let mut model =
        mulo::shard::ShardedModel::new(&lopt, params, None, NonFinitePolicy::Skip).unwrap();
    let mut p = vec![vec![0.5f32; 30], vec![0.25f32; 7]];
    let g = [vec![0.1f32; 30], vec![-0.2f32; 7]];
    let hypers = [Hyper {
        lr: 1e-2,
        weight_decay: 0.0,
    }; 2];
    let grads: Vec<Option<&[f32]>> = g.iter().map(|x| Some(x.as_slice())).collect();
    model.set_step_count(u64::MAX);
    let err = model
        .begin(&crefs(&p), &grads, &hypers)
        .unwrap_err()
        .to_string();
    assert!(err.contains("limit"), "{err}");
    model.set_step_count(5);
    let mut buf = model.begin(&crefs(&p), &grads, &hypers).unwrap();
    for _ in 1..model.rounds() {
        buf = model.advance(&buf).unwrap();
    }
    model.set_step_count(u64::MAX);
    let states: Vec<TensorState> = (0..2).map(|i| model.state(i).unwrap().clone()).collect();
    let err = model
        .finish(&buf, &mut refs(&mut p))
        .unwrap_err()
        .to_string();
    assert!(err.contains("limit"), "{err}");
    assert_eq!(p, vec![vec![0.5f32; 30], vec![0.25f32; 7]]);
    for (i, s) in states.iter().enumerate() {
        assert_eq!(model.state(i).unwrap(), s);
    }
    assert_eq!(model.step_count(), u64::MAX);
}

/// A stepper with a bug the step guard cannot see: its steps leave a finite but negative
/// `rms` value.
struct NegativeRms(InterpStepper);

impl TensorStepper for NegativeRms {
    fn target(&self) -> &'static str {
        "negative-rms"
    }
    fn layout(&self) -> &Layout {
        self.0.layout()
    }
    fn step(&mut self, param: &mut [f32], grad: &[f32], hyper: Hyper) -> mulo::Result<()> {
        self.0.step(param, grad, hyper)?;
        let mut state = self.0.state()?;
        state.get_mut(Buffer::Rms)[0] = -1.0;
        self.0.set_state(state)
    }
    fn state(&self) -> mulo::Result<TensorState> {
        self.0.state()
    }
    fn set_state(&mut self, state: TensorState) -> mulo::Result<()> {
        self.0.set_state(state)
    }
}

struct NegativeRmsFactory;

impl StepperFactory for NegativeRmsFactory {
    fn target(&self) -> &'static str {
        "negative-rms"
    }
    fn stepper(
        &self,
        ir: Arc<mulo::ir::StepIr>,
        start_step: u64,
    ) -> mulo::Result<Box<dyn TensorStepper>> {
        Ok(Box::new(NegativeRms(InterpStepper::new(ir, start_step))))
    }
}

/// A checkpoint that a load would refuse is never written: saving a state that breaks a
/// rule of imported state is an error naming the tensor and the rule, and the file at the
/// path is left as it was.
#[test]
fn a_state_that_could_not_be_loaded_back_is_not_saved() {
    let options = OptimizerOptions {
        backend: Arc::new(PerTensor(NegativeRmsFactory)),
        ..Default::default()
    };
    let mut opt =
        MuloOptimizer::new(&common::fixture_lopt(), specs(&[("w", &[4, 3])]), options).unwrap();
    let dir = common::temp_dir("unloadable");
    let path = dir.join("ckpt.safetensors");
    opt.save_checkpoint(&path).unwrap();
    let before = std::fs::read(&path).unwrap();
    let mut p = vec![0.5f32; 12];
    opt.step(&mut [p.as_mut_slice()], &[&[0.1f32; 12]], 1e-2, 0.0)
        .unwrap();
    let err = opt.save_checkpoint(&path).unwrap_err().to_string();
    assert!(err.contains("`w/rms`") && err.contains("negative"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
}
