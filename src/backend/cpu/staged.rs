//! Staged steps on the native CPU backend: the [`StagePlan`] of a tensor split by rows of
//! axis 0 (one rank's shard, see [`crate::shard`]) rendered with the CPU's chunk programs, so
//! that the element passes (the dense layers) run at native speed on the shard's rows.
//!
//! [`CpuStaged`] is compiled once per (whole-tensor IR, local rows): the IR with the shard's
//! layout (the whole tensor's factored axes, `rows` rows on axis 0), one chunk program per
//! pass of the plan. A step ([`CpuStagedStep`]) runs stage 0 at [`CpuStaged::begin`] and
//! leaves this shard's partial sums of round 0 in [`CpuStagedStep::partials`]; each
//! [`advance`](CpuStagedStep::advance) takes the sums of the current round over every shard
//! and runs the next stage; the last stage writes the new parameter and state, returned by
//! [`finish`](CpuStagedStep::finish). Nothing the caller owns changes before `finish`.
//!
//! - Small-domain nodes are evaluated with the interpreter's per-node evaluator, as in
//!   [`CpuStepper`](super::CpuStepper); every mean divides by the **whole** tensor's count.
//! - A cross mean (over axis 0) reads its combined sums; an element mean that stays on the
//!   shard reads the partial sums of its pass, added slice by slice in order.
//! - Round buffers hold f64 sums in [`StagePlan::round_slots`] order: the element sums are the
//!   pass's slice partials added in slice order, the small-domain sums are added point by
//!   point in order (as the interpreter does).
//!
//! Results are bitwise the same for any thread count (the slices depend on the shard's shape
//! only), and equal the interpreter's staged step within the CPU backend's tolerance (FMA
//! dense layers, sums grouped by slice).

use super::exec::Scratch;
use super::program::{build_pass, CpuProgram, MeanSpec, Pass};
use super::stepper::{
    lane_major_nodes, run_pass, store_small, write_lane_major, PassData, SmallInputs,
};
use super::Isa;
use crate::backend::interp::{at, eval_node};
use crate::backend::Hyper;
use crate::error::{Error, Result};
use crate::ir::{Buffer, Op, StepIr, ValueId};
use crate::plan::{elem_closure, StagePlan};
use crate::shape::{Domain, Layout};
use crate::state::TensorState;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// One unit of a stage's work, in order.
#[derive(Clone, Copy, Debug)]
enum Work {
    /// Evaluate a small-domain node.
    Small(usize),
    /// Run a pass over the shard's elements.
    Pass(usize),
}

/// A tensor's staged step compiled for the CPU, for one shard (see the module documentation).
#[derive(Debug)]
pub struct CpuStaged {
    /// The whole tensor's IR (its layout gives the counts of every mean).
    global: Arc<StepIr>,
    plan: StagePlan,
    /// The program of the IR with the shard's layout: weights, chunk index kinds, broadcasts.
    prog: CpuProgram,
    /// The plan's passes, compiled.
    passes: Vec<Pass>,
    /// Element mean → (pass, index in its means).
    mean_of: HashMap<usize, (usize, usize)>,
    /// Per stage: the work in order.
    work: Vec<Vec<Work>>,
    /// Per round: (cross mean, offset), and the buffer length.
    slots: Vec<Vec<(ValueId, usize)>>,
    round_len: Vec<usize>,
    /// Cross mean → offset in the buffer of the round it is combined in.
    slot_of: HashMap<usize, usize>,
    /// Small nodes the passes read lane by lane with a width above 1 (kept lane-major too).
    lane_major: Vec<bool>,
    threads: usize,
    isa: Isa,
}

