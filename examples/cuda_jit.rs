//! The training of `examples/train_mlp.rs` (MLP 2 → 32 → 3 on three Gaussian blobs) with
//! parameters and gradients on the GPU: nothing but the loss goes back to the host.
//!
//! - μLO is JIT-compiled for the model's four shapes into one packed program (NVRTC, cached
//!   on disk) by [`PackedCuda`]; the parameters live in its `param` arena.
//! - The forward and backward passes are two small CUDA kernels of this file, also compiled
//!   by NVRTC at start-up, that read the `param` arena and write the `grad` arena.
//! - Each optimizer step is [`PackedBackend::step_in_place`]: a fixed number of launches
//!   for the whole model (7 here), whatever the number of tensors.
//!
//! ```sh
//! cargo run --release --example cuda_jit                 # bundled demo meta-network
//! cargo run --release --example cuda_jit -- --weights btherien/mulo --lr 1
//! ```
//!
//! Without a GPU it compiles both programs (which needs only libnvrtc: `source
//! scripts/env.sh`), says why it cannot train, and exits with status 0. With a GPU it exits
//! with status 1 unless the loss falls to half its initial value.
//!
//! This loop calls the packed backend directly, so the optimizer-level policies of
//! [`MuloOptimizer`](mulo::optimizer::MuloOptimizer) (NaN/Inf skipping, clipping, μP) are not
//! applied here: use `MuloOptimizer` with `PackedCuda` as its backend for those (host
//! gradients), or check gradients on the device before stepping.

#[allow(dead_code)]
#[path = "train_mlp.rs"]
mod train_mlp;

use cudarc::driver::{LaunchConfig, PushKernelArg};
use mulo::backend::cuda::loader::{check_block_threads, check_launch_resources};
use mulo::backend::cuda::nvrtc;
use mulo::backend::cuda::packed::PackedModel;
use mulo::backend::cuda::packed_runtime::{
    CudaExecutor, PackedBackend, PackedCuda, PackedExecutor,
};
use mulo::backend::Hyper;
use mulo::backend::ModelBackend;
use mulo::ir::Buffer;
use mulo::lopt::LearnedOptimizer;
use std::time::Instant;
use train_mlp::{blobs, parse_args, Mlp, CLASSES, HIDDEN, INPUTS};

/// Forward and backward of the MLP on the GPU. `p` and `g` are mulo's parameter and gradient
/// arenas; `w1`… are the tensors' offsets in them.
const KERNELS: &str = r#"
#define INPUTS {inputs}
#define HIDDEN {hidden}
#define CLASSES {classes}
// Threads per block of every launch (`THREADS`): ptxas keeps the registers within what a block
// of that many threads can have.
#define THREADS {threads}

// Logits of sample x; returns the hidden activations in h.
__device__ void mlp_forward(const float* p, long long w1, long long b1, long long w2, long long b2,
                            const float* x, float* h, float* logits)
{
    for (int j = 0; j < HIDDEN; ++j) {
        float z = p[b1 + j];
        for (int i = 0; i < INPUTS; ++i) z += p[w1 + j * INPUTS + i] * x[i];
        h[j] = z > 0.0f ? z : 0.0f;
    }
    for (int c = 0; c < CLASSES; ++c) {
        float z = p[b2 + c];
        for (int j = 0; j < HIDDEN; ++j) z += p[w2 + c * HIDDEN + j] * h[j];
        logits[c] = z;
    }
}

// One thread per parameter element: the gradient of the batch's mean cross-entropy with
// respect to it (every thread replays the batch's forward pass: the model is tiny, and each
// gradient is a fixed-order sum, so the result is deterministic).
extern "C" __global__ void __launch_bounds__(THREADS) mlp_grads(const float* __restrict__ p, float* __restrict__ g,
                                     const float* __restrict__ xs, const int* __restrict__ ys,
                                     int first, int batch,
                                     long long w1, long long b1, long long w2, long long b2)
{
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    const int n1 = HIDDEN * INPUTS, n2 = n1 + HIDDEN, n3 = n2 + CLASSES * HIDDEN, n4 = n3 + CLASSES;
    if (k >= n4) return;
    float acc = 0.0f;
    for (int s = first; s < first + batch; ++s) {
        const float* x = xs + s * INPUTS;
        float h[HIDDEN], logits[CLASSES], dl[CLASSES];
        mlp_forward(p, w1, b1, w2, b2, x, h, logits);
        float m = logits[0];
        for (int c = 1; c < CLASSES; ++c) m = fmaxf(m, logits[c]);
        float sum = 0.0f;
        for (int c = 0; c < CLASSES; ++c) { dl[c] = expf(logits[c] - m); sum += dl[c]; }
        for (int c = 0; c < CLASSES; ++c) dl[c] = (dl[c] / sum - (c == ys[s] ? 1.0f : 0.0f)) / batch;
        if (k < n2) {
            const int j = k < n1 ? k / INPUTS : k - n1;
            if (h[j] > 0.0f) {
                float dh = 0.0f;
                for (int c = 0; c < CLASSES; ++c) dh += dl[c] * p[w2 + c * HIDDEN + j];
                acc += k < n1 ? dh * x[k % INPUTS] : dh;
            }
        } else if (k < n3) {
            const int c = (k - n2) / HIDDEN, j = (k - n2) % HIDDEN;
            acc += dl[c] * h[j];
        } else {
            acc += dl[k - n3];
        }
    }
    if (k < n1) g[w1 + k] = acc;
    else if (k < n2) g[b1 + (k - n1)] = acc;
    else if (k < n3) g[w2 + (k - n2)] = acc;
    else g[b2 + (k - n3)] = acc;
}

