//! Building a [`CpuProgram`]: the IR split into levels, each level's element nodes compiled
//! into a linear chunk program with scratch slots assigned.

use super::exec::{chunk_index, IdxKind};
use super::{kernels, CHUNK, SLICES};
use crate::backend::interp::Broadcasts;
use crate::ir::{Binary, Buffer, Op, StepIr, Unary, ValueId};
use crate::plan::{elem_closure, is_elem_mean, levels};
use crate::shape::Domain;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// A slot at or above this is not in the scratch: element buffer `slot - BUF` read in place
/// (a loaded value: width 1, the chunk's part of that buffer).
pub(super) const BUF: usize = 1 << (usize::BITS - 1);

/// A value operand of an element instruction.
#[derive(Clone, Copy, Debug)]
pub(super) enum Opnd {
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
pub(super) enum Instr {
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
    /// A dense layer, then (fused, when the dense node's only use is that add, and the add's
    /// only use that relu) `+ addend` and the relu.
    Dense {
        matrix: usize,
        x: usize,
        addend: Option<usize>,
        out: usize,
        relu: bool,
        /// The addend is `a + b` of two small operands, computed into the addend's slot by
        /// this instruction (lane by lane, as [`Instr::Binary`]) unless the kernel adds the
        /// two directly (the AVX-512 kernel, for a full chunk of constant or contiguous
        /// operands: same roundings).
        pair: Option<(Opnd, Opnd)>,
    },
    Lane {
        x: usize,
        lane: usize,
        out: usize,
    },
    /// `s[0] · x[0] + s[1] · x[1]` (width 1; `s`: width-1 step nodes), each product rounded
    /// as by its own instruction: two multiplications by a scalar whose only use is the add
    /// after them, fused so that the products are not stored.
    Axpby {
        s: [usize; 2],
        x: [usize; 2],
        out: usize,
    },
    /// A pack of scalar products: lane `l` of `out` is `x[l] · s[l]` (`s`: width-1 step
    /// nodes); the products used only by the pack, fused into it.
    ScalePack {
        x: Vec<usize>,
        s: Vec<usize>,
        out: usize,
    },
    /// `(x · a) · b` (width 1; `a`, `b`: [`Opnd::Small`]), each product rounded: a product
    /// by a small operand whose only use is a product by another, fused so that the first
    /// is not stored.
    MulMul {
        x: usize,
        a: Opnd,
        b: Opnd,
        out: usize,
    },
    /// Adds `src` (squared first, in f32, when `square`: a square whose only use is this
    /// mean, fused) to the pass's partial sums of mean `mean`.
    Accum {
        mean: usize,
        src: usize,
        square: bool,
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
            Instr::Dense { x, addend, out, .. } => {
                f(x, false);
                if let Some(a) = addend {
                    f(a, false);
                }
                f(out, true);
            }
            Instr::Lane { x, out, .. } => {
                f(x, false);
                f(out, true);
            }
            Instr::Axpby { x, out, .. } => {
                f(&mut x[0], false);
                f(&mut x[1], false);
                f(out, true);
            }
            Instr::MulMul { x, out, .. } => {
                f(x, false);
                f(out, true);
            }
            Instr::ScalePack { x, out, .. } => {
                x.iter_mut().for_each(|x| f(x, false));
                f(out, true);
            }
            Instr::Accum { src, .. } | Instr::Store { src, .. } => f(src, false),
        }
    }
}

/// An element-domain mean accumulated by a pass.
#[derive(Clone, Debug)]
pub(super) struct MeanSpec {
    pub(super) node: usize,
    pub(super) domain: Domain,
    pub(super) width: usize,
    pub(super) points: usize,
    pub(super) offset: usize,
}

/// One pass over the elements.
#[derive(Clone, Debug)]
pub(super) struct Pass {
    pub(super) instrs: Vec<Instr>,
    pub(super) scratch: usize,
    pub(super) means: Vec<MeanSpec>,
    pub(super) partial_len: usize,
    /// Which of the row/col/rest index vectors the pass needs.
    pub(super) domains: [bool; 3],
    /// Element buffers the pass writes.
    pub(super) writes: Vec<bool>,
    /// Element buffers the pass reads (ids, ascending): prefetched a few chunks ahead.
    pub(super) reads: Vec<usize>,
}

