//! A whole model's step as one CUDA program: every tensor's buffers packed into shared
//! arenas, and each pass of SPEC.md §5 one launch over all tensors, whatever their number.
//!
//! Nothing here re-derives the math or the schedule: each distinct shape is compiled to its
//! [`StepIr`] and [`Schedule`] exactly as for a single tensor, and its kernels are rendered
//! unchanged as device functions ([`Form::Device`]). What this module adds is the packing:
//!
//! - **Plans**: one per distinct shape, in order of first appearance.
//! - **Slots**: the launches of a model step. Plans have different numbers of passes
//!   (factored tensors 3 element passes, unfactored 2), so each plan's kernels are aligned on
//!   the last one (every plan's update pass is the last launch); slot `k` holds, per plan, the
//!   kernel of that plan at the slot's level and kind, if any.
//! - **Arenas**: one per buffer kind (`param`, `grad`, `mom`, `rms`, `fac_row`, `fac_col`,
//!   `fac_v`) plus the two scratch arenas; every tensor has its own slice of each arena its
//!   plan uses.
//! - **The table** ([`TABLE_ENTRY_BYTES`] per tensor: the `MuloTensor` of
//!   `templates/model_prelude.cu.j2`) and the **block starts** (per slot, the first block of
//!   every tensor): the only things the host writes per step besides parameters and gradients.
//!   A table entry holds the *addresses* of the tensor's buffers ([`TensorAddrs`]), so the
//!   program steps tensors wherever they live: in the arenas ([`PackedModel::arena_addrs`])
//!   or in the caller's own allocations (PyTorch's tensors: [`PackedModel::external_addrs`]).
//!
//! The table and starts are computed here, without a GPU, so that the CUDA runtime and the
//! CPU emulation of the generated source in the tests share them.

use super::render::{matrix_constants, render_kernels, render_template, Form};
use super::schedule::{grid_dim, KernelKind, Schedule, BLOCK_THREADS};
use crate::backend::Hyper;
use crate::error::{Error, Result};
use crate::ir::{Buffer, StepIr};
use crate::lopt::LearnedOptimizer;
use crate::shape::Layout;
use minijinja::context;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Bytes of one `MuloTensor` entry of the table: 9 × 64-bit addresses, 3 × f32, 1 × i32,
/// then the [`MAX_ROUNDS`] round-buffer addresses of a staged program.
pub const TABLE_ENTRY_BYTES: usize = 88 + 8 * MAX_ROUNDS;

/// The most rounds (combines of partial sums across shards) a staged plan may have: μLO's
/// step has at most 2 ([`crate::plan::StagePlan`]).
pub const MAX_ROUNDS: usize = 2;

/// Byte offset of the round-buffer addresses in a table entry.
const ROUNDS_AT: usize = 88;

/// Byte offset of the step's scalars (`lr`, `weight_decay`, `step`) in a table entry.
const SCALARS_AT: usize = 72;

/// The arenas of a packed model (one per buffer kind). `grad` shares `param`'s offsets.
pub const ARENAS: [Buffer; 7] = Buffer::ALL;

/// Where one tensor's buffers are, as its table entry holds them: the address of the first
/// value of each (a device address on a GPU), 0 for a buffer its plan does not have.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TensorAddrs {
    /// The parameter (f32, `numel` values), read and written.
    pub param: u64,
    /// The gradient (f32, `numel` values), read only.
    pub grad: u64,
    /// The optimizer state, by [`Buffer`]: `mom`, `rms`, `fac_row`, `fac_col`, `fac_v` (f32,
    /// decay-major, [`Buffer::len`] values each), read and written.
    pub state: [u64; 5],
    /// The tensor's f32 scratch ([`Schedule::scratch_len`] values of its plan).
    pub scratch: u64,
    /// The tensor's f64 partial sums ([`Schedule::partials_len`] values of its plan).
    pub partials: u64,
    /// Staged programs: the tensor's slice of each round's buffer (f64,
    /// [`Schedule::round_len`] values of its plan; 0 past its rounds).
    pub rounds: [u64; MAX_ROUNDS],
}

impl TensorAddrs {
    /// The index of a state buffer in [`state`](Self::state); `None` for `param` and `grad`.
    pub fn state_index(buffer: Buffer) -> Option<usize> {
        ARENAS[2..].iter().position(|&b| b == buffer)
    }

    /// The address of `buffer`.
    pub fn get(&self, buffer: Buffer) -> u64 {
        match buffer {
            Buffer::Param => self.param,
            Buffer::Grad => self.grad,
            b => self.state[Self::state_index(b).expect("a state buffer")],
        }
    }

    /// Sets the address of `buffer`.
    pub fn set(&mut self, buffer: Buffer, addr: u64) {
        match buffer {
            Buffer::Param => self.param = addr,
            Buffer::Grad => self.grad = addr,
            b => self.state[Self::state_index(b).expect("a state buffer")] = addr,
        }
    }

    /// The table's address fields in entry order.
    fn fields(&self) -> [u64; 9] {
        let [mom, rms, fac_row, fac_col, fac_v] = self.state;
        [
            self.param,
            self.grad,
            mom,
            rms,
            fac_row,
            fac_col,
            fac_v,
            self.scratch,
            self.partials,
        ]
    }
}

/// The base addresses of a packed model's arenas: one per [`ARENAS`] buffer, in that order,
/// then the f32 scratch and the f64 partials.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArenaBases {
    /// Base of each arena of [`ARENAS`], in order.
    pub arenas: [u64; 7],
    /// Base of the scratch arena (f32).
    pub scratch: u64,
    /// Base of the partials arena (f64).
    pub partials: u64,
    /// Staged programs: base of each round's buffer (f64, [`PackedModel::round_len`] values);
    /// 0 for the rounds a program does not have.
    pub rounds: [u64; MAX_ROUNDS],
}

/// One compiled shape of the model.
#[derive(Clone, Debug)]
pub struct ModelPlan {
    /// The step program of the shape.
    pub ir: Arc<StepIr>,
    /// Its kernels.
    pub schedule: Schedule,
    /// Levels its kernels are moved by to end on the model's last level (0 in a staged
    /// model, which aligns plans by stage).
    pub shift: u32,
    /// Staged models: the rows of axis 0 the tensors of this plan hold (its `ir` has that
    /// layout; its schedule is [`schedule_staged`](super::schedule::schedule_staged)), `None`
    /// for a tensor stepped whole.
    pub local_rows: Option<usize>,
}

impl ModelPlan {
    /// Blocks the plan's kernel `k` runs on.
    pub fn blocks(&self, k: usize) -> usize {
        match self.schedule.kernels[k].kind {
            KernelKind::Elem { .. } => self.schedule.tiling.blocks(),
            KernelKind::Small { blocks, .. } => blocks,
        }
    }
}

/// Where one tensor lives in the arenas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedTensor {
    /// Its plan.
    pub plan: usize,
    /// Number of elements.
    pub numel: usize,
    /// Offset of its slice in each arena its plan uses (`param` also indexes `grad`).
    pub offsets: BTreeMap<Buffer, usize>,
    /// Offset of its f32 scratch.
    pub scratch: usize,
    /// Offset of its f64 partial sums.
    pub partials: usize,
    /// Staged models: offset of its sums in the buffer of each of its plan's rounds.
    pub rounds: Vec<usize>,
}

/// What one model step uploads and launches: the table, the block starts and every slot's
/// grid (0: the slot is skipped).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    /// The table ([`TABLE_ENTRY_BYTES`] per tensor).
    pub table: Vec<u8>,
    /// The block starts ([`PackedModel::block_starts`]).
    pub starts: Vec<i64>,
    /// The grid of every slot.
    pub grids: Vec<u32>,
}

/// One launch of a model step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    /// Entry name in the PTX.
    pub name: String,
    /// `small` (small-domain work of every tensor) or `elem` (a pass over every tensor's elements).
    pub kind: &'static str,
    /// The stage it belongs to (0 in a model that is not staged).
    pub stage: u32,
    /// For every plan, the index of its kernel run by this launch, if any.
    pub kernels: Vec<Option<usize>>,
}

/// A model's packed step: plans, tensors, launches and arena sizes.
#[derive(Clone, Debug)]
pub struct PackedModel {
    /// Distinct layouts (shape and factored axes), in order of first appearance.
    pub plans: Vec<ModelPlan>,
    /// The tensors, in the order given.
    pub tensors: Vec<PackedTensor>,
    /// The launches of a step, in order.
    pub slots: Vec<Slot>,
    /// Length of every arena (f32 values; `grad` as `param`).
    pub arena_len: BTreeMap<Buffer, usize>,
    /// f32 values of the scratch arena.
    pub scratch_len: usize,
    /// f64 values of the partials arena.
    pub partials_len: usize,
    /// Staged models: f64 values of each round's buffer (every tensor with that many rounds,
    /// in tensor order). Empty otherwise.
    pub round_len: Vec<usize>,
    /// Fingerprint of the learned optimizer.
    pub lopt_fingerprint: String,
}

