//! Timing steps and relating the time to the floors of SPEC.md §5.
//!
//! `mulo-compile bench` uses this for every target; the figures it prints are what the README
//! and `bench/` results quote.

use crate::error::Result;
use crate::ir::{Op, StepIr};
use serde::Serialize;
use std::time::Instant;

/// Work one step does, per element of the tensor.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct StepCost {
    /// Multiply-adds of the MLP per element, with the per-row, per-column and per-step parts
    /// amortized over the elements that share them (what a folding compiler must do).
    pub madds_per_element: f64,
    /// Multiply-adds of the MLP per element without any folding (I·H + L·H·H + 2·H).
    pub unfolded_madds_per_element: f64,
    /// Device-memory traffic per element of the step's pass plan, with f32 buffers
    /// ([`crate::plan::PassPlan::bytes_per_element`]: 72 B for μLO factored, 104 B unfactored).
    pub bytes_per_element: f64,
}

impl StepCost {
    /// The cost of `ir`'s step.
    pub fn of(ir: &StepIr) -> Self {
        let mut unfolded = 0f64;
        for node in &ir.nodes {
            if let Op::Dense { matrix, .. } = &node.op {
                let m = ir.matrix(*matrix);
                unfolded += (m.rows * m.cols) as f64;
            }
        }
        let plan = crate::plan::PassPlan::of(ir);
        let folded = plan.madds_per_element(ir);
        let bytes = plan.bytes_per_element(ir);
        StepCost {
            madds_per_element: folded,
            unfolded_madds_per_element: unfolded,
            bytes_per_element: bytes,
        }
    }
}

/// Nanoseconds of each of `steps` calls of `step`, after `warmup` untimed calls.
pub fn time_steps(
    warmup: usize,
    steps: usize,
    mut step: impl FnMut() -> Result<()>,
) -> Result<Vec<u64>> {
    for _ in 0..warmup {
        step()?;
    }
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps {
        let start = Instant::now();
        step()?;
        times.push(start.elapsed().as_nanos() as u64);
    }
    Ok(times)
}

/// The median of a list of times (the upper median for an even count).
pub fn median(times: &[u64]) -> u64 {
    let mut sorted = times.to_vec();
    sorted.sort_unstable();
    sorted.get(sorted.len() / 2).copied().unwrap_or(0)
}

/// The result of a benchmark, printed as one JSON line.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// Tensor shape, e.g. `1024x512`.
    pub shape: String,
    /// Backend.
    pub target: String,
    /// Timed steps.
    pub steps: usize,
    /// Median time of one step.
    pub median_ns: u64,
    /// Fastest step.
    pub min_ns: u64,
    /// Median time per element.
    pub ns_per_element: f64,
    /// The work of one step.
    pub cost: StepCost,
    /// Floor from arithmetic: folded multiply-adds at the peak rate given, in ns per element.
    pub compute_floor_ns_per_element: f64,
    /// Floor from memory traffic at the bandwidth given, in ns per element (0 when unknown).
    pub memory_floor_ns_per_element: f64,
    /// max(compute floor, memory floor) / measured: the fraction of the roofline reached.
    pub roofline_fraction: f64,
    /// Memory floor / measured (0 when the bandwidth is not modelled).
    pub memory_floor_fraction: f64,
    /// Compute (FP32 multiply-add) floor / measured.
    pub compute_floor_fraction: f64,
    /// Peak multiply-add rate assumed (per second).
    pub peak_madds_per_sec: f64,
    /// Memory bandwidth assumed (bytes per second; 0 when not modelled).
    pub bandwidth_bytes_per_sec: f64,
}

impl BenchReport {
    /// Builds a report from step times and the machine's assumed peaks.
    pub fn new(
        ir: &StepIr,
        target: &str,
        times: &[u64],
        peak_madds_per_sec: f64,
        bandwidth_bytes_per_sec: f64,
    ) -> Self {
        let cost = StepCost::of(ir);
        let numel = ir.layout.numel() as f64;
        let median_ns = median(times);
        let ns_per_element = median_ns as f64 / numel;
        let compute_floor = cost.madds_per_element / peak_madds_per_sec * 1e9;
        let memory_floor = if bandwidth_bytes_per_sec > 0.0 {
            cost.bytes_per_element / bandwidth_bytes_per_sec * 1e9
        } else {
            0.0
        };
        BenchReport {
            shape: ir.layout.shape().to_string(),
            target: target.to_string(),
            steps: times.len(),
            median_ns,
            min_ns: times.iter().copied().min().unwrap_or(0),
            ns_per_element,
            cost,
            compute_floor_ns_per_element: compute_floor,
            memory_floor_ns_per_element: memory_floor,
            roofline_fraction: compute_floor.max(memory_floor) / ns_per_element,
            memory_floor_fraction: memory_floor / ns_per_element,
            compute_floor_fraction: compute_floor / ns_per_element,
            peak_madds_per_sec,
            bandwidth_bytes_per_sec,
        }
    }

    /// One JSON object on one line.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("report serializes")
    }
}

/// GPT-2 small's parameter tensors in the Hugging Face layout (names and shapes; 148 tensors,
/// 124,439,808 elements, `lm_head` tied to `wte`): the whole model the CPU benchmark and the
/// sharded communication count step.
pub fn gpt2_small() -> Vec<(String, Vec<usize>)> {
    let mut params = vec![
        ("wte.weight".to_string(), vec![50257, 768]),
        ("wpe.weight".to_string(), vec![1024, 768]),
    ];
    for layer in 0..12 {
        for (name, shape) in [
            ("ln_1.weight", vec![768]),
            ("ln_1.bias", vec![768]),
            ("attn.c_attn.weight", vec![768, 2304]),
            ("attn.c_attn.bias", vec![2304]),
            ("attn.c_proj.weight", vec![768, 768]),
            ("attn.c_proj.bias", vec![768]),
            ("ln_2.weight", vec![768]),
            ("ln_2.bias", vec![768]),
            ("mlp.c_fc.weight", vec![768, 3072]),
            ("mlp.c_fc.bias", vec![3072]),
            ("mlp.c_proj.weight", vec![3072, 768]),
            ("mlp.c_proj.bias", vec![768]),
        ] {
            params.push((format!("h.{layer}.{name}"), shape));
        }
    }
    params.push(("ln_f.weight".to_string(), vec![768]));
    params.push(("ln_f.bias".to_string(), vec![768]));
    params
}

#[cfg(test)]
mod gpt2_tests {
    #[test]
    fn gpt2_small_has_148_tensors_of_124m_elements() {
        let params = super::gpt2_small();
        assert_eq!(params.len(), 148);
        let numel: usize = params
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        assert_eq!(numel, 124_439_808);
    }
}
