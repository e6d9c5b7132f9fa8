//! Profiles one step of the exported ONNX graph in tract: time per optimized node, summed by
//! operator, largest first (how `bench/results/onnx-cpu.md` found what dominates).
//!
//! ```text
//! cargo run --release --example onnx_profile -- 1024x512 WEIGHTS_DIR [STEPS]
//! ```

use mulo::backend::onnx::{export, io_shape};
use mulo::ir::Buffer;
use mulo::lopt::LearnedOptimizer;
use mulo::shape::Shape;
use std::collections::HashMap;
use std::time::Instant;
use tract_onnx::prelude::*;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (shape, weights) = match args.as_slice() {
        [s, w] | [s, w, _] => (Shape::parse(s)?, w.clone()),
        _ => return Err("usage: onnx_profile SHAPE WEIGHTS [STEPS]".into()),
    };
    let steps: usize = args.get(2).map_or(Ok(3), |s| s.parse())?;
    let ir = mulo::compile_step(&shape, &LearnedOptimizer::load(&weights)?)?;
    let bytes = export(&ir)?;
    let started = Instant::now();
    let model = mulo::backend::onnx::runtime::optimized_model(&ir.layout, &bytes)?;
    eprintln!(
        "optimized in {:.1?}: {} nodes",
        started.elapsed(),
        model.nodes().len()
    );
    let plan = model.into_runnable()?;
    let layout = &ir.layout;
    let mut inputs: TVec<TValue> = TVec::new();
    for b in Buffer::for_layout(layout) {
        let s = io_shape(b, layout, true);
        let n: usize = s.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-4)
            .collect();
        inputs.push(Tensor::from_shape(&s, &data)?.into());
    }
    inputs.push(tensor0(5i64).into());
    inputs.push(tensor0(1e-3f32).into());
    inputs.push(tensor0(0f32).into());
    let mut by_op: HashMap<String, (f64, usize)> = HashMap::new();
    let mut by_node: HashMap<usize, (f64, String)> = HashMap::new();
    let mut total = 0f64;
    for _ in 0..steps {
        let mut state = plan.spawn()?;
        let t0 = Instant::now();
        state.run_plan_with_eval(inputs.clone(), |ctx, st, node, input| {
            let t = Instant::now();
            let r = tract_onnx::tract_core::plan::eval(ctx, st, node, input);
            let dt = t.elapsed().as_secs_f64();
            let label = format!("{} {:?}", node.op().name(), node.outputs[0].fact.shape);
            by_node.entry(node.id).or_insert((0.0, label)).0 += dt;
            let e = by_op.entry(node.op().name().to_string()).or_default();
            e.0 += dt;
            e.1 += 1;
            r
        })?;
        total += t0.elapsed().as_secs_f64();
    }
    let mut rows: Vec<_> = by_op.into_iter().collect();
    rows.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    let n = layout.numel() as f64;
    println!(
        "{shape}: {:.1} ms per step, {:.1} ns per element",
        total / steps as f64 * 1e3,
        total / steps as f64 / n * 1e9
    );
    for (op, (secs, count)) in rows.iter().take(25) {
        let per_step = secs / steps as f64;
        println!(
            "{op:<28} {:>5} nodes {:>9.2} ms {:>7.1} ns/elem {:>5.1}%",
            count / steps,
            per_step * 1e3,
            per_step / n * 1e9,
            secs / total * 100.0
        );
    }
    let mut nodes: Vec<_> = by_node.into_values().collect();
    nodes.sort_by(|a, b| b.0.total_cmp(&a.0));
    println!("slowest nodes:");
    for (secs, label) in nodes.iter().take(15) {
        println!("  {:>9.2} ms  {label}", secs / steps as f64 * 1e3);
    }
    Ok(())
}
