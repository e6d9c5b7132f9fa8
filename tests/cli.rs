//! The `mulo-compile` command line: compile form, shape errors, replay, weights messages.

mod common;

use std::process::{Command, Output};

fn mulo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mulo-compile"))
        .args(args)
        // An empty cache, so the default weights are predictable, and never the network (the
        // downloads are tests/hub.rs's, against a loopback server).
        .env("HF_HUB_CACHE", common::temp_dir("cli-empty-cache"))
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("mulo-compile runs")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_documents_the_compile_form_and_subcommands() {
    let (stdout, _) = text(&mulo(&["--help"]));
    for word in [
        "--shape",
        "--target",
        "--weights",
        "--meta",
        "--output",
        "replay",
        "bench",
        "demo-weights",
    ] {
        assert!(stdout.contains(word), "--help lacks {word}:\n{stdout}");
    }
    let (stdout, _) = text(&mulo(&["replay", "--help"]));
    assert!(
        stdout.contains("--tol") && stdout.contains("--target"),
        "{stdout}"
    );
}

#[test]
fn malformed_shapes_are_rejected_with_a_clear_message() {
    for bad in ["0x5", "1024x", "x", "-3", "4x2x", "1099511627776x2"] {
        let out = mulo(&["--shape", bad, "--target", "ir"]);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{bad}: {stderr}");
        assert!(
            stderr.contains("invalid shape") && stderr.contains(bad),
            "{bad}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let out = mulo(&["--target", "ir"]);
    assert!(text(&out).1.contains("--shape is required"));
}

#[test]
fn compile_ir_prints_the_text_form_and_names_the_weights() {
    let out = mulo(&["--shape", "64x32", "--target", "ir"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.starts_with("mulo step ir"), "{stdout}");
    assert!(
        stderr.contains("DEMO"),
        "without weights the demo network is used and said so: {stderr}"
    );

    let weights = common::golden_dir().join("weights");
    let out = mulo(&[
        "--shape",
        "16x8x3x3",
        "--target",
        "ir",
        "--weights",
        weights.to_str().unwrap(),
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("directory") && !stderr.contains("DEMO"),
        "{stderr}"
    );
    assert!(stdout.contains("factored d0=0 d1=1"));

    let out = mulo(&["--shape", "64x32", "--weights", "btherien/mulo"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("not in the local Hugging Face cache"),
        "{stderr}"
    );
}

#[test]
fn replay_reports_per_case_and_fails_over_tolerance() {
    let weights = common::golden_dir().join("weights");
    let cases = ["vec_37", "mat_48x48", "conv_16x8x3x3"].map(|c| {
        common::golden_dir()
            .join(format!("{c}.safetensors"))
            .to_string_lossy()
            .into_owned()
    });
    let mut args = vec![
        "replay",
        "--target",
        "interp",
        "--weights",
        weights.to_str().unwrap(),
    ];
    args.extend(cases.iter().map(String::as_str));
    let out = mulo(&args);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("3 of 3 cases within tolerance"), "{stdout}");
    for c in ["vec_37", "mat_48x48", "conv_16x8x3x3"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(c) && l.contains(" ok")),
            "{c}: {stdout}"
        );
    }

    // A tolerance no f32 implementation meets: exit status 1.
    args.splice(1..1, ["--tol", "1e-12"]);
    let out = mulo(&args);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out).0);
    assert!(text(&out).0.contains("OVER TOLERANCE"));

    // The wrong learned optimizer is far off.
    let out = mulo(&["replay", cases[1].as_str()]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "demo weights cannot replay the fixture trajectory"
    );

    let out = mulo(&[
        "replay",
        "--weights",
        weights.to_str().unwrap(),
        "/nonexistent/case.safetensors",
    ]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("/nonexistent/case.safetensors"), "{stderr}");
}

