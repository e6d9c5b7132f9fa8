//! The **staged** packed CUDA program (one rank's shards of a model split by rows of axis 0,
//! [`PackedModel::staged`]), executed on the CPU: the generated `mulo_model.cu` compiled
//! unchanged by g++ with the emulation layer of `tests/common/emulation.rs`, one program per
//! rank, driven stage by stage with the rounds' buffers added across the ranks in between, as
//! an all-reduce would.
//!
//! Checks that every tensor's sharded step is bitwise its unsharded step on the interpreter
//! (parameters and state), for 2 and 3 uneven shards (some empty), every kind of tensor (the
//! sharded axis d0, d1 or neither; replicated 0-d tensors), with the small kernels chunked and
//! spread; and that each rank's round buffers hold what the CPU's staged step
//! ([`StagedPlan`]) gives, in its order (the documented contract).
//!
//! Not checked here: anything GPU-specific, and NCCL. Skipped, with the reason printed,
//! without g++.

mod common;

use common::emulation::gxx_or_skip;
use common::packed_program::{reloc, EmulatedProgram};
use common::Rng;
use mulo::backend::cuda::packed::{ArenaBases, PackedModel, ARENAS, MAX_ROUNDS};
use mulo::backend::interp::InterpStepper;
use mulo::backend::Hyper;
use mulo::ir::Buffer;
use mulo::lopt::LearnedOptimizer;
use mulo::shard::{RowShard, StagedPlan};
use mulo::state::TensorState;
use mulo::{compile_layout, FactoredAxes, Layout, Shape, TensorStepper};
use proptest::prelude::*;
use std::sync::Arc;

/// Regions of a rank's program: the 7 arenas, scratch, partials, then the round buffers.
const SCRATCH: usize = 7;
const PARTIALS: usize = 8;
const ROUND0: usize = 9;

