//! The training examples really train: `examples/train_mlp.rs` is compiled into this test and
//! its `train` run with the bundled demo meta-network.

#[allow(dead_code)]
#[path = "../examples/train_mlp.rs"]
mod train_mlp;

use mulo::lopt::LearnedOptimizer;

#[test]
fn train_mlp_loss_falls() {
    let config = train_mlp::Config::default();
    let mut printed = 0;
    let curve = train_mlp::train(&LearnedOptimizer::demo(), &config, |s| {
        printed += 1;
        println!(
            "epoch {:>2}: loss {:.4}, accuracy {:.1}%",
            s.epoch,
            s.loss,
            100.0 * s.accuracy
        );
    })
    .unwrap();
    assert_eq!(curve.len(), config.epochs + 1);
    assert_eq!(printed, curve.len());
    let (first, last) = (&curve[0], curve.last().unwrap());
    assert!(
        last.loss < 0.5 * first.loss,
        "loss {} → {}: did not halve",
        first.loss,
        last.loss
    );
    // Three classes: chance is 33%; the blobs are separable to about 90%.
    assert!(last.accuracy > 0.85, "final accuracy {}", last.accuracy);
    assert!(curve.iter().all(|s| s.loss.is_finite() && s.skipped == 0));
}

#[test]
fn train_mlp_with_zero_lr_does_not_learn() {
    // The control: the same run with lr = 0 must leave the loss where it was, so the test
    // above measures the optimizer and not something else.
    let config = train_mlp::Config {
        epochs: 2,
        lr: 0.0,
        ..Default::default()
    };
    let curve = train_mlp::train(&LearnedOptimizer::demo(), &config, |_| {}).unwrap();
    assert_eq!(curve[0].loss, curve.last().unwrap().loss);
}

/// `examples/pytorch_ptx.py` builds the launch table and block starts in numpy from
/// `mulo_model.json`; byte for byte they must be what the Rust host
/// ([`PackedModel::table`](mulo::backend::cuda::packed::PackedModel::table) and
/// `block_starts`) writes, since both drive the same kernels. The script's dry run (no GPU)
/// dumps them. Needs python3 with numpy (required under `CI=true`).
#[test]
fn pytorch_ptx_host_protocol_matches_the_rust_host() {
    use mulo::backend::cuda::packed::PackedModel;
    use mulo::backend::Hyper;
    let have_numpy = std::process::Command::new("python3")
        .args(["-c", "import numpy"])
        .status()
        .is_ok_and(|s| s.success());
    if !have_numpy {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "python3 with numpy is missing under CI (scripts/setup installs it)"
        );
        eprintln!("SKIPPED pytorch_ptx_host_protocol_matches_the_rust_host: no python3 with numpy");
        return;
    }
    // The example's model: Linear 2→32, 32→3 (weight, bias each).
    let dims: [&[usize]; 4] = [&[32, 2], &[32], &[3, 32], &[3]];
    let shapes: Vec<mulo::shape::Layout> = dims
        .iter()
        .map(|d| mulo::shape::Layout::new(mulo::shape::Shape::new(d.to_vec()).unwrap()))
        .collect();
    let model = PackedModel::new(&LearnedOptimizer::demo(), &shapes).unwrap();
    let dir = std::env::temp_dir().join(format!("mulo-pytorch-ptx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let manifest = model.manifest("sm_80", (12, 0)).unwrap();
    std::fs::write(
        dir.join("mulo_model.json"),
        serde_json::to_string_pretty(&manifest).unwrap(),
    )
    .unwrap();
    let dump = dir.join("table.bin");
    let out = std::process::Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/pytorch_ptx.py"
        ))
        .args([
            "--dry-run",
            "--lr",
            "0.25",
            "--weight-decay",
            "0.01",
            "--step",
            "3",
        ])
        .arg("--model-dir")
        .arg(&dir)
        .arg("--dump-table")
        .arg(&dump)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pytorch_ptx.py --dry-run failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let hyper = Hyper {
        lr: 0.25,
        weight_decay: 0.01,
    };
    // The example's stand-in arena addresses for a dry run: arena k at (k + 1) << 40.
    let bases = mulo::backend::cuda::packed::ArenaBases {
        arenas: std::array::from_fn(|k| (k as u64 + 1) << 40),
        scratch: 8 << 40,
        partials: 9 << 40,
        rounds: [0; mulo::backend::cuda::packed::MAX_ROUNDS],
    };
    let mut want = model.table(
        &model.arena_addrs(&bases),
        &vec![Some((hyper, 3)); shapes.len()],
    );
    for s in model.block_starts(&vec![true; shapes.len()]) {
        want.extend(s.to_le_bytes());
    }
    let got = std::fs::read(&dump).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(got.len(), want.len(), "table + starts sizes differ");
    assert_eq!(
        got, want,
        "the Python host writes another table than the Rust host"
    );
}
