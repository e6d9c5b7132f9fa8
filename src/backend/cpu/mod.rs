//! The native CPU backend: the IR compiled once into per-level chunk programs, executed over
//! the elements in chunks of [`CHUNK`] on a few threads.
//!
//! Generic over the IR, like the CUDA schedule it borrows its levels from
//! ([`crate::backend::cuda::schedule`]): the **level** of a node is the number of element-domain
//! means on its path. A step runs, for each level `k`:
//!
//! 1. the *small phase*: the row/column/rest/step nodes of level `k`, materialized over their
//!    (small) domains with scalar code; element means of level `k` are finished here from the
//!    partial sums of pass `k − 1`;
//! 2. the *elem pass*: a linear program of lane-parallel instructions over every chunk of
//!    elements, computing the operands of the element means of level `k + 1` (accumulated into
//!    f64 partial sums), or, in the last pass, the element stores. Element values are never
//!    materialized over the tensor: each pass recomputes what it needs from the loads.
//!
//! Small-domain stores are written after the last pass. Element stores are written at the end
//! of each chunk of the last pass, after every load of that chunk.
//!
//! **Determinism.** The chunks are grouped into a fixed number of contiguous *slices* that
//! depends only on the shape; each slice accumulates its partial sums in chunk order, and the
//! slices are combined in order. Threads take whole slices, so the result is bitwise the same
//! for any thread count.
//!
//! **Instruction sets.** The chunk loop is compiled twice: for AVX2 + FMA and as portable code
//! (no FMA); the CPU's support is checked at run time. An AVX-512 build of the same loop was
//! measured 5% faster on the 2-core EPYC, not worth raising the crate's Rust 1.85 minimum
//! (the `avx512f` target feature is stable from 1.89).

mod kernels;

use super::{check_step_args, Hyper, TensorStepper};
use crate::error::{Error, Result};
use crate::ir::{Binary, Buffer, Op, RuntimeScalar, StepIr, Unary, ValueId};
use crate::plan::{elem_closure, is_elem_mean, levels};
use crate::shape::{Domain, Layout};
use crate::state::TensorState;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

/// Elements per chunk: the lane count of every chunk value.
pub const CHUNK: usize = 256;

/// Most slices (groups of chunks with their own partial sums) a pass is split into.
const SLICES: usize = 16;

/// The instruction set the chunk loop runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX2 with FMA (x86-64).
    Avx2,
    /// Whatever the compilation target guarantees; no fused multiply-add.
    Portable,
}

impl Isa {
    /// The best instruction set this CPU supports, or the one `MULO_CPU_ISA` names
    /// (`avx2`, `portable`) if the CPU supports that one.
    pub fn detect() -> Isa {
        let best = Self::best();
        let chosen = match std::env::var("MULO_CPU_ISA").as_deref() {
            Ok("avx2") => Isa::Avx2,
            Ok("portable") => Isa::Portable,
            _ => best,
        };
        if best.supports(chosen) {
            chosen
        } else {
            best
        }
    }

    /// Whether a CPU with this instruction set can run `other`.
    fn supports(self, other: Isa) -> bool {
        match other {
            Isa::Portable => true,
            Isa::Avx2 => self == Isa::Avx2,
        }
    }

    fn best() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }
}

/// A value operand of an element instruction.
#[derive(Clone, Copy, Debug)]
enum Opnd {
    /// A chunk value (a value id while building, then its offset in the scratch).
    Slot(usize),
    /// A width-1 step value, read once per chunk (node index).
    Scalar(usize),
    /// A row/col/rest (or wider step) value, read in place per lane: a constant, a
    /// contiguous run of its lane-major copy, or gathered (node index).
    Small(usize),
}

/// One instruction of a chunk program. Slot fields hold value ids while the program is
/// built and scratch offsets (in floats) once slots are assigned.
#[derive(Clone, Debug)]
enum Instr {
    Load {
        buf: usize,
        out: usize,
    },
    Gather {
        node: usize,
        out: usize,
    },
    Unary {
        op: Unary,
        a: usize,
        out: usize,
        width: usize,
    },
    Binary {
        op: Binary,
        a: Opnd,
        b: Opnd,
        out: usize,
        width: usize,
    },
    Pack {
        xs: Vec<usize>,
        out: usize,
    },
    Dense {
        matrix: usize,
        x: usize,
        out: usize,
    },
    Lane {
        x: usize,
        lane: usize,
        out: usize,
    },
    Accum {
        mean: usize,
        src: usize,
    },
    Store {
        buf: usize,
        src: usize,
    },
}

