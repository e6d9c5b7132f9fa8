//! The generated CUDA source, executed on the CPU: a small emulation layer (threads of a block
//! are OS threads meeting at a barrier for `__syncthreads` and shuffles) lets g++ compile
//! `mulo_step.cu` unchanged, so the kernels' semantics — indexing, scheduling, reductions —
//! are checked against the golden trajectories and the interpreter without a GPU.
//!
//! What this does not check: GPU-specific behaviour (memory model across blocks beyond
//! kernel boundaries, warp-synchronous execution, NVRTC's math library, FMA contraction).
//! Skipped, with the reason printed, when no C++20 compiler (`g++`) is available.

mod common;

use common::emulation::{
    compile_with, constants_loader, gxx_or_skip, try_run, Seeds, EMULATION, LAUNCH,
};
use cuda::manifest::ConstantJson;
use mulo::backend::cuda;
use mulo::backend::interp::InterpStepper;
use mulo::backend::{check_step_args, Hyper, TensorStepper};
use mulo::error::Result;
use mulo::ir::{Buffer, StepIr};
use mulo::shape::{Layout, Shape};
use mulo::state::TensorState;
use mulo::trajectory::{max_abs_diff, replay, Trajectory, DEFAULT_TOLERANCE};
use proptest::prelude::*;
use std::path::PathBuf;
use std::sync::Arc;

/// Runs steps by executing the generated kernels compiled for the CPU.
struct EmulatedStepper {
    layout: Layout,
    exe: PathBuf,
    dir: PathBuf,
    state: TensorState,
    seeds: Seeds,
}

impl EmulatedStepper {
    fn new(ir: &StepIr, name: &str) -> Self {
        Self::with_schedule(ir, name, cuda::schedule::schedule(ir))
    }

    /// Emulates the kernels of `schedule` (a schedule of `ir`).
    fn with_schedule(ir: &StepIr, name: &str, schedule: cuda::schedule::Schedule) -> Self {
        Self::planted(ir, name, schedule, |_, _| {}, None)
    }

