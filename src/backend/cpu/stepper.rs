//! [`CpuStepper`]: the small phases, the passes on the threads, the stores.

use super::exec::{dispatch, split_views, view, Job, Scratch, View};
use super::program::{CpuProgram, Instr, Opnd, Pass};
use super::{Isa, CHUNK};
use crate::backend::interp::{at, eval_node, Broadcasts, NodeInputs};
use crate::backend::{check_step_args, Hyper, TensorStepper};
use crate::error::{Error, Result};
use crate::ir::{Buffer, Op, StepIr, ValueId};
use crate::shape::{Domain, Layout};
use crate::state::TensorState;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Which small-domain nodes `passes` read lane-major (a transposed copy, so that the lanes of
/// one point are contiguous): those of width > 1 that an element instruction gathers or uses
/// as a small operand.
pub(super) fn lane_major_nodes(passes: &[Pass], ir: &StepIr) -> Vec<bool> {
    let mut lane_major = vec![false; ir.nodes.len()];
    for instr in passes.iter().flat_map(|p| &p.instrs) {
        let read: Vec<usize> = match instr {
            Instr::Gather { node, .. } => vec![*node],
            Instr::Binary { a, b, .. }
            | Instr::MulMul { a, b, .. }
            | Instr::Dense {
                pair: Some((a, b)), ..
            } => [a, b]
                .into_iter()
                .filter_map(|o| match o {
                    Opnd::Small(node) => Some(*node),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        for node in read {
            lane_major[node] |= ir.nodes[node].width > 1;
        }
    }
    lane_major
}

/// The thread count steppers use unless told otherwise: `MULO_CPU_THREADS` if it is set to a
/// positive integer, else the available cores (`std::thread::available_parallelism`). Results
/// are bitwise the same for any thread count.
pub fn default_threads() -> usize {
    std::env::var("MULO_CPU_THREADS")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The small phase's inputs: the small values computed so far and the state buffers (a
/// small-domain load reads only row/column/rest state; the staged step's are the old state).
pub(super) struct SmallInputs<'a> {
    pub(super) small: &'a [Vec<f32>],
    pub(super) state: &'a BTreeMap<Buffer, Vec<f32>>,
    pub(super) bc: &'a Broadcasts,
}

impl NodeInputs<f32> for SmallInputs<'_> {
    fn value(&self, v: ValueId) -> &[f32] {
        &self.small[v.index()]
    }

    fn buffer(&self, b: Buffer) -> &[f32] {
        &self.state[&b]
    }

    fn broadcasts(&self) -> &Broadcasts {
        self.bc
    }
}

/// A [`TensorStepper`] running the native CPU backend.
pub struct CpuStepper {
    prog: Arc<CpuProgram>,
    threads: usize,
    isa: Isa,
    step: u64,
    state: BTreeMap<Buffer, Vec<f32>>,
    small: Vec<Vec<f32>>,
    /// Lane-major copies (`[width][points]`) of the small values that are gathered with a
    /// width above 1 (empty for the others).
    small_t: Vec<Vec<f32>>,
    partials: Vec<Vec<f64>>,
    scratch: Vec<Scratch>,
}

impl CpuStepper {
    /// A stepper for `ir` with zero state and step counter `start_step`, on
    /// [`default_threads`] threads, with the best instruction set the CPU supports (or the one
    /// `MULO_CPU_ISA` names, see [`Isa::detect`]).
    pub fn new(ir: Arc<StepIr>, start_step: u64) -> Self {
        Self::from_program(Arc::new(CpuProgram::new(ir)), start_step, default_threads())
    }

    /// A stepper for a compiled program on `threads` threads (at least 1).
    pub fn from_program(prog: Arc<CpuProgram>, start_step: u64, threads: usize) -> Self {
        let layout = &prog.ir.layout;
        let state = Buffer::state_for_layout(layout)
            .into_iter()
            .map(|b| (b, vec![0.0; b.len(layout)]))
            .collect();
        let small: Vec<Vec<f32>> = prog
            .ir
            .nodes
            .iter()
            .map(|node| match node.domain {
                Domain::Elem => Vec::new(),
                d => vec![0.0; layout.domain_len(d) * node.width as usize],
            })
            .collect();
        let small_t = lane_major_nodes(&prog.passes, &prog.ir)
            .into_iter()
            .zip(&small)
            .map(|(t, v)| if t { v.clone() } else { Vec::new() })
            .collect();
        let partial_len = prog.passes.iter().map(|p| p.partial_len).max().unwrap_or(0);
        let threads = threads.clamp(1, prog.slices);
        CpuStepper {
            threads,
            isa: Isa::detect(),
            step: start_step,
            state,
            small,
            small_t,
            partials: vec![vec![0.0; partial_len]; prog.slices],
            scratch: (0..threads).map(|_| Scratch::default()).collect(),
            prog,
        }
    }

    /// Uses `threads` threads (at least 1; results do not depend on it).
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads.clamp(1, self.prog.slices);
        self.scratch = (0..self.threads).map(|_| Scratch::default()).collect();
        self
    }

    /// Uses `isa` if the CPU supports it (else keeps the detected one); for comparisons.
    pub fn with_isa(mut self, isa: Isa) -> Self {
        if Isa::best().supports(isa) {
            self.isa = isa;
        }
        self
    }

    /// The instruction set in use.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Evaluates a small-domain node into `self.small` (and its lane-major copy): an element
    /// mean from the partial sums of its pass, anything else with the interpreter's evaluator.
    fn eval_small(&mut self, v: usize, hyper: &Hyper) {
        let prog = &*self.prog;
        let ir = &prog.ir;
        let layout = &ir.layout;
        let node = &ir.nodes[v];
        let n = layout.domain_len(node.domain);
        let w = node.width as usize;
        let elem_mean = matches!(node.op, Op::Mean(a) if ir.node(a).domain == Domain::Elem);
        let out = if elem_mean {
            let (k, i) = prog.mean_of[&v];
            let m = &prog.passes[k].means[i];
            let count = (layout.numel() / m.points) as f64;
            let mut out = std::mem::take(&mut self.small[v]);
            for (j, o) in out.iter_mut().enumerate() {
                let mut s = 0f64;
                for part in &self.partials {
                    s += part[m.offset + j];
                }
                *o = (s / count) as f32;
            }
            out
        } else {
            let inputs = SmallInputs {
                small: &self.small,
                state: &self.state,
                bc: &prog.bc,
            };
            eval_node(ir, v, &inputs, self.step, hyper).expect("stores are not small-phase nodes")
        };
        if !self.small_t[v].is_empty() {
            write_lane_major(&out, w, n, &mut self.small_t[v]);
        }
        self.small[v] = out;
    }

    fn run_pass(&mut self, k: usize, param: &mut [f32], grad: &[f32]) {
        let prog = Arc::clone(&self.prog);
        let data = PassData {
            small: &self.small,
            small_t: &self.small_t,
            param,
            grad,
            state: &mut self.state,
        };
        run_pass(
            &prog,
            &prog.passes[k],
            (self.threads, self.isa),
            data,
            &mut self.partials,
            &mut self.scratch,
        );
    }
}

/// What a pass reads and writes: the small values (and their lane-major copies), and the
/// element buffers (the parameter and the state, written by the last pass).
pub(super) struct PassData<'a> {
    pub(super) small: &'a [Vec<f32>],
    pub(super) small_t: &'a [Vec<f32>],
    pub(super) param: &'a mut [f32],
    pub(super) grad: &'a [f32],
    pub(super) state: &'a mut BTreeMap<Buffer, Vec<f32>>,
}

/// Runs `pass` of `prog` over every element on `threads` threads (`threads ≤ scratch.len()`,
/// at most `prog.slices`), with `isa`; each slice's partial sums go to its `partials` entry.
pub(super) fn run_pass(
    prog: &CpuProgram,
    pass: &Pass,
    (threads, isa): (usize, Isa),
    data: PassData<'_>,
    partials: &mut [Vec<f64>],
    scratch: &mut [Scratch],
) {
    let PassData {
        small,
        small_t,
        param,
        grad,
        state,
    } = data;
    let n = prog.ir.layout.numel();
    let bounds: Vec<usize> = (0..=prog.slices)
        .map(|s| {
            if s == prog.slices {
                n
            } else {
                prog.slice_chunks(s).0 * CHUNK
            }
        })
        .collect();
    // Every element buffer lane, split into the slices.
    let mut lanes: Vec<Option<View<'_>>> = (0..prog.elem_bufs.len()).map(|_| None).collect();
    let buf_id = |b: Buffer, lane: usize| {
        prog.elem_bufs
            .iter()
            .position(|&x| x == (b, lane as u32))
            .expect("element buffer")
    };
    let id = buf_id(Buffer::Param, 0);
    lanes[id] = Some(view(param, pass.writes[id]));
    lanes[buf_id(Buffer::Grad, 0)] = Some(View::Ro(grad));
    for (b, data) in state.iter_mut() {
        if b.domain() != Domain::Elem {
            continue;
        }
        for (lane, part) in data.chunks_mut(n).enumerate() {
            let id = buf_id(*b, lane);
            lanes[id] = Some(view(part, pass.writes[id]));
        }
    }
    let mut per_slice: Vec<Vec<View<'_>>> = (0..prog.slices).map(|_| Vec::new()).collect();
    for lane in lanes {
        let parts = split_views(lane.expect("every element buffer is present"), &bounds);
        for (s, p) in parts.into_iter().enumerate() {
            per_slice[s].push(p);
        }
    }
    let mut per_thread: Vec<Vec<Job<'_>>> = (0..threads).map(|_| Vec::new()).collect();
    for (s, (views, partial)) in per_slice.into_iter().zip(partials.iter_mut()).enumerate() {
        let partial = &mut partial[..pass.partial_len];
        partial.fill(0.0);
        per_thread[s % threads].push(Job {
            chunks: prog.slice_chunks(s),
            start: bounds[s],
            views,
            partial,
        });
    }
    let mut work = per_thread.into_iter().zip(scratch.iter_mut());
    let (mut first_jobs, first_scr) = work.next().expect("at least one thread");
    std::thread::scope(|scope| {
        for (mut jobs, scr) in work {
            scope.spawn(move || {
                for job in &mut jobs {
                    dispatch(isa, prog, pass, small, small_t, scr, job);
                }
            });
        }
        for job in &mut first_jobs {
            dispatch(isa, prog, pass, small, small_t, first_scr, job);
        }
    });
}

impl TensorStepper for CpuStepper {
    fn target(&self) -> &'static str {
        "cpu"
    }

    fn layout(&self) -> &Layout {
        &self.prog.ir.layout
    }

    fn step(&mut self, param: &mut [f32], grad: &[f32], hyper: Hyper) -> Result<()> {
        let prog = Arc::clone(&self.prog);
        check_step_args(&prog.ir.layout, param.len(), grad.len(), &hyper)?;
        // Checked before the passes write `param` and the state in place.
        let next = crate::state::next_step(self.step)?;
        for k in 0..prog.passes.len() {
            for &v in &prog.small_phases[k] {
                self.eval_small(v, &hyper);
            }
            self.run_pass(k, param, grad);
        }
        store_small(&prog, &self.small, &mut self.state);
        self.step = next;
        Ok(())
    }

    fn state(&self) -> Result<TensorState> {
        let mut state = TensorState::zeros(&self.prog.ir.layout, self.step);
        for (b, data) in &self.state {
            state.set(*b, data.clone())?;
        }
        Ok(state)
    }

    fn state_into(&self, into: &mut Option<TensorState>) -> Result<()> {
        match into {
            Some(snapshot) if snapshot.layout() == &self.prog.ir.layout => {
                for (b, data) in &self.state {
                    snapshot.get_mut(*b).copy_from_slice(data);
                }
                snapshot.step = self.step;
            }
            _ => *into = Some(self.state()?),
        }
        Ok(())
    }

    fn state_is_finite(&self) -> Result<bool> {
        Ok(self.state.values().all(|data| all_finite(data)))
    }

    fn set_state(&mut self, state: TensorState) -> Result<()> {
        if state.layout() != &self.prog.ir.layout {
            return Err(Error::argument(
                "state",
                format!(
                    "is for shape {}, the program for {}",
                    state.layout().shape(),
                    self.prog.ir.layout.shape()
                ),
            ));
        }
        for (b, data) in state.iter() {
            self.state.insert(b, data.to_vec());
        }
        self.step = state.step;
        Ok(())
    }
}

