//! Checkpoints: resuming gives bitwise the same trajectory as not stopping; checkpoints of
//! other shapes or another learned optimizer are refused; PyLO states import and export
//! against the golden final states.

mod common;

use common::Rng;
use mulo::lopt::LearnedOptimizer;
use mulo::optimizer::{MuloOptimizer, OptimizerOptions, ParamSpec};
use mulo::state::TensorState;
use mulo::trajectory::{max_abs_diff, Trajectory, DEFAULT_TOLERANCE};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
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
    assert_eq!(meta["format"], "mulo-optimizer-checkpoint/2");
    assert_eq!(meta["step"], "3");
    assert_eq!(meta["checksum"], metadata_checksum(&meta));
    let sums: BTreeMap<String, String> = serde_json::from_str(&meta["tensor_sha256"]).unwrap();
    assert_eq!(meta["lopt_fingerprint"], lopt.fingerprint());
    assert_eq!(meta["fingerprint"], c.fingerprint());
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(sums.len(), tensors.len());
    for (key, view) in tensors.tensors() {
        assert_eq!(sums[&key], sha256_hex([view.data()]), "{key}");
    }
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

/// Lower-case hexadecimal SHA-256 of byte chunks.
fn sha256_hex<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut h = Sha256::new();
    for c in chunks {
        h.update(c);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The checkpoint's metadata checksum as its module documents it (SHA-256 of every other
/// entry in key order, each key and value prefixed by its length as a little-endian u64),
/// written out here so that the tests can forge checkpoints with valid checksums.
fn metadata_checksum(meta: &HashMap<String, String>) -> String {
    let sorted: BTreeMap<&String, &String> =
        meta.iter().filter(|(k, _)| *k != "checksum").collect();
    let mut parts: Vec<Vec<u8>> = Vec::new();
    for (k, v) in sorted {
        for part in [k, v] {
            parts.push((part.len() as u64).to_le_bytes().to_vec());
            parts.push(part.as_bytes().to_vec());
        }
    }
    sha256_hex(parts.iter().map(|p| p.as_slice()))
}

/// A checkpoint's tensors (name → dtype, shape, bytes) and metadata.
type Parts = (
    BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>,
    HashMap<String, String>,
);

fn parts(bytes: &[u8]) -> Parts {
    let tensors = SafeTensors::deserialize(bytes).unwrap();
    let (_, header) = SafeTensors::read_metadata(bytes).unwrap();
    let views = tensors
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect();
    (views, header.metadata().clone().unwrap())
}

/// Serializes `parts` with every checksum recomputed: a file the checksums do not catch.
fn forge((tensors, mut meta): Parts) -> Vec<u8> {
    let sums: BTreeMap<&String, String> = tensors
        .iter()
        .map(|(k, (_, _, b))| (k, sha256_hex([b.as_slice()])))
        .collect();
    meta.insert(
        "tensor_sha256".into(),
        serde_json::to_string(&sums).unwrap(),
    );
    meta.insert("checksum".into(), metadata_checksum(&meta));
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(k, (d, s, b))| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize(views, Some(meta)).unwrap()
}

/// The step counter and every state: what a refusal must leave as it was. (Not the
/// checkpoint bytes: safetensors writes the metadata map in no fixed order.)
fn snapshot(opt: &MuloOptimizer) -> (u64, Vec<TensorState>) {
    let states = opt
        .params()
        .iter()
        .map(|p| opt.state(&p.name).unwrap())
        .collect();
    (opt.step_count(), states)
}

/// An optimizer over [`specs`] after two steps, and its checkpoint.
fn saved() -> (MuloOptimizer, Vec<u8>) {
    let mut rng = Rng(8);
    let mut params = init(&mut rng);
    let mut opt = MuloOptimizer::new(
        &common::fixture_lopt(),
        specs(),
        OptimizerOptions::default(),
    )
    .unwrap();
    run(&mut opt, &mut params, &mut rng, 0..2);
    let bytes = opt.checkpoint_bytes().unwrap();
    (opt, bytes)
}

/// `bytes` is refused by a fresh optimizer with an error holding `words`, and the optimizer
/// is left as it was (its checkpoint is bitwise the same).
fn refused_bytes(bytes: &[u8], words: &[&str], how: &str) {
    let mut opt = MuloOptimizer::new(
        &common::fixture_lopt(),
        specs(),
        OptimizerOptions::default(),
    )
    .unwrap();
    let before = snapshot(&opt);
    let err = opt
        .restore_checkpoint(bytes, Path::new("forged.ckpt"))
        .expect_err(how)
        .to_string();
    for w in words {
        assert!(err.contains(w), "{how}: `{w}` not in: {err}");
    }
    assert!(
        snapshot(&opt) == before,
        "{how}: the refusal changed the optimizer"
    );
}

/// Every byte of a checkpoint's data with one bit flipped (a different bit for each byte) is
/// refused, naming the tensor the byte belongs to; nothing changes. Without the data
/// checksums every such flip loaded silently.
#[test]
fn a_flipped_data_bit_is_refused_naming_the_tensor() {
    let (mut opt, bytes) = saved();
    let header_len = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..header_len]).unwrap();
    // Each data byte's tensor, from the header's offsets.
    let mut owner: Vec<Option<&str>> = vec![None; bytes.len() - header_len];
    for (key, info) in &header {
        if key == "__metadata__" {
            continue;
        }
        let offsets = info["data_offsets"].as_array().unwrap();
        let (a, b) = (offsets[0].as_u64().unwrap(), offsets[1].as_u64().unwrap());
        for o in &mut owner[a as usize..b as usize] {
            *o = Some(key);
        }
    }
    let before = snapshot(&opt);
    let mut flipped = bytes.clone();
    for (i, key) in owner.iter().enumerate() {
        let key = key.expect("every data byte belongs to a tensor");
        let at = header_len + i;
        flipped[at] ^= 1 << (i % 8);
        let err = opt
            .restore_checkpoint(&flipped, Path::new("flipped.ckpt"))
            .expect_err("a flipped data bit was loaded")
            .to_string();
        assert!(
            err.contains("flipped.ckpt")
                && err.contains(&format!("`{key}`"))
                && err.contains("checksum"),
            "byte {i}: {err}"
        );
        flipped[at] = bytes[at];
        assert!(
            snapshot(&opt) == before,
            "byte {i}: the refusal changed the optimizer"
        );
    }
    println!("{} data bytes flipped, each refused", owner.len());
    // Every bit of the header flipped: refused too (the safetensors layout, or the metadata
    // checksum, which covers the step counter and the tensor checksums).
    for bit in 0..8 * header_len {
        flipped[bit / 8] ^= 1 << (bit % 8);
        assert!(
            opt.restore_checkpoint(&flipped, Path::new("flipped.ckpt"))
                .is_err(),
            "header bit {bit}: a flipped bit was loaded"
        );
        flipped[bit / 8] = bytes[bit / 8];
    }
    opt.restore_checkpoint(&bytes, Path::new("ok.ckpt"))
        .unwrap();
}