impl Instr {
    /// Calls `f(slot, is_def)` for every slot field (uses first, then the definition).
    fn visit(&mut self, f: &mut dyn FnMut(&mut usize, bool)) {
        let opnd = |o: &mut Opnd, f: &mut dyn FnMut(&mut usize, bool)| {
            if let Opnd::Slot(s) = o {
                f(s, false)
            }
        };
        match self {
            Instr::Load { out, .. } | Instr::Gather { out, .. } => f(out, true),
            Instr::Unary { a, out, .. } => {
                f(a, false);
                f(out, true);
            }
            Instr::Binary { a, b, out, .. } => {
                opnd(a, f);
                opnd(b, f);
                f(out, true);
            }
            Instr::Pack { xs, out } => {
                xs.iter_mut().for_each(|x| f(x, false));
                f(out, true);
            }
            Instr::Dense { x, out, .. } | Instr::Lane { x, out, .. } => {
                f(x, false);
                f(out, true);
            }
            Instr::Accum { src, .. } | Instr::Store { src, .. } => f(src, false),
        }
    }
}

/// An element-domain mean accumulated by a pass.
#[derive(Clone, Debug)]
struct MeanSpec {
    node: usize,
    domain: Domain,
    width: usize,
    points: usize,
    offset: usize,
}

/// One pass over the elements.
#[derive(Clone, Debug)]
struct Pass {
    instrs: Vec<Instr>,
    scratch: usize,
    means: Vec<MeanSpec>,
    partial_len: usize,
    /// Which of the row/col/rest index vectors the pass needs.
    domains: [bool; 3],
    /// Element buffers the pass writes.
    writes: Vec<bool>,
}

/// A dense layer's weights, bias filled with zeros when absent.
#[derive(Clone, Debug)]
struct Weights {
    rows: usize,
    cols: usize,
    /// Row-major `[rows, cols]`.
    weight: Vec<f32>,
    bias: Vec<f32>,
    /// Arranged for the chunk kernel.
    blocked: kernels::Blocked,
}

fn small_index(d: Domain) -> Option<usize> {
    match d {
        Domain::Row => Some(0),
        Domain::Col => Some(1),
        Domain::Rest => Some(2),
        _ => None,
    }
}

/// A step compiled for the CPU: what [`CpuStepper`] runs. Built once per IR.
#[derive(Debug)]
pub struct CpuProgram {
    ir: Arc<StepIr>,
    /// Small-domain nodes (not stores) of every level, in topological order.
    small_phases: Vec<Vec<usize>>,
    small_stores: Vec<usize>,
    passes: Vec<Pass>,
    /// For an element mean node: (pass, index in its means).
    mean_of: HashMap<usize, (usize, usize)>,
    maps: HashMap<(Domain, Domain), Vec<usize>>,
    /// (buffer, lane) of every element buffer lane.
    elem_bufs: Vec<(Buffer, u32)>,
    /// For row/col/rest: the stride in that domain of each tensor axis (0 for removed axes).
    strides: [Vec<usize>; 3],
    weights: Vec<Weights>,
    chunks: usize,
    slices: usize,
}

impl CpuProgram {
    /// Compiles `ir` (no data is touched).
    pub fn new(ir: Arc<StepIr>) -> Self {
        let layout = ir.layout.clone();
        let n = ir.nodes.len();
        let level = levels(&ir);
        let is_store = |v: usize| matches!(ir.nodes[v].op, Op::Store { .. });
        let max_level = (0..n)
            .filter(|&v| is_store(v) || is_elem_mean(&ir, ValueId(v as u32)))
            .map(|v| level[v] as usize)
            .max()
            .unwrap_or(0);
        let mut small_phases = vec![Vec::new(); max_level + 1];
        let mut small_stores = Vec::new();
        for v in 0..n {
            let node = &ir.nodes[v];
            if node.domain == Domain::Elem {
                continue;
            }
            if is_store(v) {
                small_stores.push(v);
            } else {
                small_phases[(level[v] as usize).min(max_level)].push(v);
            }
        }
        let mut elem_bufs = Vec::new();
        for b in Buffer::for_layout(&layout) {
            if b.domain() == Domain::Elem {
                for lane in 0..b.lanes() as u32 {
                    elem_bufs.push((b, lane));
                }
            }
        }
        let buf_id = |b: Buffer, lane: u32| {
            elem_bufs
                .iter()
                .position(|&x| x == (b, lane))
                .expect("element buffer of the layout")
        };
        let elem_stores: Vec<usize> = (0..n)
            .filter(|&v| is_store(v) && ir.nodes[v].domain == Domain::Elem)
            .collect();
        let mut passes = Vec::new();
        let mut mean_of = HashMap::new();
        for k in 0..=max_level {
            let means: Vec<usize> = (0..n)
                .filter(|&v| is_elem_mean(&ir, ValueId(v as u32)) && level[v] as usize == k + 1)
                .collect();
            let last = k == max_level;
            let mut roots: Vec<ValueId> = means
                .iter()
                .map(|&m| ir.nodes[m].op.operands()[0])
                .collect();
            if last {
                roots.extend(elem_stores.iter().map(|&v| ValueId(v as u32)));
            }
            let (nodes, _) = elem_closure(&ir, &roots);
            let mut specs = Vec::new();
            let mut partial_len = 0;
            for (i, &m) in means.iter().enumerate() {
                let node = &ir.nodes[m];
                let points = layout.domain_len(node.domain);
                let width = node.width as usize;
                specs.push(MeanSpec {
                    node: m,
                    domain: node.domain,
                    width,
                    points,
                    offset: partial_len,
                });
                partial_len += points * width;
                mean_of.insert(m, (k, i));
            }
            let pass = build_pass(&ir, &nodes, specs, partial_len, &buf_id, elem_bufs.len());
            passes.push(pass);
        }
        let mut maps = HashMap::new();
        for &big in &layout.domains() {
            for &small in &layout.domains() {
                if big != small && big.contains(small) {
                    maps.insert((big, small), layout.broadcast_index(big, small));
                }
            }
        }
        let dims = layout.dims().to_vec();
        let strides = [Domain::Row, Domain::Col, Domain::Rest].map(|d| {
            if !layout.has_domain(d) {
                return Vec::new();
            }
            let axes = layout.domain_axes(d);
            let mut s = vec![0usize; dims.len()];
            let mut stride = 1;
            for &a in axes.iter().rev() {
                s[a] = stride;
                stride *= dims[a];
            }
            s
        });
        let weights = ir
            .matrices
            .iter()
            .map(|m| {
                let bias = m.bias.clone().unwrap_or_else(|| vec![0.0; m.rows]);
                Weights {
                    blocked: kernels::Blocked::new(m.rows, m.cols, &m.weight, &bias),
                    rows: m.rows,
                    cols: m.cols,
                    weight: m.weight.clone(),
                    bias,
                }
            })
            .collect();
        let chunks = layout.numel().div_ceil(CHUNK);
        CpuProgram {
            small_phases,
            small_stores,
            passes,
            mean_of,
            maps,
            elem_bufs,
            strides,
            weights,
            chunks,
            slices: chunks.clamp(1, SLICES),
            ir,
        }
    }