/// The native CPU backend ([`CpuStepper`]: chunk programs
/// rendered from the IR, FMA kernels, on every core) as a [`StepperFactory`](crate::backend::StepperFactory): the fast CPU path,
/// and the default backend of the optimizer.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuFactory;

impl crate::backend::StepperFactory for CpuFactory {
    fn target(&self) -> &'static str {
        "cpu"
    }

    fn stepper(&self, ir: Arc<StepIr>, start_step: u64) -> Result<Box<dyn TensorStepper>> {
        Ok(Box::new(CpuStepper::new(ir, start_step)))
    }
}

/// Copies a small value `values` (`[point][lane]`, `w` lanes over `n` points) into its
/// lane-major copy `t` (`[lane][point]`). Lane by lane, so that the writes are contiguous
/// (written point by point, every write went to another cache line, `n` floats apart).
pub(super) fn write_lane_major(values: &[f32], w: usize, n: usize, t: &mut [f32]) {
    if n == 0 {
        // No points (a staged step's empty shard): nothing to copy.
        return;
    }
    for (l, lane) in t.chunks_exact_mut(n).enumerate() {
        for (t, &x) in lane.iter_mut().zip(values[l..].iter().step_by(w)) {
            *t = x;
        }
    }
}

/// The program's small-domain stores (after its last pass, every load done): each stored
/// small value, broadcast to the store's domain, into its lane of the state buffer.
pub(super) fn store_small(
    prog: &CpuProgram,
    small: &[Vec<f32>],
    state: &mut BTreeMap<Buffer, Vec<f32>>,
) {
    let layout = &prog.ir.layout;
    for &v in &prog.small_stores {
        let node = &prog.ir.nodes[v];
        let Op::Store {
            buffer,
            lane,
            value,
        } = &node.op
        else {
            unreachable!("a store")
        };
        let n = layout.domain_len(node.domain);
        let vd = prog.ir.node(*value).domain;
        let src = &small[value.index()];
        let dst = state.get_mut(buffer).expect("state buffer of the layout");
        let start = *lane as usize * n;
        let map = prog.bc.map(node.domain, vd);
        for p in 0..n {
            dst[start + p] = src[at(map, p, layout.domain_len(vd))];
        }
    }
}

/// Whether every value is finite: blocks of 4096 scanned without an early exit per value (an
/// OR of non-finite flags, which vectorizes), stopping after the first block with one.
fn all_finite(data: &[f32]) -> bool {
    const EXP: u32 = 0x7f80_0000;
    data.chunks(4096).all(|block| {
        block
            .iter()
            .fold(0u32, |bad, x| bad | u32::from(x.to_bits() & EXP == EXP))
            == 0
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn all_finite_finds_any_non_finite_value() {
        let mut x = vec![1.5f32; 10_000];
        assert!(super::all_finite(&x));
        assert!(super::all_finite(&[]));
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [0, 4095, 4096, 9_999] {
                x[at] = bad;
                assert!(!super::all_finite(&x), "{bad} at {at}");
                x[at] = f32::MAX;
            }
        }
        assert!(super::all_finite(&x));
    }
}
