//! The packed model on a CUDA device through cudarc (feature `cuda`): [`CudaExecutor`] and the
//! [`PackedCuda`] factory. The host logic they plug into is
//! [`PackedBackend`].

use super::loader::{Image, Kernel, Launch, Module};
use super::nvrtc;
use super::packed::{ArenaBases, PackedModel, ARENAS};
use super::packed_runtime::{PackedBackend, PackedExecutor};
use super::runtime::{driver_err, CudaRuntime};
use crate::backend::{BackendFactory, Hyper, ModelBackend};
use crate::error::{Error, Result};
use crate::ir::Buffer;
use crate::lopt::LearnedOptimizer;
use crate::shape::Layout;
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtrMut, LaunchConfig};
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
    launches: PackedLaunches,
    arenas: BTreeMap<Buffer, CudaSlice<f32>>,
    scratch: CudaSlice<f32>,
    partials: CudaSlice<f64>,
    /// A staged model's round buffers ([`PackedModel::round_len`]); none otherwise.
    rounds: Vec<CudaSlice<f64>>,
}

/// What both packed executors ([`CudaExecutor`] on its arenas and
/// [`ExternalCuda`](super::packed_external::ExternalCuda) on the caller's tensors) share: the
/// model's program loaded as a CUBIN, its entry kernels, and device space for one step's
/// tensor table and block starts.
pub(super) struct PackedLaunches {
    slots: Vec<Kernel>,
    n_tensors: i32,
    table: CudaSlice<u8>,
    starts: CudaSlice<i64>,
}

impl PackedLaunches {
    /// Compiles `model` to a CUBIN for `arch` (through the NVRTC disk cache), checks that the
    /// installed driver can load it, loads it into `stream`'s context (no driver JIT) and
    /// allocates the table and the starts.
    pub(super) fn load(stream: &Arc<CudaStream>, model: &PackedModel, arch: &str) -> Result<Self> {
        let source = model.source()?;
        let cubin = nvrtc::compile_packed_cubin(&source, arch, true)?;
        let program = format!(
            "mulo_model.cubin ({} tensors, {} shapes, {arch})",
            model.tensors.len(),
            model.plans.len()
        );
        nvrtc::check_installed_driver_cubin(cubin.nvrtc_version, &program)?;
        let module = Module::load(stream.context(), Image::Cubin(&cubin.cubin), &program)?;
        module.fill_constants(&super::manifest::constants_json(
            &model.constant_arrays(&source)?,
        ))?;
        let slots = model
            .slots
            .iter()
            .map(|s| module.kernel(&s.name))
            .collect::<Result<Vec<_>>>()?;
        let n = model.tensors.len();
        Ok(PackedLaunches {
            slots,
            n_tensors: i32::try_from(n)
                .map_err(|_| Error::argument("shapes", "more than 2^31 tensors"))?,
            table: stream
                .alloc_zeros::<u8>((n * super::packed::TABLE_ENTRY_BYTES).max(1))
                .map_err(driver_err("allocating the tensor table"))?,
            starts: stream
                .alloc_zeros::<i64>((model.slots.len() * (n + 1)).max(1))
                .map_err(driver_err("allocating the block starts"))?,
        })
    }

