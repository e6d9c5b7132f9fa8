//! `mulo._native`: the thin pyo3 layer under `mulo.torch`.
//!
//! Tensors cross as `(address, number of f32 values)` pairs: the Python side checks dtype,
//! contiguity, device and shape before any address is passed, and this layer checks the
//! lengths against the declared shapes and that no two buffers overlap before it builds a
//! slice. Everything else (μP, clipping, the non-finite policy and guard, the step counter,
//! PyLO's state layout) is `mulo::optimizer::MuloOptimizer`'s.

use mulo::backend::cuda::packed::{PackedModel, TensorAddrs};
use mulo::backend::cuda::packed_external::ExternalCuda;
use mulo::backend::Hyper;
use mulo::ir::Buffer;
use mulo::shape::Layout;
use mulo::state::TensorState;
use mulo::{
    BackendFactory, CpuFactory, InterpFactory, LearnedOptimizer, MuloOptimizer, NonFinitePolicy,
    OptimizerOptions, ParamSpec, PerTensor, Shape, StepReport,
};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use std::sync::Arc;
use std::time::Instant;

mod bytes;
mod sharded;

use bytes::{f32_bytes, f32_values, pylo_tensors, pylo_values, PyloTensors};

/// A buffer given from Python: its address and its number of f32 values.
type Buf = (usize, usize);

/// Pairs of a flat list `[address, length, address, length, ...]` (flat lists of ints cross
/// from Python much faster than lists of tuples); an address 0 is "no buffer" (a parameter
/// without gradient).
fn pairs(what: &str, flat: &[usize]) -> PyResult<Vec<Option<Buf>>> {
    if !flat.len().is_multiple_of(2) {
        return Err(PyValueError::new_err(format!(
            "{what}: expected [address, length, ...] pairs, got {} numbers",
            flat.len()
        )));
    }
    Ok(flat
        .chunks_exact(2)
        .map(|c| (c[0] != 0).then_some((c[0], c[1])))
        .collect())
}

fn required(what: &str, flat: &[usize]) -> PyResult<Vec<Buf>> {
    pairs(what, flat)?
        .into_iter()
        .enumerate()
        .map(|(i, b)| b.ok_or_else(|| PyValueError::new_err(format!("{what}[{i}]: address 0"))))
        .collect()
}

fn to_py(e: mulo::Error) -> PyErr {
    match e {
        mulo::Error::Argument { .. } => PyValueError::new_err(e.to_string()),
        other => PyRuntimeError::new_err(other.to_string()),
    }
}

/// The learned optimizer (meta-network and meta-parameters).
#[pyclass(name = "LearnedOptimizer", module = "mulo._native", frozen)]
struct PyLearnedOptimizer {
    inner: Arc<LearnedOptimizer>,
}

#[pymethods]
impl PyLearnedOptimizer {
    /// Loads a directory (Hub layout), a `.safetensors` file, or a Hub key `owner/name` (at
    /// `revision`): from the local Hugging Face cache, downloaded there first on first use by
    /// `mulo.hub.local_weights` (`huggingface_hub`, as `mulo.torch` does); `"demo"` is the
    /// bundled demo network.
    #[staticmethod]
    #[pyo3(signature = (spec, revision=None))]
    fn load(py: Python<'_>, spec: &str, revision: Option<&str>) -> PyResult<Self> {
        let inner = if spec == "demo" {
            LearnedOptimizer::demo()
        } else {
            // One route for a Hub key, in Python: the cache, then the download, with the Hub
            // client's variables and Python's error messages.
            let path: String = py
                .import("mulo.hub")?
                .call_method1("local_weights", (spec, revision))?
                .extract()?;
            LearnedOptimizer::load(&path).map_err(to_py)?
        };
        Ok(PyLearnedOptimizer {
            inner: Arc::new(inner),
        })
    }

