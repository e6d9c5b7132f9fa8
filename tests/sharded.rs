//! Sharded steps (`mulo::shard`): tensors split into uneven row shards, stepped in stages with
//! an in-process "all-reduce" (the sum of every shard's buffer), against the unsharded step.

mod common;

use common::model::{ModelCase, Mup};
use common::{fixture_lopt, Rng};
use mulo::backend::interp::InterpStepper;
use mulo::backend::{Hyper, InterpFactory, PerTensor, TensorStepper};
use mulo::optimizer::{MuloOptimizer, NonFinitePolicy, OptimizerOptions};
use mulo::shard::{RowShard, ShardedModel, ShardedParam, StageEngine, StagedPlan};
use mulo::state::TensorState;
use mulo::trajectory::{max_abs_diff, DEFAULT_TOLERANCE};
use mulo::{compile_layout, FactoredAxes, Layout, Shape};
use std::sync::Arc;

/// Row shards of `total` rows with the given sizes (they must add up).
fn shards(sizes: &[usize]) -> Vec<RowShard> {
    let mut offset = 0;
    sizes
        .iter()
        .map(|&rows| {
            let s = RowShard { offset, rows };
            offset += rows;
            s
        })
        .collect()
}

/// The values of rows `s` of a row-major tensor whose rows hold `row_len` values.
fn rows_of(data: &[f32], s: RowShard, row_len: usize) -> Vec<f32> {
    data[s.offset * row_len..(s.offset + s.rows) * row_len].to_vec()
}

fn sum_buffers(buffers: &[Vec<f64>]) -> Vec<f64> {
    let mut sum = vec![0f64; buffers[0].len()];
    for b in buffers {
        assert_eq!(b.len(), sum.len(), "every rank's buffer has the same size");
        for (s, x) in sum.iter_mut().zip(b) {
            *s += x;
        }
    }
    sum
}

/// One run of `layout` for `steps` steps: the whole parameter after every step, and every
/// shard's final state.
struct Run {
    p0: Vec<f32>,
    params: Vec<Vec<f32>>,
    states: Vec<TensorState>,
}

/// Steps `layout` as `sizes` row shards on `engine` (`None`: unsharded, the interpreter) for
/// `steps` steps of seeded gradients.
fn run_staged(
    layout: &Layout,
    sizes: &[usize],
    steps: usize,
    seed: u64,
    engine: Option<StageEngine>,
) -> Run {
    let lopt = fixture_lopt();
    let ir = Arc::new(compile_layout(layout, &lopt).unwrap());
    let n = layout.numel();
    let row_len = n / layout.dims()[0];
    let parts = shards(sizes);
    assert_eq!(
        parts.iter().map(|s| s.rows).sum::<usize>(),
        layout.dims()[0]
    );
    let plans: Vec<Arc<StagedPlan>> = parts
        .iter()
        .map(|&s| {
            Arc::new(
                StagedPlan::with_engine(ir.clone(), Some(s), engine.unwrap_or(StageEngine::Interp))
                    .unwrap(),
            )
        })
        .collect();
    let mut rng = Rng(seed);
    let p0: Vec<f32> = (0..n).map(|_| rng.next_f32() * 0.5).collect();
    let mut full = p0.clone();
    let mut stepper = InterpStepper::new(ir.clone(), 0);
    let mut local: Vec<Vec<f32>> = parts.iter().map(|&s| rows_of(&p0, s, row_len)).collect();
    let mut states: Vec<TensorState> = plans
        .iter()
        .map(|p| TensorState::zeros(p.local_layout(), 0))
        .collect();
    let mut params = Vec::new();
    for t in 0..steps {
        let grad = rng.gradient(n);
        let hyper = Hyper {
            lr: 0.05 + 0.01 * t as f32,
            weight_decay: if t % 2 == 0 { 0.0 } else { 1e-2 },
        };
        if engine.is_none() {
            stepper.step(&mut full, &grad, hyper).unwrap();
            params.push(full.clone());
            continue;
        }
        let mut running: Vec<_> = plans
            .iter()
            .zip(&parts)
            .enumerate()
            .map(|(r, (plan, &s))| {
                plan.begin(&local[r], &rows_of(&grad, s, row_len), &states[r], hyper)
                    .unwrap()
            })
            .collect();
        for _ in 0..plans[0].rounds() {
            let sums = sum_buffers(
                &running
                    .iter()
                    .map(|s| s.partials().to_vec())
                    .collect::<Vec<_>>(),
            );
            for s in &mut running {
                s.advance(&sums).unwrap();
            }
        }
        let mut sharded = Vec::with_capacity(n);
        for (r, s) in running.into_iter().enumerate() {
            assert!(s.partials().is_empty());
            let (p, st) = s.finish().unwrap();
            local[r] = p;
            states[r] = st;
            sharded.extend_from_slice(&local[r]);
        }
        params.push(sharded);
        for st in &states {
            assert_eq!(st.step, t as u64 + 1);
        }
    }
    if engine.is_none() {
        states = vec![stepper.state().unwrap()];
    }
    Run { p0, params, states }
}

