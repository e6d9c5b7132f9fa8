//! Host runtime: loads the CUBIN of a step into a CUDA context and launches its kernels on
//! device buffers.
//!
//! - [`CudaRuntime`] owns a context and a stream, and caches compiled programs in memory
//!   (keyed by shape, optimizer fingerprint, architecture and NVRTC version). Programs are
//!   compiled by NVRTC straight to a CUBIN for the device's architecture, which the driver
//!   loads without JIT; the disk cache of [`super::nvrtc`] makes a second process start skip
//!   NVRTC (and ptxas) entirely.
//! - [`CudaStepProgram`] is one loaded module ([`super::loader`]: `cuModuleLoadDataEx` with the
//!   driver's logs) with its kernels and manifest.
//! - [`CudaStepper`] owns the optimizer state and scratch on the device and runs steps on
//!   device buffers ([`CudaStepper::step_device`]); it implements
//!   [`TensorStepper`] by upload, step, download.

use super::loader::{Image, Kernel, Launch, Module};
use super::manifest::{KernelJson, Manifest};
use super::nvrtc;
use crate::backend::{check_step_args, Hyper, TensorStepper};
use crate::bench::BenchReport;
use crate::error::{Error, Result};
use crate::ir::{Buffer, StepIr};
use crate::shape::Layout;
use crate::state::TensorState;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DriverError, LaunchConfig};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Turns a driver error into a backend error saying what was being done.
pub(super) fn driver_err(what: &str) -> impl Fn(DriverError) -> Error + '_ {
    move |e| Error::backend_from("cuda", what, e)
}

/// Opens CUDA device `ordinal`, or says why not (no driver library, no device).
pub fn open_device(ordinal: usize) -> Result<Arc<CudaContext>> {
    if !nvrtc::driver_available() {
        return Err(Error::backend(
            "cuda",
            "the CUDA driver library (libcuda) could not be loaded: no NVIDIA driver on this machine",
        ));
    }
    std::panic::catch_unwind(|| CudaContext::new(ordinal))
        .map_err(|_| Error::backend("cuda", "the CUDA driver panicked while opening the device"))?
        .map_err(driver_err("opening CUDA device"))
}

/// In-memory cache key: dims, optimizer fingerprint, architecture, NVRTC version.
type ProgramKey = (Vec<usize>, String, String, (i32, i32));

/// A CUDA context and stream, with compiled programs cached in memory.
///
/// `Send + Sync`: one runtime can be shared (`Arc<CudaRuntime>`) by several threads, which
/// may all call [`program`](Self::program) at once; the in-memory cache is behind a mutex
/// and the NVRTC disk cache tolerates concurrent writers of one entry.
pub struct CudaRuntime {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: String,
    programs: Mutex<HashMap<ProgramKey, Arc<CudaStepProgram>>>,
}

impl CudaRuntime {
    /// A runtime on device `ordinal`, compiling for that device's architecture.
    pub fn new(ordinal: usize) -> Result<Self> {
        let _current = super::current::RestoreCurrent::new();
        let ctx = open_device(ordinal)?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(driver_err("reading the compute capability"))?;
        let stream = ctx.default_stream();
        Ok(CudaRuntime {
            ctx,
            stream,
            arch: format!("sm_{major}{minor}"),
            programs: Mutex::new(HashMap::new()),
        })
    }

    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every step of this runtime's programs runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The architecture programs are compiled for.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// The program of `ir`: from the in-memory cache, else compiled (through the disk cache)
    /// and loaded.
    pub fn program(&self, ir: &StepIr) -> Result<Arc<CudaStepProgram>> {
        let _current = super::current::RestoreCurrent::new();
        let key = (
            ir.layout.dims().to_vec(),
            ir.lopt_fingerprint.clone(),
            self.arch.clone(),
            nvrtc::nvrtc_version()?,
        );
        if let Some(p) = self.programs.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(p);
        }
        let generated = super::generate(ir)?;
        let cubin = nvrtc::compile_cubin(&generated.source, &self.arch, true)?;
        let manifest = Manifest::new(ir, &generated.schedule, &self.arch, cubin.nvrtc_version)?;
        // SAFETY: the CUBIN and the manifest were produced together from `ir`'s schedule.
        let program = Arc::new(unsafe {
            CudaStepProgram::load_cubin(
                self.stream.clone(),
                ir.layout.clone(),
                &cubin.cubin,
                cubin.nvrtc_version,
                manifest,
            )
        }?);
        // Two threads asking for the same new program both compile it (the disk cache is safe
        // for that); the first one stored is the one every caller gets from then on.
        match self.programs.lock() {
            Ok(mut m) => Ok(m.entry(key).or_insert(program).clone()),
            Err(_) => Ok(program),
        }
    }
}

