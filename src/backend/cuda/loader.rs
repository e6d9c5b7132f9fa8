//! Loading compiled programs into a CUDA context, and launching their kernels.
//!
//! Every module is loaded by `cuModuleLoadDataEx` with the driver's info and error log
//! buffers, so that a failed load (an unsupported PTX ISA, a CUBIN for another architecture, a
//! corrupt image) returns an error that names the program and carries the driver's log.
//! cudarc's own `load_module` uses `cuModuleLoadData`, which has no log, so the module and
//! launch handles here are thin wrappers over the driver API; buffers are still cudarc's
//! [`CudaSlice`](cudarc::driver::CudaSlice)s, and a launch takes their device pointers through cudarc's
//! [`DevicePtr`]/[`DevicePtrMut`], which keep its stream-ordering events right.

use super::runtime::driver_err;
use crate::error::{Error, Result};
use cudarc::driver::sys::{self, CUjit_option, CUresult};
use cudarc::driver::{CudaContext, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, SyncOnDrop};
use std::ffi::{c_void, CString};
use std::sync::Arc;

/// A compiled program to load.
#[derive(Clone, Copy, Debug)]
pub enum Image<'a> {
    /// PTX text: the driver compiles it (JIT) for the device when it is loaded.
    Ptx(&'a str),
    /// A CUBIN (ELF) for the device's architecture: loaded without compiling.
    Cubin(&'a [u8]),
}

/// Bytes of each of the driver's log buffers.
const LOG_BYTES: usize = 16 * 1024;

/// A module loaded into a context; unloaded when the last [`Kernel`] of it is dropped.
pub struct Module {
    raw: sys::CUmodule,
    ctx: Arc<CudaContext>,
    program: String,
    info_log: String,
}

// SAFETY: a CUmodule is a driver handle usable from any thread once its context is bound
// (every use binds it first); the struct holds no thread-local state.
unsafe impl Send for Module {}
// SAFETY: as above; the driver's module functions are thread-safe.
unsafe impl Sync for Module {}

impl Drop for Module {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: `raw` was loaded into `ctx` and is unloaded exactly once, here; kernels
            // hold an `Arc<Module>`, so none outlives it.
            let _ = unsafe { sys::cuModuleUnload(self.raw) };
        }
    }
}

/// A byte buffer the driver writes a log into, read back up to its first NUL.
fn log_text(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).trim().to_string()
}