#[test]
fn bench_prints_a_json_last_line() {
    let out = mulo(&["bench", "--shape", "32x16", "--steps", "2", "--warmup", "1"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let last = stdout.lines().last().unwrap();
    let json: serde_json::Value = serde_json::from_str(last).unwrap();
    for key in ["shape", "target", "steps", "median_ns", "ns_per_element"] {
        assert!(json.get(key).is_some(), "{key} missing in {last}");
    }
    assert_eq!(json["shape"], "32x16");
    assert_eq!(json["steps"], 2);
}

#[test]
fn factored_axes_are_an_argument_of_compile_and_bench() {
    let weights = common::golden_dir().join("weights");
    let w = weights.to_str().unwrap();
    // The IR text names the axes it was built for.
    let out = mulo(&[
        "--shape",
        "32x32x3x3",
        "--factored-axes",
        "0,1",
        "--weights",
        w,
    ]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let default = text(&mulo(&["--shape", "32x32x3x3", "--weights", w])).0;
    assert_ne!(stdout, default, "other axes, other program");
    // Bad pairs are errors naming the argument, not panics.
    for (axes, words) in [
        ("0,0", "same axis"),
        ("0,2", "d1 a largest of the others"),
        ("1", "D0,D1"),
    ] {
        let out = mulo(&["--shape", "32x32x3x3", "--factored-axes", axes]);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{axes}: {stderr}");
        assert!(
            stderr.contains("--factored-axes") && stderr.contains(words),
            "{axes}: {stderr}"
        );
    }
    let out = mulo(&["--shape", "64", "--factored-axes", "0,1"]);
    assert!(text(&out).1.contains("rank 1"), "{}", text(&out).1);
    let out = mulo(&[
        "--shape",
        "4x4",
        "--shape",
        "8",
        "--factored-axes",
        "0,1",
        "--target",
        "cuda",
    ]);
    assert!(text(&out).1.contains("one per --shape"), "{}", text(&out).1);
    // bench takes them too.
    let out = mulo(&[
        "bench",
        "--shape",
        "8x8x3x3",
        "--factored-axes",
        "0,1",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--weights",
        w,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).1);
}

/// `--shard-rows` (a rank's staged program) is checked before anything is compiled: one per
/// `--shape`, a row count or `whole`, at most the tensor's rows, `--target cuda` only.
#[test]
fn shard_rows_are_checked_before_compiling() {
    for (args, words) in [
        (
            &[
                "--shape",
                "8x4",
                "--shape",
                "5",
                "--shard-rows",
                "4",
                "--target",
                "cuda",
            ][..],
            "one per --shape",
        ),
        (
            &["--shape", "8x4", "--shard-rows", "half", "--target", "cuda"][..],
            "expected a row count or `whole`",
        ),
        (
            &[
                "--shape",
                "8x4",
                "--shard-rows",
                "9",
                "--target",
                "cuda",
                "--arch",
                "sm_80",
            ][..],
            "9 rows is not a shard of a 8x4 tensor",
        ),
        (
            &[
                "--shape",
                "scalar",
                "--shard-rows",
                "1",
                "--target",
                "cuda",
                "--arch",
                "sm_80",
            ][..],
            "not a shard",
        ),
        (
            &["--shape", "8x4", "--shard-rows", "4", "--target", "onnx"][..],
            "--shard-rows",
        ),
    ] {
        let out = mulo(args);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(words), "{args:?}: {stderr}");
    }
}

/// `replay` takes the axes from the trajectory's `factored_axes` metadata: the tied case
/// replays within tolerance, and the 0-d case too.
#[test]
fn replay_uses_the_recorded_axes_and_steps_0d_tensors() {
    let dir = common::golden_dir();
    let weights = dir.join("weights");
    for case in ["conv_32x32x3x3_tie", "scalar_0d"] {
        let path = dir.join(format!("{case}.safetensors"));
        let out = mulo(&[
            "replay",
            "--weights",
            weights.to_str().unwrap(),
            path.to_str().unwrap(),
        ]);
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(0), "{case}: {stdout}{stderr}");
        assert!(stdout.contains("1 of 1 cases within tolerance"), "{stdout}");
    }
}

#[test]
fn a_shape_too_large_for_the_machine_exits_2_naming_it() {
    // 2^40 elements: a valid shape (the maximum), but 4 TiB per buffer. An infallible
    // allocation aborted the process (SIGABRT) here.
    for target in ["cpu", "interp"] {
        let out = mulo(&[
            "bench",
            "--shape",
            "1048576x1048576",
            "--target",
            target,
            "--steps",
            "1",
        ]);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{target}: {stderr}");
        assert!(
            stderr.contains("--shape 1048576x1048576") && stderr.contains("host memory"),
            "{target}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[cfg(unix)]
#[test]
fn output_onto_dev_null_writes_into_it_and_leaves_the_device() {
    use std::os::unix::fs::FileTypeExt;
    let out = mulo(&["--shape", "4", "--target", "ir", "-o", "/dev/null"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).1);
    assert!(std::fs::metadata("/dev/null")
        .unwrap()
        .file_type()
        .is_char_device());
}
