//! The packed whole-model CUDA program, executed on the CPU: the generated `mulo_model.cu`
//! compiled unchanged by g++ with the emulation layer of `tests/common/emulation.rs`, driven by
//! the real host logic ([`PackedBackend`]: packing, table, block starts, step counters) through
//! an emulated [`PackedExecutor`]. Checks that every tensor of a model stepped together in a
//! fixed number of launches follows its golden trajectory, that the optimizer (μP, NaN policy)
//! on it agrees with the interpreter, and that each tensor's result is bitwise that of its
//! single-tensor program.
//!
//! Not checked here: anything GPU-specific (see `tests/cuda_emulated.rs`). Skipped, with the
//! reason printed, without g++.

mod common;

use common::emulation::gxx_or_skip;
use common::packed_program::{reloc, EmulatedProgram};
use mulo::backend::cuda::packed::{ArenaBases, PackedModel, TensorAddrs, ARENAS};
use mulo::backend::cuda::packed_runtime::{PackedBackend, PackedExecutor};
use mulo::backend::Hyper;
use mulo::backend::{BackendFactory, ModelBackend, TensorStep};
use mulo::error::Result;
use mulo::ir::Buffer;
use mulo::lopt::LearnedOptimizer;
use mulo::optimizer::{MuloOptimizer, NonFinitePolicy, OptimizerOptions, ParamSpec};
use mulo::shape::{Layout, Shape};
use mulo::state::TensorState;
use mulo::trajectory::{max_abs_diff, Trajectory};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The arenas in host memory (arena mode: every tensor at its offsets in shared arenas).
struct EmulatedExecutor {
    model: PackedModel,
    program: EmulatedProgram,
    arenas: BTreeMap<Buffer, Vec<f32>>,
    /// Launches run so far (slots with a non-empty grid).
    launches: Arc<AtomicUsize>,
}

impl EmulatedExecutor {
    fn new(model: &PackedModel, launches: Arc<AtomicUsize>) -> Self {
        EmulatedExecutor {
            model: model.clone(),
            program: EmulatedProgram::new(model),
            arenas: ARENAS
                .iter()
                .map(|&b| (b, vec![0.0; model.arena_len[&b]]))
                .collect(),
            launches,
        }
    }
}

