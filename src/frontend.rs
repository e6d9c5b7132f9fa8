//! SPEC.md → IR: the μLO_M step written once. Every backend renders what this file builds;
//! this is the only place in mulo that knows what feature 13 is.
//!
//! ELO (docs/SPEC.md, "ELO") is the same step with other constants, selected by
//! [`Rule`]: its decays come in through the meta-parameters, and the two places where the
//! rule itself differs (the gradient's `nan_to_num`, the update) branch on it here, so the
//! features exist once.

use crate::ir::{Buffer, IrBuilder, Matrix, RuntimeScalar, StepIr, Unary, ValueId};
use crate::lopt::{LearnedOptimizer, Rule};
use crate::shape::{Domain, Layout};
use std::collections::HashMap;

/// Number of features per element before the time features (SPEC.md §3.3).
pub const NUM_FEATURES: usize = 28;

/// The time-feature periods T_k (SPEC.md §3.5): τ_k = tanh(t / T_k − 1).
pub const TIME_PERIODS: [f64; 11] = [
    1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0, 30000.0, 100000.0,
];

/// Epsilons of SPEC.md §3, named after where they are used.
mod eps {
    /// q = g² + 1e-30, the quantity the Adafactor accumulators average.
    pub const Q: f64 = 1e-30;
    /// Row-mean denominator and the clamp of the Adafactor scales.
    pub const ADAFACTOR: f64 = 1e-9;
    /// Inside rsqrt(V + ·) and the unfactored fm = M · (F + ·)^-1/2.
    pub const RMS: f64 = 1e-6;
    /// Inside rsqrt(R + ·), rsqrt(C + ·), rsqrt(F + ·) of features 19–24.
    pub const FACTOR_RSQRT: f64 = 1e-8;
    /// Normalization: f · rsqrt(1e-5 + mean(f²)).
    pub const NORM: f64 = 1e-5;
}