/// Steps `layout` for `steps` steps unsharded (the interpreter) and as `sizes` row shards on
/// the reference engine; returns the worst difference relative to the displacement and whether
/// every step was bitwise equal.
fn staged_vs_unsharded(layout: &Layout, sizes: &[usize], steps: usize, seed: u64) -> (f64, bool) {
    let full = run_staged(layout, sizes, steps, seed, None);
    let staged = run_staged(layout, sizes, steps, seed, Some(StageEngine::Interp));
    let bitwise = full.params == staged.params;
    let worst = full
        .params
        .iter()
        .zip(&staged.params)
        .map(|(a, b)| max_abs_diff(a, b))
        .fold(0f64, f64::max);
    let displacement = max_abs_diff(&full.p0, full.params.last().unwrap()).max(f64::MIN_POSITIVE);
    (worst / displacement, bitwise)
}

fn layout(dims: &[usize], axes: Option<(usize, usize)>) -> Layout {
    Layout::with_axes(
        Shape::new(dims.to_vec()).unwrap(),
        axes.map(|(d0, d1)| FactoredAxes { d0, d1 }),
    )
    .unwrap()
}

/// Every kind of tensor, the sharded axis being d0, d1 or neither, in 2 and 3 uneven shards
/// (some empty): the staged step on the reference evaluator equals the unsharded one within
/// 1e-5 of the displacement.
#[test]
fn staged_shards_equal_the_unsharded_step() {
    let cases: Vec<(Layout, Vec<usize>, usize)> = vec![
        (layout(&[9, 5], None), vec![4, 5], 1),       // axis 0 = d0
        (layout(&[9, 5], None), vec![2, 3, 4], 1),    // 3 shards
        (layout(&[5, 12], None), vec![3, 2], 1),      // axis 0 = d1
        (layout(&[5, 12], None), vec![1, 4, 0], 1),   // an empty shard
        (layout(&[7, 4, 3], None), vec![3, 4], 1),    // d0 = 0, rank 3
        (layout(&[3, 8, 5], None), vec![1, 1, 1], 0), // axis 0 neither d0 nor d1
        (layout(&[6, 6, 3, 3], Some((0, 1))), vec![2, 4], 1), // tied, d0 = 0
        (layout(&[6, 6, 3, 3], Some((1, 0))), vec![4, 2], 1), // tied, d1 = 0
        (layout(&[1, 30], None), vec![1, 0], 1),      // one row
        (layout(&[37], None), vec![13, 13, 11], 1),   // a vector
        (layout(&[2], None), vec![1, 1, 0], 1),       // a tiny vector, empty shard
    ];
    for (i, (layout, sizes, min_rounds)) in cases.iter().enumerate() {
        let ir = Arc::new(compile_layout(layout, &fixture_lopt()).unwrap());
        let plan = StagedPlan::new(ir, Some(RowShard { offset: 0, rows: 1 })).unwrap();
        assert!(plan.rounds() >= *min_rounds && plan.rounds() <= 2);
        let (worst, bitwise) = staged_vs_unsharded(layout, sizes, 6, 11 + i as u64);
        eprintln!(
            "{layout} split {sizes:?}: {} rounds, worst {worst:e} of the displacement, bitwise {bitwise}",
            plan.rounds()
        );
        assert!(worst <= 1e-5, "{layout} {sizes:?}: {worst:e}");
    }
}

/// The cases of the staged tests: every kind of tensor, the sharded axis being d0, d1 or
/// neither, in 2 and 3 uneven shards (some empty).
fn staged_cases() -> Vec<(Layout, Vec<usize>)> {
    vec![
        (layout(&[9, 5], None), vec![4, 5]),
        (layout(&[9, 5], None), vec![2, 3, 4]),
        (layout(&[5, 12], None), vec![3, 2]),
        (layout(&[5, 12], None), vec![1, 4, 0]),
        (layout(&[7, 4, 3], None), vec![3, 4]),
        (layout(&[3, 8, 5], None), vec![1, 1, 1]),
        (layout(&[6, 6, 3, 3], Some((0, 1))), vec![2, 4]),
        (layout(&[6, 6, 3, 3], Some((1, 0))), vec![4, 2]),
        (layout(&[1, 30], None), vec![1, 0]),
        (layout(&[37], None), vec![13, 13, 11]),
        (layout(&[2], None), vec![1, 1, 0]),
        // Several chunks and slices per shard.
        (layout(&[300, 70], None), vec![150, 100, 50]),
        (layout(&[40, 300], None), vec![25, 15]),
    ]
}