impl PackedExecutor for EmulatedExecutor {
    fn write(&mut self, arena: Buffer, offset: usize, data: &[f32]) -> Result<()> {
        self.arenas.get_mut(&arena).unwrap()[offset..offset + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn read(&self, arena: Buffer, offset: usize, out: &mut [f32]) -> Result<()> {
        let len = out.len();
        out.copy_from_slice(&self.arenas[&arena][offset..offset + len]);
        Ok(())
    }

    fn run(&mut self, steps: &[Option<(Hyper, u64)>], starts: &[i64], grids: &[u32]) -> Result<()> {
        // What the host logic launches always passes the check the CUDA executor makes.
        self.model
            .check_launch(starts, grids)
            .expect("the host's launches pass PackedModel::check_launch");
        // Regions 0..7: the arenas; 7 and 8: scratch and partials.
        let bases = ArenaBases {
            arenas: std::array::from_fn(|k| reloc(k, 0)),
            scratch: reloc(7, 0),
            partials: reloc(8, 0),
            rounds: [0; mulo::backend::cuda::packed::MAX_ROUNDS],
        };
        let table = self.model.table(&self.model.arena_addrs(&bases), steps);
        let mut regions: Vec<Vec<f32>> = ARENAS
            .iter()
            .map(|b| std::mem::take(self.arenas.get_mut(b).unwrap()))
            .collect();
        let extra = [
            4 * self.model.scratch_len.max(1),
            8 * self.model.partials_len.max(1),
        ];
        self.program.run(&mut regions, &extra, &table, starts);
        for (b, r) in ARENAS.iter().zip(regions) {
            self.arenas.insert(*b, r);
        }
        self.launches
            .fetch_add(grids.iter().filter(|&&g| g > 0).count(), Ordering::SeqCst);
        Ok(())
    }
}

/// Pointer mode: every tensor's parameter, gradient and state buffers in separate host
/// allocations (the caller's, as PyTorch's tensors), stepped through
/// [`PackedModel::external_launch`]: the table points at them, no arena is involved.
struct ExternalEmulated {
    model: Arc<PackedModel>,
    program: EmulatedProgram,
    states: Vec<TensorState>,
    launches: Arc<AtomicUsize>,
}

impl ExternalEmulated {
    fn new(model: Arc<PackedModel>, start_step: u64, launches: Arc<AtomicUsize>) -> Self {
        let states = model
            .tensors
            .iter()
            .map(|t| TensorState::zeros(&model.plans[t.plan].ir.layout, start_step))
            .collect();
        ExternalEmulated {
            program: EmulatedProgram::new(&model),
            model,
            states,
            launches,
        }
    }
}

impl ModelBackend for ExternalEmulated {
    fn target(&self) -> &'static str {
        "cuda-external-emulated"
    }

    fn len(&self) -> usize {
        self.model.tensors.len()
    }

    fn compiled_plans(&self) -> usize {
        self.model.plans.len()
    }

    fn step(&mut self, batch: &mut [TensorStep<'_>]) -> Result<()> {
        let n = self.model.tensors.len();
        let mut steps: Vec<Option<(Hyper, u64)>> = vec![None; n];
        let mut tensors = vec![TensorAddrs::default(); n];
        // Regions: per stepped tensor its parameter, gradient and state buffers, each its
        // own allocation; then the program's scratch and partials.
        let mut regions: Vec<Vec<f32>> = Vec::new();
        let mut owner: Vec<(usize, Buffer)> = Vec::new();
        for t in batch.iter() {
            assert!(steps[t.index].is_none(), "tensor {} twice", t.index);
            steps[t.index] = Some((t.hyper, self.states[t.index].step));
            let mut add = |addrs: &mut TensorAddrs, b: Buffer, values: Vec<f32>| {
                addrs.set(b, reloc(regions.len(), 0));
                regions.push(values);
                owner.push((t.index, b));
            };
            let a = &mut tensors[t.index];
            add(a, Buffer::Param, t.param.to_vec());
            add(a, Buffer::Grad, t.grad.to_vec());
            for (b, values) in self.states[t.index].iter() {
                add(a, b, values.to_vec());
            }
        }
        let (scratch, partials) = (reloc(regions.len(), 0), reloc(regions.len() + 1, 0));
        let launch = self
            .model
            .external_launch(&tensors, &steps, scratch, partials)?;
        let extra = [
            4 * self.model.scratch_len.max(1),
            8 * self.model.partials_len.max(1),
        ];
        self.program
            .run(&mut regions, &extra, &launch.table, &launch.starts);
        self.launches.fetch_add(
            launch.grids.iter().filter(|&&g| g > 0).count(),
            Ordering::SeqCst,
        );
        for ((i, b), values) in owner.into_iter().zip(regions) {
            match b {
                Buffer::Param => {
                    let t = batch.iter_mut().find(|t| t.index == i).unwrap();
                    t.param.copy_from_slice(&values);
                }
                Buffer::Grad => {}
                b => self.states[i].set(b, values)?,
            }
        }
        for (s, step) in self.states.iter_mut().zip(&steps) {
            s.step += step.is_some() as u64;
        }
        Ok(())
    }

    fn state(&self, index: usize) -> Result<TensorState> {
        Ok(self.states[index].clone())
    }

    fn set_state(&mut self, index: usize, state: TensorState) -> Result<()> {
        self.states[index] = state;
        Ok(())
    }
}

/// The pointer-mode program as an optimizer backend.
struct ExternalFactory;

impl BackendFactory for ExternalFactory {
    fn target(&self) -> &'static str {
        "cuda-external-emulated"
    }

    fn build(
        &self,
        lopt: &LearnedOptimizer,
        layouts: &[Layout],
        start_step: u64,
    ) -> Result<Box<dyn ModelBackend>> {
        let model = Arc::new(PackedModel::new(lopt, layouts)?);
        Ok(Box::new(ExternalEmulated::new(
            model,
            start_step,
            Arc::new(AtomicUsize::new(0)),
        )))
    }
}

/// The packed backend on the emulation, as an optimizer backend.
struct EmulatedPacked {
    launches: Arc<AtomicUsize>,
}

impl BackendFactory for EmulatedPacked {
    fn target(&self) -> &'static str {
        "cuda-packed-emulated"
    }

