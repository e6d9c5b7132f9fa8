//! The CUDA backend on a GPU: golden replay, parity with the interpreter on random shapes,
//! bitwise determinism, and bad launches rejected before launch.
//!
//! Every test prints why it is skipped and passes when no CUDA device can be opened (or
//! libnvrtc is missing), unless `MULO_REQUIRE_GPU=1` (set by `scripts/gpu-check`), which makes
//! a missing GPU a failure.

mod common;

use mulo::backend::cuda::nvrtc;
use mulo::backend::cuda::runtime::{CudaRuntime, CudaStepper};
use mulo::backend::interp::InterpStepper;
use mulo::backend::{Hyper, TensorStepper};
use mulo::lopt::LearnedOptimizer;
use mulo::shape::{Layout, Shape};
use mulo::trajectory::{max_abs_diff, replay, Trajectory, DEFAULT_TOLERANCE};
use proptest::prelude::*;
use std::sync::{Arc, OnceLock};

fn runtime(test: &str) -> Option<&'static CudaRuntime> {
    static RT: OnceLock<Result<CudaRuntime, String>> = OnceLock::new();
    let rt = RT.get_or_init(|| {
        if !nvrtc::nvrtc_available() {
            return Err(nvrtc::NVRTC_HELP.to_string());
        }
        CudaRuntime::new(0).map_err(|e| format!("no CUDA device: {e}"))
    });
    match rt {
        Ok(rt) => Some(rt),
        Err(why) => {
            assert!(
                std::env::var("MULO_REQUIRE_GPU").as_deref() != Ok("1"),
                "{test}: MULO_REQUIRE_GPU=1 but {why}"
            );
            eprintln!("SKIPPED {test}: {why}");
            None
        }
    }
}