/// The step counter and the tensor checksums are inside the metadata checksum: edited (with
/// the data still matching), the file is refused as altered.
#[test]
fn the_step_counter_and_the_tensor_checksums_are_covered_by_the_checksum() {
    let (_, bytes) = saved();
    let (tensors, meta) = parts(&bytes);
    let reserialize = |meta: &HashMap<String, String>| {
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .map(|(k, (d, s, b))| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize(views, Some(meta.clone())).unwrap()
    };
    let mut step = meta.clone();
    step.insert("step".into(), "3".into());
    refused_bytes(
        &reserialize(&step),
        &["forged.ckpt", "checksum", "altered"],
        "step edited",
    );
    // A tensor changed, with its checksum updated but not the metadata checksum.
    let (mut changed, _) = parts(&bytes);
    changed.get_mut("w1/mom").unwrap().2[0] ^= 1;
    let mut sums: BTreeMap<String, String> = serde_json::from_str(&meta["tensor_sha256"]).unwrap();
    sums.insert(
        "w1/mom".into(),
        sha256_hex([changed["w1/mom"].2.as_slice()]),
    );
    let mut edited = meta.clone();
    edited.insert(
        "tensor_sha256".into(),
        serde_json::to_string(&sums).unwrap(),
    );
    let views: Vec<(String, TensorView)> = changed
        .iter()
        .map(|(k, (d, s, b))| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let bytes2 = safetensors::serialize(views, Some(edited)).unwrap();
    refused_bytes(&bytes2, &["checksum", "altered"], "tensor checksum edited");
    // The forging helper itself makes files that load (so the refusals below are the rules').
    let forged = forge(parts(&bytes));
    let mut opt = MuloOptimizer::new(
        &common::fixture_lopt(),
        specs(),
        OptimizerOptions::default(),
    )
    .unwrap();
    opt.restore_checkpoint(&forged, Path::new("forged.ckpt"))
        .unwrap();
    assert_eq!(opt.step_count(), 2);
}

/// A version-1 checkpoint (no checksums) is refused with a message naming the format
/// version; so is an unknown version.
#[test]
fn old_checkpoint_format_versions_are_refused_naming_the_version() {
    let (_, bytes) = saved();
    let (tensors, mut meta) = parts(&bytes);
    meta.remove("checksum");
    meta.remove("tensor_sha256");
    meta.insert("format".into(), "mulo-optimizer-checkpoint/1".into());
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(k, (d, s, b))| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let v1 = safetensors::serialize(views.clone(), Some(meta.clone())).unwrap();
    refused_bytes(
        &v1,
        &[
            "format version",
            "mulo-optimizer-checkpoint/1",
            "no checksum",
            "mulo-optimizer-checkpoint/2",
        ],
        "version 1",
    );
    meta.insert("format".into(), "mulo-optimizer-checkpoint/9".into());
    let v9 = safetensors::serialize(views, Some(meta)).unwrap();
    refused_bytes(
        &v9,
        &["format version", "mulo-optimizer-checkpoint/9"],
        "version 9",
    );
}

/// A checkpoint whose checksums match but whose values break a rule of imported state is
/// refused naming the tensor and the rule: NaN, ±Inf, a negative `rms` or `fac_*`, a `mom`
/// of 2^64 or more; so is a tensor of another dtype (never converted) and an extra tensor.
#[test]
fn forged_checkpoints_with_bad_values_or_dtypes_are_refused_naming_the_tensor() {
    let (_, bytes) = saved();
    let cases: [(&str, usize, f32, &str); 8] = [
        ("w2/mom", 5, f32::NAN, "non-finite"),
        ("b1/rms", 0, f32::INFINITY, "non-finite"),
        ("conv/fac_col", 1, f32::NEG_INFINITY, "non-finite"),
        ("w1/rms", 3, -1.0, "negative"),
        ("w2/fac_row", 2, -1e-20, "negative"),
        ("head/fac_col", 0, -3.0, "negative"),
        ("b1/fac_v", 7, -0.5, "negative"),
        ("scale/mom", 1, 3e38, "2^64"),
    ];
    for (key, at, value, rule) in cases {
        let (mut tensors, meta) = parts(&bytes);
        tensors.get_mut(key).unwrap().2[4 * at..4 * at + 4].copy_from_slice(&value.to_le_bytes());
        refused_bytes(
            &forge((tensors, meta)),
            &[
                "forged.ckpt",
                &format!("`{key}`"),
                rule,
                &format!("index {at}"),
            ],
            &format!("{key}[{at}] = {value}"),
        );
    }
    // Other dtypes: the same tensor as bf16, f16, f64 and i32 (bytes sized for the dtype).
    for dtype in [Dtype::BF16, Dtype::F16, Dtype::F64, Dtype::I32] {
        let (mut tensors, meta) = parts(&bytes);
        let t = tensors.get_mut("w1/rms").unwrap();
        let n: usize = t.1.iter().product();
        t.0 = dtype;
        t.2 = vec![0u8; n * dtype.bitsize() / 8];
        refused_bytes(
            &forge((tensors, meta)),
            &["`w1/rms`", "dtype", &format!("{dtype:?}"), "not converted"],
            &format!("{dtype:?}"),
        );
    }
    // A step counter out of range (over u64::MAX, negative, not an integer).
    for step in ["18446744073709551616", "-1", "2.5"] {
        let (tensors, mut meta) = parts(&bytes);
        meta.insert("step".into(), step.into());
        refused_bytes(
            &forge((tensors, meta)),
            &["`step`", step, "not a step count"],
            &format!("step {step}"),
        );
    }
    // An extra tensor, even with a valid checksum, is not silently ignored.
    let (mut tensors, meta) = parts(&bytes);
    tensors.insert("w9/mom".into(), (Dtype::F32, vec![1], vec![0; 4]));
    refused_bytes(
        &forge((tensors, meta)),
        &["`w9/mom`", "not part of it"],
        "extra tensor",
    );
}

/// A PyLO state file is checked by the same rules: each bad value and each other dtype is
/// refused naming the file's key, and nothing changes.
#[test]
fn pylo_state_files_are_checked_by_every_rule() {
    let lopt = common::fixture_lopt();
    let (opt, _) = saved();
    let file: Vec<(String, Vec<usize>, Vec<f32>)> = opt
        .params()
        .iter()
        .flat_map(|p| {
            opt.export_pylo_state(&p.name)
                .unwrap()
                .into_iter()
                .map(|(b, s, v)| (format!("{}.{b}", p.name), s, v))
                .collect::<Vec<_>>()
        })
        .collect();
    let dir = common::temp_dir("pylo-rules");
    let path = dir.join("state.safetensors");
    let write = |tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]| {
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .map(|(k, d, s, b)| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
    };
    let as_f32 =
        |f: &[(String, Vec<usize>, Vec<f32>)]| -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
            f.iter()
                .map(|(k, s, v)| {
                    (
                        k.clone(),
                        Dtype::F32,
                        s.clone(),
                        v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    )
                })
                .collect()
        };
    let fresh = || MuloOptimizer::new(&lopt, specs(), OptimizerOptions::default()).unwrap();
    let expect = |words: &[&str], how: &str| {
        let mut opt = fresh();
        let before = snapshot(&opt);
        let err = opt
            .import_pylo_file(&path, 2, |n, b| format!("{n}.{b}"))
            .expect_err(how)
            .to_string();
        for w in words {
            assert!(err.contains(w), "{how}: `{w}` not in: {err}");
        }
        assert!(snapshot(&opt) == before, "{how}: changed the optimizer");
    };
    // The unchanged file imports.
    write(&as_f32(&file));
    fresh()
        .import_pylo_file(&path, 2, |n, b| format!("{n}.{b}"))
        .unwrap();
    let cases: [(&str, f32, &str); 7] = [
        ("w2.mom", f32::NAN, "non-finite"),
        ("b1.rms", f32::INFINITY, "non-finite"),
        ("w1.rms", -1.0, "negative"),
        ("w2.fac_vec_row", -1e-20, "negative"),
        ("head.fac_vec_col", -3.0, "negative"),
        ("b1.fac_vec_v", -0.5, "negative"),
        ("conv.mom", -3e38, "2^64"),
    ];
    for (key, value, rule) in cases {
        let mut bad = file.clone();
        bad.iter_mut().find(|t| t.0 == key).unwrap().2[1] = value;
        write(&as_f32(&bad));
        expect(
            &["state.safetensors", &format!("`{key}`"), rule],
            &format!("{key} = {value}"),
        );
    }
    for dtype in [Dtype::BF16, Dtype::F16, Dtype::F64, Dtype::I32] {
        let mut tensors = as_f32(&file);
        let t = tensors.iter_mut().find(|t| t.0 == "w1.rms").unwrap();
        let n: usize = t.2.iter().product();
        t.1 = dtype;
        t.3 = vec![0u8; n * dtype.bitsize() / 8];
        write(&tensors);
        expect(
            &[
                "state.safetensors",
                "`w1.rms`",
                &format!("{dtype:?}"),
                "not converted",
            ],
            &format!("{dtype:?}"),
        );
    }
}
