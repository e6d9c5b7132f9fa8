//! Running a [`PackedModel`]: the whole model's step as a fixed number of launches.
//!
//! - [`PackedExecutor`] is where the arenas live and how the launches run: [`CudaExecutor`]
//!   on a GPU (cudarc), or, in the tests, the generated source compiled for the CPU. It knows
//!   nothing of tensors.
//! - [`PackedBackend`] is the host logic on top of any executor: it validates a batch, packs
//!   parameters and gradients, writes the table and block starts, keeps the step counters,
//!   and implements [`ModelBackend`] for [`MuloOptimizer`](crate::optimizer::MuloOptimizer).
//!   [`PackedBackend::step_in_place`] steps parameters and gradients already in the device
//!   arenas (a training loop on the GPU).
//! - [`PackedCuda`] is the [`BackendFactory`] to put in
//!   [`OptimizerOptions::backend`](crate::optimizer::OptimizerOptions::backend).

use super::nvrtc;
use super::packed::{PackedModel, ARENAS};
use super::runtime::{driver_err, CudaRuntime};
use crate::backend::model::out_of_range;
use crate::backend::Hyper;
use crate::backend::{BackendFactory, ModelBackend, TensorStep};
use crate::error::{Error, Result};
use crate::ir::Buffer;
use crate::lopt::LearnedOptimizer;
use crate::shape::Layout;
use crate::state::TensorState;
use cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, CudaViewMut, LaunchConfig,
    PushKernelArg,
};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Where a packed model's arenas live and how its launches run.
pub trait PackedExecutor: Send + Sync {
    /// Copies `data` into `arena` at element `offset`.
    fn write(&mut self, arena: Buffer, offset: usize, data: &[f32]) -> Result<()>;

    /// Copies `out.len()` values of `arena` from element `offset` into `out`.
    fn read(&self, arena: Buffer, offset: usize, out: &mut [f32]) -> Result<()>;

    /// Runs one model step: uploads `table` and `starts` (see [`PackedModel::table`] and
    /// [`PackedModel::block_starts`]) and launches every slot with a non-empty grid, in order;
    /// returns when the step is complete.
    fn run(&mut self, table: &[u8], starts: &[i64], grids: &[u32]) -> Result<()>;
}

/// The host side of a packed model on any [`PackedExecutor`].
pub struct PackedBackend<E> {
    model: Arc<PackedModel>,
    exec: E,
    steps: Vec<u64>,
    target: &'static str,
    staging: [Vec<f32>; 2],
}

impl<E: PackedExecutor> PackedBackend<E> {
    /// A backend over `exec` (whose arenas have the model's lengths, state zero), every
    /// tensor at step counter `start_step`.
    pub fn new(model: Arc<PackedModel>, exec: E, start_step: u64, target: &'static str) -> Self {
        let n = model.tensors.len();
        let len = model.arena_len[&Buffer::Param];
        PackedBackend {
            model,
            exec,
            steps: vec![start_step; n],
            target,
            staging: [vec![0.0; len], vec![0.0; len]],
        }
    }

    /// The packed model.
    pub fn model(&self) -> &Arc<PackedModel> {
        &self.model
    }

    /// The executor (on CUDA: the device arenas, e.g. to compute gradients into).
    pub fn executor(&self) -> &E {
        &self.exec
    }

    /// The executor, mutable.
    pub fn executor_mut(&mut self) -> &mut E {
        &mut self.exec
    }

    /// The step counter of tensor `index`.
    pub fn step_count(&self, index: usize) -> Result<u64> {
        self.steps
            .get(index)
            .copied()
            .ok_or_else(|| out_of_range(index, self.steps.len()))
    }

    /// One step of the tensors with `Some` hyper-parameters in `hypers` (one per tensor),
    /// on the parameters and gradients already in the executor's `param` and `grad` arenas
    /// (each tensor at [`PackedModel::param_offset`]). Hyper-parameters are checked before
    /// anything runs. The tensors' step counters advance.
    pub fn step_in_place(&mut self, hypers: &[Option<Hyper>]) -> Result<()> {
        let n = self.model.tensors.len();
        if hypers.len() != n {
            return Err(Error::argument(
                "hypers",
                format!(
                    "one entry per tensor of the model ({n}) is needed, got {}",
                    hypers.len()
                ),
            ));
        }
        for (i, h) in hypers.iter().enumerate() {
            if let Some(h) = h {
                h.validate()
                    .map_err(|e| Error::argument("hypers", format!("tensor {i}: {e}")))?;
            }
        }
        let active: Vec<bool> = hypers.iter().map(Option::is_some).collect();
        let entries: Vec<Option<(Hyper, u64)>> = hypers
            .iter()
            .zip(&self.steps)
            .map(|(h, &s)| h.map(|h| (h, s)))
            .collect();
        let table = self.model.table(&entries);
        let starts = self.model.block_starts(&active);
        let grids = self.model.grids(&starts)?;
        self.exec.run(&table, &starts, &grids)?;
        for (s, on) in self.steps.iter_mut().zip(active) {
            *s += on as u64;
        }
        Ok(())
    }
}

