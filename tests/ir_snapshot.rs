//! The IR's text form is stable: it is compared with the files in `tests/snapshots/`.
//! After an intended change, re-bless with `MULO_BLESS=1 cargo test --test ir_snapshot`.

mod common;

use mulo::shape::Shape;
use std::path::PathBuf;

fn check(shape: &str, file: &str) {
    let ir = mulo::compile_step(&Shape::parse(shape).unwrap(), &common::fixture_lopt()).unwrap();
    let text = ir.to_text();
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(file);
    if std::env::var_os("MULO_BLESS").is_some() {
        std::fs::write(&path, &text).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|_| panic!("{} missing: run with MULO_BLESS=1", path.display()));
    if want != text {
        let first = want.lines().zip(text.lines()).position(|(a, b)| a != b);
        panic!(
            "IR text of {shape} changed (first differing line {first:?}):\n--- expected\n{}\n--- got\n{}\nre-bless with MULO_BLESS=1 if intended",
            first.and_then(|i| want.lines().nth(i)).unwrap_or("<end>"),
            first.and_then(|i| text.lines().nth(i)).unwrap_or("<end>")
        );
    }
}

#[test]
fn factored_64x32_text_form() {
    check("64x32", "ir_64x32.txt");
}

#[test]
fn unfactored_37_text_form() {
    check("37", "ir_37.txt");
}

#[test]
fn text_form_names_every_feature_once() {
    let ir =
        mulo::compile_step(&Shape::parse("16x8x3x3").unwrap(), &common::fixture_lopt()).unwrap();
    let text = ir.to_text();
    for j in 0..28 {
        let tag = format!("# normalized feature {j}\n");
        assert_eq!(text.matches(&tag).count(), 1, "feature {j}");
    }
    assert!(text.contains("factored d0=0 d1=1"));
    assert!(text.contains("domain rest [3, 3]"));
}
