//! The native CPU backend's benchmark (issue #16), one command:
//!
//! ```sh
//! cargo bench --bench cpu                # or bench/cpu.sh: this, then the PyTorch reference
//! ```
//!
//! Prints a Markdown report: this machine's fused multiply-add peak per instruction set, the
//! step's three dense layers alone (% of that peak), the whole step at 1024x512 and 4096x1024
//! on every instruction set path, 1- vs all-thread scaling, and GPT-2-small's tensors through
//! [`MuloOptimizer`]. Every figure is a median over repeats; the 1-minute load average is
//! printed beside each, since the machine may be shared. Environment: `MULO_BENCH_WEIGHTS`
//! (default `tests/fixtures/golden/weights`), `MULO_BENCH_QUICK=1` (fewer repeats, no GPT-2).

use mulo::backend::cpu::{bench, default_threads, CpuProgram, CpuStepper, Isa};
use mulo::backend::{CpuFactory, Hyper, PerTensor, TensorStepper};
use mulo::lopt::LearnedOptimizer;
use mulo::optimizer::{MuloOptimizer, OptimizerOptions, ParamSpec};
use mulo::shape::Shape;
use std::sync::Arc;
use std::time::Instant;

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    xs[xs.len() / 2]
}

fn data(n: usize, seed: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7919 + seed * 104729) % 1000) as f32 - 500.0) * scale)
        .collect()
}

/// Median ns per element of `steps` steps (after 1 warm-up) of `shape`.
fn step_ns(prog: &Arc<CpuProgram>, isa: Isa, threads: usize, steps: usize) -> f64 {
    let mut stepper = CpuStepper::from_program(prog.clone(), 0, threads).with_isa(isa);
    let n = prog.ir().layout.numel();
    let (mut p, g) = (data(n, 1, 1e-3), data(n, 2, 1e-4));
    let hyper = Hyper {
        lr: 1e-3,
        weight_decay: 0.0,
    };
    stepper.step(&mut p, &g, hyper).unwrap();
    let times = (0..steps)
        .map(|_| {
            let t = Instant::now();
            stepper.step(&mut p, &g, hyper).unwrap();
            t.elapsed().as_secs_f64() * 1e9 / n as f64
        })
        .collect();
    median(times)
}

