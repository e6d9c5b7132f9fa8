//! Host runtime: loads the PTX of a step into a CUDA context and launches its kernels on
//! device buffers.
//!
//! - [`CudaRuntime`] owns a context and a stream, and caches compiled programs in memory
//!   (keyed by shape, optimizer fingerprint, architecture and NVRTC version); the disk cache
//!   of [`super::nvrtc`] makes a second process start skip NVRTC.
//! - [`CudaStepProgram`] is one loaded module with its kernels and manifest.
//! - [`CudaStepper`] owns the optimizer state and scratch on the device and runs steps on
//!   device buffers ([`CudaStepper::step_device`]); it implements
//!   [`TensorStepper`] by upload, step, download.

use super::manifest::{KernelJson, Manifest};
use super::nvrtc;
use crate::backend::{check_step_args, Hyper, TensorStepper};
use crate::bench::BenchReport;
use crate::error::{Error, Result};
use crate::ir::{Buffer, StepIr};
use crate::shape::Layout;
use crate::state::TensorState;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DriverError, LaunchConfig,
    PushKernelArg,
};
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
        let key = (
            ir.layout.dims().to_vec(),
            ir.lopt_fingerprint.clone(),
            self.arch.clone(),
            nvrtc::nvrtc_version()?,
        );
        if let Some(p) = self.programs.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(p);
        }
        let compiled = super::compile(ir, &self.arch, true)?;
        // SAFETY: the PTX and the manifest were produced together from `ir`'s schedule.
        let program = Arc::new(unsafe {
            CudaStepProgram::load(
                self.stream.clone(),
                ir.layout.clone(),
                &compiled.ptx.ptx,
                compiled.manifest,
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
    _module: Arc<CudaModule>,
    kernels: Vec<(CudaFunction, LaunchConfig)>,
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
        let program = format!("mulo_step.ptx ({})", layout.shape());
        nvrtc::check_installed_driver(ptx, &program)?;
        let module = stream
            .context()
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
            .map_err(driver_err(&format!("loading {program}")))?;
        let kernels = manifest
            .kernels
            .iter()
            .map(|k| {
                let f = module
                    .load_function(&k.name)
                    .map_err(driver_err(&format!("loading kernel {}", k.name)))?;
                Ok((f, launch_config(k)))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(CudaStepProgram {
            stream,
            layout,
            manifest,
            _module: module,
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
        check_step_args(&self.program.layout, param.len(), grad.len(), &hyper)?;
        let stream = self.program.stream.clone();
        let step_f = self.step as f32;
        for (f, cfg) in &self.program.kernels {
            let mut b = stream.launch_builder(f);
            b.arg(&mut *param);
            b.arg(grad);
            for slice in self.state.values_mut() {
                b.arg(slice);
            }
            b.arg(&mut self.scratch);
            b.arg(&mut self.partials);
            b.arg(&hyper.lr);
            b.arg(&hyper.weight_decay);
            b.arg(&step_f);
            // SAFETY: the argument list matches the kernels' signature (every kernel takes
            // the buffers of `render::params` in order, checked against the PTX by the tests),
            // and every buffer has the length the kernels were compiled for.
            unsafe { b.launch(*cfg) }.map_err(driver_err("launching a kernel"))?;
        }
        self.step += 1;
        Ok(())
    }

    /// Waits for the launched steps to finish.
    pub fn synchronize(&self) -> Result<()> {
        self.program
            .stream
            .synchronize()
            .map_err(driver_err("synchronizing"))
    }
}

impl TensorStepper for CudaStepper {
    fn target(&self) -> &'static str {
        "cuda"
    }

    fn layout(&self) -> &Layout {
        &self.program.layout
    }

    fn step(&mut self, param: &mut [f32], grad: &[f32], hyper: Hyper) -> Result<()> {
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
/// sm_80 and older data-centre parts, 128 on sm_86 and newer). An estimate from attributes.
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

/// Times `steps` device-resident steps of `ir` (after `warmup`), each followed by a stream
/// synchronization, and reports them against the measured copy bandwidth and the estimated
/// FP32 peak.
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
    let peak = peak_madds(runtime.context())?;
    Ok(BenchReport::new(ir, "cuda", &times, peak, bandwidth))
}
