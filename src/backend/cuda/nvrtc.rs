//! NVRTC: CUDA C → PTX, with a disk cache, and the probing of libnvrtc and the GPU.
//!
//! libnvrtc is loaded at run time (cudarc's `dynamic-loading`); when it is absent the error
//! says how to get it instead of panicking. No GPU is needed to compile.

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

/// The cache key of a compilation: sha256 of the source, the architecture and the NVRTC
/// version (the source already holds the shape and every weight).
pub fn cache_key(source: &str, arch: &str, version: (i32, i32)) -> String {
    let mut h = Sha256::new();
    h.update(source.as_bytes());
    h.update([0]);
    h.update(arch.as_bytes());
    h.update([0]);
    h.update(format!("nvrtc {}.{}", version.0, version.1).as_bytes());
    h.update([0]);
    h.update(nvrtc_options(arch, version).join(" ").as_bytes());
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

/// Writes a disk-cache entry atomically ([`write_atomic`](crate::fsio::write_atomic)): the
/// PTX followed by a trailer line holding its SHA-256, so that [`cache_load`] can tell a
/// complete entry from a damaged one. Two processes storing the same entry at once each
/// rename a complete file into place; either one wins and both are the same PTX.
pub fn cache_store(path: &Path, ptx: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        crate::fsio::create_dir_all(dir)?;
    }
    let text = format!("{ptx}{CACHE_TRAILER}{}\n", sha256_hex(ptx.as_bytes()));
    crate::fsio::write_atomic(path, text.as_bytes())
}

/// Reads a disk-cache entry written by [`cache_store`]: `None` when it is missing, not UTF-8,
/// lacks the trailer, its checksum does not match, or it holds no `.entry` kernel (then the
/// program is compiled again and the entry rewritten).
pub fn cache_load(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let body = text.strip_suffix('\n')?;
    let (ptx, sum) = body.rsplit_once(CACHE_TRAILER)?;
    (sum == sha256_hex(ptx.as_bytes()) && ptx.contains(".entry")).then(|| ptx.to_string())
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

/// The NVRTC options of every compilation by NVRTC `version`: the architecture, C++17, and
/// from NVRTC 12.9 on `--Ofast-compile=min`, the lowest fast-compile level (the one meant to
/// keep runtime performance; NVRTC 12.8 knows only `0` and `max`). It cut NVRTC's time about
/// threefold on mulo's programs (`bench/results/cuda-compile-time.md`); its effect on kernel
/// speed is not measured yet (no GPU). Floating-point
/// semantics stay NVRTC's defaults (`--fmad=true`, IEEE division and square root, no
/// flush-to-zero).
pub fn nvrtc_options(arch: &str, version: (i32, i32)) -> Vec<String> {
    let mut options = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
    ];
    if version >= (12, 9) {
        options.push("--Ofast-compile=min".to_string());
    }
    options
}

/// Compiles `source` for `arch` with NVRTC, using the disk cache when `use_cache`.
/// NVRTC's log is part of the error when compilation fails.
pub fn compile(source: &str, arch: &str, use_cache: bool) -> Result<CompiledPtx> {
    check_arch(arch)?;
    let version = nvrtc_version()?;
    let key = cache_key(source, arch, version);
    let cached = use_cache
        .then(cache_dir)
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
    let ptx = run_nvrtc(source, arch, version)?;
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

/// One NVRTC compilation of `source` for `arch` (no cache).
#[cfg(feature = "cuda")]
fn run_nvrtc(source: &str, arch: &str, version: (i32, i32)) -> Result<String> {
    let opts = cudarc::nvrtc::CompileOptions {
        options: nvrtc_options(arch, version),
        name: Some("mulo_step.cu".to_string()),
        ..Default::default()
    };
    let src = source.to_string();
    let result = std::panic::catch_unwind(move || cudarc::nvrtc::compile_ptx_with_opts(src, opts))
        .map_err(|_| backend(format!("NVRTC panicked while compiling. {NVRTC_HELP}")))?;
    match result {
        Ok(ptx) => match ptx.as_bytes() {
            Some(bytes) => Ok(String::from_utf8_lossy(bytes)
                .trim_end_matches('\0')
                .to_string()),
            None => Err(backend("NVRTC returned no PTX image")),
        },
        Err(cudarc::nvrtc::CompileError::CompileError { nvrtc, log, .. }) => Err(backend(format!(
            "NVRTC failed ({nvrtc:?}) compiling for {arch}:\n{}",
            log.to_string_lossy()
        ))),
        Err(e) => Err(backend(format!("NVRTC failed: {e:?}"))),
    }
}

#[cfg(not(feature = "cuda"))]
fn run_nvrtc(_: &str, _: &str, _: (i32, i32)) -> Result<String> {
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
        let k = cache_key("src", "sm_80", (12, 9));
        assert_eq!(k.len(), 64);
        assert_ne!(k, cache_key("src2", "sm_80", (12, 9)));
        assert_ne!(k, cache_key("src", "sm_90", (12, 9)));
        assert_ne!(k, cache_key("src", "sm_80", (12, 8)));
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
    fn fast_compile_only_where_nvrtc_has_it() {
        let has = |v| {
            nvrtc_options("sm_80", v)
                .iter()
                .any(|o| o == "--Ofast-compile=min")
        };
        assert!(!has((12, 4)));
        assert!(!has((12, 8)), "NVRTC 12.8 rejects the level `min`");
        assert!(has((12, 9)));
        assert!(has((13, 0)));
        assert_eq!(
            nvrtc_options("sm_90", (12, 4))[0],
            "--gpu-architecture=sm_90"
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
}
