//! Checkpoints: resuming gives bitwise the same trajectory as not stopping; checkpoints of
//! other shapes or another learned optimizer are refused; PyLO states import and export
//! against the golden final states.

mod common;

use common::Rng;
use mulo::lopt::LearnedOptimizer;
use mulo::optimizer::{MuloOptimizer, OptimizerOptions, ParamSpec};
use mulo::state::TensorState;
use mulo::trajectory::{max_abs_diff, Trajectory, DEFAULT_TOLERANCE};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::Path;

const MODEL: &[(&str, &[usize])] = &[
    ("w1", &[12, 5]),
    ("b1", &[12]),
    ("w2", &[12, 12]),
    ("conv", &[4, 3, 2, 2]),
    ("scale", &[]),
    ("head", &[3, 12]),
];

fn specs() -> Vec<ParamSpec> {
    MODEL
        .iter()
        .map(|(n, d)| {
            let s = ParamSpec::new(*n, d).unwrap();
            if *n == "w2" {
                s.with_base_shape(&[4, 4]).unwrap() // μP: lr / 3
            } else {
                s
            }
        })
        .collect()
}

fn init(rng: &mut Rng) -> Vec<Vec<f32>> {
    MODEL
        .iter()
        .map(|(_, d)| (0..d.iter().product()).map(|_| rng.next_f32()).collect())
        .collect()
}

fn grads(rng: &mut Rng, k: usize) -> Vec<Vec<f32>> {
    let mut g: Vec<Vec<f32>> = MODEL
        .iter()
        .map(|(_, d)| rng.gradient(d.iter().product()))
        .collect();
    if k == 2 {
        g[1][0] = f32::NAN; // a skipped tensor inside the run
    }
    g
}

fn run(
    opt: &mut MuloOptimizer,
    params: &mut [Vec<f32>],
    rng: &mut Rng,
    steps: std::ops::Range<usize>,
) {
    for k in steps {
        let g = grads(rng, k);
        let grefs: Vec<&[f32]> = g.iter().map(|x| x.as_slice()).collect();
        let mut prefs: Vec<&mut [f32]> = params.iter_mut().map(|x| x.as_mut_slice()).collect();
        let lr = 0.05 * (1.0 - k as f32 / 10.0);
        opt.step(&mut prefs, &grefs, lr, 0.01).unwrap();
    }
}

fn bits(v: &[Vec<f32>]) -> Vec<Vec<u32>> {
    v.iter()
        .map(|t| t.iter().map(|x| x.to_bits()).collect())
        .collect()
}

#[test]
fn resuming_from_a_checkpoint_is_bitwise_identical() {
    let lopt = common::fixture_lopt();
    let dir = common::temp_dir("ckpt-resume");
    let path = dir.join("opt.safetensors");

    // Uninterrupted: 6 steps.
    let mut rng = Rng(5);
    let mut straight = init(&mut rng);
    let mut a = MuloOptimizer::new(&lopt, specs(), OptimizerOptions::default()).unwrap();
    run(&mut a, &mut straight, &mut rng, 0..6);

    // 3 steps, save, drop, load into a fresh optimizer, 3 more.
    let mut rng = Rng(5);
    let mut resumed = init(&mut rng);
    let mut b = MuloOptimizer::new(&lopt, specs(), OptimizerOptions::default()).unwrap();
    run(&mut b, &mut resumed, &mut rng, 0..3);
    b.save_checkpoint(&path).unwrap();
    drop(b);
    let mut c = MuloOptimizer::new(&lopt, specs(), OptimizerOptions::default()).unwrap();
    c.load_checkpoint(&path).unwrap();
    assert_eq!(c.step_count(), 3);
    run(&mut c, &mut resumed, &mut rng, 3..6);

    assert_eq!(bits(&resumed), bits(&straight));
    assert_eq!(c.step_count(), a.step_count());
    for (name, _) in MODEL {
        assert_eq!(c.state(name).unwrap(), a.state(name).unwrap(), "{name}");
    }
    // The file holds what the docs say.
    let bytes = std::fs::read(&path).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone().unwrap();
    assert_eq!(meta["format"], "mulo-optimizer-checkpoint/1");
    assert_eq!(meta["step"], "3");
    assert_eq!(meta["lopt_fingerprint"], lopt.fingerprint());
    assert_eq!(meta["fingerprint"], c.fingerprint());
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(tensors.tensor("w2/fac_row").unwrap().shape(), &[3, 12]);
    assert_eq!(tensors.tensor("b1/fac_v").unwrap().shape(), &[3, 12]);
    assert_eq!(tensors.tensor("scale/mom").unwrap().shape(), &[3, 1]);
}

