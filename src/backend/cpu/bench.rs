//! Microbenchmarks of the native CPU backend's compute kernels (run by `cargo bench --bench
//! cpu`): this machine's fused multiply-add peak per instruction set, and the step's dense
//! layers alone, through the same kernels and chunk layout as the chunk executor.

use super::{kernels, Isa, CHUNK};
use crate::ir::{Op, StepIr};
use crate::shape::Domain;
use std::time::Instant;

/// Multiply-adds per second (whole machine, `threads` threads) of independent fused
/// multiply-add chains at the widest vector width of `isa`: the machine's compute peak for
/// that instruction set. `None` for [`Isa::Portable`] (no FMA) or an instruction set this
/// CPU lacks.
pub fn fma_peak(isa: Isa, threads: usize, iters: u64) -> Option<f64> {
    if !isa.available() {
        return None;
    }
    let run = move || -> u64 {
        match isa {
            // SAFETY: `isa.available()` checked the CPU's support above.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { peak::avx512(iters) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { peak::avx2(iters) },
            _ => 0,
        }
    };
    let threads = threads.max(1);
    let start = Instant::now();
    let madds: u64 = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads).map(|_| s.spawn(run)).collect();
        hs.into_iter().map(|h| h.join().expect("peak thread")).sum()
    });
    (madds > 0).then(|| madds as f64 / start.elapsed().as_secs_f64())
}

#[cfg(target_arch = "x86_64")]
mod peak {
    use std::arch::x86_64::*;

    /// Independent accumulator chains: enough to cover the FMA latency on both pipes.
    const CHAINS: usize = 12;

    /// # Safety
    /// AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn avx512(iters: u64) -> u64 {
        let mut acc = [_mm512_set1_ps(1.0); CHAINS];
        let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, a, b);
            }
        }
        let mut s = _mm512_setzero_ps();
        for x in acc {
            s = _mm512_add_ps(s, x);
        }
        std::hint::black_box(s);
        iters * (CHAINS * 16) as u64
    }

    /// # Safety
    /// AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn avx2(iters: u64) -> u64 {
        let mut acc = [_mm256_set1_ps(1.0); CHAINS];
        let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(*x, a, b);
            }
        }
        let mut s = _mm256_setzero_ps();
        for x in acc {
            s = _mm256_add_ps(s, x);
        }
        std::hint::black_box(s);
        iters * (CHAINS * 8) as u64
    }
}

/// The element-domain dense layers of `ir` (the ones the chunk loop runs; the folded parts of
/// the first layer on smaller domains are left out), each reading the same chunk-sized input, over `chunks` chunks per thread on `threads`
/// threads, with `isa`'s kernel: returns multiply-adds per second for the whole machine.
/// Every thread works in its own chunk-sized scratch, as the executor does, so the data stays
/// in L1 and this measures the kernels alone.
pub fn dense_layers(ir: &StepIr, isa: Isa, threads: usize, chunks: usize) -> f64 {
    let isa = if isa.available() { isa } else { Isa::Portable };
    let layers: Vec<_> = elem_dense(ir)
        .into_iter()
        .map(|i| {
            let m = &ir.matrices[i];
            let bias = m.bias.clone().unwrap_or_else(|| vec![0.0; m.rows]);
            Layer {
                rows: m.rows,
                cols: m.cols,
                blocked: kernels::Blocked::new(m.rows, m.cols, &m.weight, &bias),
                #[cfg(target_arch = "x86_64")]
                wide: kernels::wide::Blocked::new(m.rows, m.cols, &m.weight, &bias),
            }
        })
        .collect();
    let madds_per_lane: usize = layers.iter().map(|l| l.rows * l.cols).sum();
    let width = layers.iter().map(|l| l.rows.max(l.cols)).max().unwrap_or(1);
    let threads = threads.max(1);
    let layers = &layers;
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                let a: Vec<f32> = (0..width * CHUNK)
                    .map(|i| ((i * 7919 + t) % 1000) as f32 * 1e-3 - 0.5)
                    .collect();
                let mut b = vec![0f32; width * CHUNK];
                for _ in 0..chunks {
                    for l in layers {
                        // Every layer reads the same bounded input (no overflow, no
                        // subnormals), as fast as reading the previous layer's output from L1.
                        run_layer(isa, l, &a, &mut b);
                        std::hint::black_box(&mut b);
                    }
                }
            });
        }
    });
    let madds = (madds_per_lane * CHUNK * chunks * threads) as f64;
    madds / start.elapsed().as_secs_f64()
}

/// The matrices of the element-domain dense nodes of `ir`, in node order.
pub fn elem_dense(ir: &StepIr) -> Vec<usize> {
    ir.nodes
        .iter()
        .filter_map(|n| match n.op {
            Op::Dense { matrix, .. } if n.domain == Domain::Elem => Some(matrix.0 as usize),
            _ => None,
        })
        .collect()
}

/// One dense layer in both kernel arrangements.
struct Layer {
    rows: usize,
    cols: usize,
    blocked: kernels::Blocked,
    #[cfg(target_arch = "x86_64")]
    wide: kernels::wide::Blocked,
}

fn run_layer(isa: Isa, l: &Layer, x: &[f32], out: &mut [f32]) {
    match isa {
        // SAFETY: `dense_layers` only keeps an instruction set the CPU supports.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { dense_avx512(l, x, out) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { dense_avx2(l, x, out) },
        _ => kernels::dense::<false, 8>(&l.blocked, x, out, CHUNK, Default::default()),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn dense_avx512(l: &Layer, x: &[f32], out: &mut [f32]) {
    kernels::wide::dense(&l.wide, x, out, CHUNK, Default::default())
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dense_avx2(l: &Layer, x: &[f32], out: &mut [f32]) {
    kernels::dense::<true, 16>(&l.blocked, x, out, CHUNK, Default::default())
}