impl Module {
    /// Loads `image` into `ctx` with `cuModuleLoadDataEx` and JIT log buffers. `program`
    /// names it in errors (e.g. `mulo_step.cubin (1024x512)`): a failed load's error holds
    /// the driver's result, its error log and its info log. Loading runs no kernel; launching
    /// one is [`Launch::launch`], which is unsafe.
    pub fn load(ctx: &Arc<CudaContext>, image: Image<'_>, program: &str) -> Result<Arc<Self>> {
        ctx.bind_to_thread().map_err(driver_err(&format!(
            "binding the context to load {program}"
        )))?;
        // The driver reads PTX up to its NUL; a CUBIN is copied into 8-byte aligned memory
        // (ELF headers hold 64-bit fields).
        let ptx;
        let mut aligned: Vec<u64>;
        let data: *const c_void = match image {
            Image::Ptx(text) => {
                ptx = CString::new(text).map_err(|_| {
                    Error::argument("ptx", format!("{program}: the PTX holds a NUL byte"))
                })?;
                ptx.as_ptr().cast()
            }
            Image::Cubin(bytes) => {
                if !super::nvrtc::is_cubin(bytes) {
                    return Err(Error::argument(
                        "cubin",
                        format!("{program}: not a CUDA ELF image"),
                    ));
                }
                aligned = vec![0u64; bytes.len().div_ceil(8)];
                // SAFETY: `aligned` holds at least `bytes.len()` bytes, and the two do not
                // overlap.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        bytes.as_ptr(),
                        aligned.as_mut_ptr().cast::<u8>(),
                        bytes.len(),
                    )
                };
                aligned.as_mut_ptr().cast_const().cast()
            }
        };
        let mut info = vec![0u8; LOG_BYTES];
        let mut error = vec![0u8; LOG_BYTES];
        let mut options = [
            CUjit_option::CU_JIT_INFO_LOG_BUFFER,
            CUjit_option::CU_JIT_INFO_LOG_BUFFER_SIZE_BYTES,
            CUjit_option::CU_JIT_ERROR_LOG_BUFFER,
            CUjit_option::CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES,
            CUjit_option::CU_JIT_LOG_VERBOSE,
        ];
        // Each value is a pointer-sized word: a buffer's address, or a number.
        let number = std::ptr::without_provenance_mut::<c_void>;
        let mut values: [*mut c_void; 5] = [
            info.as_mut_ptr().cast(),
            number(LOG_BYTES),
            error.as_mut_ptr().cast(),
            number(LOG_BYTES),
            number(1),
        ];
        let mut raw: sys::CUmodule = std::ptr::null_mut();
        // SAFETY: `data` points to a NUL-terminated PTX text or a whole ELF image that lives
        // until the call returns; the option arrays have the same length, and each log buffer
        // has the size given next to it.
        let r = unsafe {
            sys::cuModuleLoadDataEx(
                &mut raw,
                data,
                options.len() as u32,
                options.as_mut_ptr(),
                values.as_mut_ptr(),
            )
        };
        let (info, error) = (log_text(&info), log_text(&error));
        if r != CUresult::CUDA_SUCCESS {
            let mut message = format!("loading {program} failed: {r:?}");
            for (name, log) in [("error log", &error), ("info log", &info)] {
                if !log.is_empty() {
                    message.push_str(&format!("\n{name}:\n{log}"));
                }
            }
            if error.is_empty() && info.is_empty() {
                message.push_str(" (the driver wrote no log)");
            }
            return Err(Error::backend("cuda", message));
        }
        Ok(Arc::new(Module {
            raw,
            ctx: ctx.clone(),
            program: program.to_string(),
            info_log: info,
        }))
    }

    /// The program's name, as given to [`load`](Self::load).
    pub fn program(&self) -> &str {
        &self.program
    }

    /// The driver's info log of the load (empty for most CUBINs).
    pub fn info_log(&self) -> &str {
        &self.info_log
    }

    /// Copies each of `constants` (the manifest's `__constant__` arrays, which the PTX and
    /// CUBIN declare without their values) into this module's global of that name; an error
    /// naming the program and the array when the module has no such global or its size
    /// differs. Synchronous: done before [`kernel`](Self::kernel)'s launches can start.
    pub fn fill_constants(&self, constants: &[super::manifest::ConstantJson]) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(driver_err("binding the context"))?;
        for c in constants {
            let values = c.values()?;
            let name = CString::new(c.name.as_str()).map_err(|_| {
                Error::argument(
                    "manifest",
                    format!("constant `{}` holds a NUL byte", c.name),
                )
            })?;
            let mut ptr: sys::CUdeviceptr = 0;
            let mut bytes = 0usize;
            // SAFETY: the module is loaded in the bound context; `name` is NUL-terminated and
            // the two out-pointers are valid.
            let r =
                unsafe { sys::cuModuleGetGlobal_v2(&mut ptr, &mut bytes, self.raw, name.as_ptr()) };
            if r != CUresult::CUDA_SUCCESS {
                return Err(Error::backend(
                    "cuda",
                    format!(
                        "{}: no __constant__ array `{}` ({r:?})",
                        self.program, c.name
                    ),
                ));
            }
            if bytes != 4 * values.len() {
                return Err(Error::backend(
                    "cuda",
                    format!(
                        "{}: __constant__ array `{}` has {bytes} bytes, the manifest gives {} values",
                        self.program,
                        c.name,
                        values.len()
                    ),
                ));
            }
            // SAFETY: `ptr` is the module's global of exactly `bytes` bytes, and `values`
            // holds `bytes` bytes on the host; the copy is synchronous.
            let r = unsafe { sys::cuMemcpyHtoD_v2(ptr, values.as_ptr().cast(), bytes) };
            if r != CUresult::CUDA_SUCCESS {
                return Err(Error::backend(
                    "cuda",
                    format!(
                        "{}: copying __constant__ array `{}` failed: {r:?}",
                        self.program, c.name
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The kernel `name` of this module.
    pub fn kernel(self: &Arc<Self>, name: &str) -> Result<Kernel> {
        let c_name = CString::new(name)
            .map_err(|_| Error::argument("kernel", format!("`{name}` holds a NUL byte")))?;
        self.ctx
            .bind_to_thread()
            .map_err(driver_err("binding the context"))?;
        let mut raw: sys::CUfunction = std::ptr::null_mut();
        // SAFETY: the module is loaded in the bound context; `c_name` is NUL-terminated.
        let r = unsafe { sys::cuModuleGetFunction(&mut raw, self.raw, c_name.as_ptr()) };
        if r != CUresult::CUDA_SUCCESS {
            return Err(Error::backend(
                "cuda",
                format!("{}: no kernel `{name}` ({r:?})", self.program),
            ));
        }
        // What the driver allows this kernel (its registers and shared memory per thread on
        // this device, its `__launch_bounds__`): read once here, checked at every launch, so
        // that a block too large fails naming the kernel instead of with
        // CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES.
        // SAFETY: `raw` is a function of the module loaded in the bound context.
        let max_threads = unsafe {
            cudarc::driver::result::function::get_function_attribute(
                raw,
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK,
            )
        }
        .map_err(driver_err(&format!(
            "reading the maximum threads per block of {name} in {}",
            self.program
        )))?;
        Ok(Kernel {
            raw,
            name: name.to_string(),
            module: self.clone(),
            max_threads,
        })
    }
}

/// One kernel of a loaded [`Module`] (which it keeps loaded).
#[derive(Clone)]
pub struct Kernel {
    raw: sys::CUfunction,
    name: String,
    module: Arc<Module>,
    max_threads: i32,
}

// SAFETY: a CUfunction is a driver handle valid while its module is loaded (the Arc keeps it).
unsafe impl Send for Kernel {}
// SAFETY: as above.
unsafe impl Sync for Kernel {}

impl Kernel {
    /// The kernel's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The module it belongs to.
    pub fn module(&self) -> &Arc<Module> {
        &self.module
    }

    /// The most threads a block of it may have on this device
    /// (`CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK`); [`Launch::launch`] refuses larger blocks.
    pub fn max_threads(&self) -> i32 {
        self.max_threads
    }
}

/// One argument value, kept until the launch reads it.
enum Arg {
    Ptr(sys::CUdeviceptr),
    F32(f32),
    I32(i32),
}

/// The argument list of one launch, built in the kernel's parameter order; the device
/// buffers stay borrowed (and cudarc's events pending) until the launch is queued.
pub struct Launch<'a> {
    stream: &'a CudaStream,
    args: Vec<Arg>,
    guards: Vec<SyncOnDrop<'a>>,
}

impl<'a> Launch<'a> {
    /// An empty argument list for a launch on `stream`.
    pub fn new(stream: &'a CudaStream) -> Self {
        Launch {
            stream,
            args: Vec::new(),
            guards: Vec::new(),
        }
    }

    /// A device buffer the kernel only reads.
    pub fn read<T>(&mut self, buffer: &'a impl DevicePtr<T>) -> &mut Self {
        let (ptr, guard) = buffer.device_ptr(self.stream);
        self.args.push(Arg::Ptr(ptr));
        self.guards.push(guard);
        self
    }

    /// A device buffer the kernel may write.
    pub fn write<T>(&mut self, buffer: &'a mut impl DevicePtrMut<T>) -> &mut Self {
        let (ptr, guard) = buffer.device_ptr_mut(self.stream);
        self.args.push(Arg::Ptr(ptr));
        self.guards.push(guard);
        self
    }

    /// A 32-bit float argument.
    pub fn f32(&mut self, value: f32) -> &mut Self {
        self.args.push(Arg::F32(value));
        self
    }

    /// A 32-bit integer argument.
    pub fn i32(&mut self, value: i32) -> &mut Self {
        self.args.push(Arg::I32(value));
        self
    }

    /// Queues `kernel` with these arguments on the stream.
    ///
    /// # Safety
    ///
    /// The arguments must be the kernel's parameters in order and type, every buffer must
    /// be as long as the kernel indexes it for `cfg`, and the kernel must write only buffers
    /// passed with [`write`](Self::write): the driver checks none of this.
    pub unsafe fn launch(mut self, kernel: &Kernel, cfg: LaunchConfig) -> Result<()> {
        check_block_threads(
            &kernel.module.program,
            &kernel.name,
            kernel.max_threads,
            cfg.block_dim,
        )?;
        self.stream
            .context()
            .bind_to_thread()
            .map_err(driver_err("binding the context"))?;
        let mut params: Vec<*mut c_void> = self
            .args
            .iter_mut()
            .map(|a| match a {
                Arg::Ptr(p) => (p as *mut sys::CUdeviceptr).cast(),
                Arg::F32(v) => (v as *mut f32).cast(),
                Arg::I32(v) => (v as *mut i32).cast(),
            })
            .collect();
        // SAFETY: `params` points into `self.args`, alive until the call returns (the driver
        // copies the values when queueing); the caller guarantees the list matches the kernel.
        let r = unsafe {
            cudarc::driver::result::launch_kernel(
                kernel.raw,
                cfg.grid_dim,
                cfg.block_dim,
                cfg.shared_mem_bytes,
                self.stream.cu_stream(),
                &mut params,
            )
        };
        // Recording the buffers' events (cudarc's stream ordering) after the launch is queued.
        drop(std::mem::take(&mut self.guards));
        r.map_err(driver_err(&format!(
            "launching {} of {}",
            kernel.name, kernel.module.program
        )))?;
        if sync_after_launch() {
            // A fault surfaces at the next synchronization, which would otherwise be the
            // host's, naming nothing of mulo's.
            self.stream.synchronize().map_err(driver_err(&format!(
                "{} of {} (MULO_CUDA_SYNC=1: synchronized after its launch)",
                kernel.name, kernel.module.program
            )))?;
        }
        Ok(())
    }
}

/// Whether `MULO_CUDA_SYNC=1` is set: every launch is then followed by a synchronization of
/// its stream, so that a fault is reported by the launch that caused it, naming the kernel
/// and the program (and, for a packed program, the tensor table entries it stepped). For
/// debugging: it serializes the host with the device.
pub fn sync_after_launch() -> bool {
    std::env::var_os("MULO_CUDA_SYNC").is_some_and(|v| v == "1")
}

/// Registers one block may use on every architecture mulo targets (sm_70 to sm_90: 64 K
/// 32-bit registers per block).
pub const BLOCK_REGISTERS: u64 = 65_536;

/// Static `__shared__` memory one block may declare (48 KiB; more needs dynamic shared memory
/// and an opt-in attribute, which no launch of the repository sets).
pub const STATIC_SHARED_BYTES: u64 = 48 * 1024;

/// Refuses a launch of `kernel` (of `program`) with blocks of `block_dim` when they hold more
/// threads than `max_threads`, the kernel's `CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK`: the
/// driver would fail it with `CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES`, which names nothing.
pub fn check_block_threads(
    program: &str,
    kernel: &str,
    max_threads: i32,
    block_dim: (u32, u32, u32),
) -> Result<()> {
    let threads = u64::from(block_dim.0) * u64::from(block_dim.1) * u64::from(block_dim.2);
    if threads > u64::try_from(max_threads).unwrap_or(0) {
        return Err(Error::backend(
            "cuda",
            format!(
                "{program}: kernel `{kernel}` launched with {threads} threads per block \
                 ({} x {} x {}), but this device runs at most {max_threads} per block of it \
                 (its registers, shared memory or __launch_bounds__): launch smaller blocks \
                 or give the kernel __launch_bounds__",
                block_dim.0, block_dim.1, block_dim.2
            ),
        ));
    }
    Ok(())
}

/// One entry function's resources in a ptxas report (`ptxas -v`, or NVRTC's log with
/// `--ptxas-options=-v`: [`cubin_ptxas_report`](super::nvrtc::cubin_ptxas_report)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelResources {
    /// The entry function.
    pub name: String,
    /// The architecture it was compiled for (`sm_XY`).
    pub arch: String,
    /// Registers per thread.
    pub registers: u64,
    /// Static shared memory per block, bytes.
    pub shared_bytes: u64,
}

/// The entry functions of a ptxas report with their registers and static shared memory.
pub fn ptxas_kernel_resources(report: &str) -> Vec<KernelResources> {
    let mut out: Vec<KernelResources> = Vec::new();
    let mut entry: Option<(String, String)> = None;
    for line in report.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default().to_string();
            let arch = rest
                .split("for '")
                .nth(1)
                .and_then(|a| a.split('\'').next())
                .unwrap_or_default()
                .to_string();
            entry = Some((name, arch));
        } else if let Some(used) = line.split("Used ").nth(1) {
            let Some((name, arch)) = entry.take() else {
                continue;
            };
            // `Used 82 registers, used 1 barriers, 8 bytes cumulative stack size, 2048 bytes
            // smem, 420 bytes cmem[0]`: the number before `registers` and before `bytes smem`.
            let number_before = |what: &str| -> u64 {
                used.split(',')
                    .find_map(|part| part.trim().strip_suffix(what)?.trim().parse().ok())
                    .unwrap_or(0)
            };
            out.push(KernelResources {
                name,
                arch,
                registers: number_before(" registers"),
                shared_bytes: number_before(" bytes smem"),
            });
        }
    }
    out
}

