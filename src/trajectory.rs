//! Trajectories recorded from PyLO (the golden format) and replaying them through any backend.
//!
//! A trajectory file is a safetensors file holding `p0`, the gradients `g1..gT`, the
//! parameters after each step `p1..pT` (some may be left out; `pT` never is), PyLO's final
//! state `state.mom`, `state.rms`, `state.fac_vec_*` (optional), and string metadata `shape`
//! (JSON list), `steps`, `lr`, `weight_decay`, `start_step`, and `factored_axes` (JSON
//! `[d0, d1]` as PyLO chose them, or `null`; optional: the default axes when absent).
//!
//! ELO files (golden/elo/README.md) add `lopt` (`"elo"`; absent means μLO_M), `exp_mult` and
//! `clip_norm` (`null` or ELO's global-norm clipping threshold), and their gradients may hold
//! NaN and ±∞ (ELO sanitizes them inside the step).

use crate::backend::{Hyper, TensorStepper};
use crate::error::{Error, Result};
use crate::lopt::Rule;
use crate::shape::{FactoredAxes, Layout, Shape};
use crate::state::TensorState;
use safetensors::{Dtype, SafeTensors};
use std::path::{Path, PathBuf};

/// The default tolerance: max |p − p_ref| ≤ 1e-4 · max |pT − p0| (golden/README.md).
pub const DEFAULT_TOLERANCE: f64 = 1e-4;

/// A recorded trajectory of one tensor.
#[derive(Clone, Debug)]
pub struct Trajectory {
    /// The file it was read from.
    pub path: PathBuf,
    /// Case name (file stem).
    pub name: String,
    /// The tensor's shape with the factored axes PyLO used (the file's `factored_axes`
    /// metadata, else the default of SPEC.md §2).
    pub layout: Layout,
    /// Learning rate of every step.
    pub lr: f32,
    /// Weight decay of every step.
    pub weight_decay: f32,
    /// Step counter before the first step.
    pub start_step: u64,
    /// The learned optimizer that recorded it (metadata `lopt`; μLO_M when absent).
    pub rule: Rule,
    /// ELO's `exp_mult` as recorded (metadata `exp_mult`), if any.
    pub exp_mult: Option<f32>,
    /// ELO's global-norm clipping threshold (metadata `clip_norm`), `None` when not clipped.
    pub clip_norm: Option<f32>,
    /// The parameter before the first step.
    pub p0: Vec<f32>,
    /// Gradient of step k+1 at index k.
    pub grads: Vec<Vec<f32>>,
    /// Parameter after step k+1 at index k, where recorded.
    pub params: Vec<Option<Vec<f32>>>,
    /// PyLO's state after the last step, converted to the canonical layout, if recorded.
    pub final_state: Option<TensorState>,
}

