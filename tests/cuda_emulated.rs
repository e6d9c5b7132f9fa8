//! The generated CUDA source, executed on the CPU: a small emulation layer (threads of a block
//! are OS threads meeting at a barrier for `__syncthreads` and shuffles) lets g++ compile
//! `mulo_step.cu` unchanged, so the kernels' semantics — indexing, scheduling, reductions —
//! are checked against the golden trajectories and the interpreter without a GPU.
//!
//! What this does not check: GPU-specific behaviour (memory model across blocks beyond
//! kernel boundaries, warp-synchronous execution, NVRTC's math library, FMA contraction).
//! Skipped, with the reason printed, when no C++20 compiler (`g++`) is available.

mod common;

use common::emulation::{compile, gxx_or_skip, run, EMULATION, LAUNCH};
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
}

impl EmulatedStepper {
    fn new(ir: &StepIr, name: &str) -> Self {
        Self::with_schedule(ir, name, cuda::schedule::schedule(ir))
    }

    /// Emulates the kernels of `schedule` (a schedule of `ir`).
    fn with_schedule(ir: &StepIr, name: &str, schedule: cuda::schedule::Schedule) -> Self {
        let generated = cuda::CudaSource {
            source: cuda::render::render(ir, &schedule).expect("renders"),
            schedule,
        };
        let manifest =
            cuda::manifest::Manifest::new(ir, &generated.schedule, "sm_80", (0, 0)).unwrap();
        let dir = std::env::temp_dir().join(format!("mulo-emu-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("mulo_step.cu"), &generated.source).unwrap();
        let layout = ir.layout.clone();
        let buffers = Buffer::for_layout(&layout);
        let mut main = String::from(EMULATION);
        main.push_str("#include \"mulo_step.cu\"\n");
        main.push_str(LAUNCH);
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
        main.push_str("int main(int argc, char** argv) {\n    FILE* f = fopen(argv[1], \"rb\"); Args a;\n    float s[3]; if (fread(s, 4, 3, f) != 3) return 3; a.lr = s[0]; a.wd = s[1]; a.step = s[2];\n");
        for (i, b) in buffers.iter().enumerate() {
            let n = b.len(&layout);
            main.push_str(&format!(
                "    a.b[{i}] = (float*)malloc({n} * 4); if (fread(a.b[{i}], 4, {n}, f) != {n}) return 3;\n"
            ));
        }
        main.push_str(&format!(
            "    fclose(f);\n    a.scratch = (float*)calloc({}, 4); a.partials = (double*)calloc({}, 8);\n",
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
        let exe = compile(&dir);
        let state = TensorState::zeros(&layout, 0);
        EmulatedStepper {
            layout,
            exe,
            dir,
            state,
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
        let mut vals = run(&self.exe, &self.dir, &bytes).into_iter();
        for b in Buffer::for_layout(&self.layout) {
            let n = b.len(&self.layout);
            let v: Vec<f32> = vals.by_ref().take(n).collect();
            match b {
                Buffer::Param => param.copy_from_slice(&v),
                Buffer::Grad => {}
                s => self.state.set(s, v)?,
            }
        }
        self.state.step += 1;
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
