//! Speed of a sharded step's stages (`mulo::shard`) on the two engines: a WxH tensor (default
//! 1024x512) split by rows over N shards (default 2), every shard stepped in this process in
//! turn, `reps` times (default 40) (the all-reduces are sums in memory). Prints the median time per step of one shard's
//! stages (the whole step of every shard divided by N) for the reference evaluator and the
//! native CPU backend, and the unsharded CPU step of the whole tensor for scale:
//! `cargo run --release --example staged_speed -- 1024 512 2 40`.

use mulo::backend::cpu::{default_threads, CpuStepper};
use mulo::backend::{Hyper, TensorStepper};
use mulo::shard::{RowShard, StageEngine, StagedPlan};
use mulo::state::TensorState;
use mulo::{compile_layout, Layout, LearnedOptimizer, Shape};
use std::sync::Arc;
use std::time::Instant;

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

fn main() -> mulo::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("rows, columns, shards"))
        .collect();
    let (rows, cols, shards) = (
        args.first().copied().unwrap_or(1024),
        args.get(1).copied().unwrap_or(512),
        args.get(2).copied().unwrap_or(2),
    );
    let reps = args.get(3).copied().unwrap_or(40);
    let lopt = LearnedOptimizer::demo();
    let layout = Layout::new(Shape::new(vec![rows, cols])?);
    let ir = Arc::new(compile_layout(&layout, &lopt)?);
    let n = rows * cols;
    let param: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
        .collect();
    let grad: Vec<f32> = (0..n).map(|i| ((i * 104729) % 997) as f32 * 1e-5).collect();
    let hyper = Hyper {
        lr: 1e-3,
        weight_decay: 0.0,
    };
    let threads = default_threads();
    println!(
        "{rows}x{cols} over {shards} shards, {threads} threads, {} ISA",
        format!("{:?}", mulo::backend::cpu::Isa::detect()).to_lowercase()
    );
    let size = rows.div_ceil(shards);
    let parts: Vec<RowShard> = (0..shards)
        .map(|r| RowShard {
            offset: (r * size).min(rows),
            rows: rows.saturating_sub(r * size).min(size),
        })
        .collect();
    let shard_step = |engine: StageEngine| -> mulo::Result<Box<dyn FnMut() -> mulo::Result<f64>>> {
        let plans: Vec<Arc<StagedPlan>> = parts
            .iter()
            .map(|&s| StagedPlan::with_engine(ir.clone(), Some(s), engine).map(Arc::new))
            .collect::<mulo::Result<_>>()?;
        let locals: Vec<(Vec<f32>, Vec<f32>, TensorState)> = plans
            .iter()
            .zip(&parts)
            .map(|(p, s)| {
                let r = s.offset * cols..(s.offset + s.rows) * cols;
                (
                    param[r.clone()].to_vec(),
                    grad[r].to_vec(),
                    TensorState::zeros(p.local_layout(), 0),
                )
            })
            .collect();
        Ok(Box::new(move || {
            let t0 = Instant::now();
            let mut running = plans
                .iter()
                .zip(&locals)
                .map(|(p, (w, g, st))| p.begin(w, g, st, hyper))
                .collect::<mulo::Result<Vec<_>>>()?;
            for _ in 0..plans[0].rounds() {
                let mut sum = vec![0f64; running[0].partials().len()];
                for s in &running {
                    for (a, b) in sum.iter_mut().zip(s.partials()) {
                        *a += b;
                    }
                }
                for s in &mut running {
                    s.advance(&sum)?;
                }
            }
            for s in running {
                std::hint::black_box(s.finish()?);
            }
            Ok(t0.elapsed().as_secs_f64() / shards as f64)
        }))
    };
    let mut reference = shard_step(StageEngine::Interp)?;
    let mut native = shard_step(StageEngine::Cpu { threads })?;
    let mut stepper = CpuStepper::new(ir.clone(), 0);
    let mut w = param.clone();
    // Interleaved, so that a change of the machine's load hits all three alike.
    let (mut t_ref, mut t_cpu, mut t_whole) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..reps {
        if rep % 5 == 0 {
            t_ref.push(reference()?);
        }
        t_cpu.push(native()?);
        let t0 = Instant::now();
        stepper.step(&mut w, &grad, hyper)?;
        t_whole.push(t0.elapsed().as_secs_f64());
    }
    let n_ref = t_ref.len();
    let (r, c, u) = (median(t_ref), median(t_cpu), median(t_whole));
    println!("| stages on | ms per shard per step (median) |");
    println!("|---|---|");
    println!(
        "| reference evaluator (`StageEngine::Interp`) | {:.2} ({} runs) |",
        r * 1e3,
        n_ref
    );
    println!(
        "| native CPU (`StageEngine::Cpu`) | {:.2} ({reps} runs): {:.1}x faster |",
        c * 1e3,
        r / c
    );
    println!(
        "| (unsharded native CPU step of the whole tensor) | {:.2} ({reps} runs) |",
        u * 1e3
    );
    Ok(())
}