fn layout(dims: &[usize], axes: Option<(usize, usize)>) -> Layout {
    Layout::with_axes(
        Shape::new(dims.to_vec()).unwrap(),
        axes.map(|(d0, d1)| FactoredAxes { d0, d1 }),
    )
    .unwrap()
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn f64s(bytes: &[u8]) -> Vec<f64> {
    bytes
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// One rank: its staged program, emulated, on its regions.
struct Rank {
    model: PackedModel,
    program: EmulatedProgram,
    regions: Vec<Vec<u8>>,
    shards: Vec<Option<RowShard>>,
}

impl Rank {
    fn new(
        lopt: &LearnedOptimizer,
        layouts: &[Layout],
        ranks: usize,
        r: usize,
        tuning: Option<(usize, usize)>,
    ) -> Self {
        let shards: Vec<Option<RowShard>> = layouts
            .iter()
            .map(|l| common::chunk_shard(l, ranks, r))
            .collect();
        let tensors: Vec<(Layout, Option<usize>)> = layouts
            .iter()
            .zip(&shards)
            .map(|(l, s)| (l.clone(), s.map(|s| s.rows)))
            .collect();
        let model = PackedModel::staged_with(lopt, &tensors, tuning).unwrap();
        let mut regions: Vec<Vec<u8>> = ARENAS
            .iter()
            .map(|b| vec![0u8; 4 * model.arena_len[b]])
            .collect();
        regions.push(vec![0u8; 4 * model.scratch_len]);
        regions.push(vec![0u8; 8 * model.partials_len]);
        for r in 0..MAX_ROUNDS {
            regions.push(vec![0u8; 8 * model.round_len.get(r).copied().unwrap_or(0)]);
        }
        Rank {
            program: EmulatedProgram::new(&model),
            model,
            regions,
            shards,
        }
    }

    fn write(&mut self, t: usize, buffer: Buffer, values: &[f32]) {
        let arena = ARENAS.iter().position(|&b| b == buffer).unwrap();
        let key = if buffer == Buffer::Grad {
            Buffer::Param
        } else {
            buffer
        };
        let at = 4 * self.model.tensors[t].offsets[&key];
        let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.regions[arena][at..at + bytes.len()].copy_from_slice(&bytes);
    }

    fn read(&self, t: usize, buffer: Buffer) -> Vec<f32> {
        let arena = ARENAS.iter().position(|&b| b == buffer).unwrap();
        let at = 4 * self.model.tensors[t].offsets[&buffer];
        let len = self.model.buffer_len(t, buffer);
        f32s(&self.regions[arena][at..at + 4 * len])
    }

    /// Runs stage `stage` of a step of the tensors with `steps[t]` (hyper-parameters and
    /// step counter; `None`: left out of this step).
    /// Scratch, partials and round buffers are poisoned before stage 0 (what a step finds in
    /// them is not its own).
    fn run_stage(&mut self, stage: usize, steps: &[Option<(Hyper, u64)>]) {
        if stage == 0 {
            for r in &mut self.regions[SCRATCH..] {
                r.fill(common::emulation::POISON);
            }
        }
        let bases = ArenaBases {
            arenas: std::array::from_fn(|k| reloc(k, 0)),
            scratch: reloc(SCRATCH, 0),
            partials: reloc(PARTIALS, 0),
            rounds: std::array::from_fn(|r| reloc(ROUND0 + r, 0)),
        };
        let table = self.model.table(&self.model.arena_addrs(&bases), steps);
        let active: Vec<bool> = steps.iter().map(Option::is_some).collect();
        let starts = self.model.block_starts(&active);
        let grids = self.model.grids(&starts).unwrap();
        self.model.check_launch(&starts, &grids).unwrap();
        let slots = self.model.stage_slots(stage);
        self.program
            .run_slots(&mut self.regions, &table, &starts, slots);
    }

    fn round(&self, r: usize) -> Vec<f64> {
        f64s(&self.regions[ROUND0 + r])
    }

    fn set_round(&mut self, r: usize, sums: &[f64]) {
        self.regions[ROUND0 + r] = sums.iter().flat_map(|x| x.to_le_bytes()).collect();
    }
}

/// Steps `layouts` for 3 steps as `ranks` row shards on the emulated staged program and on the
/// interpreter unsharded; asserts every parameter and state buffer bitwise equal, and the
/// round buffers of the first step equal the CPU staged step's. Tensor `t` is left out of
/// step `s` on every rank for each `(s, t)` of `skip` (as a host skips a non-finite gradient):
/// it must stay as it was, and the others be stepped as ever.
fn assert_staged_program_is_the_unsharded_step(
    layouts: &[Layout],
    ranks: usize,
    tuning: Option<(usize, usize)>,
    seed: u64,
    skip: &[(u64, usize)],
) {
    let lopt = common::fixture_lopt();
    let irs: Vec<_> = layouts
        .iter()
        .map(|l| Arc::new(compile_layout(l, &lopt).unwrap()))
        .collect();
    let mut rng = Rng(seed);
    let mut ranks_: Vec<Rank> = (0..ranks)
        .map(|r| Rank::new(&lopt, layouts, ranks, r, tuning))
        .collect();
    let stages = ranks_[0].model.stages();
    for rank in &ranks_ {
        assert_eq!(
            rank.model.stages(),
            stages,
            "every rank runs the same stages"
        );
    }
    let mut whole: Vec<Vec<f32>> = layouts
        .iter()
        .map(|l| (0..l.numel()).map(|_| rng.next_f32() * 0.5).collect())
        .collect();
    let mut interp: Vec<InterpStepper> = irs
        .iter()
        .map(|ir| InterpStepper::new(ir.clone(), 0))
        .collect();
    // The reference stages of the CPU (the contract of the round buffers).
    let reference: Vec<Vec<Option<Reference>>> = (0..ranks)
        .map(|r| {
            irs.iter()
                .zip(layouts)
                .map(|(ir, l)| {
                    let s = common::chunk_shard(l, ranks, r)?;
                    let plan = Arc::new(StagedPlan::new(ir.clone(), Some(s)).unwrap());
                    let st = TensorState::zeros(plan.local_layout(), 0);
                    Some((plan, st))
                })
                .collect()
        })
        .collect();
    for (t, p) in whole.iter().enumerate() {
        for rank in &mut ranks_ {
            let part = common::local_part(&layouts[t], Buffer::Param, rank.shards[t], p);
            rank.write(t, Buffer::Param, &part);
        }
    }
    let mut taken = vec![0u64; layouts.len()];
    for step in 0..3u64 {
        let grads: Vec<Vec<f32>> = layouts.iter().map(|l| rng.gradient(l.numel())).collect();
        let hypers: Vec<Hyper> = (0..layouts.len())
            .map(|t| Hyper {
                lr: 0.05 + 0.01 * t as f32,
                weight_decay: if (t + step as usize).is_multiple_of(2) {
                    0.0
                } else {
                    1e-2
                },
            })
            .collect();
        for (t, g) in grads.iter().enumerate() {
            for rank in &mut ranks_ {
                let part = common::local_part(&layouts[t], Buffer::Grad, rank.shards[t], g);
                rank.write(t, Buffer::Grad, &part);
            }
        }
        // The CPU reference's round 0 of the first step, per rank and tensor.
        let want_round0: Vec<Vec<Vec<f64>>> = (0..ranks)
            .filter(|_| step == 0)
            .map(|r| {
                (0..layouts.len())
                    .map(|t| match &reference[r][t] {
                        Some((plan, st)) if plan.rounds() > 0 => {
                            let s = rank_shard(&ranks_[r], t);
                            let row = layouts[t].numel() / layouts[t].dims()[0];
                            let p =
                                common::local_part(&layouts[t], Buffer::Param, Some(s), &whole[t]);
                            let g = grads[t][s.offset * row..(s.offset + s.rows) * row].to_vec();
                            plan.begin(&p, &g, st, hypers[t])
                                .unwrap()
                                .partials()
                                .to_vec()
                        }
                        _ => Vec::new(),
                    })
                    .collect()
            })
            .collect();
        let steps: Vec<Option<(Hyper, u64)>> = (0..layouts.len())
            .map(|t| (!skip.contains(&(step, t))).then(|| (hypers[t], taken[t])))
            .collect();
        for stage in 0..stages {
            for rank in &mut ranks_ {
                rank.run_stage(stage, &steps);
            }
            if stage + 1 == stages {
                break;
            }
            if stage == 0 && step == 0 {
                for (r, rank) in ranks_.iter().enumerate() {
                    let got = rank.round(0);
                    for (t, want) in want_round0[r].iter().enumerate() {
                        let Some(&at) = rank.model.tensors[t].rounds.first() else {
                            assert!(want.is_empty());
                            continue;
                        };
                        for (i, (a, b)) in got[at..at + want.len()].iter().zip(want).enumerate() {
                            let tol = 1e-12 * b.abs().max(1e-30);
                            assert!(
                                (a - b).abs() <= tol,
                                "{} rank {r} round 0 value {i}: {a:e}, the CPU stages give {b:e}",
                                layouts[t]
                            );
                        }
                    }
                }
            }
            let mut sums = vec![0f64; ranks_[0].model.round_len[stage]];
            for rank in &ranks_ {
                let b = rank.round(stage);
                assert_eq!(
                    b.len(),
                    sums.len(),
                    "every rank's round buffer has one size"
                );
                for (s, x) in sums.iter_mut().zip(b) {
                    *s += x;
                }
            }
            for rank in &mut ranks_ {
                rank.set_round(stage, &sums);
            }
        }
        for (t, stepper) in interp.iter_mut().enumerate() {
            if steps[t].is_some() {
                stepper.step(&mut whole[t], &grads[t], hypers[t]).unwrap();
                taken[t] += 1;
            }
            for (r, rank) in ranks_.iter().enumerate() {
                let want =
                    common::local_part(&layouts[t], Buffer::Param, rank.shards[t], &whole[t]);
                let got = rank.read(t, Buffer::Param);
                let same = got.len() == want.len()
                    && got
                        .iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "{} rank {r} step {step}: the sharded parameter differs from the unsharded step ({:e})",
                    layouts[t],
                    mulo::trajectory::max_abs_diff(&got, &want)
                );
                let state = stepper.state().unwrap();
                for (b, values) in state.iter() {
                    let want = common::local_part(&layouts[t], b, rank.shards[t], values);
                    let got = rank.read(t, b);
                    assert!(
                        got.iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits())
                            && got.len() == want.len(),
                        "{} rank {r} step {step}: state `{b}` differs",
                        layouts[t]
                    );
                }
            }
        }
    }
}