/// A failed module load names the program and carries the driver's JIT error log (the loader
/// uses `cuModuleLoadDataEx` with log buffers); a CUBIN for another architecture is refused
/// with the driver's error, not at the first launch.
#[test]
fn failed_module_loads_name_the_program_and_carry_the_log() {
    use mulo::backend::cuda::loader::{Image, Module};
    let Some(rt) = runtime("failed_module_loads_name_the_program_and_carry_the_log") else {
        return;
    };
    // PTX whose kernel uses an undeclared register: ptxas (in the driver) rejects it.
    let bad = format!(
        ".version 7.0\n.target {}\n.address_size 64\n.visible .entry broken()\n{{\n\tmov.u32 %r1, 1;\n\tret;\n}}\n",
        rt.arch()
    );
    let err = match Module::load(rt.context(), Image::Ptx(&bad), "broken.ptx (test)") {
        Ok(_) => panic!("the driver loaded invalid PTX"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("broken.ptx (test)"), "{err}");
    assert!(err.contains("error log"), "no JIT log in: {err}");
    // A good program loads, and its kernel is found by name; a missing kernel is an error
    // naming both.
    let good = nvrtc::compile_cubin(
        "extern \"C\" __global__ void ok(float* x) { x[threadIdx.x] = 1.0f; }",
        rt.arch(),
        false,
    )
    .unwrap();
    let module = Module::load(rt.context(), Image::Cubin(&good.cubin), "ok.cubin").unwrap();
    module.kernel("ok").unwrap();
    let err = module.kernel("absent").err().unwrap().to_string();
    assert!(err.contains("ok.cubin") && err.contains("absent"), "{err}");
    // A CUBIN for another architecture than the device's.
    let other = if rt.arch() == "sm_80" {
        "sm_90"
    } else {
        "sm_80"
    };
    let foreign = nvrtc::compile_cubin(
        "extern \"C\" __global__ void ok(float* x) { x[threadIdx.x] = 1.0f; }",
        other,
        false,
    )
    .unwrap();
    if let Err(e) = Module::load(rt.context(), Image::Cubin(&foreign.cubin), "foreign.cubin") {
        assert!(e.to_string().contains("foreign.cubin"), "{e}");
    } else {
        // sm_80 code loads on newer sm_8x devices (binary compatibility within a major).
        assert!(other == "sm_80" && rt.arch().starts_with("sm_8"));
    }
}

fn stepper(rt: &CudaRuntime, layout: &Layout, lopt: &LearnedOptimizer) -> CudaStepper {
    let ir = mulo::compile_layout(layout, lopt).unwrap();
    CudaStepper::new(rt.program(&ir).unwrap(), 0).unwrap()
}

#[test]
fn golden_replay_within_tolerance() {
    let Some(rt) = runtime("golden_replay_within_tolerance") else {
        return;
    };
    let lopt = common::fixture_lopt();
    for path in common::golden_cases() {
        let traj = Trajectory::load(&path).unwrap();
        let mut s = stepper(rt, &traj.layout, &lopt);
        let report = replay(&mut s, &traj).unwrap();
        eprintln!(
            "{}: param {:.3e}, state {:?}",
            report.name, report.param_error, report.state_errors
        );
        common::assert_within_golden_tolerance(&report, "cuda");
    }
}

fn data(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, .. ProptestConfig::default() })]
    #[test]
    fn random_shapes_match_the_interpreter(
        dims in prop::collection::vec(1usize..40, 0..5),
        seed in any::<u64>(),
        wd in prop_oneof![Just(0.0f32), Just(0.1f32)],
    ) {
        let Some(rt) = runtime("random_shapes_match_the_interpreter") else { return Ok(()); };
        let shape = Shape::new(dims).unwrap();
        let lopt = common::fixture_lopt();
        let ir = Arc::new(mulo::compile_step(&shape, &lopt).unwrap());
        let mut gpu = CudaStepper::new(rt.program(&ir).unwrap(), 0).unwrap();
        let mut cpu = InterpStepper::new(ir.clone(), 0);
        let n = shape.numel();
        let p0 = data(n, seed, 1.0);
        let (mut pg, mut pc) = (p0.clone(), p0.clone());
        let hyper = Hyper { lr: 1e-2, weight_decay: wd };
        for k in 0..4u64 {
            let g = data(n, seed.wrapping_add(k + 1), if k == 2 { 10.0 } else { 0.1 });
            gpu.step(&mut pg, &g, hyper).unwrap();
            cpu.step(&mut pc, &g, hyper).unwrap();
        }
        let scale = max_abs_diff(&pc, &p0).max(f64::MIN_POSITIVE);
        let err = max_abs_diff(&pg, &pc) / scale;
        prop_assert!(err <= DEFAULT_TOLERANCE, "{shape}: param error {err:e}");
        let (sg, sc) = (gpu.state().unwrap(), cpu.state().unwrap());
        prop_assert_eq!(sg.step, sc.step);
        for (b, want) in sc.iter() {
            let s = want.iter().fold(0f64, |m, v| m.max(v.abs() as f64)).max(f64::MIN_POSITIVE);
            let e = max_abs_diff(sg.get(b), want) / s;
            prop_assert!(e <= DEFAULT_TOLERANCE, "{shape}: state {b} error {e:e}");
        }
    }
}

#[test]
fn steps_are_bitwise_deterministic() {
    let Some(rt) = runtime("steps_are_bitwise_deterministic") else {
        return;
    };
    let lopt = common::fixture_lopt();
    for shape in ["1024x512", "777", "16x8x3x3"] {
        let shape = Layout::new(Shape::parse(shape).unwrap());
        let n = shape.numel();
        let run = || {
            let mut s = stepper(rt, &shape, &lopt);
            let mut p = data(n, 7, 1.0);
            for k in 0..3 {
                let g = data(n, 100 + k, 0.1);
                s.step(
                    &mut p,
                    &g,
                    Hyper {
                        lr: 1e-3,
                        weight_decay: 0.0,
                    },
                )
                .unwrap();
            }
            (p, s.state().unwrap())
        };
        let (p1, s1) = run();
        for _ in 0..3 {
            let (p2, s2) = run();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&p1), bits(&p2), "{shape}: param differs between runs");
            for (b, v) in s1.iter() {
                assert_eq!(bits(v), bits(s2.get(b)), "{shape}: state {b} differs");
            }
        }
    }
}

