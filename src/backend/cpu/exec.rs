//! The chunk executor: runs one pass's chunk program over one slice of the elements.

use super::program::{small_index, CpuProgram, Instr, Opnd, Pass, BUF};
use super::{kernels, Isa, CHUNK};
use crate::ir::StepIr;

/// Per-thread working memory, reused across chunks and steps.
#[derive(Debug, Default)]
pub(super) struct Scratch {
    pub(super) vals: Vec<f32>,
    pub(super) idx: [Vec<u32>; 3],
    pub(super) kind: [IdxKind; 3],
    /// Gathered lanes of the two operands of a binary instruction.
    pub(super) tmp: [Vec<f32>; 2],
}

/// A binary instruction's fields.
pub(super) struct Bin<'a> {
    pub(super) op: crate::ir::Binary,
    pub(super) a: &'a Opnd,
    pub(super) b: &'a Opnd,
    pub(super) out: usize,
    pub(super) width: usize,
}

/// A binary instruction with a small operand, lane by lane, reading the small operands in
/// place.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn small_binary(
    ir: &StepIr,
    bin: &Bin<'_>,
    len: usize,
    scr: &mut Scratch,
    views: &[View<'_>],
    local: usize,
    small: &[Vec<f32>],
    small_t: &[Vec<f32>],
) {
    let Scratch {
        vals,
        idx,
        kind,
        tmp,
    } = scr;
    let [tmp_a, tmp_b] = tmp;
    let op = bin.op;
    for l in 0..bin.width {
        let (o, p) = split_out(vals, bin.out + l * CHUNK, len, views, local);
        let sa = lane_src(ir, bin.a, l, len, &p, small, small_t, kind, idx, tmp_a);
        let sb = lane_src(ir, bin.b, l, len, &p, small, small_t, kind, idx, tmp_b);
        match (sa, sb) {
            (Src::V(a), Src::V(b)) => kernels::binary_vv(op, a, b, o),
            (Src::V(a), Src::S(b)) => kernels::binary_vs(op, a, b, o),
            (Src::S(a), Src::V(b)) => kernels::binary_sv(op, a, b, o),
            (Src::S(a), Src::S(b)) => {
                let mut r = [0f32];
                kernels::binary_vv(op, &[a], &[b], &mut r);
                o.fill(r[0]);
            }
        }
    }
}

/// `(x · a) · b` lane-wise, each product rounded.
#[inline(always)]
fn mul_mul(x: &[f32], a: Src<'_>, b: Src<'_>, o: &mut [f32]) {
    match (a, b) {
        (Src::S(a), Src::S(b)) => kernels::map1(x, o, |x| x * a * b),
        (Src::S(a), Src::V(b)) => kernels::map2(x, b, o, |x, b| x * a * b),
        (Src::V(a), Src::S(b)) => kernels::map2(x, a, o, |x, a| x * a * b),
        (Src::V(a), Src::V(b)) => kernels::map3(x, a, b, o, |x, a, b| x * a * b),
    }
}

/// A small operand of [`Instr::Dense`]'s pair as the AVX-512 kernel reads it, for a full
/// chunk: one value per row (constant over the chunk) or a contiguous run per row; `None`
/// for a gathered one.
#[cfg(target_arch = "x86_64")]
fn pair_bcast(
    ir: &StepIr,
    o: &Opnd,
    small: &[Vec<f32>],
    small_t: &[Vec<f32>],
    kind: &[IdxKind; 3],
) -> Option<kernels::wide::Bcast> {
    let Opnd::Small(node) = *o else { return None };
    let n = &ir.nodes[node];
    let w = n.width as usize;
    let src = &small[node];
    let points = src.len() / w;
    // Lane-major (for width 1, the value itself), as `lane_src` reads it.
    let src_t = if w == 1 { src } else { &small_t[node] };
    let (q, lane_step) = match small_index(n.domain).map_or(IdxKind::Const(0), |d| kind[d]) {
        IdxKind::Const(q) => (q, 0),
        // Points `q..q + CHUNK` exist: the chunk's elements map to them.
        IdxKind::Contig(q) => (q, 1),
        IdxKind::General => return None,
    };
    debug_assert!(src_t.len() == points * w && q + lane_step * (CHUNK - 1) < points);
    Some(kernels::wide::Bcast {
        ptr: src_t[q..].as_ptr(),
        row_stride: points,
        lane_step,
    })
}

/// One lane of a binary operand: a scalar, or `len` values.
pub(super) enum Src<'a> {
    S(f32),
    V(&'a [f32]),
}

/// Lane `l` of a binary operand for the current chunk.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn lane_src<'a>(
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