impl PackedModel {
    /// Compiles `lopt` once per distinct layout of `layouts` and packs the tensors.
    pub fn new(lopt: &LearnedOptimizer, layouts: &[Layout]) -> Result<Self> {
        let mut cache = crate::backend::PlanCache::new();
        let irs = layouts
            .iter()
            .map(|l| cache.get(lopt, l))
            .collect::<Result<Vec<_>>>()?;
        Self::from_plans(&irs, &lopt.fingerprint())
    }

    /// Packs tensors stepped by `irs` (one per tensor; tensors of one layout share a plan).
    pub fn from_plans(irs: &[Arc<StepIr>], lopt_fingerprint: &str) -> Result<Self> {
        let tensors: Vec<(Arc<StepIr>, Option<usize>)> =
            irs.iter().map(|ir| (ir.clone(), None)).collect();
        Self::pack(&tensors, lopt_fingerprint, None)
    }

    /// Compiles the **staged** step of a model whose tensors are split by rows of axis 0 over
    /// several ranks (FSDP's `Shard(0)`): one rank's program. `tensors[i]` is tensor `i`'s
    /// whole layout and the rows of axis 0 this rank holds (`None`: the tensor is stepped
    /// whole, as a replicated 0-d tensor; its one stage is stage 0). Each sharded tensor is
    /// stepped by the [`StagePlan`](crate::plan::StagePlan) of its whole program, rendered on
    /// its rows ([`schedule_staged`](super::schedule::schedule_staged)); tensors of one layout
    /// and row count share a plan.
    ///
    /// A step is [`stages`](Self::stages) stages, each the launches of
    /// [`stage_slots`](Self::stage_slots). Stage `r` (before the last) leaves this rank's
    /// partial sums of round `r` in that round's buffer ([`round_len`](Self::round_len) f64
    /// values; per tensor with more than `r` rounds, in tensor order, its
    /// [`StagedPlan::round_contents`](crate::shard::StagedPlan::round_contents)); the host
    /// replaces them by their sum over every rank (an all-reduce, in place) before stage
    /// `r + 1`, which reads them. The last stage writes parameters and state. The buffers
    /// have the layout of [`ShardedModel`](crate::shard::ShardedModel)'s level rounds.
    pub fn staged(lopt: &LearnedOptimizer, tensors: &[(Layout, Option<usize>)]) -> Result<Self> {
        Self::staged_with(lopt, tensors, None)
    }

    /// [`staged`](Self::staged) with the sharded tensors' schedules made by
    /// [`schedule_staged_with`](super::schedule::schedule_staged_with)`(chunk_threshold,
    /// spread)` when `tuning` is given (the emulation tests force chunked and spread small
    /// kernels on small tensors).
    pub fn staged_with(
        lopt: &LearnedOptimizer,
        tensors: &[(Layout, Option<usize>)],
        tuning: Option<(usize, usize)>,
    ) -> Result<Self> {
        let mut cache = crate::backend::PlanCache::new();
        let items = tensors
            .iter()
            .enumerate()
            .map(|(i, (layout, rows))| {
                if let Some(rows) = rows {
                    layout
                        .check_local_rows(*rows)
                        .map_err(|e| Error::argument(format!("tensor {i}"), e))?;
                }
                Ok((cache.get(lopt, layout)?, *rows))
            })
            .collect::<Result<Vec<_>>>()?;
        Self::pack(&items, &lopt.fingerprint(), Some(tuning))
    }

    /// Packs `tensors` (whole programs, with the local rows of staged ones).
    /// `staged`: `Some(tuning)` for a staged model (see [`staged_with`](Self::staged_with)).
    fn pack(
        tensors: &[(Arc<StepIr>, Option<usize>)],
        lopt_fingerprint: &str,
        staged: Option<Option<(usize, usize)>>,
    ) -> Result<Self> {
        let mut plans: Vec<ModelPlan> = Vec::new();
        let mut plan_of: HashMap<(Layout, Option<usize>), usize> = HashMap::new();
        let mut tensor_plan = Vec::with_capacity(tensors.len());
        for (ir, rows) in tensors {
            if ir.lopt_fingerprint != lopt_fingerprint {
                return Err(Error::argument(
                    "plans",
                    "every tensor's program must come from the same learned optimizer",
                ));
            }
            let p = *plan_of
                .entry((ir.layout.clone(), *rows))
                .or_insert_with(|| {
                    plans.push(match rows {
                        Some(rows) => {
                            let local = Arc::new(StepIr {
                                layout: ir.layout.with_local_rows(*rows),
                                nodes: ir.nodes.clone(),
                                matrices: ir.matrices.clone(),
                                lopt_fingerprint: ir.lopt_fingerprint.clone(),
                            });
                            ModelPlan {
                                schedule: match staged.flatten() {
                                    Some((chunk, spread)) => super::schedule::schedule_staged_with(
                                        ir, &local, chunk, spread,
                                    ),
                                    None => super::schedule::schedule_staged(ir, &local),
                                },
                                ir: local,
                                shift: 0,
                                local_rows: Some(*rows),
                            }
                        }
                        None => ModelPlan {
                            ir: ir.clone(),
                            schedule: super::schedule::schedule(ir),
                            shift: 0,
                            local_rows: None,
                        },
                    });
                    plans.len() - 1
                });
            tensor_plan.push(p);
        }
        if let Some(p) = plans.iter().find(|p| p.schedule.rounds() > MAX_ROUNDS) {
            return Err(Error::argument(
                "tensors",
                format!(
                    "a {} shard needs {} rounds; a packed program supports {MAX_ROUNDS}",
                    p.ir.layout.shape(),
                    p.schedule.rounds()
                ),
            ));
        }
        if staged.is_none() {
            let top = plans
                .iter()
                .filter_map(|p| p.schedule.kernels.last().map(|k| k.level))
                .max()
                .unwrap_or(0);
            for p in &mut plans {
                p.shift = top - p.schedule.kernels.last().map_or(top, |k| k.level);
            }
        }
        let slots = Self::slots(&plans, staged.is_some());

        let mut arena_len: BTreeMap<Buffer, usize> = ARENAS.iter().map(|&b| (b, 0)).collect();
        let (mut scratch_len, mut partials_len) = (0usize, 0usize);
        let rounds = plans.iter().map(|p| p.schedule.rounds()).max().unwrap_or(0);
        let mut round_len = vec![0usize; rounds];
        let tensors = tensor_plan
            .iter()
            .map(|&p| {
                let plan = &plans[p];
                let layout = &plan.ir.layout;
                let mut offsets = BTreeMap::new();
                for b in Buffer::for_layout(layout) {
                    if b == Buffer::Grad {
                        continue;
                    }
                    let len = arena_len.get_mut(&b).expect("every buffer has an arena");
                    offsets.insert(b, *len);
                    *len += b.len(layout);
                }
                let t = PackedTensor {
                    plan: p,
                    numel: layout.numel(),
                    offsets,
                    scratch: scratch_len,
                    partials: partials_len,
                    rounds: plan
                        .schedule
                        .round_len
                        .iter()
                        .zip(&mut round_len)
                        .map(|(&len, total)| {
                            let at = *total;
                            *total += len;
                            at
                        })
                        .collect(),
                };
                scratch_len += plan.schedule.scratch_len;
                partials_len += plan.schedule.partials_len;
                t
            })
            .collect();
        arena_len.insert(Buffer::Grad, arena_len[&Buffer::Param]);
        Ok(PackedModel {
            plans,
            tensors,
            slots,
            arena_len,
            scratch_len,
            partials_len,
            round_len,
            lopt_fingerprint: lopt_fingerprint.to_string(),
        })
    }

