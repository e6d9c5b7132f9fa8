//! Profiles one step of the exported ONNX graph in tract: time per optimized node, summed by
//! operator, largest first (how `bench/results/onnx-cpu.md` found what dominates).
//!
//! ```text
//! cargo run --release --example onnx_profile -- 1024x512 WEIGHTS_DIR [STEPS [PART]]
//! ```
//!
//! PART: `whole` (the exported graph, default), `stats` (the chunked runtime's statistics
//! graph) or `chunk:ROWS` (its chunk graph for ROWS rows of axis 0).

use mulo::backend::onnx::chunked::split_specs;
use mulo::lopt::LearnedOptimizer;
use mulo::shape::Shape;
use std::collections::HashMap;
use std::time::Instant;
use tract_onnx::prelude::*;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (shape, weights) = match args.as_slice() {
        [s, w] | [s, w, _] | [s, w, _, _] => (Shape::parse(s)?, w.clone()),
        _ => return Err("usage: onnx_profile SHAPE WEIGHTS [STEPS [PART]]".into()),
    };
    let steps: usize = args.get(2).map_or(Ok(3), |s| s.parse())?;
    let ir = mulo::compile_step(&shape, &LearnedOptimizer::load(&weights)?)?;
    let part = args.get(3).map_or("whole", |s| s.as_str());
    let spec = match part {
        "whole" => mulo::backend::onnx::render::GraphSpec::whole(&ir),
        "stats" => split_specs(&ir, ir.layout.dims()[0]).stats,
        p => match p.strip_prefix("chunk:") {
            Some(rows) => split_specs(&ir, rows.parse()?).chunk,
            None => return Err(format!("unknown part `{p}`").into()),
        },
    };
    let proto = mulo::backend::onnx::render::render_graph(&ir, &spec)?;
    let bytes = onnx_protobuf::Message::write_to_bytes(&proto)?;
    let started = Instant::now();
    let model = mulo::backend::onnx::runtime::optimize_inference(
        tract_onnx::onnx().model_for_read(&mut &bytes[..])?,
    )?;
    eprintln!(
        "optimized in {:.1?}: {} nodes",
        started.elapsed(),
        model.nodes().len()
    );
    let plan = model.into_runnable()?;
    let layout = &ir.layout;
    let mut inputs: TVec<TValue> = TVec::new();
    for outlet in plan.model().input_outlets()? {
        let fact = plan.model().outlet_fact(*outlet)?;
        let shape: Vec<usize> = fact.shape.as_concrete().ok_or("symbolic input")?.to_vec();
        let n: usize = shape.iter().product();
        let t = if fact.datum_type == i64::datum_type() {
            Tensor::from_shape(&shape, &vec![5i64; n])?
        } else {
            let data: Vec<f32> = (0..n)
                .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-4)
                .collect();
            Tensor::from_shape(&shape, &data)?
        };
        inputs.push(t.into());
    }
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
    let n = layout.numel() as f64; // per element of the whole tensor
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
