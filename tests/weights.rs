//! Loading learned optimizers: Hub layout directories, bare files, the Hub cache, the demo
//! network, other architectures, and clear errors for every kind of bad file.

mod common;

use mulo::backend::interp::execute;
use mulo::backend::Hyper;
use mulo::lopt::{demo, Dense, LearnedOptimizer, MetaNetwork, MetaParams, WeightsOrigin};
use mulo::shape::{Layout, Shape};
use mulo::state::TensorState;
use std::path::Path;
use std::sync::Mutex;

/// Tests that set HF_* variables must not run at the same time.
static ENV_LOCK: Mutex<()> = Mutex::new(());

fn fixture_bytes() -> Vec<u8> {
    std::fs::read(common::golden_dir().join("weights/model.safetensors")).unwrap()
}

/// Loads `bytes` as a .safetensors file and returns the error text.
fn load_error(name: &str, bytes: &[u8]) -> String {
    let dir = common::temp_dir(name);
    let path = dir.join("model.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let err = LearnedOptimizer::from_file(&path).unwrap_err().to_string();
    assert!(
        err.contains("model.safetensors"),
        "error names the file: {err}"
    );
    err
}

/// A network with random weights of the given architecture.
fn random_network(hidden: usize, hidden_layers: usize, seed: u64) -> MetaNetwork {
    let mut rng = common::Rng(seed);
    let mut layers = Vec::new();
    let mut inputs = 39;
    for k in 0..hidden_layers + 2 {
        let outputs = if k == hidden_layers + 1 { 2 } else { hidden };
        let scale = 1.0 / (inputs as f32).sqrt();
        layers.push(Dense {
            outputs,
            inputs,
            weight: (0..outputs * inputs)
                .map(|_| rng.next_f32() * scale)
                .collect(),
            bias: (0..outputs).map(|_| rng.next_f32() * 0.1).collect(),
        });
        inputs = outputs;
    }
    MetaNetwork { layers }
}

#[test]
fn hub_layout_directory_and_bare_file_load_the_same_network() {
    let dir = common::golden_dir().join("weights");
    let from_dir = LearnedOptimizer::load(dir.to_str().unwrap()).unwrap();
    let from_file =
        LearnedOptimizer::load(dir.join("model.safetensors").to_str().unwrap()).unwrap();
    assert_eq!(from_dir.network, from_file.network);
    assert_eq!(from_dir.network.config().hidden_size, 32);
    assert_eq!(from_dir.network.multiply_adds(), 2336);
    assert!(matches!(from_dir.origin, WeightsOrigin::Directory(_)));
    assert!(matches!(from_file.origin, WeightsOrigin::File(_)));
    assert_eq!(from_dir.meta, MetaParams::default());
}

#[test]
fn truncated_file_is_a_clear_error() {
    let bytes = fixture_bytes();
    let err = load_error("truncated", &bytes[..bytes.len() - 100]);
    assert!(err.contains("not a valid safetensors file"), "{err}");
    let err = load_error("tiny", &bytes[..5]);
    assert!(err.contains("not a valid safetensors file"), "{err}");
}

#[test]
fn nan_weights_name_the_tensor() {
    let mut net = common::fixture_lopt().network;
    net.layers[1].weight[5] = f32::NAN;
    let err = load_error("nan", &net.to_safetensors_bytes());
    assert!(
        err.contains("network.linear_0.weight") && err.contains("non-finite"),
        "{err}"
    );
}

#[test]
fn wrong_shapes_and_missing_tensors_name_the_tensor() {
    let good = common::fixture_lopt().network;

    let mut wrong_inputs = good.clone();
    wrong_inputs.layers[0] = Dense {
        outputs: 32,
        inputs: 38,
        weight: vec![0.0; 32 * 38],
        bias: vec![0.0; 32],
    };
    let err = load_error("inputs", &wrong_inputs.to_safetensors_bytes());
    assert!(
        err.contains("network.input.weight") && err.contains("39"),
        "{err}"
    );

    let mut wrong_hidden = good.clone();
    wrong_hidden.layers[1] = Dense {
        outputs: 32,
        inputs: 31,
        weight: vec![0.0; 32 * 31],
        bias: vec![0.0; 32],
    };
    let err = load_error("hidden", &wrong_hidden.to_safetensors_bytes());
    assert!(err.contains("network.linear_0.weight"), "{err}");

    let mut wrong_output = good.clone();
    wrong_output.layers[2] = Dense {
        outputs: 3,
        inputs: 32,
        weight: vec![0.0; 96],
        bias: vec![0.0; 3],
    };
    let err = load_error("output", &wrong_output.to_safetensors_bytes());
    assert!(
        err.contains("network.output.weight") && err.contains("[2, 32]"),
        "{err}"
    );

    // Drop the output bias by writing a file without it.
    let mut tensors = std::collections::BTreeMap::new();
    let bufs: Vec<(String, Vec<usize>, Vec<u8>)> = good
        .layers
        .iter()
        .zip(["network.input", "network.linear_0", "network.output"])
        .flat_map(|(l, n)| {
            let w = l.weight.iter().flat_map(|v| v.to_le_bytes()).collect();
            let b = l.bias.iter().flat_map(|v| v.to_le_bytes()).collect();
            [
                (format!("{n}.weight"), vec![l.outputs, l.inputs], w),
                (format!("{n}.bias"), vec![l.outputs], b),
            ]
        })
        .filter(|(name, _, _)| name != "network.output.bias")
        .collect();
    for (name, shape, data) in &bufs {
        tensors.insert(
            name.clone(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                .unwrap(),
        );
    }
    let err = load_error("missing", &safetensors::serialize(&tensors, None).unwrap());
    assert!(
        err.contains("missing tensor `network.output.bias`"),
        "{err}"
    );
}

#[test]
fn wrong_dtype_names_the_tensor() {
    let net = common::fixture_lopt().network;
    let mut tensors = std::collections::BTreeMap::new();
    let names = ["network.input", "network.linear_0", "network.output"];
    let data: Vec<(String, Vec<usize>, Vec<u8>, safetensors::Dtype)> = net
        .layers
        .iter()
        .zip(names)
        .flat_map(|(l, n)| {
            let w: Vec<u8> = l
                .weight
                .iter()
                .flat_map(|v| (*v as f64).to_le_bytes())
                .collect();
            let b: Vec<u8> = l.bias.iter().flat_map(|v| v.to_le_bytes()).collect();
            [
                (
                    format!("{n}.weight"),
                    vec![l.outputs, l.inputs],
                    w,
                    safetensors::Dtype::F64,
                ),
                (
                    format!("{n}.bias"),
                    vec![l.outputs],
                    b,
                    safetensors::Dtype::F32,
                ),
            ]
        })
        .collect();
    for (name, shape, bytes, dtype) in &data {
        tensors.insert(
            name.clone(),
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
        );
    }
    let err = load_error("dtype", &safetensors::serialize(&tensors, None).unwrap());
    assert!(
        err.contains("network.input.weight") && err.contains("F64") && err.contains("F32"),
        "{err}"
    );
}

#[test]
fn config_disagreeing_with_tensors_is_refused() {
    let dir = common::temp_dir("config");
    std::fs::write(dir.join("model.safetensors"), fixture_bytes()).unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"input_size": 39, "hidden_size": 64, "hidden_layers": 1}"#,
    )
    .unwrap();
    let err = LearnedOptimizer::from_dir(&dir).unwrap_err().to_string();
    assert!(
        err.contains("config.json") && err.contains("hidden_size 64"),
        "{err}"
    );
    std::fs::write(dir.join("config.json"), "{not json").unwrap();
    let err = LearnedOptimizer::from_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("config.json"), "{err}");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let err = LearnedOptimizer::from_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("no model.safetensors"), "{err}");
}