/// The native CPU stages equal the reference stages within the CPU backend's tolerance
/// against the interpreter (tests/cpu_props.rs: 1e-4 of the displacement plus 4 f32 ulps of
/// |p| per step for the parameter, 1e-5 of each state buffer's scale), at every step.
#[test]
fn cpu_stages_equal_the_reference_stages() {
    for (i, (layout, sizes)) in staged_cases().iter().enumerate() {
        let steps = 6;
        let seed = 101 + i as u64;
        let want = run_staged(layout, sizes, steps, seed, Some(StageEngine::Interp));
        let got = run_staged(
            layout,
            sizes,
            steps,
            seed,
            Some(StageEngine::Cpu { threads: 2 }),
        );
        let mut worst = 0f64;
        for (k, (g, w)) in got.params.iter().zip(&want.params).enumerate() {
            let displacement = max_abs_diff(&want.p0, w);
            for (e, (&a, &b)) in g.iter().zip(w).enumerate() {
                let bound = 1e-4 * displacement
                    + 4.0 * (k + 1) as f64 * f32::EPSILON as f64 * (b as f64).abs();
                let err = (a as f64 - b as f64).abs();
                worst = worst.max(err / displacement.max(f64::MIN_POSITIVE));
                assert!(
                    err <= bound,
                    "{layout} {sizes:?} step {k} element {e}: {a} vs {b} (error {err:e}, bound {bound:e})"
                );
            }
        }
        for (gs, ws) in got.states.iter().zip(&want.states) {
            assert_eq!(gs.step, ws.step);
            for (buffer, w) in ws.iter() {
                let g = gs.get(buffer);
                let scale = w.iter().fold(0f64, |m, v| m.max(v.abs() as f64)).max(1e-30);
                let err = max_abs_diff(g, w);
                assert!(
                    err <= 1e-5 * scale,
                    "{layout} {sizes:?} {buffer}: {err:e} of {scale:e}"
                );
            }
        }
        eprintln!("{layout} split {sizes:?}: cpu vs reference stages, worst {worst:e} of the displacement");
    }
}

/// A tensor that is not sharded (replicated; 0-d tensors too) has one stage and no round on
/// both engines, and the CPU stage equals the reference within the CPU tolerance.
#[test]
fn unsharded_tensors_have_one_stage_on_both_engines() {
    for dims in [&[][..], &[37], &[9, 5], &[4, 3, 5]] {
        let layout = layout(dims, None);
        let ir = Arc::new(compile_layout(&layout, &fixture_lopt()).unwrap());
        let n = layout.numel();
        let mut rng = Rng(5);
        let p0: Vec<f32> = (0..n).map(|_| rng.next_f32() * 0.5).collect();
        let grads: Vec<Vec<f32>> = (0..4).map(|_| rng.gradient(n)).collect();
        let hyper = Hyper {
            lr: 0.05,
            weight_decay: 1e-2,
        };
        let run = |engine: StageEngine| {
            let plan = Arc::new(StagedPlan::with_engine(ir.clone(), None, engine).unwrap());
            assert_eq!(plan.rounds(), 0);
            let (mut p, mut st) = (p0.clone(), TensorState::zeros(plan.local_layout(), 0));
            for g in &grads {
                let s = plan.begin(&p, g, &st, hyper).unwrap();
                assert!(s.is_done() && s.partials().is_empty());
                (p, st) = s.finish().unwrap();
            }
            (p, st)
        };
        let (want, want_state) = run(StageEngine::Interp);
        let (got, got_state) = run(StageEngine::Cpu { threads: 2 });
        let displacement = max_abs_diff(&p0, &want);
        for (&a, &b) in got.iter().zip(&want) {
            let bound = 1e-4 * displacement + 16.0 * f32::EPSILON as f64 * (b as f64).abs();
            assert!(((a - b) as f64).abs() <= bound, "{layout}: {a} vs {b}");
        }
        assert_eq!(got_state.step, 4);
        for (buffer, w) in want_state.iter() {
            let scale = w.iter().fold(0f64, |m, v| m.max(v.abs() as f64)).max(1e-30);
            assert!(
                max_abs_diff(got_state.get(buffer), w) <= 1e-5 * scale,
                "{layout} {buffer}"
            );
        }
    }
}