fn refused(opt: &mut MuloOptimizer, path: &Path, words: &[&str]) {
    let before: Vec<TensorState> = opt
        .params()
        .iter()
        .map(|p| opt.state(&p.name).unwrap())
        .collect();
    let step = opt.step_count();
    let err = opt.load_checkpoint(path).unwrap_err().to_string();
    for w in words {
        assert!(err.contains(w), "`{w}` in: {err}");
    }
    assert_eq!(opt.step_count(), step);
    for (p, s) in opt.params().to_vec().iter().zip(before) {
        assert_eq!(opt.state(&p.name).unwrap(), s);
    }
}

#[test]
fn checkpoints_of_other_models_or_optimizers_are_refused() {
    let lopt = common::fixture_lopt();
    let dir = common::temp_dir("ckpt-refuse");
    let path = dir.join("opt.safetensors");
    let mut rng = Rng(8);
    let mut params = init(&mut rng);
    let mut saved = MuloOptimizer::new(&lopt, specs(), OptimizerOptions::default()).unwrap();
    run(&mut saved, &mut params, &mut rng, 0..2);
    saved.save_checkpoint(&path).unwrap();

    // Another learned optimizer.
    let mut other = MuloOptimizer::new(
        &LearnedOptimizer::demo(),
        specs(),
        OptimizerOptions::default(),
    )
    .unwrap();
    refused(
        &mut other,
        &path,
        &["another learned optimizer", "opt.safetensors"],
    );

    // Another shape of one tensor.
    let mut changed = specs();
    changed[2] = ParamSpec::new("w2", &[12, 13]).unwrap();
    let mut other = MuloOptimizer::new(&lopt, changed, OptimizerOptions::default()).unwrap();
    refused(&mut other, &path, &["`w2`", "[12, 12]", "[12, 13]"]);

    // A tensor more, a tensor less.
    let mut more = specs();
    more.push(ParamSpec::new("extra", &[7]).unwrap());
    let mut other = MuloOptimizer::new(&lopt, more, OptimizerOptions::default()).unwrap();
    refused(&mut other, &path, &["`extra` is not in the checkpoint"]);
    let mut fewer = specs();
    fewer.remove(0);
    let mut other = MuloOptimizer::new(&lopt, fewer, OptimizerOptions::default()).unwrap();
    refused(&mut other, &path, &["checkpoint has parameter `w1`"]);

    // The same shapes with other factored axes: the accumulators would be read along the
    // wrong axes. (w2 is 12x12: the default is d0 = 1, d1 = 0.)
    let mut swapped = specs();
    swapped[2] = swapped[2].clone().with_factored_axes(0, 1).unwrap();
    let mut other = MuloOptimizer::new(&lopt, swapped, OptimizerOptions::default()).unwrap();
    refused(
        &mut other,
        &path,
        &[
            "`w2`",
            "factored axes (d0 = 1, d1 = 0)",
            "(d0 = 0, d1 = 1) here",
        ],
    );

    // Not a checkpoint at all (a golden trajectory), and a tampered one.
    let mut same = MuloOptimizer::new(&lopt, specs(), OptimizerOptions::default()).unwrap();
    refused(
        &mut same,
        &common::golden_dir().join("vec_37.safetensors"),
        &["`format` is missing"],
    );
    let bytes = std::fs::read(&path).unwrap();
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta = header.metadata().clone().unwrap();
    meta.insert("params".into(), meta["params"].replace("\"b1\"", "\"b9\""));
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors.tensors();
    let tampered = safetensors::serialize(views, Some(meta)).unwrap();
    let tampered_path = dir.join("tampered.safetensors");
    std::fs::write(&tampered_path, tampered).unwrap();
    let mut renamed = specs();
    renamed[1] = ParamSpec::new("b9", &[12]).unwrap();
    let mut other = MuloOptimizer::new(&lopt, renamed, OptimizerOptions::default()).unwrap();
    refused(&mut other, &tampered_path, &["altered"]);

    // The right one loads.
    same.load_checkpoint(&path).unwrap();
    assert_eq!(same.step_count(), 2);
}

/// The golden file's raw PyLO state tensors (`state.mom`, …) by PyLO name.
fn pylo_tensors(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    tensors
        .tensors()
        .into_iter()
        .filter_map(|(name, view)| {
            let pylo = name.strip_prefix("state.")?.to_string();
            let values = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Some((pylo, (view.shape().to_vec(), values)))
        })
        .collect()
}