/// A tensor shard's staged step on the CPU, and its state.
type Reference = (Arc<StagedPlan>, TensorState);

fn rank_shard(rank: &Rank, t: usize) -> RowShard {
    rank.shards[t].expect("a sharded tensor")
}

/// Every kind of tensor in one model, on 2 and 3 ranks: rows split unevenly (an empty shard
/// for the 2- and 1-row tensors), the sharded axis d0, d1 or neither of the factored axes, a
/// 0-d tensor replicated.
fn mixed_model() -> Vec<Layout> {
    vec![
        layout(&[9, 5], None),
        layout(&[5, 12], None),
        layout(&[7, 4, 3], None),
        layout(&[6, 6, 3, 3], Some((0, 1))),
        layout(&[6, 6, 3, 3], Some((1, 0))),
        layout(&[1, 30], None),
        layout(&[37], None),
        layout(&[2], None),
        layout(&[], None),
    ]
}

#[test]
fn staged_program_on_two_ranks_is_the_unsharded_step() {
    if !gxx_or_skip("staged_program_on_two_ranks_is_the_unsharded_step") {
        return;
    }
    // The first 6x6x3x3 and the vector are left out of the second step.
    assert_staged_program_is_the_unsharded_step(&mixed_model(), 2, None, 11, &[(1, 3), (1, 6)]);
}

