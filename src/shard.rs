//! Sharded steps: a tensor split by rows of axis 0 over several ranks (FSDP's `Shard(0)`),
//! stepped exactly, in stages, with a few all-reduces of small partial sums.
//!
//! μLO's step cannot run on a shard alone: the Adafactor accumulators are means of g² along
//! whole axes, the row accumulators are averaged along an axis, and every feature is normalized
//! by its mean square over the whole tensor. Every such mean that crosses the sharded axis
//! (axis 0) becomes a **partial sum** over the local rows; the host adds the partial sums of
//! every rank (an all-reduce) and the next stage divides the total by the whole tensor's count.
//! Means along axes that are not sharded stay local. The factored axes, counts and
//! normalization statistics are those of the **whole** tensor: a shard knows the global shape
//! and its row range ([`RowShard`]), so only sums are exchanged (each mean's count is the whole
//! tensor's, known to every rank); partial sums are f64, as the interpreter accumulates means.
//!
//! The stages come from the one pass plan ([`StagePlan`], which the
//! CPU backend renders too): a node's stage is the number of cross-shard means on its path (as
//! the passes count element means), so each stage is a barrier only where the sharded axis
//! makes it one. A factored tensor needs at most 2 rounds (the g²/row-accumulator means, then
//! the 28 feature mean squares); an unfactored one 1. What executes them is a
//! [`StageEngine`]: the native CPU backend ([`CpuStaged`]: the chunk programs and FMA dense
//! kernels of the CPU backend, on the shard's rows; the default of [`ShardedModel`]), or the
//! reference evaluator with the interpreter's semantics (f32 values, f64 sums), bitwise equal
//! to the unsharded interpreter step and slow ([`StagedPlan::new`]).
//! The packed CUDA program renders the same plan for a whole model's shards on a GPU
//! (`backend::cuda::packed::PackedModel::staged`, feature `cuda`): its round buffers have the
//! layout of [`ShardedModel`]'s level rounds.
//!
//! [`ShardedModel`] drives a whole model's shards with the optimizer's policies (per-tensor
//! clipping, non-finite gradients, the guard) and batches every tensor's partials into **one
//! buffer per round**; its contract (rounds, buffer layout, sizes) is what an MPI or NCCL host
//! implements, and what `mulo.torch` does over `torch.distributed`:
//!
//! ```
//! use mulo::shard::{RowShard, ShardedModel, ShardedParam};
//! use mulo::{Hyper, LearnedOptimizer, NonFinitePolicy, Shape};
//! # fn all_reduce_sum(_: &mut [f64]) {} // one rank here; MPI_Allreduce / NCCL / torch.distributed
//! let lopt = LearnedOptimizer::demo();
//! // This rank holds rows 3..7 of a 10x6 tensor.
//! let shape = Shape::new(vec![10, 6])?;
//! let params = vec![ShardedParam::new("w", &shape, None, Some(RowShard { offset: 3, rows: 4 }))?];
//! let mut model = ShardedModel::new(&lopt, params, None, NonFinitePolicy::Skip)?;
//! let (mut w, g) = (vec![0.1f32; 24], vec![0.01f32; 24]);
//! let hyper = [Hyper { lr: 1e-3, weight_decay: 0.0 }];
//! let mut buf = model.begin(&[&w], &[Some(&g)], &hyper)?;
//! for _ in 1..model.rounds() {
//!     all_reduce_sum(&mut buf);
//!     buf = model.advance(&buf)?;
//! }
//! all_reduce_sum(&mut buf);
//! let report = model.finish(&buf, &mut [&mut w])?;
//! # Ok::<(), mulo::Error>(())
//! ```

use crate::backend::cpu::{default_threads, CpuStaged, CpuStagedStep};
use crate::backend::interp::{binary, unary};
use crate::backend::Hyper;
use crate::error::{Error, Result};
use crate::ir::{Buffer, Op, RuntimeScalar, StepIr, ValueId};
use crate::lopt::LearnedOptimizer;
use crate::optimizer::{clip, nonfinite, NonFiniteCount, NonFinitePolicy, StepReport};
use crate::plan::StagePlan;
use crate::shape::{Domain, FactoredAxes, Layout, Shape};
use crate::state::TensorState;
use std::collections::HashMap;
use std::sync::Arc;

/// The rows of axis 0 one rank holds: `offset..offset + rows` (rows may be 0: FSDP gives an
/// empty shard to the last ranks when a tensor has fewer rows than ranks).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RowShard {
    /// First row of the whole tensor this shard holds.
    pub offset: usize,
    /// Number of rows.
    pub rows: usize,
}

impl RowShard {
    /// Checks that the shard is inside a tensor of `layout` (rank ≥ 1).
    pub fn check(&self, layout: &Layout) -> std::result::Result<(), String> {
        if layout.is_scalar() {
            return Err("a 0-d tensor cannot be sharded by rows; replicate it".to_string());
        }
        let total = layout.dims()[0];
        if self
            .offset
            .checked_add(self.rows)
            .is_none_or(|end| end > total)
        {
            return Err(format!(
                "rows {}..{} are outside axis 0 of a {} tensor ({total} rows)",
                self.offset,
                self.offset.saturating_add(self.rows),
                layout.shape()
            ));
        }
        Ok(())
    }
}

/// One step of a plan's evaluation sequence.
#[derive(Clone, Copy, Debug)]
enum Item {
    /// Evaluate node (a cross-shard mean reads its combined sums).
    Eval(ValueId),
    /// Add this rank's partial sums of a cross-shard mean into the round's buffer.
    Partial(ValueId),
}

