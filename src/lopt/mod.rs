//! The learned optimizer: its meta-network and meta-parameters, and where they come from
//! (a Hub key resolved in the local Hugging Face cache or, with the `hub` feature, downloaded
//! into it on first use; a directory in the Hub layout; a `.safetensors` file; or the bundled
//! demo network).

pub mod demo;
mod hub;
mod meta;
mod network;

#[cfg(feature = "hub")]
pub use hub::download_hub_snapshot;
pub use hub::{
    hub_cache_dir, hub_offline_from_env, resolve_hub_snapshot, resolve_hub_snapshot_at,
    DEFAULT_REVISION,
};
pub use meta::{MetaParams, Rule};
pub use network::{read_config, Dense, MetaNetwork, NetworkConfig, INPUT_SIZE, OUTPUT_SIZE};

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// The Hub key of the trained μLO_M.
pub const DEFAULT_HUB_KEY: &str = "btherien/mulo";

/// The Hub key of the trained ELO (PyLO's `ELO_naive` default `hf_key`).
pub const ELO_HUB_KEY: &str = "DiamondXL/elo";

/// Where a learned optimizer's weights came from (printed by the CLI, kept in manifests).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WeightsOrigin {
    /// A Hub key resolved in the local Hugging Face cache, with the snapshot directory used.
    Hub {
        /// `owner/name`.
        key: String,
        /// The snapshot directory.
        snapshot: PathBuf,
    },
    /// A Hub key that was not in the local cache and was downloaded into it, with the snapshot
    /// directory used.
    HubDownloaded {
        /// `owner/name`.
        key: String,
        /// The snapshot directory.
        snapshot: PathBuf,
    },
    /// A directory in the Hub layout.
    Directory(PathBuf),
    /// A `.safetensors` file.
    File(PathBuf),
    /// The bundled demo network: NOT the trained μLO_M.
    Demo,
}

impl std::fmt::Display for WeightsOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WeightsOrigin::Hub { key, snapshot } => {
                write!(
                    f,
                    "Hub model {key} from the local cache ({})",
                    snapshot.display()
                )
            }
            WeightsOrigin::HubDownloaded { key, snapshot } => {
                write!(
                    f,
                    "Hub model {key}, downloaded into the local cache ({})",
                    snapshot.display()
                )
            }
            WeightsOrigin::Directory(dir) => write!(f, "given directory {}", dir.display()),
            WeightsOrigin::File(file) => write!(f, "given file {}", file.display()),
            WeightsOrigin::Demo => write!(
                f,
                "bundled DEMO meta-network (hand-built Adam-like rule, not the trained μLO_M)"
            ),
        }
    }
}

/// A learned optimizer ready to be compiled: meta-network plus meta-parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct LearnedOptimizer {
    /// The MLP.
    pub network: MetaNetwork,
    /// Decays and output scales.
    pub meta: MetaParams,
    /// Where the weights came from.
    pub origin: WeightsOrigin,
}

impl LearnedOptimizer {
    /// A learned optimizer from a network and meta-parameters, both validated.
    pub fn new(network: MetaNetwork, meta: MetaParams, origin: WeightsOrigin) -> Result<Self> {
        network
            .validate()
            .map_err(|reason| Error::argument("network", reason))?;
        meta.validate()
            .map_err(|reason| Error::argument("meta", reason))?;
        Ok(LearnedOptimizer {
            network,
            meta,
            origin,
        })
    }

    /// The bundled demo network with μLO_M's meta-parameters.
    pub fn demo() -> Self {
        LearnedOptimizer {
            network: demo::demo_network(),
            meta: MetaParams::default(),
            origin: WeightsOrigin::Demo,
        }
    }

    /// Loads from what the user wrote after `--weights`: an existing directory (Hub layout), an
    /// existing file (`.safetensors`), or a Hub key `owner/name` looked up in the local cache.
    pub fn load(spec: &str) -> Result<Self> {
        let path = Path::new(spec);
        if path.is_dir() {
            Self::from_dir(path)
        } else if path.is_file() {
            Self::from_file(path)
        } else if looks_like_hub_key(spec) {
            Self::from_hub_cache(spec)
        } else {
            Err(Error::WeightsNotFound(format!(
                "--weights `{spec}`: no such file or directory, and not a Hub key of the form owner/name"
            )))
        }
    }

    /// Loads the weights the CLI uses when none are named: `btherien/mulo` from the Hub cache if
    /// it is there, else the bundled demo network.
    pub fn load_default() -> Self {
        Self::from_hub_cache(DEFAULT_HUB_KEY).unwrap_or_else(|_| Self::demo())
    }