/// A step's module loaded into a context: its kernels in launch order and its manifest.
pub struct CudaStepProgram {
    stream: Arc<CudaStream>,
    layout: Layout,
    manifest: Manifest,
    kernels: Vec<(Kernel, LaunchConfig)>,
}

fn launch_config(k: &KernelJson) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (k.grid[0], k.grid[1], k.grid[2]),
        block_dim: (k.block[0], k.block[1], k.block[2]),
        shared_mem_bytes: k.shared_mem_bytes,
    }
}

impl CudaStepProgram {
    /// Loads `ptx` (as written by `mulo-compile --target cuda`) described by `manifest`, to run
    /// on `stream`.
    ///
    /// # Safety
    ///
    /// `ptx` must be the program `manifest` describes, as `mulo-compile --target cuda` wrote
    /// them together: the kernels index the buffers and scratch arenas with the sizes and
    /// grids of the manifest, and a mismatched pair (or arbitrary PTX) can read and write
    /// device memory out of bounds. [`CudaRuntime::program`] is the safe way to get a program.
    pub unsafe fn load(
        stream: Arc<CudaStream>,
        layout: Layout,
        ptx: &str,
        manifest: Manifest,
    ) -> Result<Self> {
        let _current = super::current::RestoreCurrent::new();
        let program = format!("mulo_step.ptx ({})", layout.shape());
        nvrtc::check_installed_driver(ptx, &program)?;
        // SAFETY: the caller's guarantee.
        unsafe { Self::load_image(stream, layout, Image::Ptx(ptx), &program, manifest) }
    }

    /// Loads `cubin`, compiled by NVRTC `nvrtc_version` for the stream's device from the
    /// source of the program `manifest` describes, to run on `stream`: no driver JIT. Refuses
    /// a driver older than the CUBIN needs ([`nvrtc::check_installed_driver_cubin`]).
    ///
    /// # Safety
    ///
    /// As [`load`](Self::load): `cubin` must be the program `manifest` describes.
    pub unsafe fn load_cubin(
        stream: Arc<CudaStream>,
        layout: Layout,
        cubin: &[u8],
        nvrtc_version: (i32, i32),
        manifest: Manifest,
    ) -> Result<Self> {
        let _current = super::current::RestoreCurrent::new();
        let program = format!("mulo_step.cubin ({}, {})", layout.shape(), manifest.arch);
        nvrtc::check_installed_driver_cubin(nvrtc_version, &program)?;
        // SAFETY: the caller's guarantee.
        unsafe { Self::load_image(stream, layout, Image::Cubin(cubin), &program, manifest) }
    }

