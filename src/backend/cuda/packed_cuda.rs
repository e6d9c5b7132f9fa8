//! The packed model on a CUDA device through cudarc (feature `cuda`): [`CudaExecutor`] and the
//! [`PackedCuda`] factory. The host logic they plug into is
//! [`PackedBackend`].

use super::nvrtc;
use super::packed::{ArenaBases, PackedModel, ARENAS};
use super::packed_runtime::{PackedBackend, PackedExecutor};
use super::runtime::{driver_err, CudaRuntime};
use crate::backend::{BackendFactory, Hyper, ModelBackend};
use crate::error::{Error, Result};
use crate::ir::Buffer;
use crate::lopt::LearnedOptimizer;
use crate::shape::Layout;
use cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtrMut,
    LaunchConfig, PushKernelArg,
};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The arenas of a packed model on a CUDA device, and its loaded program.
///
/// The arenas are private allocations of the model's lengths for the executor's lifetime:
/// callers get views ([`arena`](Self::arena), [`arena_mut`](Self::arena_mut),
/// [`param_and_grad_mut`](Self::param_and_grad_mut)), which can be written through but not
/// swapped for other allocations, and [`run`](PackedExecutor::run) writes the table itself
/// from the arenas' addresses and launches only block starts that
/// [`PackedModel::check_launch`] accepts, after checking every arena's length. No safe call
/// can make a kernel read or write outside an arena.
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

    fn run(&mut self, steps: &[Option<(Hyper, u64)>], starts: &[i64], grids: &[u32]) -> Result<()> {
        // Nothing reaches the device unless it stays inside the arenas.
        self.model.check_launch(starts, grids)?;
        self.check_arenas()?;
        let n = self.model.tensors.len();
        if steps.len() != n {
            return Err(Error::argument(
                "steps",
                format!("{} entries; the model has {n} tensors", steps.len()),
            ));
        }
        let stream = self.stream.clone();
        // The arenas the table points into, taken for writing on the stream (it waits for
        // earlier work on them; the guards record this step's use when they drop, after the
        // launches).
        let mut bases = ArenaBases {
            arenas: [0; 7],
            scratch: 0,
            partials: 0,
        };
        let mut guards = Vec::with_capacity(ARENAS.len() + 2);
        for (b, slice) in self.arenas.iter_mut() {
            let k = ARENAS.iter().position(|x| x == b).expect("an arena buffer");
            let (ptr, guard) = slice.device_ptr_mut(&stream);
            bases.arenas[k] = ptr;
            guards.push(guard);
        }
        let (ptr, guard) = self.scratch.device_ptr_mut(&stream);
        bases.scratch = ptr;
        guards.push(guard);
        let (ptr, guard) = self.partials.device_ptr_mut(&stream);
        bases.partials = ptr;
        guards.push(guard);
        let table = self.model.table(&self.model.arena_addrs(&bases), steps);
        if !table.is_empty() {
            let mut view = self.table.slice_mut(0..table.len());
            stream
                .memcpy_htod(&table, &mut view)
                .map_err(driver_err("uploading the tensor table"))?;
        }
        if !starts.is_empty() {
            let mut view = self.starts.slice_mut(0..starts.len());
            stream
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
            let mut b = stream.launch_builder(f);
            b.arg(&self.table);
            b.arg(&self.starts);
            b.arg(&self.n_tensors);
            // SAFETY: the arguments are those of templates/model_kernel.cu.j2 in order (table,
            // starts, tensor count); the table holds addresses inside the arenas this executor
            // owns, each of the length the offsets were computed for (`check_arenas`), and the
            // starts and the grid are the model's (`check_launch`).
            unsafe { b.launch(cfg) }.map_err(driver_err("launching a packed kernel"))?;
        }
        drop(guards);
        stream
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