impl<E: PackedExecutor> ModelBackend for PackedBackend<E> {
    fn target(&self) -> &'static str {
        self.target
    }

    fn len(&self) -> usize {
        self.model.tensors.len()
    }

    fn compiled_plans(&self) -> usize {
        self.model.plans.len()
    }

    fn step(&mut self, batch: &mut [TensorStep<'_>]) -> Result<()> {
        let n = self.model.tensors.len();
        let mut hypers: Vec<Option<Hyper>> = vec![None; n];
        for t in batch.iter() {
            let slot = hypers
                .get_mut(t.index)
                .ok_or_else(|| out_of_range(t.index, n))?;
            if slot.replace(t.hyper).is_some() {
                return Err(Error::argument(
                    "batch",
                    format!("tensor {} appears twice", t.index),
                ));
            }
            let numel = self.model.tensors[t.index].numel;
            if t.param.len() != numel || t.grad.len() != numel {
                return Err(Error::argument(
                    "batch",
                    format!(
                        "tensor {} has {numel} elements; got a parameter of {} and a gradient of {}",
                        t.index,
                        t.param.len(),
                        t.grad.len()
                    ),
                ));
            }
        }
        let [param, grad] = &mut self.staging;
        for t in batch.iter() {
            let o = self.model.param_offset(t.index);
            param[o..o + t.param.len()].copy_from_slice(t.param);
            grad[o..o + t.grad.len()].copy_from_slice(t.grad);
        }
        self.exec.write(Buffer::Param, 0, param)?;
        self.exec.write(Buffer::Grad, 0, grad)?;
        self.step_in_place(&hypers)?;
        let param = &mut self.staging[0];
        self.exec.read(Buffer::Param, 0, param)?;
        for t in batch.iter_mut() {
            let o = self.model.param_offset(t.index);
            let len = t.param.len();
            t.param.copy_from_slice(&param[o..o + len]);
        }
        Ok(())
    }

    fn state(&self, index: usize) -> Result<TensorState> {
        let n = self.model.tensors.len();
        let t = self
            .model
            .tensors
            .get(index)
            .ok_or_else(|| out_of_range(index, n))?;
        let layout = &self.model.plans[t.plan].ir.layout;
        let mut state = TensorState::zeros(layout, self.steps[index]);
        for b in Buffer::state_for_layout(layout) {
            let mut values = vec![0.0f32; b.len(layout)];
            self.exec.read(b, t.offsets[&b], &mut values)?;
            state.set(b, values)?;
        }
        Ok(state)
    }

    fn set_state(&mut self, index: usize, state: TensorState) -> Result<()> {
        let n = self.model.tensors.len();
        let t = self
            .model
            .tensors
            .get(index)
            .ok_or_else(|| out_of_range(index, n))?;
        crate::backend::check_state_layout(&self.model.plans[t.plan].ir.layout, &state)?;
        for (b, values) in state.iter() {
            self.exec.write(b, t.offsets[&b], values)?;
        }
        self.steps[index] = state.step;
        Ok(())
    }
}

/// The arenas of a packed model on a CUDA device, and its loaded program.
///
/// The arenas are private allocations of the model's lengths for the executor's lifetime:
/// callers get views ([`arena`](Self::arena), [`arena_mut`](Self::arena_mut),
/// [`param_and_grad_mut`](Self::param_and_grad_mut)), which can be written through but not
/// swapped for other allocations, and [`run`](PackedExecutor::run) launches only tables and
/// block starts that [`PackedModel::check_launch`] accepts, after checking every arena's
/// length. No safe call can make a kernel read or write outside an arena.
pub struct CudaExecutor {
    model: PackedModel,
    stream: Arc<CudaStream>,
    _module: Arc<CudaModule>,
    slots: Vec<CudaFunction>,
    n_tensors: i32,
    arenas: BTreeMap<Buffer, CudaSlice<f32>>,
    scratch: CudaSlice<f32>,
    partials: CudaSlice<f64>,
    table: CudaSlice<u8>,
    starts: CudaSlice<i64>,
}

