//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod emulation;
pub mod model;
pub mod packed_program;

use mulo::lopt::LearnedOptimizer;
use std::path::PathBuf;

/// `tests/fixtures/golden`: the golden trajectories copied from `../shared/golden` (all but
/// `mat_512x256`) and their fixture meta-network.
pub fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden")
}

/// The fixture meta-network the golden trajectories were recorded with.
pub fn fixture_lopt() -> LearnedOptimizer {
    LearnedOptimizer::from_dir(&golden_dir().join("weights")).expect("fixture weights load")
}

/// Every golden case file, sorted.
pub fn golden_cases() -> Vec<PathBuf> {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(golden_dir())
        .expect("fixtures present")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    cases.sort();
    assert!(
        cases.len() >= 8,
        "expected the 8 golden cases, found {}",
        cases.len()
    );
    cases
}

/// Whether libnvrtc can be loaded; without it the test is skipped with the reason, except in
/// CI (`CI=true`), which installs libnvrtc and must therefore never skip these tests.
pub fn nvrtc_or_skip(test: &str) -> bool {
    use mulo::backend::cuda::nvrtc;
    if nvrtc::nvrtc_available() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test}: libnvrtc is missing under CI, which installs it (scripts/setup): {}",
        nvrtc::NVRTC_HELP
    );
    eprintln!("SKIPPED {test}: {}", nvrtc::NVRTC_HELP);
    false
}

/// A fresh temporary directory for one test.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mulo-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A deterministic pseudo-random generator (xorshift), so tests need no extra crate.
pub struct Rng(pub u64);

impl Rng {
    /// Uniform in [-1, 1).
    pub fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }

    /// `n` values with mixed scales, like the golden gradients (1e-3 to 1).
    pub fn gradient(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| self.next_f32() * [1e-3, 1e-2, 0.1, 1.0][i % 4])
            .collect()
    }
}

/// `n` values with magnitudes spread over three decades and an outlier now and then,
/// different for every `(seed, step)`: parameters and gradients for property tests.
pub fn spread_values(n: usize, seed: u64, step: usize) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(step as u64 + 1);
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 11) as f64 / (1u64 << 53) as f64;
            let scale = 10f64.powf(-3.0 + 3.0 * ((i * 7 + step) % 11) as f64 / 10.0);
            let outlier = if (i + step).is_multiple_of(97) {
                30.0
            } else {
                1.0
            };
            ((u * 2.0 - 1.0) * scale * outlier) as f32
        })
        .collect()
}

/// Asserts a golden replay is within the tolerance of golden/README.md (parameters and final
/// state) and that the final state was checked at all; `context` names the backend or variant.
pub fn assert_within_golden_tolerance(report: &mulo::trajectory::ReplayReport, context: &str) {
    assert!(
        report.worst() <= mulo::trajectory::DEFAULT_TOLERANCE,
        "{} ({context}): param error {:e}, state errors {:?}",
        report.name,
        report.param_error,
        report.state_errors
    );
    assert!(
        !report.state_errors.is_empty(),
        "{} ({context}): no state checked",
        report.name
    );
}

/// Replays every golden trajectory at once through `backend`, built for their shapes in the
/// order given (one tensor per case, each with its own lr, weight decay, start step and
/// length): the whole-model form of [`mulo::trajectory::replay`]. Returns, per case, its name,
/// the parameter error and the final-state error (both relative, as in `replay`), and the
/// number of steps.
pub fn replay_all_at_once(
    backend: &mut dyn mulo::backend::ModelBackend,
    trajs: &[mulo::trajectory::Trajectory],
) -> (Vec<(String, f64, f64)>, usize) {
    use mulo::backend::Hyper;
    use mulo::backend::TensorStep;
    use mulo::state::TensorState;
    use mulo::trajectory::max_abs_diff;
    for (i, t) in trajs.iter().enumerate() {
        backend
            .set_state(i, TensorState::zeros(&t.layout, t.start_step))
            .unwrap();
    }
    let mut params: Vec<Vec<f32>> = trajs.iter().map(|t| t.p0.clone()).collect();
    let mut errors = vec![0f64; trajs.len()];
    let steps = trajs.iter().map(|t| t.grads.len()).max().unwrap_or(0);
    for k in 0..steps {
        let mut batch: Vec<TensorStep<'_>> = params
            .iter_mut()
            .zip(trajs)
            .enumerate()
            .filter(|(_, (_, t))| k < t.grads.len())
            .map(|(i, (p, t))| TensorStep {
                index: i,
                param: p.as_mut_slice(),
                grad: &t.grads[k],
                hyper: Hyper {
                    lr: t.lr,
                    weight_decay: t.weight_decay,
                },
            })
            .collect();
        backend.step(&mut batch).unwrap();
        for (i, t) in trajs.iter().enumerate() {
            if let Some(Some(want)) = t.params.get(k) {
                let scale = t.displacement().max(f64::MIN_POSITIVE);
                errors[i] = errors[i].max(max_abs_diff(&params[i], want) / scale);
            }
        }
    }
    let report = trajs
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let want = t
                .final_state
                .as_ref()
                .expect("golden cases record the final state");
            let got = backend.state(i).unwrap();
            assert_eq!(got.step, want.step, "{}: step counter", t.name);
            (t.name.clone(), errors[i], relative_state_error(&got, want))
        })
        .collect();
    (report, steps)
}