#[test]
fn pylo_states_import_and_export_against_the_golden_cases() {
    let lopt = common::fixture_lopt();
    for path in common::golden_cases() {
        let traj = Trajectory::load(&path).unwrap();
        let spec = || vec![ParamSpec::with_layout("p", &traj.layout)];
        let end = traj.start_step + traj.grads.len() as u64;

        // Replay the trajectory with the whole-model optimizer.
        let mut replayed = MuloOptimizer::new(&lopt, spec(), OptimizerOptions::default()).unwrap();
        replayed.set_step_count(traj.start_step).unwrap();
        let mut p = traj.p0.clone();
        for g in &traj.grads {
            replayed
                .step(
                    &mut [p.as_mut_slice()],
                    &[g.as_slice()],
                    traj.lr,
                    traj.weight_decay,
                )
                .unwrap();
        }
        let ours = replayed.state("p").unwrap();

        // Import PyLO's final state.
        let raw = pylo_tensors(&path);
        assert!(!raw.is_empty(), "{}: no PyLO state", traj.name);
        let mut imported = MuloOptimizer::new(&lopt, spec(), OptimizerOptions::default()).unwrap();
        imported.set_step_count(end).unwrap();
        imported
            .import_pylo_state("p", |name| raw.get(name).cloned())
            .unwrap();
        let theirs = imported.state("p").unwrap();
        assert_eq!(&theirs, traj.final_state.as_ref().unwrap(), "{}", traj.name);
        assert_eq!((theirs.step, ours.step), (end, end));

        // What mulo computed is PyLO's state within the golden tolerance, buffer by buffer.
        for (buffer, want) in theirs.iter() {
            let scale = want.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
            let err = max_abs_diff(ours.get(buffer), want) / scale;
            assert!(err <= DEFAULT_TOLERANCE, "{} {buffer}: {err:e}", traj.name);
        }

        // Exporting gives PyLO's tensors back, bitwise.
        let exported = imported.export_pylo_state("p").unwrap();
        assert_eq!(exported.len(), raw.len(), "{}", traj.name);
        for (name, shape, values) in exported {
            let (want_shape, want) = &raw[&name];
            assert_eq!(&shape, want_shape, "{} {name}", traj.name);
            let (a, b): (Vec<u32>, Vec<u32>) = (
                values.iter().map(|x| x.to_bits()).collect(),
                want.iter().map(|x| x.to_bits()).collect(),
            );
            assert_eq!(a, b, "{} {name}", traj.name);
        }
    }
}

#[test]
fn pylo_import_errors_name_the_tensor_and_buffer() {
    let lopt = LearnedOptimizer::demo();
    let mut opt = MuloOptimizer::new(&lopt, specs(), OptimizerOptions::default()).unwrap();
    let err = opt
        .import_pylo_state("w1", |_| None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("`w1`") && err.contains("mom"), "{err}");
    let err = opt
        .import_pylo_state("w1", |_| Some((vec![5, 12, 3], vec![0.0; 180])))
        .unwrap_err()
        .to_string();
    assert!(err.contains("`w1`") && err.contains("[12, 5, 3]"), "{err}");
    let err = opt
        .import_pylo_state("nope", |_| None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("`nope`"), "{err}");
}

#[test]
fn a_pylo_state_file_imports_for_the_whole_model() {
    let lopt = common::fixture_lopt();
    let path = common::golden_dir().join("mat_80x30_late.safetensors");
    let traj = Trajectory::load(&path).unwrap();
    let end = traj.start_step + traj.grads.len() as u64;
    let specs = vec![
        ParamSpec::with_layout("a", &traj.layout),
        ParamSpec::with_layout("b", &traj.layout),
    ];
    let mut opt = MuloOptimizer::new(&lopt, specs, OptimizerOptions::default()).unwrap();
    opt.import_pylo_file(&path, end, |_, buf| format!("state.{buf}"))
        .unwrap();
    assert_eq!(opt.step_count(), end);
    for name in ["a", "b"] {
        assert_eq!(
            &opt.state(name).unwrap(),
            traj.final_state.as_ref().unwrap()
        );
    }
    // A missing key names the parameter and the key; nothing changes.
    let mut fresh = MuloOptimizer::new(
        &lopt,
        vec![ParamSpec::with_layout("a", &traj.layout)],
        OptimizerOptions::default(),
    )
    .unwrap();
    let err = fresh
        .import_pylo_file(&path, end, |n, buf| format!("{n}.{buf}"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("`a`") && err.contains("`a.mom`"), "{err}");
    assert_eq!(fresh.step_count(), 0);
}

/// Invalid factored axes are refused when the parameter is declared, naming it.
#[test]
fn invalid_factored_axes_name_the_tensor() {
    let cases: [(&[usize], usize, usize, &str); 5] = [
        (&[12, 12], 0, 0, "same axis"),
        (&[12, 12], 0, 2, "out of range"),
        (&[12, 6, 3], 0, 2, "d1 a largest of the others"),
        (&[12], 0, 1, "rank 1"),
        (&[], 0, 1, "rank 0"),
    ];
    for (dims, d0, d1, words) in cases {
        let err = ParamSpec::new("layer.weight", dims)
            .unwrap()
            .with_factored_axes(d0, d1)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("layer.weight") && err.contains(words),
            "{dims:?} ({d0}, {d1}): {err}"
        );
    }
    // Tied largest axes may be given in either order.
    for (d0, d1) in [(0, 1), (1, 0)] {
        ParamSpec::new("k", &[32, 32, 3, 3])
            .unwrap()
            .with_factored_axes(d0, d1)
            .unwrap();
    }
}