/// Builds the (unoptimized) IR of one step of `lopt` for `layout`.
pub fn build_step(layout: &Layout, lopt: &LearnedOptimizer) -> StepIr {
    let mut b = IrBuilder::new(layout.clone(), lopt.fingerprint());
    let meta = &lopt.meta;

    // §3.1 accumulators. (1 − β) is formed in f32, as the reference does.
    let loaded = b.load(Buffer::Grad, 0);
    let g = match meta.rule {
        Rule::Mulo => loaded,
        // ELO sanitizes inside the step (NaN → 0, ±∞ → ±f32::MAX), so a NaN entry zeroes that
        // entry's gradient instead of the whole tensor being skipped.
        Rule::Elo => b.unary(Unary::NanToNum, loaded),
    };
    b.note(g, "g");
    let p = b.load(Buffer::Param, 0);
    b.note(p, "P (before the step)");
    let g2 = b.unary(Unary::Square, g);
    let q = b.add_const(g2, eps::Q);
    b.note(q, "q = g² + 1e-30");

    let decayed = |b: &mut IrBuilder, buffer: Buffer, lane: u32, beta: f32, x: ValueId| {
        let old = b.load(buffer, lane);
        let beta_c = b.constant_f32(beta);
        let one_minus = b.constant_f32(1.0 - beta);
        let kept = b.mul(beta_c, old);
        let added = b.mul(one_minus, x);
        let new = b.add(kept, added);
        b.store(buffer, lane, new);
        new
    };

    let momenta: Vec<ValueId> = (0..3)
        .map(|i| {
            let m = decayed(&mut b, Buffer::Mom, i as u32, meta.momentum_decays[i], g);
            b.note(m, format!("M_{}", i + 1))
        })
        .collect();
    let v = decayed(&mut b, Buffer::Rms, 0, meta.rms_decay, g2);
    b.note(v, "V");

    // §3.2 Adafactor: accumulators, scales fg = g·scale, fm = M·scale, and features 13–24.
    let mut fg = Vec::new();
    let mut fm = Vec::new();
    let mut first_factors = Vec::new(); // features 13–15
    let mut second_factors = Vec::new(); // features 16–18
    let mut first_rsqrt = Vec::new(); // features 19–21
    let mut second_rsqrt = Vec::new(); // features 22–24
    if layout.factored().is_some() {
        let q_row = b.mean(q, Domain::Row);
        b.note(q_row, "mean of q over d0");
        let q_col = b.mean(q, Domain::Col);
        b.note(q_col, "mean of q over d1");
        for (i, (&beta, &momentum)) in meta.adafactor_decays.iter().zip(&momenta).enumerate() {
            let r = decayed(&mut b, Buffer::FacRow, i as u32, beta, q_row);
            b.note(r, format!("R_{}", i + 1));
            let c = decayed(&mut b, Buffer::FacCol, i as u32, beta, q_col);
            b.note(c, format!("C_{}", i + 1));
            let r_mean = b.mean(r, Domain::Rest);
            b.note(r_mean, format!("r̄_{}: mean of R_{} over d1", i + 1, i + 1));
            let denom = b.add_const(r_mean, eps::ADAFACTOR);
            let ratio = b.div(r, denom);
            let clamped = b.max_const(ratio, eps::ADAFACTOR);
            let row = b.rsqrt(clamped);
            b.note(row, format!("row_{}", i + 1));
            let c_clamped = b.max_const(c, eps::ADAFACTOR);
            let col = b.rsqrt(c_clamped);
            b.note(col, format!("col_{}", i + 1));
            let g_row = b.mul(g, row);
            fg.push(b.mul(g_row, col));
            let m_row = b.mul(momentum, row);
            fm.push(b.mul(m_row, col));
            first_factors.push(r);
            second_factors.push(c);
            let r_eps = b.add_const(r, eps::FACTOR_RSQRT);
            first_rsqrt.push(b.rsqrt(r_eps));
            let c_eps = b.add_const(c, eps::FACTOR_RSQRT);
            second_rsqrt.push(b.rsqrt(c_eps));
        }
    } else {
        for (i, (&beta, &momentum)) in meta.adafactor_decays.iter().zip(&momenta).enumerate() {
            let f = decayed(&mut b, Buffer::FacV, i as u32, beta, q);
            b.note(f, format!("F_{}", i + 1));
            // The two epsilons differ on purpose: that is what the reference does.
            let f_eps = b.add_const(f, eps::ADAFACTOR);
            let f_clamped = b.max_const(f_eps, eps::ADAFACTOR);
            let scale_g = b.rsqrt(f_clamped);
            fg.push(b.mul(g, scale_g));
            let f_rms = b.add_const(f, eps::RMS);
            let scale_m = b.rsqrt(f_rms);
            fm.push(b.mul(momentum, scale_m));
            first_factors.push(f);
            second_factors.push(f);
            let f_rs = b.add_const(f, eps::FACTOR_RSQRT);
            let rs = b.rsqrt(f_rs);
            first_rsqrt.push(rs);
            second_rsqrt.push(rs);
        }
    }

    // §3.3 the 28 features, in order.
    let v_eps = b.add_const(v, eps::RMS);
    let inv_rms = b.rsqrt(v_eps);
    let m_over_rms: Vec<ValueId> = momenta.iter().map(|&m| b.mul(m, inv_rms)).collect();
    let features: Vec<ValueId> = std::iter::empty()
        .chain([g, p]) // 0, 1
        .chain(momenta.iter().copied()) // 2, 3, 4
        .chain([v]) // 5
        .chain(m_over_rms) // 6, 7, 8
        .chain([inv_rms]) // 9
        .chain(fg) // 10, 11, 12
        .chain(first_factors) // 13, 14, 15
        .chain(second_factors) // 16, 17, 18
        .chain(first_rsqrt) // 19, 20, 21
        .chain(second_rsqrt) // 22, 23, 24
        .chain(fm) // 25, 26, 27
        .collect();
    debug_assert_eq!(features.len(), NUM_FEATURES);

    // §3.4 normalization over the tensor. A broadcast feature's mean over the tensor is its
    // mean over its own domain, so `mean(…, Step)` of it is taken where it lives.
    let mut mean_squares: HashMap<ValueId, ValueId> = HashMap::new();
    let mut mean_square = |b: &mut IrBuilder, j: usize, f: ValueId| -> ValueId {
        *mean_squares.entry(f).or_insert_with(|| {
            let f2 = b.unary(Unary::Square, f);
            let ms = b.mean(f2, Domain::Step);
            b.note(ms, format!("mean of feature {j}²"))
        })
    };
    let mut inputs = Vec::with_capacity(NUM_FEATURES + TIME_PERIODS.len());
    if layout.is_scalar() {
        // A 0-d tensor: PyLO reduces over an empty axis list, which PyTorch reads as every
        // axis, feature axis included, so all 28 features share one statistic
        // (1/28)·Σ_j f_j². A feature that appears twice (unfactored 13–18, 19–24) counts twice.
        let squares: Vec<ValueId> = features
            .iter()
            .enumerate()
            .map(|(j, &f)| mean_square(&mut b, j, f))
            .collect();
        let sum = squares[1..]
            .iter()
            .fold(squares[0], |acc, &ms| b.add(acc, ms));
        let count = b.constant(NUM_FEATURES as f64);
        let ms = b.div(sum, count);
        b.note(ms, "mean of all 28 features² (0-d tensor)");
        let ms_eps = b.add_const(ms, eps::NORM);
        let norm = b.rsqrt(ms_eps);
        for (j, &f) in features.iter().enumerate() {
            let fhat = b.mul(f, norm);
            b.note(fhat, format!("normalized feature {j}"));
            inputs.push(fhat);
        }
    } else {
        let mut normalized: HashMap<ValueId, ValueId> = HashMap::new();
        for (j, &f) in features.iter().enumerate() {
            let fhat = match normalized.get(&f) {
                Some(&fhat) => fhat,
                None => {
                    let ms = mean_square(&mut b, j, f);
                    let ms_eps = b.add_const(ms, eps::NORM);
                    let norm = b.rsqrt(ms_eps);
                    let fhat = b.mul(f, norm);
                    normalized.insert(f, fhat);
                    fhat
                }
            };
            b.note(fhat, format!("normalized feature {j}"));
            inputs.push(fhat);
        }
    }

    // §3.5 time features.
    let t = b.scalar(RuntimeScalar::StepCount);
    let one = b.constant(1.0);
    for (k, &period) in TIME_PERIODS.iter().enumerate() {
        let period = b.constant(period);
        let ratio = b.div(t, period);
        let shifted = b.sub(ratio, one);
        let tau = b.unary(Unary::Tanh, shifted);
        b.note(
            tau,
            format!("time feature {k} = tanh(t/{} - 1)", TIME_PERIODS[k]),
        );
        inputs.push(tau);
    }

    // §3.6 MLP with the weights as constants.
    let mut x = b.pack(inputs);
    b.note(x, "MLP input (28 normalized features, 11 time features)");
    let layers = &lopt.network.layers;
    for (k, layer) in layers.iter().enumerate() {
        let label = match k {
            0 => "input layer".to_string(),
            _ if k + 1 == layers.len() => "output layer".to_string(),
            _ => format!("hidden layer linear_{}", k - 1),
        };
        let m = b.matrix(Matrix {
            rows: layer.outputs,
            cols: layer.inputs,
            weight: layer.weight.clone(),
            bias: Some(layer.bias.clone()),
            label,
        });
        x = b.dense(m, x);
        if k + 1 < layers.len() {
            x = b.unary(Unary::Relu, x);
        }
    }

    // §3.7 update. μLO_M: u = d · exp(m · exp_mult) · step_mult; P ← P − lr·u; P ← P − lr·wd·P.
    // ELO: P ← P − lr·(d · exp(m · exp_mult) + wd·P), P from before the step, no step_mult.
    let direction = b.lane(x, 0);
    b.note(direction, "direction d");
    let magnitude = b.lane(x, 1);
    b.note(magnitude, "magnitude m");
    let exp_mult = b.constant_f32(meta.exp_mult);
    let scaled = b.mul(magnitude, exp_mult);
    let e = b.unary(Unary::Exp, scaled);
    let de = b.mul(direction, e);
    // The nodes are created in the order they always were, so μLO_M's IR text is unchanged.
    let p2 = match meta.rule {
        Rule::Mulo => {
            let step_mult = b.constant_f32(meta.step_mult);
            let u = b.mul(de, step_mult);
            b.note(u, "update u");
            let lr = b.scalar(RuntimeScalar::Lr);
            let wd = b.scalar(RuntimeScalar::WeightDecay);
            let lr_u = b.mul(lr, u);
            let p1 = b.sub(p, lr_u);
            let lr_wd = b.mul(lr, wd);
            let decay = b.mul(lr_wd, p1);
            b.sub(p1, decay)
        }
        Rule::Elo => {
            b.note(de, "update u (ELO: no step_mult)");
            let lr = b.scalar(RuntimeScalar::Lr);
            let wd = b.scalar(RuntimeScalar::WeightDecay);
            let wd_p = b.mul(wd, p);
            let u = b.add(de, wd_p);
            b.note(u, "u + wd·P (ELO)");
            let lr_u = b.mul(lr, u);
            b.sub(p, lr_u)
        }
    };
    b.note(p2, "P after the step");
    b.store(Buffer::Param, 0, p2);
    b.finish()
}
