//! The meta-network (an MLP in PyTorch `Linear` layout) and its Hub file format (SPEC.md §1).

use crate::digest::{f32_bytes, sha256_hex};
use crate::error::{Error, Result};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Number of inputs the step feeds the network: 28 normalized features and 11 time features.
pub const INPUT_SIZE: usize = 39;
/// Number of outputs: direction and magnitude.
pub const OUTPUT_SIZE: usize = 2;

/// One dense layer, `y = W x + b`, with `W` row-major `[outputs, inputs]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Dense {
    /// Number of outputs (rows of `weight`).
    pub outputs: usize,
    /// Number of inputs (columns of `weight`).
    pub inputs: usize,
    /// Row-major `[outputs, inputs]`.
    pub weight: Vec<f32>,
    /// `[outputs]`.
    pub bias: Vec<f32>,
}

impl Dense {
    /// Weight of output `o` from input `i`.
    pub fn w(&self, o: usize, i: usize) -> f32 {
        self.weight[o * self.inputs + i]
    }
}

/// `config.json` of the Hub layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkConfig {
    /// Inputs of the first layer (39 for μLO_M).
    pub input_size: usize,
    /// Width of every hidden layer.
    pub hidden_size: usize,
    /// Number of hidden `H → H` layers after the input layer.
    pub hidden_layers: usize,
}

/// The meta-network: input layer, hidden layers (each followed by ReLU), output layer.
#[derive(Clone, Debug, PartialEq)]
pub struct MetaNetwork {
    /// All layers in order: input, `linear_0..linear_{L-1}`, output. ReLU follows all but the last.
    pub layers: Vec<Dense>,
}

/// The tensor names of the Hub layout for `hidden_layers` hidden layers, in network order.
fn layer_names(hidden_layers: usize) -> Vec<String> {
    std::iter::once("network.input".to_string())
        .chain((0..hidden_layers).map(|k| format!("network.linear_{k}")))
        .chain(std::iter::once("network.output".to_string()))
        .collect()
}

impl MetaNetwork {
    /// The architecture of this network.
    pub fn config(&self) -> NetworkConfig {
        NetworkConfig {
            input_size: self.layers[0].inputs,
            hidden_size: self.layers[0].outputs,
            hidden_layers: self.layers.len() - 2,
        }
    }

    /// Number of multiply-adds per element of the whole MLP.
    pub fn multiply_adds(&self) -> usize {
        self.layers.iter().map(|l| l.inputs * l.outputs).sum()
    }