impl CpuStaged {
    /// Compiles the staged step of `ir` (compiled for the whole tensor) for a shard of
    /// `local_rows` rows of axis 0 (`None`: not split, one stage), on `threads` threads (at
    /// least 1; results do not depend on it). A shard larger than the tensor, or of a 0-d
    /// tensor, is an error.
    pub fn new(ir: Arc<StepIr>, local_rows: Option<usize>, threads: usize) -> Result<Self> {
        let global = &ir.layout;
        let local: Layout = match local_rows {
            Some(rows) => {
                global
                    .check_local_rows(rows)
                    .map_err(|e| Error::argument("local_rows", e))?;
                global.with_local_rows(rows)
            }
            None => global.clone(),
        };
        let plan = StagePlan::of(&ir, local_rows.map(|_| 0));
        let local_ir = Arc::new(StepIr {
            layout: local.clone(),
            nodes: ir.nodes.clone(),
            matrices: ir.matrices.clone(),
            lopt_fingerprint: ir.lopt_fingerprint.clone(),
        });
        let prog = CpuProgram::new(local_ir.clone());
        let buf_id = |b: Buffer, lane: u32| {
            prog.elem_bufs
                .iter()
                .position(|&x| x == (b, lane))
                .expect("element buffer of the layout")
        };
        let mut passes = Vec::with_capacity(plan.passes.len());
        let mut mean_of = HashMap::new();
        for (k, p) in plan.passes.iter().enumerate() {
            let (nodes, _) = elem_closure(&local_ir, &plan.pass_roots(&local_ir, k));
            let mut specs = Vec::with_capacity(p.means.len());
            let mut partial_len = 0;
            for (i, &m) in p.means.iter().enumerate() {
                let node = local_ir.node(m);
                let points = local.domain_len(node.domain);
                let width = node.width as usize;
                specs.push(MeanSpec {
                    node: m.index(),
                    domain: node.domain,
                    width,
                    points,
                    offset: partial_len,
                });
                partial_len += points * width;
                mean_of.insert(m.index(), (k, i));
            }
            passes.push(build_pass(
                &local_ir,
                &nodes,
                specs,
                partial_len,
                &buf_id,
                prog.elem_bufs.len(),
            ));
        }
        let mut work = Vec::with_capacity(plan.rounds() + 1);
        for s in 0..=plan.rounds() as u32 {
            let mut w = Vec::new();
            for l in 0..=plan.max_level(s) {
                w.extend(
                    plan.small_nodes(&ir, s, l)
                        .into_iter()
                        .map(|v| Work::Small(v.index())),
                );
                w.extend(
                    plan.passes
                        .iter()
                        .enumerate()
                        .filter(|(_, p)| (p.stage, p.level) == (s, l))
                        .map(|(k, _)| Work::Pass(k)),
                );
            }
            work.push(w);
        }
        let mut slots = Vec::with_capacity(plan.rounds());
        let mut round_len = Vec::with_capacity(plan.rounds());
        let mut slot_of = HashMap::new();
        for r in 0..plan.rounds() {
            let (s, len) = plan.round_slots(&ir, r);
            slot_of.extend(s.iter().map(|&(m, off)| (m.index(), off)));
            slots.push(s);
            round_len.push(len);
        }
        let lane_major = lane_major_nodes(&passes, &ir);
        let threads = threads.clamp(1, prog.slices);
        Ok(CpuStaged {
            global: ir,
            plan,
            prog,
            passes,
            mean_of,
            work,
            slots,
            round_len,
            slot_of,
            lane_major,
            threads,
            isa: Isa::detect(),
        })
    }

    /// The plan the stages render.
    pub fn plan(&self) -> &StagePlan {
        &self.plan
    }

    /// The shard's layout (the whole tensor's with the local rows).
    pub fn local_layout(&self) -> &Layout {
        &self.prog.ir.layout
    }

    /// Number of rounds.
    pub fn rounds(&self) -> usize {
        self.round_len.len()
    }

    /// Number of f64 sums in round `round`'s buffer.
    pub fn round_len(&self, round: usize) -> usize {
        self.round_len[round]
    }