/// The CPU stages give bitwise the same parameters, states and round buffers for any thread
/// count.
#[test]
fn cpu_stages_are_bitwise_the_same_for_any_thread_count() {
    let layout = layout(&[300, 70], None);
    let runs: Vec<Run> = [1, 2, 5]
        .into_iter()
        .map(|threads| {
            run_staged(
                &layout,
                &[170, 130],
                4,
                7,
                Some(StageEngine::Cpu { threads }),
            )
        })
        .collect();
    for r in &runs[1..] {
        assert!(r
            .params
            .iter()
            .flatten()
            .zip(runs[0].params.iter().flatten())
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        for (a, b) in r.states.iter().zip(&runs[0].states) {
            for (buffer, x) in a.iter() {
                assert!(
                    x.iter()
                        .zip(b.get(buffer))
                        .all(|(p, q)| p.to_bits() == q.to_bits()),
                    "{buffer}"
                );
            }
        }
    }
    // The round buffers themselves.
    let ir = Arc::new(compile_layout(&layout, &fixture_lopt()).unwrap());
    let shard = RowShard {
        offset: 0,
        rows: 170,
    };
    let mut rng = Rng(3);
    let param: Vec<f32> = (0..170 * 70).map(|_| rng.next_f32()).collect();
    let grad = rng.gradient(170 * 70);
    let hyper = Hyper {
        lr: 0.1,
        weight_decay: 0.0,
    };
    let buffers: Vec<Vec<f64>> = [1, 3]
        .into_iter()
        .map(|threads| {
            let plan = Arc::new(
                StagedPlan::with_engine(ir.clone(), Some(shard), StageEngine::Cpu { threads })
                    .unwrap(),
            );
            let state = TensorState::zeros(plan.local_layout(), 0);
            let s = plan.begin(&param, &grad, &state, hyper).unwrap();
            s.partials().to_vec()
        })
        .collect();
    assert!(!buffers[0].is_empty());
    assert!(buffers[0]
        .iter()
        .zip(&buffers[1])
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    // The same layout as the reference stages' buffer (so ranks may mix engines): every sum
    // close to the reference's, relative to the largest.
    let plan = Arc::new(StagedPlan::new(ir.clone(), Some(shard)).unwrap());
    let state = TensorState::zeros(plan.local_layout(), 0);
    let want = plan.begin(&param, &grad, &state, hyper).unwrap();
    let want = want.partials();
    assert_eq!(want.len(), buffers[0].len());
    for (_, off, len) in plan.round_contents(0) {
        let (g, w) = (&buffers[0][off..off + len], &want[off..off + len]);
        let scale = w.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
        let err = g.iter().zip(w).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            err <= 1e-5 * scale,
            "round 0 at {off}: {err:e} of {scale:e}"
        );
    }
}

/// The round structure follows the sharded axis: sharded along d0, the g² means along d0 are
/// combined (round 0) and the feature mean squares (round 1); along d1, the row accumulators'
/// means too; sharded along neither factored axis, only the feature statistics.
#[test]
fn rounds_carry_only_the_means_that_cross_the_sharded_axis() {
    let lopt = fixture_lopt();
    let plan = |l: Layout| {
        let ir = Arc::new(compile_layout(&l, &lopt).unwrap());
        StagedPlan::new(ir, Some(RowShard { offset: 0, rows: 1 })).unwrap()
    };
    let notes = |p: &StagedPlan, r: usize| -> Vec<String> {
        p.round_contents(r).into_iter().map(|c| c.0).collect()
    };
    let features = |p: &StagedPlan, r: usize| -> usize {
        notes(p, r)
            .iter()
            .filter(|n| n.starts_with("mean of feature"))
            .count()
    };
    // [9, 5]: d0 = 0 (sharded), d1 = 1. Round 0: the g² means along d0, and the mean squares
    // of the 16 features that need no combined mean (g, P, M, V, ..., C and its rsqrt: C is
    // a local mean along d1); round 1: the 6 features fg, fm built from R. R itself lives on
    // the tensor without d0 (axis 0): every rank holds all of it, so its 6 features' mean
    // squares are local.
    let p = plan(layout(&[9, 5], None));
    assert_eq!(p.rounds(), 2);
    let r0 = notes(&p, 0);
    assert_eq!(r0[0], "mean of q over d0");
    assert!(
        !r0.iter()
            .any(|n| n.contains("over d1") || n.starts_with("r̄")),
        "{r0:?}"
    );
    assert_eq!((features(&p, 0), features(&p, 1)), (16, 6));
    assert_eq!(p.round_len(0), 5 + 16); // one sum per column, one per feature
                                        // [5, 12]: d0 = 1, d1 = 0 (sharded): C's g² mean and the three r̄.
    let p = plan(layout(&[5, 12], None));
    assert_eq!(p.rounds(), 2);
    let r0 = notes(&p, 0);
    assert!(r0.contains(&"mean of q over d1".to_string()), "{r0:?}");
    assert_eq!(
        r0.iter().filter(|n| n.starts_with("r̄")).count(),
        3,
        "{r0:?}"
    );
    // C lives on the tensor without d1 = axis 0: replicated, its 6 features local.
    assert_eq!(features(&p, 0) + features(&p, 1), 22);
    // [3, 8, 5]: axis 0 is neither: only the normalization statistics cross it.
    let p = plan(layout(&[3, 8, 5], None));
    assert_eq!(p.rounds(), 1);
    assert!(notes(&p, 0)
        .iter()
        .all(|n| n.starts_with("mean of feature")));
    // A vector: one round.
    assert_eq!(plan(layout(&[37], None)).rounds(), 1);
    // Not sharded: no round.
    let ir = Arc::new(compile_layout(&layout(&[9, 5], None), &lopt).unwrap());
    assert_eq!(StagedPlan::new(ir, None).unwrap().rounds(), 0);
}

/// A shard outside the tensor, a 0-d tensor sharded, wrong lengths, a state of another shard
/// and sums of the wrong size are errors naming what is wrong.
#[test]
fn bad_shards_and_buffers_are_refused() {
    let lopt = fixture_lopt();
    let l = layout(&[9, 5], None);
    let ir = Arc::new(compile_layout(&l, &lopt).unwrap());
    let err = StagedPlan::new(ir.clone(), Some(RowShard { offset: 7, rows: 3 })).unwrap_err();
    assert!(err.to_string().contains("outside axis 0"), "{err}");
    let scalar = Arc::new(compile_layout(&layout(&[], None), &lopt).unwrap());
    let err = StagedPlan::new(scalar, Some(RowShard { offset: 0, rows: 1 })).unwrap_err();
    assert!(err.to_string().contains("0-d"), "{err}");
    let plan = Arc::new(StagedPlan::new(ir, Some(RowShard { offset: 2, rows: 3 })).unwrap());
    let state = TensorState::zeros(plan.local_layout(), 0);
    let hyper = Hyper {
        lr: 0.1,
        weight_decay: 0.0,
    };
    let err = plan
        .begin(&[0.0; 14], &[0.0; 15], &state, hyper)
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("param") && err.to_string().contains("15"),
        "{err}"
    );
    let other = TensorState::zeros(&layout(&[9, 5], None), 0);
    let err = plan
        .begin(&[0.0; 15], &[0.0; 15], &other, hyper)
        .err()
        .unwrap();
    assert!(err.to_string().contains("state"), "{err}");
    let mut step = plan.begin(&[0.0; 15], &[0.1; 15], &state, hyper).unwrap();
    let err = step.advance(&[0.0; 4]).unwrap_err();
    assert!(err.to_string().contains("round 0"), "{err}");
    let err = ShardedParam::new(
        "w",
        &Shape::new(vec![4, 3]).unwrap(),
        None,
        Some(RowShard { offset: 3, rows: 2 }),
    )
    .unwrap_err();
    assert!(err.to_string().contains("`w`"), "{err}");
}

