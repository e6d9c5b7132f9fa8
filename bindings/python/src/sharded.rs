//! `mulo._native.ShardedGroup`: the staged, sharded step of `mulo::shard::ShardedModel` for
//! `mulo.distributed` (DTensor parameters sharded on dim 0). Buffers of partial sums cross as
//! little-endian f64 bytes; the Python side all-reduces them with `torch.distributed`.

use crate::bytes::{f64_bytes, f64_values, pylo_tensors, pylo_values, PyloTensors};
use crate::{check_buffers, pairs, report_dict, required, slice, slice_mut, to_py};
use crate::{Buf, PyLearnedOptimizer};
use mulo::shard::{RowShard, ShardedModel, ShardedParam};
use mulo::state::TensorState;
use mulo::{FactoredAxes, Hyper, NonFinitePolicy, Shape};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

/// The local shards of one parameter group on this rank (one step counter). Usable from any
/// thread, one call at a time, as `Group`.
#[pyclass(name = "ShardedGroup", module = "mulo._native")]
pub struct PyShardedGroup {
    model: ShardedModel,
    numels: Vec<usize>,
}

#[pymethods]
impl PyShardedGroup {
    /// `names[i]`, `shapes[i]` (the whole tensor's), `axes[i]` and `shards[i]` ((row offset,
    /// rows) this rank holds, or None for a replicated tensor) of every tensor.
    #[new]
    #[pyo3(signature = (lopt, names, shapes, axes, shards, max_grad_norm, nonfinite))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        lopt: &PyLearnedOptimizer,
        names: Vec<String>,
        shapes: Vec<Vec<usize>>,
        axes: Vec<Option<(usize, usize)>>,
        shards: Vec<Option<(usize, usize)>>,
        max_grad_norm: Option<f32>,
        nonfinite: &str,
    ) -> PyResult<Self> {
        let t = names.len();
        if shapes.len() != t || axes.len() != t || shards.len() != t {
            return Err(PyValueError::new_err(
                "names, shapes, axes and shards must have one entry per tensor",
            ));
        }
        let nonfinite: NonFinitePolicy = nonfinite.parse().map_err(to_py)?;
        let mut params = Vec::with_capacity(t);
        for i in 0..t {
            let shape = Shape::new(shapes[i].clone())
                .map_err(|e| PyValueError::new_err(format!("`{}`: {e}", names[i])))?;
            let ax = axes[i].map(|(d0, d1)| FactoredAxes { d0, d1 });
            let shard = shards[i].map(|(offset, rows)| RowShard { offset, rows });
            params.push(ShardedParam::new(names[i].clone(), &shape, ax, shard).map_err(to_py)?);
        }
        let numels = params.iter().map(|p| p.local_numel()).collect();
        let model =
            ShardedModel::new(&lopt.inner, params, max_grad_norm, nonfinite).map_err(to_py)?;
        Ok(PyShardedGroup { model, numels })
    }

    /// Buffers (all-reduces) per step.
    #[getter]
    fn rounds(&self) -> usize {
        self.model.rounds()
    }

    /// Number of f64 values in round `round`'s buffer.
    fn round_len(&self, round: usize) -> PyResult<usize> {
        if round >= self.model.rounds() {
            return Err(PyValueError::new_err(format!("no round {round}")));
        }
        Ok(self.model.round_len(round))
    }

    /// Starts a step: local parameters and gradients as [address, values, ...] ((0, 0) for no
    /// gradient), each tensor's lr and weight decay. Returns round 0's buffer (f64 bytes).
    fn begin<'py>(
        &mut self,
        py: Python<'py>,
        params: Vec<usize>,
        grads: Vec<usize>,
        lrs: Vec<f32>,
        weight_decays: Vec<f32>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let params = required("params", &params)?;
        let grads = pairs("grads", &grads)?;
        self.check(&params, &grads)?;
        if lrs.len() != self.numels.len() || weight_decays.len() != self.numels.len() {
            return Err(PyValueError::new_err(
                "lrs and weight_decays must have one entry per tensor",
            ));
        }
        let hypers: Vec<Hyper> = lrs
            .iter()
            .zip(&weight_decays)
            .map(|(&lr, &weight_decay)| Hyper { lr, weight_decay })
            .collect();
        // SAFETY: checked by `check` (lengths, alignment, no overlap); the Python side keeps
        // the tensors alive for the call. Nothing is written here.
        let p: Vec<&[f32]> = params
            .iter()
            .map(|&(a, n)| unsafe { slice(a, n) })
            .collect();
        let g: Vec<Option<&[f32]>> = grads
            .iter()
            .map(|b| b.map(|(a, n)| unsafe { slice(a, n) }))
            .collect();
        let buf = self.model.begin(&p, &g, &hypers).map_err(to_py)?;
        Ok(f64_bytes(py, &buf))
    }

    /// Gives the sum over every rank of the current round's buffer; returns the next one.
    fn advance<'py>(&mut self, py: Python<'py>, combined: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        let combined = f64_values("combined", combined)?;
        let buf = self.model.advance(&combined).map_err(to_py)?;
        Ok(f64_bytes(py, &buf))
    }

    /// Gives the sum of the last round; writes the local parameters ([address, values, ...])
    /// of every tensor kept on every rank. Returns the report.
    fn finish<'py>(
        &mut self,
        py: Python<'py>,
        combined: &[u8],
        params: Vec<usize>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let combined = f64_values("combined", combined)?;
        let params = required("params", &params)?;
        let none: Vec<Option<Buf>> = vec![None; params.len()];
        self.check(&params, &none)?;
        // SAFETY: checked by `check`: lengths, alignment, no two parameters overlap.
        let mut views: Vec<&mut [f32]> = params
            .iter()
            .map(|&(a, n)| unsafe { slice_mut(a, n) })
            .collect();
        let report = self.model.finish(&combined, &mut views).map_err(to_py)?;
        report_dict(py, &report)
    }

    /// Sets the per-tensor clipping norm (None: none); it changes the number of rounds, so
    /// every rank must change it alike.
    fn set_max_grad_norm(&mut self, max_grad_norm: Option<f32>) -> PyResult<()> {
        self.model.set_max_grad_norm(max_grad_norm).map_err(to_py)
    }

    /// Steps taken.
    #[getter]
    fn step_count(&self) -> u64 {
        self.model.step_count()
    }

    /// Sets the step counter (resuming).
    fn set_step_count(&mut self, step: u64) {
        self.model.set_step_count(step)
    }

    /// Tensor `index`'s local state in PyLO's layout (decay-last), sized by this rank's rows:
    /// [(name, shape, little-endian f32 bytes)].
    fn export_state<'py>(&self, py: Python<'py>, index: usize) -> PyResult<PyloTensors<'py>> {
        let state = self.model.state(index).map_err(to_py)?;
        Ok(pylo_tensors(py, state.to_pylo()))
    }

    /// Replaces tensor `index`'s local state from PyLO-layout tensors [(name, shape, f32
    /// bytes)] of this rank's rows.
    fn import_state(
        &mut self,
        index: usize,
        tensors: Vec<(String, Vec<usize>, Vec<u8>)>,
    ) -> PyResult<()> {
        let plan = self
            .model
            .plans()
            .get(index)
            .ok_or_else(|| PyValueError::new_err(format!("no tensor {index}")))?
            .clone();
        let name = self.model.params()[index].name.clone();
        let tensors = pylo_values(tensors)?;
        let state = TensorState::from_pylo(plan.local_layout(), self.model.step_count(), |n| {
            tensors
                .iter()
                .find(|t| t.0 == n)
                .map(|(_, shape, values)| (shape.clone(), values.clone()))
        })
        .map_err(|e| PyValueError::new_err(format!("state of `{name}`: {e}")))?;
        self.model.set_state(index, state).map_err(to_py)
    }
}