/// One tensor's step split into stages at the means that cross the sharded axis.
///
/// Stage 0 reads the buffers and ends with the partial sums of round 0; stage k (k ≥ 1)
/// starts from the combined sums of round k − 1; the last stage ([`rounds`](Self::rounds))
/// writes the new parameter and state. A tensor that is not sharded (`shard: None`) has no
/// rounds: its one stage is the whole step.
///
/// **Contract** of a step, on either [`StageEngine`] (the stages are those of
/// [`StagePlan`], the same partition for every backend):
///
/// 1. [`begin`](Self::begin)`(param, grad, state, hyper)`: the shard's rows, row-major (f32,
///    [`local_layout`](Self::local_layout)`().numel()` values each) and its state (for the
///    local layout). Runs stage 0; [`StagedStep::partials`] is then this rank's buffer of
///    round 0: [`round_len`](Self::round_len)`(0)` f64 sums.
/// 2. For each round `r` in `0..rounds()`, in order: the host adds every rank's buffer of
///    round `r` (an all-reduce, sum, f64) and gives the sum to [`StagedStep::advance`], which
///    runs stage `r + 1`; `partials()` is then round `r + 1`'s buffer (empty after the last).
/// 3. [`StagedStep::finish`]: the new rows and state (step counter + 1). Nothing the caller
///    owns changes before.
///
/// A round buffer holds, for each cross mean of the next stage in node order
/// ([`round_contents`](Self::round_contents): note, offset, length), its `width × points`
/// partial sums over the local rows, `[point][lane]` (the points of its domain, which lacks
/// axis 0: every rank has all of them). Its sizes depend only on the whole tensor's layout, so
/// every rank's buffers match whatever its rows (an empty shard sends zeros).
#[derive(Clone, Debug)]
pub struct StagedPlan {
    ir: Arc<StepIr>,
    shard: Option<RowShard>,
    local: Layout,
    /// Evaluation sequence of every stage.
    seq: Vec<Vec<Item>>,
    /// Per stage and position: the values whose last use this is.
    frees: Vec<Vec<Vec<ValueId>>>,
    /// Per round: (cross mean, offset in the round's buffer), in node order.
    slots: Vec<Vec<(ValueId, usize)>>,
    round_len: Vec<usize>,
    engine: StageEngine,
    /// The native CPU rendering of the stages ([`StageEngine::Cpu`]).
    cpu: Option<Arc<CpuStaged>>,
}

/// What executes a [`StagedPlan`]'s stages. Both render the same [`StagePlan`] and fill the
/// same round buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StageEngine {
    /// The reference evaluator: the interpreter's semantics node by node (f32 values, f64
    /// sums), bitwise equal to the unsharded interpreter step. Slow: every element value is
    /// materialized over the shard.
    Interp,
    /// The native CPU backend's chunk programs on `threads` threads ([`CpuStaged`]): equal to
    /// the reference within the CPU backend's tolerance, bitwise the same for any thread
    /// count.
    Cpu {
        /// Threads per pass (at least 1).
        threads: usize,
    },
}

impl Default for StageEngine {
    /// The native CPU backend on [`default_threads`] threads.
    fn default() -> Self {
        StageEngine::Cpu {
            threads: default_threads(),
        }
    }
}

impl StagedPlan {
    /// Splits `ir` (compiled for the whole tensor) into stages for the rows `shard` of it;
    /// `None`: the tensor is not sharded (every rank steps all of it, with no rounds). The
    /// stages run on the reference evaluator ([`StageEngine::Interp`]).
    pub fn new(ir: Arc<StepIr>, shard: Option<RowShard>) -> Result<Self> {
        Self::with_engine(ir, shard, StageEngine::Interp)
    }

    /// As [`new`](Self::new), the stages running on `engine`.
    pub fn with_engine(
        ir: Arc<StepIr>,
        shard: Option<RowShard>,
        engine: StageEngine,
    ) -> Result<Self> {
        let layout = ir.layout.clone();
        if let Some(s) = shard {
            s.check(&layout)
                .map_err(|why| Error::argument(format!("shard of {}", layout.shape()), why))?;
        }
        let n = ir.nodes.len();
        let stages = StagePlan::of(&ir, shard.map(|_| 0));
        let (cross, level) = (&stages.cross, &stages.stage);
        let rounds = stages.rounds();
        let mut seq: Vec<Vec<Item>> = vec![Vec::new(); rounds + 1];
        for id in ir.ids() {
            seq[level[id.index()] as usize].push(Item::Eval(id));
        }
        let mut slots: Vec<Vec<(ValueId, usize)>> = Vec::with_capacity(rounds);
        let mut round_len = Vec::with_capacity(rounds);
        for (round, items) in seq.iter_mut().take(rounds).enumerate() {
            let (s, len) = stages.round_slots(&ir, round);
            items.extend(s.iter().map(|&(id, _)| Item::Partial(id)));
            slots.push(s);
            round_len.push(len);
        }
        // Last use of every value, in evaluation order (stage, position).
        let mut last: Vec<(usize, usize)> = vec![(0, 0); n];
        for (stage, items) in seq.iter().enumerate() {
            for (pos, item) in items.iter().enumerate() {
                let used = match *item {
                    Item::Eval(id) if cross[id.index()] => Vec::new(),
                    Item::Eval(id) => {
                        last[id.index()] = last[id.index()].max((stage, pos));
                        ir.node(id).op.operands()
                    }
                    Item::Partial(id) => ir.node(id).op.operands(),
                };
                if let Item::Eval(id) = *item {
                    last[id.index()] = last[id.index()].max((stage, pos));
                }
                for v in used {
                    last[v.index()] = last[v.index()].max((stage, pos));
                }
            }
        }
        let mut frees: Vec<Vec<Vec<ValueId>>> = seq
            .iter()
            .map(|items| vec![Vec::new(); items.len()])
            .collect();
        for id in ir.ids() {
            let (stage, pos) = last[id.index()];
            frees[stage][pos].push(id);
        }
        let local = match shard {
            Some(s) => layout.with_local_rows(s.rows),
            None => layout.clone(),
        };
        let cpu = match engine {
            StageEngine::Interp => None,
            StageEngine::Cpu { threads } => Some(Arc::new(CpuStaged::new(
                ir.clone(),
                shard.map(|s| s.rows),
                threads,
            )?)),
        };
        if let Some(c) = &cpu {
            debug_assert_eq!(c.rounds(), round_len.len());
            debug_assert_eq!(c.local_layout(), &local);
        }
        Ok(StagedPlan {
            ir,
            shard,
            local,
            seq,
            frees,
            slots,
            round_len,
            engine,
            cpu,
        })
    }

