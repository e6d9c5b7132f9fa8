//! Checkpoints of a [`MuloOptimizer`]: one safetensors file.
//!
//! | content | key |
//! |---|---|
//! | every state buffer of every parameter, canonical layout, f32 | `{name}/{buffer}` (`mom`, `rms`, `fac_row`, `fac_col`, `fac_v`) |
//! | format version | metadata `format` = [`CHECKPOINT_FORMAT`] |
//! | step counter | metadata `step` |
//! | SHA-256 of the learned optimizer ([`LearnedOptimizer::fingerprint`](crate::lopt::LearnedOptimizer::fingerprint)) | metadata `lopt_fingerprint` |
//! | the parameters, in order | metadata `params`: JSON `[{"name": …, "shape": […], "factored_axes": [d0, d1] or null}, …]` |
//! | SHA-256 of the two above | metadata `fingerprint` |
//! | SHA-256 of every tensor's data bytes | metadata `tensor_sha256`: JSON `{"{name}/{buffer}": hex, …}` |
//! | SHA-256 of every other metadata entry (the step counter and `tensor_sha256` included), in key order, each key and value prefixed by its byte length as a little-endian u64 | metadata `checksum` |
//!
//! Loading checks all of it before anything is replaced, and refuses a checkpoint of another
//! learned optimizer or of other parameters (names, shapes, or factored axes: a tensor's
//! accumulators only mean something for the axes they were made with) with a message naming
//! what differs. The checksums make any change to the file that would be read (a flipped bit
//! in a tensor's data, an edited step counter) an error naming the tensor or the metadata;
//! they detect damage, they are not a signature (whoever can write the file can recompute
//! them). The values are then checked as every imported state is
//! ([`TensorState::validate`]: finite, accumulators ≥ 0, |mom| < 2^64), and only F32 tensors
//! are read (no other dtype is converted). The values are stored exactly, so resuming from a
//! checkpoint continues bitwise the same trajectory.
//!
//! Version 1 (`mulo-optimizer-checkpoint/1`, no checksums) is refused with a message naming
//! the version: its data cannot be verified, and reading it would accept the damage the
//! checksums are there to catch.

use super::MuloOptimizer;
use crate::error::{Error, Result};
use crate::ir::Buffer;
use crate::shape::FactoredAxes;
use crate::state::{check_values, TensorState};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// The metadata key holding the format version.
pub const CHECKPOINT_FORMAT_KEY: &str = "format";

/// The format version written (and the only one read).
pub const CHECKPOINT_FORMAT: &str = "mulo-optimizer-checkpoint/2";

/// The metadata key of the per-tensor data checksums.
const TENSOR_SHA256_KEY: &str = "tensor_sha256";

/// The metadata key of the checksum over every other metadata entry.
const CHECKSUM_KEY: &str = "checksum";

/// SHA-256 of every metadata entry but [`CHECKSUM_KEY`], in key order, each key and value
/// length-prefixed (so that no two different maps hash the same bytes).
fn metadata_checksum(meta: &HashMap<String, String>) -> String {
    let sorted: BTreeMap<&String, &String> =
        meta.iter().filter(|(k, _)| *k != CHECKSUM_KEY).collect();
    let mut h = Sha256::new();
    for (k, v) in sorted {
        for part in [k, v] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
    }
    hex(&h.finalize())
}

#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct ParamEntry {
    name: String,
    shape: Vec<usize>,
    /// `[d0, d1]`, or null for rank ≤ 1. Absent in checkpoints written before the axes could be
    /// chosen: those used the default (stable) order.
    #[serde(default)]
    factored_axes: Option<[usize; 2]>,
}

impl ParamEntry {
    /// The axes the checkpoint's state was made with.
    fn axes(&self) -> Option<FactoredAxes> {
        match self.factored_axes {
            Some([d0, d1]) => Some(FactoredAxes { d0, d1 }),
            None => FactoredAxes::stable(&self.shape),
        }
    }
}

fn combined_fingerprint(lopt: &str, params_json: &str) -> String {
    let mut h = Sha256::new();
    h.update(CHECKPOINT_FORMAT.as_bytes());
    h.update([0]);
    h.update(lopt.as_bytes());
    h.update([0]);
    h.update(params_json.as_bytes());
    hex(&h.finalize())
}

