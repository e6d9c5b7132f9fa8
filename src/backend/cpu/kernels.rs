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

/// Lane-wise one-operand operation (the interpreter's definition: NaN-propagating relu).
#[inline(always)]
pub fn unary(op: Unary, a: &[f32], out: &mut [f32]) {
    let n = out.len();
    let a = &a[..n];
    match op {
        Unary::Neg => out.iter_mut().zip(a).for_each(|(o, &x)| *o = -x),
        Unary::Square => out.iter_mut().zip(a).for_each(|(o, &x)| *o = x * x),
        Unary::Rsqrt => out
            .iter_mut()
            .zip(a)
            .for_each(|(o, &x)| *o = 1.0 / x.sqrt()),
        Unary::Exp => out.iter_mut().zip(a).for_each(|(o, &x)| *o = x.exp()),
        Unary::Tanh => out.iter_mut().zip(a).for_each(|(o, &x)| *o = x.tanh()),
        Unary::Relu => out
            .iter_mut()
            .zip(a)
            .for_each(|(o, &x)| *o = if x < 0.0 { 0.0 } else { x }),
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

macro_rules! binary_loop {
    ($op:expr, $out:ident, $a:expr, $b:expr) => {
        match $op {
            Binary::Add => $out
                .iter_mut()
                .enumerate()
                .for_each(|(i, o)| *o = $a(i) + $b(i)),
            Binary::Sub => $out
                .iter_mut()
                .enumerate()
                .for_each(|(i, o)| *o = $a(i) - $b(i)),
            Binary::Mul => $out
                .iter_mut()
                .enumerate()
                .for_each(|(i, o)| *o = $a(i) * $b(i)),
            Binary::Div => $out
                .iter_mut()
                .enumerate()
                .for_each(|(i, o)| *o = $a(i) / $b(i)),
            Binary::Max => $out
                .iter_mut()
                .enumerate()
                .for_each(|(i, o)| *o = max($a(i), $b(i))),
        }
    };
}

/// Lane-wise `a op b` on two vectors.
#[inline(always)]
pub fn binary_vv(op: Binary, a: &[f32], b: &[f32], out: &mut [f32]) {
    let n = out.len();
    let (a, b) = (&a[..n], &b[..n]);
    binary_loop!(op, out, |i: usize| a[i], |i: usize| b[i]);
}

/// Lane-wise `a op s` with a scalar `s`.
#[inline(always)]
pub fn binary_vs(op: Binary, a: &[f32], s: f32, out: &mut [f32]) {
    let n = out.len();
    let a = &a[..n];
    binary_loop!(op, out, |i: usize| a[i], |_| s);
}

/// Lane-wise `s op b` with a scalar `s`.
#[inline(always)]
pub fn binary_sv(op: Binary, s: f32, b: &[f32], out: &mut [f32]) {
    let n = out.len();
    let b = &b[..n];
    binary_loop!(op, out, |_| s, |i: usize| b[i]);
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

/// `out[r] = bias[r] + Σ_c W[r][c] · x[c]` for the lanes `0..len` rounded up to `TILE`
/// (`x` is `[cols][CHUNK]`, `out` is `[rows][CHUNK]`). Rows are processed [`RB`] at a time
/// and lanes `TILE` at a time, so that the `RB` accumulator vectors stay in registers and
/// each load of `x` feeds `RB` multiply-adds. (Larger register tiles were measured: LLVM
/// then keeps the accumulators on the stack.)
#[inline(always)]
pub fn dense<const FMA: bool, const TILE: usize>(
    w: &Blocked,
    x: &[f32],
    out: &mut [f32],
    len: usize,
) {
    let (rows, cols) = (w.rows, w.cols);
    let per_lane = CHUNK / TILE;
    let n_tiles = len.div_ceil(TILE);
    debug_assert!(n_tiles * TILE <= CHUNK && CHUNK % TILE == 0);
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
        }
    }
}

/// Sum of `x` in f64, in a fixed order (8 interleaved partial sums, then those in order):
/// deterministic, and vectorizable.
#[inline(always)]
pub fn sum_f64(x: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for l in 0..8 {
            acc[l] += c[l] as f64;
        }
    }
    for (l, &v) in chunks.remainder().iter().enumerate() {
        acc[l] += v as f64;
    }
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
}