    /// The whole tensor's layout (shape and factored axes).
    pub fn layout(&self) -> &Layout {
        &self.ir.layout
    }

    /// The shard's layout: the whole tensor's with its local number of rows (what the local
    /// parameter, gradient and [`TensorState`] buffers are sized by).
    pub fn local_layout(&self) -> &Layout {
        &self.local
    }

    /// What runs the stages.
    pub fn engine(&self) -> StageEngine {
        self.engine
    }

    /// The rows this plan steps (`None`: the whole tensor, not sharded).
    pub fn shard(&self) -> Option<RowShard> {
        self.shard
    }

    /// Number of combine rounds (all-reduces) the step needs: 0, 1 or 2.
    pub fn rounds(&self) -> usize {
        self.round_len.len()
    }

    /// Number of f64 partial sums in round `round`'s buffer.
    pub fn round_len(&self, round: usize) -> usize {
        self.round_len[round]
    }

    /// What round `round` carries: per cross-shard mean, its note (e.g. `mean of feature 3²`),
    /// its offset in the buffer and its length, in node order.
    pub fn round_contents(&self, round: usize) -> Vec<(String, usize, usize)> {
        self.slots[round]
            .iter()
            .map(|&(id, off)| {
                let node = self.ir.node(id);
                let len = node.width as usize * self.ir.layout.domain_len(node.domain);
                (
                    node.note.clone().unwrap_or_else(|| id.to_string()),
                    off,
                    len,
                )
            })
            .collect()
    }

    /// Starts a step of the local shard: checks the arguments and runs stage 0. Nothing the
    /// caller owns is modified by a staged step; [`StagedStep::finish`] returns the results.
    pub fn begin(
        self: &Arc<Self>,
        param: &[f32],
        grad: &[f32],
        state: &TensorState,
        hyper: Hyper,
    ) -> Result<StagedStep> {
        let n = self.local.numel();
        for (what, len) in [("param", param.len()), ("grad", grad.len())] {
            if len != n {
                return Err(Error::argument(
                    what,
                    format!(
                        "has {len} values; the shard of {} holds {n} values ({} rows)",
                        self.ir.layout.shape(),
                        self.local.dims()[0]
                    ),
                ));
            }
        }
        hyper.validate()?;
        if state.layout() != &self.local {
            return Err(Error::argument(
                "state",
                format!(
                    "is for a {} tensor of {} rows, the shard of {} has {} rows",
                    state.layout().shape(),
                    state.layout().dims()[0],
                    self.ir.layout.shape(),
                    self.local.dims()[0]
                ),
            ));
        }
        // At the counter's limit the step is refused before any stage runs (on either engine).
        let next = crate::state::next_step(state.step)?;
        if let Some(cpu) = &self.cpu {
            return Ok(StagedStep(StepOn::Cpu(
                cpu.begin(param, grad, state, hyper)?,
            )));
        }
        let mut new_state = state.clone();
        new_state.step = next;
        let mut step = InterpStep {
            plan: self.clone(),
            values: vec![None; self.ir.nodes.len()],
            maps: HashMap::new(),
            param: param.to_vec(),
            new_param: param.to_vec(),
            grad: grad.to_vec(),
            old_state: state.clone(),
            new_state,
            hyper,
            next_stage: 0,
            partials: Vec::new(),
        };
        step.run_stage(&[])?;
        Ok(StagedStep(StepOn::Interp(step)))
    }
}

/// A step of one shard in flight (see [`StagedPlan`]), on the plan's [`StageEngine`].
pub struct StagedStep(StepOn);

enum StepOn {
    Interp(InterpStep),
    Cpu(CpuStagedStep),
}

impl StagedStep {
    /// This rank's partial sums for the current round (empty once the step is done).
    pub fn partials(&self) -> &[f64] {
        match &self.0 {
            StepOn::Interp(s) => s.partials(),
            StepOn::Cpu(s) => s.partials(),
        }
    }

    /// Whether every stage has run.
    pub fn is_done(&self) -> bool {
        match &self.0 {
            StepOn::Interp(s) => s.is_done(),
            StepOn::Cpu(s) => s.is_done(),
        }
    }

    /// Gives the current round's sums over every rank and runs the next stage.
    pub fn advance(&mut self, combined: &[f64]) -> Result<()> {
        match &mut self.0 {
            StepOn::Interp(s) => s.advance(combined),
            StepOn::Cpu(s) => s.advance(combined),
        }
    }

    /// Whether the new parameter and state are all finite (meaningful once done).
    pub fn outputs_finite(&self) -> bool {
        match &self.0 {
            StepOn::Interp(s) => {
                s.new_param.iter().all(|x| x.is_finite())
                    && s.new_state
                        .iter()
                        .all(|(_, v)| v.iter().all(|x| x.is_finite()))
            }
            StepOn::Cpu(s) => s.outputs_finite(),
        }
    }

    /// The new local parameter and state (step counter + 1), once done.
    pub fn finish(self) -> Result<(Vec<f32>, TensorState)> {
        match self.0 {
            StepOn::Interp(s) => s.finish(),
            StepOn::Cpu(s) => s.finish(),
        }
    }
}

/// The reference evaluator's step in flight: every node over the local buffers, as the
/// interpreter computes it.
struct InterpStep {
    plan: Arc<StagedPlan>,
    values: Vec<Option<Vec<f32>>>,
    maps: HashMap<(Domain, Domain), Arc<Vec<usize>>>,
    param: Vec<f32>,
    new_param: Vec<f32>,
    grad: Vec<f32>,
    old_state: TensorState,
    new_state: TensorState,
    hyper: Hyper,
    next_stage: usize,
    partials: Vec<f64>,
}