/// A dense layer's weights arranged for the chunk kernel (bias filled with zeros when absent).
#[derive(Clone, Debug)]
pub(super) struct Weights {
    pub(super) rows: usize,
    pub(super) cols: usize,
    /// Arranged for the chunk kernel.
    pub(super) blocked: kernels::Blocked,
    /// Arranged for the AVX-512 kernel.
    #[cfg(target_arch = "x86_64")]
    pub(super) wide: kernels::wide::Blocked,
}

pub(super) fn small_index(d: Domain) -> Option<usize> {
    match d {
        Domain::Row => Some(0),
        Domain::Col => Some(1),
        Domain::Rest => Some(2),
        _ => None,
    }
}

/// A step compiled for the CPU: what [`CpuStepper`](super::CpuStepper) runs. Built once per IR.
#[derive(Debug)]
pub struct CpuProgram {
    pub(super) ir: Arc<StepIr>,
    /// Small-domain nodes (not stores) of every level, in topological order.
    pub(super) small_phases: Vec<Vec<usize>>,
    pub(super) small_stores: Vec<usize>,
    pub(super) passes: Vec<Pass>,
    /// For an element mean node: (pass, index in its means).
    pub(super) mean_of: HashMap<usize, (usize, usize)>,
    /// Broadcast maps between the small domains (not from the element domain: the passes
    /// index chunks with [`CpuProgram::strides`] instead).
    pub(super) bc: Broadcasts,
    /// (buffer, lane) of every element buffer lane.
    pub(super) elem_bufs: Vec<(Buffer, u32)>,
    /// For row/col/rest: the stride in that domain of each tensor axis (0 for removed axes).
    pub(super) strides: [Vec<usize>; 3],
    pub(super) weights: Vec<Weights>,
    /// For row/col/rest: how each chunk maps into that domain (empty for a domain the layout
    /// lacks); computed once, so that a pass builds index vectors only for `General` chunks.
    pub(super) kinds: [Vec<IdxKind>; 3],
    pub(super) chunks: usize,
    pub(super) slices: usize,
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
        let bc = Broadcasts::new(&layout, |d| d != Domain::Elem);
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
                    #[cfg(target_arch = "x86_64")]
                    wide: kernels::wide::Blocked::new(m.rows, m.cols, &m.weight, &bias),
                    rows: m.rows,
                    cols: m.cols,
                }
            })
            .collect();
        let numel = layout.numel();
        let chunks = numel.div_ceil(CHUNK);
        let mut idx = vec![0u32; CHUNK];
        let kinds = [0, 1, 2].map(|d| {
            if strides[d].is_empty() {
                return Vec::new();
            }
            (0..chunks)
                .map(|c| {
                    let e0 = c * CHUNK;
                    chunk_index(&strides[d], &dims, e0, CHUNK.min(numel - e0), &mut idx)
                })
                .collect()
        });
        CpuProgram {
            small_phases,
            small_stores,
            passes,
            mean_of,
            bc,
            elem_bufs,
            strides,
            weights,
            kinds,
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

    pub(super) fn slice_chunks(&self, s: usize) -> (usize, usize) {
        (
            s * self.chunks / self.slices,
            (s + 1) * self.chunks / self.slices,
        )
    }
}

/// Replaces each `t = x · a; out = t · b` (two adjacent width-1 instructions, `a`, `b` small
/// operands, `t` used only there) with one [`Instr::MulMul`]. Runs on value ids, before slots
/// are assigned.
fn fuse_mul_mul(instrs: &mut Vec<Instr>) {
    let uses = use_counts(instrs);
    let mut out = Vec::with_capacity(instrs.len());
    let mut i = 0;
    while i < instrs.len() {
        if let (
            Instr::Binary {
                op: Binary::Mul,
                a: Opnd::Slot(x),
                b: a @ Opnd::Small(_),
                out: t,
                width: 1,
            },
            Some(Instr::Binary {
                op: Binary::Mul,
                a: Opnd::Slot(t2),
                b: b @ Opnd::Small(_),
                out: o,
                width: 1,
            }),
        ) = (&instrs[i], instrs.get(i + 1))
        {
            if t == t2 && uses.get(t) == Some(&1) {
                out.push(Instr::MulMul {
                    x: *x,
                    a: *a,
                    b: *b,
                    out: *o,
                });
                i += 2;
                continue;
            }
        }
        out.push(instrs[i].clone());
        i += 1;
    }
    *instrs = out;
}