    /// Number of passes over the element data per step.
    pub fn elem_passes(&self) -> usize {
        self.passes.len()
    }

    /// The IR the program was compiled from.
    pub fn ir(&self) -> &StepIr {
        &self.ir
    }

    fn slice_chunks(&self, s: usize) -> (usize, usize) {
        (
            s * self.chunks / self.slices,
            (s + 1) * self.chunks / self.slices,
        )
    }
}

/// Builds a pass's chunk program from its element nodes (topological order) and assigns slots.
fn build_pass(
    ir: &StepIr,
    nodes: &[ValueId],
    means: Vec<MeanSpec>,
    partial_len: usize,
    buf_id: &dyn Fn(Buffer, u32) -> usize,
    n_bufs: usize,
) -> Pass {
    let mut instrs = Vec::new();
    let mut gathered: HashSet<usize> = HashSet::new();
    let mut domains = [false; 3];
    let mut writes = vec![false; n_bufs];
    for m in &means {
        if let Some(i) = small_index(m.domain) {
            domains[i] = true;
        }
    }
    // The slot of an operand; small-domain operands are gathered into the chunk first.
    let mut slot = |o: ValueId, instrs: &mut Vec<Instr>, domains: &mut [bool; 3]| -> usize {
        let node = ir.node(o);
        if node.domain != Domain::Elem && gathered.insert(o.index()) {
            if let Some(i) = small_index(node.domain) {
                domains[i] = true;
            }
            instrs.push(Instr::Gather {
                node: o.index(),
                out: o.index(),
            });
        }
        o.index()
    };
    let scalar_ok = |o: ValueId| {
        let node = ir.node(o);
        node.domain == Domain::Step && node.width == 1
    };
    let mut stores = Vec::new();
    for &v in nodes {
        let node = ir.node(v);
        let out = v.index();
        let width = node.width as usize;
        let instr = match &node.op {
            Op::Store {
                buffer,
                lane,
                value,
            } => {
                stores.push((buf_id(*buffer, *lane), *value));
                continue;
            }
            Op::Load { buffer, lane } => Instr::Load {
                buf: buf_id(*buffer, *lane),
                out,
            },
            Op::Unary(op, a) => Instr::Unary {
                op: *op,
                a: slot(*a, &mut instrs, &mut domains),
                out,
                width,
            },
            Op::Binary(op, a, b) => {
                let mut opnd = |o: ValueId, instrs: &mut Vec<Instr>, domains: &mut [bool; 3]| {
                    let node = ir.node(o);
                    if node.domain == Domain::Elem {
                        Opnd::Slot(slot(o, instrs, domains))
                    } else if scalar_ok(o) {
                        Opnd::Scalar(o.index())
                    } else {
                        if let Some(i) = small_index(node.domain) {
                            domains[i] = true;
                        }
                        Opnd::Small(o.index())
                    }
                };
                let oa = opnd(*a, &mut instrs, &mut domains);
                let ob = opnd(*b, &mut instrs, &mut domains);
                Instr::Binary {
                    op: *op,
                    a: oa,
                    b: ob,
                    out,
                    width,
                }
            }
            Op::Pack(xs) => Instr::Pack {
                xs: xs
                    .iter()
                    .map(|&x| slot(x, &mut instrs, &mut domains))
                    .collect(),
                out,
            },
            Op::Dense { matrix, x } => Instr::Dense {
                matrix: matrix.0 as usize,
                x: slot(*x, &mut instrs, &mut domains),
                out,
            },
            Op::Lane { x, lane } => Instr::Lane {
                x: slot(*x, &mut instrs, &mut domains),
                lane: *lane as usize,
                out,
            },
            Op::Scalar(_) | Op::Const(_) | Op::Mean(_) => {
                unreachable!("step constants and means never live on the element domain")
            }
        };
        instrs.push(instr);
        for (i, m) in means.iter().enumerate() {
            if ir.nodes[m.node].op.operands()[0] == v {
                instrs.push(Instr::Accum { mean: i, src: out });
            }
        }
    }
    for (buf, value) in stores {
        writes[buf] = true;
        let src = slot(value, &mut instrs, &mut domains);
        instrs.push(Instr::Store { buf, src });
    }

    // Slot assignment: linear scan; a value's slot is free after its last use. The output of
    // an instruction is allocated before its inputs are freed, so it never aliases them.
    let mut last = HashMap::new();
    for (i, instr) in instrs.iter_mut().enumerate() {
        instr.visit(&mut |s, _| {
            last.insert(*s, i);
        });
    }
    // A width-1 value whose only use is a pack is computed directly into its lane of the
    // pack (the pack's slot is allocated when the first such lane is defined).
    let mut use_count: HashMap<usize, usize> = HashMap::new();
    for instr in instrs.iter_mut() {
        instr.visit(&mut |s, def| {
            if !def {
                *use_count.entry(*s).or_default() += 1;
            }
        });
    }
    let mut defined_here = HashSet::new();
    for instr in instrs.iter_mut() {
        if !matches!(instr, Instr::Gather { .. }) {
            instr.visit(&mut |s, def| {
                if def {
                    defined_here.insert(*s);
                }
            });
        }
    }
    let mut alias: HashMap<usize, (usize, usize)> = HashMap::new();
    for instr in &instrs {
        if let Instr::Pack { xs, out } = instr {
            for (l, &x) in xs.iter().enumerate() {
                if use_count[&x] == 1 && defined_here.contains(&x) && ir.nodes[x].width == 1 {
                    alias.insert(x, (*out, l));
                }
            }
        }
    }
    let mut offset: HashMap<usize, usize> = HashMap::new();
    let mut free: HashMap<usize, Vec<usize>> = HashMap::new();
    let mut top = 0usize;
    let mut alloc = |width: usize, free: &mut HashMap<usize, Vec<usize>>| {
        free.get_mut(&width)
            .and_then(|f| f.pop())
            .unwrap_or_else(|| {
                top += width * CHUNK;
                top - width * CHUNK
            })
    };
    for (i, instr) in instrs.iter_mut().enumerate() {
        let mut uses = Vec::new();
        instr.visit(&mut |s, def| {
            if def {
                let off = if let Some(&(pack, l)) = alias.get(s) {
                    let base = match offset.get(&pack) {
                        Some(&b) => b,
                        None => {
                            let b = alloc(ir.nodes[pack].width as usize, &mut free);
                            offset.insert(pack, b);
                            b
                        }
                    };
                    base + l * CHUNK
                } else if let Some(&b) = offset.get(s) {
                    // A pack allocated early by one of its lanes.
                    b
                } else {
                    alloc(ir.nodes[*s].width as usize, &mut free)
                };
                offset.insert(*s, off);
                uses.push(*s);
                *s = off;
            } else {
                uses.push(*s);
                *s = offset[s];
            }
        });
        for v in uses {
            if last[&v] == i {
                if let Some(off) = offset.remove(&v) {
                    // An aliased lane lives in its pack's slot, freed with the pack.
                    if !alias.contains_key(&v) {
                        free.entry(ir.nodes[v].width as usize)
                            .or_default()
                            .push(off);
                    }
                }
            }
        }
    }
    Pass {
        instrs,
        scratch: top,
        means,
        partial_len,
        domains,
        writes,
    }
}