impl InterpStep {
    fn partials(&self) -> &[f64] {
        &self.partials
    }

    fn is_done(&self) -> bool {
        self.next_stage > self.plan.rounds()
    }

    fn advance(&mut self, combined: &[f64]) -> Result<()> {
        if self.is_done() {
            return Err(Error::argument(
                "combined",
                "the staged step is already done: no round is waiting for sums",
            ));
        }
        let want = self.plan.round_len(self.next_stage - 1);
        if combined.len() != want {
            return Err(Error::argument(
                "combined",
                format!(
                    "{} sums given for round {} of {}; it has {want}",
                    combined.len(),
                    self.next_stage - 1,
                    self.plan.ir.layout.shape()
                ),
            ));
        }
        self.run_stage(combined)
    }

    fn finish(self) -> Result<(Vec<f32>, TensorState)> {
        if !self.is_done() {
            return Err(Error::argument(
                "staged step",
                format!(
                    "not done: stage {} of {} is next",
                    self.next_stage,
                    self.plan.rounds()
                ),
            ));
        }
        Ok((self.new_param, self.new_state))
    }

    fn map(&mut self, big: Domain, small: Domain) -> Option<Arc<Vec<usize>>> {
        if big == small {
            return None;
        }
        let local = &self.plan.local;
        Some(
            self.maps
                .entry((big, small))
                .or_insert_with(|| Arc::new(local.broadcast_index(big, small)))
                .clone(),
        )
    }

    fn run_stage(&mut self, combined: &[f64]) -> Result<()> {
        let plan = self.plan.clone();
        let stage = self.next_stage;
        let ir = &*plan.ir;
        let global = &ir.layout;
        let local = &plan.local;
        let round_out = (stage < plan.rounds()).then_some(stage);
        self.partials = vec![0.0; round_out.map_or(0, |r| plan.round_len(r))];
        let slot_of: HashMap<ValueId, usize> = if stage > 0 {
            plan.slots[stage - 1].iter().copied().collect()
        } else {
            HashMap::new()
        };
        let out_slot: HashMap<ValueId, usize> = round_out
            .map(|r| plan.slots[r].iter().copied().collect())
            .unwrap_or_default();
        for (pos, item) in plan.seq[stage].iter().enumerate() {
            match *item {
                Item::Eval(id) => {
                    let out = if let Some(&off) = slot_of.get(&id) {
                        let node = ir.node(id);
                        let Op::Mean(a) = node.op else {
                            unreachable!("only means are combined")
                        };
                        let len = node.width as usize * global.domain_len(node.domain);
                        let count = (global.domain_len(ir.node(a).domain)
                            / global.domain_len(node.domain))
                            as f64;
                        Some(
                            combined[off..off + len]
                                .iter()
                                .map(|&s| (s / count) as f32)
                                .collect(),
                        )
                    } else {
                        self.eval(id)
                    };
                    self.values[id.index()] = out;
                }
                Item::Partial(id) => {
                    let node = ir.node(id);
                    let Op::Mean(a) = node.op else {
                        unreachable!("only means have partial sums")
                    };
                    let from = ir.node(a).domain;
                    let w = node.width as usize;
                    let map = self.map(from, node.domain);
                    let off = out_slot[&id];
                    let va = self.values[a.index()]
                        .as_ref()
                        .expect("a mean's operand is live at its partial sums");
                    for p in 0..local.domain_len(from) {
                        let q = if node.domain == Domain::Step {
                            0
                        } else {
                            map.as_ref().map_or(p, |m| m[p])
                        };
                        for l in 0..w {
                            self.partials[off + q * w + l] += va[p * w + l] as f64;
                        }
                    }
                }
            }
            for &v in &plan.frees[stage][pos] {
                self.values[v.index()] = None;
            }
        }
        self.next_stage += 1;
        Ok(())
    }