    fn build(
        &self,
        lopt: &LearnedOptimizer,
        layouts: &[Layout],
        start_step: u64,
    ) -> Result<Box<dyn ModelBackend>> {
        let model = Arc::new(PackedModel::new(lopt, layouts)?);
        let exec = EmulatedExecutor::new(&model, self.launches.clone());
        Ok(Box::new(PackedBackend::new(
            model,
            exec,
            start_step,
            "cuda-packed-emulated",
        )))
    }
}

/// Every golden case is one tensor of a single model; all are stepped together (each with its
/// own lr, weight decay and start step, trajectories of different lengths), and each must
/// follow its reference trajectory within the golden tolerance.
#[test]
fn packed_model_replays_every_golden_trajectory_at_once() {
    if !gxx_or_skip("packed_model_replays_every_golden_trajectory_at_once") {
        return;
    }
    let lopt = common::fixture_lopt();
    let trajs: Vec<Trajectory> = common::golden_cases()
        .iter()
        .map(|p| Trajectory::load(p).unwrap())
        .collect();
    let layouts: Vec<Layout> = trajs.iter().map(|t| t.layout.clone()).collect();
    let model = Arc::new(PackedModel::new(&lopt, &layouts).unwrap());
    let launches = Arc::new(AtomicUsize::new(0));
    let exec = EmulatedExecutor::new(&model, launches.clone());
    let mut backend = PackedBackend::new(model.clone(), exec, 0, "emu");
    let (report, steps) = common::replay_all_at_once(&mut backend, &trajs);
    // A step launches the slots in which a stepped tensor has a kernel (3 element passes and
    // the small kernels of 2 stages for a factored tensor; 2 and 1 for rank ≤ 1), whatever
    // the number of tensors.
    assert!(model.slots.len() >= 5);
    let expected: usize = (0..steps)
        .map(|k| {
            let active: Vec<usize> = trajs
                .iter()
                .enumerate()
                .filter(|(_, t)| k < t.grads.len())
                .map(|(i, _)| model.tensors[i].plan)
                .collect();
            model
                .slots
                .iter()
                .filter(|s| active.iter().any(|&p| s.kernels[p].is_some()))
                .count()
        })
        .sum();
    assert_eq!(launches.load(Ordering::SeqCst), expected);
    for (name, param_error, state_error) in report {
        eprintln!("{name:<16} param err {param_error:.3e}, state err {state_error:.3e}");
        assert!(
            param_error.max(state_error) <= mulo::trajectory::DEFAULT_TOLERANCE,
            "{name}: param {param_error:e}, state {state_error:e}"
        );
    }
}

fn specs() -> Vec<ParamSpec> {
    vec![
        ParamSpec::new("in.weight", &[24, 5])
            .unwrap()
            .with_base_shape(&[8, 5])
            .unwrap(),
        ParamSpec::new("in.bias", &[24]).unwrap(),
        ParamSpec::new("hidden.weight", &[24, 24])
            .unwrap()
            .with_base_shape(&[8, 8])
            .unwrap(),
        ParamSpec::new("hidden2.weight", &[24, 24])
            .unwrap()
            .with_base_shape(&[8, 8])
            .unwrap(),
        ParamSpec::new("conv.weight", &[6, 4, 3, 3]).unwrap(),
        ParamSpec::new("out.weight", &[3, 24]).unwrap(),
        ParamSpec::new("scale", &[]).unwrap(),
    ]
}