    /// [`with_schedule`](Self::with_schedule), the generated source and the manifest's
    /// `constants` edited by `plant` before the program is built (a planted defect), compiled
    /// with the sanitizers `sanitize` (else those of `MULO_EMU_SANITIZE`).
    fn planted(
        ir: &StepIr,
        name: &str,
        schedule: cuda::schedule::Schedule,
        plant: impl FnOnce(&mut String, &mut Vec<ConstantJson>),
        sanitize: Option<&str>,
    ) -> Self {
        let mut generated = cuda::CudaSource {
            source: cuda::render::render(ir, &schedule).expect("renders"),
            schedule,
        };
        let mut manifest =
            cuda::manifest::Manifest::new(ir, &generated.schedule, "sm_80", (0, 0)).unwrap();
        plant(&mut generated.source, &mut manifest.constants);
        let dir = std::env::temp_dir().join(format!("mulo-emu-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("mulo_step.cu"), &generated.source).unwrap();
        let layout = ir.layout.clone();
        let buffers = Buffer::for_layout(&layout);
        let mut main = String::from(EMULATION);
        main.push_str("#include \"mulo_step.cu\"\n");
        main.push_str(LAUNCH);
        main.push_str(&constants_loader(
            &dir,
            &generated.source,
            &manifest.constants,
        ));
        main.push_str(
            "struct Args { float* b[8]; float* scratch; double* partials; float lr, wd, step; };\n",
        );
        let call_args: Vec<String> = (0..buffers.len())
            .map(|i| format!("x->b[{i}]"))
            .chain([
                "x->scratch".into(),
                "x->partials".into(),
                "x->lr".into(),
                "x->wd".into(),
                "x->step".into(),
            ])
            .collect();
        for k in &manifest.kernels {
            main.push_str(&format!(
                "static void call_{0}(void* a) {{ Args* x = (Args*)a; {0}({1}); }}\n",
                k.name,
                call_args.join(", ")
            ));
        }
        main.push_str("int main(int argc, char** argv) {\n    mulo_fill_constants();\n    FILE* f = fopen(argv[1], \"rb\"); Args a;\n    float s[3]; if (fread(s, 4, 3, f) != 3) return 3; a.lr = s[0]; a.wd = s[1]; a.step = s[2];\n");
        for (i, b) in buffers.iter().enumerate() {
            let n = b.len(&layout);
            main.push_str(&format!(
                "    a.b[{i}] = (float*)malloc({n} * 4); if (fread(a.b[{i}], 4, {n}, f) != {n}) return 3;\n"
            ));
        }
        main.push_str(&format!(
            "    fclose(f);\n    a.scratch = (float*)mulo_poisoned({} * 4); a.partials = (double*)mulo_poisoned({} * 8);\n",
            manifest.scratch[0].len, manifest.scratch[1].len
        ));
        for k in &manifest.kernels {
            main.push_str(&format!(
                "    mulo_launch({}, call_{}, &a);\n",
                k.grid[0], k.name
            ));
        }
        main.push_str("    FILE* o = fopen(argv[2], \"wb\");\n");
        for (i, b) in buffers.iter().enumerate() {
            main.push_str(&format!(
                "    fwrite(a.b[{i}], 4, {}, o);\n",
                b.len(&layout)
            ));
        }
        main.push_str("    fclose(o);\n    return 0;\n}\n");
        std::fs::write(dir.join("main.cpp"), main).unwrap();
        let sanitize = sanitize
            .map(str::to_string)
            .or_else(|| std::env::var("MULO_EMU_SANITIZE").ok());
        let exe = compile_with(&dir, sanitize.as_deref().filter(|s| !s.is_empty()));
        let state = TensorState::zeros(&layout, 0);
        EmulatedStepper {
            layout,
            exe,
            dir,
            state,
            seeds: Seeds::default(),
        }
    }
}

impl Drop for EmulatedStepper {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl TensorStepper for EmulatedStepper {
    fn target(&self) -> &'static str {
        "cuda-emulated"
    }
    fn layout(&self) -> &Layout {
        &self.layout
    }
    fn step(&mut self, param: &mut [f32], grad: &[f32], hyper: Hyper) -> Result<()> {
        check_step_args(&self.layout, param.len(), grad.len(), &hyper)?;
        self.try_step(param, grad, hyper)
            .unwrap_or_else(|e| panic!("emulated step failed: {e}"));
        Ok(())
    }
    fn state(&self) -> Result<TensorState> {
        Ok(self.state.clone())
    }
    fn set_state(&mut self, state: TensorState) -> Result<()> {
        self.state = state;
        Ok(())
    }
}

impl EmulatedStepper {
    /// One step; an error holding what the program printed when it fails (a sanitizer's
    /// report), parameters and state then unchanged.
    fn try_step(
        &mut self,
        param: &mut [f32],
        grad: &[f32],
        hyper: Hyper,
    ) -> std::result::Result<(), String> {
        let mut bytes = Vec::new();
        let mut push = |v: &[f32]| v.iter().for_each(|x| bytes.extend(x.to_le_bytes()));
        push(&[hyper.lr, hyper.weight_decay, self.state.step as f32]);
        for b in Buffer::for_layout(&self.layout) {
            match b {
                Buffer::Param => push(param),
                Buffer::Grad => push(grad),
                s => push(self.state.get(s)),
            }
        }
        let mut vals = try_run(&self.exe, &self.dir, &bytes, self.seeds.next(), None)?.into_iter();
        for b in Buffer::for_layout(&self.layout) {
            let n = b.len(&self.layout);
            let v: Vec<f32> = vals.by_ref().take(n).collect();
            match b {
                Buffer::Param => param.copy_from_slice(&v),
                Buffer::Grad => {}
                s => self.state.set(s, v).map_err(|e| e.to_string())?,
            }
        }
        self.state.step += 1;
        Ok(())
    }
}

#[test]
fn emulated_kernels_replay_the_golden_trajectories() {
    if !gxx_or_skip("emulated_kernels_replay_the_golden_trajectories") {
        return;
    }
    let lopt = common::fixture_lopt();
    let mut failures = Vec::new();
    for path in common::golden_cases() {
        let traj = Trajectory::load(&path).unwrap();
        let ir = mulo::compile_layout(&traj.layout, &lopt).unwrap();
        let mut s = EmulatedStepper::new(&ir, &traj.name);
        let report = replay(&mut s, &traj).unwrap();
        eprintln!(
            "{:<16} param err {:.3e}, worst {:.3e}",
            report.name,
            report.param_error,
            report.worst()
        );
        if report.worst() > DEFAULT_TOLERANCE {
            failures.push(format!("{report:?}"));
        }
    }
    assert!(failures.is_empty(), "over tolerance: {failures:#?}");
}

/// ELO's rule in the generated CUDA (its `nan_to_num` and update): the ELO golden cases that
/// cover NaN gradients, clipping (applied by the replay driver), a vector, a 0-d tensor and a
/// kernel, from `tests/fixtures/golden_elo`.
#[test]
fn emulated_kernels_replay_elo_golden_trajectories() {
    if !gxx_or_skip("emulated_kernels_replay_elo_golden_trajectories") {
        return;
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden_elo");
    let lopt = mulo::lopt::LearnedOptimizer::from_dir(&dir.join("weights"))
        .unwrap()
        .with_rule(mulo::lopt::Rule::Elo);
    let mut failures = Vec::new();
    for case in [
        "elo_mat_40x24_nan",
        "elo_mat_64x64_clip",
        "elo_vec_37",
        "elo_scalar_0d",
        "elo_conv_16x8x3x3",
    ] {
        let traj = Trajectory::load(&dir.join(format!("{case}.safetensors"))).unwrap();
        let ir = mulo::compile_layout(&traj.layout, &lopt).unwrap();
        let mut s = EmulatedStepper::new(&ir, &traj.name);
        let report = replay(&mut s, &traj).unwrap();
        eprintln!("{report:?}");
        if report.worst() > DEFAULT_TOLERANCE || report.state_errors.is_empty() {
            failures.push(format!("{report:?}"));
        }
    }
    assert!(failures.is_empty(), "over tolerance: {failures:#?}");
}

#[test]
fn emulated_kernels_match_the_interpreter_on_odd_shapes() {
    if !gxx_or_skip("emulated_kernels_match_the_interpreter_on_odd_shapes") {
        return;
    }
    let lopt = common::fixture_lopt();
    for (i, shape) in ["5x7x3", "3x1x40", "70x33", "2x3x4x5"].iter().enumerate() {
        let shape = Shape::parse(shape).unwrap();
        let ir = Arc::new(mulo::compile_step(&shape, &lopt).unwrap());
        let mut emu = EmulatedStepper::new(&ir, &format!("odd{i}"));
        let mut cpu = InterpStepper::new(ir.clone(), 0);
        let n = shape.numel();
        let p0: Vec<f32> = (0..n)
            .map(|k| ((k * 37 % 101) as f32 - 50.0) * 0.02)
            .collect();
        let (mut pe, mut pc) = (p0.clone(), p0.clone());
        let hyper = Hyper {
            lr: 0.1,
            weight_decay: 0.01,
        };
        for step in 0..3usize {
            let g: Vec<f32> = (0..n)
                .map(|k| ((k * 53 + step * 7) % 97) as f32 * 1e-3 - 0.04)
                .collect();
            emu.step(&mut pe, &g, hyper).unwrap();
            cpu.step(&mut pc, &g, hyper).unwrap();
        }
        let err = max_abs_diff(&pe, &pc) / max_abs_diff(&pc, &p0).max(f64::MIN_POSITIVE);
        eprintln!("{shape}: param error {err:.3e}");
        assert!(err <= DEFAULT_TOLERANCE, "{shape}: {err:e}");
        let (se, sc) = (emu.state().unwrap(), cpu.state().unwrap());
        for (b, want) in sc.iter() {
            let s = want
                .iter()
                .fold(0f64, |m, v| m.max(v.abs() as f64))
                .max(f64::MIN_POSITIVE);
            let e = max_abs_diff(se.get(b), want) / s;
            assert!(e <= DEFAULT_TOLERANCE, "{shape}: state {b}: {e:e}");
        }
    }
}

proptest! {
    // Each case compiles a program with g++ (~2 s): few cases, every shape class among them
    // over the runs.
    #![proptest_config(ProptestConfig { cases: 8, ..ProptestConfig::default() })]

    /// Random shapes (rank 0 to 4, dimensions of 1, any valid choice of factored axes when
    /// the largest axes tie), parameters, gradients and starting steps: two steps of the
    /// emulated kernels are bitwise those of the interpreter, parameters and state.
    #[test]
    fn emulated_kernels_match_the_interpreter_on_random_shapes(
        dims in common::random_shapes(400, 40, 7),
        axes_pick in any::<usize>(),
        seed in any::<u64>(),
        start in prop_oneof![Just(0u64), Just(150u64)],
        wd in prop_oneof![Just(0.0f32), Just(0.01f32)],
    ) {
        if !gxx_or_skip("emulated_kernels_match_the_interpreter_on_random_shapes") {
            return Ok(());
        }
        let layout = common::layout_with_axes_pick(dims, axes_pick);
        let (shape, axes) = (layout.shape().clone(), layout.factored());
        let ir = Arc::new(mulo::compile_layout(&layout, &common::fixture_lopt()).unwrap());
        eprintln!("{shape}, factored axes {axes:?}");
        let emu = EmulatedStepper::new(&ir, &format!("prop{seed:x}"));
        let n = shape.numel();
        let hyper = Hyper { lr: 0.1, weight_decay: wd };
        let p0 = common::spread_values(n, seed, 0);
        assert_bitwise_as_the_interpreter_from(emu, &ir, start, hyper, p0, |k| {
            common::spread_values(n, seed ^ 0xABCD, k + 1)
        });
    }
}

/// The two-level finish of the one-block means (chunk sums over many blocks, then one block
/// summing the chunks), and the points of multi-block small kernels spread over more blocks
/// than they fill, which only tensors of over a million elements take by default, forced on
/// small shapes: every chunked mean, element or small-domain, bitwise as the interpreter; and
/// the same spread over 3 blocks without chunks.
#[test]
fn emulated_chunked_means_match_the_interpreter() {
    if !gxx_or_skip("emulated_chunked_means_match_the_interpreter") {
        return;
    }
    let lopt = common::fixture_lopt();
    for (i, (shape, chunk)) in [("70x33", true), ("3x1x40", true), ("70x33", false)]
        .into_iter()
        .enumerate()
    {
        let shape = Shape::parse(shape).unwrap();
        let ir = Arc::new(mulo::compile_step(&shape, &lopt).unwrap());
        if !chunk {
            // Every domain of more than 3 points over 3 blocks; nothing chunked.
            let schedule = cuda::schedule::schedule_with(&ir, usize::MAX, 3);
            assert!(schedule.chunks.is_empty());
            assert!(schedule
                .kernels
                .iter()
                .any(|k| matches!(&k.kind, cuda::schedule::KernelKind::Small { blocks: 3, .. })));
            let emu = EmulatedStepper::with_schedule(&ir, &format!("spread{i}"), schedule);
            assert_bitwise_as_the_interpreter(emu, &ir);
            continue;
        }
        // Chunks over 4 blocks (264 by default): a few values each.
        let schedule = cuda::schedule::schedule_with(&ir, 0, 4);
        // Both kinds of chunked means are there, and a multi-block kernel sums their chunks.
        let chunked: Vec<_> = schedule.chunks.keys().copied().collect();
        let elem = |v: &mulo::ir::ValueId| matches!(ir.node(*v).op, mulo::ir::Op::Mean(a) if ir.node(a).domain == mulo::shape::Domain::Elem);
        assert!(chunked.iter().any(elem), "{shape}: no chunked element mean");
        if i == 0 {
            assert!(
                !chunked.iter().all(elem),
                "{shape}: no chunked small-domain mean"
            );
        }
        assert!(schedule.kernels.iter().any(|k| matches!(
            &k.kind,
            cuda::schedule::KernelKind::Small { blocks, chunked, .. } if *blocks >= 4 && !chunked.is_empty()
        )));
        let emu = EmulatedStepper::with_schedule(&ir, &format!("chunk{i}"), schedule);
        assert_bitwise_as_the_interpreter(emu, &ir);
    }
}

/// Two steps of `emu` and of the interpreter on `ir`: parameters and state bitwise equal.
fn assert_bitwise_as_the_interpreter(emu: EmulatedStepper, ir: &Arc<StepIr>) {
    let n = ir.layout.shape().numel();
    let p0: Vec<f32> = (0..n)
        .map(|k| ((k * 37 % 101) as f32 - 50.0) * 0.02)
        .collect();
    let hyper = Hyper {
        lr: 0.1,
        weight_decay: 0.01,
    };
    assert_bitwise_as_the_interpreter_from(emu, ir, 0, hyper, p0, |step| {
        (0..n)
            .map(|k| ((k * 53 + step * 7) % 97) as f32 * 1e-3 - 0.04)
            .collect()
    });
}

/// Two steps of `emu` and of the interpreter on `ir` from parameters `p0` and zero state at
/// step `start`, with gradients `grad(0)` and `grad(1)`: parameters after each step and the
/// state at the end bitwise equal (`to_bits`: also the sign of zeros, NaNs).
fn assert_bitwise_as_the_interpreter_from(
    mut emu: EmulatedStepper,
    ir: &Arc<StepIr>,
    start: u64,
    hyper: Hyper,
    p0: Vec<f32>,
    grad: impl Fn(usize) -> Vec<f32>,
) {
    let shape = ir.layout.shape().clone();
    emu.set_state(TensorState::zeros(&ir.layout, start))
        .unwrap();
    let mut cpu = InterpStepper::new(ir.clone(), start);
    let (mut pe, mut pc) = (p0.clone(), p0);
    let same = |a: &[f32], b: &[f32]| {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    };
    for step in 0..2usize {
        let g = grad(step);
        emu.step(&mut pe, &g, hyper).unwrap();
        cpu.step(&mut pc, &g, hyper).unwrap();
        let err = max_abs_diff(&pe, &pc);
        eprintln!("{shape} step {step}: param difference {err:.3e}");
        assert!(
            same(&pe, &pc),
            "{shape} step {step}: the step changed ({err:e})"
        );
    }
    let (se, sc) = (emu.state().unwrap(), cpu.state().unwrap());
    assert_eq!(se.step, sc.step, "{shape}: step count");
    for (b, want) in sc.iter() {
        assert!(same(se.get(b), want), "{shape}: state {b}");
    }
}

/// A synthetic IR that exercises what μLO does not: an element mean onto the rest domain
/// (several rest points), a width-2 mean onto the column domain, a step mean, and a second
/// level depending on all of them. The scheduler and renderer must handle it because they are
/// generic over the IR.
fn synthetic_ir(shape: &str) -> StepIr {
    synthetic_ir_of(Layout::new(Shape::parse(shape).unwrap()))
}

/// [`synthetic_ir`] of a layout (explicit factored axes allowed).
fn synthetic_ir_of(layout: Layout) -> StepIr {
    use mulo::ir::{IrBuilder, RuntimeScalar, Unary};
    use mulo::shape::Domain;
    let mut b = IrBuilder::new(layout, "synthetic".into());
    let g = b.load(Buffer::Grad, 0);
    let p = b.load(Buffer::Param, 0);
    let g2 = b.unary(Unary::Square, g);
    let m_rest = b.mean(g2, Domain::Rest);
    let pair = b.pack(vec![g, p]);
    let m_col = b.mean(pair, Domain::Col);
    let m_step = b.mean(g2, Domain::Step);
    let c0 = b.lane(m_col, 0);
    let c1 = b.lane(m_col, 1);
    let a = b.mul(g, m_rest);
    let bb = b.mul(c0, m_step);
    let x = b.add(a, bb);
    let x2 = b.unary(Unary::Square, x);
    let m_row = b.mean(x2, Domain::Row);
    let m_rest2 = b.mean(m_row, Domain::Rest);
    let lr = b.scalar(RuntimeScalar::Lr);
    let xr = b.mul(x, m_row);
    let upd = b.mul(lr, xr);
    let p1 = b.sub(p, upd);
    let p2 = b.add(p1, m_rest2);
    b.store(Buffer::Param, 0, p2);
    for lane in 0..3 {
        b.store(Buffer::Mom, lane, x);
        b.store(Buffer::FacRow, lane, m_row);
        b.store(Buffer::FacCol, lane, c1);
    }
    b.store(Buffer::Rms, 0, x2);
    let ir = b.finish();
    mulo::ir::verify(&ir).unwrap();
    ir
}

#[test]
fn emulated_kernels_run_a_synthetic_ir_with_rest_and_vector_means() {
    if !gxx_or_skip("emulated_kernels_run_a_synthetic_ir_with_rest_and_vector_means") {
        return;
    }
    for (i, shape) in ["4x6x5", "3x40x7x2"].iter().enumerate() {
        let ir = Arc::new(synthetic_ir(shape));
        let mut emu = EmulatedStepper::new(&ir, &format!("syn{i}"));
        let mut cpu = InterpStepper::new(ir.clone(), 0);
        let n = ir.layout.numel();
        let p0: Vec<f32> = (0..n)
            .map(|k| ((k * 37 % 101) as f32 - 50.0) * 0.02)
            .collect();
        let g: Vec<f32> = (0..n)
            .map(|k| ((k * 53 % 97) as f32 - 48.0) * 0.01)
            .collect();
        let (mut pe, mut pc) = (p0.clone(), p0);
        let hyper = Hyper {
            lr: 0.1,
            weight_decay: 0.0,
        };
        emu.step(&mut pe, &g, hyper).unwrap();
        cpu.step(&mut pc, &g, hyper).unwrap();
        let scale = pc.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
        let err = max_abs_diff(&pe, &pc) / scale;
        eprintln!("synthetic {shape}: param error {err:.3e}");
        assert!(err <= 1e-6, "{shape}: {err:e}");
        let (se, sc) = (emu.state().unwrap(), cpu.state().unwrap());
        for (b, want) in sc.iter() {
            let s = want
                .iter()
                .fold(0f64, |m, v| m.max(v.abs() as f64))
                .max(f64::MIN_POSITIVE);
            let e = max_abs_diff(se.get(b), want) / s;
            assert!(e <= 1e-6, "{shape}: state {b}: {e:e}");
        }
    }
}

/// Rank-4 tensors whose factored axis X is not the contiguous one: the elem kernels' threads
/// run along X' = (X, the inner rest axes), and the means reducing X sum threads
/// `inner_len` apart (9 and 7: not powers of two; 36: longer than a warp's row segment), with
/// tied factored axes given in both orders (the row and column means swap kinds).
/// μLO's step and the synthetic IR (an element mean onto the rest points, which keeps the
/// inner axes) both bitwise as the interpreter.
#[test]
fn emulated_rank_4_with_inner_axes_matches_the_interpreter_bitwise() {
    if !gxx_or_skip("emulated_rank_4_with_inner_axes_matches_the_interpreter_bitwise") {
        return;
    }
    let lopt = common::fixture_lopt();
    for (i, (shape, axes, inner_len)) in [
        ("6x5x3x3", None, 9),
        ("7x3x7x7", Some((0, 2)), 7),
        ("7x3x7x7", Some((2, 0)), 7),
        ("9x8x6x6", None, 36),
    ]
    .into_iter()
    .enumerate()
    {
        let axes = axes.map(|(d0, d1)| mulo::FactoredAxes { d0, d1 });
        let layout = Layout::with_axes(Shape::parse(shape).unwrap(), axes).unwrap();
        let tiling = cuda::schedule::Tiling::of(&layout);
        assert_eq!(tiling.inner_len, inner_len, "{shape}");
        let ir = Arc::new(mulo::compile_layout(&layout, &lopt).unwrap());
        let emu = EmulatedStepper::new(&ir, &format!("inner{i}"));
        assert_bitwise_as_the_interpreter(emu, &ir);
        let ir = Arc::new(synthetic_ir_of(layout));
        let schedule = cuda::schedule::schedule(&ir);
        assert!(
            schedule.kernels.iter().any(|k| matches!(
                &k.kind,
                cuda::schedule::KernelKind::Elem { means, .. }
                    if means.iter().any(|m| m.kind == cuda::schedule::PartialKind::KeepInner)
            )),
            "{shape}: no mean onto the rest points with inner axes"
        );
        let emu = EmulatedStepper::with_schedule(&ir, &format!("inner_syn{i}"), schedule);
        assert_bitwise_as_the_interpreter(emu, &ir);
    }
}

/// The reference shape, one step (slow: ~400k emulated threads; run with --ignored).
#[test]
#[ignore]
fn emulated_1024x512_matches_the_interpreter() {
    if !gxx_or_skip("emulated_1024x512_matches_the_interpreter") {
        return;
    }
    let shape = Shape::parse("1024x512").unwrap();
    let ir = Arc::new(mulo::compile_step(&shape, &common::fixture_lopt()).unwrap());
    let mut emu = EmulatedStepper::new(&ir, "big");
    let mut cpu = InterpStepper::new(ir.clone(), 0);
    let n = shape.numel();
    let p0: Vec<f32> = (0..n)
        .map(|k| ((k * 7919 % 1000) as f32 - 500.0) * 1e-3)
        .collect();
    let g: Vec<f32> = (0..n)
        .map(|k| ((k * 104729 % 997) as f32 - 498.0) * 1e-4)
        .collect();
    let (mut pe, mut pc) = (p0.clone(), p0.clone());
    let hyper = Hyper {
        lr: 1e-2,
        weight_decay: 0.0,
    };
    emu.step(&mut pe, &g, hyper).unwrap();
    cpu.step(&mut pc, &g, hyper).unwrap();
    let err = max_abs_diff(&pe, &pc) / max_abs_diff(&pc, &p0).max(f64::MIN_POSITIVE);
    eprintln!("1024x512: param error {err:.3e}");
    assert!(err <= DEFAULT_TOLERANCE, "{err:e}");
}

// The emulation's checks, each shown to catch the defect it guards: a defect planted in
// generated source or in a small hand-written kernel, caught; the same program without it,
// passing.

/// A hand-written program through the emulation layer: `kernels` (each
/// `__global__ void name(float* out, float* buf, double* partials)`, compiled as generated
/// source is), launched as `launches` gives (`(name, grid)`, in order) on poisoned buffers
/// of `n` values; returns the `n` values of `out`, or the failure and what the program printed.
/// Blocks in `order` when given, compiled with the sanitizers `sanitize`.
fn hand_written(
    name: &str,
    kernels: &str,
    launches: &[(&str, u32)],
    n: usize,
    order: Option<&str>,
    sanitize: Option<&str>,
) -> std::result::Result<Vec<f32>, String> {
    let dir = common::temp_dir(&format!("emu-defect-{name}"));
    let mut main = String::from(EMULATION);
    main.push_str(kernels);
    main.push_str(LAUNCH);
    main.push_str("struct Args { float* out; float* buf; double* partials; };\n");
    for (k, _) in launches {
        main.push_str(&format!(
            "static void call_{k}(void* p) {{ Args* x = (Args*)p; {k}(x->out, x->buf, x->partials); }}\n"
        ));
    }
    main.push_str(&format!(
        "int main(int argc, char** argv) {{\n    Args a; a.out = (float*)mulo_poisoned({n} * 4); a.buf = (float*)mulo_poisoned({n} * 4); a.partials = (double*)mulo_poisoned({n} * 8);\n"
    ));
    for (k, grid) in launches {
        main.push_str(&format!("    mulo_launch({grid}, call_{k}, &a);\n"));
    }
    main.push_str(&format!(
        "    FILE* o = fopen(argv[2], \"wb\"); fwrite(a.out, 4, {n}, o); fclose(o);\n    return 0;\n}}\n"
    ));
    std::fs::write(dir.join("main.cpp"), main).unwrap();
    let exe = compile_with(&dir, sanitize);
    let out = try_run(&exe, &dir, &[], 0, order);
    let _ = std::fs::remove_dir_all(&dir);
    out
}

/// A read before a write of the step (an accumulation into a partials buffer that assumes
/// it starts at zero, as it would with the buffers zeroed before every step; on the GPU it
/// holds the last step's sums) gives NaN: the buffers are poisoned.
#[test]
fn emulation_catches_a_read_before_write() {
    if !gxx_or_skip("emulation_catches_a_read_before_write") {
        return;
    }
    let kernel = |init: &str| {
        format!(
            "__global__ void accumulate(float* out, float* buf, double* partials) {{
    const int i = blockIdx.x * 256 + threadIdx.x;
    {init}
    partials[i] += 1.0;
    out[i] = (float)partials[i];
}}\n"
        )
    };
    let planted = hand_written("rbw", &kernel(""), &[("accumulate", 2)], 512, None, None).unwrap();
    assert!(
        planted.iter().all(|x| x.is_nan()),
        "not caught: {planted:?}"
    );
    let fixed = hand_written(
        "rbw-fixed",
        &kernel("partials[i] = 0.0;"),
        &[("accumulate", 2)],
        512,
        None,
        None,
    )
    .unwrap();
    assert!(fixed.iter().all(|&x| x == 1.0), "{fixed:?}");
}

/// A block reading `__shared__` memory it did not write (what an earlier block left there,
/// which the GPU does not promise) reads NaN, in any block order: shared memory is poisoned at
/// each block's start.
#[test]
fn emulation_catches_a_read_of_shared_memory_before_write() {
    if !gxx_or_skip("emulation_catches_a_read_of_shared_memory_before_write") {
        return;
    }
    let kernel = |cond: &str| {
        format!(
            "__global__ void stale(float* out, float* buf, double* partials) {{
    __shared__ float s[256];
    if ({cond}) s[threadIdx.x] = 1.0f;
    __syncthreads();
    out[blockIdx.x * 256 + threadIdx.x] = s[threadIdx.x];
}}\n"
        )
    };
    let planted = hand_written(
        "shared",
        &kernel("blockIdx.x == 0"),
        &[("stale", 3)],
        768,
        Some("ascending"),
        None,
    )
    .unwrap();
    assert!(planted[..256].iter().all(|&x| x == 1.0));
    assert!(
        planted[256..].iter().all(|x| x.is_nan()),
        "not caught: {planted:?}"
    );
    let fixed = hand_written(
        "shared-fixed",
        &kernel("true"),
        &[("stale", 3)],
        768,
        None,
        None,
    )
    .unwrap();
    assert!(fixed.iter().all(|&x| x == 1.0), "{fixed:?}");
}