    /// One node on the local buffers, as the reference interpreter computes it.
    fn eval(&mut self, id: ValueId) -> Option<Vec<f32>> {
        let plan = self.plan.clone();
        let ir = &*plan.ir;
        let node = ir.node(id);
        let local = &plan.local;
        let n = local.domain_len(node.domain);
        let w = node.width as usize;
        let at = |m: &Option<Arc<Vec<usize>>>, p: usize| m.as_ref().map_or(p, |m| m[p]);
        match &node.op {
            Op::Load { buffer, lane } => {
                let data: &[f32] = match buffer {
                    Buffer::Param => &self.param,
                    Buffer::Grad => &self.grad,
                    b => self.old_state.get(*b),
                };
                let start = *lane as usize * n;
                Some(data[start..start + n].to_vec())
            }
            Op::Scalar(s) => Some(vec![match s {
                RuntimeScalar::Lr => self.hyper.lr,
                RuntimeScalar::WeightDecay => self.hyper.weight_decay,
                RuntimeScalar::StepCount => self.old_state.step as f32,
            }]),
            Op::Const(c) => Some(vec![*c as f32]),
            Op::Unary(op, a) => Some(
                self.values[a.index()]
                    .as_ref()
                    .expect("operand computed")
                    .iter()
                    .map(|&x| unary(*op, x))
                    .collect(),
            ),
            Op::Binary(op, a, b) => {
                let ma = self.map(node.domain, ir.node(*a).domain);
                let mb = self.map(node.domain, ir.node(*b).domain);
                let va = self.values[a.index()].as_ref().expect("operand computed");
                let vb = self.values[b.index()].as_ref().expect("operand computed");
                let mut out = Vec::with_capacity(n * w);
                for p in 0..n {
                    let (pa, pb) = (at(&ma, p) * w, at(&mb, p) * w);
                    for l in 0..w {
                        out.push(binary(*op, va[pa + l], vb[pb + l]));
                    }
                }
                Some(out)
            }
            Op::Mean(a) => {
                // A mean that stays on this rank (it does not cross the sharded axis).
                let from = ir.node(*a).domain;
                let map = self.map(from, node.domain);
                let va = self.values[a.index()].as_ref().expect("operand computed");
                let mut sums = vec![0f64; n * w];
                for p in 0..local.domain_len(from) {
                    let q = if node.domain == Domain::Step {
                        0
                    } else {
                        at(&map, p)
                    };
                    for l in 0..w {
                        sums[q * w + l] += va[p * w + l] as f64;
                    }
                }
                let global = &ir.layout;
                let count = global.mean_count(from, node.domain) as f64;
                Some(sums.into_iter().map(|s| (s / count) as f32).collect())
            }
            Op::Pack(xs) => {
                let maps: Vec<_> = xs
                    .iter()
                    .map(|x| self.map(node.domain, ir.node(*x).domain))
                    .collect();
                let mut out = Vec::with_capacity(n * w);
                for p in 0..n {
                    for (x, m) in xs.iter().zip(&maps) {
                        out.push(
                            self.values[x.index()].as_ref().expect("operand computed")[at(m, p)],
                        );
                    }
                }
                Some(out)
            }
            Op::Dense { matrix, x } => {
                let m = ir.matrix(*matrix);
                let vx = self.values[x.index()].as_ref().expect("operand computed");
                let mut out = Vec::with_capacity(n * m.rows);
                for xp in vx.chunks_exact(m.cols).take(n) {
                    for (r, wr) in m.weight.chunks_exact(m.cols).enumerate() {
                        // The interpreter's order: the bias, then each product in turn.
                        let bias = m.bias.as_ref().map_or(0.0, |b| b[r]);
                        out.push(wr.iter().zip(xp).fold(bias, |acc, (&w, &x)| acc + w * x));
                    }
                }
                Some(out)
            }
            Op::Lane { x, lane } => {
                let wx = ir.node(*x).width as usize;
                Some(
                    self.values[x.index()]
                        .as_ref()
                        .expect("operand computed")
                        .chunks_exact(wx)
                        .map(|c| c[*lane as usize])
                        .collect(),
                )
            }
            Op::Store {
                buffer,
                lane,
                value,
            } => {
                let map = self.map(node.domain, ir.node(*value).domain);
                let v = self.values[value.index()]
                    .as_ref()
                    .expect("operand computed");
                let dst: &mut [f32] = match buffer {
                    Buffer::Param => &mut self.new_param,
                    b => self.new_state.get_mut(*b),
                };
                let start = *lane as usize * n;
                for p in 0..n {
                    dst[start + p] = v[at(&map, p)];
                }
                None
            }
        }
    }
}

/// One parameter of a [`ShardedModel`]: its name, the whole tensor's layout and the rows this
/// rank holds.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardedParam {
    /// A unique name (reports, errors).
    pub name: String,
    /// The whole tensor's shape and factored axes.
    pub layout: Layout,
    /// The rows of axis 0 this rank holds; `None`: not sharded (replicated: every rank holds
    /// and steps all of it, with the same gradient).
    pub shard: Option<RowShard>,
}

impl ShardedParam {
    /// A parameter of the whole-tensor `shape` (factored axes: `axes`, or the default), of
    /// which this rank holds `shard`. A shard outside the tensor is an error naming it.
    pub fn new(
        name: impl Into<String>,
        shape: &Shape,
        axes: Option<FactoredAxes>,
        shard: Option<RowShard>,
    ) -> Result<Self> {
        let name = name.into();
        let layout = Layout::with_axes(shape.clone(), axes)
            .map_err(|e| Error::argument(&name, e.to_string()))?;
        if let Some(s) = shard {
            s.check(&layout)
                .map_err(|why| Error::argument(&name, why))?;
        }
        Ok(ShardedParam {
            name,
            layout,
            shard,
        })
    }

    /// Number of values this rank holds.
    pub fn local_numel(&self) -> usize {
        match self.shard {
            Some(s) => self.layout.with_local_rows(s.rows).numel(),
            None => self.layout.numel(),
        }
    }
}

/// What is in flight between [`ShardedModel::begin`] and [`ShardedModel::finish`].
struct Pending {
    /// Next round to be combined (the buffer last returned is for this round).
    round: usize,
    hypers: Vec<Hyper>,
    grads: Vec<Option<Vec<f32>>>,
    params: Vec<Vec<f32>>,
    steps: Vec<Option<StagedStep>>,
    /// Tensors stepped this step (decided when round 0 is combined).
    active: Vec<bool>,
    report: StepReport,
}

/// A whole model's local shards, stepped together with one buffer per round.
///
/// **Contract** (every rank holds a `ShardedModel` of the same tensors, in the same order,
/// with the same whole shapes and factored axes; their shards tile axis 0):
///
/// 1. `begin(params, grads, hypers)` returns the buffer of round 0; for each further round,
///    the host sums the buffer over every rank (an all-reduce, `f64`, sum) and gives the sum to
///    `advance`, which returns the next round's buffer; the sum of the last round goes to
///    `finish`, which writes the parameters and keeps the new state. [`rounds`](Self::rounds)
///    is the number of buffers per step, [`round_len`](Self::round_len) their sizes: both are
///    fixed for the model (whatever the gradients hold), so every rank's buffers match.
/// 2. Round 0 starts with a header of 2·T values (T tensors): the number of non-finite values
///    in each tensor's local gradient, then 1 for each tensor given no gradient; with
///    per-tensor clipping, T more values follow: each local Σ g² (f64). Then (without clipping)
///    the partial sums of the tensors' first stage.
/// 3. A *level round* holds, for every tensor with that many rounds ([`StagedPlan::rounds`]),
///    the partial sums of its stage ([`StagedPlan::round_contents`]), in tensor order; with
///    clipping, level round ℓ is round ℓ + 1, else round ℓ (round 0 carrying the header).
///    When no tensor has a round, round 0 is the header alone.
/// 4. The last round holds T values: 1 where this rank's new parameter or state of the
///    tensor is not finite (the guard). A tensor is written only when the sum is 0 on every
///    rank, so every rank keeps or undoes the same tensors.
///
/// Non-finite gradients are decided from the combined header: with `Skip`, a tensor with any
/// non-finite value on any rank is skipped everywhere; with `Zero`, each rank replaces its own
/// values (JAX's `nan_to_num`) before the step; with `Error`, every rank returns the same
/// error from `advance` of round 0, nothing changed. A step that fails leaves the parameters
/// and the state unchanged.
pub struct ShardedModel {
    lopt_fingerprint: String,
    params: Vec<ShardedParam>,
    plans: Vec<Arc<StagedPlan>>,
    states: Vec<TensorState>,
    max_grad_norm: Option<f32>,
    nonfinite: NonFinitePolicy,
    step: u64,
    pending: Option<Pending>,
}