    /// A copy with other meta-parameters: `exp_mult`, `step_mult`, the 3 momentum decays, the
    /// second-moment decay and the 3 Adafactor decays (final values, not PyLO's offsets).
    fn with_meta(
        &self,
        exp_mult: f32,
        step_mult: f32,
        momentum_decays: [f32; 3],
        rms_decay: f32,
        adafactor_decays: [f32; 3],
    ) -> PyResult<Self> {
        let mut lopt = (*self.inner).clone();
        lopt.meta.exp_mult = exp_mult;
        lopt.meta.step_mult = step_mult;
        lopt.meta.momentum_decays = momentum_decays;
        lopt.meta.rms_decay = rms_decay;
        lopt.meta.adafactor_decays = adafactor_decays;
        lopt.meta
            .validate()
            .map_err(|why| PyValueError::new_err(format!("meta-parameters: {why}")))?;
        Ok(PyLearnedOptimizer {
            inner: Arc::new(lopt),
        })
    }

    /// Whether these are the bundled demo weights (not the trained μLO_M).
    #[getter]
    fn is_demo(&self) -> bool {
        self.inner.is_demo()
    }

    /// Where the weights came from.
    #[getter]
    fn origin(&self) -> String {
        format!("{:?}", self.inner.origin)
    }

    /// SHA-256 of the network and meta-parameters.
    #[getter]
    fn fingerprint(&self) -> String {
        self.inner.fingerprint()
    }

    /// The meta-parameters as a dict.
    fn meta<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let m = &self.inner.meta;
        let d = PyDict::new(py);
        d.set_item("exp_mult", m.exp_mult)?;
        d.set_item("step_mult", m.step_mult)?;
        d.set_item("momentum_decays", m.momentum_decays.to_vec())?;
        d.set_item("rms_decay", m.rms_decay)?;
        d.set_item("adafactor_decays", m.adafactor_decays.to_vec())?;
        Ok(d)
    }
}

/// The tensors of one parameter group, stepped together by one `MuloOptimizer` (one step
/// counter: PyLO's group `step`).
///
/// Usable from any thread (not `unsendable`: that made a call from another thread than the
/// creator's a `PanicException`). Methods hold the GIL throughout, since the buffers are raw
/// addresses of tensors that another Python thread could free, so calls are serialized;
/// pyo3's borrow flag would refuse an overlapping one with a `RuntimeError`.
#[pyclass(name = "Group", module = "mulo._native")]
struct PyGroup {
    opt: MuloOptimizer,
    numels: Vec<usize>,
}

/// Why a set of buffers cannot be turned into slices.
enum BufferError {
    /// Buffer `k` has a null or misaligned address.
    Address(usize, usize),
    /// Buffers `a` and `b` overlap, and one of them is written.
    Overlap(usize, usize),
}

impl BufferError {
    fn into_py_err(self, what: &str, names: &[String]) -> PyErr {
        let name = |k: usize| names.get(k).map_or("?", |n| n.as_str()).to_string();
        match self {
            BufferError::Address(k, addr) => PyValueError::new_err(format!(
                "{what} `{}`: address {addr:#x} is not that of f32 data",
                name(k)
            )),
            BufferError::Overlap(a, b) => PyValueError::new_err(format!(
                "{what}: the memory of `{}` and `{}` overlaps (a parameter must not share \
                 storage with another parameter or a gradient)",
                name(a),
                name(b)
            )),
        }
    }
}