impl Trajectory {
    /// Reads a trajectory file, checking every tensor's dtype and shape.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let (_, header) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| Error::bad_file_from(path, "not a valid safetensors file", e))?;
        let tensors = SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::bad_file_from(path, "not a valid safetensors file", e))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let value = |key: &str| -> Result<&str> {
            meta.get(key)
                .map(String::as_str)
                .ok_or_else(|| Error::bad_file(path, format!("metadata `{key}` is missing")))
        };
        fn parse<T: std::str::FromStr>(path: &Path, key: &str, text: &str) -> Result<T> {
            text.trim().parse().map_err(|_| {
                Error::bad_file(path, format!("metadata `{key}` = `{text}` is not valid"))
            })
        }
        let dims: Vec<usize> = serde_json::from_str(value("shape")?).map_err(|_| {
            Error::bad_file(
                path,
                format!("metadata `shape` = `{}` is not a JSON list", meta["shape"]),
            )
        })?;
        let shape = Shape::new(dims).map_err(|e| Error::bad_file(path, e.to_string()))?;
        let steps: usize = parse(path, "steps", value("steps")?)?;
        let lr: f32 = parse(path, "lr", value("lr")?)?;
        let weight_decay: f32 = parse(path, "weight_decay", value("weight_decay")?)?;
        for (key, v) in [("lr", lr), ("weight_decay", weight_decay)] {
            if !v.is_finite() {
                return Err(Error::bad_file(
                    path,
                    format!("metadata `{key}` = {v} is not a finite number"),
                ));
            }
        }
        let start_step: u64 = match meta.get("start_step") {
            Some(text) => parse(path, "start_step", text)?,
            None => 0,
        };
        let rule: Rule = match meta.get("lopt") {
            None => Rule::Mulo,
            Some(text) => text
                .trim()
                .parse()
                .map_err(|e: String| Error::bad_file(path, format!("metadata `lopt`: {e}")))?,
        };
        let positive = |key: &str| -> Result<Option<f32>> {
            match meta.get(key).map(|t| t.trim()) {
                None | Some("null") => Ok(None),
                Some(text) => {
                    let v: f32 = parse(path, key, text)?;
                    if !(v.is_finite() && v > 0.0) {
                        return Err(Error::bad_file(
                            path,
                            format!("metadata `{key}` = {v} is not a positive finite number"),
                        ));
                    }
                    Ok(Some(v))
                }
            }
        };
        let exp_mult = positive("exp_mult")?;
        let clip_norm = positive("clip_norm")?;
        if rule == Rule::Mulo && clip_norm.is_some() {
            return Err(Error::bad_file(
                path,
                "metadata `clip_norm` is set but `lopt` is not `elo`: only ELO clips globally",
            ));
        }
        let axes: Option<FactoredAxes> = match meta.get("factored_axes").map(|t| t.trim()) {
            None | Some("null") => None,
            Some(text) => {
                let pair: [usize; 2] = serde_json::from_str(text).map_err(|_| {
                    Error::bad_file(
                        path,
                        format!("metadata `factored_axes` = `{text}` is not `[d0, d1]` or null"),
                    )
                })?;
                Some(FactoredAxes {
                    d0: pair[0],
                    d1: pair[1],
                })
            }
        };
        let layout = Layout::with_axes(shape.clone(), axes)
            .map_err(|e| Error::bad_file(path, format!("metadata `factored_axes`: {e}")))?;
        // ELO's recorded gradients may hold NaN/±∞ on purpose (its step sanitizes them).
        let finite_only = |name: &str| rule == Rule::Mulo || !name.starts_with('g');
        let read = |name: &str, want: &[usize]| -> Result<Option<Vec<f32>>> {
            let Ok(view) = tensors.tensor(name) else {
                return Ok(None);
            };
            if view.dtype() != Dtype::F32 {
                return Err(Error::bad_file(
                    path,
                    format!("tensor `{name}` has dtype {:?}, expected F32", view.dtype()),
                ));
            }
            if view.shape() != want {
                return Err(Error::bad_file(
                    path,
                    format!(
                        "tensor `{name}` has shape {:?}, expected {want:?}",
                        view.shape()
                    ),
                ));
            }
            let values: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            if !finite_only(name) {
                return Ok(Some(values));
            }
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                return Err(Error::bad_file(
                    path,
                    format!(
                        "tensor `{name}` holds a non-finite value ({}) at flat index {i}",
                        values[i]
                    ),
                ));
            }
            Ok(Some(values))
        };
        let dims = shape.dims().to_vec();
        let required = |name: &str| -> Result<Vec<f32>> {
            read(name, &dims)?
                .ok_or_else(|| Error::bad_file(path, format!("tensor `{name}` is missing")))
        };
        let p0 = required("p0")?;
        let grads = (1..=steps)
            .map(|k| required(&format!("g{k}")))
            .collect::<Result<Vec<_>>>()?;
        let mut params = (1..=steps)
            .map(|k| read(&format!("p{k}"), &dims))
            .collect::<Result<Vec<_>>>()?;
        if steps == 0 || params[steps - 1].is_none() {
            return Err(Error::bad_file(
                path,
                format!("tensor `p{steps}` (the final parameter) is missing"),
            ));
        }
        params.truncate(steps);
        let has_state = tensors.names().iter().any(|n| n.starts_with("state."));
        let final_state = if has_state {
            let mut error = None;
            let state = TensorState::from_pylo(&layout, start_step + steps as u64, |name| {
                let want = crate::state::pylo_shape(
                    crate::ir::Buffer::state_for_layout(&layout)
                        .into_iter()
                        .find(|b| crate::state::pylo_name(*b) == name)?,
                    &layout,
                );
                match read(&format!("state.{name}"), &want) {
                    Ok(v) => v.map(|v| (want, v)),
                    Err(e) => {
                        error = Some(e);
                        None
                    }
                }
            });
            if let Some(e) = error {
                return Err(e);
            }
            Some(state.map_err(|e| Error::bad_file(path, e.to_string()))?)
        } else {
            None
        };
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Trajectory {
            path: path.to_path_buf(),
            name,
            layout,
            lr,
            weight_decay,
            start_step,
            rule,
            exp_mult,
            clip_norm,
            p0,
            grads,
            params,
            final_state,
        })
    }

    /// max |pT − p0|: the scale errors are measured against.
    pub fn displacement(&self) -> f64 {
        let last = self
            .params
            .last()
            .and_then(|p| p.as_ref())
            .expect("pT is present");
        max_abs_diff(last, &self.p0)
    }
}