fn with_hub_cache<T>(cache: &Path, f: impl FnOnce() -> T) -> T {
    let _guard = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let saved = (
        std::env::var_os("HF_HUB_CACHE"),
        std::env::var_os("HF_HOME"),
    );
    // SAFETY: the lock above keeps every test that touches these variables apart.
    unsafe {
        std::env::set_var("HF_HUB_CACHE", cache);
        std::env::remove_var("HF_HOME");
    }
    let out = f();
    unsafe {
        match saved.0 {
            Some(v) => std::env::set_var("HF_HUB_CACHE", v),
            None => std::env::remove_var("HF_HUB_CACHE"),
        }
        if let Some(v) = saved.1 {
            std::env::set_var("HF_HOME", v);
        }
    }
    out
}

#[test]
fn hub_key_resolves_in_the_cache_layout_of_the_hub_client() {
    let cache = common::temp_dir("hub");
    let repo = cache.join("models--btherien--mulo");
    let rev = "0123456789abcdef0123456789abcdef01234567";
    let snapshot = repo.join("snapshots").join(rev);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    // The Hub client stores blobs and links them from the snapshot.
    let blob = repo.join("blobs").join("deadbeef");
    std::fs::write(&blob, fixture_bytes()).unwrap();
    std::os::unix::fs::symlink(&blob, snapshot.join("model.safetensors")).unwrap();
    std::fs::copy(
        common::golden_dir().join("weights/config.json"),
        snapshot.join("config.json"),
    )
    .unwrap();

    // Not there yet: refs/main is missing.
    let err = with_hub_cache(&cache, || {
        LearnedOptimizer::load("btherien/mulo")
            .unwrap_err()
            .to_string()
    });
    assert!(
        err.contains("not in the local Hugging Face cache") && err.contains("--weights DIR"),
        "{err}"
    );
    assert!(err.contains("huggingface"), "says how to download: {err}");
    // Without weights, the default falls back to the demo network.
    let default = with_hub_cache(&cache, LearnedOptimizer::load_default);
    assert!(default.is_demo());

    std::fs::write(repo.join("refs/main"), format!("{rev}\n")).unwrap();
    let lopt = with_hub_cache(&cache, || LearnedOptimizer::load("btherien/mulo").unwrap());
    assert_eq!(lopt.network, common::fixture_lopt().network);
    match &lopt.origin {
        WeightsOrigin::Hub { key, snapshot: s } => {
            assert_eq!(key, "btherien/mulo");
            assert_eq!(s, &snapshot);
        }
        other => panic!("origin {other:?}"),
    }
    let default = with_hub_cache(&cache, LearnedOptimizer::load_default);
    assert!(
        !default.is_demo(),
        "the cached btherien/mulo is preferred over the demo"
    );

    let err = with_hub_cache(&cache, || {
        LearnedOptimizer::load("someone/else")
            .unwrap_err()
            .to_string()
    });
    assert!(err.contains("someone/else"), "{err}");
    let err = LearnedOptimizer::load("no/such/path")
        .unwrap_err()
        .to_string();
    assert!(err.contains("no/such/path"), "{err}");
}

