//! What to do with gradients that hold NaN or ±Inf.
//!
//! PyLO does nothing: NaN spreads into the parameter and into every accumulator, and the
//! optimizer state is lost for good. The original JAX μLO applies `jnp.nan_to_num` to the
//! gradients first. mulo's default is stricter than both: the affected tensor is skipped and
//! the step says so.

use std::fmt;

/// The policy for a tensor whose gradient holds NaN or ±Inf.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NonFinitePolicy {
    /// Leave that tensor unchanged (its parameter and its accumulators) and report it in
    /// [`StepReport::skipped`](super::StepReport::skipped). The other tensors step normally and
    /// the optimizer's step counter advances for all of them (one counter per optimizer, as
    /// PyLO keeps one per parameter group).
    #[default]
    Skip,
    /// Replace NaN by 0, +Inf by `f32::MAX` and −Inf by `f32::MIN` (JAX's `jnp.nan_to_num`,
    /// what the original μLO does) and step; reported in
    /// [`StepReport::sanitized`](super::StepReport::sanitized).
    Zero,
    /// Refuse the step: an error naming every such tensor; nothing changes (no parameter, no
    /// state, not the step counter).
    Error,
}

impl std::str::FromStr for NonFinitePolicy {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "skip" => Ok(NonFinitePolicy::Skip),
            "zero" => Ok(NonFinitePolicy::Zero),
            "error" => Ok(NonFinitePolicy::Error),
            other => Err(crate::Error::argument(
                "nonfinite",
                format!("`{other}` is not a policy; use skip, zero or error"),
            )),
        }
    }
}

/// How many non-finite values a gradient holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NonFiniteCount {
    /// NaN values.
    pub nan: usize,
    /// +Inf values.
    pub pos_inf: usize,
    /// −Inf values.
    pub neg_inf: usize,
}

impl NonFiniteCount {
    /// Counts the non-finite values of `grad`.
    pub fn of(grad: &[f32]) -> Self {
        let mut c = NonFiniteCount::default();
        for &g in grad {
            if !g.is_finite() {
                if g.is_nan() {
                    c.nan += 1;
                } else if g > 0.0 {
                    c.pos_inf += 1;
                } else {
                    c.neg_inf += 1;
                }
            }
        }
        c
    }

    /// Whether every value was finite.
    pub fn is_clean(&self) -> bool {
        self.nan + self.pos_inf + self.neg_inf == 0
    }
}

impl fmt::Display for NonFiniteCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} NaN, {} +Inf, {} -Inf",
            self.nan, self.pos_inf, self.neg_inf
        )
    }
}

/// `jnp.nan_to_num` in place: NaN → 0, +Inf → `f32::MAX`, −Inf → `f32::MIN`.
pub fn nan_to_num(grad: &mut [f32]) {
    for g in grad {
        if g.is_nan() {
            *g = 0.0;
        } else if *g == f32::INFINITY {
            *g = f32::MAX;
        } else if *g == f32::NEG_INFINITY {
            *g = f32::MIN;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_replaces() {
        let mut g = [1.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -2.0];
        let c = NonFiniteCount::of(&g);
        assert_eq!((c.nan, c.pos_inf, c.neg_inf), (1, 1, 1));
        assert!(!c.is_clean());
        nan_to_num(&mut g);
        assert_eq!(g, [1.0, 0.0, f32::MAX, f32::MIN, -2.0]);
        assert!(NonFiniteCount::of(&g).is_clean());
        assert_eq!(
            "zero".parse::<NonFinitePolicy>().unwrap(),
            NonFinitePolicy::Zero
        );
        assert!("ignore".parse::<NonFinitePolicy>().is_err());
    }
}