/// A block reading another block's output of the same launch: right in ascending order (the
/// only order the emulation had), NaN in descending order, and caught by one of the first three
/// runs of a program (the orders a harness's seeds rotate through).
#[test]
fn emulation_catches_a_read_of_another_blocks_output_within_a_launch() {
    if !gxx_or_skip("emulation_catches_a_read_of_another_blocks_output_within_a_launch") {
        return;
    }
    let kernels = "__global__ void neighbour(float* out, float* buf, double* partials) {
    const int i = blockIdx.x * 256 + threadIdx.x;
    buf[i] = (float)blockIdx.x;
    __syncthreads();
    out[i] = blockIdx.x > 0 ? buf[i - 256] : -1.0f;
}\n";
    let want: Vec<f32> = (0..1024).map(|i| (i / 256) as f32 - 1.0).collect();
    let run = |order| hand_written("blocks", kernels, &[("neighbour", 4)], 1024, order, None);
    assert_eq!(run(Some("ascending")).unwrap(), want);
    let desc = run(Some("descending")).unwrap();
    assert!(
        desc[256..].iter().all(|x| x.is_nan()),
        "not caught: {desc:?}"
    );
    // Without a forced order: seeds 0, 1 and 2 start at the three orders.
    let dir = common::temp_dir("emu-defect-blocks-seeds");
    let mut caught = 0;
    for seed in 0..3 {
        let mut main = String::from(EMULATION);
        main.push_str(kernels);
        main.push_str(LAUNCH);
        main.push_str("struct Args { float* out; float* buf; double* partials; };\nstatic void call(void* p) { Args* x = (Args*)p; neighbour(x->out, x->buf, x->partials); }\nint main(int argc, char** argv) {\n    Args a; a.out = (float*)mulo_poisoned(4096); a.buf = (float*)mulo_poisoned(4096); a.partials = nullptr;\n    mulo_launch(4, call, &a);\n    FILE* o = fopen(argv[2], \"wb\"); fwrite(a.out, 4, 1024, o); fclose(o);\n    return 0;\n}\n");
        std::fs::write(dir.join("main.cpp"), main).unwrap();
        let exe = compile_with(&dir, None);
        let out = try_run(&exe, &dir, &[], seed, None).unwrap();
        caught += (out != want) as usize;
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(caught >= 1, "no run of the three seeds caught it");
}