/// Replaces each pack whose lanes are all scalar products used only by the pack with one
/// [`Instr::ScalePack`] (the products move to the pack). Runs on value ids, before slots are
/// assigned.
fn fuse_scale_pack(instrs: &mut Vec<Instr>) {
    let uses = use_counts(instrs);
    // Value → (index of its instruction, value, scalar node) for width-1 scalar products.
    let mut products: HashMap<usize, (usize, usize, usize)> = HashMap::new();
    for (i, instr) in instrs.iter().enumerate() {
        if let Instr::Binary {
            op: Binary::Mul,
            a,
            b,
            out,
            width: 1,
        } = *instr
        {
            if let (Opnd::Scalar(s), Opnd::Slot(x)) | (Opnd::Slot(x), Opnd::Scalar(s)) = (a, b) {
                products.insert(out, (i, x, s));
            }
        }
    }
    let mut drop = vec![false; instrs.len()];
    for instr in instrs.iter_mut() {
        let Instr::Pack { xs, out } = instr else {
            continue;
        };
        let lanes: Option<Vec<(usize, usize, usize)>> = xs
            .iter()
            .map(|v| products.get(v).filter(|_| uses.get(v) == Some(&1)).copied())
            .collect();
        // Distinct lanes: a product used twice by the pack has two uses.
        if let Some(lanes) = lanes {
            for &(i, _, _) in &lanes {
                drop[i] = true;
            }
            *instr = Instr::ScalePack {
                x: lanes.iter().map(|l| l.1).collect(),
                s: lanes.iter().map(|l| l.2).collect(),
                out: *out,
            };
        }
    }
    let mut k = 0;
    instrs.retain(|_| {
        k += 1;
        !drop[k - 1]
    });
}

/// How many instructions read each value (value ids, before slots are assigned).
fn use_counts(instrs: &mut [Instr]) -> HashMap<usize, usize> {
    let mut uses: HashMap<usize, usize> = HashMap::new();
    for instr in instrs.iter_mut() {
        instr.visit(&mut |s, def| {
            if !def {
                *uses.entry(*s).or_default() += 1;
            }
        });
    }
    uses
}

/// Replaces each `t0 = s0 · x0; t1 = s1 · x1; out = t0 + t1` (three adjacent width-1
/// instructions, `s0`, `s1` scalars, the products used only by the add) with one
/// [`Instr::Axpby`]. Runs on value ids, before slots are assigned.
fn fuse_axpby(instrs: &mut Vec<Instr>) {
    let uses = use_counts(instrs);
    // A scalar product: (scalar node, value, product).
    let product = |i: &Instr| match *i {
        Instr::Binary {
            op: Binary::Mul,
            a,
            b,
            out,
            width: 1,
        } => match (a, b) {
            (Opnd::Scalar(s), Opnd::Slot(x)) | (Opnd::Slot(x), Opnd::Scalar(s)) => {
                Some((s, x, out))
            }
            _ => None,
        },
        _ => None,
    };
    let mut out = Vec::with_capacity(instrs.len());
    let mut i = 0;
    while i < instrs.len() {
        if i + 2 < instrs.len() {
            if let (
                Some(p0),
                Some(p1),
                Instr::Binary {
                    op: Binary::Add,
                    a: Opnd::Slot(a),
                    b: Opnd::Slot(b),
                    out: sum,
                    width: 1,
                },
            ) = (product(&instrs[i]), product(&instrs[i + 1]), &instrs[i + 2])
            {
                let once = |t: usize| uses.get(&t) == Some(&1);
                let (t0, t1) = (p0.2, p1.2);
                let order = if (*a, *b) == (t0, t1) {
                    Some([p0, p1])
                } else if (*a, *b) == (t1, t0) {
                    Some([p1, p0])
                } else {
                    None
                };
                if let Some([q0, q1]) = order.filter(|_| t0 != t1 && once(t0) && once(t1)) {
                    out.push(Instr::Axpby {
                        s: [q0.0, q1.0],
                        x: [q0.1, q1.1],
                        out: *sum,
                    });
                    i += 3;
                    continue;
                }
            }
        }
        out.push(instrs[i].clone());
        i += 1;
    }
    *instrs = out;
}