/// The whole optimizer (μP learning rates, the skip policy for a NaN gradient) on the packed
/// emulated backend agrees with the reference interpreter, tensor by tensor; the skipped
/// tensor is untouched, and every step is the same number of launches.
#[test]
fn optimizer_on_the_packed_backend_agrees_with_the_interpreter() {
    if !gxx_or_skip("optimizer_on_the_packed_backend_agrees_with_the_interpreter") {
        return;
    }
    use mulo::backend::{InterpFactory, PerTensor};
    let lopt = common::fixture_lopt();
    let launches = Arc::new(AtomicUsize::new(0));
    let options = |backend: Arc<dyn BackendFactory>| OptimizerOptions {
        backend,
        nonfinite: NonFinitePolicy::Skip,
        ..Default::default()
    };
    let mut packed = MuloOptimizer::new(
        &lopt,
        specs(),
        options(Arc::new(EmulatedPacked {
            launches: launches.clone(),
        })),
    )
    .unwrap();
    let mut reference =
        MuloOptimizer::new(&lopt, specs(), options(Arc::new(PerTensor(InterpFactory)))).unwrap();
    assert_eq!(packed.compiled_plans(), 6);
    let sizes: Vec<usize> = specs().iter().map(|s| s.shape.numel()).collect();
    let p0: Vec<Vec<f32>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| common::spread_values(n, 100 + i as u64, 0))
        .collect();
    let (mut pa, mut pb) = (p0.clone(), p0.clone());
    // The launches of the first step (3 element passes, and the small kernels of 2 stages);
    // every later step makes as many, whichever tensors are skipped.
    let mut slots = 0;
    for step in 0..3 {
        let mut grads: Vec<Vec<f32>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| common::spread_values(n, i as u64, step + 1))
            .collect();
        if step == 1 {
            grads[2][7] = f32::NAN; // hidden.weight is skipped on this step
        }
        let g: Vec<&[f32]> = grads.iter().map(Vec::as_slice).collect();
        let before = pa[2].clone();
        let mut a: Vec<&mut [f32]> = pa.iter_mut().map(Vec::as_mut_slice).collect();
        let ra = packed.step(&mut a, &g, 0.5, 0.01).unwrap();
        let mut b: Vec<&mut [f32]> = pb.iter_mut().map(Vec::as_mut_slice).collect();
        let rb = reference.step(&mut b, &g, 0.5, 0.01).unwrap();
        assert_eq!(ra.skipped, rb.skipped);
        if step == 1 {
            assert_eq!(ra.skipped, ["hidden.weight"]);
            assert_eq!(pa[2], before, "a skipped tensor is left unchanged");
        }
        if step == 0 {
            slots = launches.load(Ordering::SeqCst);
            assert!(slots >= 5, "{slots} launches");
        }
        assert_eq!(launches.load(Ordering::SeqCst), slots * (step + 1));
    }
    for (i, spec) in specs().iter().enumerate() {
        let scale = max_abs_diff(&pb[i], &p0[i]).max(f64::MIN_POSITIVE);
        let err = max_abs_diff(&pa[i], &pb[i]) / scale;
        let (sa, sb) = (
            packed.state(&spec.name).unwrap(),
            reference.state(&spec.name).unwrap(),
        );
        let state_err = common::relative_state_error(&sa, &sb);
        eprintln!(
            "{:<16} param err {err:.3e}, state err {state_err:.3e}",
            spec.name
        );
        assert!(
            err.max(state_err) <= mulo::trajectory::DEFAULT_TOLERANCE,
            "{}: param {err:e}, state {state_err:e}",
            spec.name
        );
        assert_eq!(sa.step, sb.step, "{}", spec.name);
    }
}