/// Whether ThreadSanitizer can build and run a program here (g++'s libtsan); required under
/// `CI=true`.
fn tsan_or_skip(test: &str) -> bool {
    if !gxx_or_skip(test) {
        return false;
    }
    let ok = hand_written(
        "tsan-probe",
        "__global__ void nothing(float* out, float* buf, double* partials) { out[blockIdx.x * 256 + threadIdx.x] = 0.0f; }\n",
        &[("nothing", 1)],
        256,
        None,
        Some("thread"),
    )
    .is_ok();
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{test}: ThreadSanitizer does not run under CI"
        );
        eprintln!("SKIPPED {test}: g++ -fsanitize=thread does not build or run here");
    }
    ok
}

/// A shuffle synchronizes its warp only: reading shared memory another warp stored before
/// its shuffle, with no `__syncthreads` in between, is a data race (which the old emulation,
/// whose shuffles waited for the whole block, hid); ThreadSanitizer reports it. With the
/// barrier, no report.
#[test]
fn emulation_catches_a_shuffle_taken_for_a_block_barrier() {
    if !tsan_or_skip("emulation_catches_a_shuffle_taken_for_a_block_barrier") {
        return;
    }
    let kernel = |barrier: &str| {
        format!(
            "__global__ void warps(float* out, float* buf, double* partials) {{
    __shared__ double s[256];
    const unsigned t = threadIdx.x;
    s[t] = t;
    const double v = __shfl_xor_sync(0xffffffffu, (double)t, 1, 32);
    {barrier}
    out[t] = (float)(s[(t + 32) % 256] + v);
}}\n"
        )
    };
    let planted = hand_written(
        "warp",
        &kernel(""),
        &[("warps", 1)],
        256,
        None,
        Some("thread"),
    );
    let err = planted.expect_err("the race was not reported");
    assert!(err.contains("ThreadSanitizer: data race"), "{err}");
    let fixed = hand_written(
        "warp-fixed",
        &kernel("__syncthreads();"),
        &[("warps", 1)],
        256,
        None,
        Some("thread"),
    )
    .unwrap();
    let want: Vec<f32> = (0..256u32)
        .map(|t| (((t + 32) % 256) + (t ^ 1)) as f32)
        .collect();
    assert_eq!(fixed, want);
}