/// Per-thread working memory, reused across chunks and steps.
#[derive(Debug, Default)]
struct Scratch {
    vals: Vec<f32>,
    idx: [Vec<u32>; 3],
    kind: [IdxKind; 3],
    /// Gathered lanes of the two operands of a binary instruction.
    tmp: [Vec<f32>; 2],
}

/// One lane of a binary operand: a scalar, or `len` values.
enum Src<'a> {
    S(f32),
    V(&'a [f32]),
}

/// Lane `l` of a binary operand for the current chunk.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn lane_src<'a>(
    ir: &StepIr,
    o: &Opnd,
    l: usize,
    len: usize,
    p: &'a Parts<'a>,
    small: &'a [Vec<f32>],
    small_t: &'a [Vec<f32>],
    kind: &[IdxKind; 3],
    idx: &[Vec<u32>; 3],
    tmp: &'a mut Vec<f32>,
) -> Src<'a> {
    match *o {
        Opnd::Slot(off) => Src::V(p.get(off + l * CHUNK, len)),
        Opnd::Scalar(node) => Src::S(small[node][0]),
        Opnd::Small(node) => {
            let n = &ir.nodes[node];
            let w = n.width as usize;
            let src = &small[node];
            let points = src.len() / w;
            let src_t = if w == 1 { src } else { &small_t[node] };
            let lane = &src_t[l * points..(l + 1) * points];
            match small_index(n.domain).map_or(IdxKind::Const(0), |d| kind[d]) {
                IdxKind::Const(q) => Src::S(lane[q]),
                IdxKind::Contig(q) => Src::V(&lane[q..q + len]),
                IdxKind::General => {
                    let ix = &idx[small_index(n.domain).expect("indexed")];
                    tmp.resize(CHUNK, 0.0);
                    for (t, &i) in tmp.iter_mut().zip(&ix[..len]) {
                        *t = lane[i as usize];
                    }
                    Src::V(&tmp[..len])
                }
            }
        }
    }
}