#[test]
fn bad_launches_are_rejected_before_launch() {
    let Some(rt) = runtime("bad_launches_are_rejected_before_launch") else {
        return;
    };
    let lopt = common::fixture_lopt();
    let shape = Shape::parse("64x32").unwrap();
    let layout = Layout::new(shape.clone());
    let mut s = stepper(rt, &layout, &lopt);
    let n = layout.numel();
    let mut p = data(n, 1, 1.0);
    let g = data(n, 2, 0.1);
    let hyper = Hyper {
        lr: 1e-3,
        weight_decay: 0.0,
    };
    s.step(&mut p, &g, hyper).unwrap();
    let before_state = s.state().unwrap();
    let before_p = p.clone();
    let stream = rt.stream();
    let mut short = stream.clone_htod(&p[..n - 1]).unwrap();
    let grad = stream.clone_htod(&g).unwrap();
    let err = s
        .step_device(&mut short, &grad, hyper)
        .unwrap_err()
        .to_string();
    assert!(err.contains("param"), "{err}");
    let mut param = stream.clone_htod(&p).unwrap();
    let long_grad = stream.clone_htod(&data(n + 1, 3, 0.1)).unwrap();
    let err = s
        .step_device(&mut param, &long_grad, hyper)
        .unwrap_err()
        .to_string();
    assert!(err.contains("grad"), "{err}");
    let err = s
        .step_device(
            &mut param,
            &grad,
            Hyper {
                lr: f32::NAN,
                weight_decay: 0.0,
            },
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("lr"), "{err}");
    let err = s
        .step(&mut p[..n - 1].to_vec(), &g, hyper)
        .unwrap_err()
        .to_string();
    assert!(err.contains("param"), "{err}");
    assert_eq!(stream.clone_dtoh(&param).unwrap(), before_p);
    assert_eq!(
        s.state().unwrap(),
        before_state,
        "state changed by a rejected step"
    );
    assert_eq!(s.step_count(), 1);
}

/// The packed backend on the GPU (one program, a fixed number of launches per model step):
/// opens its own `PackedCuda` factory, or says why not.
fn packed(test: &str) -> Option<mulo::backend::cuda::packed_runtime::PackedCuda> {
    runtime(test)?;
    match mulo::backend::cuda::packed_runtime::PackedCuda::new(0) {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("SKIPPED {test}: {e}");
            None
        }
    }
}

#[test]
fn packed_model_replays_every_golden_trajectory_at_once() {
    let Some(factory) = packed("packed_model_replays_every_golden_trajectory_at_once") else {
        return;
    };
    let trajs: Vec<Trajectory> = common::golden_cases()
        .iter()
        .map(|p| Trajectory::load(p).unwrap())
        .collect();
    let layouts: Vec<Layout> = trajs.iter().map(|t| t.layout.clone()).collect();
    let mut backend = factory
        .backend(&common::fixture_lopt(), &layouts, 0)
        .unwrap();
    let (report, _) = common::replay_all_at_once(&mut backend, &trajs);
    for (name, param_error, state_error) in report {
        eprintln!(
            "packed cuda {name:<16} param err {param_error:.3e}, state err {state_error:.3e}"
        );
        assert!(
            param_error.max(state_error) <= DEFAULT_TOLERANCE,
            "{name}: param {param_error:e}, state {state_error:e}"
        );
    }
}

