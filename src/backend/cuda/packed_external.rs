//! The packed model stepping tensors that live in the caller's device memory, on the caller's
//! stream (feature `cuda`): how `mulo.torch` steps PyTorch's CUDA tensors in place.
//!
//! [`ExternalCuda`] holds only the loaded program and its private scratch; every step's table
//! points at the caller's parameters, gradients and optimizer state
//! ([`PackedModel::external_launch`]), and the launches are queued on a stream the caller
//! owns (PyTorch's current stream) without waiting for them. Raw device addresses come in
//! through one `unsafe fn`, [`ExternalCuda::step`], whose contract is the caller's part of
//! the bargain; everything that can be checked on the host is checked before anything is
//! queued.

use super::packed::{PackedModel, TensorAddrs};
use super::packed_cuda::PackedLaunches;
use super::runtime::{driver_err, open_device};
use crate::backend::Hyper;
use crate::error::Result;
use cudarc::driver::{sys, CudaContext, CudaEvent, CudaSlice, DevicePtrMut};
use std::sync::Arc;

/// A raw CUDA stream handle (`CUstream`), as PyTorch's `Stream.cuda_stream` gives it.
pub type CuStream = sys::CUstream;

/// A packed model's program loaded on a device, stepping tensors it does not own.
pub struct ExternalCuda {
    model: Arc<PackedModel>,
    ctx: Arc<CudaContext>,
    arch: String,
    launches: PackedLaunches,
    scratch: CudaSlice<f32>,
    partials: CudaSlice<f64>,
    /// Recorded after the last step's launches: the next step (maybe on another stream) and
    /// the drop wait for it before the table, the starts or the scratch are reused or freed.
    last: Option<CudaEvent>,
    /// Last: restores the thread's context after the fields above have freed their memory.
    restore: super::current::RestoreAfterFields,
}

impl ExternalCuda {
    /// Opens device `ordinal` (its primary context: PyTorch's), compiles `model` to a CUBIN
    /// for its architecture through the NVRTC disk cache (once per model: the source depends
    /// only on the layouts and the learned optimizer), loads it (no driver JIT) and allocates
    /// its scratch.
    pub fn new(ordinal: usize, model: Arc<PackedModel>) -> Result<Self> {
        let _current = super::current::RestoreCurrent::new();
        let ctx = open_device(ordinal)?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(driver_err("reading the compute capability"))?;
        let arch = format!("sm_{major}{minor}");
        let stream = ctx.default_stream();
        let launches = PackedLaunches::load(&stream, &model, &arch)?;
        let this = ExternalCuda {
            scratch: stream
                .alloc_zeros::<f32>(model.scratch_len.max(1))
                .map_err(driver_err("allocating the scratch"))?,
            partials: stream
                .alloc_zeros::<f64>(model.partials_len.max(1))
                .map_err(driver_err("allocating the partials"))?,
            model,
            ctx,
            arch,
            launches,
            last: None,
            restore: Default::default(),
        };
        // The allocations are complete before any stream of the caller's uses them.
        this.ctx
            .synchronize()
            .map_err(driver_err("synchronizing after allocating"))?;
        Ok(this)
    }

    /// The packed model.
    pub fn model(&self) -> &Arc<PackedModel> {
        &self.model
    }

    /// The architecture the program was compiled for (`sm_90`, …).
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Queues one step of the tensors with `Some` in `steps` (their hyper-parameters and step
    /// counters: steps taken before this one) on `stream`, and returns without waiting.
    /// `tensors[i]` holds the device addresses of tensor `i`'s parameter, gradient and
    /// optimizer state (decay-major, [`Buffer::state_for_layout`](crate::ir::Buffer) of its
    /// layout; zero before its first step); its `scratch` and `partials` are ignored. An error
    /// (bad hyper-parameters, a missing, misaligned or overlapping buffer: see
    /// [`PackedModel::external_launch`]) is returned before anything is queued.
    ///
    /// # Safety
    ///
    /// - `stream` is a live stream of this device's primary context (PyTorch's streams are),
    ///   or null for the legacy default stream.
    /// - For every stepped tensor, each address is a device address in that context valid for
    ///   [`PackedModel::buffer_len`] f32 values of its buffer, and stays valid until the work
    ///   queued on `stream` has run (PyTorch's caching allocator guarantees that for tensors
    ///   alive at the call, used on their allocation stream).
    /// - Nothing else reads the parameters or state, or writes any of the buffers, unordered
    ///   with `stream` while the step runs: the step is ordered after earlier work on `stream`
    ///   and before later work on it, and nothing more.
    pub unsafe fn step(
        &mut self,
        stream: sys::CUstream,
        tensors: &[TensorAddrs],
        steps: &[Option<(Hyper, u64)>],
    ) -> Result<()> {
        let _current = super::current::RestoreCurrent::new();
        // SAFETY: the caller guarantees `stream` is a live stream of this context.
        let stream = unsafe { self.ctx.wrap_borrowed_stream(stream) };
        if let Some(last) = &self.last {
            // The previous step's launches read the table and the starts.
            stream
                .wait(last)
                .map_err(driver_err("ordering after the previous step"))?;
        }
        let (scratch, _scratch_use) = self.scratch.device_ptr_mut(&stream);
        let (partials, _partials_use) = self.partials.device_ptr_mut(&stream);
        let launch = self
            .model
            .external_launch(tensors, steps, scratch, partials)?;
        // SAFETY: the table was built by `external_launch` from addresses the caller vouches
        // for (this function's contract), checked non-null, aligned and not overlapping, plus
        // this program's scratch of the model's lengths; the starts and grids are the model's.
        unsafe {
            self.launches
                .run(&stream, &launch.table, &launch.starts, &launch.grids)
        }?;
        self.last = Some(
            stream
                .record_event(None)
                .map_err(driver_err("recording the end of a step"))?,
        );
        Ok(())
    }
}

impl Drop for ExternalCuda {
    fn drop(&mut self) {
        self.restore.arm();
        // The queued launches read the table, the starts and the scratch freed next.
        if let Some(last) = &self.last {
            let _ = last.synchronize();
        }
    }
}
