//! The whole-model golden case `tests/fixtures/models/digits_cnn_w32.safetensors`: a μP CNN
//! trained by PyLO's `MuLO_naive` (copied from `../shared/golden/models`; its format is in
//! `tests/fixtures/golden/README.md`), replayed through [`MuloOptimizer`] from zero state.

use mulo::optimizer::{MuloOptimizer, OptimizerOptions, ParamSpec};
use mulo::trajectory::{max_abs_diff, DEFAULT_TOLERANCE};
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;
use std::path::PathBuf;

/// One tensor of the model as its `params` metadata records it.
#[derive(Clone, Debug, Deserialize)]
pub struct RecordedParam {
    /// mup's parameter name.
    pub name: String,
    /// The tensor's shape.
    pub shape: Vec<usize>,
    /// mup's base dims; `null` for a finite dimension.
    pub base_shape: Vec<Option<usize>>,
    /// The multiplier `MuLO_naive`'s parameter groups gave its lr.
    pub lr_multiplier: f64,
    /// The factored axes PyLO chose, or `null` for rank ≤ 1.
    pub factored_axes: Option<[usize; 2]>,
}

/// The recorded run.
pub struct ModelCase {
    /// The tensors, in the recorded order.
    pub params: Vec<RecordedParam>,
    /// lr of every step.
    pub lr: f32,
    /// Weight decay of every step.
    pub weight_decay: f32,
    /// PyLO's per-tensor clipping norm.
    pub max_grad_norm: f32,
    /// `p0` of every tensor.
    pub p0: Vec<Vec<f32>>,
    /// `grads[t][i]`: tensor i's gradient at step t + 1, before clipping.
    pub grads: Vec<Vec<Vec<f32>>>,
    /// `after[t][i]`: tensor i after step t + 1.
    pub after: Vec<Vec<Vec<f32>>>,
}

/// How the μP learning rates are given to the optimizer.
#[derive(Clone, Copy, Debug)]
pub enum Mup {
    /// From the recorded base shapes (mup's `set_base_shapes`), as `MuLO_naive` derives them.
    BaseShapes,
    /// The recorded `lr_multiplier` of every tensor.
    Multipliers,
}

/// `tests/fixtures/models/digits_cnn_w32.safetensors`.
pub fn digits_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models/digits_cnn_w32.safetensors")
}

impl ModelCase {
    /// Reads the recorded run.
    pub fn digits() -> Self {
        let bytes = std::fs::read(digits_path()).expect("whole-model fixture present");
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let meta = header.metadata().clone().expect("metadata");
        let tensors = SafeTensors::deserialize(&bytes).unwrap();
        let params: Vec<RecordedParam> = serde_json::from_str(&meta["params"]).unwrap();
        let steps: usize = meta["steps"].parse().unwrap();
        let read = |key: String, shape: &[usize]| -> Vec<f32> {
            let view = tensors
                .tensor(&key)
                .unwrap_or_else(|_| panic!("{key} missing"));
            assert_eq!(view.dtype(), Dtype::F32, "{key}");
            // The recording stores a 0-d parameter's tensors as shape [1].
            let stored_as = if shape.is_empty() { &[1][..] } else { shape };
            assert_eq!(view.shape(), stored_as, "{key}");
            view.data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        let all = |suffix: &str| -> Vec<Vec<f32>> {
            params
                .iter()
                .map(|p| read(format!("{}.{suffix}", p.name), &p.shape))
                .collect()
        };
        ModelCase {
            lr: meta["lr"].parse().unwrap(),
            weight_decay: meta["weight_decay"].parse().unwrap(),
            max_grad_norm: meta["max_grad_norm"].parse().unwrap(),
            p0: all("p0"),
            grads: (1..=steps).map(|t| all(&format!("g{t}"))).collect(),
            after: (1..=steps).map(|t| all(&format!("p{t}"))).collect(),
            params,
        }
    }

    /// The optimizer's parameter specs: shapes, recorded factored axes and μP.
    pub fn specs(&self, mup: Mup) -> Vec<ParamSpec> {
        self.params
            .iter()
            .map(|p| {
                let mut spec = ParamSpec::new(&p.name, &p.shape).unwrap();
                if let Some([d0, d1]) = p.factored_axes {
                    spec = spec.with_factored_axes(d0, d1).unwrap();
                }
                match mup {
                    Mup::BaseShapes => {
                        let base: Vec<usize> = p
                            .base_shape
                            .iter()
                            .zip(&p.shape)
                            .map(|(b, &d)| b.unwrap_or(d))
                            .collect();
                        spec.with_base_shape(&base).unwrap()
                    }
                    Mup::Multipliers => spec.with_lr_multiplier(p.lr_multiplier),
                }
            })
            .collect()
    }

    /// Replays the run through an optimizer built with `options` (its clipping set to the
    /// recorded one) and returns, per tensor, its name and worst error over every step
    /// relative to its displacement max |pT − p0|.
    pub fn replay(&self, mup: Mup, options: OptimizerOptions) -> Vec<(String, f64)> {
        let lopt = super::fixture_lopt();
        let options = OptimizerOptions {
            max_grad_norm: Some(self.max_grad_norm),
            ..options
        };
        let mut opt = MuloOptimizer::new(&lopt, self.specs(mup), options).unwrap();
        let mut params = self.p0.clone();
        let last = self.after.last().expect("at least one step");
        let scales: Vec<f64> = params
            .iter()
            .zip(last)
            .map(|(p0, pt)| max_abs_diff(p0, pt).max(f64::MIN_POSITIVE))
            .collect();
        let mut worst = vec![0f64; params.len()];
        for (grads, want) in self.grads.iter().zip(&self.after) {
            let mut views: Vec<&mut [f32]> = params.iter_mut().map(|p| p.as_mut_slice()).collect();
            let grads: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
            let report = opt
                .step(&mut views, &grads, self.lr, self.weight_decay)
                .unwrap();
            assert!(report.skipped.is_empty(), "{:?}", report.skipped);
            for (i, (p, w)) in params.iter().zip(want).enumerate() {
                worst[i] = worst[i].max(max_abs_diff(p, w) / scales[i]);
            }
        }
        self.params
            .iter()
            .map(|p| p.name.clone())
            .zip(worst)
            .collect()
    }
}

/// Asserts every tensor of a replay within the golden tolerance at every step.
pub fn assert_model_within_tolerance(errors: &[(String, f64)], context: &str) {
    eprintln!("{context}: {errors:?}");
    assert_eq!(errors.len(), 9, "{context}: the model has 9 tensors");
    for (name, err) in errors {
        assert!(
            *err <= DEFAULT_TOLERANCE,
            "{context}: tensor `{name}` off by {err:e} of its displacement"
        );
    }
}