/// The optimizer on the packed GPU backend agrees with the interpreter (μP, a NaN gradient
/// skipped), and stepping the device arenas in place gives bitwise what the host path gives.
#[test]
fn packed_optimizer_agrees_with_the_interpreter() {
    use mulo::backend::{InterpFactory, PerTensor};
    use mulo::optimizer::{MuloOptimizer, OptimizerOptions, ParamSpec};
    let Some(factory) = packed("packed_optimizer_agrees_with_the_interpreter") else {
        return;
    };
    let specs = || {
        vec![
            ParamSpec::new("w", &[64, 16])
                .unwrap()
                .with_base_shape(&[16, 16])
                .unwrap(),
            ParamSpec::new("h", &[64, 64])
                .unwrap()
                .with_base_shape(&[16, 16])
                .unwrap(),
            ParamSpec::new("b", &[64]).unwrap(),
            ParamSpec::new("conv", &[8, 4, 3, 3]).unwrap(),
            ParamSpec::new("s", &[]).unwrap(),
        ]
    };
    let lopt = common::fixture_lopt();
    let mut gpu = MuloOptimizer::new(
        &lopt,
        specs(),
        OptimizerOptions {
            backend: Arc::new(factory),
            ..Default::default()
        },
    )
    .unwrap();
    let mut cpu = MuloOptimizer::new(
        &lopt,
        specs(),
        OptimizerOptions {
            backend: Arc::new(PerTensor(InterpFactory)),
            ..Default::default()
        },
    )
    .unwrap();
    let sizes: Vec<usize> = specs().iter().map(|s| s.shape.numel()).collect();
    let p0: Vec<Vec<f32>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| data(n, i as u64, 0.5))
        .collect();
    let (mut pa, mut pb) = (p0.clone(), p0.clone());
    for step in 0..4u64 {
        let mut grads: Vec<Vec<f32>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| data(n, 100 * step + i as u64, 0.01))
            .collect();
        if step == 2 {
            grads[1][3] = f32::NAN;
        }
        let g: Vec<&[f32]> = grads.iter().map(Vec::as_slice).collect();
        let mut a: Vec<&mut [f32]> = pa.iter_mut().map(Vec::as_mut_slice).collect();
        let ra = gpu.step(&mut a, &g, 0.7, 0.01).unwrap();
        let mut b: Vec<&mut [f32]> = pb.iter_mut().map(Vec::as_mut_slice).collect();
        let rb = cpu.step(&mut b, &g, 0.7, 0.01).unwrap();
        assert_eq!(ra.skipped, rb.skipped);
    }
    for (i, spec) in specs().iter().enumerate() {
        let scale = max_abs_diff(&pb[i], &p0[i]).max(f64::MIN_POSITIVE);
        let err = max_abs_diff(&pa[i], &pb[i]) / scale;
        let state_err = common::relative_state_error(
            &gpu.state(&spec.name).unwrap(),
            &cpu.state(&spec.name).unwrap(),
        );
        eprintln!(
            "packed cuda {}: param err {err:.3e}, state err {state_err:.3e}",
            spec.name
        );
        assert!(err.max(state_err) <= DEFAULT_TOLERANCE, "{}", spec.name);
    }
}