/// Every buffer is (address, values, written): addresses non-null and aligned for f32, and no
/// written buffer overlapping another, so that the mutable slices built from them do not alias.
fn check_buffers(bufs: &[(usize, usize, bool)]) -> Result<(), BufferError> {
    for (k, b) in bufs.iter().enumerate() {
        if b.1 > 0 && (b.0 == 0 || b.0 % std::mem::align_of::<f32>() != 0) {
            return Err(BufferError::Address(k, b.0));
        }
    }
    let mut spans: Vec<(usize, usize, usize, bool)> = bufs
        .iter()
        .enumerate()
        .filter(|(_, b)| b.1 > 0)
        .map(|(k, b)| (b.0, b.0 + 4 * b.1, k, b.2))
        .collect();
    spans.sort_unstable();
    // Sorted by start: a span overlaps a later one iff that one starts before the furthest end
    // seen so far.
    let mut reach: Option<(usize, usize, bool)> = None; // (end, index, written)
    for &(start, end, k, written) in &spans {
        if let Some((far, j, far_written)) = reach {
            if start < far && (written || far_written) {
                return Err(BufferError::Overlap(j, k));
            }
        }
        if reach.is_none_or(|(far, _, _)| end > far) {
            reach = Some((end, k, written));
        }
    }
    Ok(())
}

fn report_dict<'py>(py: Python<'py>, r: &StepReport) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("step", r.step)?;
    d.set_item("skipped", r.skipped.clone())?;
    d.set_item("sanitized", r.sanitized.clone())?;
    d.set_item(
        "nonfinite",
        r.nonfinite
            .iter()
            .map(|(n, c)| (n.clone(), c.to_string()))
            .collect::<Vec<_>>(),
    )?;
    d.set_item("clipped", r.clipped.clone())?;
    d.set_item("reverted", r.reverted.clone())?;
    d.set_item("without_grad", r.without_grad.clone())?;
    Ok(d)
}