/// The index in a smaller domain (`strides`: its stride along each tensor axis, see
/// [`CpuProgram::strides`]) of the elements `e0..e0 + len` into `idx`, and how they map.
pub(super) fn chunk_index(
    strides: &[usize],
    dims: &[usize],
    e0: usize,
    len: usize,
    idx: &mut [u32],
) -> IdxKind {
    let rank = dims.len();
    let mut coord = [0usize; crate::shape::MAX_RANK];
    let mut rem = e0;
    let mut index = 0usize;
    for k in (0..rank).rev() {
        coord[k] = rem % dims[k];
        rem /= dims[k];
        index += coord[k] * strides[k];
    }
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
    if same {
        IdxKind::Const(first)
    } else if contig {
        IdxKind::Contig(first)
    } else {
        IdxKind::General
    }
}

/// How a chunk's elements map to the points of a smaller domain.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) enum IdxKind {
    /// All to one point.
    Const(usize),
    /// To consecutive points from this one.
    Contig(usize),
    /// Any other way (see the index vector).
    #[default]
    General,
}

/// One element buffer lane's part of a slice.
pub(super) enum View<'a> {
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
pub(super) struct Job<'a> {
    pub(super) chunks: (usize, usize),
    pub(super) start: usize,
    pub(super) views: Vec<View<'a>>,
    pub(super) partial: &'a mut [f64],
}

/// Splits `out` off the scratch; inputs are read from the parts before and after it, or
/// (slots from [`BUF`]) in place from the chunk's part of an element buffer.
pub(super) struct Parts<'a> {
    pub(super) left: &'a [f32],
    pub(super) right: &'a [f32],
    pub(super) out_start: usize,
    pub(super) out_end: usize,
    pub(super) bufs: &'a [View<'a>],
    /// The chunk's first element in the slice's buffer views.
    pub(super) local: usize,
}

/// The chunk's `len` values of slot `off` when it is an element buffer read in place.
#[inline(always)]
fn in_buf<'a>(bufs: &'a [View<'_>], off: usize, local: usize, len: usize) -> &'a [f32] {
    &bufs[off - BUF].get()[local..local + len]
}

impl Parts<'_> {
    #[inline(always)]
    fn get(&self, off: usize, len: usize) -> &[f32] {
        if off >= BUF {
            debug_assert!(len <= CHUNK, "a buffer read in place has width 1");
            in_buf(self.bufs, off, self.local, len)
        } else if off + len <= self.out_start {
            &self.left[off..off + len]
        } else {
            debug_assert!(off >= self.out_end);
            &self.right[off - self.out_end..off - self.out_end + len]
        }
    }
}

#[inline(always)]
pub(super) fn split_out<'a>(
    vals: &'a mut [f32],
    out: usize,
    len: usize,
    bufs: &'a [View<'a>],
    local: usize,
) -> (&'a mut [f32], Parts<'a>) {
    let (left, rest) = vals.split_at_mut(out);
    let (o, right) = rest.split_at_mut(len);
    (
        o,
        Parts {
            left,
            right,
            out_start: out,
            out_end: out + len,
            bufs,
            local,
        },
    )
}

/// [`kernels::sum_f64`] of `x` (of its squares when `square`), with the AVX-512 kernel when
/// `WIDE` (only set inside the AVX-512 entry point): the same additions in the same order.
#[inline(always)]
fn sum<const WIDE: bool>(x: &[f32], square: bool) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if WIDE {
        // SAFETY: `WIDE` is only set by `run_slice_avx512`, which runs only where the CPU
        // reported AVX-512F (see `dispatch`).
        return unsafe {
            if square {
                kernels::wide::sum_f64::<true>(x)
            } else {
                kernels::wide::sum_f64::<false>(x)
            }
        };
    }
    if square {
        kernels::sum_f64::<true>(x)
    } else {
        kernels::sum_f64::<false>(x)
    }
}

/// How many chunks ahead [`prefetch`] reads the element buffers.
const PREFETCH: usize = 4;

/// Asks for the `CHUNK` elements from `at` (in the slice) of every element buffer the pass
/// reads to be brought into the cache: the chunk program touches each buffer only once per
/// chunk, between long runs of arithmetic, which the hardware prefetcher does not run ahead
/// of. Only a hint: nothing is read, and nothing past a buffer's end is asked for.
#[inline(always)]
fn prefetch(pass: &Pass, job: &Job<'_>, at: usize) {
    #[cfg(target_arch = "x86_64")]
    for &b in &pass.reads {
        let v = job.views[b].get();
        let end = v.len().min(at + CHUNK);
        // 16 floats: one 64-byte cache line.
        for i in (at..end).step_by(16) {
            // SAFETY: `i < v.len()`, so the pointer is inside the buffer; SSE (and so
            // `_mm_prefetch`) is part of every x86-64 CPU.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    v.as_ptr().add(i).cast(),
                )
            };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (pass, job, at);
}