/// `ranks` sharded models of the digits CNN (torch.chunk's row split, the 0-d gain
/// replicated), stepped together through an in-process all-reduce.
struct Ranks {
    models: Vec<ShardedModel>,
    local: Vec<Vec<Vec<f32>>>,
    splits: Vec<Vec<Option<RowShard>>>,
    row_lens: Vec<usize>,
}

impl Ranks {
    fn digits(case: &ModelCase, ranks: usize, nonfinite: NonFinitePolicy) -> Self {
        Self::digits_clipped(case, ranks, nonfinite, Some(case.max_grad_norm))
    }

    fn digits_clipped(
        case: &ModelCase,
        ranks: usize,
        nonfinite: NonFinitePolicy,
        max_grad_norm: Option<f32>,
    ) -> Self {
        Self::digits_on(
            case,
            ranks,
            nonfinite,
            max_grad_norm,
            StageEngine::default(),
        )
    }

    fn digits_on(
        case: &ModelCase,
        ranks: usize,
        nonfinite: NonFinitePolicy,
        max_grad_norm: Option<f32>,
        engine: StageEngine,
    ) -> Self {
        let lopt = fixture_lopt();
        let mut splits = vec![Vec::new(); ranks];
        let mut row_lens = Vec::new();
        for p in &case.params {
            if p.shape.is_empty() {
                row_lens.push(1);
                for s in splits.iter_mut() {
                    s.push(None);
                }
                continue;
            }
            row_lens.push(p.shape[1..].iter().product());
            for (r, s) in shards(&common::chunk_sizes(p.shape[0], ranks))
                .into_iter()
                .enumerate()
            {
                splits[r].push(Some(s));
            }
        }
        let models = (0..ranks)
            .map(|r| {
                let params = case
                    .params
                    .iter()
                    .zip(&splits[r])
                    .map(|(p, &s)| {
                        let axes = p.factored_axes.map(|[d0, d1]| FactoredAxes { d0, d1 });
                        ShardedParam::new(&p.name, &Shape::new(p.shape.clone()).unwrap(), axes, s)
                            .unwrap()
                    })
                    .collect();
                ShardedModel::with_engine(&lopt, params, max_grad_norm, nonfinite, engine).unwrap()
            })
            .collect();
        let mut ranks_ = Ranks {
            models,
            local: Vec::new(),
            splits,
            row_lens,
        };
        ranks_.local = (0..ranks).map(|r| ranks_.scatter(r, &case.p0)).collect();
        ranks_
    }