/// A packed tensor's step runs its single-tensor kernels as device functions: the result is
/// bitwise that of running the model with that tensor alone.
#[test]
fn packing_does_not_change_a_tensors_result() {
    if !gxx_or_skip("packing_does_not_change_a_tensors_result") {
        return;
    }
    let lopt = common::fixture_lopt();
    let shapes: Vec<Layout> = ["10x7", "13", "10x7"]
        .iter()
        .map(|s| Layout::new(Shape::parse(s).unwrap()))
        .collect();
    let run = |shapes: &[Layout]| -> Vec<Vec<f32>> {
        let model = Arc::new(PackedModel::new(&lopt, shapes).unwrap());
        let exec = EmulatedExecutor::new(&model, Arc::new(AtomicUsize::new(0)));
        let mut backend = PackedBackend::new(model, exec, 0, "emu");
        let mut params: Vec<Vec<f32>> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| common::spread_values(s.numel(), 7 + i as u64, 0))
            .collect();
        for step in 0..2 {
            let grads: Vec<Vec<f32>> = shapes
                .iter()
                .enumerate()
                .map(|(i, s)| common::spread_values(s.numel(), i as u64, step + 1))
                .collect();
            let mut batch: Vec<TensorStep<'_>> = params
                .iter_mut()
                .zip(&grads)
                .enumerate()
                .map(|(i, (p, g))| TensorStep {
                    index: i,
                    param: p.as_mut_slice(),
                    grad: g,
                    hyper: Hyper {
                        lr: 0.3,
                        weight_decay: 0.0,
                    },
                })
                .collect();
            backend.step(&mut batch).unwrap();
        }
        params
    };
    let together = run(&shapes);
    // The same values alone: tensor 1 ("13") in a model of its own.
    let alone = {
        let lopt_shapes = [shapes[1].clone()];
        let model = Arc::new(PackedModel::new(&lopt, &lopt_shapes).unwrap());
        let exec = EmulatedExecutor::new(&model, Arc::new(AtomicUsize::new(0)));
        let mut backend = PackedBackend::new(model, exec, 0, "emu");
        let mut p = common::spread_values(13, 8, 0);
        for step in 0..2 {
            let g = common::spread_values(13, 1, step + 1);
            backend
                .step(&mut [TensorStep {
                    index: 0,
                    param: &mut p,
                    grad: &g,
                    hyper: Hyper {
                        lr: 0.3,
                        weight_decay: 0.0,
                    },
                }])
                .unwrap();
        }
        p
    };
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&together[1]), bits(&alone));
}

/// Bad batches are refused before anything runs, and leave parameters and state unchanged.
#[test]
fn bad_batches_are_refused_before_anything_runs() {
    if !gxx_or_skip("bad_batches_are_refused_before_anything_runs") {
        return;
    }
    let lopt = common::fixture_lopt();
    let shapes = [
        Layout::new(Shape::parse("4x3").unwrap()),
        Layout::new(Shape::parse("5").unwrap()),
    ];
    let model = Arc::new(PackedModel::new(&lopt, &shapes).unwrap());
    let launches = Arc::new(AtomicUsize::new(0));
    let exec = EmulatedExecutor::new(&model, launches.clone());
    let mut backend = PackedBackend::new(model, exec, 0, "emu");
    let hyper = Hyper {
        lr: 0.1,
        weight_decay: 0.0,
    };
    let (mut p, g) = (vec![1.0f32; 12], vec![0.5f32; 12]);
    let (mut q, h) = (vec![1.0f32; 5], vec![0.5f32; 4]);
    let errors = [
        backend
            .step(&mut [TensorStep {
                index: 2,
                param: &mut p,
                grad: &g,
                hyper,
            }])
            .unwrap_err()
            .to_string(),
        backend
            .step(&mut [TensorStep {
                index: 1,
                param: &mut q,
                grad: &h,
                hyper,
            }])
            .unwrap_err()
            .to_string(),
        backend
            .step_in_place(&[
                Some(Hyper {
                    lr: f32::NAN,
                    weight_decay: 0.0,
                }),
                None,
            ])
            .unwrap_err()
            .to_string(),
    ];
    assert!(
        errors[0].contains("tensor 2 does not exist"),
        "{}",
        errors[0]
    );
    assert!(
        errors[1].contains("tensor 1 has 5 elements"),
        "{}",
        errors[1]
    );
    assert!(errors[2].contains("tensor 0"), "{}", errors[2]);
    let mut twice = vec![1.0f32; 12];
    let err = {
        backend
            .step(&mut [
                TensorStep {
                    index: 0,
                    param: &mut p,
                    grad: &g,
                    hyper,
                },
                TensorStep {
                    index: 0,
                    param: &mut twice,
                    grad: &g,
                    hyper,
                },
            ])
            .unwrap_err()
            .to_string()
    };
    assert!(err.contains("appears twice"), "{err}");
    assert_eq!(launches.load(Ordering::SeqCst), 0);
    assert_eq!(p, vec![1.0f32; 12]);
    assert_eq!(backend.state(0).unwrap(), TensorState::zeros(&shapes[0], 0));
    assert_eq!(backend.step_count(0).unwrap(), 0);
}

