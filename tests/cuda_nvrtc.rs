//! The CUDA backend without a GPU: NVRTC compiles the generated source of every shape class for
//! sm_80 and sm_90, and the PTX's kernel signatures agree with the manifest.
//!
//! Needs libnvrtc (CI installs the `nvidia-cuda-nvrtc-cu12` wheel and puts its lib folder on
//! LD_LIBRARY_PATH). Without it each test prints why it is skipped and passes.

mod common;

use common::nvrtc_or_skip;
use mulo::backend::cuda::{self, manifest::Manifest, nvrtc};
use mulo::lopt::LearnedOptimizer;
use mulo::shape::Shape;
use std::path::Path;

/// Shape classes: 1-d, a single element, 0-d, tall, wide, square, a dimension of 1, rank 4.
const SHAPES: [&str; 8] = [
    "37", "1", "scalar", "4096x64", "64x4096", "48x48", "1x300", "16x8x3x3",
];
const ARCHS: [&str; 2] = ["sm_80", "sm_90"];

fn lopt() -> LearnedOptimizer {
    LearnedOptimizer::load(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/golden/weights")
            .to_str()
            .expect("utf-8 path"),
    )
    .expect("fixture weights load")
}

fn check_ptx_against_manifest(shape: &str, ptx: &str, manifest: &Manifest, arch: &str) {
    assert!(
        ptx.contains(&format!(".target {arch}")),
        "{shape}: PTX does not target {arch}"
    );
    let entries = nvrtc::ptx_entries(ptx);
    let names: Vec<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
    for k in &manifest.kernels {
        let Some((_, types)) = entries.iter().find(|(n, _)| *n == k.name) else {
            panic!(
                "{shape}/{arch}: kernel {} of the manifest is not in the PTX ({names:?})",
                k.name
            );
        };
        assert_eq!(
            types.len(),
            manifest.args.len(),
            "{shape}/{arch}: {} takes {} parameters, the manifest lists {}",
            k.name,
            types.len(),
            manifest.args.len()
        );
        for (t, a) in types.iter().zip(&manifest.args) {
            let want = if a.dtype.ends_with('*') {
                ".u64"
            } else {
                ".f32"
            };
            assert_eq!(t, want, "{shape}/{arch}: {} argument {}", k.name, a.name);
        }
        assert!(
            k.grid[0] >= 1 && k.block[0] == 256,
            "{shape}: launch dims of {}",
            k.name
        );
    }
    assert_eq!(
        entries.len(),
        manifest.kernels.len(),
        "{shape}/{arch}: the PTX has kernels the manifest does not launch: {names:?}"
    );
}

#[test]
fn every_shape_class_compiles_for_sm80_and_sm90() {
    if !nvrtc_or_skip("every_shape_class_compiles_for_sm80_and_sm90") {
        return;
    }
    let lopt = lopt();
    for shape in SHAPES {
        let ir = mulo::compile_step(&Shape::parse(shape).unwrap(), &lopt).unwrap();
        for arch in ARCHS {
            let compiled = match cuda::compile(&ir, arch, false) {
                Ok(c) => c,
                Err(e) => panic!("{shape} for {arch}: {e}"),
            };
            let m = &compiled.manifest;
            eprintln!(
                "{shape:>9} {arch}: {} kernels, {} elem passes, {} B of PTX, scratch {} f32 + {} f64",
                m.kernels.len(),
                m.elem_passes,
                compiled.ptx.ptx.len(),
                m.scratch[0].len,
                m.scratch[1].len
            );
            check_ptx_against_manifest(shape, &compiled.ptx.ptx, m, arch);
            // Passes over the element data: 3 when factored (q means, feature moments,
            // update), 2 otherwise (feature moments, update).
            let want_passes = if m.factored.is_some() { 3 } else { 2 };
            assert_eq!(m.elem_passes, want_passes, "{shape}");
            // Buffers: canonical, decay-major layout shared with the ONNX target.
            let layout = ir.layout.clone();
            for (b, j) in mulo::ir::Buffer::for_layout(&layout).iter().zip(&m.buffers) {
                assert_eq!(j.name, b.name());
                assert_eq!(j.shape, b.shape(&layout));
                assert_eq!(j.len, b.len(&layout));
            }
            // The weights are exact literals in the source's `__constant__` arrays, which the
            // dense loops read.
            let w = &ir.matrices[0];
            let lit = mulo::backend::cuda::render::f32_literal(w.w(0, 0));
            assert!(
                compiled.source.contains(&lit),
                "{shape}: weight literal {lit} missing"
            );
            let (array, _) = mulo::backend::cuda::render::matrix_names(w);
            assert!(
                compiled
                    .source
                    .contains(&format!("__constant__ float {array}[")),
                "{shape}: no __constant__ array {array}"
            );
            // The manifest round-trips through JSON.
            let back: Manifest = serde_json::from_str(&m.to_json()).unwrap();
            assert_eq!(&back, m);
        }
    }
}