// One thread per sample: its cross-entropy and whether it is classified correctly.
extern "C" __global__ void __launch_bounds__(THREADS) mlp_eval(const float* __restrict__ p, const float* __restrict__ xs,
                                    const int* __restrict__ ys, int n,
                                    long long w1, long long b1, long long w2, long long b2,
                                    float* __restrict__ loss, int* __restrict__ correct)
{
    const int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= n) return;
    float h[HIDDEN], logits[CLASSES];
    mlp_forward(p, w1, b1, w2, b2, xs + s * INPUTS, h, logits);
    float m = logits[0];
    int best = 0;
    for (int c = 1; c < CLASSES; ++c) if (logits[c] > m) { m = logits[c]; best = c; }
    float sum = 0.0f;
    for (int c = 0; c < CLASSES; ++c) sum += expf(logits[c] - m);
    loss[s] = logf(sum) - (logits[ys[s]] - m);
    correct[s] = best == ys[s];
}
"#;

/// Threads of every block of the training kernels (their `__launch_bounds__`).
const THREADS: u32 = 256;

/// Where the training kernels are named in errors.
const PROGRAM: &str = "examples/cuda_jit.rs (training kernels)";

/// A launch of `n` threads, one per item, in blocks of [`THREADS`].
fn launch_config(n: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(THREADS), 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Compiles the training kernels to CUBINs for sm_80 and sm_90 and checks that blocks of
/// [`THREADS`] fit their registers and shared memory (issue #25: `mlp_grads` got 247 registers
/// and was launched with 1,024 threads, which no GPU can run). Runs without a GPU, so that CI
/// (`.ci/steps/cuda_training.sh` runs this example) fails on a kernel that could not launch.
fn check_training_kernels(source: &str) -> AnyResult<()> {
    for arch in ["sm_80", "sm_90"] {
        let report = nvrtc::cubin_ptxas_report(source, arch, nvrtc::Level::Full)?;
        let kernels = check_launch_resources(PROGRAM, &report, THREADS)?;
        let summary: Vec<String> = kernels
            .iter()
            .map(|k| format!("{} {} registers", k.name, k.registers))
            .collect();
        println!(
            "launch resources for {arch}, {THREADS} threads per block: {}",
            summary.join(", ")
        );
    }
    Ok(())
}

fn kernels_source() -> String {
    KERNELS
        .replace("{inputs}", &INPUTS.to_string())
        .replace("{hidden}", &HIDDEN.to_string())
        .replace("{classes}", &CLASSES.to_string())
        .replace("{threads}", &THREADS.to_string())
}

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> AnyResult<()> {
    let (weights, config) = parse_args()?;
    let lopt = match &weights {
        Some(w) => LearnedOptimizer::load(w)?,
        None => LearnedOptimizer::demo(),
    };
    println!("learned optimizer: {}", lopt.origin);
    let shapes: Vec<mulo::shape::Layout> = Mlp::specs()
        .iter()
        .map(|s| s.layout())
        .collect::<mulo::Result<_>>()?;
    if !nvrtc::nvrtc_available() {
        println!("SKIPPED: {}", nvrtc::NVRTC_HELP);
        return Ok(());
    }
    let started = Instant::now();
    check_training_kernels(&kernels_source())?;
    let training_ptx = cudarc::nvrtc::compile_ptx(kernels_source())
        .map_err(|e| format!("NVRTC rejected the training kernels: {e:?}"))?;
    let factory = match PackedCuda::new(0) {
        Ok(f) => f,
        Err(e) => {
            // No GPU: compile the packed program anyway, so everything but the launches is
            // exercised, and say why training cannot run.
            let model = PackedModel::new(&lopt, &shapes)?;
            let compiled = model.compile(nvrtc::DEFAULT_ARCH, true)?;
            println!(
                "compiled the training kernels and the packed μLO step ({} launches per step, {} bytes of PTX) in {:.1?}",
                compiled.manifest.slots.len(),
                compiled.ptx.ptx.len(),
                started.elapsed()
            );
            println!("SKIPPED training on the GPU: {e}");
            return Ok(());
        }
    };
    let mut opt = factory.backend(&lopt, &shapes, 0)?;
    let stream = factory.runtime().stream().clone();
    let module = stream.context().load_module(training_ptx)?;
    let (grads_fn, eval_fn) = (
        module.load_function("mlp_grads")?,
        module.load_function("mlp_eval")?,
    );
    // What this device allows each kernel, checked once before the first launch.
    for (name, f) in [("mlp_grads", &grads_fn), ("mlp_eval", &eval_fn)] {
        check_block_threads(PROGRAM, name, f.max_threads_per_block()?, (THREADS, 1, 1))?;
    }
    println!(
        "compiled on {}: {} launches per μLO step for {} tensors, in {:.1?}",
        factory.runtime().arch(),
        opt.model().slots.len(),
        opt.len(),
        started.elapsed()
    );

    // Parameters into mulo's arena (the same initialization as train_mlp), data on the GPU.
    let offsets: Vec<i64> = (0..4).map(|i| opt.model().param_offset(i) as i64).collect();
    let init = Mlp::new(config.seed);
    for (i, t) in init.tensors.iter().enumerate() {
        opt.executor_mut()
            .write(Buffer::Param, offsets[i] as usize, t)?;
    }
    let data = blobs(config.samples, config.seed);
    let xs: Vec<f32> = data.iter().flat_map(|(x, _)| *x).collect();
    let ys: Vec<i32> = data.iter().map(|(_, y)| *y as i32).collect();
    let (xs, ys) = (stream.clone_htod(&xs)?, stream.clone_htod(&ys)?);
    let n = data.len() as i32;
    let mut loss = stream.alloc_zeros::<f32>(data.len())?;
    let mut correct = stream.alloc_zeros::<i32>(data.len())?;
    let n_params = (HIDDEN * INPUTS + HIDDEN + CLASSES * HIDDEN + CLASSES) as u32;

    let mut evaluate = |opt: &mut PackedBackend<CudaExecutor>| -> AnyResult<(f32, f32)> {
        let (param, _) = opt.executor_mut().param_and_grad_mut();
        let mut b = stream.launch_builder(&eval_fn);
        b.arg(&param).arg(&xs).arg(&ys).arg(&n);
        for o in &offsets {
            b.arg(o);
        }
        b.arg(&mut loss).arg(&mut correct);
        // SAFETY: the arguments match mlp_eval's signature; every buffer holds `n` samples.
        unsafe { b.launch(launch_config(n as u32)) }?;
        let (l, c) = (stream.clone_dtoh(&loss)?, stream.clone_dtoh(&correct)?);
        Ok((
            l.iter().sum::<f32>() / n as f32,
            c.iter().sum::<i32>() as f32 / n as f32,
        ))
    };

    println!(
        "MLP {INPUTS}→{HIDDEN}→{CLASSES} on {} blob samples, batch {}, lr {} (cosine to lr/10), weight decay {}",
        config.samples, config.batch, config.lr, config.weight_decay
    );
    println!("epoch   loss    accuracy  step time");
    let (first_loss, accuracy) = evaluate(&mut opt)?;
    println!("{:>5}  {first_loss:.4}   {:>6.1}%", 0, 100.0 * accuracy);
    let steps_per_epoch = data.len().div_ceil(config.batch);
    let total_steps = (config.epochs * steps_per_epoch).max(1);
    let mut last_loss = first_loss;
    let mut step = 0usize;
    for epoch in 1..=config.epochs {
        let mut step_time = 0f64;
        for first in (0..data.len()).step_by(config.batch) {
            let batch = config.batch.min(data.len() - first) as i32;
            let first = first as i32;
            {
                let (param, mut grad) = opt.executor_mut().param_and_grad_mut();
                let mut b = stream.launch_builder(&grads_fn);
                b.arg(&param)
                    .arg(&mut grad)
                    .arg(&xs)
                    .arg(&ys)
                    .arg(&first)
                    .arg(&batch);
                for o in &offsets {
                    b.arg(o);
                }
                // SAFETY: the arguments match mlp_grads's signature; the offsets are those of
                // the packed model's param and grad arenas.
                unsafe { b.launch(launch_config(n_params)) }?;
            }
            let progress = step as f32 / total_steps as f32;
            let lr =
                config.lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f32::consts::PI * progress).cos()));
            let hyper = Hyper {
                lr,
                weight_decay: config.weight_decay,
            };
            let t = Instant::now();
            opt.step_in_place(&[Some(hyper); 4])?;
            step_time += t.elapsed().as_secs_f64();
            step += 1;
        }
        let (l, a) = evaluate(&mut opt)?;
        last_loss = l;
        println!(
            "{epoch:>5}  {l:.4}   {:>6.1}%   {:.3} ms",
            100.0 * a,
            step_time * 1e3 / steps_per_epoch as f64
        );
    }
    println!(
        "loss {first_loss:.4} → {last_loss:.4} ({:.0}% of the initial loss)",
        100.0 * last_loss / first_loss
    );
    if last_loss.is_nan() || last_loss >= 0.5 * first_loss {
        return Err("the loss did not fall to half its initial value".into());
    }
    Ok(())
}