/// The whole-model golden replay (`digits_cnn_w32`: a 0-d gain, a kernel with tied largest
/// axes, μP, weight decay, clipping) through the optimizer on the packed program in emulation.
#[test]
fn packed_program_replays_the_whole_model_golden_run() {
    if !gxx_or_skip("packed_program_replays_the_whole_model_golden_run") {
        return;
    }
    use common::model::{assert_model_within_tolerance, ModelCase, Mup};
    let case = ModelCase::digits();
    let errors = case.replay(
        Mup::BaseShapes,
        OptimizerOptions {
            backend: Arc::new(EmulatedPacked {
                launches: Arc::new(AtomicUsize::new(0)),
            }),
            ..Default::default()
        },
    );
    assert_model_within_tolerance(&errors, "packed CUDA program in emulation");
}

/// Pointer mode (every tensor in its own allocations, the table pointing at them) on the
/// whole-model golden replay: within tolerance, as the arena mode.
#[test]
fn pointer_mode_replays_the_whole_model_golden_run() {
    if !gxx_or_skip("pointer_mode_replays_the_whole_model_golden_run") {
        return;
    }
    use common::model::{assert_model_within_tolerance, ModelCase, Mup};
    let errors = ModelCase::digits().replay(
        Mup::BaseShapes,
        OptimizerOptions {
            backend: Arc::new(ExternalFactory),
            ..Default::default()
        },
    );
    assert_model_within_tolerance(
        &errors,
        "packed CUDA program on separate buffers in emulation",
    );
}

