//! NVRTC: CUDA C → PTX (the portable output of `mulo-compile --target cuda`) or → a CUBIN for
//! one GPU architecture (what the runtime loads: no driver JIT), with a checksummed disk cache,
//! and the probing of libnvrtc and the GPU.
//!
//! libnvrtc is loaded at run time (cudarc's `dynamic-loading`); when it is absent the error
//! says how to get it instead of panicking. No GPU is needed to compile either output: NVRTC
//! runs ptxas itself for a real architecture (`sm_XY`) and hands out the CUBIN
//! (`nvrtcGetCUBIN`).

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The architecture used when no CUDA device can be opened (Ampere; its PTX also JIT-compiles
/// on every newer GPU).
pub const DEFAULT_ARCH: &str = "sm_80";

/// How to install libnvrtc, appended to every "not found" error.
pub const NVRTC_HELP: &str = "libnvrtc (the CUDA runtime compiler) could not be loaded. Install the CUDA toolkit, \
or `pip install nvidia-cuda-nvrtc-cu12` and put its lib folder on LD_LIBRARY_PATH, e.g. \
export LD_LIBRARY_PATH=\"$(python3 -c 'import nvidia.cuda_nvrtc as m; print(m.__path__[0])')/lib:$LD_LIBRARY_PATH\"";

fn backend(message: impl Into<String>) -> Error {
    Error::backend("cuda", message)
}

/// Whether libnvrtc can be loaded.
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names.
    #[cfg(feature = "cuda")]
    let present = std::panic::catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() })
        .unwrap_or(false);
    #[cfg(not(feature = "cuda"))]
    let present = false;
    present
}

/// Why CUDA cannot be compiled or run in a build without the `cuda` feature.
pub const NO_CUDA: &str =
    "this build of mulo has no CUDA support (cargo feature `cuda`): rebuild with it to compile or run CUDA";

/// Whether the CUDA driver library can be loaded (not whether a GPU is present).
pub fn driver_available() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names.
    #[cfg(feature = "cuda")]
    let present = std::panic::catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() })
        .unwrap_or(false);
    #[cfg(not(feature = "cuda"))]
    let present = false;
    present
}

/// The CUDA version of the installed driver as `cuDriverGetVersion` reports it
/// (`1000 * major + 10 * minor`, e.g. 12080 for CUDA 12.8), or `None` without a driver.
pub fn driver_version() -> Option<i32> {
    if !driver_available() {
        return None;
    }
    #[cfg(not(feature = "cuda"))]
    return None;
    #[cfg(feature = "cuda")]
    std::panic::catch_unwind(|| {
        let mut v = 0i32;
        // SAFETY: the driver library is loaded; cuDriverGetVersion writes one int and needs
        // no context.
        let r = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
        (r == cudarc::driver::sys::CUresult::CUDA_SUCCESS).then_some(v)
    })
    .ok()
    .flatten()
}

/// The PTX ISA version `(major, minor)` of a PTX text (its `.version` directive).
pub fn ptx_isa_version(ptx: &str) -> Option<(u32, u32)> {
    let line = ptx
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with(".version"))?;
    let (major, minor) = line.trim_start_matches(".version").trim().split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// The first CUDA release whose driver loads PTX of ISA `isa`, encoded like
/// `cuDriverGetVersion` (`1000 * major + 10 * minor`), from NVIDIA's table of PTX ISA
/// versions per CUDA release (PTX ISA 7.x: CUDA 11.x; 8.0–8.5: CUDA 12.0–12.5 (12.6 kept 8.5);
/// 8.7: 12.8; 8.8: 12.9; 9.0: 13.0). `None` for an ISA the table does not know (newer).
pub fn ptx_isa_min_cuda(isa: (u32, u32)) -> Option<i32> {
    let cuda: (i32, u32) = match isa {
        (7, m @ 0..=8) => (11, m),
        (8, m @ 0..=5) => (12, m),
        (8, 6 | 7) => (12, 8),
        (8, 8) => (12, 9),
        (9, 0) => (13, 0),
        _ => return None,
    };
    Some(1000 * cuda.0 + 10 * cuda.1 as i32)
}

/// The oldest Linux driver branch shipped with a CUDA release (as from
/// [`ptx_isa_min_cuda`]), for error messages and the manifest.
pub fn min_linux_driver(cuda: i32) -> &'static str {
    const BRANCHES: [(i32, &str); 11] = [
        (11080, "R450 (CUDA 11.x)"),
        (12000, "R525"),
        (12010, "R530"),
        (12020, "R535"),
        (12030, "R545"),
        (12040, "R550"),
        (12050, "R555"),
        (12060, "R560"),
        (12080, "R570"),
        (12090, "R575"),
        (13000, "R580"),
    ];
    BRANCHES
        .iter()
        .find(|(v, _)| cuda <= *v)
        .map_or("newer than R580", |(_, b)| b)
}

