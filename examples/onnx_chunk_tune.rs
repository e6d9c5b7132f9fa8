//! Times the chunked ONNX runtime for several chunk sizes and thread counts.
//!
//! ```text
//! cargo run --release --example onnx_chunk_tune -- 1024x512 WEIGHTS_DIR
//! ```

use mulo::backend::onnx::ChunkedOnnxStepper;
use mulo::backend::{Hyper, TensorStepper};
use mulo::lopt::LearnedOptimizer;
use mulo::shape::Shape;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [shape, weights] = args.as_slice() else {
        return Err("usage: onnx_chunk_tune SHAPE WEIGHTS".into());
    };
    let shape = Shape::parse(shape)?;
    let ir = mulo::compile_step(&shape, &LearnedOptimizer::load(weights)?)?;
    let n = shape.numel();
    let mut param: Vec<f32> = (0..n)
        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-3)
        .collect();
    let grad: Vec<f32> = (0..n)
        .map(|i| ((i * 104729 % 997) as f32 - 498.0) * 1e-4)
        .collect();
    let hyper = Hyper {
        lr: 1e-3,
        weight_decay: 0.0,
    };
    for threads in [1, 2] {
        for chunk in [4096, 16384, 65536, 262144] {
            let mut s = ChunkedOnnxStepper::new(&ir, 0, chunk, threads)?;
            s.step(&mut param, &grad, hyper)?;
            let times = mulo::bench::time_steps(1, 5, || s.step(&mut param, &grad, hyper))?;
            let median = mulo::bench::median(&times);
            println!(
                "threads {threads} chunk {chunk:>7}: {:.1} ns/elem",
                median as f64 / n as f64
            );
        }
    }
    Ok(())
}