/// Pointer mode and arena mode run the same kernels on the same values: parameters and state
/// are bitwise equal, step after step, with a tensor left out of one step.
#[test]
fn pointer_mode_is_bitwise_the_arena_mode() {
    if !gxx_or_skip("pointer_mode_is_bitwise_the_arena_mode") {
        return;
    }
    let lopt = common::fixture_lopt();
    let layouts: Vec<Layout> = ["10x7", "13", "scalar", "3x4x5"]
        .iter()
        .map(|s| Layout::new(Shape::parse(s).unwrap()))
        .collect();
    let model = Arc::new(PackedModel::new(&lopt, &layouts).unwrap());
    let launches = Arc::new(AtomicUsize::new(0));
    let mut arena = PackedBackend::new(
        model.clone(),
        EmulatedExecutor::new(&model, Arc::new(AtomicUsize::new(0))),
        2,
        "emu",
    );
    let mut external = ExternalEmulated::new(model.clone(), 2, launches.clone());
    let p0: Vec<Vec<f32>> = layouts
        .iter()
        .enumerate()
        .map(|(i, l)| common::spread_values(l.numel(), 30 + i as u64, 0))
        .collect();
    let (mut pa, mut pb) = (p0.clone(), p0.clone());
    for step in 0..3usize {
        let grads: Vec<Vec<f32>> = layouts
            .iter()
            .enumerate()
            .map(|(i, l)| common::spread_values(l.numel(), i as u64, step + 1))
            .collect();
        for (backend, params) in [
            (&mut arena as &mut dyn ModelBackend, &mut pa),
            (&mut external as &mut dyn ModelBackend, &mut pb),
        ] {
            let mut steps: Vec<TensorStep<'_>> = params
                .iter_mut()
                .zip(&grads)
                .enumerate()
                // Tensor 1 is left out of step 1.
                .filter(|(i, _)| !(step == 1 && *i == 1))
                .map(|(i, (p, g))| TensorStep {
                    index: i,
                    param: p.as_mut_slice(),
                    grad: g,
                    hyper: Hyper {
                        lr: 0.2 + 0.1 * i as f32,
                        weight_decay: 0.01,
                    },
                })
                .collect();
            backend.step(&mut steps).unwrap();
        }
    }
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for i in 0..layouts.len() {
        assert_ne!(bits(&pb[i]), bits(&p0[i]), "tensor {i} was stepped");
        assert_eq!(bits(&pa[i]), bits(&pb[i]), "tensor {i}: parameters");
        let (sa, sb) = (arena.state(i).unwrap(), external.state(i).unwrap());
        assert_eq!(sa.step, sb.step, "tensor {i}: step counter");
        for ((ba, va), (bb, vb)) in sa.iter().zip(sb.iter()) {
            assert_eq!(ba, bb);
            assert_eq!(bits(va), bits(vb), "tensor {i}: state {}", ba.name());
        }
    }
    assert_eq!(external.state(1).unwrap().step, 4, "tensor 1 skipped once");
    // Per step, the slots in which a stepped tensor's plan has a kernel (tensor 1 is left
    // out of step 1): as many launches whatever the number of tensors.
    let launched = |skip: Option<usize>| {
        model
            .slots
            .iter()
            .filter(|s| {
                (0..layouts.len())
                    .filter(|&i| Some(i) != skip)
                    .any(|i| s.kernels[model.tensors[i].plan].is_some())
            })
            .count()
    };
    assert!(launched(None) >= 5);
    assert_eq!(
        launches.load(Ordering::SeqCst),
        2 * launched(None) + launched(Some(1))
    );
}

/// A pointer-mode step with bad addresses is refused before anything runs.
#[test]
fn pointer_mode_refuses_bad_buffers_before_anything_runs() {
    let lopt = common::fixture_lopt();
    let layouts = [
        Layout::new(Shape::parse("4x3").unwrap()),
        Layout::new(Shape::parse("5").unwrap()),
    ];
    let model = PackedModel::new(&lopt, &layouts).unwrap();
    let hyper = Hyper {
        lr: 0.1,
        weight_decay: 0.0,
    };
    let mut t = [TensorAddrs::default(); 2];
    let mut next = 0x1000;
    for (i, a) in t.iter_mut().enumerate() {
        for b in ARENAS {
            let len = model.buffer_len(i, b) as u64;
            if len > 0 {
                a.set(b, next);
                next += 4 * len;
            }
        }
    }
    let steps = [Some((hyper, 0)), Some((hyper, 0))];
    model.external_launch(&t, &steps, 0x10, 0x20).unwrap();
    let err = |t: &[TensorAddrs], steps: &[Option<(Hyper, u64)>]| {
        model
            .external_launch(t, steps, 0x10, 0x20)
            .unwrap_err()
            .to_string()
    };
    let mut bad = t;
    bad[1].set(Buffer::FacV, 0);
    assert!(
        err(&bad, &steps).contains("tensor 1 `fac_v`"),
        "{}",
        err(&bad, &steps)
    );
    // Left out, its buffers are not needed.
    model
        .external_launch(&bad, &[Some((hyper, 0)), None], 0x10, 0x20)
        .unwrap();
    let nan = [
        Some((
            Hyper {
                lr: f32::NAN,
                weight_decay: 0.0,
            },
            0,
        )),
        None,
    ];
    assert!(err(&t, &nan).contains("tensor 0"), "{}", err(&t, &nan));
    assert!(err(&t, &steps[..1]).contains("steps"));
}