impl std::fmt::Debug for ShardedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedModel")
            .field("params", &self.params.len())
            .field("rounds", &self.rounds())
            .field("step", &self.step)
            .finish()
    }
}

impl ShardedModel {
    /// A model of `params` at step 0, zero state; `max_grad_norm`: per-tensor clipping over the
    /// whole tensor (PyLO's rule). The stages run on the native CPU backend
    /// ([`StageEngine::default`]).
    pub fn new(
        lopt: &LearnedOptimizer,
        params: Vec<ShardedParam>,
        max_grad_norm: Option<f32>,
        nonfinite: NonFinitePolicy,
    ) -> Result<Self> {
        Self::with_engine(
            lopt,
            params,
            max_grad_norm,
            nonfinite,
            StageEngine::default(),
        )
    }

    /// As [`new`](Self::new), every tensor's stages running on `engine`
    /// ([`StageEngine::Interp`]: the reference evaluator).
    pub fn with_engine(
        lopt: &LearnedOptimizer,
        params: Vec<ShardedParam>,
        max_grad_norm: Option<f32>,
        nonfinite: NonFinitePolicy,
        engine: StageEngine,
    ) -> Result<Self> {
        clip::check_max_norm("max_grad_norm", max_grad_norm)?;
        let mut seen = std::collections::HashSet::new();
        let mut cache: HashMap<Layout, Arc<StepIr>> = HashMap::new();
        let mut plan_cache: HashMap<(Layout, Option<RowShard>), Arc<StagedPlan>> = HashMap::new();
        let mut plans = Vec::with_capacity(params.len());
        let mut states = Vec::with_capacity(params.len());
        for (i, p) in params.iter().enumerate() {
            if p.name.is_empty() || !seen.insert(p.name.as_str()) {
                return Err(Error::argument(
                    format!("params[{i}]"),
                    format!("the parameter name `{}` is empty or given twice", p.name),
                ));
            }
            let ir = match cache.get(&p.layout) {
                Some(ir) => ir.clone(),
                None => {
                    let ir = Arc::new(crate::compile_layout(&p.layout, lopt)?);
                    cache.insert(p.layout.clone(), ir.clone());
                    ir
                }
            };
            // Tensors of the same shape and rows share one plan (and its compiled program).
            let plan = match plan_cache.get(&(p.layout.clone(), p.shard)) {
                Some(plan) => plan.clone(),
                None => {
                    let plan = Arc::new(
                        StagedPlan::with_engine(ir, p.shard, engine)
                            .map_err(|e| Error::argument(&p.name, e.to_string()))?,
                    );
                    plan_cache.insert((p.layout.clone(), p.shard), plan.clone());
                    plan
                }
            };
            states.push(TensorState::zeros(plan.local_layout(), 0));
            plans.push(plan);
        }
        Ok(ShardedModel {
            lopt_fingerprint: lopt.fingerprint(),
            params,
            plans,
            states,
            max_grad_norm,
            nonfinite,
            step: 0,
            pending: None,
        })
    }

    /// The parameters, in order.
    pub fn params(&self) -> &[ShardedParam] {
        &self.params
    }

    /// Each tensor's staged plan.
    pub fn plans(&self) -> &[Arc<StagedPlan>] {
        &self.plans
    }

    /// Fingerprint of the learned optimizer.
    pub fn lopt_fingerprint(&self) -> &str {
        &self.lopt_fingerprint
    }

    /// Steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Sets the step counter (and every tensor's), e.g. when resuming.
    pub fn set_step_count(&mut self, step: u64) {
        self.step = step;
        for s in &mut self.states {
            s.step = step;
        }
    }

    /// Changes the per-tensor clipping norm (takes effect at the next `begin`; it changes the
    /// number of rounds).
    pub fn set_max_grad_norm(&mut self, max_grad_norm: Option<f32>) -> Result<()> {
        clip::check_max_norm("max_grad_norm", max_grad_norm)?;
        self.max_grad_norm = max_grad_norm;
        Ok(())
    }

    /// Tensor `index`'s local state (canonical layout, sized by the shard's rows).
    pub fn state(&self, index: usize) -> Result<&TensorState> {
        self.states
            .get(index)
            .ok_or_else(|| Error::argument("index", format!("no tensor {index}")))
    }

    /// Replaces tensor `index`'s local state; it must be for the shard's local layout, and its
    /// values a state stepping can reach ([`TensorState::validate`]: finite, accumulators
    /// ≥ 0, |mom| < 2^64). Refused, naming the tensor and the rule, with nothing changed.
    /// Its step counter is replaced by the model's.
    pub fn set_state(&mut self, index: usize, mut state: TensorState) -> Result<()> {
        let plan = self
            .plans
            .get(index)
            .ok_or_else(|| Error::argument("index", format!("no tensor {index}")))?;
        if state.layout() != plan.local_layout() {
            return Err(Error::argument(
                format!("state of `{}`", self.params[index].name),
                format!(
                    "is for {} rows of a {} tensor; this rank holds {} rows of {}",
                    state.layout().dims()[0],
                    state.layout().shape(),
                    plan.local_layout().dims()[0],
                    plan.layout().shape()
                ),
            ));
        }
        state.validate().map_err(|why| {
            Error::argument(
                format!("state of `{}`", self.params[index].name),
                format!("refused, nothing was changed: {why}"),
            )
        })?;
        state.step = self.step;
        self.states[index] = state;
        Ok(())
    }