/// The generated program of a small shape (small kernels end their means in
/// `mulo_block_sum`), as a stepper, with `plant` applied and the sanitizers `sanitize`;
/// and its IR.
fn planted_program(
    name: &str,
    plant: impl FnOnce(&mut String, &mut Vec<ConstantJson>),
    sanitize: Option<&str>,
) -> (EmulatedStepper, Arc<StepIr>) {
    let shape = Shape::parse("5x7x3").unwrap();
    let ir = Arc::new(mulo::compile_step(&shape, &common::fixture_lopt()).unwrap());
    let schedule = cuda::schedule::schedule(&ir);
    (
        EmulatedStepper::planted(&ir, name, schedule, plant, sanitize),
        ir,
    )
}

/// One step of `emu` and of the interpreter from the same parameters: whether the parameters
/// are bitwise equal, or the failure of the emulated step.
fn one_step_is_bitwise(
    emu: &mut EmulatedStepper,
    ir: &Arc<StepIr>,
) -> std::result::Result<bool, String> {
    let n = ir.layout.numel();
    let p0 = common::spread_values(n, 7, 0);
    let g = common::spread_values(n, 8, 1);
    let hyper = Hyper {
        lr: 0.1,
        weight_decay: 0.01,
    };
    let (mut pe, mut pc) = (p0.clone(), p0);
    emu.try_step(&mut pe, &g, hyper)?;
    InterpStepper::new(ir.clone(), 0)
        .step(&mut pc, &g, hyper)
        .unwrap();
    Ok(pe.iter().zip(&pc).all(|(a, b)| a.to_bits() == b.to_bits()))
}