impl CudaExecutor {
    /// Compiles `model` for the runtime's architecture (through the NVRTC disk cache), loads
    /// it and allocates its arenas (zero).
    pub fn new(runtime: &CudaRuntime, model: &PackedModel) -> Result<Self> {
        let source = model.source()?;
        let ptx = nvrtc::compile(&source, runtime.arch(), true)?;
        let stream = runtime.stream().clone();
        let program = format!(
            "mulo_model.ptx ({} tensors, {} shapes)",
            model.tensors.len(),
            model.plans.len()
        );
        nvrtc::check_installed_driver(&ptx.ptx, &program)?;
        let module = stream
            .context()
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx.ptx))
            .map_err(driver_err(&format!("loading {program}")))?;
        let slots = model
            .slots
            .iter()
            .map(|s| {
                module
                    .load_function(&s.name)
                    .map_err(driver_err(&format!("loading kernel {}", s.name)))
            })
            .collect::<Result<Vec<_>>>()?;
        let alloc = |n: usize| {
            stream
                .alloc_zeros::<f32>(n.max(1))
                .map_err(driver_err("allocating an arena"))
        };
        let mut arenas = BTreeMap::new();
        for b in ARENAS {
            arenas.insert(b, alloc(model.arena_len[&b])?);
        }
        let n = model.tensors.len();
        Ok(CudaExecutor {
            scratch: alloc(model.scratch_len)?,
            partials: stream
                .alloc_zeros::<f64>(model.partials_len.max(1))
                .map_err(driver_err("allocating the partials arena"))?,
            table: stream
                .alloc_zeros::<u8>((n * super::packed::TABLE_ENTRY_BYTES).max(1))
                .map_err(driver_err("allocating the tensor table"))?,
            starts: stream
                .alloc_zeros::<i64>((model.slots.len() * (n + 1)).max(1))
                .map_err(driver_err("allocating the block starts"))?,
            n_tensors: i32::try_from(n)
                .map_err(|_| Error::argument("shapes", "more than 2^31 tensors"))?,
            stream,
            _module: module,
            slots,
            arenas,
            model: model.clone(),
        })
    }

    /// The stream every launch runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// A view of the device arena of `buffer` (`param`: the model's parameters, each tensor
    /// at [`PackedModel::param_offset`]; `grad`: its gradients, same offsets).
    pub fn arena(&self, buffer: Buffer) -> CudaView<'_, f32> {
        self.arenas[&buffer].as_view()
    }

    /// Views of the parameter arena and of the gradient arena, mutable: what a training step
    /// on the GPU reads and writes before [`PackedBackend::step_in_place`].
    pub fn param_and_grad_mut(&mut self) -> (CudaView<'_, f32>, CudaViewMut<'_, f32>) {
        let mut param = None;
        let mut grad = None;
        for (b, slice) in self.arenas.iter_mut() {
            match b {
                Buffer::Param => param = Some(slice.as_view()),
                Buffer::Grad => grad = Some(slice.as_view_mut()),
                _ => {}
            }
        }
        (
            param.expect("the param arena exists"),
            grad.expect("the grad arena exists"),
        )
    }

    /// A mutable view of the device arena of `buffer` (write gradients here before
    /// [`PackedBackend::step_in_place`]).
    pub fn arena_mut(&mut self, buffer: Buffer) -> CudaViewMut<'_, f32> {
        self.arenas
            .get_mut(&buffer)
            .expect("every buffer has an arena")
            .as_view_mut()
    }

    /// Checks that every arena still has the length the model's offsets were computed for.
    fn check_arenas(&self) -> Result<()> {
        let lens = ARENAS
            .iter()
            .map(|b| {
                (
                    b.name(),
                    self.arenas[b].len(),
                    self.model.arena_len[b].max(1),
                )
            })
            .chain([
                ("scratch", self.scratch.len(), self.model.scratch_len.max(1)),
                (
                    "partials",
                    self.partials.len(),
                    self.model.partials_len.max(1),
                ),
            ]);
        for (name, have, want) in lens {
            if have != want {
                return Err(Error::argument(
                    name,
                    format!("the arena has {have} values, the program needs {want}"),
                ));
            }
        }
        Ok(())
    }
}