#[pymethods]
impl PyGroup {
    /// `names[i]`, `shapes[i]`, `axes[i]` ((d0, d1) for a tensor of rank ≥ 2, else None) of
    /// every tensor; `nonfinite` is `skip`, `zero` or `error`; `backend` is `cpu` (native) or
    /// `interp` (the reference interpreter).
    #[new]
    #[pyo3(signature = (lopt, names, shapes, axes, max_grad_norm, nonfinite, guard, backend))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        lopt: &PyLearnedOptimizer,
        names: Vec<String>,
        shapes: Vec<Vec<usize>>,
        axes: Vec<Option<(usize, usize)>>,
        max_grad_norm: Option<f32>,
        nonfinite: &str,
        guard: bool,
        backend: &str,
    ) -> PyResult<Self> {
        if names.len() != shapes.len() || names.len() != axes.len() {
            return Err(PyValueError::new_err(
                "names, shapes and axes must have one entry per tensor",
            ));
        }
        let nonfinite = match nonfinite {
            "skip" => NonFinitePolicy::Skip,
            "zero" => NonFinitePolicy::Zero,
            "error" => NonFinitePolicy::Error,
            other => {
                return Err(PyValueError::new_err(format!(
                    "nonfinite={other:?}: expected 'skip', 'zero' or 'error'"
                )))
            }
        };
        let backend: Arc<dyn BackendFactory> = match backend {
            "cpu" => Arc::new(PerTensor(CpuFactory)),
            "interp" => Arc::new(PerTensor(InterpFactory)),
            other => {
                return Err(PyValueError::new_err(format!(
                    "backend={other:?}: expected 'cpu' or 'interp'"
                )))
            }
        };
        let mut specs = Vec::with_capacity(names.len());
        let mut numels = Vec::with_capacity(names.len());
        for ((name, dims), ax) in names.iter().zip(&shapes).zip(&axes) {
            let shape = Shape::new(dims.clone())
                .map_err(|e| PyValueError::new_err(format!("`{name}`: {e}")))?;
            numels.push(shape.numel());
            let mut spec = ParamSpec::with_shape(name.clone(), shape);
            if let Some((d0, d1)) = ax {
                spec = spec.with_factored_axes(*d0, *d1).map_err(to_py)?;
            }
            specs.push(spec);
        }
        let options = OptimizerOptions {
            max_grad_norm,
            nonfinite,
            guard,
            backend,
            ..Default::default()
        };
        let opt = MuloOptimizer::new(&lopt.inner, specs, options).map_err(to_py)?;
        Ok(PyGroup { opt, numels })
    }

    /// One step: `params` = [address, values, ...] of every tensor, `grads` the same with
    /// (0, 0) for a tensor without gradient (left unchanged); the group's lr and weight decay.
    /// Returns the report.
    fn step<'py>(
        &mut self,
        py: Python<'py>,
        params: Vec<usize>,
        grads: Vec<usize>,
        lr: f32,
        weight_decay: f32,
    ) -> PyResult<Bound<'py, PyDict>> {
        let params = required("params", &params)?;
        let grads = pairs("grads", &grads)?;
        let report = self.step_inner(&params, &grads, lr, weight_decay)?;
        report_dict(py, &report)
    }

    /// Sets the per-tensor clipping norm (None: no clipping).
    fn set_max_grad_norm(&mut self, max_grad_norm: Option<f32>) -> PyResult<()> {
        self.opt.set_max_grad_norm(max_grad_norm).map_err(to_py)
    }

    /// Steps `steps` times on the same buffers from Rust and returns the wall time of each
    /// step in seconds: the Rust API's cost of the step the Python optimizer makes (for the
    /// overhead benchmark). Changes the parameters and the state like `steps` real steps.
    fn bench_steps(
        &mut self,
        params: Vec<usize>,
        grads: Vec<usize>,
        lr: f32,
        weight_decay: f32,
        steps: usize,
    ) -> PyResult<Vec<f64>> {
        let params = required("params", &params)?;
        let grads = pairs("grads", &grads)?;
        let mut times = Vec::with_capacity(steps);
        for _ in 0..steps {
            let t = Instant::now();
            self.step_inner(&params, &grads, lr, weight_decay)?;
            times.push(t.elapsed().as_secs_f64());
        }
        Ok(times)
    }

    /// The step counter (PyLO's group `step`: steps taken).
    #[getter]
    fn step_count(&self) -> u64 {
        self.opt.step_count()
    }

    /// Sets the step counter (accumulators kept).
    fn set_step_count(&mut self, step: u64) -> PyResult<()> {
        self.opt.set_step_count(step).map_err(to_py)
    }

    /// The factored axes (d0, d1) of tensor `index`, or None for rank ≤ 1.
    fn factored_axes(&self, index: usize) -> PyResult<Option<(usize, usize)>> {
        let name = self.name(index)?;
        let state = self.opt.state(&name).map_err(to_py)?;
        Ok(state.layout().factored().map(|a| (a.d0, a.d1)))
    }

    /// Tensor `index`'s state in PyLO's layout: [(name, shape, little-endian f32 bytes)].
    fn export_state<'py>(&self, py: Python<'py>, index: usize) -> PyResult<PyloTensors<'py>> {
        let name = self.name(index)?;
        let tensors = self.opt.export_pylo_state(&name).map_err(to_py)?;
        Ok(pylo_tensors(py, tensors))
    }

    /// Replaces tensor `index`'s state from PyLO-layout tensors [(name, shape, (address,
    /// values))] (contiguous f32 on the CPU); the step counter stays the group's.
    fn import_state(
        &mut self,
        index: usize,
        tensors: Vec<(String, Vec<usize>, Buf)>,
    ) -> PyResult<()> {
        let name = self.name(index)?;
        let names: Vec<String> = tensors.iter().map(|t| format!("{name}.{}", t.0)).collect();
        let bufs: Vec<(usize, usize, bool)> =
            tensors.iter().map(|t| (t.2 .0, t.2 .1, false)).collect();
        check_buffers(&bufs).map_err(|e| e.into_py_err("state", &names))?;
        for (n, shape, (_, len)) in &tensors {
            if shape.iter().product::<usize>() != *len {
                return Err(PyValueError::new_err(format!(
                    "state `{name}.{n}`: shape {shape:?} does not hold {len} values"
                )));
            }
        }
        self.opt
            .import_pylo_state(&name, |n| {
                tensors
                    .iter()
                    .find(|t| t.0 == n)
                    .map(|(_, shape, (ptr, len))| {
                        // SAFETY: the Python side passes contiguous f32 CPU tensors it keeps alive
                        // for the call; the address is non-null and aligned (checked above).
                        let values = if *len == 0 {
                            Vec::new()
                        } else {
                            unsafe { std::slice::from_raw_parts(*ptr as *const f32, *len) }.to_vec()
                        };
                        (shape.clone(), values)
                    })
            })
            .map_err(to_py)
    }

    /// Resets tensor `index`'s state to zeros (a tensor PyLO never stepped has no state).
    fn zero_state(&mut self, index: usize) -> PyResult<()> {
        let name = self.name(index)?;
        let layout = self.opt.state(&name).map_err(to_py)?.layout().clone();
        let zeros = TensorState::zeros(&layout, self.opt.step_count());
        self.opt.set_state(&name, zeros).map_err(to_py)
    }

    /// The backend's name.
    #[getter]
    fn target(&self) -> &'static str {
        self.opt.target()
    }

    /// Number of step programs compiled (one per distinct shape and axes).
    #[getter]
    fn compiled_plans(&self) -> usize {
        self.opt.compiled_plans()
    }
}

