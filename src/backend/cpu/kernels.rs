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

/// `out[r] = bias[r] + Σ_c W[r][c] · x[c]` for the lanes `0..len` rounded up to `TILE`
/// (`x` is `[cols][CHUNK]`, `out` is `[rows][CHUNK]`, `wt` is the weight transposed,
/// `[cols][rows]`). Rows are processed `RB` at a time and lanes `TILE` at a time, so that the
/// `RB × TILE` accumulators stay in registers and each load of `x` feeds `RB` multiply-adds.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn dense<const FMA: bool, const RB: usize, const TILE: usize>(
    wt: &[f32],
    bias: &[f32],
    rows: usize,
    cols: usize,
    x: &[f32],
    out: &mut [f32],
    len: usize,
) {
    let lanes = len.div_ceil(TILE) * TILE;
    debug_assert!(lanes <= CHUNK && CHUNK % TILE == 0);
    let full = rows / RB * RB;
    let x = &x[..cols * CHUNK];
    let wt = &wt[..cols * rows];
    for t in (0..lanes).step_by(TILE) {
        let mut r0 = 0;
        while r0 < full {
            dense_block::<FMA, RB, TILE>(wt, bias, r0, rows, cols, x, out, t);
            r0 += RB;
        }
        while r0 < rows {
            dense_block::<FMA, 1, TILE>(wt, bias, r0, rows, cols, x, out, t);
            r0 += 1;
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn dense_block<const FMA: bool, const B: usize, const TILE: usize>(
    wt: &[f32],
    bias: &[f32],
    r0: usize,
    rows: usize,
    cols: usize,
    x: &[f32],
    out: &mut [f32],
    t: usize,
) {
    let mut acc = [[0f32; TILE]; B];
    let b0: &[f32; B] = bias[r0..r0 + B].try_into().expect("rows in range");
    for (b, row) in acc.iter_mut().enumerate() {
        *row = [b0[b]; TILE];
    }
    for c in 0..cols {
        let xv: &[f32; TILE] = x[c * CHUNK + t..c * CHUNK + t + TILE]
            .try_into()
            .expect("tile in range");
        let wv: &[f32; B] = wt[c * rows + r0..c * rows + r0 + B]
            .try_into()
            .expect("rows in range");
        for (b, row) in acc.iter_mut().enumerate() {
            let w = wv[b];
            for l in 0..TILE {
                row[l] = madd::<FMA>(w, xv[l], row[l]);
            }
        }
    }
    for (b, row) in acc.iter().enumerate() {
        out[(r0 + b) * CHUNK + t..(r0 + b) * CHUNK + t + TILE].copy_from_slice(row);
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
