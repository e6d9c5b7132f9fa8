//! Meta-parameters of μLO_M that are not stored in the weights file (SPEC.md §1).

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Which learned optimizer's step the meta-network drives: the features are the same, the
/// constants and the update rule differ (docs/SPEC.md, "ELO").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rule {
    /// μLO_M / AdafacLO: `p ← p − lr·step_mult·d·exp(exp_mult·m)`, then `p ← p − lr·wd·p`.
    #[default]
    Mulo,
    /// ELO (PyLO's `ELO_naive`): the gradient goes through `nan_to_num` inside the step, and
    /// `p ← p − lr·(d·exp(exp_mult·m) + wd·p)` with `p` from before the step (no `step_mult`).
    Elo,
}

impl Rule {
    /// The name used on the command line and in file metadata (`mulo`, `elo`).
    pub fn name(self) -> &'static str {
        match self {
            Rule::Mulo => "mulo",
            Rule::Elo => "elo",
        }
    }

    /// The Hub key of the rule's trained weights, loaded when `--weights` is not given.
    pub fn hub_key(self) -> &'static str {
        match self {
            Rule::Mulo => super::DEFAULT_HUB_KEY,
            Rule::Elo => super::ELO_HUB_KEY,
        }
    }

    /// Whether this is μLO_M's rule (the default, left out of serialized meta-parameters so
    /// that μLO_M's fingerprint, and with it every μLO_M program, stays as it was).
    pub fn is_mulo(&self) -> bool {
        *self == Rule::Mulo
    }
}

impl std::str::FromStr for Rule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "mulo" => Ok(Rule::Mulo),
            "elo" => Ok(Rule::Elo),
            other => Err(format!(
                "unknown learned optimizer `{other}` (expected `mulo` or `elo`)"
            )),
        }
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The decays and output scales of the learned optimizer.
///
/// Defaults are μLO_M's. The decays are the normative f32 values of SPEC.md §1 (the
/// reference computes `clip(1 − exp(10·(ln(1 − init)/10 + offset)), 0, 1)` in f32; those
/// results are stored here bit for bit, so no libm differences can creep in).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetaParams {
    /// Scale of the magnitude output inside the exponential.
    pub exp_mult: f32,
    /// Overall step scale.
    pub step_mult: f32,
    /// β_m1..β_m3, the momentum decays.
    pub momentum_decays: [f32; 3],
    /// β_v, the second-moment decay.
    pub rms_decay: f32,
    /// β_f1..β_f3, the Adafactor accumulator decays.
    pub adafactor_decays: [f32; 3],
    /// Which update rule the step uses (μLO_M's unless set).
    #[serde(skip_serializing_if = "Rule::is_mulo")]
    pub rule: Rule,
}

impl Default for MetaParams {
    fn default() -> Self {
        MetaParams {
            exp_mult: 0.001,
            step_mult: 0.01,
            momentum_decays: [
                f32::from_bits(0x3f0a_c24d),
                f32::from_bits(0x3f75_5c6a),
                f32::from_bits(0x3f7f_7e79),
            ],
            rms_decay: f32::from_bits(0x3f7f_b6fe),
            adafactor_decays: [
                f32::from_bits(0x3eb6_623a),
                f32::from_bits(0x3f7f_22e0),
                f32::from_bits(0x3f7f_dcb2),
            ],
            rule: Rule::Mulo,
        }
    }
}

impl MetaParams {
    /// ELO's meta-parameters (PyLO `ELO_naive`'s defaults): the raw decays, used as they are,
    /// `exp_mult` 0.001. `step_mult` is 1 and unused: ELO's update has none (`lr` plays its part).
    pub fn elo() -> Self {
        MetaParams {
            exp_mult: 0.001,
            step_mult: 1.0,
            momentum_decays: [0.9, 0.99, 0.999],
            rms_decay: 0.999,
            adafactor_decays: [0.9, 0.99, 0.999],
            rule: Rule::Elo,
        }
    }