#[test]
fn hf_home_is_used_when_hf_hub_cache_is_unset() {
    let _guard = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let saved = (
        std::env::var_os("HF_HUB_CACHE"),
        std::env::var_os("HF_HOME"),
    );
    unsafe {
        std::env::remove_var("HF_HUB_CACHE");
        std::env::set_var("HF_HOME", "/tmp/some-hf-home");
    }
    let dir = mulo::lopt::hub_cache_dir();
    unsafe {
        if let Some(v) = saved.0 {
            std::env::set_var("HF_HUB_CACHE", v);
        }
        match saved.1 {
            Some(v) => std::env::set_var("HF_HOME", v),
            None => std::env::remove_var("HF_HOME"),
        }
    }
    assert_eq!(dir, Path::new("/tmp/some-hf-home/hub"));
}

#[test]
fn demo_assets_match_the_code() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo-mulo");
    let lopt = LearnedOptimizer::from_dir(&shipped).unwrap();
    assert_eq!(lopt.network, demo::demo_network());
    assert_eq!(
        std::fs::read(shipped.join("model.safetensors")).unwrap(),
        demo::demo_network().to_safetensors_bytes(),
        "assets/demo-mulo is stale: regenerate with `mulo-compile demo-weights -o assets/demo-mulo`"
    );
}