fn cuda_text(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

/// Refuses to load `program` (named in the error) whose PTX is ISA `isa` on a driver of CUDA
/// version `driver` (as `cuDriverGetVersion` reports it) that is too old to load it: the
/// check made before any module is loaded, so that an old driver gives this error instead of
/// `CUDA_ERROR_UNSUPPORTED_PTX_VERSION` at the first step.
pub fn check_driver(driver: i32, isa: (u32, u32), program: &str) -> Result<()> {
    let Some(need) = ptx_isa_min_cuda(isa) else {
        return Err(backend(format!(
            "{program}: PTX ISA {}.{} is newer than this build of mulo knows; compile with an older NVRTC",
            isa.0, isa.1
        )));
    };
    if driver < need {
        return Err(backend(format!(
            "{program}: the PTX is ISA {}.{}, which needs a CUDA {} driver ({} or newer); this driver supports CUDA {}. Update the NVIDIA driver, or install an NVRTC no newer than the driver (pip install \"nvidia-cuda-nvrtc-cu12=={}.*\") and recompile",
            isa.0,
            isa.1,
            cuda_text(need),
            min_linux_driver(need),
            cuda_text(driver),
            cuda_text(driver),
        )));
    }
    Ok(())
}

/// [`check_driver`] against the installed driver ([`driver_version`]); passes when the
/// driver cannot be asked (loading then reports the driver's own error).
pub fn check_installed_driver(ptx: &str, program: &str) -> Result<()> {
    match (driver_version(), ptx_isa_version(ptx)) {
        (Some(driver), Some(isa)) => check_driver(driver, isa, program),
        _ => Ok(()),
    }
}

/// The NVRTC version `(major, minor)`.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    if !nvrtc_available() {
        return Err(backend(if cfg!(feature = "cuda") {
            NVRTC_HELP
        } else {
            NO_CUDA
        }));
    }
    #[cfg(not(feature = "cuda"))]
    return Err(backend(NO_CUDA));
    #[cfg(feature = "cuda")]
    let (mut major, mut minor) = (0i32, 0i32);
    // SAFETY: the library is loaded; nvrtcVersion writes two ints.
    #[cfg(feature = "cuda")]
    let status = std::panic::catch_unwind(move || {
        let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
        (r, major, minor)
    })
    .map_err(|_| backend(NVRTC_HELP))?;
    #[cfg(feature = "cuda")]
    if status.0 != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(backend(format!("nvrtcVersion failed: {:?}", status.0)));
    }
    #[cfg(feature = "cuda")]
    Ok((status.1, status.2))
}

/// The compute capability of CUDA device 0 as `sm_XY`, or `None` when no device can be opened.
pub fn device_arch() -> Option<String> {
    if !driver_available() {
        return None;
    }
    #[cfg(not(feature = "cuda"))]
    return None;
    #[cfg(feature = "cuda")]
    std::panic::catch_unwind(|| {
        let ctx = cudarc::driver::CudaContext::new(0).ok()?;
        let (major, minor) = ctx.compute_capability().ok()?;
        Some(format!("sm_{major}{minor}"))
    })
    .ok()
    .flatten()
}

/// The present GPU's architecture, else [`DEFAULT_ARCH`].
pub fn default_arch() -> String {
    device_arch().unwrap_or_else(|| DEFAULT_ARCH.to_string())
}

/// Checks an architecture name: `sm_` followed by digits (and an optional `a`), e.g. `sm_90a`.
pub fn check_arch(arch: &str) -> Result<()> {
    let ok = arch
        .strip_prefix("sm_")
        .map(|rest| rest.trim_end_matches('a'))
        .is_some_and(|digits| digits.len() >= 2 && digits.bytes().all(|b| b.is_ascii_digit()));
    if ok {
        Ok(())
    } else {
        Err(Error::argument(
            "arch",
            format!("`{arch}` is not a GPU architecture like sm_80 or sm_90"),
        ))
    }
}

/// Where compiled PTX is cached: `$MULO_CACHE_DIR`, else `$XDG_CACHE_HOME/mulo`, else
/// `~/.cache/mulo`.
///
/// The directory must stay private: the entries' checksums tell a torn entry from a complete
/// one, but anyone who can write into the directory can plant an entry with a valid checksum.
/// [`usable_cache_dir`] therefore creates it with mode 0700 and refuses one owned by another
/// user or writable by its group or others ([`private_dir`](crate::fsio::private_dir)).
pub fn cache_dir() -> Option<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("MULO_CACHE_DIR")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("mulo")))
        .or_else(|| env("HOME").map(|h| h.join(".cache").join("mulo")))
}

/// The cache directory the compilers use ([`cache_dir`]), created private (0700) when
/// missing. One that is refused (owned by another user, writable by the group or others, not
/// a directory) is not used: the compilation goes on without the cache, as if it were
/// disabled, and a warning naming the directory and the reason is printed once per process.
/// Failing the compilation instead would make a shared machine's misconfigured cache stop
/// every build; ignoring the directory silently would hide that every build is a cold one.
pub fn usable_cache_dir() -> Option<PathBuf> {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let dir = cache_dir()?;
    match crate::fsio::private_dir(&dir) {
        Ok(()) => Some(dir),
        Err(e) => {
            if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                eprintln!("warning: not using the NVRTC disk cache: {e}");
            }
            None
        }
    }
}