#[test]
fn staged_program_on_three_ranks_is_the_unsharded_step() {
    if !gxx_or_skip("staged_program_on_three_ranks_is_the_unsharded_step") {
        return;
    }
    assert_staged_program_is_the_unsharded_step(&mixed_model(), 3, None, 12, &[]);
}

/// The chunked means (two-level sums) and multi-block small kernels of big tensors, forced on
/// small ones: round-out kernels then sum chunk sums.
#[test]
fn staged_program_with_chunked_and_spread_small_kernels() {
    if !gxx_or_skip("staged_program_with_chunked_and_spread_small_kernels") {
        return;
    }
    let layouts = vec![
        layout(&[40, 30], None),
        layout(&[12, 6, 3, 3], Some((0, 1))),
        layout(&[50], None),
    ];
    assert_staged_program_is_the_unsharded_step(&layouts, 2, Some((0, 4)), 13, &[]);
}

proptest! {
    // Each case compiles one program per rank with g++: few cases, every kind of shard among
    // them over the runs.
    #![proptest_config(ProptestConfig { cases: 4, ..ProptestConfig::default() })]

    /// Random models (1 to 3 tensors of rank 0 to 4, dimensions of 1, any valid choice of
    /// factored axes when the largest axes tie) on 2 to 4 ranks (torch.chunk's split: uneven,
    /// often empty shards): three steps of the emulated staged programs are bitwise the
    /// unsharded interpreter's, parameters and state.
    #[test]
    fn staged_programs_match_the_interpreter_on_random_models(
        shapes in proptest::collection::vec((common::random_shapes(200, 24, 6), any::<usize>()), 1..=3),
        ranks in 2usize..=4,
        seed in any::<u64>(),
    ) {
        if !gxx_or_skip("staged_programs_match_the_interpreter_on_random_models") {
            return Ok(());
        }
        let layouts: Vec<Layout> = shapes
            .into_iter()
            .map(|(dims, pick)| common::layout_with_axes_pick(dims, pick))
            .collect();
        eprintln!("{ranks} ranks: {}", layouts.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(", "));
        assert_staged_program_is_the_unsharded_step(&layouts, ranks, None, seed, &[]);
    }
}