    /// The launches: stage by stage, level by level, the small kernels of every phase then
    /// the pass; a slot for every combination some plan has a kernel for. Each plan's kernels
    /// keep their order.
    fn slots(plans: &[ModelPlan], staged: bool) -> Vec<Slot> {
        let mut slots = Vec::new();
        // A stage may be several small kernels (phases): slot by level, then phase.
        let phases = plans
            .iter()
            .flat_map(|p| p.schedule.kernels.iter().map(|k| k.phase + 1))
            .max()
            .unwrap_or(1);
        let stages = plans
            .iter()
            .flat_map(|p| p.schedule.kernels.iter().map(|k| k.stage + 1))
            .max()
            .unwrap_or(1);
        for stage in 0..stages {
            let top = plans
                .iter()
                .flat_map(|p| {
                    p.schedule
                        .kernels
                        .iter()
                        .filter(|k| k.stage == stage)
                        .map(|k| k.level + p.shift)
                })
                .max()
                .unwrap_or(0);
            for level in 0..=top {
                let launches = (0..phases)
                    .map(|q| ("small", q))
                    .chain(std::iter::once(("elem", 0)));
                for (kind, phase) in launches {
                    let kernels: Vec<Option<usize>> = plans
                        .iter()
                        .map(|p| {
                            p.schedule.kernels.iter().position(|k| {
                                k.stage == stage
                                    && k.level + p.shift == level
                                    && k.phase == phase
                                    && matches!(
                                        (&k.kind, kind),
                                        (KernelKind::Small { .. }, "small")
                                            | (KernelKind::Elem { .. }, "elem")
                                    )
                            })
                        })
                        .collect();
                    if kernels.iter().any(Option::is_some) {
                        let n = slots.len();
                        let pre = if staged {
                            format!("mulo_model_{n}_s{stage}")
                        } else {
                            format!("mulo_model_{n}")
                        };
                        let name = if kind == "small" {
                            format!("{pre}_small_{level}_{phase}")
                        } else {
                            format!("{pre}_elem_{level}")
                        };
                        slots.push(Slot {
                            name,
                            kind,
                            stage,
                            kernels,
                        });
                    }
                }
            }
        }
        slots
    }

    /// Number of stages of a step: 1 + the most rounds of any plan (1 when not staged).
    pub fn stages(&self) -> usize {
        self.round_len.len() + 1
    }

    /// The slots stage `stage` launches, in order.
    pub fn stage_slots(&self, stage: usize) -> std::ops::Range<usize> {
        let first = self
            .slots
            .iter()
            .position(|s| s.stage as usize >= stage)
            .unwrap_or(self.slots.len());
        let end = self
            .slots
            .iter()
            .position(|s| s.stage as usize > stage)
            .unwrap_or(self.slots.len());
        first..end
    }

    /// The offset of tensor `index` in the `param` and `grad` arenas.
    pub fn param_offset(&self, index: usize) -> usize {
        self.tensors[index].offsets[&Buffer::Param]
    }

    /// Blocks tensor `index` runs on in slot `slot`.
    pub fn blocks(&self, index: usize, slot: usize) -> usize {
        let t = &self.tensors[index];
        self.slots[slot].kernels[t.plan].map_or(0, |k| self.plans[t.plan].blocks(k))
    }

    /// The block starts of a step in which the tensors with `active[t]` are stepped: for
    /// every slot, `n + 1` values (the first block of each tensor, then the grid size).
    pub fn block_starts(&self, active: &[bool]) -> Vec<i64> {
        let n = self.tensors.len();
        let mut starts = Vec::with_capacity(self.slots.len() * (n + 1));
        for slot in 0..self.slots.len() {
            let mut next = 0i64;
            for (t, &on) in active.iter().enumerate().take(n) {
                starts.push(next);
                if on {
                    next += self.blocks(t, slot) as i64;
                }
            }
            starts.push(next);
        }
        starts
    }

    /// The grid (blocks) of every slot, from [`block_starts`](Self::block_starts); an error
    /// when a slot needs more blocks than a CUDA grid can have.
    pub fn grids(&self, starts: &[i64]) -> Result<Vec<u32>> {
        let n = self.tensors.len();
        (0..self.slots.len())
            .map(|s| {
                let total = starts.get(s * (n + 1) + n).copied().unwrap_or(-1);
                let blocks = usize::try_from(total).map_err(|_| {
                    Error::argument("starts", format!("slot {s} has a negative block count"))
                })?;
                grid_dim(blocks, &format!("launch {}", self.slots[s].name))
            })
            .collect()
    }

    /// Checks that a step's `starts` and `grids` are ones this model produces
    /// ([`block_starts`](Self::block_starts), [`grids`](Self::grids)) up to which tensors are
    /// stepped: every tensor given 0 or all of its blocks in a slot, every grid the slot's
    /// total. Whatever a caller passes, a launch that passes this check runs every stepped
    /// tensor's kernels on exactly the blocks they were scheduled for, so with a table of
    /// [`arena_addrs`](Self::arena_addrs) or [`external_addrs`](Self::external_addrs) it stays
    /// inside each tensor's buffers.
    pub fn check_launch(&self, starts: &[i64], grids: &[u32]) -> Result<()> {
        let n = self.tensors.len();
        let bad = |what: &str, why: String| Err(Error::argument(what, why));
        if starts.len() != self.slots.len() * (n + 1) {
            return bad(
                "starts",
                format!(
                    "{} values for {} slots of {} tensors",
                    starts.len(),
                    self.slots.len(),
                    n
                ),
            );
        }
        if grids.len() != self.slots.len() {
            return bad(
                "grids",
                format!("{} grids for {} slots", grids.len(), self.slots.len()),
            );
        }
        for (s, row) in starts.chunks_exact(n + 1).enumerate() {
            if row[0] != 0 {
                return bad("starts", format!("slot {s} does not start at block 0"));
            }
            for t in 0..n {
                let given = row[t + 1] - row[t];
                let blocks = self.blocks(t, s) as i64;
                if given != 0 && given != blocks {
                    return bad(
                        "starts",
                        format!("slot {s} gives tensor {t} {given} blocks; it has {blocks}"),
                    );
                }
            }
            if i64::from(grids[s]) != row[n] {
                return bad(
                    "grids",
                    format!(
                        "slot {s} launches {} blocks; its starts total {}",
                        grids[s], row[n]
                    ),
                );
            }
        }
        Ok(())
    }

    /// The addresses of every tensor's slices in arenas at `bases` (each arena of
    /// [`arena_len`](Self::arena_len) values, scratch of [`scratch_len`](Self::scratch_len),
    /// partials of [`partials_len`](Self::partials_len)): base + offset × value size.
    pub fn arena_addrs(&self, bases: &ArenaBases) -> Vec<TensorAddrs> {
        self.tensors
            .iter()
            .map(|t| {
                let mut a = TensorAddrs {
                    scratch: bases.scratch + 4 * t.scratch as u64,
                    partials: bases.partials + 8 * t.partials as u64,
                    ..Default::default()
                };
                for (r, &at) in t.rounds.iter().enumerate() {
                    a.rounds[r] = bases.rounds[r] + 8 * at as u64;
                }
                for (k, &b) in ARENAS.iter().enumerate() {
                    let offset = match b {
                        Buffer::Grad => t.offsets.get(&Buffer::Param),
                        b => t.offsets.get(&b),
                    };
                    if let Some(&o) = offset {
                        a.set(b, bases.arenas[k] + 4 * o as u64);
                    }
                }
                a
            })
            .collect()
    }

    /// The values of `buffer` tensor `index` has (0 for a buffer its plan does not use).
    pub fn buffer_len(&self, index: usize, buffer: Buffer) -> usize {
        let t = &self.tensors[index];
        let layout = &self.plans[t.plan].ir.layout;
        if Buffer::for_layout(layout).contains(&buffer) {
            buffer.len(layout)
        } else {
            0
        }
    }