    /// Starts a step of the shard (`param`, `grad`: its rows; `state`: its state, for the
    /// shard's layout) and runs stage 0.
    pub fn begin(
        self: &Arc<Self>,
        param: &[f32],
        grad: &[f32],
        state: &TensorState,
        hyper: Hyper,
    ) -> Result<CpuStagedStep> {
        let local = self.local_layout();
        crate::backend::check_step_args(local, param.len(), grad.len(), &hyper)?;
        // `finish` gives the state step + 1: refused here, at the counter's limit.
        crate::state::next_step(state.step)?;
        if state.layout() != local {
            return Err(Error::argument(
                "state",
                format!(
                    "is for a {} tensor, the shard is {}",
                    state.layout().shape(),
                    local.shape()
                ),
            ));
        }
        let ir = &self.prog.ir;
        let small: Vec<Vec<f32>> = ir
            .nodes
            .iter()
            .map(|node| match node.domain {
                Domain::Elem => Vec::new(),
                d => vec![0.0; local.domain_len(d) * node.width as usize],
            })
            .collect();
        let small_t = small
            .iter()
            .zip(&self.lane_major)
            .map(|(v, &t)| if t { v.clone() } else { Vec::new() })
            .collect();
        let partials = self
            .passes
            .iter()
            .map(|p| vec![vec![0.0; p.partial_len]; self.prog.slices])
            .collect();
        let mut step = CpuStagedStep {
            staged: Arc::clone(self),
            hyper,
            step: state.step,
            param: param.to_vec(),
            grad: grad.to_vec(),
            state: state.iter().map(|(b, d)| (b, d.to_vec())).collect(),
            small,
            small_t,
            partials,
            scratch: (0..self.threads).map(|_| Scratch::default()).collect(),
            out: Vec::new(),
            next_stage: 0,
        };
        step.run_stage(&[]);
        Ok(step)
    }
}

/// A staged CPU step of one shard in flight (see [`CpuStaged`]).
pub struct CpuStagedStep {
    staged: Arc<CpuStaged>,
    hyper: Hyper,
    /// The step counter the step runs with (the old state's).
    step: u64,
    /// The parameter rows; new once the last pass has run.
    param: Vec<f32>,
    grad: Vec<f32>,
    /// The state; new once the last stage has run.
    state: BTreeMap<Buffer, Vec<f32>>,
    small: Vec<Vec<f32>>,
    small_t: Vec<Vec<f32>>,
    /// Per pass, per slice: its partial sums.
    partials: Vec<Vec<Vec<f64>>>,
    scratch: Vec<Scratch>,
    /// This shard's partial sums of the current round.
    out: Vec<f64>,
    next_stage: usize,
}

impl CpuStagedStep {
    /// This shard's partial sums of the current round (empty once done).
    pub fn partials(&self) -> &[f64] {
        &self.out
    }

    /// Whether every stage has run.
    pub fn is_done(&self) -> bool {
        self.next_stage > self.staged.rounds()
    }

    /// Gives the current round's sums over every shard and runs the next stage.
    pub fn advance(&mut self, combined: &[f64]) -> Result<()> {
        if self.is_done() {
            return Err(Error::argument(
                "combined",
                "the staged step is already done: no round is waiting for sums",
            ));
        }
        let round = self.next_stage - 1;
        let want = self.staged.round_len(round);
        if combined.len() != want {
            return Err(Error::argument(
                "combined",
                format!(
                    "{} sums given for round {round} of {}; it has {want}",
                    combined.len(),
                    self.staged.global.layout.shape()
                ),
            ));
        }
        self.run_stage(combined);
        Ok(())
    }

    /// Whether the new parameter and state are all finite (once done).
    pub fn outputs_finite(&self) -> bool {
        self.param.iter().all(|x| x.is_finite())
            && self.state.values().flatten().all(|x| x.is_finite())
    }

    /// The new parameter rows and state (step counter + 1), once done.
    pub fn finish(self) -> Result<(Vec<f32>, TensorState)> {
        if !self.is_done() {
            return Err(Error::argument(
                "staged step",
                format!(
                    "not done: stage {} of {} is next",
                    self.next_stage,
                    self.staged.rounds()
                ),
            ));
        }
        let mut state = TensorState::zeros(self.staged.local_layout(), self.step + 1);
        for (b, data) in self.state {
            state.set(b, data)?;
        }
        Ok((self.param, state))
    }

    fn run_stage(&mut self, combined: &[f64]) {
        let staged = Arc::clone(&self.staged);
        let stage = self.next_stage;
        for &w in &staged.work[stage] {
            match w {
                Work::Small(v) => self.eval_small(v, combined),
                Work::Pass(k) => self.run_pass(k),
            }
        }
        if stage < staged.rounds() {
            self.out = self.round_partials(stage);
        } else {
            self.out = Vec::new();
            store_small(&staged.prog, &self.small, &mut self.state);
        }
        self.next_stage += 1;
    }

