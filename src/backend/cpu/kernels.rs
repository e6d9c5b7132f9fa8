//! Lane-parallel kernels over one chunk: every value is `[width][CHUNK]` floats, so each loop
//! runs over contiguous lanes and LLVM vectorizes it. Everything here is `#[inline(always)]`
//! so that it takes the instruction set of the `#[target_feature]` entry point it is inlined
//! into (see [`super::Isa`]).

use super::CHUNK;
use crate::ir::{Binary, Unary};

/// `a · b + c`, fused when `FMA` (only ever true inside an FMA-enabled function, where
/// `mul_add` is one instruction; elsewhere it would be a slow library call).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Lane-wise one-operand operation (the interpreter's definition: NaN-propagating relu). `e^x`
/// is [`exp`] where `VEC_EXP` (the AVX2 and AVX-512 paths, where it vectorizes to 8 or 16
/// lanes), else the library's `f32::exp` (portable code: measured faster there).
#[inline(always)]
pub fn unary<const VEC_EXP: bool>(op: Unary, a: &[f32], out: &mut [f32]) {
    match op {
        Unary::Neg => map1(a, out, |x| -x),
        Unary::Square => map1(a, out, |x| x * x),
        Unary::Rsqrt => map1(a, out, |x| 1.0 / x.sqrt()),
        Unary::Exp if VEC_EXP => map1(a, out, exp),
        Unary::Exp => out.iter_mut().zip(a).for_each(|(o, &x)| *o = x.exp()),
        Unary::Tanh => out.iter_mut().zip(a).for_each(|(o, &x)| *o = x.tanh()),
        Unary::Relu => map1(a, out, relu_of),
        Unary::NanToNum => map1(a, out, nan_to_num),
    }
}

/// Lanes per step of [`map1`], [`map2`] and [`map3`]: one 512-bit register of f32.
const W: usize = 16;

/// `out[i] = f(a[i])` for `i < out.len()`, `W` lanes at a time through local arrays (so that
/// LLVM vectorizes each step without runtime overlap checks or a scalar epilogue), then the
/// remaining lanes one by one.
#[inline(always)]
pub fn map1(a: &[f32], out: &mut [f32], f: impl Fn(f32) -> f32) {
    let n = out.len();
    let mut oc = out.chunks_exact_mut(W);
    let mut ac = a[..n].chunks_exact(W);
    for (o, a) in (&mut oc).zip(&mut ac) {
        let a: [f32; W] = a.try_into().expect("exact chunk");
        let r: [f32; W] = std::array::from_fn(|l| f(a[l]));
        o.copy_from_slice(&r);
    }
    for (o, &a) in oc.into_remainder().iter_mut().zip(ac.remainder()) {
        *o = f(a);
    }
}

/// `out[i] = f(a[i], b[i])`, as [`map1`].
#[inline(always)]
pub fn map2(a: &[f32], b: &[f32], out: &mut [f32], f: impl Fn(f32, f32) -> f32) {
    let n = out.len();
    let mut oc = out.chunks_exact_mut(W);
    let mut ac = a[..n].chunks_exact(W);
    let mut bc = b[..n].chunks_exact(W);
    for ((o, a), b) in (&mut oc).zip(&mut ac).zip(&mut bc) {
        let a: [f32; W] = a.try_into().expect("exact chunk");
        let b: [f32; W] = b.try_into().expect("exact chunk");
        let r: [f32; W] = std::array::from_fn(|l| f(a[l], b[l]));
        o.copy_from_slice(&r);
    }
    let rest = ac.remainder().iter().zip(bc.remainder());
    for (o, (&a, &b)) in oc.into_remainder().iter_mut().zip(rest) {
        *o = f(a, b);
    }
}

/// `out[i] = f(a[i], b[i], c[i])`, as [`map1`].
#[inline(always)]
pub fn map3(a: &[f32], b: &[f32], c: &[f32], out: &mut [f32], f: impl Fn(f32, f32, f32) -> f32) {
    let n = out.len();
    let mut oc = out.chunks_exact_mut(W);
    let mut ac = a[..n].chunks_exact(W);
    let mut bc = b[..n].chunks_exact(W);
    let mut cc = c[..n].chunks_exact(W);
    for (((o, a), b), c) in (&mut oc).zip(&mut ac).zip(&mut bc).zip(&mut cc) {
        let a: [f32; W] = a.try_into().expect("exact chunk");
        let b: [f32; W] = b.try_into().expect("exact chunk");
        let c: [f32; W] = c.try_into().expect("exact chunk");
        let r: [f32; W] = std::array::from_fn(|l| f(a[l], b[l], c[l]));
        o.copy_from_slice(&r);
    }
    let rest = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .zip(cc.remainder());
    for (o, ((&a, &b), &c)) in oc.into_remainder().iter_mut().zip(rest) {
        *o = f(a, b, c);
    }
}