/// The cache key of a compilation: sha256 of the source, the architecture, the NVRTC
/// version, the output kind and the options (the source already holds the shape and every
/// weight).
pub fn cache_key(source: &str, arch: &str, version: (i32, i32), output: Output) -> String {
    let mut h = Sha256::new();
    h.update(source.as_bytes());
    h.update([0]);
    h.update(arch.as_bytes());
    h.update([0]);
    h.update(format!("nvrtc {}.{}", version.0, version.1).as_bytes());
    h.update([0]);
    h.update(output.extension().as_bytes());
    h.update([0]);
    h.update(nvrtc_options(arch, version, output).join(" ").as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The line that ends every cache entry: the SHA-256 of the PTX before it.
const CACHE_TRAILER: &str = "\n// mulo-ptx-sha256 ";

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes a checksummed cache entry atomically ([`replace_atomic`](crate::fsio::replace_atomic)):
/// `payload`, then `marker`, the payload's SHA-256 in hex and a newline. Two processes storing
/// the same entry at once each rename a complete file into place; either one wins and both
/// hold the same payload. The entry's directory must be private
/// ([`private_dir`](crate::fsio::private_dir), created 0700 when missing); a link or FIFO
/// planted at `path` is replaced, never followed, so its target is untouched.
fn store_checksummed(path: &Path, payload: &[u8], marker: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::fsio::private_dir(dir)?;
    }
    let mut bytes = Vec::with_capacity(payload.len() + marker.len() + 65);
    bytes.extend_from_slice(payload);
    bytes.extend_from_slice(marker);
    bytes.extend_from_slice(sha256_hex(payload).as_bytes());
    bytes.push(b'\n');
    crate::fsio::replace_atomic(path, &bytes)
}

/// The payload of an entry written by [`store_checksummed`] with `marker`: `None` when the
/// file is missing, lacks the trailer or its checksum does not match (a torn or damaged
/// entry), or is not a regular file: a symbolic link is not followed
/// ([`read_no_follow`](crate::fsio::read_no_follow)).
fn load_checksummed(path: &Path, marker: &[u8]) -> Option<Vec<u8>> {
    let mut bytes = crate::fsio::read_no_follow(path).ok()?;
    let body = bytes.len().checked_sub(marker.len() + 64 + 1)?;
    let sum = bytes[body..].strip_prefix(marker)?.strip_suffix(b"\n")?;
    if sum != sha256_hex(&bytes[..body]).as_bytes() {
        return None;
    }
    bytes.truncate(body);
    Some(bytes)
}

/// Writes a PTX disk-cache entry atomically, followed by a trailer line holding its SHA-256,
/// so that [`cache_load`] can tell a complete entry from a damaged one.
pub fn cache_store(path: &Path, ptx: &str) -> Result<()> {
    store_checksummed(path, ptx.as_bytes(), CACHE_TRAILER.as_bytes())
}

/// Reads a disk-cache entry written by [`cache_store`]: `None` when it is missing, not UTF-8,
/// lacks the trailer, its checksum does not match, or it holds no `.entry` kernel (then the
/// program is compiled again and the entry rewritten).
pub fn cache_load(path: &Path) -> Option<String> {
    let ptx = String::from_utf8(load_checksummed(path, CACHE_TRAILER.as_bytes())?).ok()?;
    ptx.contains(".entry").then_some(ptx)
}

/// PTX produced by NVRTC, and whether it came from the disk cache.
#[derive(Clone, Debug)]
pub struct CompiledPtx {
    /// The PTX text.
    pub ptx: String,
    /// The architecture it was compiled for.
    pub arch: String,
    /// The NVRTC version that compiled it.
    pub nvrtc_version: (i32, i32),
    /// The cache key.
    pub key: String,
    /// Whether it was read from the disk cache instead of compiled.
    pub from_cache: bool,
}

/// What an NVRTC compilation produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Output {
    /// PTX for the virtual architecture `compute_XY` of `sm_XY`: portable (the driver compiles
    /// it for any GPU of that architecture or newer when it is loaded), and NVRTC skips ptxas.
    /// NVRTC's full optimization (a single tensor's program, [`compile`]).
    Ptx,
    /// A CUBIN (ELF) for the real architecture `sm_XY`: NVRTC runs ptxas, the driver loads it
    /// without compiling. It runs on GPUs of that architecture (and, within a major version,
    /// newer minor ones: sm_80 code on sm_86).
    Cubin(Level),
}

impl Output {
    /// The cache file extension.
    pub fn extension(self) -> &'static str {
        match self {
            Output::Ptx => "ptx",
            Output::Cubin(_) => "cubin",
        }
    }
}

/// How hard NVRTC optimizes a CUBIN.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Level {
    /// `--Ofast-compile=min` from NVRTC 12.9 on (the lowest fast-compile level, meant to keep
    /// runtime performance; NVRTC 12.8 knows only `0` and `max`): one tensor's program
    /// ([`compile_cubin`]). At full optimization ptxas gives some of these kernels a spill
    /// (16x8x3x3's `mulo_elem_1_reduce` on sm_80: 64 registers and an 8 B spill), which the
    /// fast level does not.
    Fast,
    /// NVRTC's full optimization: a packed model's program ([`compile_packed_cubin`]). At the
    /// fast level ptxas gives the plans' `__noinline__` device functions 8–32 B call frames
    /// with spills and the update entry 253 registers; fully optimized they have no frame and
    /// at most 122 registers, for 0.1–0.4 s more on 12 shapes with `--split-compile=0`
    /// (`bench/results/nvrtc-levels.md`).
    Full,
}

/// The NVRTC options of every compilation by NVRTC `version` for `output`: the architecture
/// (`compute_XY` for PTX, `sm_XY` for a CUBIN), C++17, the optimization of [`Level`] for a
/// CUBIN (PTX, for other hosts whose driver compiles it at load, is fully optimized: 15–20 %
/// smaller, 47–94 KB per shape), and from NVRTC 12.4 on, where a compilation is fully
/// optimized, `--split-compile=0` (NVVM and ptxas optimize the functions concurrently, on
/// every core: a 12-shape packed model's CUBIN in 1.8–2.3 s instead of 2.5–3.0 s on 2 cores,
/// `bench/results/nvrtc-levels.md`). The code
/// the runtime runs is the CUBIN's, which `.ci/steps/ptxas.sh` checks
/// ([`cubin_ptxas_report`]). Floating-point semantics stay NVRTC's defaults (`--fmad=true`,
/// IEEE division and square root, no flush-to-zero).
/// `-D`[`UPLOAD_MACRO`](super::render::UPLOAD_MACRO) keeps the values of the program's
/// `__constant__` weight arrays out of the PTX and CUBIN: the host fills them after loading
/// (the manifest's `constants`).
pub fn nvrtc_options(arch: &str, version: (i32, i32), output: Output) -> Vec<String> {
    let target = match output {
        Output::Ptx => arch.replacen("sm_", "compute_", 1),
        Output::Cubin(_) => arch.to_string(),
    };
    let mut options = vec![
        format!("--gpu-architecture={target}"),
        "--std=c++17".to_string(),
        format!("-D{}", super::render::UPLOAD_MACRO),
    ];
    match output {
        Output::Cubin(Level::Fast) => {
            if version >= (12, 9) {
                options.push("--Ofast-compile=min".to_string());
            }
        }
        Output::Ptx | Output::Cubin(Level::Full) => {
            if version >= (12, 4) {
                options.push("--split-compile=0".to_string());
            }
        }
    }
    options
}