    fn scatter(&self, rank: usize, full: &[Vec<f32>]) -> Vec<Vec<f32>> {
        full.iter()
            .enumerate()
            .map(|(i, t)| match self.splits[rank][i] {
                Some(s) => rows_of(t, s, self.row_lens[i]),
                None => t.clone(),
            })
            .collect()
    }

    fn gather(&self) -> Vec<Vec<f32>> {
        (0..self.row_lens.len())
            .map(|i| match self.splits[0][i] {
                None => self.local[0][i].clone(),
                Some(_) => self.local.iter().flat_map(|l| l[i].clone()).collect(),
            })
            .collect()
    }

    /// One step on every rank; returns each rank's report, or the error of every rank.
    fn step(
        &mut self,
        grads: &[Vec<Vec<f32>>],
        hypers: &[Hyper],
    ) -> Result<Vec<mulo::StepReport>, Vec<String>> {
        let ranks = self.models.len();
        let mut bufs: Vec<Vec<f64>> = (0..ranks)
            .map(|r| {
                let params: Vec<&[f32]> = self.local[r].iter().map(|p| p.as_slice()).collect();
                let g: Vec<Option<&[f32]>> = grads[r].iter().map(|g| Some(g.as_slice())).collect();
                self.models[r].begin(&params, &g, hypers).unwrap()
            })
            .collect();
        let rounds = self.models[0].rounds();
        for _ in 1..rounds {
            let sum = sum_buffers(&bufs);
            let next: Vec<_> = self.models.iter_mut().map(|m| m.advance(&sum)).collect();
            if next.iter().any(|n| n.is_err()) {
                return Err(next
                    .into_iter()
                    .map(|n| n.unwrap_err().to_string())
                    .collect());
            }
            bufs = next.into_iter().map(|n| n.unwrap()).collect();
        }
        let sum = sum_buffers(&bufs);
        Ok((0..ranks)
            .map(|r| {
                let mut views: Vec<&mut [f32]> =
                    self.local[r].iter_mut().map(|p| p.as_mut_slice()).collect();
                self.models[r].finish(&sum, &mut views).unwrap()
            })
            .collect())
    }
}