    /// The table addresses of a step on buffers the caller owns: `tensors[i]` gives tensor
    /// `i`'s `param`, `grad` and state addresses (its `scratch` and `partials` are ignored: they
    /// come from the program's own arenas at `scratch` and `partials`). Only the tensors with
    /// `active[i]` are looked at (the others' entries are zero and never read); each of them
    /// must give every buffer its plan uses, non-null and aligned for f32, and no buffer it
    /// does not use; no buffer that is written (parameters, state) may overlap another buffer.
    /// The error names the tensor and the buffer. What it cannot check, that each address is
    /// valid for [`buffer_len`](Self::buffer_len) values, is the caller's to guarantee. A staged
    /// program ([`staged`](Self::staged)) is refused: pointer mode has no round buffers.
    pub fn external_addrs(
        &self,
        tensors: &[TensorAddrs],
        active: &[bool],
        scratch: u64,
        partials: u64,
    ) -> Result<Vec<TensorAddrs>> {
        if !self.round_len.is_empty() {
            // Its round-out kernels would write through null round addresses.
            return Err(Error::argument(
                "model",
                "a staged program runs in arena mode (`CudaExecutor::run_stage`, which owns its \
                 round buffers); pointer mode steps whole tensors only",
            ));
        }
        let n = self.tensors.len();
        for (what, len) in [("tensors", tensors.len()), ("active", active.len())] {
            if len != n {
                return Err(Error::argument(
                    what,
                    format!("{len} entries; the model has {n} tensors"),
                ));
            }
        }
        let own = self.arena_addrs(&ArenaBases {
            arenas: [0; 7],
            scratch,
            partials,
            rounds: [0; MAX_ROUNDS],
        });
        let mut out = vec![TensorAddrs::default(); n];
        // (start, end, tensor, buffer, written) of every buffer, for the overlap check.
        let mut spans: Vec<(u64, u64, usize, Buffer, bool)> = Vec::new();
        for (i, (given, &on)) in tensors.iter().zip(active).enumerate() {
            if !on {
                continue;
            }
            let t = &self.tensors[i];
            let layout = &self.plans[t.plan].ir.layout;
            let used = Buffer::for_layout(layout);
            for b in ARENAS {
                let addr = given.get(b);
                let what = || format!("tensor {i} `{}`", b.name());
                if !used.contains(&b) {
                    if addr != 0 {
                        return Err(Error::argument(
                            what(),
                            format!("a {} tensor has no such buffer; pass 0", layout.shape()),
                        ));
                    }
                    continue;
                }
                if addr == 0 || addr % 4 != 0 {
                    return Err(Error::argument(
                        what(),
                        format!("address {addr:#x} is not that of f32 data"),
                    ));
                }
                let bytes = 4 * b.len(layout) as u64;
                let end = addr.checked_add(bytes).ok_or_else(|| {
                    Error::argument(what(), format!("{bytes} bytes at {addr:#x} wrap around"))
                })?;
                spans.push((addr, end, i, b, b != Buffer::Grad));
                out[i].set(b, addr);
            }
            out[i].scratch = own[i].scratch;
            out[i].partials = own[i].partials;
        }
        spans.sort_unstable();
        // Sorted by start: a span overlaps a later one iff that one starts before the
        // furthest end seen so far.
        let mut reach: Option<(u64, usize, Buffer, bool)> = None;
        for &(start, end, i, b, written) in &spans {
            if let Some((far, j, c, far_written)) = reach {
                if start < far && (written || far_written) {
                    return Err(Error::argument(
                        format!("tensor {i} `{}`", b.name()),
                        format!(
                            "overlaps tensor {j} `{}`; a written buffer must not share memory \
                             with another",
                            c.name()
                        ),
                    ));
                }
            }
            if reach.is_none_or(|(far, ..)| end > far) {
                reach = Some((end, i, b, written));
            }
        }
        Ok(out)
    }

    /// Everything a step on buffers the caller owns launches, checked: `tensors` as for
    /// [`external_addrs`](Self::external_addrs), `steps[i]` tensor `i`'s hyper-parameters and
    /// step counter (`None`: not stepped), `scratch` and `partials` the addresses of the
    /// program's own arenas ([`scratch_len`](Self::scratch_len) f32 and
    /// [`partials_len`](Self::partials_len) f64 values). Hyper-parameters are validated, the
    /// addresses checked, and the starts and grids are the model's; an error changes nothing.
    pub fn external_launch(
        &self,
        tensors: &[TensorAddrs],
        steps: &[Option<(Hyper, u64)>],
        scratch: u64,
        partials: u64,
    ) -> Result<Launch> {
        let n = self.tensors.len();
        if steps.len() != n {
            return Err(Error::argument(
                "steps",
                format!("{} entries; the model has {n} tensors", steps.len()),
            ));
        }
        for (i, s) in steps.iter().enumerate() {
            if let Some((h, _)) = s {
                h.validate()
                    .map_err(|e| Error::argument("hypers", format!("tensor {i}: {e}")))?;
            }
        }
        let active: Vec<bool> = steps.iter().map(Option::is_some).collect();
        let addrs = self.external_addrs(tensors, &active, scratch, partials)?;
        let starts = self.block_starts(&active);
        let grids = self.grids(&starts)?;
        self.check_launch(&starts, &grids)?;
        Ok(Launch {
            table: self.table(&addrs, steps),
            starts,
            grids,
        })
    }

    /// The table of a step: for every tensor the addresses of its buffers (`addrs[t]`), and
    /// the hyper-parameters and step counter of `steps[t]` (`None`: not stepped; its entry is
    /// written but never read).
    pub fn table(&self, addrs: &[TensorAddrs], steps: &[Option<(Hyper, u64)>]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.tensors.len() * TABLE_ENTRY_BYTES);
        for ((t, a), step) in self.tensors.iter().zip(addrs).zip(steps) {
            for v in a.fields() {
                out.extend(v.to_le_bytes());
            }
            let (hyper, count) = step.unwrap_or((
                Hyper {
                    lr: 0.0,
                    weight_decay: 0.0,
                },
                0,
            ));
            for v in super::manifest::scalar_values(hyper, count as f32) {
                out.extend(v.to_le_bytes());
            }
            out.extend((t.plan as i32).to_le_bytes());
            debug_assert_eq!(out.len() % TABLE_ENTRY_BYTES, ROUNDS_AT);
            for r in a.rounds {
                out.extend(r.to_le_bytes());
            }
        }
        debug_assert_eq!(
            out.len(),
            self.tensors.len().min(addrs.len()) * TABLE_ENTRY_BYTES
        );
        out
    }

    /// The `.cu` source of the model's step.
    pub fn source(&self) -> Result<String> {
        let mut src = render_template(
            "model_prelude",
            context! {
                n_tensors => self.tensors.len(),
                n_plans => self.plans.len(),
                version => env!("CARGO_PKG_VERSION"),
                fingerprint => self.lopt_fingerprint.clone(),
                slots => self.slots.iter().map(|s| format!("{}: {}", s.name, self.slot_summary(s))).collect::<Vec<_>>(),
                plans => self.plans.iter().enumerate().map(|(i, p)| format!("p{i}: shape {}, {} kernels, {} element passes", p.ir.layout.shape(), p.schedule.kernels.len(), p.schedule.elem_passes)).collect::<Vec<_>>(),
                threads => BLOCK_THREADS,
                table_bytes => TABLE_ENTRY_BYTES,
                scalars => crate::ir::RuntimeScalar::ALL.map(|s| s.name()).join(", "),
            },
        )?;
        let mut kernels = String::new();
        for (i, p) in self.plans.iter().enumerate() {
            kernels.push_str(&format!(
                "\n// ---- plan p{i}: shape {} ----\n",
                p.ir.layout.shape()
            ));
            kernels.push_str(&render_kernels(
                &p.ir,
                &p.schedule,
                Form::Device {
                    prefix: &format!("p{i}_"),
                },
            )?);
        }
        src.push_str(&matrix_constants(
            self.plans.iter().map(|p| &*p.ir),
            &kernels,
        )?);
        src.push_str(&kernels);
        for (s, slot) in self.slots.iter().enumerate() {
            let cases: Vec<minijinja::Value> = slot
                .kernels
                .iter()
                .enumerate()
                .filter_map(|(p, k)| k.map(|k| (p, k)))
                .map(|(p, k)| {
                    context! { plan => p, call => self.call(p, k) }
                })
                .collect();
            src.push_str(&render_template(
                "model_kernel",
                context! {
                    name => slot.name.clone(),
                    summary => self.slot_summary(slot),
                    threads => BLOCK_THREADS,
                    slot => s,
                    cases => cases,
                },
            )?);
        }
        src.push('\n');
        super::render::check_constant_memory(
            &src,
            &format!(
                "the packed program of {} tensors ({} distinct plans)",
                self.tensors.len(),
                self.plans.len()
            ),
        )?;
        Ok(src)
    }

    /// The call of plan `p`'s kernel `k` on tensor entry `t`: its buffers and scalars.
    fn call(&self, p: usize, k: usize) -> String {
        let plan = &self.plans[p];
        let mut args = vec!["blk".to_string(), "mulo_smem".to_string()];
        for param in super::render::params(&plan.ir.layout) {
            args.push(format!("t.{}", param.name));
        }
        // Only small kernels take the round buffers (`render_kernels`).
        if matches!(plan.schedule.kernels[k].kind, KernelKind::Small { .. }) {
            for r in 0..plan.schedule.rounds() {
                args.push(format!("t.{}", super::render::round_param(r)));
            }
        }
        format!(
            "p{p}_{}({})",
            plan.schedule.kernels[k].name,
            args.join(", ")
        )
    }

    fn slot_summary(&self, slot: &Slot) -> String {
        let parts: Vec<String> = slot
            .kernels
            .iter()
            .enumerate()
            .filter_map(|(p, k)| {
                k.map(|k| {
                    let kernel = &self.plans[p].schedule.kernels[k];
                    format!("p{p}: {}", kernel.name)
                })
            })
            .collect();
        let what = if slot.kind == "small" {
            "small-domain work (one block per tensor, or its points over many)"
        } else {
            "a pass over the elements"
        };
        format!("{what}; {}", parts.join(", "))
    }
}