/// max over state buffers of max |got − want| / max |want|.
pub fn relative_state_error(
    got: &mulo::state::TensorState,
    want: &mulo::state::TensorState,
) -> f64 {
    want.iter()
        .map(|(b, values)| {
            let scale = values
                .iter()
                .fold(0f64, |m, v| m.max(v.abs() as f64))
                .max(f64::MIN_POSITIVE);
            mulo::trajectory::max_abs_diff(got.get(b), values) / scale
        })
        .fold(0f64, f64::max)
}

/// torch.chunk's split of `total` rows over `ranks` (FSDP2's): ceil-sized, the last ones
/// smaller or empty.
pub fn chunk_sizes(total: usize, ranks: usize) -> Vec<usize> {
    let size = total.div_ceil(ranks);
    (0..ranks)
        .map(|r| total.saturating_sub(r * size).min(size))
        .collect()
}

/// The rows of axis 0 that rank `r` of `ranks` holds of a tensor of `layout`, split as
/// [`chunk_sizes`] does (`None` for a 0-d tensor: stepped whole on every rank).
pub fn chunk_shard(
    layout: &mulo::shape::Layout,
    ranks: usize,
    r: usize,
) -> Option<mulo::shard::RowShard> {
    if layout.is_scalar() {
        return None;
    }
    let sizes = chunk_sizes(layout.dims()[0], ranks);
    Some(mulo::shard::RowShard {
        offset: sizes[..r].iter().sum(),
        rows: sizes[r],
    })
}

/// The part of a whole-tensor buffer (`values`, one lane after the other over `domain_len`
/// points of `buffer`'s domain) that a shard holds: the shard's rows of each lane where the
/// domain keeps axis 0, everything otherwise.
pub fn local_part(
    layout: &mulo::shape::Layout,
    buffer: mulo::ir::Buffer,
    shard: Option<mulo::shard::RowShard>,
    values: &[f32],
) -> Vec<f32> {
    let Some(s) = shard else {
        return values.to_vec();
    };
    let d = buffer.domain();
    if !layout.domain_axes(d).contains(&0) {
        return values.to_vec();
    }
    let lane_len = layout.domain_len(d);
    let row = lane_len / layout.dims()[0];
    values
        .chunks_exact(lane_len)
        .flat_map(|lane| lane[s.offset * row..(s.offset + s.rows) * row].to_vec())
        .collect()
}

/// Random shapes for the emulation property tests: 0-d, 1-d below `n1`, 2-d below `n2` per
/// axis, rank 3 and 4 below `n4` per axis (dimensions of 1 included).
pub fn random_shapes(
    n1: usize,
    n2: usize,
    n4: usize,
) -> impl proptest::strategy::Strategy<Value = Vec<usize>> {
    use proptest::prelude::*;
    prop_oneof![
        Just(vec![]),
        (1usize..n1).prop_map(|n| vec![n]),
        (1usize..n2, 1usize..n2).prop_map(|(a, b)| vec![a, b]),
        proptest::collection::vec(1usize..n4, 3..=4),
    ]
}

/// The layout of `dims` with its `pick`-th valid choice of factored axes (modulo their
/// number; none for rank ≤ 1): any choice the largest axes' ties allow.
pub fn layout_with_axes_pick(dims: Vec<usize>, pick: usize) -> mulo::shape::Layout {
    use mulo::shape::{FactoredAxes, Layout, Shape};
    let rank = dims.len();
    let valid: Vec<FactoredAxes> = (0..rank)
        .flat_map(|d0| (0..rank).map(move |d1| FactoredAxes { d0, d1 }))
        .filter(|a| a.check(&dims).is_ok())
        .collect();
    let axes = (!valid.is_empty()).then(|| valid[pick % valid.len()]);
    Layout::with_axes(Shape::new(dims).unwrap(), axes).unwrap()
}