/// `step_in_place` on gradients written straight into the device arena is bitwise the host
/// path (`ModelBackend::step`), and both are deterministic.
#[test]
fn packed_in_place_steps_match_the_host_path_bitwise() {
    use mulo::backend::cuda::packed_runtime::PackedExecutor;
    use mulo::backend::{ModelBackend, TensorStep};
    use mulo::ir::Buffer;
    let Some(factory) = packed("packed_in_place_steps_match_the_host_path_bitwise") else {
        return;
    };
    let lopt = common::fixture_lopt();
    let shapes: Vec<Layout> = ["96x40", "40", "96x40"]
        .iter()
        .map(|s| Layout::new(Shape::parse(s).unwrap()))
        .collect();
    let hyper = Hyper {
        lr: 0.3,
        weight_decay: 0.0,
    };
    let mut host = factory.backend(&lopt, &shapes, 0).unwrap();
    let mut resident = factory.backend(&lopt, &shapes, 0).unwrap();
    let mut params: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| data(s.numel(), i as u64, 1.0))
        .collect();
    for (i, p) in params.iter().enumerate() {
        let o = resident.model().param_offset(i);
        resident.executor_mut().write(Buffer::Param, o, p).unwrap();
    }
    for step in 0..3u64 {
        let grads: Vec<Vec<f32>> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| data(s.numel(), 10 * step + i as u64, 0.1))
            .collect();
        let mut batch: Vec<TensorStep<'_>> = params
            .iter_mut()
            .zip(&grads)
            .enumerate()
            .map(|(i, (p, g))| TensorStep {
                index: i,
                param: p.as_mut_slice(),
                grad: g,
                hyper,
            })
            .collect();
        host.step(&mut batch).unwrap();
        for (i, g) in grads.iter().enumerate() {
            let o = resident.model().param_offset(i);
            resident.executor_mut().write(Buffer::Grad, o, g).unwrap();
        }
        resident.step_in_place(&[Some(hyper); 3]).unwrap();
    }
    for (i, p) in params.iter().enumerate() {
        let mut got = vec![0f32; p.len()];
        let o = resident.model().param_offset(i);
        resident
            .executor()
            .read(Buffer::Param, o, &mut got)
            .unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(p), "tensor {i}");
        assert_eq!(
            resident.state(i).unwrap(),
            host.state(i).unwrap(),
            "tensor {i}"
        );
    }
}

/// Pointer mode on the device (`ExternalCuda`, what `mulo.torch` uses): every tensor's
/// parameter, gradient and state in its own device allocation, the step queued on another
/// stream than the runtime's, is bitwise the arena mode (`PackedBackend`), parameters and
/// state, with a tensor left out of a step; a bad address is refused before anything runs.
#[test]
fn external_pointer_mode_is_bitwise_the_arena_mode() {
    use mulo::backend::cuda::packed::TensorAddrs;
    use mulo::backend::cuda::packed_external::ExternalCuda;
    use mulo::backend::{ModelBackend, TensorStep};
    use mulo::ir::Buffer;
    let Some(factory) = packed("external_pointer_mode_is_bitwise_the_arena_mode") else {
        return;
    };
    let lopt = common::fixture_lopt();
    let shapes: Vec<Layout> = ["96x40", "40", "scalar", "8x4x3x3"]
        .iter()
        .map(|s| Layout::new(Shape::parse(s).unwrap()))
        .collect();
    let mut arena = factory.backend(&lopt, &shapes, 0).unwrap();
    let model = arena.model().clone();
    let mut ext = ExternalCuda::new(0, model.clone()).unwrap();
    let stream = factory.runtime().context().new_stream().unwrap();
    let mut params: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| data(s.numel(), i as u64, 1.0))
        .collect();
    // Device copies of the parameters and zero state, one allocation each.
    let dev_params: Vec<_> = params
        .iter()
        .map(|p| stream.clone_htod(p).unwrap())
        .collect();
    let dev_state: Vec<Vec<(Buffer, cudarc::driver::CudaSlice<f32>)>> = shapes
        .iter()
        .map(|l| {
            Buffer::state_for_layout(l)
                .into_iter()
                .map(|b| (b, stream.alloc_zeros::<f32>(b.len(l)).unwrap()))
                .collect()
        })
        .collect();
    let hyper = Hyper {
        lr: 0.3,
        weight_decay: 0.01,
    };
    for step in 0..3u64 {
        let grads: Vec<Vec<f32>> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| data(s.numel(), 10 * step + i as u64, 0.1))
            .collect();
        let on = |i: usize| !(step == 1 && i == 1);
        let mut batch: Vec<TensorStep<'_>> = params
            .iter_mut()
            .zip(&grads)
            .enumerate()
            .filter(|(i, _)| on(*i))
            .map(|(i, (p, g))| TensorStep {
                index: i,
                param: p.as_mut_slice(),
                grad: g,
                hyper,
            })
            .collect();
        arena.step(&mut batch).unwrap();
        let dev_grads: Vec<_> = grads
            .iter()
            .map(|g| stream.clone_htod(g).unwrap())
            .collect();
        let addr = |s: &cudarc::driver::CudaSlice<f32>| {
            use cudarc::driver::DevicePtr;
            s.device_ptr(&stream).0
        };
        let mut tensors = vec![TensorAddrs::default(); shapes.len()];
        for (i, t) in tensors.iter_mut().enumerate() {
            t.param = addr(&dev_params[i]);
            t.grad = addr(&dev_grads[i]);
            for (b, s) in &dev_state[i] {
                t.set(*b, addr(s));
            }
        }
        let steps: Vec<Option<(Hyper, u64)>> = (0..shapes.len())
            .map(|i| on(i).then_some((hyper, step - (step > 1 && i == 1) as u64)))
            .collect();
        if step == 0 {
            // A missing state buffer is refused before anything is queued.
            let mut bad = tensors.clone();
            bad[0].set(Buffer::Rms, 0);
            // SAFETY: valid device allocations of the model's lengths on this context.
            let err = unsafe { ext.step(stream.cu_stream(), &bad, &steps) }.unwrap_err();
            assert!(err.to_string().contains("tensor 0 `rms`"), "{err}");
        }
        // SAFETY: every address is a live allocation of this context of the buffer's length,
        // used only on `stream`, kept alive until the synchronize below.
        unsafe { ext.step(stream.cu_stream(), &tensors, &steps) }.unwrap();
        stream.synchronize().unwrap();
    }
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for i in 0..shapes.len() {
        let got = stream.clone_dtoh(&dev_params[i]).unwrap();
        assert_eq!(bits(&got), bits(&params[i]), "tensor {i}: parameters");
        let want = arena.state(i).unwrap();
        for (b, s) in &dev_state[i] {
            let got = stream.clone_dtoh(s).unwrap();
            assert_eq!(bits(&got), bits(want.get(*b)), "tensor {i}: {}", b.name());
        }
    }
}