/// Format tag of the model manifest (`mulo_model.json`).
pub const MODEL_FORMAT: &str = "mulo-cuda-model";

/// One field of the `MuloTensor` table entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FieldJson {
    /// Field name (`param`, `mom`, …, `lr`, `weight_decay`, `step`, `plan`).
    pub name: String,
    /// `ptr` (a 64-bit device address), `f32` or `i32`, little-endian.
    pub dtype: String,
    /// Byte offset in the entry.
    pub offset: usize,
}

/// One tensor of the model manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorJson {
    /// The tensor's shape (empty for 0-d).
    pub shape: Vec<usize>,
    /// Its factored axes `{d0, d1}` (SPEC.md §2), or null for rank ≤ 1.
    pub factored: Option<crate::backend::cuda::manifest::FactoredJson>,
    /// Its plan.
    pub plan: usize,
    /// Number of elements.
    pub numel: usize,
    /// Its offsets in the arenas, by arena name (`param` … `partials`; `grad` as `param`):
    /// a host that allocates the arenas writes `base + offset × value size` into the table's
    /// address fields.
    pub offsets: BTreeMap<String, usize>,
    /// Its optimizer state buffers: name, shape (decay-major) and length.
    pub state: Vec<crate::backend::cuda::manifest::BufferJson>,
    /// Blocks it runs on in every slot when stepped (0 in slots without a kernel of its plan).
    pub blocks: Vec<usize>,
    /// Staged programs: the rows of axis 0 this rank holds (`numel`, `state` and the row
    /// domains are the shard's; `shape` is the whole tensor's); absent for a tensor stepped
    /// whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_rows: Option<usize>,
    /// Staged programs: its f64 sums in each round's buffer (at `offsets.mulo_round<r>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub round_len: Vec<usize>,
}

/// One arena.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArenaJson {
    /// Argument name.
    pub name: String,
    /// `f32` or `f64`.
    pub dtype: String,
    /// Number of values the host allocates (at least 1).
    pub len: usize,
}

/// One launch of a model step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SlotJson {
    /// Entry name in the PTX.
    pub name: String,
    /// `small` or `elem`.
    pub kind: String,
    /// The stage it belongs to (always 0 unless the program is staged).
    #[serde(default)]
    pub stage: u32,
    /// What it runs.
    pub summary: String,
}

/// `mulo_model.json`: everything a host needs to run `mulo_model.ptx` without mulo.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelManifest {
    /// Always [`MODEL_FORMAT`].
    pub format: String,
    /// Version of the format (4: the table ends with the round-buffer addresses of staged
    /// programs, 104 bytes; 3: the weights are in `constants`, not in the PTX; 2: the table
    /// holds addresses; 1 held arena offsets).
    pub format_version: u32,
    /// Stages of a step: 1, or 1 + the rounds of a staged program (each round's buffer is the
    /// arena `mulo_round<r>`).
    #[serde(default = "one_stage")]
    pub stages: usize,
    /// mulo's version.
    pub generator: String,
    /// The GPU architecture the PTX targets.
    pub arch: String,
    /// NVRTC version that produced the PTX, `major.minor`.
    pub nvrtc_version: String,
    /// The PTX's ISA version (`.version`), `major.minor`.
    #[serde(default)]
    pub ptx_isa: String,
    /// The oldest driver that loads the PTX (e.g. `CUDA 12.9 (R575)`).
    #[serde(default)]
    pub min_driver: String,
    /// Fingerprint of the learned optimizer.
    pub lopt_fingerprint: String,
    /// The PTX file name.
    pub ptx: String,
    /// The CUDA source file name.
    pub source: String,
    /// Threads of every block.
    pub block_threads: usize,
    /// Bytes of one table entry.
    pub table_entry_bytes: usize,
    /// The fields of a table entry.
    pub table_fields: Vec<FieldJson>,
    /// The tensors, in order.
    pub tensors: Vec<TensorJson>,
    /// The arenas: where a host that keeps every tensor in shared buffers puts them (`scratch`
    /// and `partials` are needed in any case).
    pub arenas: Vec<ArenaJson>,
    /// The launches of a step, in order.
    pub slots: Vec<SlotJson>,
    /// The `__constant__` arrays (the meta-network's weights, one per distinct matrix) the PTX
    /// declares without their values: the host copies each into the loaded module before the
    /// first launch.
    pub constants: Vec<crate::backend::cuda::manifest::ConstantJson>,
    /// How to run a step, in words.
    pub protocol: String,
}

/// How to run a step (the manifest's `protocol`).
const PROTOCOL: &str = "Load mulo_model.ptx as a module and copy every array of `constants` into it \
                       (the module's global of that name; `len` f32 values from `hex`). Allocate the scratch and partials arenas of \
                       `arenas` once. Tensor i's buffers are wherever the host keeps them: the \
                       parameter and gradient (numel f32 values each) and its `state` buffers (zero \
                       before the first step), e.g. at offsets.<name> in arenas of `arenas` (grad at \
                       offsets.param of the grad arena), or in separate allocations; its scratch and \
                       partials are at offsets.scratch and offsets.partials of those arenas. For each \
                       step: build the table (one entry of table_entry_bytes per tensor, fields at the \
                       given byte offsets, little-endian: the device addresses of the tensor's buffers \
                       (0 for those it has not), its lr (μP-scaled), weight_decay, step counter t \
                       (steps taken before this one) and plan); build `starts`, an int64 array of \
                       n_slots × (n_tensors + 1): for slot s, starts[s][i] is the sum of blocks[s] of \
                       the stepped tensors before i (a tensor left out of this step counts 0) and \
                       starts[s][n] the total; copy both to the device. Then launch every slot in \
                       order on one stream, grid (starts[s][n], 1, 1), block (block_threads, 1, 1), no \
                       dynamic shared memory, arguments: table pointer, starts pointer, n_tensors as \
                       int32; skip a slot whose grid is 0. Increment the step counter of every stepped \
                       tensor. Parameters and state are updated in place; no two written buffers may \
                       overlap.";

/// What a staged program adds to [`PROTOCOL`].
const STAGED_PROTOCOL: &str = " Staged programs (a rank's shards of tensors split by rows of axis 0: `local_rows`): \
                       also allocate every `mulo_round<r>` arena (f64) and write each tensor's \
                       `mulo_round<r>` field as its address plus 8 × offsets.mulo_round<r> (0 for \
                       rounds it has not). A step is `stages` stages, each launching, in order, the \
                       slots of that `stage` (the table and starts are those of the step). After stage \
                       r (before the last), replace arena mulo_round<r> by its sum over every rank (an \
                       all-reduce, sum, f64, in place); stage r + 1 reads it. Every rank's program has \
                       the same stages and round sizes; a rank holding no row of a tensor contributes \
                       zeros. The last stage writes parameters and state.";

fn one_stage() -> usize {
    1
}

/// The table fields in entry order: the buffers' addresses, then the step's scalars, then
/// the plan.
pub fn table_fields() -> Vec<FieldJson> {
    let mut fields = Vec::new();
    let addrs = [
        "param", "grad", "mom", "rms", "fac_row", "fac_col", "fac_v", "scratch", "partials",
    ];
    for (i, name) in addrs.iter().enumerate() {
        fields.push(FieldJson {
            name: name.to_string(),
            dtype: "ptr".into(),
            offset: 8 * i,
        });
    }
    for (i, scalar) in crate::ir::RuntimeScalar::ALL.iter().enumerate() {
        fields.push(FieldJson {
            name: scalar.name().to_string(),
            dtype: "f32".into(),
            offset: SCALARS_AT + 4 * i,
        });
    }
    fields.push(FieldJson {
        name: "plan".into(),
        dtype: "i32".into(),
        offset: SCALARS_AT + 4 * crate::ir::RuntimeScalar::ALL.len(),
    });
    for r in 0..MAX_ROUNDS {
        fields.push(FieldJson {
            name: super::render::round_param(r),
            dtype: "ptr".into(),
            offset: ROUNDS_AT + 8 * r,
        });
    }
    fields
}

/// A packed model compiled to PTX: the three files of
/// `mulo-compile --target cuda --shape A --shape B …`.
#[derive(Clone, Debug)]
pub struct CompiledModel {
    /// The `.cu` source.
    pub source: String,
    /// The PTX and how it was obtained.
    pub ptx: super::nvrtc::CompiledPtx,
    /// The manifest.
    pub manifest: ModelManifest,
}