#[test]
fn demo_network_steps_along_the_momentum_over_rms_feature() {
    // On a quadratic 0.5·|p|², the demo rule is sign-consistent descent: the loss falls.
    let lopt = LearnedOptimizer::demo();
    assert!(lopt.is_demo());
    let shape = Shape::parse("16x8").unwrap();
    let layout = Layout::new(shape.clone());
    let ir = mulo::compile_step(&shape, &lopt).unwrap();
    let mut rng = common::Rng(7);
    let mut p: Vec<f32> = (0..128).map(|_| rng.next_f32()).collect();
    let loss = |p: &[f32]| p.iter().map(|x| 0.5 * x * x).sum::<f32>();
    let start = loss(&p);
    let mut state = TensorState::zeros(&layout, 0);
    for _ in 0..50 {
        let g = p.clone();
        (p, state) = execute(
            &ir,
            &p,
            &g,
            &state,
            Hyper {
                lr: 1.0,
                weight_decay: 0.0,
            },
        )
        .unwrap();
    }
    let end = loss(&p);
    assert!(end < 0.5 * start, "loss {start} -> {end}");
}

#[test]
fn other_architectures_compile_and_hoisting_keeps_the_meaning() {
    // Any hidden width and number of hidden layers: the optimized IR (first layer split per
    // domain) computes, in f64, what the plain IR computes.
    for (hidden, layers, shape) in [(8, 0, "5x7"), (16, 2, "9"), (32, 1, "3x4x5"), (4, 3, "1x6")] {
        let net = random_network(hidden, layers, hidden as u64 * 31 + layers as u64);
        let lopt = LearnedOptimizer::new(net, MetaParams::default(), WeightsOrigin::Demo).unwrap();
        let shape = Shape::parse(shape).unwrap();
        let layout = Layout::new(shape.clone());
        let plain = mulo::frontend::build_step(&layout, &lopt);
        mulo::ir::verify(&plain).unwrap();
        let optimized = mulo::compile_step(&shape, &lopt).unwrap();
        let n = layout.numel();
        let mut rng = common::Rng(99);
        let p: Vec<f64> = (0..n).map(|_| rng.next_f32() as f64).collect();
        let mut s1 = TensorState::<f64>::zeros(&layout, 10);
        let mut s2 = s1.clone();
        let (mut p1, mut p2) = (p.clone(), p);
        let hyper = Hyper {
            lr: 0.5,
            weight_decay: 0.1,
        };
        for _ in 0..3 {
            let g: Vec<f64> = rng.gradient(n).iter().map(|&x| x as f64).collect();
            (p1, s1) = execute(&plain, &p1, &g, &s1, hyper).unwrap();
            (p2, s2) = execute(&optimized, &p2, &g, &s2, hyper).unwrap();
        }
        let diff = p1
            .iter()
            .zip(&p2)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(
            diff < 1e-12,
            "hidden {hidden} layers {layers} shape {shape}: {diff:e}"
        );
        assert_ne!(p1, vec![0.0; n]);
    }
}

#[test]
fn meta_parameters_can_be_overridden_from_json() {
    let dir = common::temp_dir("meta");
    let path = dir.join("meta.json");
    std::fs::write(
        &path,
        r#"{"step_mult": 0.02, "momentum_decays": [0.5, 0.9, 0.99]}"#,
    )
    .unwrap();
    let lopt = common::fixture_lopt().with_meta_file(&path).unwrap();
    assert_eq!(lopt.meta.step_mult, 0.02);
    assert_eq!(lopt.meta.momentum_decays, [0.5, 0.9, 0.99]);
    assert_eq!(lopt.meta.rms_decay, MetaParams::default().rms_decay);
    assert_ne!(lopt.fingerprint(), common::fixture_lopt().fingerprint());
}