    /// Reads `model.safetensors`, inferring the architecture from the tensor shapes.
    pub fn from_safetensors_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_safetensors_bytes(&bytes, path)
    }

    /// Parses safetensors bytes; `path` is only used to name the file in errors.
    pub fn from_safetensors_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let tensors = SafeTensors::deserialize(bytes)
            .map_err(|e| Error::bad_file_from(path, "not a valid safetensors file", e))?;
        let names: Vec<String> = tensors.names().into_iter().map(str::to_string).collect();
        let mut hidden_layers = 0;
        while names.contains(&format!("network.linear_{hidden_layers}.weight")) {
            hidden_layers += 1;
        }
        let expected = layer_names(hidden_layers);
        for name in &names {
            let known = expected
                .iter()
                .any(|l| *name == format!("{l}.weight") || *name == format!("{l}.bias"));
            if !known {
                return Err(Error::bad_file(
                    path,
                    format!(
                        "unexpected tensor `{name}` (expected {}.weight/.bias, with linear_k numbered from 0 without gaps)",
                        expected.join(".weight/.bias, ")
                    ),
                ));
            }
        }
        let mut layers = Vec::with_capacity(expected.len());
        for layer in &expected {
            let weight_name = format!("{layer}.weight");
            let bias_name = format!("{layer}.bias");
            let (wshape, weight) = read_f32(&tensors, &weight_name, path)?;
            let (bshape, bias) = read_f32(&tensors, &bias_name, path)?;
            if wshape.len() != 2 {
                return Err(Error::bad_file(
                    path,
                    format!("tensor `{weight_name}` has shape {wshape:?}, expected 2 dimensions [outputs, inputs]"),
                ));
            }
            if bshape != [wshape[0]] {
                return Err(Error::bad_file(
                    path,
                    format!(
                        "tensor `{bias_name}` has shape {bshape:?}, expected [{}] to match `{weight_name}` {wshape:?}",
                        wshape[0]
                    ),
                ));
            }
            layers.push(Dense {
                outputs: wshape[0],
                inputs: wshape[1],
                weight,
                bias,
            });
        }
        let net = MetaNetwork { layers };
        net.validate()
            .map_err(|reason| Error::bad_file(path, reason))?;
        Ok(net)
    }

    /// Checks the architecture: 39 inputs, equal hidden widths, chained layers, 2 outputs.
    pub fn validate(&self) -> Result<(), String> {
        let names = layer_names(self.layers.len().saturating_sub(2));
        if self.layers.len() < 2 {
            return Err("the network needs at least an input and an output layer".into());
        }
        let first = &self.layers[0];
        if first.inputs != INPUT_SIZE {
            return Err(format!(
                "tensor `network.input.weight` has {} inputs; the μLO step feeds exactly {INPUT_SIZE} (28 features + 11 time features)",
                first.inputs
            ));
        }
        let hidden = first.outputs;
        if hidden == 0 {
            return Err("tensor `network.input.weight` has 0 outputs".into());
        }
        for (k, layer) in self.layers.iter().enumerate().skip(1) {
            let want_out = if k + 1 == self.layers.len() {
                OUTPUT_SIZE
            } else {
                hidden
            };
            if layer.inputs != hidden || layer.outputs != want_out {
                return Err(format!(
                    "tensor `{}.weight` has shape [{}, {}], expected [{want_out}, {hidden}]",
                    names[k], layer.outputs, layer.inputs
                ));
            }
        }
        for (k, layer) in self.layers.iter().enumerate() {
            for (what, values) in [("weight", &layer.weight), ("bias", &layer.bias)] {
                if let Some(pos) = values.iter().position(|v| !v.is_finite()) {
                    return Err(format!(
                        "tensor `{}.{what}` holds a non-finite value ({}) at flat index {pos}",
                        names[k], values[pos]
                    ));
                }
            }
        }
        Ok(())
    }

    /// Serializes in the Hub layout's `model.safetensors` format.
    pub fn to_safetensors_bytes(&self) -> Vec<u8> {
        let names = layer_names(self.layers.len() - 2);
        let mut buffers: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (layer, name) in self.layers.iter().zip(&names) {
            buffers.push((
                format!("{name}.weight"),
                vec![layer.outputs, layer.inputs],
                f32_bytes(&layer.weight),
            ));
            buffers.push((
                format!("{name}.bias"),
                vec![layer.outputs],
                f32_bytes(&layer.bias),
            ));
        }
        let views: BTreeMap<String, TensorView> = buffers
            .iter()
            .map(|(name, shape, data)| {
                let view = TensorView::new(Dtype::F32, shape.clone(), data)
                    .expect("shape and byte length agree by construction");
                (name.clone(), view)
            })
            .collect();
        safetensors::serialize(&views, None).expect("serializing in-memory f32 tensors cannot fail")
    }

    /// Writes `model.safetensors` and `config.json` into `dir` (created if missing).
    pub fn save_hub_layout(&self, dir: &Path) -> Result<()> {
        crate::fsio::create_dir_all(dir)?;
        let model = dir.join("model.safetensors");
        crate::fsio::write_atomic(&model, &self.to_safetensors_bytes())?;
        let config = dir.join("config.json");
        let text = serde_json::to_string_pretty(&self.config()).expect("config serializes") + "\n";
        crate::fsio::write_atomic(&config, text.as_bytes())?;
        Ok(())
    }

    /// SHA-256 over the architecture and every weight, in network order: identifies the network
    /// in cache keys and checkpoint fingerprints.
    pub fn fingerprint(&self) -> String {
        let mut bytes = Vec::new();
        for layer in &self.layers {
            bytes.extend_from_slice(&(layer.outputs as u64).to_le_bytes());
            bytes.extend_from_slice(&(layer.inputs as u64).to_le_bytes());
            bytes.extend(f32_bytes(&layer.weight));
            bytes.extend(f32_bytes(&layer.bias));
        }
        sha256_hex([bytes.as_slice()])
    }
}

/// Reads `config.json` of the Hub layout.
pub fn read_config(path: &Path) -> Result<NetworkConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| {
        Error::bad_file(
            path,
            format!(
                "expected {{\"input_size\": I, \"hidden_size\": H, \"hidden_layers\": L}}: {e}"
            ),
        )
    })
}

fn read_f32(tensors: &SafeTensors, name: &str, path: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    let view = tensors
        .tensor(name)
        .map_err(|_| Error::bad_file(path, format!("missing tensor `{name}`")))?;
    if view.dtype() != Dtype::F32 {
        return Err(Error::bad_file(
            path,
            format!("tensor `{name}` has dtype {:?}, expected F32", view.dtype()),
        ));
    }
    let values = view
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok((view.shape().to_vec(), values))
}