fn main() {
    let quick = std::env::var("MULO_BENCH_QUICK").is_ok_and(|v| v == "1");
    let weights = std::env::var("MULO_BENCH_WEIGHTS")
        .unwrap_or_else(|_| "tests/fixtures/golden/weights".to_string());
    let lopt = LearnedOptimizer::load(&weights).expect("weights (MULO_BENCH_WEIGHTS)");
    let threads = default_threads();
    let reps = if quick { 3 } else { 7 };
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    println!("# mulo CPU benchmark (`cargo bench --bench cpu`)\n");
    println!(
        "CPU `{model}`, {threads} threads (default_threads), best ISA {:?}, weights `{weights}`, load at start {}\n",
        Isa::detect(),
        load()
    );

    // 1. FMA peak.
    println!("## FMA peak (independent 512/256-bit FMA chains)\n");
    println!("| ISA | threads | G multiply-adds/s (median of {reps}) | load |");
    println!("|---|---|---|---|");
    let mut peak = std::collections::HashMap::new();
    for isa in [Isa::Avx512, Isa::Avx2] {
        if !isa.available() {
            continue;
        }
        for t in [1, threads] {
            let g = median(
                (0..reps)
                    .map(|_| bench::fma_peak(isa, t, 20_000_000).unwrap() / 1e9)
                    .collect(),
            );
            peak.insert((isa, t), g);
            println!("| {} | {t} | {g:.1} | {} |", isa.name(), load());
        }
    }
    let machine_peak = |t: usize| {
        peak.iter()
            .filter(|((_, pt), _)| *pt == t)
            .map(|(_, &g)| g)
            .fold(0f64, f64::max)
    };

    // 2. The dense layers alone.
    let ir = Arc::new(mulo::compile_step(&Shape::parse("1024x512").unwrap(), &lopt).unwrap());
    let layers: Vec<String> = bench::elem_dense(&ir)
        .into_iter()
        .map(|i| format!("{}x{}", ir.matrices[i].rows, ir.matrices[i].cols))
        .collect();
    println!(
        "\n## Element-domain dense layers alone ({}, rows x cols), chunks of 256 lanes in L1\n",
        layers.join(", ")
    );
    println!("| ISA | threads | G multiply-adds/s | % of machine peak | load |");
    println!("|---|---|---|---|---|");
    for isa in Isa::ALL {
        if !isa.available() {
            continue;
        }
        for t in [1, threads] {
            let g = median(
                (0..reps)
                    .map(|_| bench::dense_layers(&ir, isa, t, 40_000) / 1e9)
                    .collect(),
            );
            println!(
                "| {} | {t} | {g:.1} | {:.0}% | {} |",
                isa.name(),
                100.0 * g / machine_peak(t),
                load()
            );
        }
    }

    // 2b. The candidate that was not chosen: a well-kept GEMM crate on the same layers.
    println!(
        "\nThe same layers through the GEMM crate `matrixmultiply` (`sgemm`, its own AVX/FMA \
         kernels and packing, one call per layer and chunk, the bias as C's initial value):\n"
    );
    println!("| candidate | threads | G multiply-adds/s | % of machine peak | load |");
    println!("|---|---|---|---|---|");
    let g = median(
        (0..reps)
            .map(|_| gemm_crate_layers(&ir, 4_000) / 1e9)
            .collect(),
    );
    println!(
        "| matrixmultiply sgemm | 1 | {g:.1} | {:.0}% | {} |",
        100.0 * g / machine_peak(1),
        load()
    );

    // 3. Whole steps.
    println!("\n## Whole step, ns per element (median)\n");
    println!("| shape | ISA | threads | ns/element | load |");
    println!("|---|---|---|---|---|");
    for (shape, steps) in [
        ("1024x512", if quick { 5 } else { 15 }),
        ("4096x1024", if quick { 3 } else { 7 }),
    ] {
        let ir = Arc::new(mulo::compile_step(&Shape::parse(shape).unwrap(), &lopt).unwrap());
        let prog = Arc::new(CpuProgram::new(ir));
        for isa in Isa::ALL {
            if !isa.available() {
                continue;
            }
            let mut counts = vec![threads];
            if isa == Isa::detect() && threads > 1 {
                counts.insert(0, 1);
            }
            let mut one = 0.0;
            for t in counts {
                let ns = step_ns(&prog, isa, t, steps);
                let scaling = if t == 1 {
                    one = ns;
                    String::new()
                } else if one > 0.0 {
                    format!(
                        " (scaling efficiency {:.0}%)",
                        100.0 * one / (ns * t as f64)
                    )
                } else {
                    String::new()
                };
                println!(
                    "| {shape} | {} | {t} | {ns:.1}{scaling} | {} |",
                    isa.name(),
                    load()
                );
            }
        }
    }

    // 4. A whole model.
    if quick {
        return;
    }
    let specs: Vec<ParamSpec> = mulo::bench::gpt2_small()
        .into_iter()
        .map(|(name, shape)| ParamSpec::new(name, &shape).unwrap())
        .collect();
    let numel: usize = specs.iter().map(|s| s.shape.numel()).sum();
    println!(
        "\n## GPT-2 small through MuloOptimizer ({} tensors, {numel} elements, backend cpu)\n",
        specs.len()
    );
    println!(
        "Each model step is timed right after one step of a single 4096x1024 tensor (same ISA and \
         threads), so that the ratio compares steps taken under the same load.\n"
    );
    println!("| guard | model ns/element (median of 3 steps) | 4096x1024 ns/element (interleaved) | ratio | load |");
    println!("|---|---|---|---|---|");
    let big_ir = Arc::new(mulo::compile_step(&Shape::parse("4096x1024").unwrap(), &lopt).unwrap());
    let mut big = CpuStepper::new(big_ir, 0);
    let big_n = 4096 * 1024;
    let (mut big_p, big_g) = (data(big_n, 1, 1e-3), data(big_n, 2, 1e-4));
    let mut big_step = || {
        let hyper = Hyper {
            lr: 1e-3,
            weight_decay: 0.0,
        };
        let t = Instant::now();
        big.step(&mut big_p, &big_g, hyper).unwrap();
        t.elapsed().as_secs_f64() * 1e9 / big_n as f64
    };
    let shapes: Vec<Vec<usize>> = specs.iter().map(|s| s.shape.dims().to_vec()).collect();
    let mut params: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| data(s.iter().product(), i, 1e-4))
        .collect();
    let grads: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| data(s.iter().product(), i + 1000, 1e-5))
        .collect();
    for guard in [false, true] {
        let options = OptimizerOptions {
            guard,
            backend: Arc::new(PerTensor(CpuFactory)),
            ..Default::default()
        };
        let mut opt = MuloOptimizer::new(&lopt, specs.clone(), options).unwrap();
        let gs: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
        let mut step = |params: &mut Vec<Vec<f32>>| {
            let mut ps: Vec<&mut [f32]> = params.iter_mut().map(|p| p.as_mut_slice()).collect();
            let t = Instant::now();
            opt.step(&mut ps, &gs, 1e-3, 0.0).unwrap();
            t.elapsed().as_secs_f64() * 1e9 / numel as f64
        };
        step(&mut params);
        big_step();
        let (mut model_ns, mut one_ns) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            one_ns.push(big_step());
            model_ns.push(step(&mut params));
        }
        let (ns, one) = (median(model_ns), median(one_ns));
        println!(
            "| {} | {ns:.1} | {one:.1} | {:.2}x | {} |",
            if guard { "on (default)" } else { "off" },
            ns / one,
            load()
        );
    }
}