/// ptxas's resource report for the CUBIN [`compile_cubin`] (or [`compile_packed_cubin`], with
/// `level` [`Level::Full`]) makes of `source` for `arch`:
/// registers, barriers and shared memory per kernel, stack frame and spills per function
/// (`ptxas info : …` lines, as `ptxas -v` prints them). NVRTC compiles the CUBIN again,
/// without the cache, with the same options plus `--ptxas-options=-v` (which changes no
/// code), and this is the ptxas part of its log.
pub fn cubin_ptxas_report(source: &str, arch: &str, level: Level) -> Result<String> {
    check_arch(arch)?;
    let version = nvrtc_version()?;
    let (_, log) = run_nvrtc(
        source,
        arch,
        version,
        Output::Cubin(level),
        vec!["--ptxas-options=-v".to_string()],
    )?;
    Ok(log
        .lines()
        .filter(|l| l.starts_with("ptxas"))
        .map(|l| format!("{l}\n"))
        .collect())
}

/// Compiles `source` to PTX for `arch` with NVRTC (for the virtual architecture, no ptxas:
/// see [`Output::Ptx`]), using the disk cache when `use_cache`. NVRTC's log is part of the
/// error when compilation fails.
pub fn compile(source: &str, arch: &str, use_cache: bool) -> Result<CompiledPtx> {
    compile_ptx(source, arch, use_cache, Output::Ptx)
}

fn compile_ptx(source: &str, arch: &str, use_cache: bool, output: Output) -> Result<CompiledPtx> {
    check_arch(arch)?;
    let version = nvrtc_version()?;
    let key = cache_key(source, arch, version, output);
    let cached = use_cache
        .then(usable_cache_dir)
        .flatten()
        .map(|d| d.join(format!("{key}.ptx")));
    if let Some(ptx) = cached.as_deref().and_then(cache_load) {
        return Ok(CompiledPtx {
            ptx,
            arch: arch.to_string(),
            nvrtc_version: version,
            key,
            from_cache: true,
        });
    }
    let (bytes, _) = run_nvrtc(source, arch, version, output, Vec::new())?;
    let ptx = String::from_utf8_lossy(&bytes)
        .trim_end_matches('\0')
        .to_string();
    if let Some(path) = &cached {
        // The cache is an optimization: failing to write it is not an error.
        let _ = cache_store(path, &ptx);
    }
    Ok(CompiledPtx {
        ptx,
        arch: arch.to_string(),
        nvrtc_version: version,
        key,
        from_cache: false,
    })
}

/// A CUBIN produced by NVRTC for one architecture, and how it was obtained.
#[derive(Clone, Debug)]
pub struct CompiledCubin {
    /// The ELF image.
    pub cubin: Vec<u8>,
    /// The architecture it was compiled for (`sm_XY`).
    pub arch: String,
    /// The NVRTC version that compiled it.
    pub nvrtc_version: (i32, i32),
    /// The cache key.
    pub key: String,
    /// Whether it was read from the disk cache instead of compiled.
    pub from_cache: bool,
    /// NVRTC's own report of where its time went, in milliseconds per phase (`CUDA C++
    /// Frontend`, `NVVM Optimizer`, `PTX Translation` (ptxas), …), when it was compiled by
    /// [`compile_cubin_timed`]; empty otherwise.
    pub phases: Vec<(String, f64)>,
}

impl CompiledCubin {
    /// Milliseconds NVRTC spent in `phase` (summed over its rows), when timed.
    pub fn phase_ms(&self, phase: &str) -> Option<f64> {
        let rows: Vec<f64> = self
            .phases
            .iter()
            .filter(|(p, _)| p == phase)
            .map(|(_, ms)| *ms)
            .collect();
        (!rows.is_empty()).then(|| rows.iter().sum())
    }
}

/// The phase of NVRTC's `--time` report that is ptxas (PTX → SASS).
pub const PTXAS_PHASE: &str = "PTX Translation";

/// Compiles one tensor's program `source` to a CUBIN for `arch` (NVRTC, then ptxas inside
/// NVRTC; see [`Output::Cubin`], at [`Level::Fast`]), using the disk cache when `use_cache`.
/// NVRTC's log is part of the error when compilation fails. The runtime loads this image
/// without driver JIT.
pub fn compile_cubin(source: &str, arch: &str, use_cache: bool) -> Result<CompiledCubin> {
    cubin_through_cache(source, arch, Level::Fast, use_cache, false)
}

/// [`compile_cubin`] for a packed model's program: at [`Level::Full`].
pub fn compile_packed_cubin(source: &str, arch: &str, use_cache: bool) -> Result<CompiledCubin> {
    cubin_through_cache(source, arch, Level::Full, use_cache, false)
}