/// The **staged** program on the device (a rank's shards, `CudaExecutor::run_stage`): two
/// ranks simulated in one process, each its own program and arenas for its rows of every
/// tensor (uneven, one empty), the round buffers summed through the host between stages
/// (`read_round`, `write_round`), as an all-reduce would. Three steps stay within the golden
/// tolerance of the unsharded interpreter, parameters and state (the emulation,
/// `tests/cuda_staged_emulated.rs`, shows them bitwise on the CPU).
#[test]
fn staged_programs_on_two_simulated_ranks_match_the_interpreter() {
    use mulo::backend::cuda::packed::PackedModel;
    use mulo::backend::cuda::packed_cuda::CudaExecutor;
    use mulo::backend::cuda::packed_runtime::PackedExecutor;
    use mulo::ir::Buffer;
    let test = "staged_programs_on_two_simulated_ranks_match_the_interpreter";
    let Some(rt) = runtime(test) else {
        return;
    };
    let lopt = common::fixture_lopt();
    let layouts: Vec<Layout> = ["96x40", "40x96", "37", "scalar", "1x30", "16x8x3x3"]
        .iter()
        .map(|s| Layout::new(Shape::parse(s).unwrap()))
        .collect();
    // torch.chunk's split over 2 ranks; the 0-d tensor whole on both.
    let shard = |l: &Layout, r: usize| common::chunk_shard(l, 2, r);
    let mut ranks: Vec<(PackedModel, CudaExecutor)> = (0..2)
        .map(|r| {
            let tensors: Vec<(Layout, Option<usize>)> = layouts
                .iter()
                .map(|l| (l.clone(), shard(l, r).map(|s| s.rows)))
                .collect();
            let model = PackedModel::staged(&lopt, &tensors).unwrap();
            let exec = CudaExecutor::new(rt, &model).unwrap();
            (model, exec)
        })
        .collect();
    let part = |l: &Layout, b: Buffer, r: usize, whole: &[f32]| {
        common::local_part(l, b, shard(l, r), whole)
    };
    let irs: Vec<_> = layouts
        .iter()
        .map(|l| Arc::new(mulo::compile_layout(l, &lopt).unwrap()))
        .collect();
    let mut interp: Vec<InterpStepper> = irs
        .iter()
        .map(|ir| InterpStepper::new(ir.clone(), 0))
        .collect();
    let mut whole: Vec<Vec<f32>> = layouts
        .iter()
        .enumerate()
        .map(|(i, l)| data(l.numel(), i as u64, 1.0))
        .collect();
    let p0 = whole.clone();
    for (r, (model, exec)) in ranks.iter_mut().enumerate() {
        for (t, l) in layouts.iter().enumerate() {
            let o = model.param_offset(t);
            exec.write(Buffer::Param, o, &part(l, Buffer::Param, r, &whole[t]))
                .unwrap();
        }
    }
    let hyper = Hyper {
        lr: 0.3,
        weight_decay: 0.01,
    };
    let stages = ranks[0].0.stages();
    for step in 0..3u64 {
        let grads: Vec<Vec<f32>> = layouts
            .iter()
            .enumerate()
            .map(|(i, l)| data(l.numel(), 100 + 10 * step + i as u64, 0.1))
            .collect();
        for (r, (model, exec)) in ranks.iter_mut().enumerate() {
            for (t, l) in layouts.iter().enumerate() {
                let o = model.param_offset(t);
                exec.write(Buffer::Grad, o, &part(l, Buffer::Grad, r, &grads[t]))
                    .unwrap();
            }
        }
        let steps = vec![Some((hyper, step)); layouts.len()];
        for stage in 0..stages {
            for (_, exec) in ranks.iter_mut() {
                exec.run_stage(stage, &steps).unwrap();
            }
            if stage + 1 == stages {
                break;
            }
            let mut sums = ranks[0].1.read_round(stage).unwrap();
            for (s, x) in sums.iter_mut().zip(ranks[1].1.read_round(stage).unwrap()) {
                *s += x;
            }
            for (_, exec) in ranks.iter_mut() {
                exec.write_round(stage, &sums).unwrap();
            }
        }
        for (t, stepper) in interp.iter_mut().enumerate() {
            stepper.step(&mut whole[t], &grads[t], hyper).unwrap();
        }
    }
    for (t, l) in layouts.iter().enumerate() {
        let displacement = max_abs_diff(&p0[t], &whole[t]).max(f64::MIN_POSITIVE);
        let state = interp[t].state().unwrap();
        for (r, (model, exec)) in ranks.iter().enumerate() {
            let mut got = vec![0f32; model.buffer_len(t, Buffer::Param)];
            exec.read(Buffer::Param, model.param_offset(t), &mut got)
                .unwrap();
            let want = part(l, Buffer::Param, r, &whole[t]);
            let err = max_abs_diff(&got, &want) / displacement;
            eprintln!("staged {l} rank {r}: param error {err:.3e} of the displacement");
            assert!(err <= DEFAULT_TOLERANCE, "{l} rank {r}: {err:e}");
            for (b, values) in state.iter() {
                let want = part(l, b, r, values);
                let mut got = vec![0f32; want.len()];
                let o = model.tensors[t].offsets[&b];
                exec.read(b, o, &mut got).unwrap();
                let scale = want
                    .iter()
                    .fold(0f64, |m, v| m.max(v.abs() as f64))
                    .max(f64::MIN_POSITIVE);
                let e = max_abs_diff(&got, &want) / scale;
                assert!(e <= DEFAULT_TOLERANCE, "{l} rank {r}: state {b}: {e:e}");
            }
        }
    }
}