impl PyGroup {
    fn name(&self, index: usize) -> PyResult<String> {
        self.opt
            .params()
            .get(index)
            .map(|p| p.name.clone())
            .ok_or_else(|| PyValueError::new_err(format!("no tensor {index} in this group")))
    }

    fn step_inner(
        &mut self,
        params: &[Buf],
        grads: &[Option<Buf>],
        lr: f32,
        weight_decay: f32,
    ) -> PyResult<StepReport> {
        let n = self.numels.len();
        if params.len() != n || grads.len() != n {
            return Err(PyValueError::new_err(format!(
                "{} parameters and {} gradients given; the group has {n} tensors",
                params.len(),
                grads.len()
            )));
        }
        let name = |i: usize| self.opt.params()[i].name.clone();
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            let want = self.numels[i];
            for (what, len) in [("param", Some(p.1)), ("grad", g.map(|g| g.1))] {
                if let Some(len) = len {
                    if len != want {
                        return Err(PyValueError::new_err(format!(
                            "{what} `{}` has {len} values; it was declared with {want}",
                            name(i)
                        )));
                    }
                }
            }
        }
        let mut bufs: Vec<(usize, usize, bool)> = params.iter().map(|p| (p.0, p.1, true)).collect();
        bufs.extend(grads.iter().flatten().map(|g| (g.0, g.1, false)));
        if let Err(e) = check_buffers(&bufs) {
            // Only now spell out which tensors (buffer k: the k-th parameter, then the
            // gradients in order).
            let mut names: Vec<String> = (0..n).map(name).collect();
            names.extend(
                grads
                    .iter()
                    .enumerate()
                    .filter(|(_, g)| g.is_some())
                    .map(|(i, _)| format!("{}.grad", name(i))),
            );
            return Err(e.into_py_err("step", &names));
        }
        // SAFETY: every address is that of a live, contiguous f32 buffer of the given length
        // that the caller keeps alive for the call (checked on the Python side: dtype,
        // contiguity, device; here: length, alignment, and that no written buffer overlaps
        // another, so the mutable slices do not alias).
        let mut param_slices: Vec<&mut [f32]> = params
            .iter()
            .map(|&(ptr, len)| unsafe { slice_mut(ptr, len) })
            .collect();
        let grad_slices: Vec<Option<&[f32]>> = grads
            .iter()
            .map(|g| g.map(|(ptr, len)| unsafe { slice(ptr, len) }))
            .collect();
        self.opt
            .step_partial(&mut param_slices, &grad_slices, lr, weight_decay)
            .map_err(to_py)
    }
}