    fn level_rounds(&self) -> usize {
        self.plans.iter().map(|p| p.rounds()).max().unwrap_or(0)
    }

    /// Whether round 0 is the header alone (clipping, or no tensor has a level round).
    fn header_alone(&self) -> bool {
        self.max_grad_norm.is_some() || self.level_rounds() == 0
    }

    /// Buffers per step: the header and level rounds, then the guard round.
    pub fn rounds(&self) -> usize {
        self.header_alone() as usize + self.level_rounds() + 1
    }

    fn header_len(&self) -> usize {
        let t = self.params.len();
        2 * t + if self.max_grad_norm.is_some() { t } else { 0 }
    }

    /// Which level round buffer `round` holds, if any.
    fn level_of(&self, round: usize) -> Option<usize> {
        let level = round.checked_sub(self.header_alone() as usize)?;
        (level < self.level_rounds()).then_some(level)
    }

    /// Number of f64 values in round `round`'s buffer.
    pub fn round_len(&self, round: usize) -> usize {
        let mut len = if round == 0 { self.header_len() } else { 0 };
        if let Some(level) = self.level_of(round) {
            len += self
                .plans
                .iter()
                .filter(|p| p.rounds() > level)
                .map(|p| p.round_len(level))
                .sum::<usize>();
        }
        if round + 1 == self.rounds() {
            len += self.params.len();
        }
        len
    }

    /// Starts a step: checks every argument and returns this rank's buffer of round 0.
    /// `params[i]`, `grads[i]` are tensor `i`'s local rows (`None`: no gradient; the tensor is
    /// then left unchanged on every rank); `hypers[i]` its (μP-scaled) lr and weight decay.
    /// A step already in flight is abandoned.
    pub fn begin(
        &mut self,
        params: &[&[f32]],
        grads: &[Option<&[f32]>],
        hypers: &[Hyper],
    ) -> Result<Vec<f64>> {
        self.pending = None;
        // At the counter's limit the step is refused before anything starts.
        crate::state::next_step(self.step)?;
        let t = self.params.len();
        for (what, len) in [
            ("params", params.len()),
            ("grads", grads.len()),
            ("hypers", hypers.len()),
        ] {
            if len != t {
                return Err(Error::argument(
                    what,
                    format!("{len} given; the model has {t} tensors"),
                ));
            }
        }
        for (i, p) in self.params.iter().enumerate() {
            let want = p.local_numel();
            let glen = grads[i].map_or(want, |g| g.len());
            for (what, len) in [("param", params[i].len()), ("grad", glen)] {
                if len != want {
                    return Err(Error::argument(
                        format!("{what} `{}`", p.name),
                        format!("has {len} values; this rank holds {want} values of it"),
                    ));
                }
            }
            hypers[i]
                .validate()
                .map_err(|e| Error::argument(format!("hyper of `{}`", p.name), e.to_string()))?;
        }
        let mut report = StepReport {
            step: self.step,
            ..Default::default()
        };
        let mut header = vec![0f64; self.header_len()];
        let mut work: Vec<Option<Vec<f32>>> = Vec::with_capacity(t);
        for (i, g) in grads.iter().enumerate() {
            let Some(g) = g else {
                header[t + i] = 1.0;
                work.push(None);
                continue;
            };
            let c = NonFiniteCount::of(g);
            header[i] = (c.nan + c.pos_inf + c.neg_inf) as f64;
            let mut g = g.to_vec();
            if !c.is_clean() {
                report.nonfinite.push((self.params[i].name.clone(), c));
                if self.nonfinite == NonFinitePolicy::Zero {
                    nonfinite::nan_to_num(&mut g);
                }
            }
            if self.max_grad_norm.is_some() {
                header[2 * t + i] = clip::sum_squares(&g);
            }
            work.push(Some(g));
        }
        let mut pending = Pending {
            round: 0,
            hypers: hypers.to_vec(),
            grads: work,
            params: params.iter().map(|p| p.to_vec()).collect(),
            steps: (0..t).map(|_| None).collect(),
            active: vec![false; t],
            report,
        };
        let mut buf = header;
        if !self.header_alone() {
            // Stage 0 now, before the decisions: its partials ride with the header.
            for i in 0..t {
                let step = match &pending.grads[i] {
                    Some(g) => Some(self.plans[i].begin(
                        &pending.params[i],
                        g,
                        &self.states[i],
                        pending.hypers[i],
                    )?),
                    None => None,
                };
                if self.plans[i].rounds() > 0 {
                    match &step {
                        Some(s) => buf.extend_from_slice(s.partials()),
                        None => buf.resize(buf.len() + self.plans[i].round_len(0), 0.0),
                    }
                }
                pending.steps[i] = step;
            }
        }
        self.pending = Some(pending);
        debug_assert_eq!(buf.len(), self.round_len(0));
        Ok(buf)
    }