fn check_range(arena: Buffer, offset: usize, len: usize, have: usize) -> Result<()> {
    if offset + len > have {
        return Err(Error::argument(
            arena.name(),
            format!(
                "values {offset}..{} are outside the arena of {have}",
                offset + len
            ),
        ));
    }
    Ok(())
}

impl PackedExecutor for CudaExecutor {
    fn write(&mut self, arena: Buffer, offset: usize, data: &[f32]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let stream = self.stream.clone();
        let slice = self
            .arenas
            .get_mut(&arena)
            .expect("every buffer has an arena");
        check_range(arena, offset, data.len(), slice.len())?;
        let mut view = slice.slice_mut(offset..offset + data.len());
        stream
            .memcpy_htod(data, &mut view)
            .map_err(driver_err("uploading to an arena"))
    }

    fn read(&self, arena: Buffer, offset: usize, out: &mut [f32]) -> Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        let slice = &self.arenas[&arena];
        check_range(arena, offset, out.len(), slice.len())?;
        let view = slice.slice(offset..offset + out.len());
        self.stream
            .memcpy_dtoh(&view, out)
            .map_err(driver_err("downloading from an arena"))?;
        self.stream
            .synchronize()
            .map_err(driver_err("synchronizing"))
    }

    fn run(&mut self, table: &[u8], starts: &[i64], grids: &[u32]) -> Result<()> {
        // Nothing reaches the device unless it stays inside the arenas.
        self.model.check_launch(table, starts, grids)?;
        self.check_arenas()?;
        if !table.is_empty() {
            let mut view = self.table.slice_mut(0..table.len());
            self.stream
                .memcpy_htod(table, &mut view)
                .map_err(driver_err("uploading the tensor table"))?;
        }
        if !starts.is_empty() {
            let mut view = self.starts.slice_mut(0..starts.len());
            self.stream
                .memcpy_htod(starts, &mut view)
                .map_err(driver_err("uploading the block starts"))?;
        }
        for (f, &grid) in self.slots.iter().zip(grids) {
            if grid == 0 {
                continue;
            }
            let cfg = LaunchConfig {
                grid_dim: (grid, 1, 1),
                block_dim: (super::schedule::BLOCK_DIM_X, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = self.stream.launch_builder(f);
            b.arg(&self.table);
            b.arg(&self.starts);
            b.arg(&self.n_tensors);
            for buffer in ARENAS {
                b.arg(&self.arenas[&buffer]);
            }
            b.arg(&self.scratch);
            b.arg(&self.partials);
            // SAFETY: the arguments are those of templates/model_kernel.cu.j2 in order (table,
            // starts, tensor count, the seven arenas of `ARENAS`, scratch, partials); every
            // arena has the length the table's offsets were computed for (`check_arenas`), and
            // the table, the starts and the grid are the model's (`check_launch`).
            unsafe { b.launch(cfg) }.map_err(driver_err("launching a packed kernel"))?;
        }
        self.stream
            .synchronize()
            .map_err(driver_err("synchronizing after a packed step"))
    }
}

/// The packed CUDA backend as a [`BackendFactory`]: one program for the whole model, a step
/// is a fixed number of launches over all its tensors.
pub struct PackedCuda {
    runtime: CudaRuntime,
}

impl PackedCuda {
    /// Opens CUDA device `ordinal`.
    pub fn new(ordinal: usize) -> Result<Self> {
        Ok(PackedCuda {
            runtime: CudaRuntime::new(ordinal)?,
        })
    }

    /// The runtime (context, stream, architecture).
    pub fn runtime(&self) -> &CudaRuntime {
        &self.runtime
    }

    /// A packed backend for tensors of `layouts`, with direct access to its device arenas.
    pub fn backend(
        &self,
        lopt: &LearnedOptimizer,
        layouts: &[Layout],
        start_step: u64,
    ) -> Result<PackedBackend<CudaExecutor>> {
        let model = Arc::new(PackedModel::new(lopt, layouts)?);
        let exec = CudaExecutor::new(&self.runtime, &model)?;
        Ok(PackedBackend::new(model, exec, start_step, "cuda"))
    }
}

impl BackendFactory for PackedCuda {
    fn target(&self) -> &'static str {
        "cuda"
    }

    fn build(
        &self,
        lopt: &LearnedOptimizer,
        layouts: &[Layout],
        start_step: u64,
    ) -> Result<Box<dyn ModelBackend>> {
        Ok(Box::new(self.backend(lopt, layouts, start_step)?))
    }
}