/// How a chunk's elements map to the points of a smaller domain.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
enum IdxKind {
    /// All to one point.
    Const(usize),
    /// To consecutive points from this one.
    Contig(usize),
    /// Any other way (see the index vector).
    #[default]
    General,
}

/// One element buffer lane's part of a slice.
enum View<'a> {
    Ro(&'a [f32]),
    Rw(&'a mut [f32]),
}

impl View<'_> {
    fn get(&self) -> &[f32] {
        match self {
            View::Ro(s) => s,
            View::Rw(s) => s,
        }
    }
}

/// What one slice of a pass works on.
struct Job<'a> {
    chunks: (usize, usize),
    start: usize,
    views: Vec<View<'a>>,
    partial: &'a mut [f64],
}

/// Splits `out` off the scratch; inputs are read from the parts before and after it.
struct Parts<'a> {
    left: &'a [f32],
    right: &'a [f32],
    out_start: usize,
    out_end: usize,
}

impl Parts<'_> {
    #[inline(always)]
    fn get(&self, off: usize, len: usize) -> &[f32] {
        if off + len <= self.out_start {
            &self.left[off..off + len]
        } else {
            debug_assert!(off >= self.out_end);
            &self.right[off - self.out_end..off - self.out_end + len]
        }
    }
}

#[inline(always)]
fn split_out(vals: &mut [f32], out: usize, len: usize) -> (&mut [f32], Parts<'_>) {
    let (left, rest) = vals.split_at_mut(out);
    let (o, right) = rest.split_at_mut(len);
    (
        o,
        Parts {
            left,
            right,
            out_start: out,
            out_end: out + len,
        },
    )
}