/// The whole-model golden case (μP CNN trained by PyLO's `MuLO_naive`, clipping at 5, weight
/// decay) sharded over 2 and 3 ranks: every tensor follows PyLO within the golden tolerance and
/// the unsharded optimizer (the interpreter) within 1e-5 of its displacement, at every step,
/// with the stages on the native CPU backend (the default, any thread count) and on the
/// reference evaluator.
#[test]
fn digits_cnn_sharded_over_2_and_3_ranks_equals_the_unsharded_run() {
    let case = ModelCase::digits();
    let lopt = fixture_lopt();
    let hypers: Vec<Hyper> = case
        .params
        .iter()
        .map(|p| Hyper {
            lr: (case.lr as f64 * p.lr_multiplier) as f32,
            weight_decay: case.weight_decay,
        })
        .collect();
    let engines = [
        StageEngine::default(),
        StageEngine::Cpu { threads: 1 },
        StageEngine::Interp,
    ];
    for (ranks, engine) in [2, 3].into_iter().flat_map(|r| engines.map(|e| (r, e))) {
        let mut sharded = Ranks::digits_on(
            &case,
            ranks,
            NonFinitePolicy::Skip,
            Some(case.max_grad_norm),
            engine,
        );
        assert!(sharded.models[0]
            .plans()
            .iter()
            .all(|p| p.engine() == engine));
        let mut opt = MuloOptimizer::new(
            &lopt,
            case.specs(Mup::Multipliers),
            OptimizerOptions {
                max_grad_norm: Some(case.max_grad_norm),
                backend: Arc::new(PerTensor(InterpFactory)),
                ..Default::default()
            },
        )
        .unwrap();
        let mut full = case.p0.clone();
        let last = case.after.last().unwrap();
        let scale: Vec<f64> = case
            .p0
            .iter()
            .zip(last)
            .map(|(a, b)| max_abs_diff(a, b))
            .collect();
        let (mut vs_full, mut vs_pylo) = (vec![0f64; scale.len()], vec![0f64; scale.len()]);
        let mut bitwise = true;
        for (t, grads) in case.grads.iter().enumerate() {
            let mut views: Vec<&mut [f32]> = full.iter_mut().map(|p| p.as_mut_slice()).collect();
            let g: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
            let want = opt
                .step(&mut views, &g, case.lr, case.weight_decay)
                .unwrap();
            let local_grads: Vec<_> = (0..ranks).map(|r| sharded.scatter(r, grads)).collect();
            let reports = sharded.step(&local_grads, &hypers).unwrap();
            for rep in &reports {
                assert!(rep.skipped.is_empty());
                let mut clipped: Vec<_> = rep.clipped.iter().map(|c| c.0.clone()).collect();
                let mut want_clipped: Vec<_> = want.clipped.iter().map(|c| c.0.clone()).collect();
                clipped.sort();
                want_clipped.sort();
                assert_eq!(
                    clipped, want_clipped,
                    "step {t}: the same tensors are clipped"
                );
            }
            let got = sharded.gather();
            for i in 0..scale.len() {
                vs_full[i] = vs_full[i].max(max_abs_diff(&got[i], &full[i]) / scale[i]);
                vs_pylo[i] = vs_pylo[i].max(max_abs_diff(&got[i], &case.after[t][i]) / scale[i]);
                bitwise &= got[i] == full[i];
            }
        }
        eprintln!(
            "{ranks} ranks on {engine:?}: vs unsharded {vs_full:?}, vs PyLO {vs_pylo:?}, bitwise \
             {bitwise}"
        );
        // The reference evaluator is the interpreter's arithmetic on the shard.
        let reference = engine == StageEngine::Interp;
        assert!(
            bitwise || !reference,
            "{ranks} ranks: the reference is bitwise"
        );
        for (i, p) in case.params.iter().enumerate() {
            assert!(
                vs_full[i] <= 1e-5,
                "{ranks} ranks on {engine:?}, `{}`: {:e}",
                p.name,
                vs_full[i]
            );
            assert!(
                vs_pylo[i] <= DEFAULT_TOLERANCE,
                "{ranks} ranks, `{}`: {:e}",
                p.name,
                vs_pylo[i]
            );
        }
        assert_eq!(sharded.models[0].step_count(), case.grads.len() as u64);
    }
}