    /// # Safety
    ///
    /// As [`load`](Self::load).
    unsafe fn load_image(
        stream: Arc<CudaStream>,
        layout: Layout,
        image: Image<'_>,
        program: &str,
        manifest: Manifest,
    ) -> Result<Self> {
        if manifest.dims != layout.dims() {
            return Err(Error::argument(
                "manifest",
                format!(
                    "is for dims {:?}, the layout has {:?}",
                    manifest.dims,
                    layout.dims()
                ),
            ));
        }
        let module = Module::load(stream.context(), image, program)?;
        module.fill_constants(&manifest.constants)?;
        let kernels = manifest
            .kernels
            .iter()
            .map(|k| Ok((module.kernel(&k.name)?, launch_config(k))))
            .collect::<Result<Vec<_>>>()?;
        Ok(CudaStepProgram {
            stream,
            layout,
            manifest,
            kernels,
        })
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The stream steps run on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

/// Owns a tensor's optimizer state and scratch on the device, and runs steps.
pub struct CudaStepper {
    program: Arc<CudaStepProgram>,
    state: BTreeMap<Buffer, CudaSlice<f32>>,
    step: u64,
    scratch: CudaSlice<f32>,
    partials: CudaSlice<f64>,
}

impl CudaStepper {
    /// Zero state, step counter `start_step`.
    pub fn new(program: Arc<CudaStepProgram>, start_step: u64) -> Result<Self> {
        let _current = super::current::RestoreCurrent::new();
        let stream = program.stream.clone();
        let layout = program.layout.clone();
        let alloc = |n: usize| {
            stream
                .alloc_zeros::<f32>(n)
                .map_err(driver_err("allocating device memory"))
        };
        let mut state = BTreeMap::new();
        for b in Buffer::state_for_layout(&layout) {
            state.insert(b, alloc(b.len(&layout))?);
        }
        let scratch_len = program
            .manifest
            .scratch
            .iter()
            .find(|s| s.name == "scratch")
            .map_or(1, |s| s.len);
        let partials_len = program
            .manifest
            .scratch
            .iter()
            .find(|s| s.name == "partials")
            .map_or(1, |s| s.len);
        let scratch = alloc(scratch_len)?;
        let partials = stream
            .alloc_zeros::<f64>(partials_len)
            .map_err(driver_err("allocating device memory"))?;
        Ok(CudaStepper {
            program,
            state,
            step: start_step,
            scratch,
            partials,
        })
    }

    /// The program.
    pub fn program(&self) -> &Arc<CudaStepProgram> {
        &self.program
    }

    /// The step counter (steps taken so far).
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// One step on device buffers: launches every kernel on the program's stream (without
    /// waiting for them) and increments the step counter. Lengths and hyper-parameters are
    /// checked before anything is launched; on such an error nothing changes.
    pub fn step_device(
        &mut self,
        param: &mut CudaSlice<f32>,
        grad: &CudaSlice<f32>,
        hyper: Hyper,
    ) -> Result<()> {
        let _current = super::current::RestoreCurrent::new();
        check_step_args(&self.program.layout, param.len(), grad.len(), &hyper)?;
        // Checked before the kernels write `param` and the state in place.
        let next = crate::state::next_step(self.step)?;
        let stream = self.program.stream.clone();
        let step_f = self.step as f32;
        for (f, cfg) in &self.program.kernels {
            let mut b = Launch::new(&stream);
            b.write(&mut *param);
            b.read(grad);
            for slice in self.state.values_mut() {
                b.write(slice);
            }
            b.write(&mut self.scratch);
            b.write(&mut self.partials);
            for v in super::manifest::scalar_values(hyper, step_f) {
                b.f32(v);
            }
            // SAFETY: the argument list matches the kernels' signature (every kernel takes
            // the buffers of `render::params` in order, checked against the PTX by the tests),
            // and every buffer has the length the kernels were compiled for.
            unsafe { b.launch(f, *cfg) }?;
        }
        self.step = next;
        Ok(())
    }

    /// Waits for the launched steps to finish.
    pub fn synchronize(&self) -> Result<()> {
        let _current = super::current::RestoreCurrent::new();
        self.program
            .stream
            .synchronize()
            .map_err(driver_err("synchronizing"))
    }
}

/// The host-copy path: each [`step`](TensorStepper::step) uploads the parameter and the
/// gradient and downloads the parameter, 12 bytes per element through pageable host memory
/// ([`host_copy_bytes_per_step`]): ~50 MB per step for a 4096x1024 tensor, which costs more
/// than the step itself on a GPU. Use it for checks and small tensors; a training loop keeps
/// its tensors on the device ([`CudaStepper::step_device`], or
/// [`PackedBackend::step_in_place`](super::packed_runtime::PackedBackend::step_in_place)).
impl TensorStepper for CudaStepper {
    fn target(&self) -> &'static str {
        "cuda"
    }

    fn layout(&self) -> &Layout {
        &self.program.layout
    }

    fn step(&mut self, param: &mut [f32], grad: &[f32], hyper: Hyper) -> Result<()> {
        let _current = super::current::RestoreCurrent::new();
        check_step_args(&self.program.layout, param.len(), grad.len(), &hyper)?;
        let stream = self.program.stream.clone();
        let mut p = stream
            .clone_htod(param)
            .map_err(driver_err("uploading param"))?;
        let g = stream
            .clone_htod(grad)
            .map_err(driver_err("uploading grad"))?;
        self.step_device(&mut p, &g, hyper)?;
        let out = stream
            .clone_dtoh(&p)
            .map_err(driver_err("downloading param"))?;
        param.copy_from_slice(&out);
        Ok(())
    }

    fn state(&self) -> Result<TensorState> {
        let _current = super::current::RestoreCurrent::new();
        let layout = &self.program.layout;
        let mut state = TensorState::zeros(layout, self.step);
        for (b, slice) in &self.state {
            let values = self
                .program
                .stream
                .clone_dtoh(slice)
                .map_err(driver_err("downloading state"))?;
            state.set(*b, values)?;
        }
        Ok(state)
    }

    fn set_state(&mut self, state: TensorState) -> Result<()> {
        let _current = super::current::RestoreCurrent::new();
        crate::backend::check_state_layout(&self.program.layout, &state)?;
        let mut uploaded = BTreeMap::new();
        for (b, values) in state.iter() {
            let slice = self
                .program
                .stream
                .clone_htod(values)
                .map_err(driver_err("uploading state"))?;
            uploaded.insert(b, slice);
        }
        self.state = uploaded;
        self.step = state.step;
        Ok(())
    }
}

/// Bytes the host-copy [`TensorStepper::step`] of [`CudaStepper`] moves between host and
/// device per step of a tensor of `numel` elements: the parameter up and down and the
/// gradient up (f32).
pub fn host_copy_bytes_per_step(numel: usize) -> usize {
    3 * 4 * numel
}

/// Device-to-device copy bandwidth in bytes per second (read + write), measured with a
/// memcpy of a 256 MiB buffer: the memory roof the 72 B/element floor is computed against.
pub fn measure_copy_bandwidth(stream: &Arc<CudaStream>) -> Result<f64> {
    let n = 64 << 20; // f32 values: 256 MiB
    let src = stream
        .alloc_zeros::<f32>(n)
        .map_err(driver_err("allocating"))?;
    let mut dst = stream
        .alloc_zeros::<f32>(n)
        .map_err(driver_err("allocating"))?;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        stream.synchronize().map_err(driver_err("synchronizing"))?;
        let t = Instant::now();
        stream
            .memcpy_dtod(&src, &mut dst)
            .map_err(driver_err("copying"))?;
        stream.synchronize().map_err(driver_err("synchronizing"))?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n * 4) as f64 / best)
}