#[test]
fn disk_cache_skips_nvrtc_the_second_time() {
    if !nvrtc_or_skip("disk_cache_skips_nvrtc_the_second_time") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("mulo-cache-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // Only this test reads the cache directory from the environment.
    std::env::set_var("MULO_CACHE_DIR", &dir);
    let ir = mulo::compile_step(&Shape::parse("5x3").unwrap(), &lopt()).unwrap();
    let first = cuda::compile(&ir, "sm_80", true).unwrap();
    let second = cuda::compile(&ir, "sm_80", true).unwrap();
    assert!(!first.ptx.from_cache);
    assert!(
        second.ptx.from_cache,
        "second compilation did not hit {}",
        dir.display()
    );
    assert_eq!(first.ptx.ptx, second.ptx.ptx);
    assert!(dir.join(format!("{}.ptx", first.ptx.key)).is_file());
    let other_arch = cuda::compile(&ir, "sm_90", true).unwrap();
    assert!(
        !other_arch.ptx.from_cache,
        "the key must include the architecture"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn writes_the_three_files_and_rejects_bad_arch() {
    if !nvrtc_or_skip("writes_the_three_files_and_rejects_bad_arch") {
        return;
    }
    let ir = mulo::compile_step(&Shape::parse("7x2").unwrap(), &lopt()).unwrap();
    let compiled = cuda::compile(&ir, "sm_80", false).unwrap();
    let dir = std::env::temp_dir().join(format!("mulo-cuda-out-{}", std::process::id()));
    let paths = compiled.write_to(&dir).unwrap();
    for p in &paths {
        assert!(p.is_file(), "{} missing", p.display());
    }
    let json = std::fs::read_to_string(&paths[2]).unwrap();
    let m: Manifest = serde_json::from_str(&json).unwrap();
    assert_eq!(m.shape, vec![7, 2]);
    let _ = std::fs::remove_dir_all(&dir);
    let err = cuda::compile(&ir, "ampere", false).unwrap_err().to_string();
    assert!(err.contains("ampere"), "{err}");
}

/// The packed program of a model holding every shape class at once compiles, and its entry
/// points are the model's launches with the argument list of `templates/model_kernel.cu.j2`.
#[test]
fn packed_model_program_compiles_for_every_shape_class() {
    if !nvrtc_or_skip("packed_model_program_compiles_for_every_shape_class") {
        return;
    }
    use mulo::backend::cuda::packed::PackedModel;
    // Every shape class, some twice (tensors of one shape share a plan).
    let shapes: Vec<mulo::shape::Layout> =
        ["64x32", "37", "16x8x3x3", "scalar", "1x300", "64x32", "37"]
            .iter()
            .map(|s| mulo::shape::Layout::new(Shape::parse(s).unwrap()))
            .collect();
    let model = PackedModel::new(&lopt(), &shapes).unwrap();
    assert_eq!(model.plans.len(), 5);
    let source = model.source().unwrap();
    let t = std::time::Instant::now();
    let compiled = nvrtc::compile(&source, "sm_80", true).unwrap();
    eprintln!(
        "packed model of {} tensors / {} plans: NVRTC {:.1} s ({})",
        model.tensors.len(),
        model.plans.len(),
        t.elapsed().as_secs_f64(),
        if compiled.from_cache {
            "disk cache"
        } else {
            "compiled"
        }
    );
    let entries = nvrtc::ptx_entries(&compiled.ptx);
    let names: Vec<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
    let slots: Vec<&str> = model.slots.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names.len(), slots.len(), "{names:?}");
    for (name, types) in &entries {
        assert!(slots.contains(&name.as_str()), "{name} is not a slot");
        // table, starts, tensor count, 7 arenas, scratch, partials.
        assert_eq!(types.len(), 12, "{name}: {types:?}");
        assert_eq!(
            types.iter().filter(|t| t.contains("u64")).count(),
            11,
            "{name}: {types:?}"
        );
    }
}