    /// The default meta-parameters of `rule`.
    pub fn for_rule(rule: Rule) -> Self {
        match rule {
            Rule::Mulo => Self::default(),
            Rule::Elo => Self::elo(),
        }
    }

    /// Reads overrides from a JSON file; fields left out keep μLO_M's values.
    ///
    /// ```json
    /// {"exp_mult": 0.001, "step_mult": 0.01, "momentum_decays": [0.5, 0.9, 0.99]}
    /// ```
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let meta: MetaParams = serde_json::from_str(&text)
            .map_err(|e| Error::bad_file_from(path, "not valid meta-parameter JSON", e))?;
        meta.validate()
            .map_err(|reason| Error::bad_file(path, reason))?;
        Ok(meta)
    }

    /// Checks that every decay is in [0, 1] and every scale finite.
    pub fn validate(&self) -> Result<(), String> {
        let decays = self
            .momentum_decays
            .iter()
            .map(|d| ("momentum_decays", *d))
            .chain(std::iter::once(("rms_decay", self.rms_decay)))
            .chain(
                self.adafactor_decays
                    .iter()
                    .map(|d| ("adafactor_decays", *d)),
            );
        for (name, d) in decays {
            if !(0.0..=1.0).contains(&d) {
                return Err(format!("`{name}` holds {d}, outside [0, 1]"));
            }
        }
        for (name, v) in [("exp_mult", self.exp_mult), ("step_mult", self.step_mult)] {
            if !v.is_finite() {
                return Err(format!("`{name}` is {v}, not a finite number"));
            }
        }
        Ok(())
    }

    /// The decay in μLO's parameterization, computed in f32 as the reference does:
    /// `clip(1 − exp(10·(ln(1 − init)/10 + offset)), 0, 1)`.
    pub fn decay_from_init_offset(init: f32, offset: f32) -> f32 {
        (1.0 - (10.0 * ((1.0 - init).ln() / 10.0 + offset)).exp()).clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normative_decays_match_the_formula_to_the_last_bits() {
        let m = MetaParams::default();
        let inits = [0.9f32, 0.99, 0.999];
        let mom_off = [0.152_163_92f32, 0.142_452_12, 0.068_129_63];
        let fac_off = [0.186_218_96f32, -0.108_646_15, -0.061_855_47];
        for i in 0..3 {
            let a = MetaParams::decay_from_init_offset(inits[i], mom_off[i]);
            let b = MetaParams::decay_from_init_offset(inits[i], fac_off[i]);
            assert!(
                (a - m.momentum_decays[i]).abs() <= 4.0 * f32::EPSILON,
                "{a}"
            );
            assert!(
                (b - m.adafactor_decays[i]).abs() <= 4.0 * f32::EPSILON,
                "{b}"
            );
        }
        let v = MetaParams::decay_from_init_offset(0.999, 0.010_797_06);
        assert!((v - m.rms_decay).abs() <= 4.0 * f32::EPSILON);
    }

    #[test]
    fn json_overrides_only_named_fields() {
        let dir = std::env::temp_dir().join(format!("mulo-meta-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("meta.json");
        std::fs::write(&path, r#"{"step_mult": 0.5}"#).unwrap();
        let m = MetaParams::from_json_file(&path).unwrap();
        assert_eq!(m.step_mult, 0.5);
        assert_eq!(m.exp_mult, 0.001);
        std::fs::write(&path, r#"{"rms_decay": 1.5}"#).unwrap();
        let err = MetaParams::from_json_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("meta.json") && err.contains("rms_decay"),
            "{err}"
        );
        std::fs::write(&path, r#"{"stepmult": 0.5}"#).unwrap();
        let err = MetaParams::from_json_file(&path).unwrap_err().to_string();
        assert!(err.contains("stepmult"), "{err}");
    }
}