/// `e^x` in f32 with plain multiply-adds and bit operations, so that a loop of it vectorizes
/// (`f32::exp` is a library call per lane): Cephes' `expf`. `x = n·ln 2 + r` with `n` the
/// nearest integer to `x·log2 e` and `|r| ≤ ln 2 / 2` (`ln 2` in two parts, so that `r` is
/// exact), a degree-5 polynomial for `(e^r − 1 − r) / r²`, then `2^n` from the exponent bits.
/// Within 2 ulp of the correctly rounded value (measured by the tests over the whole range
/// against `f64::exp`); `+∞` above `ln f32::MAX`, 0 below `ln 2^-126` ≈ −87.34 (results
/// that would be subnormal are flushed to 0), NaN for NaN. Mul and add are separate (no
/// FMA), so the AVX2 and AVX-512 paths give the same bits.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // 1.5 · 2^23: adding it rounds to an integer (to nearest, ties to even) in the low bits.
    const ROUND: f32 = 12_582_912.0;
    // 0.693359375: few mantissa bits, so that `n · LN2_HI` is exact.
    const LN2_HI: f32 = 355.0 / 512.0;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const P: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        // Cephes' 5.0000001201e-1, as an f32.
        0.5,
    ];
    const HI: f32 = 88.722_84;
    const LO: f32 = -87.336_55;
    let xc = x.clamp(LO, HI);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let mut p = P[0];
    for c in &P[1..] {
        p = p * r + c;
    }
    let y = p * (r * r) + r + 1.0;
    // `n` in −126..=128: 2^n as two normal powers of two, 2^⌊n/2⌋ · 2^(n − ⌊n/2⌋) (each
    // multiplication by one is exact while the result is normal, as it is here).
    let k = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let pow2 = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
    let e = y * pow2(k >> 1) * pow2(k - (k >> 1));
    if x.is_nan() {
        x
    } else if x > HI {
        f32::INFINITY
    } else if x < LO {
        0.0
    } else {
        e
    }
}

/// PyTorch's f32 `nan_to_num`: NaN → 0, ±∞ → ±f32::MAX, everything else as it is.
#[inline(always)]
fn nan_to_num(x: f32) -> f32 {
    if x.is_nan() {
        0.0
    } else {
        x.clamp(-f32::MAX, f32::MAX)
    }
}

/// The interpreter's relu: 0 for x < 0, else x (NaN and −0 kept).
#[inline(always)]
fn relu_of(x: f32) -> f32 {
    if x < 0.0 {
        0.0
    } else {
        x
    }
}

#[inline(always)]
fn max(a: f32, b: f32) -> f32 {
    // NaN in either operand propagates, as in the interpreter.
    if a.is_nan() || a >= b {
        a
    } else {
        b
    }
}

/// `f(x, y)` of a binary operation, for [`map1`]/[`map2`] (matched once per call).
macro_rules! with_binary {
    ($op:expr, $f:ident => $body:expr) => {
        match $op {
            Binary::Add => {
                let $f = |x: f32, y: f32| x + y;
                $body
            }
            Binary::Sub => {
                let $f = |x: f32, y: f32| x - y;
                $body
            }
            Binary::Mul => {
                let $f = |x: f32, y: f32| x * y;
                $body
            }
            Binary::Div => {
                let $f = |x: f32, y: f32| x / y;
                $body
            }
            Binary::Max => {
                let $f = max;
                $body
            }
        }
    };
}

/// Lane-wise `a op b` on two vectors.
#[inline(always)]
pub fn binary_vv(op: Binary, a: &[f32], b: &[f32], out: &mut [f32]) {
    with_binary!(op, f => map2(a, b, out, f))
}