/// The layouts of a group's tensors from Python's shapes and axes.
fn layouts(shapes: &[Vec<usize>], axes: &[Option<(usize, usize)>]) -> PyResult<Vec<Layout>> {
    if shapes.len() != axes.len() {
        return Err(PyValueError::new_err(
            "shapes and axes must have one entry per tensor",
        ));
    }
    shapes
        .iter()
        .zip(axes)
        .enumerate()
        .map(|(i, (dims, ax))| {
            let shape = Shape::new(dims.clone())
                .map_err(|e| PyValueError::new_err(format!("tensor {i}: {e}")))?;
            let axes = ax.map(|(d0, d1)| mulo::FactoredAxes { d0, d1 });
            Layout::with_axes(shape, axes)
                .map_err(|e| PyValueError::new_err(format!("tensor {i}: {e}")))
        })
        .collect()
}

/// A group's tensors as one packed CUDA program (`mulo_model.cu`): one program for the whole
/// group, whatever its number of tensors. Building it needs neither a GPU nor NVRTC; only
/// [`stepper`](Self::stepper) does.
#[pyclass(name = "CudaModel", module = "mulo._native", frozen)]
struct PyCudaModel {
    model: Arc<PackedModel>,
}

#[pymethods]
impl PyCudaModel {
    /// The packed model of tensors of `shapes` with factored `axes` ((d0, d1) or None each).
    #[new]
    fn new(
        lopt: &PyLearnedOptimizer,
        shapes: Vec<Vec<usize>>,
        axes: Vec<Option<(usize, usize)>>,
    ) -> PyResult<Self> {
        let layouts = layouts(&shapes, &axes)?;
        let model = PackedModel::new(&lopt.inner, &layouts).map_err(to_py)?;
        Ok(PyCudaModel {
            model: Arc::new(model),
        })
    }

    /// Number of tensors.
    #[getter]
    fn n_tensors(&self) -> usize {
        self.model.tensors.len()
    }

    /// Number of distinct layouts (compiled plans).
    #[getter]
    fn n_plans(&self) -> usize {
        self.model.plans.len()
    }

    /// Entry points launched per step (whatever the number of tensors).
    #[getter]
    fn slots(&self) -> Vec<String> {
        self.model.slots.iter().map(|s| s.name.clone()).collect()
    }

    /// Tensor `index`'s optimizer state buffers, in the order [`CudaStepper.step`] takes
    /// them: (name, decay-major shape) of `mom`, `rms`, then `fac_row`, `fac_col` or `fac_v`.
    fn state_buffers(&self, index: usize) -> PyResult<Vec<(String, Vec<usize>)>> {
        let t = self
            .model
            .tensors
            .get(index)
            .ok_or_else(|| PyValueError::new_err(format!("no tensor {index} in this model")))?;
        let layout = &self.model.plans[t.plan].ir.layout;
        Ok(Buffer::state_for_layout(layout)
            .into_iter()
            .map(|b| (b.name().to_string(), b.shape(layout)))
            .collect())
    }

    /// The `.cu` source of the program.
    fn source(&self) -> PyResult<String> {
        self.model.source().map_err(to_py)
    }

    /// `mulo_model.json` for architecture `arch` (NVRTC version 0.0 when not compiled).
    fn manifest_json(&self, arch: &str) -> PyResult<String> {
        let manifest = self.model.manifest(arch, (0, 0)).map_err(to_py)?;
        Ok(serde_json::to_string_pretty(&manifest).unwrap_or_default())
    }

    /// Compiles the program for CUDA device `device` (NVRTC, through the disk cache) and
    /// loads it. Needs the CUDA driver and libnvrtc.
    fn stepper(&self, device: usize) -> PyResult<PyCudaStepper> {
        let inner = ExternalCuda::new(device, self.model.clone()).map_err(to_py)?;
        Ok(PyCudaStepper { inner })
    }
}

/// A [`CudaModel`] loaded on a device: steps PyTorch's CUDA tensors in place on PyTorch's
/// stream. Usable from any thread, one call at a time, as `Group`.
#[pyclass(name = "CudaStepper", module = "mulo._native")]
struct PyCudaStepper {
    inner: ExternalCuda,
}