    /// Uploads one step's `table` and block `starts` and queues every pass with a non-empty
    /// grid on `stream`, in order.
    ///
    /// # Safety
    /// Every address in `table` is valid, for the length the model gives it, for the work
    /// queued on `stream` (allocations the caller keeps alive and ordered with `stream`), and
    /// `starts` and `grids` are the model's ([`PackedModel::check_launch`]), except that a
    /// slot's grid may be 0 (not launched: the slots of other stages of a staged model).
    pub(super) unsafe fn run(
        &mut self,
        stream: &Arc<CudaStream>,
        table: &[u8],
        starts: &[i64],
        grids: &[u32],
    ) -> Result<()> {
        if !table.is_empty() {
            let mut view = self.table.slice_mut(0..table.len());
            stream
                .memcpy_htod(table, &mut view)
                .map_err(driver_err("uploading the tensor table"))?;
        }
        if !starts.is_empty() {
            let mut view = self.starts.slice_mut(0..starts.len());
            stream
                .memcpy_htod(starts, &mut view)
                .map_err(driver_err("uploading the block starts"))?;
        }
        for (slot, (f, &grid)) in self.slots.iter().zip(grids).enumerate() {
            if grid == 0 {
                continue;
            }
            let cfg = LaunchConfig {
                grid_dim: (grid, 1, 1),
                block_dim: (super::schedule::BLOCK_DIM_X, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = Launch::new(stream);
            b.read(&self.table);
            b.read(&self.starts);
            b.i32(self.n_tensors);
            // SAFETY: the arguments are those of templates/model_kernel.cu.j2 in order (table,
            // starts, tensor count); the table's addresses, the starts and the grids are what
            // this function's contract requires.
            unsafe { b.launch(f, cfg) }.map_err(|e| {
                let n = self.n_tensors as usize;
                let entries = starts
                    .get(slot * (n + 1)..(slot + 1) * (n + 1))
                    .map_or_else(|| "unknown table entries".to_string(), launched_entries);
                Error::backend("cuda", format!("{e}; the launch stepped {entries}"))
            })?;
        }
        Ok(())
    }
}

/// The tensor table entries one slot's launch steps, from its `n + 1` block starts (entry `t`
/// owns blocks `starts[t]..starts[t + 1]`), as words for an error: `table entries 0 (blocks
/// 0..4), 2 (blocks 4..9)`.
fn launched_entries(starts: &[i64]) -> String {
    let entries: Vec<String> = starts
        .windows(2)
        .enumerate()
        .filter(|(_, w)| w[1] > w[0])
        .map(|(t, w)| format!("{t} (blocks {}..{})", w[0], w[1]))
        .collect();
    if entries.is_empty() {
        "no table entry".to_string()
    } else {
        format!("table entries {}", entries.join(", "))
    }
}

impl CudaExecutor {
    /// Compiles `model` to a CUBIN for the runtime's architecture (through the NVRTC disk
    /// cache), loads it (no driver JIT) and allocates its arenas (zero).
    pub fn new(runtime: &CudaRuntime, model: &PackedModel) -> Result<Self> {
        let _current = super::current::RestoreCurrent::new();
        let stream = runtime.stream().clone();
        let launches = PackedLaunches::load(&stream, model, runtime.arch())?;
        let alloc = |n: usize| {
            stream
                .alloc_zeros::<f32>(n.max(1))
                .map_err(driver_err("allocating an arena"))
        };
        let mut arenas = BTreeMap::new();
        for b in ARENAS {
            arenas.insert(b, alloc(model.arena_len[&b])?);
        }
        let rounds = model
            .round_len
            .iter()
            .map(|&len| {
                stream
                    .alloc_zeros::<f64>(len.max(1))
                    .map_err(driver_err("allocating a round buffer"))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(CudaExecutor {
            scratch: alloc(model.scratch_len)?,
            partials: stream
                .alloc_zeros::<f64>(model.partials_len.max(1))
                .map_err(driver_err("allocating the partials arena"))?,
            rounds,
            stream,
            launches,
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

    /// Queues stage `stage` of a step of a **staged** model ([`PackedModel::staged`]) on
    /// [`stream`](Self::stream): the launches of [`PackedModel::stage_slots`], for the
    /// tensors with `steps[t]` (hyper-parameters and step counter; `None`: not stepped this
    /// step; give the same for every stage of a step). Stage `r` (before the last) leaves this
    /// rank's partial sums of round `r` in [`round_mut`](Self::round_mut)`(r)`: replace them by
    /// their sum over every rank (e.g. NCCL's all-reduce in place, ordered with the stream)
    /// before queuing stage `r + 1`. The last stage writes the parameters and state in their
    /// arenas. With one rank (every row of every tensor), the stages one after the other are
    /// the whole step. Stage 0 of a model that is not staged is the whole step.
    ///
    /// Not run on a GPU yet: its logic is the emulated one of `tests/cuda_staged_emulated.rs`.
    pub fn run_stage(&mut self, stage: usize, steps: &[Option<(Hyper, u64)>]) -> Result<()> {
        let _current = super::current::RestoreCurrent::new();
        if stage >= self.model.stages() {
            return Err(Error::argument(
                "stage",
                format!(
                    "stage {stage} of a program of {} stages",
                    self.model.stages()
                ),
            ));
        }
        let active: Vec<bool> = steps.iter().map(Option::is_some).collect();
        let starts = self.model.block_starts(&active);
        let mut grids = self.model.grids(&starts)?;
        self.model.check_launch(&starts, &grids)?;
        let slots = self.model.stage_slots(stage);
        for (s, g) in grids.iter_mut().enumerate() {
            if !slots.contains(&s) {
                *g = 0;
            }
        }
        self.queue(steps, &starts, &grids)
    }

    /// A mutable view of round `round`'s buffer of a staged model (f64,
    /// [`PackedModel::round_len`] values): this rank's partial sums after stage `round`, to be
    /// replaced by their sum over every rank before the next stage.
    pub fn round_mut(&mut self, round: usize) -> Result<CudaViewMut<'_, f64>> {
        self.round_len(round)?;
        Ok(self.rounds[round].as_view_mut())
    }

    /// The length of round `round`'s buffer, or an error naming the program's rounds.
    fn round_len(&self, round: usize) -> Result<usize> {
        self.model.round_len.get(round).copied().ok_or_else(|| {
            Error::argument(
                "round",
                format!(
                    "round {round} of a program of {} rounds",
                    self.model.round_len.len()
                ),
            )
        })
    }

    /// Copies round `round`'s buffer to the host (waits for the stream).
    pub fn read_round(&self, round: usize) -> Result<Vec<f64>> {
        let _current = super::current::RestoreCurrent::new();
        let len = self.round_len(round)?;
        let mut out = vec![0f64; len];
        if len > 0 {
            self.stream
                .memcpy_dtoh(&self.rounds[round].slice(0..len), &mut out)
                .map_err(driver_err("downloading a round buffer"))?;
        }
        Ok(out)
    }

    /// Replaces round `round`'s buffer by `sums` (its sum over every rank), from the host.
    pub fn write_round(&mut self, round: usize, sums: &[f64]) -> Result<()> {
        let _current = super::current::RestoreCurrent::new();
        let want = self.round_len(round)?;
        if want != sums.len() {
            return Err(Error::argument(
                "sums",
                format!(
                    "{} values for round {round}; the program's buffer has {want}",
                    sums.len()
                ),
            ));
        }
        if sums.is_empty() {
            return Ok(());
        }
        let stream = self.stream.clone();
        let mut view = self.rounds[round].slice_mut(0..sums.len());
        stream
            .memcpy_htod(sums, &mut view)
            .map_err(driver_err("uploading a round buffer"))
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
            ])
            .chain(
                self.rounds
                    .iter()
                    .zip(&self.model.round_len)
                    .map(|(r, &len)| ("round buffer", r.len(), len.max(1))),
            );
        if self.rounds.len() != self.model.round_len.len() {
            return Err(Error::argument(
                "rounds",
                format!(
                    "{} round buffers; the program has {} rounds",
                    self.rounds.len(),
                    self.model.round_len.len()
                ),
            ));
        }
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
        let _current = super::current::RestoreCurrent::new();
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
        let _current = super::current::RestoreCurrent::new();
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
        let _current = super::current::RestoreCurrent::new();
        // Nothing reaches the device unless it stays inside the arenas.
        self.model.check_launch(starts, grids)?;
        self.queue(steps, starts, grids)?;
        self.stream
            .synchronize()
            .map_err(driver_err("synchronizing after a packed step"))
    }
}

impl CudaExecutor {
    /// Queues the launches of `grids` (the model's, [`PackedModel::check_launch`], with the
    /// slots not to run at 0) on the executor's arenas and round buffers.
    fn queue(
        &mut self,
        steps: &[Option<(Hyper, u64)>],
        starts: &[i64],
        grids: &[u32],
    ) -> Result<()> {
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
            rounds: [0; super::packed::MAX_ROUNDS],
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
        for (r, slice) in self.rounds.iter_mut().enumerate() {
            let (ptr, guard) = slice.device_ptr_mut(&stream);
            bases.rounds[r] = ptr;
            guards.push(guard);
        }
        let table = self.model.table(&self.model.arena_addrs(&bases), steps);
        // SAFETY: the table holds addresses inside the arenas and round buffers this executor
        // owns, each of the length the offsets were computed for (`check_arenas`), taken for
        // `stream` by the guards; the starts are the model's and every grid is the model's or
        // 0 (`check_launch`, checked by the callers).
        unsafe { self.launches.run(&stream, &table, starts, grids) }?;
        drop(guards);
        Ok(())
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
        let _current = super::current::RestoreCurrent::new();
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

/// Timed packed whole-model steps on a GPU, against the measured roofs.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PackedBenchReport {
    /// Tensors in the model.
    pub tensors: usize,
    /// Distinct shapes (plans).
    pub shapes: usize,
    /// Elements over all tensors.
    pub elements: usize,
    /// Timed steps.
    pub steps: usize,
    /// Median time of one whole-model step (every tensor stepped, synchronized).
    pub median_ns: u64,
    /// Fastest step.
    pub min_ns: u64,
    /// Median time per element.
    pub ns_per_element: f64,
    /// Minimum device-memory traffic of one step (bytes; [`StepCost`](crate::bench::StepCost)
    /// of each tensor × its elements).
    pub bytes_per_step: f64,
    /// Folded multiply-adds of one step.
    pub madds_per_step: f64,
    /// Memory floor of one step at the measured copy bandwidth (ns).
    pub memory_floor_ns: f64,
    /// Compute floor of one step at the measured FP32 multiply-add rate (ns).
    pub compute_floor_ns: f64,
    /// Memory floor / measured.
    pub memory_floor_fraction: f64,
    /// Compute floor / measured.
    pub compute_floor_fraction: f64,
    /// Measured device-to-device copy bandwidth (bytes per second, read + write).
    pub bandwidth_bytes_per_sec: f64,
    /// Measured FP32 multiply-add rate (per second).
    pub peak_madds_per_sec: f64,
    /// Launches per step.
    pub launches: usize,
}

/// Times `steps` packed steps (after `warmup`) of a model of tensors of `layouts`, with
/// parameters and gradients already in the device arenas
/// ([`PackedBackend::step_in_place`]: what a training loop on the GPU runs), against the
/// measured copy bandwidth and FP32 multiply-add rate.
pub fn bench_packed(
    packed: &PackedCuda,
    lopt: &LearnedOptimizer,
    layouts: &[Layout],
    warmup: usize,
    steps: usize,
) -> Result<PackedBenchReport> {
    let mut backend = packed.backend(lopt, layouts, 0)?;
    let model = backend.model().clone();
    let n = model.arena_len[&Buffer::Param];
    let param: Vec<f32> = (0..n)
        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-3)
        .collect();
    let grad: Vec<f32> = (0..n)
        .map(|i| ((i * 104729 % 997) as f32 - 498.0) * 1e-4)
        .collect();
    backend.executor_mut().write(Buffer::Param, 0, &param)?;
    backend.executor_mut().write(Buffer::Grad, 0, &grad)?;
    let hyper = crate::backend::Hyper {
        lr: 1e-3,
        weight_decay: 0.0,
    };
    let hypers = vec![Some(hyper); model.tensors.len()];
    // `run` synchronizes after the step's launches.
    let times = crate::bench::time_steps(warmup, steps, || backend.step_in_place(&hypers))?;
    let (mut bytes, mut madds, mut elements) = (0.0, 0.0, 0usize);
    for t in &model.tensors {
        let cost = crate::bench::StepCost::of(&model.plans[t.plan].ir);
        bytes += cost.bytes_per_element * t.numel as f64;
        madds += cost.madds_per_element * t.numel as f64;
        elements += t.numel;
    }
    let bandwidth = super::runtime::measure_copy_bandwidth(packed.runtime().stream())?;
    let peak = super::runtime::measure_fma_rate(packed.runtime())?;
    let median_ns = crate::bench::median(&times);
    let memory_floor_ns = bytes / bandwidth * 1e9;
    let compute_floor_ns = madds / peak * 1e9;
    Ok(PackedBenchReport {
        tensors: model.tensors.len(),
        shapes: model.plans.len(),
        elements,
        steps: times.len(),
        median_ns,
        min_ns: times.iter().copied().min().unwrap_or(0),
        ns_per_element: median_ns as f64 / elements.max(1) as f64,
        bytes_per_step: bytes,
        madds_per_step: madds,
        memory_floor_ns,
        compute_floor_ns,
        memory_floor_fraction: memory_floor_ns / median_ns as f64,
        compute_floor_fraction: compute_floor_ns / median_ns as f64,
        bandwidth_bytes_per_sec: bandwidth,
        peak_madds_per_sec: peak,
        launches: model.slots.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::launched_entries;

    #[test]
    fn a_fault_names_the_table_entries_the_launch_stepped() {
        // Entries 0 and 2 own blocks, 1 and 3 none (not stepped, or not in this pass).
        assert_eq!(
            launched_entries(&[0, 4, 4, 9, 9]),
            "table entries 0 (blocks 0..4), 2 (blocks 4..9)"
        );
        assert_eq!(launched_entries(&[0, 0, 0]), "no table entry");
    }
}