impl CompiledModel {
    /// Writes `mulo_model.cu`, `mulo_model.ptx` and `mulo_model.json` into `dir` (created if
    /// missing); returns their paths.
    pub fn write_to(&self, dir: &std::path::Path) -> Result<[std::path::PathBuf; 3]> {
        crate::fsio::create_dir_all(dir)?;
        let paths = [
            dir.join(&self.manifest.source),
            dir.join(&self.manifest.ptx),
            dir.join("mulo_model.json"),
        ];
        let json = serde_json::to_string_pretty(&self.manifest).unwrap_or_default();
        let contents = [self.source.as_str(), self.ptx.ptx.as_str(), json.as_str()];
        for (path, text) in paths.iter().zip(contents) {
            crate::fsio::write_atomic(path, text.as_bytes())?;
        }
        Ok(paths)
    }
}

impl PackedModel {
    /// Renders the model and compiles it to PTX for `arch` (through the disk cache when
    /// `use_cache`; [`super::nvrtc::compile`]).
    pub fn compile(&self, arch: &str, use_cache: bool) -> Result<CompiledModel> {
        let source = self.source()?;
        let ptx = super::nvrtc::compile(&source, arch, use_cache)?;
        let mut manifest = self.manifest_of(arch, ptx.nvrtc_version, &source)?;
        (manifest.ptx_isa, manifest.min_driver) = super::manifest::ptx_requirements(&ptx.ptx);
        Ok(CompiledModel {
            source,
            ptx,
            manifest,
        })
    }

    /// The manifest of the model compiled for `arch` by NVRTC `nvrtc_version` (renders the
    /// source for its `constants`).
    pub fn manifest(&self, arch: &str, nvrtc_version: (i32, i32)) -> Result<ModelManifest> {
        self.manifest_of(arch, nvrtc_version, &self.source()?)
    }

    /// The `__constant__` arrays `source` (this model's) declares, which the host fills after
    /// loading the module.
    pub fn constant_arrays(&self, source: &str) -> Result<Vec<super::render::ConstArray>> {
        super::render::constant_arrays(self.plans.iter().map(|p| &*p.ir), source)
    }

