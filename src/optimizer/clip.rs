//! Gradient clipping by L2 norm, with `torch.nn.utils.clip_grad_norm_`'s rule: with
//! `norm` the L2 norm of the gradient(s), `coef = max_norm / (norm + 1e-6)`; if `coef < 1`
//! every value is multiplied by `coef`. PyLO applies it to each tensor on its own
//! (`max_grad_norm`); the global variant uses the norm over all tensors together.
//!
//! Norms are accumulated in f64, so neither a long sum nor large values lose precision or
//! overflow. The caller's gradients are never modified: clipping works on copies.

/// The epsilon added to the norm before dividing (PyTorch's).
pub const CLIP_EPS: f64 = 1e-6;

/// Σ g² in f64.
pub fn sum_squares(grad: &[f32]) -> f64 {
    grad.iter().map(|&g| (g as f64) * (g as f64)).sum()
}

/// The L2 norm of `grad`, in f64.
pub fn l2_norm(grad: &[f32]) -> f64 {
    sum_squares(grad).sqrt()
}

/// The factor a gradient of L2 norm `norm` is multiplied by to bring it to at most
/// `max_norm`, or `None` when it is already small enough (`coef ≥ 1`).
pub fn clip_coef(norm: f64, max_norm: f32) -> Option<f32> {
    let coef = max_norm as f64 / (norm + CLIP_EPS);
    (coef < 1.0).then_some(coef as f32)
}

/// Multiplies every value by `coef` (f32 arithmetic, as PyTorch's `mul_`).
pub fn scale(grad: &mut [f32], coef: f32) {
    for g in grad {
        *g *= coef;
    }
}

/// Validates a clipping threshold (`name` is the option's name).
pub fn check_max_norm(name: &str, max_norm: Option<f32>) -> crate::Result<()> {
    match max_norm {
        Some(m) if !(m.is_finite() && m > 0.0) => Err(crate::Error::argument(
            name,
            format!("{m} must be a finite number > 0"),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clips_only_above_the_threshold() {
        let g = [3.0f32, 4.0];
        assert_eq!(l2_norm(&g), 5.0);
        assert_eq!(clip_coef(5.0, 10.0), None);
        let coef = clip_coef(5.0, 1.0).unwrap();
        assert_eq!(coef, (1.0 / (5.0 + 1e-6)) as f32);
        let mut c = g;
        scale(&mut c, coef);
        assert!((l2_norm(&c) - 1.0).abs() < 1e-6);
        assert!(check_max_norm("max_grad_norm", Some(0.0)).is_err());
        assert!(check_max_norm("max_grad_norm", Some(f32::NAN)).is_err());
        assert!(check_max_norm("max_grad_norm", None).is_ok());
    }
}