/// Lane-wise `a op s` with a scalar `s`.
#[inline(always)]
pub fn binary_vs(op: Binary, a: &[f32], s: f32, out: &mut [f32]) {
    with_binary!(op, f => map1(a, out, |x| f(x, s)))
}

/// Lane-wise `s op b` with a scalar `s`.
#[inline(always)]
pub fn binary_sv(op: Binary, s: f32, b: &[f32], out: &mut [f32]) {
    with_binary!(op, f => map1(b, out, |y| f(s, y)))
}

/// Lane-wise `s0 · x0 + s1 · x1` (each product rounded, then the sum: no fused multiply-add,
/// as the separate instructions it replaces).
#[inline(always)]
pub fn axpby(s0: f32, x0: &[f32], s1: f32, x1: &[f32], out: &mut [f32]) {
    map2(x0, x1, out, |a, b| s0 * a + s1 * b)
}

/// The `TILE`-lane tiles `ti`, `ti + per_lane`, … of `x` (one per input channel).
#[inline(always)]
fn tiles<const TILE: usize>(
    x: &[f32],
    ti: usize,
    per_lane: usize,
) -> impl Iterator<Item = &[f32; TILE]> {
    x.chunks_exact(TILE)
        .skip(ti)
        .step_by(per_lane)
        .map(|c| c.try_into().expect("exact chunk"))
}

/// What a dense kernel does to its accumulators before storing them: `+ addend[r][lane]`
/// (an element value `[rows][CHUNK]`, added after the whole sum: the same rounding as a
/// separate add), then the relu.
#[derive(Clone, Copy, Debug, Default)]
pub struct Epilogue<'a> {
    /// Added to every output (same layout as the output).
    pub addend: Option<&'a [f32]>,
    /// Whether the (summed) output is relu'd.
    pub relu: bool,
}

/// Rows per register block of the dense kernel.
pub const RB: usize = 4;

/// A dense layer's weights arranged for [`dense`]: for each block of [`RB`] rows, `[cols][RB]`
/// contiguous; then each remaining row, `[cols]`.
#[derive(Clone, Debug)]
pub struct Blocked {
    rows: usize,
    cols: usize,
    blocks: Vec<f32>,
    rest: Vec<f32>,
    bias: Vec<f32>,
}

impl Blocked {
    /// Arranges row-major `[rows, cols]` weights and a bias (zeros when absent).
    pub fn new(rows: usize, cols: usize, weight: &[f32], bias: &[f32]) -> Self {
        let full = rows / RB * RB;
        let mut blocks = Vec::with_capacity(full * cols);
        for r0 in (0..full).step_by(RB) {
            for c in 0..cols {
                for b in 0..RB {
                    blocks.push(weight[(r0 + b) * cols + c]);
                }
            }
        }
        let rest = weight[full * cols..rows * cols].to_vec();
        Blocked {
            rows,
            cols,
            blocks,
            rest,
            bias: bias.to_vec(),
        }
    }
}