/// Runs one pass over one slice (the generic body; see the `run_slice_*` entry points).
#[inline(always)]
fn run_slice<const FMA: bool, const TILE: usize>(
    prog: &CpuProgram,
    pass: &Pass,
    small: &[Vec<f32>],
    small_t: &[Vec<f32>],
    scr: &mut Scratch,
    job: &mut Job<'_>,
) {
    let numel = prog.ir.layout.numel();
    let dims = prog.ir.layout.dims();
    let ir = &prog.ir;
    if scr.vals.len() < pass.scratch {
        scr.vals.resize(pass.scratch, 0.0);
    }
    for ix in scr.idx.iter_mut() {
        if ix.len() < CHUNK {
            ix.resize(CHUNK, 0);
        }
    }
    for c in job.chunks.0..job.chunks.1 {
        let e0 = c * CHUNK;
        let len = CHUNK.min(numel - e0);
        let local = e0 - job.start;
        // Index vectors into the smaller domains.
        for d in 0..3 {
            if !pass.domains[d] {
                continue;
            }
            let strides = &prog.strides[d];
            let rank = dims.len();
            let mut coord = [0usize; crate::shape::MAX_RANK];
            let mut rem = e0;
            let mut index = 0usize;
            for k in (0..rank).rev() {
                coord[k] = rem % dims[k];
                rem /= dims[k];
                index += coord[k] * strides[k];
            }
            let idx = &mut scr.idx[d];
            let (mut same, mut contig) = (true, true);
            let first = index;
            for (i, slot) in idx[..len].iter_mut().enumerate() {
                *slot = index as u32;
                same &= index == first;
                contig &= index == first + i;
                for k in (0..rank).rev() {
                    coord[k] += 1;
                    index += strides[k];
                    if coord[k] < dims[k] {
                        break;
                    }
                    index -= strides[k] * dims[k];
                    coord[k] = 0;
                }
            }
            scr.kind[d] = if same {
                IdxKind::Const(first)
            } else if contig {
                IdxKind::Contig(first)
            } else {
                IdxKind::General
            };
        }
        for instr in &pass.instrs {
            match instr {
                Instr::Load { buf, out } => {
                    scr.vals[*out..*out + len]
                        .copy_from_slice(&job.views[*buf].get()[local..local + len]);
                }
                Instr::Gather { node, out } => {
                    let n = &ir.nodes[*node];
                    let w = n.width as usize;
                    let src = &small[*node];
                    let points = src.len() / w;
                    // Lane-major (for width 1, the value itself).
                    let src_t = if w == 1 { src } else { &small_t[*node] };
                    let o = &mut scr.vals[*out..*out + w * CHUNK];
                    let kind = match small_index(n.domain) {
                        Some(d) => scr.kind[d],
                        None => IdxKind::Const(0),
                    };
                    for l in 0..w {
                        let dst = &mut o[l * CHUNK..l * CHUNK + len];
                        match kind {
                            IdxKind::Const(p) => dst.fill(src[p * w + l]),
                            IdxKind::Contig(p) if w == 1 => {
                                dst.copy_from_slice(&src[p..p + len]);
                            }
                            IdxKind::Contig(p) => {
                                dst.copy_from_slice(&src_t[l * points + p..l * points + p + len]);
                            }
                            IdxKind::General => {
                                let idx = &scr.idx[small_index(n.domain).expect("indexed")];
                                let lane = &src_t[l * points..(l + 1) * points];
                                for (x, &i) in dst.iter_mut().zip(&idx[..len]) {
                                    *x = lane[i as usize];
                                }
                            }
                        }
                    }
                }
                Instr::Unary { op, a, out, width } => {
                    let span = (width - 1) * CHUNK + len;
                    let (o, p) = split_out(&mut scr.vals, *out, span);
                    kernels::unary(*op, p.get(*a, span), o);
                }
                Instr::Binary {
                    op,
                    a,
                    b,
                    out,
                    width,
                } => {
                    let small_opnd = matches!(a, Opnd::Small(_)) || matches!(b, Opnd::Small(_));
                    if !small_opnd {
                        let span = (width - 1) * CHUNK + len;
                        let (o, p) = split_out(&mut scr.vals, *out, span);
                        match (a, b) {
                            (Opnd::Slot(a), Opnd::Slot(b)) => {
                                kernels::binary_vv(*op, p.get(*a, span), p.get(*b, span), o)
                            }
                            (Opnd::Slot(a), Opnd::Scalar(s)) => {
                                kernels::binary_vs(*op, p.get(*a, span), small[*s][0], o)
                            }
                            (Opnd::Scalar(s), Opnd::Slot(b)) => {
                                kernels::binary_sv(*op, small[*s][0], p.get(*b, span), o)
                            }
                            _ => unreachable!("an element node has an element operand"),
                        }
                        continue;
                    }
                    // Lane by lane, reading the small operands in place.
                    let Scratch {
                        vals,
                        idx,
                        kind,
                        tmp,
                    } = &mut *scr;
                    let [tmp_a, tmp_b] = tmp;
                    for l in 0..*width {
                        let (o, p) = split_out(vals, out + l * CHUNK, len);
                        let sa = lane_src(ir, a, l, len, &p, small, small_t, kind, idx, tmp_a);
                        let sb = lane_src(ir, b, l, len, &p, small, small_t, kind, idx, tmp_b);
                        match (sa, sb) {
                            (Src::V(a), Src::V(b)) => kernels::binary_vv(*op, a, b, o),
                            (Src::V(a), Src::S(b)) => kernels::binary_vs(*op, a, b, o),
                            (Src::S(a), Src::V(b)) => kernels::binary_sv(*op, a, b, o),
                            (Src::S(a), Src::S(b)) => {
                                let mut r = [0f32];
                                kernels::binary_vv(*op, &[a], &[b], &mut r);
                                o.fill(r[0]);
                            }
                        }
                    }
                }
                Instr::Pack { xs, out } => {
                    for (l, &x) in xs.iter().enumerate() {
                        // Lanes computed in place need no copy.
                        if x != out + l * CHUNK {
                            scr.vals.copy_within(x..x + len, out + l * CHUNK);
                        }
                    }
                }
                Instr::Dense { matrix, x, out } => {
                    let m = &prog.weights[*matrix];
                    let (o, p) = split_out(&mut scr.vals, *out, m.rows * CHUNK);
                    let xv = p.get(*x, m.cols * CHUNK);
                    kernels::dense::<FMA, TILE>(&m.blocked, xv, o, len);
                }
                Instr::Lane { x, lane, out } => {
                    let (o, p) = split_out(&mut scr.vals, *out, len);
                    o.copy_from_slice(p.get(x + lane * CHUNK, len));
                }
                Instr::Accum { mean, src } => {
                    let m = &pass.means[*mean];
                    let part = &mut job.partial[m.offset..m.offset + m.points * m.width];
                    let w = m.width;
                    let kind = match small_index(m.domain) {
                        Some(d) => scr.kind[d],
                        None => IdxKind::Const(0),
                    };
                    for l in 0..w {
                        let x = &scr.vals[src + l * CHUNK..src + l * CHUNK + len];
                        match kind {
                            IdxKind::Const(p) => part[p * w + l] += kernels::sum_f64(x),
                            IdxKind::Contig(p) if w == 1 => {
                                for (s, &v) in part[p..p + len].iter_mut().zip(x) {
                                    *s += v as f64;
                                }
                            }
                            IdxKind::Contig(p) => {
                                for (i, &v) in x.iter().enumerate() {
                                    part[(p + i) * w + l] += v as f64;
                                }
                            }
                            IdxKind::General => {
                                let idx = &scr.idx[small_index(m.domain).expect("indexed")];
                                for (i, &v) in x.iter().enumerate() {
                                    part[idx[i] as usize * w + l] += v as f64;
                                }
                            }
                        }
                    }
                }
                Instr::Store { buf, src } => match &mut job.views[*buf] {
                    View::Rw(dst) => {
                        dst[local..local + len].copy_from_slice(&scr.vals[*src..*src + len])
                    }
                    View::Ro(_) => unreachable!("stored buffers are writable in their pass"),
                },
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
/// # Safety
/// The CPU must support AVX2 and FMA (an `unsafe fn`: safe `#[target_feature]` functions need
/// Rust 1.86, the crate supports 1.85).
unsafe fn run_slice_avx2(
    prog: &CpuProgram,
    pass: &Pass,
    small: &[Vec<f32>],
    small_t: &[Vec<f32>],
    scr: &mut Scratch,
    job: &mut Job<'_>,
) {
    run_slice::<true, 16>(prog, pass, small, small_t, scr, job)
}

fn run_slice_portable(
    prog: &CpuProgram,
    pass: &Pass,
    small: &[Vec<f32>],
    small_t: &[Vec<f32>],
    scr: &mut Scratch,
    job: &mut Job<'_>,
) {
    run_slice::<false, 8>(prog, pass, small, small_t, scr, job)
}

fn dispatch(
    isa: Isa,
    prog: &CpuProgram,
    pass: &Pass,
    small: &[Vec<f32>],
    small_t: &[Vec<f32>],
    scr: &mut Scratch,
    job: &mut Job<'_>,
) {
    match isa {
        // SAFETY: `Isa::Avx2` is only ever chosen by `Isa::detect` or `CpuStepper::with_isa`,
        // after the CPU reported AVX2 and FMA, the features `run_slice_avx2` is compiled for.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { run_slice_avx2(prog, pass, small, small_t, scr, job) },
        _ => run_slice_portable(prog, pass, small, small_t, scr, job),
    }
}

/// A buffer lane, writable or not.
fn view(data: &mut [f32], write: bool) -> View<'_> {
    if write {
        View::Rw(data)
    } else {
        View::Ro(data)
    }
}

/// Splits `data` at the element bounds `bounds` (relative to `data`).
fn split_views<'a>(data: View<'a>, bounds: &[usize]) -> Vec<View<'a>> {
    let mut out = Vec::with_capacity(bounds.len() - 1);
    match data {
        View::Ro(mut s) => {
            for w in bounds.windows(2) {
                let (a, b) = s.split_at(w[1] - w[0]);
                out.push(View::Ro(a));
                s = b;
            }
        }
        View::Rw(mut s) => {
            for w in bounds.windows(2) {
                let (a, b) = std::mem::take(&mut s).split_at_mut(w[1] - w[0]);
                out.push(View::Rw(a));
                s = b;
            }
        }
    }
    out
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
    /// A stepper for `ir` with zero state and step counter `start_step`, on as many threads as
    /// the machine has cores, with the best instruction set the CPU supports.
    pub fn new(ir: Arc<StepIr>, start_step: u64) -> Self {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::from_program(Arc::new(CpuProgram::new(ir)), start_step, threads)
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
        let mut small_t: Vec<Vec<f32>> = vec![Vec::new(); prog.ir.nodes.len()];
        for pass in &prog.passes {
            for instr in &pass.instrs {
                let gathered: Vec<usize> = match instr {
                    Instr::Gather { node, .. } => vec![*node],
                    Instr::Binary { a, b, .. } => [a, b]
                        .into_iter()
                        .filter_map(|o| match o {
                            Opnd::Small(node) => Some(*node),
                            _ => None,
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                for node in gathered {
                    if prog.ir.nodes[node].width > 1 {
                        small_t[node] = small[node].clone();
                    }
                }
            }
        }
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

    /// Evaluates a small-domain node into `self.small`.
    fn eval_small(&mut self, v: usize, hyper: &Hyper) {
        let prog = &*self.prog;
        let ir = &prog.ir;
        let layout = &ir.layout;
        let node = &ir.nodes[v];
        let n = layout.domain_len(node.domain);
        let w = node.width as usize;
        let mut out = std::mem::take(&mut self.small[v]);
        let small = &self.small;
        let map = |big: Domain, s: Domain| -> Option<&Vec<usize>> {
            if big == s {
                None
            } else {
                Some(&prog.maps[&(big, s)])
            }
        };
        let at = |m: Option<&Vec<usize>>, p: usize| m.map_or(p, |m| m[p]);
        match &node.op {
            Op::Load { buffer, lane } => {
                let start = *lane as usize * n;
                out.copy_from_slice(&self.state[buffer][start..start + n]);
            }
            Op::Scalar(s) => {
                out[0] = match s {
                    RuntimeScalar::Lr => hyper.lr,
                    RuntimeScalar::WeightDecay => hyper.weight_decay,
                    RuntimeScalar::StepCount => self.step as f32,
                }
            }
            Op::Const(c) => out[0] = *c as f32,
            Op::Unary(op, a) => kernels::unary(*op, &small[a.index()], &mut out),
            Op::Binary(op, a, b) => {
                let (ma, mb) = (
                    map(node.domain, ir.node(*a).domain),
                    map(node.domain, ir.node(*b).domain),
                );
                let (va, vb) = (&small[a.index()], &small[b.index()]);
                for p in 0..n {
                    let (pa, pb) = (at(ma, p) * w, at(mb, p) * w);
                    kernels::binary_vv(
                        *op,
                        &va[pa..pa + w],
                        &vb[pb..pb + w],
                        &mut out[p * w..p * w + w],
                    );
                }
            }
            Op::Mean(a) => {
                let from = ir.node(*a).domain;
                if from == Domain::Elem {
                    let (k, i) = prog.mean_of[&v];
                    let m = &prog.passes[k].means[i];
                    let count = (layout.numel() / m.points) as f64;
                    for (j, o) in out.iter_mut().enumerate() {
                        let mut s = 0f64;
                        for part in &self.partials {
                            s += part[m.offset + j];
                        }
                        *o = (s / count) as f32;
                    }
                } else {
                    let big_n = layout.domain_len(from);
                    let m = &prog.maps[&(from, node.domain)];
                    let va = &small[a.index()];
                    let mut sums = vec![0f64; n * w];
                    for p in 0..big_n {
                        for l in 0..w {
                            sums[m[p] * w + l] += va[p * w + l] as f64;
                        }
                    }
                    let count = (big_n / n) as f64;
                    for (o, s) in out.iter_mut().zip(sums) {
                        *o = (s / count) as f32;
                    }
                }
            }
            Op::Pack(xs) => {
                for (l, x) in xs.iter().enumerate() {
                    let m = map(node.domain, ir.node(*x).domain);
                    for p in 0..n {
                        out[p * w + l] = small[x.index()][at(m, p)];
                    }
                }
            }
            Op::Dense { matrix, x } => {
                let m = &prog.weights[matrix.0 as usize];
                let vx = &small[x.index()];
                for p in 0..n {
                    let xp = &vx[p * m.cols..(p + 1) * m.cols];
                    for r in 0..m.rows {
                        let mut acc = m.bias[r];
                        for (c, &xv) in xp.iter().enumerate() {
                            acc += m.weight[r * m.cols + c] * xv;
                        }
                        out[p * w + r] = acc;
                    }
                }
            }
            Op::Lane { x, lane } => {
                let wx = ir.node(*x).width as usize;
                for p in 0..n {
                    out[p] = small[x.index()][p * wx + *lane as usize];
                }
            }
            Op::Store { .. } => unreachable!("stores are performed at the end of the step"),
        }
        if !self.small_t[v].is_empty() {
            let points = n;
            for (p, lanes) in out.chunks_exact(w).enumerate() {
                for (l, &x) in lanes.iter().enumerate() {
                    self.small_t[v][l * points + p] = x;
                }
            }
        }
        self.small[v] = out;
    }

    fn run_pass(&mut self, k: usize, param: &mut [f32], grad: &[f32]) {
        let prog = Arc::clone(&self.prog);
        let pass = &prog.passes[k];
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
        for (b, data) in self.state.iter_mut() {
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
        let mut per_thread: Vec<Vec<Job<'_>>> = (0..self.threads).map(|_| Vec::new()).collect();
        for (s, (views, partial)) in per_slice
            .into_iter()
            .zip(self.partials.iter_mut())
            .enumerate()
        {
            let partial = &mut partial[..pass.partial_len];
            partial.fill(0.0);
            per_thread[s % self.threads].push(Job {
                chunks: prog.slice_chunks(s),
                start: bounds[s],
                views,
                partial,
            });
        }
        let (isa, small, small_t) = (self.isa, &self.small, &self.small_t);
        let mut work = per_thread.into_iter().zip(self.scratch.iter_mut());
        let (mut first_jobs, first_scr) = work.next().expect("at least one thread");
        let prog = &*prog;
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
        for k in 0..prog.passes.len() {
            for &v in &prog.small_phases[k] {
                self.eval_small(v, &hyper);
            }
            self.run_pass(k, param, grad);
        }
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
            let src = &self.small[value.index()];
            let dst = self
                .state
                .get_mut(buffer)
                .expect("state buffer of the layout");
            let start = *lane as usize * n;
            for p in 0..n {
                let q = if vd == node.domain {
                    p
                } else {
                    prog.maps[&(node.domain, vd)][p]
                };
                dst[start + p] = src[q];
            }
        }
        self.step += 1;
        Ok(())
    }

    fn state(&self) -> Result<TensorState> {
        let mut state = TensorState::zeros(&self.prog.ir.layout, self.step);
        for (b, data) in &self.state {
            state.set(*b, data.clone())?;
        }
        Ok(state)
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