    /// Gives the sum over every rank of the current round's buffer; returns this rank's buffer
    /// of the next round. On error the step is abandoned and nothing has changed.
    pub fn advance(&mut self, combined: &[f64]) -> Result<Vec<f64>> {
        let mut pending = self.pending.take().ok_or_else(|| {
            Error::argument("combined", "no sharded step in flight: call begin first")
        })?;
        let round = pending.round;
        if round + 1 >= self.rounds() {
            self.pending = Some(pending);
            return Err(Error::argument(
                "combined",
                "this is the last round's sum: give it to finish",
            ));
        }
        if combined.len() != self.round_len(round) {
            return Err(Error::argument(
                "combined",
                format!(
                    "{} values given for round {round}; it has {} (do all ranks hold the same \
                     tensors?)",
                    combined.len(),
                    self.round_len(round)
                ),
            ));
        }
        let t = self.params.len();
        let mut rest = combined;
        if round == 0 {
            self.decide(&mut pending, &combined[..self.header_len()])?;
            rest = &combined[self.header_len()..];
        }
        // The sums of this round's level go to the tensors that have it.
        if let Some(level) = self.level_of(round) {
            let mut off = 0;
            for i in 0..t {
                if self.plans[i].rounds() <= level {
                    continue;
                }
                let len = self.plans[i].round_len(level);
                if pending.active[i] {
                    pending.steps[i]
                        .as_mut()
                        .expect("an active tensor has a step in flight")
                        .advance(&rest[off..off + len])?;
                }
                off += len;
            }
        }
        pending.round += 1;
        let next = pending.round;
        let mut buf = Vec::with_capacity(self.round_len(next));
        if let Some(level) = self.level_of(next) {
            for i in 0..t {
                if self.plans[i].rounds() <= level {
                    continue;
                }
                match (&pending.steps[i], pending.active[i]) {
                    (Some(s), true) => buf.extend_from_slice(s.partials()),
                    _ => buf.resize(buf.len() + self.plans[i].round_len(level), 0.0),
                }
            }
        }
        if next + 1 == self.rounds() {
            for i in 0..t {
                let bad = match (&pending.steps[i], pending.active[i]) {
                    (Some(s), true) => !s.outputs_finite(),
                    _ => false,
                };
                buf.push(bad as u8 as f64);
            }
        }
        self.pending = Some(pending);
        Ok(buf)
    }

    /// Round 0's combined header: which tensors step, clipping, and (after clipping) stage 0.
    fn decide(&self, pending: &mut Pending, header: &[f64]) -> Result<()> {
        let t = self.params.len();
        let mut refused = Vec::new();
        for i in 0..t {
            let name = &self.params[i].name;
            if header[t + i] > 0.0 {
                pending.report.without_grad.push(name.clone());
                continue;
            }
            if header[i] > 0.0 {
                match self.nonfinite {
                    NonFinitePolicy::Skip => {
                        pending.report.skipped.push(name.clone());
                        continue;
                    }
                    NonFinitePolicy::Error => {
                        refused.push(format!("`{name}` ({} values)", header[i]));
                        continue;
                    }
                    NonFinitePolicy::Zero => pending.report.sanitized.push(name.clone()),
                }
            }
            pending.active[i] = true;
        }
        if !refused.is_empty() {
            return Err(Error::argument(
                "grads",
                format!(
                    "non-finite gradient in {} (over all ranks); nothing was changed \
                     (non-finite policy: error)",
                    refused.join(", ")
                ),
            ));
        }
        if let Some(max_norm) = self.max_grad_norm {
            for i in 0..t {
                if !pending.active[i] {
                    continue;
                }
                let norm = header[2 * t + i].sqrt();
                let g = pending.grads[i]
                    .as_mut()
                    .expect("active tensors have grads");
                if let Some(coef) = clip::clip_coef(norm, max_norm) {
                    clip::scale(g, coef);
                    pending
                        .report
                        .clipped
                        .push((self.params[i].name.clone(), norm));
                }
                pending.steps[i] = Some(self.plans[i].begin(
                    &pending.params[i],
                    g,
                    &self.states[i],
                    pending.hypers[i],
                )?);
            }
        }
        Ok(())
    }

    /// Gives the sum over every rank of the last (guard) round; writes the new local
    /// parameters of every tensor stepped and kept on every rank into `params`, keeps their
    /// state, and advances the step counter (of skipped tensors too).
    pub fn finish(&mut self, combined: &[f64], params: &mut [&mut [f32]]) -> Result<StepReport> {
        let pending = self.pending.take().ok_or_else(|| {
            Error::argument("combined", "no sharded step in flight: call begin first")
        })?;
        let t = self.params.len();
        if pending.round + 1 != self.rounds() {
            let r = pending.round;
            self.pending = Some(pending);
            return Err(Error::argument(
                "combined",
                format!("round {r} is not the last: give its sum to advance"),
            ));
        }
        let guard = &combined[combined.len().saturating_sub(t)..];
        if combined.len() != self.round_len(pending.round) || params.len() != t {
            return Err(Error::argument(
                "combined",
                format!(
                    "{} sums and {} parameters given for the last round; it has {} sums and \
                     the model {t} tensors",
                    combined.len(),
                    params.len(),
                    self.round_len(pending.round)
                ),
            ));
        }
        for (i, p) in params.iter().enumerate() {
            if p.len() != self.params[i].local_numel() {
                return Err(Error::argument(
                    format!("param `{}`", self.params[i].name),
                    format!(
                        "has {} values; this rank holds {}",
                        p.len(),
                        self.params[i].local_numel()
                    ),
                ));
            }
        }
        // Checked again: the counter may have been set (set_step_count) since `begin`.
        let next = crate::state::next_step(self.step)?;
        let mut report = pending.report;
        let mut results = Vec::with_capacity(t);
        for (i, step) in pending.steps.into_iter().enumerate() {
            match step {
                Some(s) if pending.active[i] => {
                    if guard[i] > 0.0 {
                        report.reverted.push(self.params[i].name.clone());
                        report.skipped.push(self.params[i].name.clone());
                        results.push(None);
                    } else {
                        results.push(Some(s.finish()?));
                    }
                }
                _ => results.push(None),
            }
        }
        self.step = next;
        for (i, r) in results.into_iter().enumerate() {
            if let Some((p, s)) = r {
                params[i].copy_from_slice(&p);
                self.states[i] = s;
            }
            self.states[i].step = self.step;
        }
        Ok(report)
    }
}