/// `out[r] = bias[r] + Σ_c W[r][c] · x[c]` (then the [`Epilogue`]) for the lanes `0..len`
/// rounded up to `TILE` (`x` is `[cols][CHUNK]`, `out` is `[rows][CHUNK]`). Rows are processed [`RB`] at a time
/// and lanes `TILE` at a time, so that the `RB` accumulator vectors stay in registers and
/// each load of `x` feeds `RB` multiply-adds. (Larger register tiles were measured: LLVM
/// then keeps the accumulators on the stack.)
#[inline(always)]
pub fn dense<const FMA: bool, const TILE: usize>(
    w: &Blocked,
    x: &[f32],
    out: &mut [f32],
    len: usize,
    epi: Epilogue<'_>,
) {
    let (rows, cols) = (w.rows, w.cols);
    if let Some(a) = epi.addend {
        assert!(a.len() >= rows * CHUNK);
    }
    let per_lane = CHUNK / TILE;
    let n_tiles = len.div_ceil(TILE);
    debug_assert!(n_tiles * TILE <= CHUNK && CHUNK.is_multiple_of(TILE));
    let x = &x[..cols * CHUNK];
    let full = rows / RB;
    for ti in 0..n_tiles {
        for (k, wb) in w.blocks.chunks_exact(cols * RB).enumerate().take(full) {
            let r0 = k * RB;
            let bias: &[f32; RB] = w.bias[r0..r0 + RB].try_into().expect("rows in range");
            let mut acc = [[0f32; TILE]; RB];
            for (row, &b) in acc.iter_mut().zip(bias) {
                *row = [b; TILE];
            }
            for (xv, wc) in tiles::<TILE>(x, ti, per_lane).zip(wb.chunks_exact(RB)) {
                let wc: &[f32; RB] = wc.try_into().expect("exact chunk");
                for (row, &wv) in acc.iter_mut().zip(wc) {
                    for l in 0..TILE {
                        row[l] = madd::<FMA>(wv, xv[l], row[l]);
                    }
                }
            }
            for (b, row) in acc.iter().enumerate() {
                let o = (r0 + b) * CHUNK + ti * TILE;
                out[o..o + TILE].copy_from_slice(row);
                epilogue::<TILE>(&mut out[o..o + TILE], o, epi);
            }
        }
        for (k, wr) in w.rest.chunks_exact(cols).enumerate() {
            let r = full * RB + k;
            let mut acc = [w.bias[r]; TILE];
            for (xv, &wv) in tiles::<TILE>(x, ti, per_lane).zip(wr) {
                for l in 0..TILE {
                    acc[l] = madd::<FMA>(wv, xv[l], acc[l]);
                }
            }
            let o = r * CHUNK + ti * TILE;
            out[o..o + TILE].copy_from_slice(&acc);
            epilogue::<TILE>(&mut out[o..o + TILE], o, epi);
        }
    }
}

/// Applies `epi` to one stored tile of output row values (at offset `o` of the output). Done
/// on the stored tile, in L1, so that the accumulation loop above stays as LLVM vectorizes it
/// (applied to the accumulators, it was de-vectorized and 10x slower).
#[inline(always)]
fn epilogue<const TILE: usize>(row: &mut [f32], o: usize, epi: Epilogue<'_>) {
    let row: &mut [f32; TILE] = row.try_into().expect("tile in range");
    if let Some(a) = epi.addend {
        let a: &[f32; TILE] = a[o..o + TILE].try_into().expect("tile in range");
        for l in 0..TILE {
            row[l] += a[l];
        }
    }
    if epi.relu {
        row.iter_mut().for_each(|v| *v = relu_of(*v));
    }
}

/// Partial sums of [`sum_f64`]: four 512-bit registers of f64, so that the additions form
/// independent chains rather than one chain bound by the add latency.
pub const SUMS: usize = 32;

/// Sum of `x` in f64 (of `x · x`, rounded to f32 first, when `SQUARE`: as a separate square),
/// in a fixed order: element `i` is added to partial sum `i % SUMS`, in element order; then
/// `s[l] = (p[l] + p[l + 8]) + (p[l + 16] + p[l + 24])` for `l < 8`, and
/// `((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))`. Deterministic; [`wide::sum_f64`]
/// adds the same in the same order.
#[inline(always)]
pub fn sum_f64<const SQUARE: bool>(x: &[f32]) -> f64 {
    let mut acc = [0f64; SUMS];
    for c in x.chunks(SUMS) {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += if SQUARE { v * v } else { v } as f64;
        }
    }
    sum_partials(&acc)
}

/// The fixed reduction of [`sum_f64`]'s partial sums.
#[inline(always)]
fn sum_partials(p: &[f64; SUMS]) -> f64 {
    let mut s = [0f64; 8];
    for (l, s) in s.iter_mut().enumerate() {
        *s = (p[l] + p[l + 8]) + (p[l + 16] + p[l + 24]);
    }
    ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]))
}

/// The AVX-512 dense kernel: register blocks of [`wide::RB`] rows × 32 lanes (16 of the 32
/// `zmm` registers as accumulators), written with `std::arch` intrinsics. On the Zen 5 EPYC
/// this backend is benchmarked on, 512-bit FMAs run at full width (two per cycle), twice the
/// multiply-adds per cycle of AVX2; the same multiply-adds in the same order as [`dense`],
/// so the results are bitwise those of the AVX2 + FMA build.
#[cfg(target_arch = "x86_64")]
pub mod wide {
    use super::{Epilogue, CHUNK};
    use std::arch::x86_64::*;

    /// Rows per register block.
    pub const RB: usize = 8;