/// [`compile_cubin`] at `level`, and when NVRTC runs, its `--time` report in
/// [`CompiledCubin::phases`] (for the compile-time benchmark).
pub fn compile_cubin_timed(
    source: &str,
    arch: &str,
    level: Level,
    use_cache: bool,
) -> Result<CompiledCubin> {
    cubin_through_cache(source, arch, level, use_cache, true)
}

fn cubin_through_cache(
    source: &str,
    arch: &str,
    level: Level,
    use_cache: bool,
    timed: bool,
) -> Result<CompiledCubin> {
    check_arch(arch)?;
    let version = nvrtc_version()?;
    let output = Output::Cubin(level);
    let key = cache_key(source, arch, version, output);
    let cached = use_cache
        .then(usable_cache_dir)
        .flatten()
        .map(|d| d.join(format!("{key}.cubin")));
    let done = |cubin, from_cache, phases| CompiledCubin {
        cubin,
        arch: arch.to_string(),
        nvrtc_version: version,
        key: key.clone(),
        from_cache,
        phases,
    };
    if let Some(cubin) = cached.as_deref().and_then(cubin_cache_load) {
        return Ok(done(cubin, true, Vec::new()));
    }
    let (cubin, phases) = if timed {
        let report = tempfile::NamedTempFile::new()
            .map_err(|e| Error::backend_from("cuda", "creating NVRTC's timing file", e))?;
        let time = format!("--time={}", report.path().display());
        let (cubin, _) = run_nvrtc(source, arch, version, output, vec![time])?;
        let text = std::fs::read_to_string(report.path()).unwrap_or_default();
        (cubin, parse_time_report(&text))
    } else {
        (
            run_nvrtc(source, arch, version, output, Vec::new())?.0,
            Vec::new(),
        )
    };
    if !is_cubin(&cubin) {
        return Err(backend(format!(
            "NVRTC returned {} bytes for {arch} that are not an ELF image",
            cubin.len()
        )));
    }
    if let Some(path) = &cached {
        // The cache is an optimization: failing to write it is not an error.
        let _ = cubin_cache_store(path, &cubin);
    }
    Ok(done(cubin, false, phases))
}

/// The rows of NVRTC's `--time` CSV report (`file, phase, value, unit`) as (phase,
/// milliseconds); rows in other units are skipped.
pub fn parse_time_report(csv: &str) -> Vec<(String, f64)> {
    csv.lines()
        .filter_map(|line| {
            let cols: Vec<&str> = line.split(',').map(str::trim).collect();
            let [_, phase, value, unit] = cols.as_slice() else {
                return None;
            };
            let ms: f64 = value.parse().ok()?;
            let scale = match *unit {
                "ms" => 1.0,
                "s" => 1e3,
                "us" | "µs" => 1e-3,
                _ => return None,
            };
            Some((phase.to_string(), ms * scale))
        })
        .collect()
}

/// The first bytes of every ELF image (a CUBIN is one).
pub const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];

/// `e_machine` of a CUDA ELF image (`EM_CUDA`).
pub const EM_CUDA: u16 = 190;

/// Whether `bytes` look like a CUBIN: a 64-bit little-endian ELF image for `EM_CUDA`.
pub fn is_cubin(bytes: &[u8]) -> bool {
    bytes.len() > 20
        && bytes[..4] == ELF_MAGIC
        && bytes[4] == 2 // ELFCLASS64
        && bytes[5] == 1 // little-endian
        && u16::from_le_bytes([bytes[18], bytes[19]]) == EM_CUDA
}

/// The SM version a CUBIN was compiled for (90 for `sm_90`), from its ELF header's `e_flags`:
/// its low byte in the CUDA ELF ABI version 7 (`e_ident[8]`, what NVRTC 12 writes up to
/// sm_90a), its second byte in ABI version 8 (sm_100 and newer). `None` for another ABI or
/// an image that is not a CUBIN.
pub fn cubin_sm(bytes: &[u8]) -> Option<u32> {
    if !is_cubin(bytes) || bytes.len() < 52 {
        return None;
    }
    let flags = u32::from_le_bytes([bytes[48], bytes[49], bytes[50], bytes[51]]);
    match bytes[8] {
        7 => Some(flags & 0xff),
        8 => Some((flags >> 8) & 0xff),
        _ => None,
    }
}

/// The marker before the checksum that ends every CUBIN cache entry.
const CUBIN_TRAILER: &[u8] = b"\nmulo-cubin-sha256 ";

/// Writes a CUBIN cache entry atomically: the image, then a trailer holding its SHA-256 (as
/// [`cache_store`] for PTX), so that [`cubin_cache_load`] can tell a complete entry from a
/// damaged one.
pub fn cubin_cache_store(path: &Path, cubin: &[u8]) -> Result<()> {
    store_checksummed(path, cubin, CUBIN_TRAILER)
}

/// Reads a CUBIN cache entry written by [`cubin_cache_store`]: `None` when it is missing,
/// lacks the trailer, its checksum does not match, or it is not a CUBIN ([`is_cubin`]); then
/// the program is compiled again and the entry rewritten.
pub fn cubin_cache_load(path: &Path) -> Option<Vec<u8>> {
    load_checksummed(path, CUBIN_TRAILER).filter(|image| is_cubin(image))
}

/// The oldest driver that loads a CUBIN compiled by NVRTC `nvrtc` (`(major, minor)`), as
/// `cuDriverGetVersion` encodes it: the first driver of NVRTC's major version. A CUBIN needs
/// no JIT, and CUDA's minor version compatibility lets any driver of the same major release
/// (CUDA 12.x: R525 and newer; 13.x: R580 and newer) load code built by a newer minor toolkit
/// of that release, which PTX does not get: its ISA must be known to the driver
/// ([`ptx_isa_min_cuda`]).
pub fn cubin_min_cuda(nvrtc: (i32, i32)) -> i32 {
    1000 * nvrtc.0
}