    /// [`manifest`](Self::manifest) given the model's rendered `source`.
    fn manifest_of(
        &self,
        arch: &str,
        nvrtc_version: (i32, i32),
        source: &str,
    ) -> Result<ModelManifest> {
        let constants = super::manifest::constants_json(&self.constant_arrays(source)?);
        let tensors = self
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let layout = &self.plans[t.plan].ir.layout;
                let mut offsets: BTreeMap<String, usize> = t
                    .offsets
                    .iter()
                    .map(|(b, &o)| (b.name().to_string(), o))
                    .collect();
                offsets.insert("scratch".into(), t.scratch);
                offsets.insert("partials".into(), t.partials);
                for (r, &at) in t.rounds.iter().enumerate() {
                    offsets.insert(super::render::round_param(r), at);
                }
                TensorJson {
                    shape: layout.shape().dims().to_vec(),
                    factored: layout.factored().map(|f| {
                        crate::backend::cuda::manifest::FactoredJson { d0: f.d0, d1: f.d1 }
                    }),
                    plan: t.plan,
                    numel: t.numel,
                    offsets,
                    state: Buffer::state_for_layout(layout)
                        .into_iter()
                        .map(|b| crate::backend::cuda::manifest::BufferJson::new(b, layout))
                        .collect(),
                    blocks: (0..self.slots.len()).map(|s| self.blocks(i, s)).collect(),
                    local_rows: self.plans[t.plan].local_rows,
                    round_len: self.plans[t.plan].schedule.round_len.clone(),
                }
            })
            .collect();
        let mut arenas: Vec<ArenaJson> = ARENAS
            .iter()
            .map(|b| ArenaJson {
                name: b.name().to_string(),
                dtype: "f32".into(),
                len: self.arena_len[b].max(1),
            })
            .collect();
        arenas.push(ArenaJson {
            name: "scratch".into(),
            dtype: "f32".into(),
            len: self.scratch_len.max(1),
        });
        arenas.push(ArenaJson {
            name: "partials".into(),
            dtype: "f64".into(),
            len: self.partials_len.max(1),
        });
        for (r, &len) in self.round_len.iter().enumerate() {
            arenas.push(ArenaJson {
                name: super::render::round_param(r),
                dtype: "f64".into(),
                len: len.max(1),
            });
        }
        let mut protocol = PROTOCOL.to_string();
        if self.stages() > 1 {
            protocol.push_str(STAGED_PROTOCOL);
        }
        Ok(ModelManifest {
            format: MODEL_FORMAT.into(),
            format_version: 4,
            stages: self.stages(),
            generator: format!("mulo {}", env!("CARGO_PKG_VERSION")),
            arch: arch.to_string(),
            nvrtc_version: format!("{}.{}", nvrtc_version.0, nvrtc_version.1),
            ptx_isa: String::new(),
            min_driver: String::new(),
            lopt_fingerprint: self.lopt_fingerprint.clone(),
            ptx: "mulo_model.ptx".into(),
            source: "mulo_model.cu".into(),
            block_threads: BLOCK_THREADS,
            table_entry_bytes: TABLE_ENTRY_BYTES,
            table_fields: table_fields(),
            tensors,
            arenas,
            slots: self
                .slots
                .iter()
                .map(|s| SlotJson {
                    name: s.name.clone(),
                    kind: s.kind.into(),
                    stage: s.stage,
                    summary: self.slot_summary(s),
                })
                .collect(),
            protocol,
            constants,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::render::{constant_bytes, CONSTANT_BYTES};
    use super::*;

    /// Shape `i` of a sequence of distinct shapes of every class (matrices, vectors, rank 3
    /// and 4 tensors), each its own plan.
    fn distinct_shape(i: usize) -> String {
        let j = i / 4 + 2;
        match i % 4 {
            0 => format!("{}x{}", 8 + j, 3 + j),
            1 => format!("{}", 5 + j),
            2 => format!("{}x{}x3", 4 + j, 2 + j),
            _ => format!("{}x{}x3x3", 6 + j, 2 + j),
        }
    }

    fn model(shapes: &[&str]) -> PackedModel {
        let layouts: Vec<Layout> = shapes
            .iter()
            .map(|s| Layout::new(crate::shape::Shape::parse(s).unwrap()))
            .collect();
        PackedModel::new(&LearnedOptimizer::demo(), &layouts).unwrap()
    }

    /// Distinct factored shapes (matrices, rank 3 and rank 4 tensors, each its own plan, with
    /// ~680 bytes of rolled regions' tables each): 100 of them need more than 64 KiB of
    /// `__constant__` memory with the weights, which ptxas would refuse with its own error;
    /// mulo refuses the source first, naming the bytes of each part. 70 of them fit, counted.
    #[test]
    fn constant_memory_counts_the_roll_tables_and_refuses_past_64_kib() {
        let shapes = |k: usize| -> Vec<String> {
            (0..k)
                .map(|i| distinct_shape(i / 3 * 4 + [0, 2, 3][i % 3]))
                .collect()
        };
        let refs = |v: &[String]| -> PackedModel {
            model(&v.iter().map(String::as_str).collect::<Vec<_>>())
        };
        let fits = refs(&shapes(70));
        assert_eq!(fits.plans.len(), 70);
        let c = constant_bytes(&fits.source().unwrap()).unwrap();
        assert!(c.tables > 70 * 600, "{c:?}");
        assert!(c.total() <= CONSTANT_BYTES, "{c:?}");
        let over = refs(&shapes(100));
        assert_eq!(over.plans.len(), 100);
        let err = over.source().unwrap_err().to_string();
        assert!(
            err.contains("the packed program of 100 tensors (100 distinct plans) needs up to")
                && err.contains(&format!("({} for the meta-network's weights,", c.weights))
                && err.contains("more than the 65536 a module may hold"),
            "{err}"
        );
        // The manifest and the CUDA executor render the source: refused there too.
        assert!(over.manifest("sm_80", (12, 9)).is_err());
    }

    /// The `cmem[3]` ptxas reports for a packed model's CUBIN is within [`constant_bytes`]'s
    /// bounds: at least the arrays' bytes, at most with the worst padding (NVRTC; skipped, with
    /// the reason, where libnvrtc is missing outside CI).
    #[test]
    fn constant_bytes_are_what_ptxas_reports() {
        if !super::super::nvrtc::nvrtc_available() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "libnvrtc is missing under CI"
            );
            eprintln!("SKIPPED constant_bytes_are_what_ptxas_reports: no libnvrtc");
            return;
        }
        let m = model(&["12x5", "7", "6x4x3", "8x4x3x3"]);
        let src = m.source().unwrap();
        let c = constant_bytes(&src).unwrap();
        let report = super::super::nvrtc::cubin_ptxas_report(
            &src,
            "sm_80",
            super::super::nvrtc::Level::Fast,
        )
        .unwrap();
        let cmem3 = report
            .lines()
            .find_map(|l| {
                l.strip_suffix(" bytes cmem[3]")
                    .and_then(|l| l.rsplit(' ').next())
                    .and_then(|n| n.parse::<usize>().ok())
            })
            .unwrap_or_else(|| panic!("no cmem[3] in {report}"));
        assert!(
            c.weights + c.tables <= cmem3 && cmem3 <= c.total(),
            "{c:?}, ptxas: {report}"
        );
    }

    #[test]
    fn launches_do_not_grow_with_the_number_of_tensors() {
        let small = model(&["64x32", "32"]);
        let shapes: Vec<String> = (0..150)
            .map(|i| match i % 12 {
                j @ 0..4 => format!("{}x32", 8 + j),
                j @ 4..8 => format!("{}", 8 + j),
                j => format!("16x{j}x3x3"),
            })
            .collect();
        let big = model(&shapes.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(big.tensors.len(), 150);
        assert_eq!(big.plans.len(), 12);
        let names = |m: &PackedModel| m.slots.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&small), names(&big));
        let kinds: Vec<String> = small
            .slots
            .iter()
            .map(|s| {
                s.name
                    .split('_')
                    .skip(3)
                    .take(2)
                    .collect::<Vec<_>>()
                    .join("_")
            })
            .collect();
        // Element passes, and between them the small kernels of each stage.
        assert_eq!(kinds.first().map(String::as_str), Some("elem_0"));
        assert_eq!(kinds.last().map(String::as_str), Some("elem_2"));
        assert!(kinds.contains(&"elem_1".to_string()));
        assert!(kinds.iter().any(|k| k == "small_1") && kinds.iter().any(|k| k == "small_2"));
    }

    #[test]
    fn plans_share_one_copy_of_each_matrix() {
        // Two factored shapes, a vector and a 4-d tensor: the factored plans split the first
        // layer the same way, so their arrays are shared; every array is declared once.
        let m = model(&["64x32", "48x48", "37", "16x8x3x3"]);
        let src = m.source().unwrap();
        let decls: Vec<&str> = src
            .lines()
            .filter_map(|l| l.strip_prefix("__constant__ float "))
            .map(|l| l.split('[').next().unwrap())
            .collect();
        let distinct: std::collections::BTreeSet<&str> = decls.iter().copied().collect();
        assert_eq!(decls.len(), distinct.len(), "{decls:?}");
        let single = |shape: &str| {
            let ir = crate::compile_step(
                &crate::shape::Shape::parse(shape).unwrap(),
                &LearnedOptimizer::demo(),
            )
            .unwrap();
            let s =
                super::super::render::render(&ir, &super::super::schedule::schedule(&ir)).unwrap();
            s.lines()
                .filter(|l| l.starts_with("__constant__ float "))
                .count()
        };
        // No more arrays than the factored and the unfactored programs declare together.
        assert!(decls.len() <= single("64x32") + single("37"), "{decls:?}");
        for name in &decls {
            assert!(src.matches(name).count() > 1, "{name} declared but unused");
        }
    }

    #[test]
    fn plans_align_on_the_update_pass() {
        let m = model(&["64x32", "37"]);
        // The vector's two passes are the factored matrix's last two.
        let of = |p: usize| {
            m.slots
                .iter()
                .map(|s| s.kernels[p].map(|k| m.plans[p].schedule.kernels[k].name.clone()))
                .collect::<Vec<_>>()
        };
        let vector: Vec<String> = of(1).into_iter().flatten().collect();
        assert_eq!(
            vector.first().map(String::as_str),
            Some("mulo_elem_0_reduce")
        );
        assert_eq!(
            vector.last().map(String::as_str),
            Some("mulo_elem_1_update")
        );
        assert!(vector[1..vector.len() - 1]
            .iter()
            .all(|k| k.starts_with("mulo_small_1_")));
        // The vector's kernels are in the last slots; the matrix has a kernel in every slot
        // but those of the vector's later small phases.
        let last = of(1).iter().position(Option::is_some).unwrap();
        assert_eq!(of(1)[last].as_deref(), Some("mulo_elem_0_reduce"));
        assert_eq!(
            of(0)[last].as_deref(),
            Some("mulo_elem_1_reduce"),
            "aligned on the update pass"
        );
    }

    #[test]
    fn arenas_and_starts_cover_every_tensor_once() {
        let m = model(&["8x4", "5", "8x4", "scalar"]);
        assert_eq!(m.plans.len(), 3);
        assert_eq!(m.arena_len[&Buffer::Param], 32 + 5 + 32 + 1);
        assert_eq!(m.arena_len[&Buffer::Grad], m.arena_len[&Buffer::Param]);
        assert_eq!(m.arena_len[&Buffer::Mom], 3 * (32 + 5 + 32 + 1));
        assert_eq!(m.arena_len[&Buffer::FacV], 3 * (5 + 1));
        assert_eq!(m.param_offset(2), 37);
        assert_eq!(m.tensors[3].offsets[&Buffer::FacV], 15);
        let starts = m.block_starts(&[true, false, true, true]);
        assert_eq!(starts.len(), m.slots.len() * 5);
        let last = m.slots.len() - 1;
        // The update pass: tensor 1 is skipped (no blocks), the others one block each.
        assert_eq!(&starts[last * 5..], &[0, 1, 1, 2, 3]);
        assert_eq!(m.grids(&starts).unwrap()[last], 3);
        let bases = ArenaBases {
            arenas: [
                1 << 40,
                2 << 40,
                3 << 40,
                4 << 40,
                5 << 40,
                6 << 40,
                7 << 40,
            ],
            scratch: 8 << 40,
            partials: 9 << 40,
            rounds: [0; MAX_ROUNDS],
        };
        let addrs = m.arena_addrs(&bases);
        // Tensor 2 (the second 8x4): param and grad at offset 37, mom at 3 × 37, factored;
        // tensor 3 (0-d): fac_v at 15.
        assert_eq!(addrs[2].param, (1 << 40) + 4 * 37);
        assert_eq!(addrs[2].grad, (2 << 40) + 4 * 37);
        assert_eq!(addrs[2].get(Buffer::Mom), (3 << 40) + 4 * 3 * 37);
        assert_eq!(addrs[2].get(Buffer::FacV), 0);
        assert_ne!(addrs[2].get(Buffer::FacRow), 0);
        assert_eq!(addrs[3].get(Buffer::FacV), (7 << 40) + 4 * 15);
        assert_eq!(addrs[3].get(Buffer::FacRow), 0);
        assert_eq!(
            addrs[1].scratch,
            (8 << 40) + 4 * m.tensors[1].scratch as u64
        );
        assert_eq!(
            addrs[1].partials,
            (9 << 40) + 8 * m.tensors[1].partials as u64
        );
        let table = m.table(
            &addrs,
            &[
                Some((
                    Hyper {
                        lr: 0.5,
                        weight_decay: 0.1,
                    },
                    7,
                )),
                None,
                None,
                None,
            ],
        );
        assert_eq!(table.len(), 4 * TABLE_ENTRY_BYTES);
        let f32_at = |o: usize| f32::from_le_bytes(table[o..o + 4].try_into().unwrap());
        assert_eq!((f32_at(72), f32_at(76), f32_at(80)), (0.5, 0.1, 7.0));
        // Tensor 2's param and grad addresses and plan, at the manifest's field offsets.
        let fields = table_fields();
        let at = |name: &str| fields.iter().find(|f| f.name == name).unwrap().offset;
        let e2 = 2 * TABLE_ENTRY_BYTES;
        let u64_at = |o: usize| u64::from_le_bytes(table[o..o + 8].try_into().unwrap());
        assert_eq!(u64_at(e2 + at("param")), addrs[2].param);
        assert_eq!(u64_at(e2 + at("grad")), addrs[2].grad);
        assert_eq!(u64_at(e2 + at("fac_v")), 0);
        assert_eq!(
            i32::from_le_bytes(
                table[e2 + at("plan")..e2 + at("plan") + 4]
                    .try_into()
                    .unwrap()
            ),
            0
        );
        assert_eq!(at("plan") + 4, at("mulo_round0"));
        assert_eq!(
            u64_at(e2 + at("mulo_round0")),
            0,
            "not staged: no round buffer"
        );
        assert_eq!(
            at(&format!("mulo_round{}", MAX_ROUNDS - 1)) + 8,
            TABLE_ENTRY_BYTES
        );
    }

    /// A staged model: slots grouped by stage, plans aligned by stage (not shifted), round
    /// buffers holding every tensor with that many rounds in tensor order, and the table's
    /// round addresses pointing at each tensor's slice.
    #[test]
    fn staged_models_lay_out_stages_and_rounds() {
        let layouts = ["64x32", "37", "scalar", "64x32", "1x30"]
            .iter()
            .map(|s| Layout::new(crate::shape::Shape::parse(s).unwrap()))
            .collect::<Vec<_>>();
        let rows = [Some(20), Some(13), None, Some(20), Some(0)];
        let tensors: Vec<(Layout, Option<usize>)> = layouts.iter().cloned().zip(rows).collect();
        let m = PackedModel::staged(&LearnedOptimizer::demo(), &tensors).unwrap();
        assert_eq!(m.plans.len(), 4, "the two 64x32 shards share a plan");
        assert!(m.plans.iter().all(|p| p.shift == 0));
        assert_eq!(m.stages(), 3);
        let mut covered = 0;
        for stage in 0..m.stages() {
            let range = m.stage_slots(stage);
            assert_eq!(range.start, covered);
            assert!(m.slots[range.clone()]
                .iter()
                .all(|s| s.stage as usize == stage));
            covered = range.end;
        }
        assert_eq!(covered, m.slots.len());
        // Round r: the tensors with more than r rounds, in order.
        let len = |t: usize, r: usize| m.plans[m.tensors[t].plan].schedule.round_len[r];
        assert_eq!(m.tensors[0].rounds, [0, 0]);
        assert_eq!(m.tensors[1].rounds, [len(0, 0)]);
        assert!(m.tensors[2].rounds.is_empty());
        assert_eq!(m.tensors[3].rounds, [len(0, 0) + len(1, 0), len(0, 1)]);
        assert_eq!(m.round_len[1], 2 * len(0, 1) + len(4, 1));
        // The empty shard runs no element pass.
        let elem = m.slots.iter().position(|s| s.kind == "elem").unwrap();
        assert_eq!(m.blocks(4, elem), 0);
        let bases = ArenaBases {
            arenas: [1 << 40; 7],
            scratch: 8 << 40,
            partials: 9 << 40,
            rounds: [10 << 40, 11 << 40],
        };
        let addrs = m.arena_addrs(&bases);
        assert_eq!(
            addrs[3].rounds,
            [
                (10 << 40) + 8 * m.tensors[3].rounds[0] as u64,
                (11 << 40) + 8 * m.tensors[3].rounds[1] as u64
            ]
        );
        assert_eq!(addrs[2].rounds, [0, 0]);
        let table = m.table(&addrs, &[None; 5]);
        let at = 3 * TABLE_ENTRY_BYTES + ROUNDS_AT;
        assert_eq!(
            u64::from_le_bytes(table[at + 8..at + 16].try_into().unwrap()),
            addrs[3].rounds[1]
        );
        // Pointer mode has no round buffers: refused before any table is built.
        let err = m
            .external_launch(&vec![TensorAddrs::default(); 5], &[None; 5], 64, 128)
            .unwrap_err();
        assert!(err.to_string().contains("arena mode"), "{err}");
        // Not a shard: refused, naming the tensor.
        let bad = PackedModel::staged(&LearnedOptimizer::demo(), &[(layouts[0].clone(), Some(65))]);
        assert!(bad.unwrap_err().to_string().contains("tensor 0"));
    }

    #[test]
    fn external_buffers_are_checked_before_they_reach_a_table() {
        let m = model(&["8x4", "5"]);
        // Tensor 0 (factored): param, grad, mom, rms, fac_row, fac_col; tensor 1: fac_v.
        let mut next = 0x1000u64;
        let mut give = |i: usize| {
            let mut a = TensorAddrs::default();
            for b in ARENAS {
                let len = m.buffer_len(i, b) as u64;
                if len > 0 {
                    a.set(b, next);
                    next += 4 * len;
                }
            }
            a
        };
        let good = [give(0), give(1)];
        let addrs = m
            .external_addrs(&good, &[true, true], 0x100, 0x200)
            .unwrap();
        assert_eq!(addrs[0].param, good[0].param);
        assert_eq!(addrs[1].get(Buffer::FacV), good[1].get(Buffer::FacV));
        assert_eq!(addrs[1].scratch, 0x100 + 4 * m.tensors[1].scratch as u64);
        // A tensor left out is not looked at, and its entry is zero.
        let mut off = good;
        off[1] = TensorAddrs::default();
        let addrs = m
            .external_addrs(&off, &[true, false], 0x100, 0x200)
            .unwrap();
        assert_eq!(addrs[1], TensorAddrs::default());
        let err = |tensors: &[TensorAddrs]| {
            m.external_addrs(tensors, &[true, true], 0x100, 0x200)
                .unwrap_err()
                .to_string()
        };
        // A missing state buffer, one the plan has not, a misaligned one.
        let mut t = good;
        t[0].set(Buffer::Rms, 0);
        assert!(err(&t).contains("tensor 0 `rms`"), "{}", err(&t));
        let mut t = good;
        t[0].set(Buffer::FacV, 0x8000);
        assert!(err(&t).contains("tensor 0 `fac_v`"), "{}", err(&t));
        let mut t = good;
        t[1].grad += 2;
        assert!(err(&t).contains("tensor 1 `grad`"), "{}", err(&t));
        // A parameter overlapping another tensor's state; two gradients may share memory.
        let mut t = good;
        t[1].param = good[0].get(Buffer::Mom) + 8;
        assert!(err(&t).contains("overlaps"), "{}", err(&t));
        let mut t = good;
        t[1].grad = good[0].grad;
        m.external_addrs(&t, &[true, true], 0x100, 0x200).unwrap();
        let mut t = good;
        t[1].grad = good[0].param;
        assert!(err(&t).contains("overlaps"), "{}", err(&t));
        assert!(m.external_addrs(&good[..1], &[true, true], 0, 0).is_err());
    }

    #[test]
    fn launches_off_the_schedule_are_rejected() {
        let m = model(&["8x4", "5", "8x4"]);
        let n = m.tensors.len();
        let active = [true, false, true];
        let starts = m.block_starts(&active);
        let grids = m.grids(&starts).unwrap();
        m.check_launch(&starts, &grids).unwrap();
        // More blocks for a tensor than it has, a grid larger than the starts' total.
        let last = m.slots.len() - 1;
        let mut s2 = starts.clone();
        s2[last * (n + 1) + n] += 1;
        let g2 = m.grids(&s2).unwrap();
        assert!(m.check_launch(&s2, &g2).is_err());
        let mut g3 = grids.clone();
        g3[last] += 1;
        assert!(m.check_launch(&starts, &g3).is_err());
        assert!(m.check_launch(&starts[1..], &grids).is_err());
        // A negative total is an error, not a huge u32.
        let mut s4 = starts.clone();
        s4[n] = -1;
        assert!(m.grids(&s4).is_err());
    }

    #[test]
    fn a_packed_grid_beyond_cudas_limit_is_an_error() {
        // Rank 13, every axis 8: 2^33 blocks per element pass, which `as u32` would have
        // made 0.
        let eights = vec!["8"; 13].join("x");
        let m = model(&[&eights]);
        let starts = m.block_starts(&[true]);
        let err = m.grids(&starts).unwrap_err().to_string();
        assert!(err.contains("launch mulo_model_0_elem_0"), "{err}");
    }

    #[test]
    fn source_has_one_entry_per_slot_and_device_functions_per_plan() {
        let m = model(&["8x4", "5"]);
        let src = m.source().unwrap();
        for s in &m.slots {
            assert!(
                src.contains(&format!(
                    "extern \"C\" __global__ void __launch_bounds__(256) {}(",
                    s.name
                )),
                "{}",
                s.name
            );
        }
        assert_eq!(src.matches("extern \"C\"").count(), m.slots.len());
        assert!(src.contains("static __device__ __noinline__ void p0_mulo_elem_2_update("));
        assert!(src.contains("static __device__ __noinline__ void p1_mulo_elem_1_update("));
        assert!(src.contains("case 1: p1_mulo_elem_1_update(blk, mulo_smem, t.param, t.grad, t.mom, t.rms, t.fac_v, t.scratch, t.partials, t.lr, t.weight_decay, t.step)"));
    }
}