#[pymethods]
impl PyCudaStepper {
    /// The architecture the program was compiled for.
    #[getter]
    fn arch(&self) -> String {
        self.inner.arch().to_string()
    }

    /// Queues one step on CUDA stream `stream` (`torch.cuda.current_stream().cuda_stream`)
    /// and returns without waiting. `addrs` holds, per tensor, 7 device addresses: parameter,
    /// gradient, then its state buffers in [`CudaModel.state_buffers`] order, 0 for the rest;
    /// `hypers[i]` is (lr, weight_decay) of a stepped tensor or None; `steps[i]` its step
    /// counter (steps taken before this one).
    ///
    /// The Python caller (`mulo.torch`) guarantees what the Rust side cannot check: every
    /// address is that of a live, contiguous float32 tensor on this device with the
    /// declared number of values (it keeps the tensors alive and uses them on `stream`).
    fn step(
        &mut self,
        stream: usize,
        addrs: Vec<u64>,
        hypers: Vec<Option<(f32, f32)>>,
        steps: Vec<u64>,
    ) -> PyResult<()> {
        let model = self.inner.model().clone();
        let n = model.tensors.len();
        if addrs.len() != 7 * n || hypers.len() != n || steps.len() != n {
            return Err(PyValueError::new_err(format!(
                "{} addresses, {} hyper-parameters and {} step counters for {n} tensors \
                 (7 addresses each)",
                addrs.len(),
                hypers.len(),
                steps.len()
            )));
        }
        let mut tensors = Vec::with_capacity(n);
        for (i, a) in addrs.chunks_exact(7).enumerate() {
            let mut t = TensorAddrs {
                param: a[0],
                grad: a[1],
                ..Default::default()
            };
            let layout = &model.plans[model.tensors[i].plan].ir.layout;
            let state = Buffer::state_for_layout(layout);
            for (k, &addr) in a[2..].iter().enumerate() {
                match state.get(k) {
                    Some(&b) => t.set(b, addr),
                    None if addr != 0 => {
                        return Err(PyValueError::new_err(format!(
                            "tensor {i}: {} state buffers, address {k} is extra",
                            state.len()
                        )))
                    }
                    None => {}
                }
            }
            tensors.push(t);
        }
        let entries: Vec<Option<(Hyper, u64)>> = hypers
            .iter()
            .zip(&steps)
            .map(|(h, &s)| h.map(|(lr, weight_decay)| (Hyper { lr, weight_decay }, s)))
            .collect();
        // SAFETY: `stream` is PyTorch's current stream of this device (primary context);
        // the addresses are those of live tensors of the declared sizes on this device, kept
        // alive by the caller and used on that stream (this method's contract with
        // mulo.torch, which checks device, dtype, contiguity and shape first); overlaps,
        // alignment and nulls are checked by `ExternalCuda::step`.
        unsafe {
            self.inner.step(
                stream as mulo::backend::cuda::packed_external::CuStream,
                &tensors,
                &entries,
            )
        }
        .map_err(to_py)
    }
}

/// Tensor state in the canonical layout (`[(name, little-endian f32 bytes)]`, decay-major)
/// to PyLO's (`[(name, shape, bytes)]`, decay-last), for a tensor of `shape` and `axes`.
#[pyfunction]
fn state_to_pylo<'py>(
    py: Python<'py>,
    shape: Vec<usize>,
    axes: Option<(usize, usize)>,
    buffers: Vec<(String, Vec<u8>)>,
) -> PyResult<PyloTensors<'py>> {
    let layout = layouts(&[shape], &[axes])?.remove(0);
    let mut state = TensorState::zeros(&layout, 0);
    for (name, bytes) in buffers {
        let b = Buffer::state_for_layout(&layout)
            .into_iter()
            .find(|b| b.name() == name)
            .ok_or_else(|| {
                PyValueError::new_err(format!(
                    "state `{name}`: not a state buffer of a {} tensor",
                    layout.shape()
                ))
            })?;
        let values = f32_values(&format!("state `{name}`"), &bytes)?;
        state.set(b, values).map_err(to_py)?;
    }
    Ok(pylo_tensors(py, state.to_pylo()))
}

