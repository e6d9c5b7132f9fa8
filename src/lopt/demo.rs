//! The bundled DEMO meta-network: μLO_M's architecture (39 → 32 → 32 → 2) with weights built
//! by hand, so that a fresh machine without the Hub weights still has an optimizer that
//! optimizes. It is NOT the trained μLO_M.
//!
//! Its rule: direction = the normalized momentum-over-RMS feature `M_2 · rsqrt(V + 1e-6)`
//! (feature 7, an Adam-like signal with β₁ ≈ 0.958), magnitude = 0. A ReLU network cannot
//! pass a signed value through directly, so the feature travels as the ReLU pair
//! `relu(x) − relu(−x) = x`. The update is then `lr · step_mult · f̂_7`.

use super::network::{Dense, MetaNetwork, INPUT_SIZE, OUTPUT_SIZE};

/// Index of the feature the demo network follows (`M_2 · rsqrt(V + 1e-6)`, SPEC.md §3).
pub const DEMO_FEATURE: usize = 7;

/// Hidden width of the demo network (μLO_M's).
pub const DEMO_HIDDEN: usize = 32;

/// The demo network, constructed in code (the shipped `assets/demo-mulo/` is this, saved).
pub fn demo_network() -> MetaNetwork {
    let h = DEMO_HIDDEN;
    let mut input = zeros(h, INPUT_SIZE);
    input.weight[DEMO_FEATURE] = 1.0; // unit 0 = relu(x)
    input.weight[INPUT_SIZE + DEMO_FEATURE] = -1.0; // unit 1 = relu(-x)
    let mut hidden = zeros(h, h);
    hidden.weight[0] = 1.0; // relu(relu(x)) = relu(x)
    hidden.weight[h + 1] = 1.0;
    let mut output = zeros(OUTPUT_SIZE, h);
    output.weight[0] = 1.0; // direction = relu(x) - relu(-x) = x
    output.weight[1] = -1.0;
    MetaNetwork {
        layers: vec![input, hidden, output],
    }
}

fn zeros(outputs: usize, inputs: usize) -> Dense {
    Dense {
        outputs,
        inputs,
        weight: vec![0.0; outputs * inputs],
        bias: vec![0.0; outputs],
    }
}