/// Peak FP32 multiply-adds per second of the device: SMs × clock × FP32 lanes per SM (64 on
/// sm_80 and older data-centre parts, 128 on sm_86 and newer). An estimate from attributes;
/// [`measure_fma_rate`] measures it.
pub fn peak_madds(ctx: &Arc<CudaContext>) -> Result<f64> {
    use cudarc::driver::sys::CUdevice_attribute as A;
    let sms = ctx
        .attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(driver_err("reading attributes"))?;
    let khz = ctx
        .attribute(A::CU_DEVICE_ATTRIBUTE_CLOCK_RATE)
        .map_err(driver_err("reading attributes"))?;
    let (major, minor) = ctx
        .compute_capability()
        .map_err(driver_err("reading attributes"))?;
    let lanes = if (major, minor) == (8, 0) || major < 8 {
        64.0
    } else {
        128.0
    };
    Ok(sms as f64 * khz as f64 * 1e3 * lanes)
}

/// The kernel of [`measure_fma_rate`]: every thread runs [`FMA_CHAINS`] independent chains
/// of dependent FP32 FMAs, 16 per chain per iteration, and stores their sum (so that none is
/// dead code). The factors are arguments, so NVVM cannot fold the chains.
pub const FMA_PROBE_SOURCE: &str = r#"
extern "C" __global__ void mulo_fma_probe(float* out, int iters, float m, float c) {
    float a[8];
    #pragma unroll
    for (int k = 0; k < 8; ++k) a[k] = threadIdx.x * 1e-3f + k;
    for (int i = 0; i < iters; ++i) {
        #pragma unroll
        for (int j = 0; j < 16; ++j) {
            #pragma unroll
            for (int k = 0; k < 8; ++k) a[k] = fmaf(a[k], m, c);
        }
    }
    float s = 0.0f;
    #pragma unroll
    for (int k = 0; k < 8; ++k) s += a[k];
    out[(size_t)blockIdx.x * blockDim.x + threadIdx.x] = s;
}
"#;

/// Independent FMA chains per thread in [`FMA_PROBE_SOURCE`].
pub const FMA_CHAINS: u64 = 8;