/// Multiply-adds per second of the step's element-domain dense layers through
/// `matrixmultiply::sgemm` on one thread: `out[rows × 256] = W[rows × cols] · x[cols × 256] + b`
/// per layer and chunk, the layout the chunk executor uses (a value's 256 lanes contiguous),
/// every layer reading the same bounded input as `bench::dense_layers` does.
fn gemm_crate_layers(ir: &mulo::ir::StepIr, chunks: usize) -> f64 {
    const LANES: usize = 256;
    let mats: Vec<_> = bench::elem_dense(ir)
        .into_iter()
        .map(|i| &ir.matrices[i])
        .collect();
    let width = mats.iter().map(|m| m.rows.max(m.cols)).max().unwrap_or(1);
    let x: Vec<f32> = (0..width * LANES)
        .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
        .collect();
    let mut out = vec![0f32; width * LANES];
    let biases: Vec<Vec<f32>> = mats
        .iter()
        .map(|m| {
            let b = m.bias.clone().unwrap_or_else(|| vec![0.0; m.rows]);
            b.iter()
                .flat_map(|&v| std::iter::repeat_n(v, LANES))
                .collect()
        })
        .collect();
    let start = Instant::now();
    for _ in 0..chunks {
        for (m, bias) in mats.iter().zip(&biases) {
            out[..m.rows * LANES].copy_from_slice(bias);
            // SAFETY: W is rows×cols row-major (strides cols, 1), x is cols×256 and out
            // rows×256 (strides 256, 1), all in bounds of their buffers.
            unsafe {
                matrixmultiply::sgemm(
                    m.rows,
                    m.cols,
                    LANES,
                    1.0,
                    m.weight.as_ptr(),
                    m.cols as isize,
                    1,
                    x.as_ptr(),
                    LANES as isize,
                    1,
                    1.0,
                    out.as_mut_ptr(),
                    LANES as isize,
                    1,
                );
            }
            std::hint::black_box(&mut out);
        }
    }
    let madds: usize = mats.iter().map(|m| m.rows * m.cols).sum::<usize>() * LANES * chunks;
    madds as f64 / start.elapsed().as_secs_f64()
}