/// Refuses to load `program` (named in the error), a CUBIN compiled by NVRTC `nvrtc`, on a
/// driver of CUDA version `driver` of an older major release ([`cubin_min_cuda`]): checked
/// before the module is loaded, so that an old driver gives this error instead of the
/// driver's own at the first step.
pub fn check_driver_cubin(driver: i32, nvrtc: (i32, i32), program: &str) -> Result<()> {
    let need = cubin_min_cuda(nvrtc);
    if driver < need {
        return Err(backend(format!(
            "{program}: the CUBIN was compiled by NVRTC {}.{}, which needs a CUDA {} driver ({} or newer); this driver supports CUDA {}. Update the NVIDIA driver, or install an NVRTC of the driver's major version (pip install \"nvidia-cuda-nvrtc-cu{}\") and recompile",
            nvrtc.0,
            nvrtc.1,
            cuda_text(need),
            min_linux_driver(need),
            cuda_text(driver),
            driver / 1000,
        )));
    }
    Ok(())
}

/// [`check_driver_cubin`] against the installed driver ([`driver_version`]); passes when
/// the driver cannot be asked (loading then reports the driver's own error).
pub fn check_installed_driver_cubin(nvrtc: (i32, i32), program: &str) -> Result<()> {
    match driver_version() {
        Some(driver) => check_driver_cubin(driver, nvrtc, program),
        None => Ok(()),
    }
}

/// One NVRTC compilation of `source` for `arch` (no cache): the PTX text or the CUBIN image,
/// and NVRTC's log. `extra` options follow [`nvrtc_options`] (`--time=FILE`: NVRTC appends
/// its per-phase timing CSV to that file; `--ptxas-options=-v`).
#[cfg(feature = "cuda")]
fn run_nvrtc(
    source: &str,
    arch: &str,
    version: (i32, i32),
    output: Output,
    extra: Vec<String>,
) -> Result<(Vec<u8>, String)> {
    let mut options = nvrtc_options(arch, version, output);
    options.extend(extra);
    let src =
        std::ffi::CString::new(source).map_err(|_| backend("the CUDA source holds a NUL byte"))?;
    std::panic::catch_unwind(move || nvrtc_program(&src, arch, &options, output))
        .map_err(|_| backend(format!("NVRTC panicked while compiling. {NVRTC_HELP}")))?
}

/// Creates, compiles and destroys one NVRTC program named `mulo_step.cu`.
#[cfg(feature = "cuda")]
fn nvrtc_program(
    src: &std::ffi::CStr,
    arch: &str,
    options: &[String],
    output: Output,
) -> Result<(Vec<u8>, String)> {
    use cudarc::nvrtc::{result, sys};
    let fail = |what: &str, e: result::NvrtcError| backend(format!("NVRTC {what} failed: {e:?}"));
    let prog = result::create_program(src, Some(c"mulo_step.cu"))
        .map_err(|e| fail("nvrtcCreateProgram", e))?;
    // SAFETY: `prog` was created above and is destroyed once, at the end; every buffer passed
    // to NVRTC is sized by NVRTC's own size query.
    let out = unsafe {
        let compiled = result::compile_program(prog, options);
        let log = result::get_program_log(prog).unwrap_or_default();
        let log: Vec<u8> = log.iter().map(|&c| c as u8).collect();
        let log = String::from_utf8_lossy(&log)
            .trim_end_matches('\0')
            .to_string();
        let out = match compiled {
            Err(e) => Err(backend(format!(
                "NVRTC failed ({:?}) compiling for {arch} with {}:\n{log}",
                e.0,
                options.join(" "),
            ))),
            Ok(()) => match output {
                Output::Ptx => result::get_ptx(prog)
                    .map(|v| v.iter().map(|&c| c as u8).collect())
                    .map_err(|e| fail("nvrtcGetPTX", e)),
                Output::Cubin(_) => {
                    let mut size = 0usize;
                    sys::nvrtcGetCUBINSize(prog, &mut size)
                        .result()
                        .map_err(|e| fail("nvrtcGetCUBINSize", e))
                        .and_then(|()| {
                            let mut image = vec![0u8; size];
                            sys::nvrtcGetCUBIN(prog, image.as_mut_ptr().cast())
                                .result()
                                .map_err(|e| fail("nvrtcGetCUBIN", e))
                                .map(|()| image)
                        })
                }
            },
        };
        let _ = result::destroy_program(prog);
        out.map(|bytes: Vec<u8>| (bytes, log))
    };
    match out {
        Ok((bytes, _)) if bytes.is_empty() => Err(backend(format!(
            "NVRTC returned no {} image for {arch}",
            output.extension()
        ))),
        other => other,
    }
}

#[cfg(not(feature = "cuda"))]
fn run_nvrtc(
    _: &str,
    _: &str,
    _: (i32, i32),
    _: Output,
    _: Vec<String>,
) -> Result<(Vec<u8>, String)> {
    Err(backend(NO_CUDA))
}