/// The FP32 multiply-add rate of the runtime's device, measured: [`FMA_PROBE_SOURCE`]
/// (compiled to a CUBIN through the NVRTC cache) on 8 blocks of 256 threads per SM, the best
/// of 5 timed launches after a warm-up. The compute roof the step's multiply-adds are
/// compared with.
pub fn measure_fma_rate(runtime: &CudaRuntime) -> Result<f64> {
    use cudarc::driver::sys::CUdevice_attribute as A;
    let ctx = runtime.context();
    let sms = ctx
        .attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(driver_err("reading attributes"))?;
    let blocks = u32::try_from(sms)
        .ok()
        .and_then(|s| s.checked_mul(8))
        .ok_or_else(|| Error::backend("cuda", format!("{sms} multiprocessors")))?;
    let threads = 256u32;
    let iters = 4096i32;
    let cubin = nvrtc::compile_cubin(FMA_PROBE_SOURCE, runtime.arch(), true)?;
    let program = format!("mulo_fma_probe.cubin ({})", runtime.arch());
    nvrtc::check_installed_driver_cubin(cubin.nvrtc_version, &program)?;
    let module = Module::load(ctx, Image::Cubin(&cubin.cubin), &program)?;
    let kernel = module.kernel("mulo_fma_probe")?;
    let stream = runtime.stream();
    let mut out = stream
        .alloc_zeros::<f32>(blocks as usize * threads as usize)
        .map_err(driver_err("allocating"))?;
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut best = f64::INFINITY;
    for run in 0..6 {
        stream.synchronize().map_err(driver_err("synchronizing"))?;
        let t = Instant::now();
        let mut b = Launch::new(stream);
        b.write(&mut out).i32(iters).f32(0.999_999).f32(1e-7);
        // SAFETY: the arguments are the probe's (out, iters, m, c); `out` holds one value per
        // launched thread.
        unsafe { b.launch(&kernel, cfg) }?;
        stream.synchronize().map_err(driver_err("synchronizing"))?;
        if run > 0 {
            best = best.min(t.elapsed().as_secs_f64());
        }
    }
    let fmas = blocks as f64 * threads as f64 * iters as f64 * 16.0 * FMA_CHAINS as f64;
    Ok(fmas / best)
}

/// Times `steps` device-resident steps of `ir` (after `warmup`), each followed by a stream
/// synchronization, and reports them against the measured copy bandwidth
/// ([`measure_copy_bandwidth`]) and FP32 multiply-add rate ([`measure_fma_rate`]).
pub fn bench(
    runtime: &CudaRuntime,
    ir: &StepIr,
    warmup: usize,
    steps: usize,
) -> Result<BenchReport> {
    let program = runtime.program(ir)?;
    let mut stepper = CudaStepper::new(program, 0)?;
    let n = ir.layout.numel();
    let param_h: Vec<f32> = (0..n)
        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-3)
        .collect();
    let grad_h: Vec<f32> = (0..n)
        .map(|i| ((i * 104729 % 997) as f32 - 498.0) * 1e-4)
        .collect();
    let stream = runtime.stream();
    let mut param = stream
        .clone_htod(&param_h)
        .map_err(driver_err("uploading"))?;
    let grad = stream
        .clone_htod(&grad_h)
        .map_err(driver_err("uploading"))?;
    let hyper = Hyper {
        lr: 1e-3,
        weight_decay: 0.0,
    };
    let times = crate::bench::time_steps(warmup, steps, || {
        stepper.step_device(&mut param, &grad, hyper)?;
        stepper.synchronize()
    })?;
    let bandwidth = measure_copy_bandwidth(stream)?;
    let peak = measure_fma_rate(runtime)?;
    Ok(BenchReport::new(ir, "cuda", &times, peak, bandwidth))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_copy_path_moves_twelve_bytes_per_element() {
        // A 4096x1024 tensor: the parameter and gradient up, the parameter down, f32.
        assert_eq!(host_copy_bytes_per_step(4096 * 1024), 50_331_648);
        assert_eq!(host_copy_bytes_per_step(0), 0);
    }

    #[test]
    fn fma_probe_compiles_to_a_cubin() {
        if !nvrtc::nvrtc_available() {
            eprintln!(
                "SKIPPED fma_probe_compiles_to_a_cubin: {}",
                nvrtc::NVRTC_HELP
            );
            return;
        }
        let c = nvrtc::compile_cubin(FMA_PROBE_SOURCE, "sm_90", false).unwrap();
        assert_eq!(nvrtc::cubin_sm(&c.cubin), Some(90));
        assert!(c
            .cubin
            .windows(b"\0mulo_fma_probe\0".len())
            .any(|w| w == b"\0mulo_fma_probe\0"));
        // NVVM kept every FMA of the unrolled body (16 per chain per iteration): the chains
        // are not folded, so the probe times what it counts.
        let ptx = nvrtc::compile(FMA_PROBE_SOURCE, "sm_90", false)
            .unwrap()
            .ptx;
        let fmas = ptx.matches("fma.rn.f32").count() as u64;
        assert!(fmas >= 16 * FMA_CHAINS, "{fmas} FMAs in the probe's PTX");
    }
}