/// Runs one pass over one slice (the generic body; see the `run_slice_*` entry points).
#[inline(always)]
pub(super) fn run_slice<const FMA: bool, const TILE: usize, const WIDE: bool>(
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
        prefetch(pass, job, local + PREFETCH * CHUNK);
        // How the chunk maps into the smaller domains (precomputed); index vectors only for
        // the chunks that need them.
        for d in 0..3 {
            if !pass.domains[d] {
                continue;
            }
            scr.kind[d] = prog.kinds[d][c];
            if scr.kind[d] == IdxKind::General {
                chunk_index(&prog.strides[d], dims, e0, len, &mut scr.idx[d]);
            }
        }
        for instr in &pass.instrs {
            match instr {
                Instr::Load { buf, out } => {
                    // Only a load into a pack's lane is copied (see `BUF`).
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
                    let (o, p) = split_out(&mut scr.vals, *out, span, &job.views, local);
                    kernels::unary::<FMA>(*op, p.get(*a, span), o);
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
                        let (o, p) = split_out(&mut scr.vals, *out, span, &job.views, local);
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
                    let b = Bin {
                        op: *op,
                        a,
                        b,
                        out: *out,
                        width: *width,
                    };
                    small_binary(ir, &b, len, scr, &job.views, local, small, small_t);
                }
                Instr::Pack { xs, out } => {
                    for (l, &x) in xs.iter().enumerate() {
                        // Lanes computed in place need no copy.
                        if x >= BUF {
                            scr.vals[out + l * CHUNK..out + l * CHUNK + len]
                                .copy_from_slice(in_buf(&job.views, x, local, len));
                        } else if x != out + l * CHUNK {
                            scr.vals.copy_within(x..x + len, out + l * CHUNK);
                        }
                    }
                }
                Instr::Dense {
                    matrix,
                    x,
                    addend,
                    out,
                    relu,
                    pair,
                } => {
                    let m = &prog.weights[*matrix];
                    if let Some((a, b)) = pair {
                        #[cfg(target_arch = "x86_64")]
                        if WIDE && len == CHUNK {
                            let bcast = |o: &Opnd| pair_bcast(ir, o, small, small_t, &scr.kind);
                            if let (Some(ba), Some(bb)) = (bcast(a), bcast(b)) {
                                let (o, p) = split_out(
                                    &mut scr.vals,
                                    *out,
                                    m.rows * CHUNK,
                                    &job.views,
                                    local,
                                );
                                let xv = p.get(*x, m.cols * CHUNK);
                                // SAFETY: AVX-512F as below; `pair_bcast` gives operands
                                // readable at every row and, for a full chunk, every lane.
                                unsafe {
                                    kernels::wide::dense_pair(&m.wide, xv, o, len, *relu, ba, bb)
                                };
                                continue;
                            }
                        }
                        let bin = Bin {
                            op: crate::ir::Binary::Add,
                            a,
                            b,
                            out: addend.expect("a pair's slot"),
                            width: m.rows,
                        };
                        small_binary(ir, &bin, len, scr, &job.views, local, small, small_t);
                    }
                    let (o, p) = split_out(&mut scr.vals, *out, m.rows * CHUNK, &job.views, local);
                    let xv = p.get(*x, m.cols * CHUNK);
                    let epi = kernels::Epilogue {
                        addend: addend.map(|a| p.get(a, m.rows * CHUNK)),
                        relu: *relu,
                    };
                    #[cfg(target_arch = "x86_64")]
                    if WIDE {
                        // SAFETY: `WIDE` is only set by `run_slice_avx512`, which runs only
                        // where the CPU reported AVX-512F (see `dispatch`).
                        unsafe { kernels::wide::dense(&m.wide, xv, o, len, epi) };
                        continue;
                    }
                    kernels::dense::<FMA, TILE>(&m.blocked, xv, o, len, epi);
                }
                Instr::Axpby { s, x, out } => {
                    let (o, p) = split_out(&mut scr.vals, *out, len, &job.views, local);
                    let (s0, s1) = (small[s[0]][0], small[s[1]][0]);
                    kernels::axpby(s0, p.get(x[0], len), s1, p.get(x[1], len), o);
                }
                Instr::ScalePack { x, s, out } => {
                    for (l, (&x, &s)) in x.iter().zip(s).enumerate() {
                        let (o, p) =
                            split_out(&mut scr.vals, out + l * CHUNK, len, &job.views, local);
                        kernels::binary_vs(crate::ir::Binary::Mul, p.get(x, len), small[s][0], o);
                    }
                }
                Instr::MulMul { x, a, b, out } => {
                    let Scratch {
                        vals,
                        idx,
                        kind,
                        tmp,
                    } = &mut *scr;
                    let [tmp_a, tmp_b] = tmp;
                    let (o, p) = split_out(vals, *out, len, &job.views, local);
                    let xv = p.get(*x, len);
                    let sa = lane_src(ir, a, 0, len, &p, small, small_t, kind, idx, tmp_a);
                    let sb = lane_src(ir, b, 0, len, &p, small, small_t, kind, idx, tmp_b);
                    mul_mul(xv, sa, sb, o);
                }
                Instr::Lane { x, lane, out } => {
                    let (o, p) = split_out(&mut scr.vals, *out, len, &job.views, local);
                    o.copy_from_slice(p.get(x + lane * CHUNK, len));
                }
                Instr::Accum { mean, src, square } => {
                    let m = &pass.means[*mean];
                    let part = &mut job.partial[m.offset..m.offset + m.points * m.width];
                    let w = m.width;
                    let kind = match small_index(m.domain) {
                        Some(d) => scr.kind[d],
                        None => IdxKind::Const(0),
                    };
                    let sq = |v: f32| if *square { v * v } else { v };
                    for l in 0..w {
                        let x = if *src >= BUF {
                            in_buf(&job.views, *src, local, len)
                        } else {
                            &scr.vals[src + l * CHUNK..src + l * CHUNK + len]
                        };
                        match kind {
                            IdxKind::Const(p) => part[p * w + l] += sum::<WIDE>(x, *square),
                            IdxKind::Contig(p) if w == 1 => {
                                for (s, &v) in part[p..p + len].iter_mut().zip(x) {
                                    *s += sq(v) as f64;
                                }
                            }
                            IdxKind::Contig(p) => {
                                for (i, &v) in x.iter().enumerate() {
                                    part[(p + i) * w + l] += sq(v) as f64;
                                }
                            }
                            IdxKind::General => {
                                let idx = &scr.idx[small_index(m.domain).expect("indexed")];
                                for (i, &v) in x.iter().enumerate() {
                                    part[idx[i] as usize * w + l] += sq(v) as f64;
                                }
                            }
                        }
                    }
                }
                Instr::Store { buf, src } => {
                    let x = if *src >= BUF {
                        // A loaded value stored unchanged (through a copy: the two may be
                        // the same buffer).
                        let t = &mut scr.tmp[0];
                        t.clear();
                        t.extend_from_slice(in_buf(&job.views, *src, local, len));
                        &t[..]
                    } else {
                        &scr.vals[*src..*src + len]
                    };
                    match &mut job.views[*buf] {
                        View::Rw(dst) => dst[local..local + len].copy_from_slice(x),
                        View::Ro(_) => unreachable!("stored buffers are writable in their pass"),
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
/// # Safety
/// The CPU must support AVX2 and FMA (checked by [`Isa::detect`]; calling a
/// `#[target_feature]` function from code without those features is unsafe either way).
pub(super) unsafe fn run_slice_avx2(
    prog: &CpuProgram,
    pass: &Pass,
    small: &[Vec<f32>],
    small_t: &[Vec<f32>],
    scr: &mut Scratch,
    job: &mut Job<'_>,
) {
    run_slice::<true, 16, false>(prog, pass, small, small_t, scr, job)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
/// # Safety
/// The CPU must support AVX-512F, AVX2 and FMA (checked by [`Isa::detect`]).
pub(super) unsafe fn run_slice_avx512(
    prog: &CpuProgram,
    pass: &Pass,
    small: &[Vec<f32>],
    small_t: &[Vec<f32>],
    scr: &mut Scratch,
    job: &mut Job<'_>,
) {
    run_slice::<true, 32, true>(prog, pass, small, small_t, scr, job)
}

pub(super) fn run_slice_portable(
    prog: &CpuProgram,
    pass: &Pass,
    small: &[Vec<f32>],
    small_t: &[Vec<f32>],
    scr: &mut Scratch,
    job: &mut Job<'_>,
) {
    run_slice::<false, 8, false>(prog, pass, small, small_t, scr, job)
}

pub(super) fn dispatch(
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
        // SAFETY: as above, after the CPU reported AVX-512F (and AVX2, FMA).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { run_slice_avx512(prog, pass, small, small_t, scr, job) },
        _ => run_slice_portable(prog, pass, small, small_t, scr, job),
    }
}

/// A buffer lane, writable or not.
pub(super) fn view(data: &mut [f32], write: bool) -> View<'_> {
    if write {
        View::Rw(data)
    } else {
        View::Ro(data)
    }
}

/// Splits `data` at the element bounds `bounds` (relative to `data`).
pub(super) fn split_views<'a>(data: View<'a>, bounds: &[usize]) -> Vec<View<'a>> {
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