/// A missing `__syncthreads` in generated source (the one between the stores of
/// `mulo_block_sum` and its tree's first reads): ThreadSanitizer reports the race; the
/// program as generated runs clean under it, bitwise as the interpreter.
#[test]
fn emulation_catches_a_missing_barrier_in_generated_source() {
    if !tsan_or_skip("emulation_catches_a_missing_barrier_in_generated_source") {
        return;
    }
    let (mut clean, ir) = planted_program("tsan-clean", |_, _| {}, Some("thread"));
    assert_eq!(one_step_is_bitwise(&mut clean, &ir), Ok(true));
    let barrier = "    sm[tid] = v;\n    __syncthreads();\n";
    let (mut planted, ir) = planted_program(
        "tsan-planted",
        |src, _| {
            assert!(src.contains(barrier), "mulo_block_sum changed");
            *src = src.replacen(barrier, "    sm[tid] = v;\n", 1);
        },
        Some("thread"),
    );
    let err = one_step_is_bitwise(&mut planted, &ir).expect_err("the race was not reported");
    assert!(err.contains("ThreadSanitizer: data race"), "{err}");
}

/// A `__constant__` array the manifest leaves out stays poisoned (it is not compiled in), so
/// the step is NaN where the interpreter's is not; one of the wrong size is refused at load,
/// naming it, as `fill_constants` refuses it.
#[test]
fn emulation_catches_a_constant_left_unfilled() {
    if !gxx_or_skip("emulation_catches_a_constant_left_unfilled") {
        return;
    }
    let mut dropped = String::new();
    let (mut planted, ir) = planted_program(
        "unfilled",
        |_, constants| dropped = constants.remove(0).name,
        None,
    );
    assert!(dropped.starts_with("mulo_"), "{dropped}");
    assert_eq!(one_step_is_bitwise(&mut planted, &ir), Ok(false));
    let mut short = String::new();
    let (mut planted, ir) = planted_program(
        "short",
        |_, constants| {
            let c = &mut constants[0];
            c.len -= 1;
            c.hex.truncate(8 * c.len);
            short = c.name.clone();
        },
        None,
    );
    let err = one_step_is_bitwise(&mut planted, &ir).expect_err("a short array was filled");
    assert!(err.contains(&format!("`{short}` has")), "{err}");
}