/// PyLO-layout state (`[(name, shape, little-endian f32 bytes)]`) to the canonical layout
/// (`[(name, bytes)]` in `CudaModel.state_buffers` order), checked as the CPU path checks it.
#[pyfunction]
#[allow(clippy::type_complexity)]
fn state_from_pylo<'py>(
    py: Python<'py>,
    shape: Vec<usize>,
    axes: Option<(usize, usize)>,
    tensors: Vec<(String, Vec<usize>, Vec<u8>)>,
) -> PyResult<Vec<(String, Bound<'py, PyBytes>)>> {
    let layout = layouts(&[shape], &[axes])?.remove(0);
    let tensors = pylo_values(tensors)?;
    let state = TensorState::from_pylo(&layout, 0, |n| {
        tensors
            .iter()
            .find(|t| t.0 == n)
            .map(|(_, shape, values)| (shape.clone(), values.clone()))
    })
    .map_err(to_py)?;
    Ok(state
        .iter()
        .map(|(b, values)| (b.name().to_string(), f32_bytes(py, values)))
        .collect())
}

/// The first conflict among the buffers of one whole step, every parameter group's together
/// (each group's native step checks only its own buffers, after the groups before it have
/// stepped; this lets `mulo.torch` refuse a step before any group changes). `params` and
/// `grads` are flat `[address, values, ...]` lists of f32 buffers (address 0: no gradient);
/// buffers are numbered parameters first, then gradients, by position in their list. Returns
/// `(a, b)` for two overlapping buffers one of which is written (a parameter), `(k, k)` for a
/// buffer with a null or misaligned address, or None.
#[pyfunction]
fn buffer_conflict(params: Vec<usize>, grads: Vec<usize>) -> PyResult<Option<(usize, usize)>> {
    let params = pairs("params", &params)?;
    let grads = pairs("grads", &grads)?;
    let mut index = Vec::new();
    let mut bufs = Vec::new();
    for (k, (b, written)) in params
        .iter()
        .map(|b| (b, true))
        .chain(grads.iter().map(|b| (b, false)))
        .enumerate()
    {
        if let Some((addr, len)) = b {
            index.push(k);
            bufs.push((*addr, *len, written));
        }
    }
    Ok(match check_buffers(&bufs) {
        Ok(()) => None,
        Err(BufferError::Address(k, _)) => Some((index[k], index[k])),
        Err(BufferError::Overlap(a, b)) => Some((index[a], index[b])),
    })
}

/// # Safety
/// `ptr` is null-free, aligned and valid for `len` f32 reads while the slice lives.
unsafe fn slice<'a>(ptr: usize, len: usize) -> &'a [f32] {
    if len == 0 {
        &[]
    } else {
        std::slice::from_raw_parts(ptr as *const f32, len)
    }
}

/// # Safety
/// As [`slice`], for writes, and nothing else refers to the memory while the slice lives.
unsafe fn slice_mut<'a>(ptr: usize, len: usize) -> &'a mut [f32] {
    if len == 0 {
        &mut []
    } else {
        std::slice::from_raw_parts_mut(ptr as *mut f32, len)
    }
}

/// The native module of the `mulo` package.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyLearnedOptimizer>()?;
    m.add_class::<PyGroup>()?;
    m.add_class::<PyCudaModel>()?;
    m.add_class::<PyCudaStepper>()?;
    m.add_function(wrap_pyfunction!(state_to_pylo, m)?)?;
    m.add_function(wrap_pyfunction!(state_from_pylo, m)?)?;
    m.add_function(wrap_pyfunction!(buffer_conflict, m)?)?;
    m.add_class::<sharded::PyShardedGroup>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