    /// [`super::sum_f64`] with its [`super::SUMS`] partial sums in four `zmm` registers: the
    /// same additions in the same order.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn sum_f64<const SQUARE: bool>(x: &[f32]) -> f64 {
        let mut acc = [_mm512_setzero_pd(); 4];
        let mut chunks = x.chunks_exact(super::SUMS);
        for c in &mut chunks {
            for (g, a) in acc.iter_mut().enumerate() {
                let mut v = _mm256_loadu_ps(c.as_ptr().add(g * 8));
                if SQUARE {
                    v = _mm256_mul_ps(v, v);
                }
                *a = _mm512_add_pd(*a, _mm512_cvtps_pd(v));
            }
        }
        let mut p = [0f64; super::SUMS];
        for (g, a) in acc.iter().enumerate() {
            _mm512_storeu_pd(p.as_mut_ptr().add(g * 8), *a);
        }
        for (a, &v) in p.iter_mut().zip(chunks.remainder()) {
            *a += if SQUARE { v * v } else { v } as f64;
        }
        super::sum_partials(&p)
    }
    /// Lanes per register block (two `zmm` vectors).
    pub const LANES: usize = 32;

    /// A dense layer's weights arranged for [`dense`]: for each block of [`RB`] rows,
    /// `[cols][RB]` contiguous (the broadcasts of one input channel are adjacent); then the
    /// remaining `rows % RB` rows as one `[cols][rows % RB]` block.
    #[derive(Clone, Debug)]
    pub struct Blocked {
        rows: usize,
        cols: usize,
        blocks: Vec<f32>,
        bias: Vec<f32>,
    }

    impl Blocked {
        /// Arranges row-major `[rows, cols]` weights and a bias (zeros when absent).
        pub fn new(rows: usize, cols: usize, weight: &[f32], bias: &[f32]) -> Self {
            let mut blocks = Vec::with_capacity(rows * cols);
            for r0 in (0..rows).step_by(RB) {
                let rb = RB.min(rows - r0);
                for c in 0..cols {
                    for b in 0..rb {
                        blocks.push(weight[(r0 + b) * cols + c]);
                    }
                }
            }
            Blocked {
                rows,
                cols,
                blocks,
                bias: bias.to_vec(),
            }
        }
    }

    /// A small operand added by the kernel (see [`dense_pair`]): row `r`, lane `l` of the
    /// chunk is `*ptr.add(r * row_stride + l * lane_step)`.
    #[derive(Clone, Copy, Debug)]
    pub struct Bcast {
        /// Row 0, lane 0.
        pub ptr: *const f32,
        /// Floats between rows.
        pub row_stride: usize,
        /// 0 (one value per row) or 1 (consecutive values).
        pub lane_step: usize,
    }

    /// What a block adds before the relu.
    #[derive(Clone, Copy)]
    enum Add {
        None,
        /// `[R][CHUNK]` at the block's first lane.
        Mat(*const f32),
        /// `a + b`, offset to the block's first row and lane.
        Pair(Bcast, Bcast),
    }

    /// Row `r`'s 32 lanes of `b` (offset to the block's first row and lane).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn bcast_lanes(b: Bcast, r: usize) -> (__m512, __m512) {
        let p = b.ptr.add(r * b.row_stride);
        if b.lane_step == 0 {
            let v = _mm512_set1_ps(*p);
            (v, v)
        } else {
            (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)))
        }
    }

    /// One register block: `R` rows (`wb` is `[cols][R]`) × 32 lanes from `x` and `out`
    /// (already offset to the block's first lane, strided by [`CHUNK`]).
    ///
    /// # Safety
    /// AVX-512F; `x` readable at `c * CHUNK + 0..32` for `c < cols`, `out` writable at
    /// `r * CHUNK + 0..32` for `r < R` (and `addend` readable there), `wb.len() >= cols * R`,
    /// `bias.len() >= R`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn block<const R: usize>(
        wb: &[f32],
        bias: &[f32],
        cols: usize,
        x: *const f32,
        out: *mut f32,
        addend: Add,
        relu: bool,
    ) {
        let mut lo = [_mm512_setzero_ps(); R];
        let mut hi = [_mm512_setzero_ps(); R];
        for r in 0..R {
            lo[r] = _mm512_set1_ps(bias[r]);
            hi[r] = lo[r];
        }
        let mut w = wb.as_ptr();
        for c in 0..cols {
            let x0 = _mm512_loadu_ps(x.add(c * CHUNK));
            let x1 = _mm512_loadu_ps(x.add(c * CHUNK + 16));
            for r in 0..R {
                let wv = _mm512_set1_ps(*w.add(r));
                lo[r] = _mm512_fmadd_ps(wv, x0, lo[r]);
                hi[r] = _mm512_fmadd_ps(wv, x1, hi[r]);
            }
            w = w.add(R);
        }
        match addend {
            Add::None => {}
            Add::Mat(a) => {
                for r in 0..R {
                    lo[r] = _mm512_add_ps(lo[r], _mm512_loadu_ps(a.add(r * CHUNK)));
                    hi[r] = _mm512_add_ps(hi[r], _mm512_loadu_ps(a.add(r * CHUNK + 16)));
                }
            }
            Add::Pair(a, b) => {
                // The addend `a + b` rounded first, then added: as the separate add.
                for r in 0..R {
                    let (a0, a1) = bcast_lanes(a, r);
                    let (b0, b1) = bcast_lanes(b, r);
                    lo[r] = _mm512_add_ps(lo[r], _mm512_add_ps(a0, b0));
                    hi[r] = _mm512_add_ps(hi[r], _mm512_add_ps(a1, b1));
                }
            }
        }
        if relu {
            // max(0, x) is x for NaN and −0, as the interpreter's relu.
            let zero = _mm512_setzero_ps();
            for r in 0..R {
                lo[r] = _mm512_max_ps(zero, lo[r]);
                hi[r] = _mm512_max_ps(zero, hi[r]);
            }
        }
        for r in 0..R {
            _mm512_storeu_ps(out.add(r * CHUNK), lo[r]);
            _mm512_storeu_ps(out.add(r * CHUNK + 16), hi[r]);
        }
    }

    /// `out[r] = bias[r] + Σ_c W[r][c] · x[c]` (then the [`Epilogue`]) for the lanes `0..len`
    /// rounded up to 32
    /// (`x` is `[cols][CHUNK]`, `out` is `[rows][CHUNK]`): as [`super::dense`], fused
    /// multiply-adds in input-channel order from the bias.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dense(w: &Blocked, x: &[f32], out: &mut [f32], len: usize, epi: Epilogue<'_>) {
        dense_impl(w, x, out, len, epi, None)
    }

    /// As [`dense`] with the addend `a + b` (each [`Bcast`] over `w.rows` rows) added in the
    /// epilogue instead of read from memory: `(acc + (a + b))`, the roundings of a separate
    /// add of `a` and `b` then the epilogue's add.
    ///
    /// # Safety
    /// The CPU must support AVX-512F; `a` and `b` readable at every row `< w.rows` and lane
    /// `< len.next_multiple_of(32)` (`len <= CHUNK`).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dense_pair(
        w: &Blocked,
        x: &[f32],
        out: &mut [f32],
        len: usize,
        relu: bool,
        a: Bcast,
        b: Bcast,
    ) {
        let epi = Epilogue { addend: None, relu };
        dense_impl(w, x, out, len, epi, Some((a, b)))
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn dense_impl(
        w: &Blocked,
        x: &[f32],
        out: &mut [f32],
        len: usize,
        epi: Epilogue<'_>,
        pair: Option<(Bcast, Bcast)>,
    ) {
        let (rows, cols) = (w.rows, w.cols);
        let n_tiles = len.div_ceil(LANES);
        assert!(n_tiles * LANES <= CHUNK && x.len() >= cols * CHUNK && out.len() >= rows * CHUNK);
        assert!(epi.addend.is_none_or(|a| a.len() >= rows * CHUNK));
        let relu = epi.relu;
        let (xp, op) = (x.as_ptr(), out.as_mut_ptr());
        for ti in 0..n_tiles {
            let lane = ti * LANES;
            for r0 in (0..rows).step_by(RB) {
                let rb = RB.min(rows - r0);
                let wb = &w.blocks[r0 * cols..(r0 + rb) * cols];
                let bias = &w.bias[r0..r0 + rb];
                let (xs, os) = (xp.add(lane), op.add(r0 * CHUNK + lane));
                let at = |b: Bcast| Bcast {
                    ptr: b.ptr.add(r0 * b.row_stride + lane * b.lane_step),
                    ..b
                };
                let ad = match (epi.addend, pair) {
                    (Some(a), _) => Add::Mat(a.as_ptr().add(r0 * CHUNK + lane)),
                    (None, Some((a, b))) => Add::Pair(at(a), at(b)),
                    (None, None) => Add::None,
                };
                // SAFETY (all arms): the assertion above bounds every lane and row read.
                match rb {
                    8 => block::<8>(wb, bias, cols, xs, os, ad, relu),
                    7 => block::<7>(wb, bias, cols, xs, os, ad, relu),
                    6 => block::<6>(wb, bias, cols, xs, os, ad, relu),
                    5 => block::<5>(wb, bias, cols, xs, os, ad, relu),
                    4 => block::<4>(wb, bias, cols, xs, os, ad, relu),
                    3 => block::<3>(wb, bias, cols, xs, os, ad, relu),
                    2 => block::<2>(wb, bias, cols, xs, os, ad, relu),
                    _ => block::<1>(wb, bias, cols, xs, os, ad, relu),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in representable f32 values.
    fn ulps(a: f32, b: f32) -> u32 {
        let key = |x: f32| {
            let i = x.to_bits() as i32;
            if i < 0 {
                i32::MIN - i
            } else {
                i
            }
        };
        key(a).abs_diff(key(b))
    }

    #[test]
    fn exp_is_within_two_ulp_over_the_whole_range() {
        let mut worst = 0;
        // Every 97th f32 in [−87.34, 88.72], and the ends.
        let (lo, hi) = ((-87.336_55f32).to_bits(), 88.722_84f32.to_bits());
        let negs = (0x8000_0000u32..=lo).step_by(97).map(f32::from_bits);
        let poss = (0u32..=hi).step_by(97).map(f32::from_bits);
        for x in negs
            .chain(poss)
            .chain([-87.336_55, 88.722_84, 0.0, -0.0, 1.0, -1.0])
        {
            let want = (x as f64).exp() as f32;
            let got = exp(x);
            let u = ulps(got, want);
            assert!(u <= 2, "exp({x:e}) = {got:e}, want {want:e} ({u} ulp)");
            worst = worst.max(u);
        }
        assert!(worst >= 1, "the check compared nothing");
    }

    #[test]
    fn exp_handles_the_ends_and_nan() {
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(0.0), 1.0);
        // Vectorized as the chunk loop runs it: the same values.
        let x: Vec<f32> = (0..CHUNK).map(|i| i as f32 * 0.37 - 47.0).collect();
        let mut out = vec![0f32; CHUNK];
        unary::<true>(Unary::Exp, &x, &mut out);
        for (o, &v) in out.iter().zip(&x) {
            assert_eq!(o.to_bits(), exp(v).to_bits());
        }
    }

    /// The documented order, written out: element `i` into partial sum `i % 32`, then the
    /// fixed tree.
    fn reference(x: &[f32], square: bool) -> f64 {
        let mut p = [0f64; SUMS];
        for (i, &v) in x.iter().enumerate() {
            p[i % SUMS] += if square { v * v } else { v } as f64;
        }
        let s: Vec<f64> = (0..8)
            .map(|l| (p[l] + p[l + 8]) + (p[l + 16] + p[l + 24]))
            .collect();
        ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]))
    }

    #[test]
    fn sums_add_in_the_documented_order_on_every_path() {
        // Values of very different magnitudes, so that another order would round differently.
        let x: Vec<f32> = (0..CHUNK)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 10f32.powi((i % 9) as i32 - 4))
            .collect();
        for len in [0, 1, 7, 31, 32, 33, 100, CHUNK] {
            let x = &x[..len];
            for square in [false, true] {
                let want = reference(x, square);
                let got = if square {
                    sum_f64::<true>(x)
                } else {
                    sum_f64::<false>(x)
                };
                assert_eq!(got.to_bits(), want.to_bits(), "len {len}, square {square}");
                #[cfg(target_arch = "x86_64")]
                if super::super::Isa::Avx512.available() {
                    // SAFETY: the CPU reported AVX-512F.
                    let wide = unsafe {
                        if square {
                            wide::sum_f64::<true>(x)
                        } else {
                            wide::sum_f64::<false>(x)
                        }
                    };
                    assert_eq!(wide.to_bits(), want.to_bits(), "AVX-512, len {len}");
                }
            }
        }
    }
}