/// Checks every entry function of a ptxas `report` (of `program`) against blocks of `threads`
/// threads: its registers, allocated per thread in units of 8 (the register file's
/// granularity: 256 per warp) over whole warps, must fit [`BLOCK_REGISTERS`], and its static
/// shared memory [`STATIC_SHARED_BYTES`]. An error names every kernel that does not fit; a
/// report without an entry function is an error too (nothing would have been checked).
/// Returns the kernels checked.
pub fn check_launch_resources(
    program: &str,
    report: &str,
    threads: u32,
) -> Result<Vec<KernelResources>> {
    let kernels = ptxas_kernel_resources(report);
    if kernels.is_empty() {
        return Err(Error::backend(
            "cuda",
            format!("{program}: the ptxas report names no entry function with its registers"),
        ));
    }
    let warps = u64::from(threads).div_ceil(32);
    let bad: Vec<String> = kernels
        .iter()
        .filter_map(|k| {
            let registers = k.registers.div_ceil(8) * 8 * 32 * warps;
            if registers > BLOCK_REGISTERS {
                Some(format!(
                    "kernel `{}` ({}) uses {} registers per thread: {registers} for a block of \
                     {threads} threads, over the {BLOCK_REGISTERS} of a block (launch smaller \
                     blocks, or bound its registers with __launch_bounds__({threads}))",
                    k.name, k.arch, k.registers
                ))
            } else if k.shared_bytes > STATIC_SHARED_BYTES {
                Some(format!(
                    "kernel `{}` ({}) declares {} bytes of shared memory, over the \
                     {STATIC_SHARED_BYTES} a block may declare",
                    k.name, k.arch, k.shared_bytes
                ))
            } else {
                None
            }
        })
        .collect();
    if !bad.is_empty() {
        return Err(Error::backend(
            "cuda",
            format!("{program}: {}", bad.join("; ")),
        ));
    }
    Ok(kernels)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ptxas 12.9's report of `examples/cuda_jit.rs`'s kernels before they had
    /// `__launch_bounds__` (the issue #25 case), and a kernel with shared memory.
    const REPORT: &str = "\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'mlp_grads' for 'sm_80'
ptxas info    : Function properties for mlp_grads
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 247 registers, used 0 barriers, 436 bytes cmem[0]
ptxas info    : Compile time = 54.743 ms
ptxas info    : Compiling entry function 'mulo_elem_0_reduce' for 'sm_90'
ptxas info    : Function properties for mulo_elem_0_reduce
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 82 registers, used 1 barriers, 8 bytes cumulative stack size, 2048 bytes smem, 420 bytes cmem[0]
";

    #[test]
    fn the_report_gives_each_kernel_its_registers_and_shared_memory() {
        let k = ptxas_kernel_resources(REPORT);
        assert_eq!(
            k,
            vec![
                KernelResources {
                    name: "mlp_grads".into(),
                    arch: "sm_80".into(),
                    registers: 247,
                    shared_bytes: 0
                },
                KernelResources {
                    name: "mulo_elem_0_reduce".into(),
                    arch: "sm_90".into(),
                    registers: 82,
                    shared_bytes: 2048
                },
            ]
        );
    }

    #[test]
    fn blocks_past_the_register_file_are_refused_naming_the_kernel() {
        // 247 registers (248 allocated) x 256 threads = 63,488: fits.
        check_launch_resources("p", REPORT, 256).unwrap();
        // x 1,024 threads (cuda_jit's launch before #25): does not, and says which kernel.
        let e = check_launch_resources("examples/cuda_jit.rs", REPORT, 1024)
            .unwrap_err()
            .to_string();
        assert!(e.contains("examples/cuda_jit.rs"), "{e}");
        assert!(e.contains("`mlp_grads` (sm_80) uses 247 registers"), "{e}");
        // x 512: only mlp_grads is over (88 allocated x 512 = 45,056 fits), and only it is named.
        let e = check_launch_resources("p", REPORT, 512)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`mlp_grads`"), "{e}");
        assert!(!e.contains("mulo_elem_0_reduce"), "{e}");
        // Allocation granularity: 249 registers are 256 allocated, so 256 threads fit exactly
        // (65,536) and 257 (9 warps: 73,728) do not, though 249 x 257 = 63,993 would.
        let r = "ptxas info    : Compiling entry function 'k' for 'sm_90'\nptxas info    : Used 249 registers\n";
        check_launch_resources("p", r, 256).unwrap();
        assert!(check_launch_resources("p", r, 257).is_err());
        let r = "ptxas info    : Compiling entry function 'k' for 'sm_90'\nptxas info    : Used 224 registers\n";
        check_launch_resources("p", r, 288).unwrap();
        assert!(check_launch_resources("p", r, 289).is_err());
    }

    #[test]
    fn shared_memory_past_48_kib_is_refused() {
        let r = "ptxas info    : Compiling entry function 'k' for 'sm_90'\nptxas info    : Used 8 registers, used 1 barriers, 49153 bytes smem\n";
        let e = check_launch_resources("p", r, 32).unwrap_err().to_string();
        assert!(
            e.contains("`k` (sm_90) declares 49153 bytes of shared memory"),
            "{e}"
        );
        let r = r.replace("49153", "49152");
        check_launch_resources("p", &r, 32).unwrap();
    }

    #[test]
    fn a_report_without_kernels_is_an_error() {
        assert!(check_launch_resources("p", "ptxas info    : 0 bytes gmem\n", 256).is_err());
    }

    #[test]
    fn a_block_larger_than_the_kernel_allows_is_refused_naming_it() {
        check_block_threads("prog", "mlp_grads", 256, (256, 1, 1)).unwrap();
        check_block_threads("prog", "mlp_grads", 256, (16, 16, 1)).unwrap();
        let e = check_block_threads("prog", "mlp_grads", 256, (1024, 1, 1))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("prog: kernel `mlp_grads` launched with 1024 threads"),
            "{e}"
        );
        assert!(e.contains("at most 256"), "{e}");
        assert!(check_block_threads("prog", "k", 256, (16, 16, 2)).is_err());
        // A negative attribute (never returned by a driver) allows nothing.
        assert!(check_block_threads("prog", "k", -1, (1, 1, 1)).is_err());
    }
}