    fn run_pass(&mut self, k: usize) {
        let staged = &*self.staged;
        if staged.prog.ir.layout.numel() == 0 {
            // An empty shard: no elements, its partial sums stay 0.
            return;
        }
        let data = PassData {
            small: &self.small,
            small_t: &self.small_t,
            param: &mut self.param,
            grad: &self.grad,
            state: &mut self.state,
        };
        run_pass(
            &staged.prog,
            &staged.passes[k],
            (staged.threads, staged.isa),
            data,
            &mut self.partials[k],
            &mut self.scratch,
        );
    }

    /// The whole tensor's count of mean `v` (elements of its operand per point).
    fn count(&self, v: usize) -> f64 {
        let ir = &self.staged.global;
        let Op::Mean(a) = ir.nodes[v].op else {
            unreachable!("a mean")
        };
        let g = &ir.layout;
        (g.domain_len(ir.node(a).domain) / g.domain_len(ir.nodes[v].domain)) as f64
    }

    /// The sums of element mean `m` over this shard: its pass's slices, in order.
    fn elem_sums(&self, m: usize) -> impl Iterator<Item = f64> + '_ {
        let (k, i) = self.staged.mean_of[&m];
        let spec = &self.staged.passes[k].means[i];
        let parts = &self.partials[k];
        (0..spec.points * spec.width)
            .map(move |j| parts.iter().fold(0f64, |s, part| s + part[spec.offset + j]))
    }

    /// This shard's sums of small-domain mean `m` (over its local points, in order).
    fn small_sums(&self, m: usize) -> Vec<f64> {
        let prog = &self.staged.prog;
        let ir = &prog.ir;
        let node = &ir.nodes[m];
        let Op::Mean(a) = node.op else {
            unreachable!("a mean")
        };
        let from = ir.node(a).domain;
        let layout = &ir.layout;
        let (n, w) = (layout.domain_len(node.domain), node.width as usize);
        let map = prog.bc.map(from, node.domain);
        let va = &self.small[a.index()];
        let mut sums = vec![0f64; n * w];
        for p in 0..layout.domain_len(from) {
            let q = at(map, p, n);
            for l in 0..w {
                sums[q * w + l] += va[p * w + l] as f64;
            }
        }
        sums
    }

    /// Evaluates a small-domain node into `self.small` (and its lane-major copy).
    fn eval_small(&mut self, v: usize, combined: &[f64]) {
        let staged = Arc::clone(&self.staged);
        let prog = &staged.prog;
        let ir = &prog.ir;
        let node = &ir.nodes[v];
        let out: Vec<f32> = match node.op {
            Op::Mean(a) => {
                let count = self.count(v);
                let sums: Vec<f64> = if staged.plan.cross[v] {
                    let off = staged.slot_of[&v];
                    let len = node.width as usize * ir.layout.domain_len(node.domain);
                    combined[off..off + len].to_vec()
                } else if ir.node(a).domain == Domain::Elem {
                    self.elem_sums(v).collect()
                } else {
                    self.small_sums(v)
                };
                sums.into_iter().map(|s| (s / count) as f32).collect()
            }
            _ => {
                let inputs = SmallInputs {
                    small: &self.small,
                    state: &self.state,
                    bc: &prog.bc,
                };
                eval_node(ir, v, &inputs, self.step, &self.hyper)
                    .expect("stores are not small-phase nodes")
            }
        };
        if staged.lane_major[v] {
            let (n, w) = (ir.layout.domain_len(node.domain), node.width as usize);
            write_lane_major(&out, w, n, &mut self.small_t[v]);
        }
        self.small[v] = out;
    }

    /// This shard's buffer of round `round`.
    fn round_partials(&self, round: usize) -> Vec<f64> {
        let staged = &*self.staged;
        let ir = &staged.prog.ir;
        let mut out = vec![0f64; staged.round_len(round)];
        for &(m, off) in &staged.slots[round] {
            let Op::Mean(a) = ir.node(m).op else {
                unreachable!("a cross mean")
            };
            let m = m.index();
            if ir.node(a).domain == Domain::Elem {
                for (o, s) in out[off..].iter_mut().zip(self.elem_sums(m)) {
                    *o = s;
                }
            } else {
                let sums = self.small_sums(m);
                out[off..off + sums.len()].copy_from_slice(&sums);
            }
        }
        out
    }
}
