//! Communication of one sharded optimizer step (`mulo::shard`) for GPT-2 small's parameter
//! shapes (Hugging Face layout, 124,439,808 parameters, `lm_head` tied to `wte`) sharded on
//! dim 0 over N ranks as FSDP2 does (torch.chunk), against PyLO's route for several GPUs (a
//! reduce-scatter that gives each rank whole tensors, then an all-gather of the updated
//! parameters). Prints a markdown table: `cargo run --release --example sharded_comm -- 8`.

use mulo::shard::{RowShard, StagedPlan};
use mulo::{compile_layout, Layout, LearnedOptimizer, Shape};
use std::collections::HashMap;
use std::sync::Arc;

fn main() -> mulo::Result<()> {
    let ranks: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("the number of ranks"))
        .unwrap_or(8);
    let lopt = LearnedOptimizer::demo(); // the round sizes do not depend on the weights
    let params = mulo::bench::gpt2_small();
    let numel: usize = params
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    let mut cache: HashMap<Vec<usize>, Arc<StagedPlan>> = HashMap::new();
    let mut level_values = [0usize; 2];
    let mut per_shape: Vec<(String, usize, usize)> = Vec::new();
    for (_, dims) in &params {
        let plan = cache
            .entry(dims.clone())
            .or_insert_with(|| {
                let layout = Layout::new(Shape::new(dims.clone()).unwrap());
                let ir = Arc::new(compile_layout(&layout, &lopt).unwrap());
                // Rank 0's shard: the round sizes are the same on every rank.
                let rows = dims[0].div_ceil(ranks);
                Arc::new(StagedPlan::new(ir, Some(RowShard { offset: 0, rows })).unwrap())
            })
            .clone();
        for (r, v) in level_values.iter_mut().enumerate().take(plan.rounds()) {
            *v += plan.round_len(r);
        }
        let shape = dims
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("x");
        if !per_shape.iter().any(|s| s.0 == shape) {
            let total: usize = (0..plan.rounds()).map(|r| plan.round_len(r)).sum();
            per_shape.push((shape, plan.rounds(), total));
        }
    }
    let t = params.len();
    // The model's rounds (ShardedModel's contract; every GPT-2 tensor is factored or a vector,
    // so 2 level rounds): header 2T (+T with clipping), the level partials, T guard flags.
    assert_eq!(cache.values().map(|p| p.rounds()).max(), Some(2));
    let no_clip = [2 * t + level_values[0], level_values[1], t];
    let clip = [3 * t, level_values[0], level_values[1], t];
    let values: usize = no_clip.iter().sum();
    let values_clip: usize = clip.iter().sum();
    let n = ranks as f64;
    let ring = 2.0 * (n - 1.0) / n; // bytes sent per rank per byte of an all-reduce (ring)
    let mulo_bytes = values as f64 * 8.0;
    let mulo_clip_bytes = values_clip as f64 * 8.0;
    let pylo_bytes = 2.0 * (n - 1.0) / n * numel as f64 * 4.0; // reduce-scatter + all-gather, f32
    println!("GPT-2 small: {t} tensors, {numel} parameters, {ranks} ranks\n");
    println!("| shape | rounds | partial sums per step |\n|---|---|---|");
    for (s, r, v) in &per_shape {
        println!("| {s} | {r} | {v} |");
    }
    println!();
    println!("| scheme | collectives per step | values per rank per step | bytes per rank per step (payload) | bytes sent per rank (ring) |");
    println!("|---|---|---|---|---|");
    println!(
        "| mulo sharded, no clipping | 3 all-reduce (f64) | {values} | {:.0} ({:.2} MB) | {:.0} ({:.2} MB) |",
        mulo_bytes,
        mulo_bytes / 1e6,
        mulo_bytes * ring,
        mulo_bytes * ring / 1e6
    );
    println!(
        "| mulo sharded, per-tensor clipping | 4 all-reduce (f64) | {values_clip} | {:.0} ({:.2} MB) | {:.0} ({:.2} MB) |",
        mulo_clip_bytes,
        mulo_clip_bytes / 1e6,
        mulo_clip_bytes * ring,
        mulo_clip_bytes * ring / 1e6
    );
    println!(
        "| PyLO: reduce-scatter to whole tensors + all-gather (f32) | 2 | {} | — | {:.0} ({:.1} MB) |",
        numel,
        pylo_bytes,
        pylo_bytes / 1e6
    );
    println!(
        "\nratio (ring bytes): PyLO / mulo = {:.0}x (no clipping), {:.0}x (clipping)",
        pylo_bytes / (mulo_bytes * ring),
        pylo_bytes / (mulo_clip_bytes * ring)
    );
    Ok(())
}