    /// Loads a directory in the Hub layout (`model.safetensors` + `config.json`), checking that
    /// the config agrees with the tensors.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let model = dir.join("model.safetensors");
        if !model.is_file() {
            return Err(Error::bad_file(
                dir,
                "no model.safetensors in this directory (expected the Hub layout: model.safetensors + config.json)",
            ));
        }
        let network = MetaNetwork::from_safetensors_file(&model)?;
        let config_path = dir.join("config.json");
        if config_path.is_file() {
            let config = read_config(&config_path)?;
            let actual = network.config();
            if config != actual {
                return Err(Error::bad_file(
                    &config_path,
                    format!(
                        "config says input_size {}, hidden_size {}, hidden_layers {} but model.safetensors holds input_size {}, hidden_size {}, hidden_layers {}",
                        config.input_size,
                        config.hidden_size,
                        config.hidden_layers,
                        actual.input_size,
                        actual.hidden_size,
                        actual.hidden_layers
                    ),
                ));
            }
        }
        Ok(LearnedOptimizer {
            network,
            meta: MetaParams::default(),
            origin: WeightsOrigin::Directory(dir.to_path_buf()),
        })
    }

    /// Loads a `.safetensors` file; the architecture is inferred from the tensor shapes.
    pub fn from_file(file: &Path) -> Result<Self> {
        Ok(LearnedOptimizer {
            network: MetaNetwork::from_safetensors_file(file)?,
            meta: MetaParams::default(),
            origin: WeightsOrigin::File(file.to_path_buf()),
        })
    }

    /// Loads a Hub key from the local Hugging Face cache (never from the network).
    pub fn from_hub_cache(key: &str) -> Result<Self> {
        Self::from_hub_cache_at(key, DEFAULT_REVISION)
    }

    /// Loads a Hub key at `revision` (branch, tag or commit hash) from the local Hugging Face
    /// cache (never from the network).
    pub fn from_hub_cache_at(key: &str, revision: &str) -> Result<Self> {
        let snapshot = resolve_hub_snapshot_at(key, revision)?;
        let mut lopt = Self::from_dir(&snapshot)?;
        lopt.origin = WeightsOrigin::Hub {
            key: key.to_string(),
            snapshot,
        };
        Ok(lopt)
    }

    /// Loads a Hub key at `revision` from the local Hugging Face cache and, when it is not
    /// there and `offline` is false and `HF_HUB_OFFLINE` is unset, downloads it into the cache
    /// first (see `download_hub_snapshot`, feature `hub`, for what is honored and what a failure
    /// leaves).
    /// Offline with nothing cached, the error is the cache's. Built without the `hub` feature,
    /// this is [`LearnedOptimizer::from_hub_cache_at`].
    pub fn from_hub(key: &str, revision: &str, offline: bool) -> Result<Self> {
        #[cfg(not(feature = "hub"))]
        {
            let _ = offline;
            Self::from_hub_cache_at(key, revision)
        }
        #[cfg(feature = "hub")]
        match Self::from_hub_cache_at(key, revision) {
            Err(Error::WeightsNotFound(_)) if !offline && !hub_offline_from_env() => {
                let snapshot = download_hub_snapshot(key, revision)?;
                let mut lopt = Self::from_dir(&snapshot)?;
                lopt.origin = WeightsOrigin::HubDownloaded {
                    key: key.to_string(),
                    snapshot,
                };
                Ok(lopt)
            }
            other => other,
        }
    }

    /// As [`LearnedOptimizer::load`], but a Hub key not in the cache is downloaded (unless
    /// `offline` or `HF_HUB_OFFLINE`), at `revision` (see [`LearnedOptimizer::from_hub`]).
    pub fn load_or_download(spec: &str, revision: &str, offline: bool) -> Result<Self> {
        let path = Path::new(spec);
        if !path.exists() && looks_like_hub_key(spec) {
            Self::from_hub(spec, revision, offline)
        } else {
            Self::load(spec)
        }
    }

    /// Replaces the meta-parameters with those of a JSON file (fields left out keep μLO_M's).
    pub fn with_meta_file(mut self, path: &Path) -> Result<Self> {
        self.meta = MetaParams::from_json_file(path)?;
        Ok(self)
    }

    /// The same network with `rule`'s default meta-parameters (ELO: its raw decays; μLO_M: its
    /// reparameterized ones). Apply before [`Self::with_meta_file`], which replaces them all.
    pub fn with_rule(mut self, rule: Rule) -> Self {
        self.meta = MetaParams::for_rule(rule);
        self
    }

    /// Which learned optimizer's step this is.
    pub fn rule(&self) -> Rule {
        self.meta.rule
    }

    /// Whether this is the bundled demo network rather than real learned weights.
    pub fn is_demo(&self) -> bool {
        self.origin == WeightsOrigin::Demo
    }

    /// SHA-256 of the network and the meta-parameters: identical for identical optimizers.
    pub fn fingerprint(&self) -> String {
        let meta = serde_json::to_vec(&self.meta).expect("meta-parameters serialize");
        crate::digest::sha256_hex([self.network.fingerprint().as_bytes(), meta.as_slice()])
    }
}

/// `owner/name`: exactly one slash, both sides non-empty, no path-like pieces.
fn looks_like_hub_key(spec: &str) -> bool {
    let mut parts = spec.split('/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(owner), Some(name), None) => {
            let ok = |s: &str| {
                !s.is_empty()
                    && s != "."
                    && s != ".."
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            };
            ok(owner) && ok(name)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_keys_are_recognized() {
        assert!(looks_like_hub_key("btherien/mulo"));
        assert!(looks_like_hub_key("a-b/c_d.e"));
        assert!(!looks_like_hub_key("./x"));
        assert!(!looks_like_hub_key("a/b/c"));
        assert!(!looks_like_hub_key("mulo"));
        assert!(!looks_like_hub_key("/abs"));
    }
}