impl PyShardedGroup {
    /// Lengths against this rank's shards; addresses aligned; parameters overlapping nothing.
    fn check(&self, params: &[Buf], grads: &[Option<Buf>]) -> PyResult<()> {
        let names: Vec<String> = self.model.params().iter().map(|p| p.name.clone()).collect();
        if params.len() != self.numels.len() || grads.len() != self.numels.len() {
            return Err(PyValueError::new_err(format!(
                "{} parameters and {} gradients given; the group has {} tensors",
                params.len(),
                grads.len(),
                self.numels.len()
            )));
        }
        let mut bufs = Vec::new();
        for (i, (&(a, n), g)) in params.iter().zip(grads).enumerate() {
            if n != self.numels[i] {
                return Err(PyValueError::new_err(format!(
                    "parameter `{}`: {n} local values; this rank holds {} of it",
                    names[i], self.numels[i]
                )));
            }
            bufs.push((a, n, true));
            if let Some((ga, gn)) = g {
                if *gn != n {
                    return Err(PyValueError::new_err(format!(
                        "gradient of `{}`: {gn} local values, the parameter {n}",
                        names[i]
                    )));
                }
                bufs.push((*ga, *gn, false));
            }
        }
        // Indices of `bufs` name parameters and gradients in turn; name by parameter.
        let buf_names: Vec<String> = params
            .iter()
            .zip(grads)
            .enumerate()
            .flat_map(|(i, (_, g))| {
                let mut v = vec![names[i].clone()];
                if g.is_some() {
                    v.push(format!("gradient of {}", names[i]));
                }
                v
            })
            .collect();
        check_buffers(&bufs).map_err(|e| e.into_py_err("sharded step", &buf_names))
    }
}