/// What replaying one trajectory found.
#[derive(Clone, Debug)]
pub struct ReplayReport {
    /// Case name.
    pub name: String,
    /// Steps replayed.
    pub steps: usize,
    /// max over recorded steps of max |p − p_ref|, divided by max |pT − p0|.
    pub param_error: f64,
    /// For each state buffer recorded: max |s − s_ref| / max |s_ref|.
    pub state_errors: Vec<(String, f64)>,
}

impl ReplayReport {
    /// The worst of all errors.
    pub fn worst(&self) -> f64 {
        self.state_errors
            .iter()
            .map(|(_, e)| *e)
            .fold(self.param_error, f64::max)
    }
}

/// Replays `traj` through `stepper` from zero state at the trajectory's start step.
pub fn replay(stepper: &mut dyn TensorStepper, traj: &Trajectory) -> Result<ReplayReport> {
    let layout = &traj.layout;
    if stepper.layout() != layout {
        return Err(Error::argument(
            "trajectory",
            format!(
                "{} is for shape {} with factored axes {:?}, the stepper for {} with {:?}",
                traj.name,
                layout.shape(),
                layout.factored(),
                stepper.layout().shape(),
                stepper.layout().factored()
            ),
        ));
    }
    stepper.set_state(TensorState::zeros(layout, traj.start_step))?;
    let hyper = Hyper {
        lr: traj.lr,
        weight_decay: traj.weight_decay,
    };
    let scale = traj.displacement().max(f64::MIN_POSITIVE);
    let mut param = traj.p0.clone();
    let mut param_error = 0f64;
    for (grad, want) in traj.grads.iter().zip(&traj.params) {
        let clipped;
        let grad = match traj.clip_norm {
            Some(clip_norm) => {
                clipped = clip_global(&[grad.as_slice()], clip_norm)
                    .pop()
                    .expect("one tensor in, one out");
                &clipped
            }
            None => grad,
        };
        stepper.step(&mut param, grad, hyper)?;
        if let Some(want) = want {
            param_error = param_error.max(max_abs_diff(&param, want) / scale);
        }
    }
    let mut state_errors = Vec::new();
    if let Some(want) = &traj.final_state {
        let got = stepper.state()?;
        for (buffer, values) in want.iter() {
            let scale = values
                .iter()
                .fold(0f64, |m, v| m.max(v.abs() as f64))
                .max(f64::MIN_POSITIVE);
            let err = max_abs_diff(got.get(buffer), values) / scale;
            state_errors.push((crate::state::pylo_name(buffer).to_string(), err));
        }
        if got.step != want.step {
            state_errors.push(("step".into(), f64::INFINITY));
        }
    }
    Ok(ReplayReport {
        name: traj.name.clone(),
        steps: traj.grads.len(),
        param_error,
        state_errors,
    })
}

/// ELO's global-norm clipping of one parameter group's gradients (PyLO `ELO_naive`'s
/// `_global_grad_scale`): every gradient times the f32 scalar
/// `clip_norm / max(‖g‖₂ over all of them, clip_norm)`; not applied when that norm is NaN (PyLO's
/// `denom > 0` test fails), nor when the scale is exactly 1. The sum of squares is taken in f64
/// and rounded once (PyTorch's f32 reduction order is not reproducible anyway).
///
/// This lives in the replay driver for now; it moves into the step policy (with
/// `MuloOptimizer`'s per-tensor clipping) when that module exists.
pub fn clip_global(grads: &[&[f32]], clip_norm: f32) -> Vec<Vec<f32>> {
    let total: f64 = grads
        .iter()
        .flat_map(|g| g.iter())
        .map(|&x| {
            let x = x as f64;
            x * x
        })
        .sum();
    let denom = ((total as f32).sqrt()).max(clip_norm);
    // f32::max ignores NaN; PyTorch's clamp keeps it, and then `denom > 0` is false.
    let scale = if denom > 0.0 && !total.is_nan() {
        clip_norm / denom
    } else {
        1.0
    };
    grads
        .iter()
        .map(|g| {
            if scale == 1.0 {
                g.to_vec()
            } else {
                g.iter().map(|&x| x * scale).collect()
            }
        })
        .collect()
}

/// max |a − b| in f64; NaN anywhere counts as infinite.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).fold(0f64, |m, (&x, &y)| {
        let d = (x as f64 - y as f64).abs();
        if d.is_nan() {
            f64::INFINITY
        } else {
            m.max(d)
        }
    })
}
