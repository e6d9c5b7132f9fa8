//! The CUDA backend: the IR is scheduled into kernels ([`schedule`]), rendered to CUDA C through
//! templates ([`render`]), compiled by NVRTC with a disk cache ([`nvrtc`]): to portable PTX for
//! `mulo-compile --target cuda`, to a CUBIN for the device's architecture at run time; described
//! by a JSON manifest ([`manifest`]), loaded with the driver's JIT logs and launched on cudarc's
//! buffers (`loader`, `runtime`).
//!
//! Compiling needs libnvrtc but no GPU; running needs a GPU. See `docs/cuda.md`.

#[cfg(feature = "cuda")]
pub mod current;
#[cfg(feature = "cuda")]
pub mod factory;
#[cfg(feature = "cuda")]
pub mod loader;
pub mod manifest;
pub mod nvrtc;
pub mod packed;
#[cfg(feature = "cuda")]
pub mod packed_cuda;
#[cfg(feature = "cuda")]
pub mod packed_external;
pub mod packed_runtime;
pub mod render;
mod roll;
#[cfg(feature = "cuda")]
pub mod runtime;
pub mod schedule;

use crate::error::Result;
use crate::ir::StepIr;
use manifest::Manifest;
use schedule::Schedule;
use std::path::{Path, PathBuf};

/// The CUDA source of one step and the schedule it was rendered from.
#[derive(Clone, Debug)]
pub struct CudaSource {
    /// The kernels and scratch layout.
    pub schedule: Schedule,
    /// The `.cu` text.
    pub source: String,
}

/// Schedules and renders `ir` (no NVRTC needed).
pub fn generate(ir: &StepIr) -> Result<CudaSource> {
    let schedule = schedule::schedule(ir);
    let source = render::render(ir, &schedule)?;
    Ok(CudaSource { schedule, source })
}

/// A step compiled to PTX: the three files of `mulo-compile --target cuda`.
#[derive(Clone, Debug)]
pub struct CompiledStep {
    /// The `.cu` source.
    pub source: String,
    /// The PTX and how it was obtained.
    pub ptx: nvrtc::CompiledPtx,
    /// The manifest.
    pub manifest: Manifest,
}

/// Renders `ir` and compiles it for `arch` (e.g. `sm_90`), using the disk cache when
/// `use_cache`.
pub fn compile(ir: &StepIr, arch: &str, use_cache: bool) -> Result<CompiledStep> {
    let generated = generate(ir)?;
    let ptx = nvrtc::compile(&generated.source, arch, use_cache)?;
    let mut manifest = Manifest::new(ir, &generated.schedule, arch, ptx.nvrtc_version)?;
    manifest.record_ptx(&ptx.ptx);
    Ok(CompiledStep {
        source: generated.source,
        ptx,
        manifest,
    })
}

impl CompiledStep {
    /// Writes `mulo_step.cu`, `mulo_step.ptx` and `mulo_step.json` into `dir` (created if
    /// missing); returns their paths.
    pub fn write_to(&self, dir: &Path) -> Result<[PathBuf; 3]> {
        crate::fsio::create_dir_all(dir)?;
        let paths = [
            dir.join(&self.manifest.source),
            dir.join(&self.manifest.ptx),
            dir.join("mulo_step.json"),
        ];
        let contents = [
            self.source.clone(),
            self.ptx.ptx.clone(),
            self.manifest.to_json(),
        ];
        for (path, text) in paths.iter().zip(contents) {
            crate::fsio::write_atomic(path, text.as_bytes())?;
        }
        Ok(paths)
    }
}