/// A NaN in one rank's shard of one tensor: every rank skips that tensor (its parameter and
/// state unchanged everywhere), the other tensors step as without it; with the error policy
/// every rank refuses the step and nothing changes; with `zero`, an +Inf that overflows the
/// step on one rank is undone by the guard on every rank.
#[test]
fn a_nonfinite_gradient_on_one_rank_is_decided_the_same_on_every_rank() {
    let case = ModelCase::digits();
    let hypers: Vec<Hyper> = case
        .params
        .iter()
        .map(|p| Hyper {
            lr: (case.lr as f64 * p.lr_multiplier) as f32,
            weight_decay: case.weight_decay,
        })
        .collect();
    let victim = case.params.iter().position(|p| p.shape.len() == 4).unwrap();
    let name = case.params[victim].name.clone();
    let ranks = 3;
    let grads = &case.grads[0];
    let mut poisoned: Vec<_> = (0..ranks)
        .map(|r| Ranks::digits(&case, ranks, NonFinitePolicy::Skip).scatter(r, grads))
        .collect();
    poisoned[2][victim][0] = f32::NAN;

    // Skip: the victim is skipped on every rank; the rest equals a clean run.
    let mut run = Ranks::digits(&case, ranks, NonFinitePolicy::Skip);
    let mut clean = Ranks::digits(&case, ranks, NonFinitePolicy::Skip);
    let reports = run.step(&poisoned, &hypers).unwrap();
    let clean_grads: Vec<_> = (0..ranks).map(|r| clean.scatter(r, grads)).collect();
    clean.step(&clean_grads, &hypers).unwrap();
    for rep in &reports {
        assert_eq!(rep.skipped, std::slice::from_ref(&name));
    }
    let (got, want) = (run.gather(), clean.gather());
    for i in 0..got.len() {
        if i == victim {
            assert_eq!(got[i], case.p0[i], "the skipped tensor is unchanged");
        } else {
            assert_eq!(
                got[i], want[i],
                "`{}` steps as without the NaN",
                case.params[i].name
            );
        }
    }
    for m in &run.models {
        let st = m.state(victim).unwrap();
        assert!(st.iter().all(|(_, v)| v.iter().all(|&x| x == 0.0)));
        assert_eq!(st.step, 1);
    }

    // Error: every rank returns the same error, nothing changed; a clean step then works.
    let mut run = Ranks::digits(&case, ranks, NonFinitePolicy::Error);
    let errors = run.step(&poisoned, &hypers).unwrap_err();
    assert!(
        errors.iter().all(|e| e == &errors[0] && e.contains(&name)),
        "{errors:?}"
    );
    assert_eq!(run.gather(), case.p0);
    assert!(run.models.iter().all(|m| m.step_count() == 0));
    run.step(&clean_grads, &hypers).unwrap();
    assert_eq!(run.gather(), clean.gather());

    // Zero + guard, without clipping (which would scale f32::MAX down): +Inf becomes f32::MAX
    // on one rank, g² overflows there; every rank undoes the tensor.
    let mut inf = poisoned.clone();
    inf[2][victim][0] = f32::INFINITY;
    let mut run = Ranks::digits_clipped(&case, ranks, NonFinitePolicy::Zero, None);
    let reports = run.step(&inf, &hypers).unwrap();
    for rep in &reports {
        assert_eq!(rep.sanitized, std::slice::from_ref(&name));
        assert_eq!(rep.reverted, std::slice::from_ref(&name), "{rep:?}");
    }
    assert_eq!(run.gather()[victim], case.p0[victim]);
}

/// The model's buffers follow the documented contract: round 0 = header (2T values, +T with
/// clipping) [+ every tensor's first-level partials without clipping], then the level
/// rounds, then T guard flags.
#[test]
fn model_rounds_follow_the_contract() {
    let lopt = fixture_lopt();
    let params = vec![
        ShardedParam::new(
            "w",
            &Shape::new(vec![9, 5]).unwrap(),
            None,
            Some(RowShard { offset: 0, rows: 4 }),
        )
        .unwrap(),
        ShardedParam::new(
            "b",
            &Shape::new(vec![37]).unwrap(),
            None,
            Some(RowShard {
                offset: 0,
                rows: 13,
            }),
        )
        .unwrap(),
        ShardedParam::new("gain", &Shape::new(vec![]).unwrap(), None, None).unwrap(),
    ];
    let t = params.len();
    let mut model = ShardedModel::new(&lopt, params, None, NonFinitePolicy::Skip).unwrap();
    let (w, b) = (model.plans()[0].clone(), model.plans()[1].clone());
    assert_eq!(
        (w.rounds(), b.rounds(), model.plans()[2].rounds()),
        (2, 1, 0)
    );
    assert_eq!(model.rounds(), 3);
    assert_eq!(model.round_len(0), 2 * t + w.round_len(0) + b.round_len(0));
    assert_eq!(model.round_len(1), w.round_len(1));
    assert_eq!(model.round_len(2), t);
    model.set_max_grad_norm(Some(1.0)).unwrap();
    assert_eq!(model.rounds(), 4);
    assert_eq!(model.round_len(0), 3 * t);
    assert_eq!(model.round_len(1), w.round_len(0) + b.round_len(0));
    assert_eq!(model.round_len(2), w.round_len(1));
    assert_eq!(model.round_len(3), t);
    // A buffer handed back at the wrong time or of the wrong size is refused.
    let err = model.advance(&[0.0; 3]).unwrap_err();
    assert!(err.to_string().contains("begin"), "{err}");
    let (p0, p1, p2) = (vec![0.1f32; 20], vec![0.1f32; 13], vec![0.5f32]);
    let hyper = Hyper {
        lr: 0.1,
        weight_decay: 0.0,
    };
    let buf = model
        .begin(
            &[&p0, &p1, &p2],
            &[Some(&p0), Some(&p1), Some(&p2)],
            &[hyper; 3],
        )
        .unwrap();
    assert_eq!(buf.len(), model.round_len(0));
    let err = model.advance(&buf[1..]).unwrap_err();
    assert!(err.to_string().contains("round 0"), "{err}");
}