/// The `.entry` kernels of a PTX text with their parameter types (`.u64`, `.f32`, …), in order.
pub fn ptx_entries(ptx: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let mut lines = ptx.lines();
    while let Some(line) = lines.next() {
        let Some(pos) = line.find(".entry ") else {
            continue;
        };
        let rest = &line[pos + 7..];
        let name = rest
            .split(|c: char| c == '(' || c.is_whitespace())
            .find(|t| !t.is_empty())
            .unwrap_or_default()
            .to_string();
        let mut types = Vec::new();
        if rest.contains(')') {
            // `.entry k()`: no parameters.
            out.push((name, types));
            continue;
        }
        for l in lines.by_ref() {
            let l = l.trim();
            if l.starts_with(')') || l.starts_with('{') {
                break;
            }
            if let Some(rest) = l.strip_prefix(".param ") {
                if let Some(t) = rest.split_whitespace().next() {
                    types.push(t.to_string());
                }
            }
        }
        out.push((name, types));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_names() {
        for ok in ["sm_80", "sm_90", "sm_90a", "sm_120"] {
            assert!(check_arch(ok).is_ok(), "{ok}");
        }
        for bad in ["80", "sm80", "sm_", "sm_9", "compute_90", "sm_8x"] {
            assert!(check_arch(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cache_key_covers_source_arch_and_version() {
        let k = cache_key("src", "sm_80", (12, 9), Output::Ptx);
        assert_eq!(k.len(), 64);
        assert_ne!(k, cache_key("src2", "sm_80", (12, 9), Output::Ptx));
        assert_ne!(k, cache_key("src", "sm_90", (12, 9), Output::Ptx));
        assert_ne!(k, cache_key("src", "sm_80", (12, 8), Output::Ptx));
        assert_ne!(
            k,
            cache_key("src", "sm_80", (12, 9), Output::Cubin(Level::Fast))
        );
        assert_ne!(
            cache_key("src", "sm_80", (12, 9), Output::Cubin(Level::Fast)),
            cache_key("src", "sm_80", (12, 9), Output::Cubin(Level::Full))
        );
    }

    #[test]
    fn old_drivers_are_refused_before_loading() {
        let ptx = "//\n.version 8.8\n.target sm_90\n.address_size 64\n";
        let isa = ptx_isa_version(ptx).unwrap();
        assert_eq!(isa, (8, 8));
        assert_eq!(ptx_isa_min_cuda(isa), Some(12090));
        // A CUDA 12.8 driver (R570) cannot load ISA 8.8; 12.9 and 13.0 can.
        let err = check_driver(12080, isa, "mulo_step.ptx (1024x512)")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("mulo_step.ptx (1024x512)")
                && err.contains("ISA 8.8")
                && err.contains("CUDA 12.9 driver (R575")
                && err.contains("supports CUDA 12.8"),
            "{err}"
        );
        check_driver(12090, isa, "p").unwrap();
        check_driver(13000, isa, "p").unwrap();
        // The table: ISA 8.5 is CUDA 12.5 (and 12.6), 8.7 is 12.8, 9.0 is 13.0.
        assert_eq!(ptx_isa_min_cuda((8, 5)), Some(12050));
        assert_eq!(ptx_isa_min_cuda((8, 7)), Some(12080));
        assert_eq!(ptx_isa_min_cuda((9, 0)), Some(13000));
        assert_eq!(ptx_isa_min_cuda((7, 8)), Some(11080));
        assert!(check_driver(99000, (9, 9), "p").is_err());
        assert_eq!(ptx_isa_version("no version"), None);
    }

    #[test]
    fn fast_compile_for_one_tensor_full_optimization_elsewhere() {
        let has = |v, output, option: &str| {
            nvrtc_options("sm_80", v, output)
                .iter()
                .any(|o| o == option)
        };
        let fast = Output::Cubin(Level::Fast);
        assert!(!has((12, 4), fast, "--Ofast-compile=min"));
        assert!(
            !has((12, 8), fast, "--Ofast-compile=min"),
            "NVRTC 12.8 rejects `min`"
        );
        assert!(has((12, 9), fast, "--Ofast-compile=min"));
        assert!(has((13, 0), fast, "--Ofast-compile=min"));
        for full in [Output::Ptx, Output::Cubin(Level::Full)] {
            assert!(!has((12, 9), full, "--Ofast-compile=min"));
            assert!(!has((12, 3), full, "--split-compile=0"));
            assert!(has((12, 4), full, "--split-compile=0"));
            assert!(has((13, 0), full, "--split-compile=0"));
        }
        assert_eq!(
            nvrtc_options("sm_90", (12, 4), Output::Cubin(Level::Fast))[0],
            "--gpu-architecture=sm_90"
        );
        // PTX is compiled for the virtual architecture: NVRTC then skips ptxas.
        assert_eq!(
            nvrtc_options("sm_90a", (12, 9), Output::Ptx)[0],
            "--gpu-architecture=compute_90a"
        );
    }

    #[test]
    fn parses_ptx_entries() {
        let ptx = ".visible .entry k0(\n\t.param .u64 k0_param_0,\n\t.param .f32 k0_param_1\n)\n{\n}\n.visible .entry k1()\n{\n}\n";
        let e = ptx_entries(ptx);
        assert_eq!(e.len(), 2);
        assert_eq!(
            e[0],
            (
                "k0".to_string(),
                vec![".u64".to_string(), ".f32".to_string()]
            )
        );
        assert_eq!(e[1], ("k1".to_string(), vec![]));
    }

    #[test]
    fn cache_entries_round_trip_and_damaged_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("k.ptx");
        let ptx = ".version 8.0\n.visible .entry k0()\n{\n}\n";
        assert_eq!(cache_load(&path), None);
        cache_store(&path, ptx).unwrap();
        assert_eq!(cache_load(&path).as_deref(), Some(ptx));
        let full = std::fs::read(&path).unwrap();
        // Every prefix (a torn write) and every single flipped byte is refused.
        for len in 0..full.len() {
            std::fs::write(&path, &full[..len]).unwrap();
            assert_eq!(cache_load(&path), None, "prefix of {len} bytes");
        }
        for i in 0..full.len() {
            let mut bad = full.clone();
            bad[i] ^= 0x20;
            std::fs::write(&path, &bad).unwrap();
            assert_eq!(cache_load(&path), None, "byte {i} flipped");
        }
        // A complete entry without a kernel is not used either.
        cache_store(&path, ".version 8.0\n").unwrap();
        assert_eq!(cache_load(&path), None);
    }

    #[cfg(unix)]
    #[test]
    fn the_cache_never_follows_a_planted_link_and_refuses_a_shared_directory() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("cache");
        let ptx = ".version 8.0\n.visible .entry k0()\n{\n}\n";
        // A forged entry outside the cache, with a valid checksum, behind a planted link.
        let forged = root.path().join("forged.ptx");
        cache_store(&forged, ptx).unwrap();
        let forged_bytes = std::fs::read(&forged).unwrap();
        cache_store(&dir.join("seed.ptx"), ptx).unwrap();
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700,
            "the cache directory is created private"
        );
        let entry = dir.join("k.ptx");
        std::os::unix::fs::symlink(&forged, &entry).unwrap();
        assert_eq!(cache_load(&entry), None, "a link is not followed");
        cache_store(&entry, ".version 8.0\n.visible .entry other()\n{\n}\n").unwrap();
        assert!(std::fs::symlink_metadata(&entry).unwrap().is_file());
        assert_eq!(
            std::fs::read(&forged).unwrap(),
            forged_bytes,
            "target untouched"
        );
        assert!(cache_load(&entry).unwrap().contains("other"));
        // A directory others can write into is refused, naming it.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = cache_store(&dir.join("k2.ptx"), ptx)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cache") && err.contains("mode 0777"), "{err}");
        assert!(!dir.join("k2.ptx").exists());
    }

    /// A minimal image [`is_cubin`] accepts: the ELF header fields it reads, then filler.
    fn fake_cubin() -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(&ELF_MAGIC);
        b[4] = 2;
        b[5] = 1;
        b[18..20].copy_from_slice(&EM_CUDA.to_le_bytes());
        b.extend((0..200u32).map(|i| (i * 7) as u8));
        b
    }

    #[test]
    fn cubin_entries_round_trip_and_damaged_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("k.cubin");
        let cubin = fake_cubin();
        assert!(is_cubin(&cubin));
        assert_eq!(cubin_cache_load(&path), None);
        cubin_cache_store(&path, &cubin).unwrap();
        assert_eq!(cubin_cache_load(&path).as_deref(), Some(&cubin[..]));
        let full = std::fs::read(&path).unwrap();
        for len in 0..full.len() {
            std::fs::write(&path, &full[..len]).unwrap();
            assert_eq!(cubin_cache_load(&path), None, "prefix of {len} bytes");
        }
        for i in 0..full.len() {
            let mut bad = full.clone();
            bad[i] ^= 0x20;
            std::fs::write(&path, &bad).unwrap();
            assert_eq!(cubin_cache_load(&path), None, "byte {i} flipped");
        }
        // A complete, checksummed entry that is not a CUDA ELF image is not used either.
        let mut not_cuda = cubin.clone();
        not_cuda[18] = 62; // EM_X86_64
        cubin_cache_store(&path, &not_cuda).unwrap();
        assert_eq!(cubin_cache_load(&path), None);
        cubin_cache_store(&path, b"PTX text").unwrap();
        assert_eq!(cubin_cache_load(&path), None);
    }

    #[test]
    fn cubins_need_a_driver_of_nvrtcs_major_version_only() {
        // NVRTC 12.9's CUBIN loads on a CUDA 12.0 driver (R525), where its PTX (ISA 8.8)
        // would not; not on CUDA 11.8.
        check_driver_cubin(12000, (12, 9), "p").unwrap();
        check_driver_cubin(13000, (12, 9), "p").unwrap();
        assert!(check_driver(12000, (8, 8), "p").is_err());
        let err = check_driver_cubin(11080, (12, 9), "mulo_step.cubin (64x32)")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("mulo_step.cubin (64x32)")
                && err.contains("NVRTC 12.9")
                && err.contains("CUDA 12.0 driver (R525")
                && err.contains("supports CUDA 11.8"),
            "{err}"
        );
        let err = check_driver_cubin(12090, (13, 0), "p")
            .unwrap_err()
            .to_string();
        assert!(err.contains("CUDA 13.0 driver (R580"), "{err}");
    }

    #[test]
    fn parses_nvrtcs_time_report() {
        let csv = "File name, phase name, metric, unit\nmulo_step.cu, CUDA C++ Frontend, 7, ms\nmulo_step.cu, NVVM Optimizer, 11.5, ms\nmulo_step.cu, PTX Translation, 2, s\nmulo_step.cu, Odd, 3, parsecs\n";
        let rows = parse_time_report(csv);
        assert_eq!(
            rows,
            vec![
                ("CUDA C++ Frontend".to_string(), 7.0),
                ("NVVM Optimizer".to_string(), 11.5),
                (PTXAS_PHASE.to_string(), 2000.0),
            ]
        );
        let c = CompiledCubin {
            cubin: Vec::new(),
            arch: "sm_90".into(),
            nvrtc_version: (12, 9),
            key: String::new(),
            from_cache: false,
            phases: rows,
        };
        assert_eq!(c.phase_ms(PTXAS_PHASE), Some(2000.0));
        assert_eq!(c.phase_ms("Linker"), None);
    }
}
