//! Writes a trajectory in the golden format for any shape, computed by the reference
//! interpreter in f64: a high-precision reference for shapes the golden set does not cover
//! (e.g. 1024x512, where summation order matters; SPEC.md §3.4).
//!
//! ```text
//! cargo run --release --example reference_trajectory -- 1024x512 4 WEIGHTS_DIR OUT.safetensors
//! ```

use mulo::backend::{interp, Hyper};
use mulo::lopt::LearnedOptimizer;
use mulo::shape::Shape;
use mulo::state::TensorState;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::collections::HashMap;

/// A deterministic generator (SplitMix64) of uniform values in [-1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [shape, steps, weights, out] = args.as_slice() else {
        return Err("usage: reference_trajectory SHAPE STEPS WEIGHTS OUT.safetensors".into());
    };
    let shape = Shape::parse(shape)?;
    let steps: usize = steps.parse()?;
    let lopt = LearnedOptimizer::load(weights)?;
    let ir = mulo::compile_step(&shape, &lopt)?;
    let n = shape.numel();
    let mut rng = Rng(0x5EED);
    // Per-element scales from 1e-3 to 1, as in the golden cases.
    let scales: Vec<f64> = (0..n)
        .map(|_| 10f64.powf(-1.5 + 1.5 * rng.next()))
        .collect();
    let p0: Vec<f32> = (0..n).map(|_| (0.1 * rng.next()) as f32).collect();
    let hyper = Hyper {
        lr: 0.1,
        weight_decay: 0.0,
    };
    let mut tensors: Vec<(String, Vec<f32>)> = vec![("p0".into(), p0.clone())];
    let mut param: Vec<f64> = p0.iter().map(|&x| x as f64).collect();
    let mut state = TensorState::<f64>::zeros(&ir.layout, 0);
    for k in 1..=steps {
        let g: Vec<f32> = scales.iter().map(|s| (s * rng.next()) as f32).collect();
        let g64: Vec<f64> = g.iter().map(|&x| x as f64).collect();
        let (p, s) = interp::execute(&ir, &param, &g64, &state, hyper)?;
        param = p;
        state = s;
        tensors.push((format!("g{k}"), g));
        tensors.push((format!("p{k}"), param.iter().map(|&x| x as f32).collect()));
    }
    let bytes: Vec<(String, Vec<u8>)> = tensors
        .iter()
        .map(|(name, v)| {
            (
                name.clone(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let dims = shape.dims().to_vec();
    let views = bytes
        .iter()
        .map(|(name, b)| Ok((name.clone(), TensorView::new(Dtype::F32, dims.clone(), b)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let metadata = HashMap::from([
        ("shape".to_string(), serde_json::to_string(&dims)?),
        ("steps".to_string(), steps.to_string()),
        ("lr".to_string(), hyper.lr.to_string()),
        ("weight_decay".to_string(), hyper.weight_decay.to_string()),
        ("start_step".to_string(), "0".to_string()),
    ]);
    safetensors::serialize_to_file(views, Some(metadata), std::path::Path::new(out))?;
    eprintln!("wrote {out}: {steps} steps of {shape} (interpreter, f64)");
    Ok(())
}
