//! μP learning rates (SPEC.md §4), as mup's `MuAdam`-style parameter groups give them to
//! `MuLO_naive`.
//!
//! A dimension of a tensor is *infinite* when its size differs from the same dimension of the
//! base model's tensor (mup's `set_base_shapes`). A tensor with exactly two infinite dimensions
//! (a hidden weight matrix: mup's `ninf() == 2`) is stepped with `lr / width_mult`, where
//! `width_mult` is the size of its *last* infinite dimension over that dimension's size in the
//! base (the fan-in of a `Linear` or convolution weight). More than two infinite dimensions is
//! an error (mup raises `NotImplementedError`); every other tensor (biases, input and output
//! layers, vectors) keeps `lr`. Only `lr` is scaled: weight decay is then applied with the
//! scaled lr, `P ← P − lr_scaled·wd·P`, because the scaled lr is what the step receives.

use crate::error::{Error, Result};
use crate::shape::Shape;

/// How a tensor's learning rate relates to the optimizer's `lr`.
#[derive(Clone, Debug, PartialEq)]
pub enum LrScale {
    /// `lr` unchanged (no μP).
    Unscaled,
    /// μP from the base model's shape of this tensor: `lr / width_mult` when two dimensions
    /// differ from the base, `lr` when fewer do, an error when more do.
    BaseShape(Shape),
    /// An explicit multiplier: the tensor is stepped with `lr · multiplier` (for example
    /// `1 / width_mult` computed elsewhere).
    Multiplier(f64),
}

/// What μP makes of one tensor: how many dimensions are infinite and the resulting scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MupInfo {
    /// Number of dimensions whose size differs from the base shape (mup's `ninf()`).
    pub ninf: usize,
    /// mup's `width_mult()`: (size / base size) of the last infinite dimension, 1 if none.
    pub width_mult: f64,
}

impl MupInfo {
    /// Compares `shape` with its `base` (same rank required). `name` names the tensor in errors.
    pub fn new(name: &str, shape: &Shape, base: &Shape) -> Result<Self> {
        let (dims, base_dims) = (shape.dims(), base.dims());
        if dims.len() != base_dims.len() {
            return Err(Error::argument(
                name,
                format!(
                    "μP base shape {base} has rank {} but the tensor's shape {shape} has rank {}",
                    base_dims.len(),
                    dims.len()
                ),
            ));
        }
        let infinite: Vec<usize> = (0..dims.len())
            .filter(|&axis| dims[axis] != base_dims[axis])
            .collect();
        let width_mult = match infinite.last() {
            Some(&axis) => dims[axis] as f64 / base_dims[axis] as f64,
            None => 1.0,
        };
        Ok(MupInfo {
            ninf: infinite.len(),
            width_mult,
        })
    }

    /// The factor the tensor's lr is divided by: `width_mult` for a matrix-like tensor
    /// (`ninf == 2`), 1 otherwise; an error naming the tensor when `ninf > 2`.
    pub fn lr_divisor(&self, name: &str) -> Result<f64> {
        match self.ninf {
            0 | 1 => Ok(1.0),
            2 => Ok(self.width_mult),
            n => Err(Error::argument(
                name,
                format!(
                    "μP: {n} dimensions differ from the base shape; mup supports at most 2 \
                     (a tensor with more than two infinite dimensions has no μP learning rate)"
                ),
            )),
        }
    }
}

/// A resolved per-tensor learning-rate rule: `lr_scaled = lr · multiplier` or
/// `lr_scaled = lr / divisor`, computed in f64 and rounded to f32 once.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LrRule {
    /// `lr · m`.
    Multiply(f64),
    /// `lr / d` (mup's `group['lr'] /= width_mult`).
    Divide(f64),
}

impl LrRule {
    /// Resolves `scale` for the tensor `name` of shape `shape`.
    pub fn resolve(name: &str, shape: &Shape, scale: &LrScale) -> Result<Self> {
        match scale {
            LrScale::Unscaled => Ok(LrRule::Multiply(1.0)),
            LrScale::BaseShape(base) => Ok(LrRule::Divide(
                MupInfo::new(name, shape, base)?.lr_divisor(name)?,
            )),
            LrScale::Multiplier(m) => {
                if !m.is_finite() || *m < 0.0 {
                    return Err(Error::argument(
                        name,
                        format!("lr multiplier {m} must be a finite number ≥ 0"),
                    ));
                }
                Ok(LrRule::Multiply(*m))
            }
        }
    }

    /// The learning rate the tensor is stepped with.
    pub fn apply(&self, lr: f32) -> f32 {
        match *self {
            LrRule::Multiply(m) => (lr as f64 * m) as f32,
            LrRule::Divide(d) => (lr as f64 / d) as f32,
        }
    }

    /// The effective multiplier of `lr` (for reports).
    pub fn multiplier(&self) -> f64 {
        match *self {
            LrRule::Multiply(m) => m,
            LrRule::Divide(d) => 1.0 / d,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(d: &[usize]) -> Shape {
        Shape::new(d.to_vec()).unwrap()
    }

    #[test]
    fn ninf_and_width_mult_follow_mup() {
        // Hidden [256, 128] over base [64, 32]: both infinite, last one is fan-in 128 / 32.
        let i = MupInfo::new("h", &s(&[256, 128]), &s(&[64, 32])).unwrap();
        assert_eq!((i.ninf, i.width_mult), (2, 4.0));
        assert_eq!(i.lr_divisor("h").unwrap(), 4.0);
        // Input [256, 10] over [64, 10]: one infinite dimension: lr unchanged.
        let i = MupInfo::new("in", &s(&[256, 10]), &s(&[64, 10])).unwrap();
        assert_eq!((i.ninf, i.width_mult), (1, 4.0));
        assert_eq!(i.lr_divisor("in").unwrap(), 1.0);
        // Conv [64, 32, 3, 3] over [16, 16, 3, 3]: fan-in is dimension 1: 32 / 16.
        let i = MupInfo::new("c", &s(&[64, 32, 3, 3]), &s(&[16, 16, 3, 3])).unwrap();
        assert_eq!(i.lr_divisor("c").unwrap(), 2.0);
        let err = MupInfo::new("x", &s(&[4, 4, 4]), &s(&[2, 2, 2]))
            .unwrap()
            .lr_divisor("x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`x`") && err.contains("3 dimensions"), "{err}");
        let err = MupInfo::new("r", &s(&[4, 4]), &s(&[4]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`r`") && err.contains("rank"), "{err}");
    }
}
