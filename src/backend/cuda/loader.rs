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
        Ok(Kernel {
            raw,
            name: name.to_string(),
            module: self.clone(),
        })
    }
}

/// One kernel of a loaded [`Module`] (which it keeps loaded).
#[derive(Clone)]
pub struct Kernel {
    raw: sys::CUfunction,
    name: String,
    module: Arc<Module>,
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