/// Builds a pass's chunk program from its element nodes (topological order) and assigns slots.
pub(super) fn build_pass(
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
    // A dense node whose only use is an add of an element value, and/or whose (sum's) only
    // use is a relu, is computed with those applied by the kernel before its store. The fused
    // instruction is emitted at its last node (the addend is computed by then) and defines
    // that node's value; the nodes it absorbs emit nothing.
    let mut uses = vec![0usize; ir.nodes.len()];
    let mut user = vec![usize::MAX; ir.nodes.len()];
    for (i, n) in ir.nodes.iter().enumerate() {
        for o in n.op.operands() {
            uses[o.index()] += 1;
            user[o.index()] = i;
        }
    }
    let in_pass: HashSet<usize> = nodes.iter().map(|v| v.index()).collect();
    // Last fused node → (dense node, addend, relu); absorbed nodes.
    let mut fused_at: HashMap<usize, (usize, Option<ValueId>, bool)> = HashMap::new();
    let mut absorbed: HashSet<usize> = HashSet::new();
    for &v in nodes {
        if !matches!(ir.node(v).op, Op::Dense { .. }) {
            continue;
        }
        let d = v.index();
        let (mut last, mut addend, mut relu) = (d, None, false);
        if uses[d] == 1 && in_pass.contains(&user[d]) {
            if let Op::Binary(Binary::Add, a, b) = ir.nodes[user[d]].op {
                let other = if a.index() == d { b } else { a };
                let o = ir.node(other);
                if a != b && o.domain == Domain::Elem && o.width == ir.nodes[d].width {
                    addend = Some(other);
                    last = user[d];
                }
            }
        }
        if uses[last] == 1
            && in_pass.contains(&user[last])
            && matches!(ir.nodes[user[last]].op, Op::Unary(Unary::Relu, _))
        {
            relu = true;
            last = user[last];
        }
        if last != d {
            absorbed.insert(d);
            if addend.is_some() && relu {
                absorbed.insert(user[d]);
            }
            fused_at.insert(last, (d, addend, relu));
        }
    }
    let mut stores = Vec::new();
    for &v in nodes {
        let node = ir.node(v);
        let out = v.index();
        let width = node.width as usize;
        if absorbed.contains(&out) {
            continue;
        }
        if let Some(&(d, addend, relu)) = fused_at.get(&out) {
            let Op::Dense { matrix, x } = ir.nodes[d].op else {
                unreachable!("a fused dense node")
            };
            let x = slot(x, &mut instrs, &mut domains);
            let addend = addend.map(|a| slot(a, &mut instrs, &mut domains));
            instrs.push(Instr::Dense {
                matrix: matrix.0 as usize,
                x,
                addend,
                out,
                relu,
                pair: None,
            });
            for (i, m) in means.iter().enumerate() {
                if ir.nodes[m.node].op.operands()[0] == v {
                    instrs.push(Instr::Accum {
                        mean: i,
                        src: out,
                        square: false,
                    });
                }
            }
            continue;
        }
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
                addend: None,
                out,
                relu: false,
                pair: None,
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
                instrs.push(Instr::Accum {
                    mean: i,
                    src: out,
                    square: false,
                });
            }
        }
    }
    for (buf, value) in stores {
        writes[buf] = true;
        let src = slot(value, &mut instrs, &mut domains);
        instrs.push(Instr::Store { buf, src });
    }

    fuse_axpby(&mut instrs);
    fuse_mul_mul(&mut instrs);
    fuse_scale_pack(&mut instrs);

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
    let pair_at: Vec<usize> = (1..instrs.len())
        .filter(|&i| match (&instrs[i - 1], &instrs[i]) {
            (
                Instr::Binary {
                    op: Binary::Add,
                    a: Opnd::Small(_),
                    b: Opnd::Small(_),
                    out: sum,
                    width,
                },
                Instr::Dense {
                    matrix,
                    addend: Some(addend),
                    ..
                },
            ) => {
                sum == addend
                    && *width == ir.matrices[*matrix].rows
                    && use_count.get(sum) == Some(&1)
            }
            _ => false,
        })
        .map(|i| i - 1)
        .collect();
    // A square whose only use is the accumulation right after it is done by that
    // accumulation (see `Instr::Accum::square`).
    let square_at: Vec<usize> = (1..instrs.len())
        .filter(|&i| match (&instrs[i - 1], &instrs[i]) {
            (
                Instr::Unary {
                    op: Unary::Square,
                    out,
                    ..
                },
                Instr::Accum { src, .. },
            ) => out == src && use_count.get(out) == Some(&1),
            _ => false,
        })
        .map(|i| i - 1)
        .collect();
    // A loaded value not computed into a pack's lane is read in place from its buffer.
    let in_place: HashMap<usize, usize> = instrs
        .iter()
        .filter_map(|instr| match *instr {
            Instr::Load { buf, out } if !alias.contains_key(&out) => Some((out, buf)),
            _ => None,
        })
        .collect();
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
                } else if let Some(&buf) = in_place.get(s) {
                    BUF + buf
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
                    // An aliased lane lives in its pack's slot, freed with the pack; a
                    // value read in place has no slot.
                    if !alias.contains_key(&v) && off < BUF {
                        free.entry(ir.nodes[v].width as usize)
                            .or_default()
                            .push(off);
                    }
                }
            }
        }
    }
    // An addend of two small operands computed right before its only (dense) use is left to
    // the dense instruction (see `Instr::Dense::pair`); loads read in place copy nothing.
    let mut drop = vec![false; instrs.len()];
    for &i in &pair_at {
        if let Instr::Binary { a, b, .. } = instrs[i] {
            if let Instr::Dense { pair, .. } = &mut instrs[i + 1] {
                *pair = Some((a, b));
                drop[i] = true;
            }
        }
    }
    for &i in &square_at {
        if let Instr::Unary { a, .. } = instrs[i] {
            if let Instr::Accum { src, square, .. } = &mut instrs[i + 1] {
                // `a` stays valid: its slot is freed at the square, and nothing is written
                // between the two.
                (*src, *square) = (a, true);
                drop[i] = true;
            }
        }
    }
    for (i, instr) in instrs.iter().enumerate() {
        if matches!(instr, Instr::Load { out, .. } if *out >= BUF) {
            drop[i] = true;
        }
    }
    let mut k = 0;
    instrs.retain(|_| {
        k += 1;
        !drop[k - 1]
    });
    let mut read = vec![false; n_bufs];
    for instr in instrs.iter_mut() {
        if let Instr::Load { buf, .. } = *instr {
            read[buf] = true;
        }
        instr.visit(&mut |s, def| {
            if !def && *s >= BUF {
                read[*s - BUF] = true;
            }
        });
    }
    let reads = (0..n_bufs).filter(|&b| read[b]).collect();
    Pass {
        instrs,
        scratch: top,
        means,
        partial_len,
        domains,
        writes,
        reads,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fusions fire on the μLO step (their results are checked against the interpreter
    /// and the golden cases by tests/cpu_*.rs; this checks that they are not dead code).
    #[test]
    fn the_mulo_step_gets_its_fusions() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/golden/weights");
        let lopt = crate::lopt::LearnedOptimizer::from_dir(std::path::Path::new(dir)).unwrap();
        let shape = crate::shape::Shape::parse("1024x512").unwrap();
        let prog = CpuProgram::new(Arc::new(crate::compile_step(&shape, &lopt).unwrap()));
        let all = || prog.passes.iter().flat_map(|p| &p.instrs);
        let axpby = all().filter(|i| matches!(i, Instr::Axpby { .. })).count();
        let squares = all()
            .filter(|i| matches!(i, Instr::Accum { square: true, .. }))
            .count();
        let pairs = all()
            .filter(|i| matches!(i, Instr::Dense { pair: Some(_), .. }))
            .count();
        assert!(axpby >= 3 * prog.passes.len(), "{axpby} axpby");
        assert!(squares >= 6, "{squares} squares accumulated");
        assert_eq!(pairs, 1);
        let mul_mul = all().filter(|i| matches!(i, Instr::MulMul { .. })).count();
        assert!(mul_mul >= 6, "{mul_mul} mul_mul");
        let scale_pack = all()
            .filter(|i| matches!(i, Instr::ScalePack { x, .. } if x.len() == 16))
            .count();
        assert_eq!(scale_pack, 1);
    }
}