fn axes_text(axes: Option<FactoredAxes>) -> String {
    axes.map_or("none (rank ≤ 1)".to_string(), |f| {
        format!("(d0 = {}, d1 = {})", f.d0, f.d1)
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Little-endian f32s.
fn f32s(data: &[u8]) -> Vec<f32> {
    data.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn short(fp: &str) -> &str {
    &fp[..fp.len().min(16)]
}

impl MuloOptimizer {
    fn params_json(&self) -> String {
        let entries: Vec<ParamEntry> = self
            .specs
            .iter()
            .zip(&self.layouts)
            .map(|(p, layout)| ParamEntry {
                name: p.name.clone(),
                shape: p.shape.dims().to_vec(),
                factored_axes: layout.factored().map(|f| [f.d0, f.d1]),
            })
            .collect();
        serde_json::to_string(&entries).expect("parameter list serializes")
    }

    /// A fingerprint of the learned optimizer and the parameters (names, shapes and factored
    /// axes, in order):
    /// what a checkpoint must match to be loaded.
    pub fn fingerprint(&self) -> String {
        combined_fingerprint(&self.lopt_fingerprint, &self.params_json())
    }

    /// The checkpoint as safetensors bytes. Refused (naming the tensor) if a state breaks
    /// the rules every load checks ([`TensorState::validate`]): a checkpoint that could not be
    /// loaded back is never written.
    pub fn checkpoint_bytes(&self) -> Result<Vec<u8>> {
        self.check_usable()?;
        let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        let mut sums: BTreeMap<String, String> = BTreeMap::new();
        for (i, spec) in self.specs.iter().enumerate() {
            let state = self.backend.state(i)?;
            if state.step != self.step {
                return Err(Error::backend(
                    self.backend.target(),
                    format!(
                        "tensor `{}` is at step {}, the optimizer at {}",
                        spec.name, state.step, self.step
                    ),
                ));
            }
            for (buffer, values) in state.iter() {
                let key = format!("{}/{}", spec.name, buffer.name());
                check_values(buffer, values).map_err(|why| {
                    Error::backend(
                        self.backend.target(),
                        format!("cannot write a checkpoint: tensor `{key}` {why}"),
                    )
                })?;
                let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                sums.insert(key.clone(), hex(&Sha256::digest(&bytes)));
                data.push((key, buffer.shape(&self.layouts[i]), bytes));
            }
        }
        let views: BTreeMap<String, TensorView> = data
            .iter()
            .map(|(k, shape, bytes)| {
                let view = TensorView::new(Dtype::F32, shape.clone(), bytes)
                    .expect("shape and byte length agree by construction");
                (k.clone(), view)
            })
            .collect();
        let params = self.params_json();
        let mut metadata: HashMap<String, String> = [
            (CHECKPOINT_FORMAT_KEY, CHECKPOINT_FORMAT.to_string()),
            ("step", self.step.to_string()),
            ("lopt_fingerprint", self.lopt_fingerprint.clone()),
            ("fingerprint", self.fingerprint()),
            ("params", params),
            ("target", self.backend.target().to_string()),
            (
                TENSOR_SHA256_KEY,
                serde_json::to_string(&sums).expect("a string map serializes"),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let checksum = metadata_checksum(&metadata);
        metadata.insert(CHECKSUM_KEY.to_string(), checksum);
        safetensors::serialize(&views, Some(metadata))
            .map_err(|e| Error::backend_from("safetensors", "cannot serialize the checkpoint", e))
    }

    /// Writes the checkpoint to `path` atomically ([`write_atomic`](crate::fsio::write_atomic)):
    /// a crash or a full disk part-way through leaves the previous checkpoint at `path` intact.
    pub fn save_checkpoint(&self, path: &Path) -> Result<()> {
        let bytes = self.checkpoint_bytes()?;
        crate::fsio::write_atomic(path, &bytes)
    }

    /// Loads a checkpoint written by [`save_checkpoint`](Self::save_checkpoint): the step
    /// counter and every tensor's state. Refused, with nothing changed, when it was made for
    /// another learned optimizer or other parameters, when its metadata or a tensor's data
    /// does not match its checksum (naming the tensor), or when a state breaks the rules of
    /// [`TensorState::validate`].
    pub fn load_checkpoint(&mut self, path: &Path) -> Result<()> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        self.restore_checkpoint(&bytes, path)
    }

    /// Loads a checkpoint from bytes; `origin` names it in errors.
    pub fn restore_checkpoint(&mut self, bytes: &[u8], origin: &Path) -> Result<()> {
        let bad = |reason: String| Error::bad_file(origin, reason);
        let (_, header) = SafeTensors::read_metadata(bytes)
            .map_err(|e| Error::bad_file_from(origin, "not a valid safetensors file", e))?;
        let tensors = SafeTensors::deserialize(bytes)
            .map_err(|e| Error::bad_file_from(origin, "not a valid safetensors file", e))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let field = |key: &str| -> Result<&String> {
            meta.get(key).ok_or_else(|| {
                bad(format!(
                    "metadata `{key}` is missing: not a mulo optimizer checkpoint"
                ))
            })
        };
        let format = field(CHECKPOINT_FORMAT_KEY)?;
        if format != CHECKPOINT_FORMAT {
            let why = if format == "mulo-optimizer-checkpoint/1" {
                ": version 1 has no checksum of its data, so its values cannot be verified; \
                 resume from a checkpoint saved by this version"
            } else {
                ""
            };
            return Err(bad(format!(
                "checkpoint format version `{format}` is not supported (this mulo reads \
                 `{CHECKPOINT_FORMAT}`){why}"
            )));
        }
        // Everything below is read from the metadata: check it is what was written first.
        let checksum = field(CHECKSUM_KEY)?;
        if checksum != &metadata_checksum(&meta) {
            return Err(bad(format!(
                "the metadata does not match its `{CHECKSUM_KEY}` (step counter, parameters or \
                 tensor checksums): the file was altered or damaged"
            )));
        }
        let lopt = field("lopt_fingerprint")?;
        if lopt != &self.lopt_fingerprint {
            return Err(bad(format!(
                "the checkpoint was made for another learned optimizer (fingerprint {}…), this \
                 optimizer uses {}… (other meta-network weights or meta-parameters)",
                short(lopt),
                short(&self.lopt_fingerprint)
            )));
        }
        let params_json = field("params")?;
        let entries: Vec<ParamEntry> = serde_json::from_str(params_json).map_err(|e| {
            bad(format!(
                "metadata `params` is not a valid parameter list: {e}"
            ))
        })?;
        self.check_param_list(&entries).map_err(bad)?;
        let fingerprint = field("fingerprint")?;
        if fingerprint != &combined_fingerprint(lopt, params_json) {
            return Err(bad(
                "metadata `fingerprint` does not match its optimizer and parameters: the file \
                 was altered"
                    .to_string(),
            ));
        }
        let step: u64 = field("step")?.parse().map_err(|_| {
            bad(format!(
                "metadata `step` = `{}` is not a step count (an integer from 0 to {})",
                meta["step"],
                u64::MAX
            ))
        })?;
        let sums: BTreeMap<String, String> = serde_json::from_str(field(TENSOR_SHA256_KEY)?)
            .map_err(|e| {
                bad(format!(
                    "metadata `{TENSOR_SHA256_KEY}` is not a map of tensor checksums: {e}"
                ))
            })?;

        let mut states = Vec::with_capacity(self.specs.len());
        for (spec, layout) in self.specs.iter().zip(&self.layouts) {
            let mut state = TensorState::zeros(layout, step);
            for buffer in Buffer::state_for_layout(layout) {
                let key = format!("{}/{}", spec.name, buffer.name());
                let view = tensors
                    .tensor(&key)
                    .map_err(|_| bad(format!("tensor `{key}` is missing")))?;
                let want = buffer.shape(layout);
                if view.dtype() != Dtype::F32 {
                    return Err(bad(format!(
                        "tensor `{key}` has dtype {:?}; a checkpoint holds F32 only (other \
                         dtypes are not converted)",
                        view.dtype()
                    )));
                }
                if view.shape() != want.as_slice() {
                    return Err(bad(format!(
                        "tensor `{key}` has shape {:?}; expected {want:?}",
                        view.shape()
                    )));
                }
                let sum = sums.get(&key).ok_or_else(|| {
                    bad(format!(
                        "tensor `{key}` has no checksum in metadata `{TENSOR_SHA256_KEY}`"
                    ))
                })?;
                if sum != &hex(&Sha256::digest(view.data())) {
                    return Err(bad(format!(
                        "tensor `{key}`: its data does not match its checksum (a flipped bit or \
                         an edit): the checkpoint is damaged or altered"
                    )));
                }
                let values = f32s(view.data());
                check_values(buffer, &values).map_err(|why| {
                    bad(format!("tensor `{key}` {why}: the checkpoint is corrupt"))
                })?;
                state.set(buffer, values)?;
            }
            states.push(state);
        }
        // Every tensor of the file is one of the state's (an extra one would go unread).
        let expected: usize = self
            .layouts
            .iter()
            .map(|l| Buffer::state_for_layout(l).len())
            .sum();
        if tensors.len() != expected || sums.len() != expected {
            let extra = tensors
                .names()
                .into_iter()
                .chain(sums.keys().map(String::as_str))
                .find(|k| {
                    !self.specs.iter().zip(&self.layouts).any(|(p, l)| {
                        Buffer::state_for_layout(l)
                            .into_iter()
                            .any(|b| *k == format!("{}/{}", p.name, b.name()))
                    })
                })
                .map_or_else(String::new, |k| format!(" (`{k}`)"));
            return Err(bad(format!(
                "the checkpoint holds {} tensors and {} checksums, this optimizer's state {expected}: \
                 it holds a tensor that is not part of it{extra}",
                tensors.len(),
                sums.len()
            )));
        }
        self.replace_states(states.into_iter().enumerate().collect())?;
        self.step = step;
        self.poisoned = None;
        Ok(())
    }

    /// Imports a whole model's PyLO `AdafacLO_naive` state from a safetensors file: for every
    /// parameter `name` and PyLO buffer `buf` (`mom`, `rms`, `fac_vec_row`, `fac_vec_col`,
    /// `fac_vec_v`), the decay-last tensor `key(name, buf)`. `step` is PyLO's parameter-group
    /// step counter; it becomes the optimizer's. Every tensor is read and checked before any
    /// state is replaced: F32 only (another dtype is refused, naming the key, never
    /// converted), and values as [`TensorState::validate`] requires.
    ///
    /// From PyTorch, such a file is written by
    /// `safetensors.torch.save_file({f"{n}.{k}": v.contiguous() for n, p in model.named_parameters()
    /// for k, v in opt.state[p].items() if torch.is_tensor(v) and v.dim() > 0}, path)` and read
    /// with `key = |n, b| format!("{n}.{b}")`.
    pub fn import_pylo_file(
        &mut self,
        path: &Path,
        step: u64,
        key: impl Fn(&str, &str) -> String,
    ) -> Result<()> {
        self.check_usable()?;
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let tensors = SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::bad_file_from(path, "not a valid safetensors file", e))?;
        let mut states = Vec::with_capacity(self.specs.len());
        for (spec, layout) in self.specs.iter().zip(&self.layouts) {
            let mut error = None;
            let state = TensorState::from_pylo(layout, step, |buf| {
                let k = key(&spec.name, buf);
                let view = tensors.tensor(&k).ok()?;
                if view.dtype() != Dtype::F32 {
                    error = Some(format!(
                        "tensor `{k}` has dtype {:?}; a PyLO state is read as F32 only (other \
                         dtypes are not converted)",
                        view.dtype()
                    ));
                    return None;
                }
                let values = f32s(view.data());
                // Checked here too (from_pylo checks again) to name the file's key.
                let buffer = Buffer::state_for_layout(layout)
                    .into_iter()
                    .find(|b| crate::state::pylo_name(*b) == buf);
                if let Some(Err(why)) = buffer.map(|b| check_values(b, &values)) {
                    error = Some(format!("tensor `{k}` {why}"));
                    return None;
                }
                Some((view.shape().to_vec(), values))
            });
            if let Some(reason) = error {
                return Err(Error::bad_file(path, reason));
            }
            let state = state.map_err(|e| {
                Error::bad_file(
                    path,
                    format!(
                        "parameter `{}` (keys like `{}`): {e}",
                        spec.name,
                        key(&spec.name, "mom")
                    ),
                )
            })?;
            states.push(state);
        }
        self.replace_states(states.into_iter().enumerate().collect())?;
        self.step = step;
        Ok(())
    }

    /// Compares a checkpoint's parameter list with this optimizer's, naming what differs
    /// (states are matched by name, so the order may differ).
    fn check_param_list(&self, entries: &[ParamEntry]) -> std::result::Result<(), String> {
        let mine: HashMap<&str, &[usize]> = self
            .specs
            .iter()
            .map(|p| (p.name.as_str(), p.shape.dims()))
            .collect();
        let theirs: HashMap<&str, &ParamEntry> =
            entries.iter().map(|e| (e.name.as_str(), e)).collect();
        let mut problems = Vec::new();
        for (p, layout) in self.specs.iter().zip(&self.layouts) {
            match theirs.get(p.name.as_str()) {
                None => problems.push(format!("parameter `{}` is not in the checkpoint", p.name)),
                Some(e) if e.shape != p.shape.dims() => problems.push(format!(
                    "parameter `{}` has shape {:?} in the checkpoint but {:?} here",
                    p.name,
                    e.shape,
                    p.shape.dims()
                )),
                Some(e) if e.axes() != layout.factored() => problems.push(format!(
                    "parameter `{}` has factored axes {} in the checkpoint but {} here",
                    p.name,
                    axes_text(e.axes()),
                    axes_text(layout.factored())
                )),
                _ => {}
            }
        }
        for e in entries {
            if !mine.contains_key(e.name.as_str()) {
                problems.push(format!(
                    "the checkpoint has parameter `{}` (shape {:?}) that this optimizer does not",
                    e.name, e.shape
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "the checkpoint was made for other parameters: {}",
                problems.join("; ")
            ))
        }
    }
}
