//! Resolving a Hub key in the local Hugging Face cache, exactly as the Hub client lays it out:
//! `<cache>/models--owner--name/refs/main` holds a revision, whose files are in
//! `<cache>/models--owner--name/snapshots/<revision>/`.

use crate::error::{Error, Result};
use std::path::PathBuf;

/// The Hub cache directory: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn hub_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(home) = std::env::var_os("HF_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home).join("hub");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache").join("huggingface").join("hub")
}

/// The snapshot directory of `owner/name` at `refs/main` in the local cache.
pub fn resolve_hub_snapshot(key: &str) -> Result<PathBuf> {
    let cache = hub_cache_dir();
    let repo = cache.join(format!("models--{}", key.replace('/', "--")));
    let how_to_get = format!(
        "download it with the Hub client (`huggingface-cli download {key}` or \
         `huggingface_hub.snapshot_download(\"{key}\")`), or pass `--weights DIR` with a directory \
         holding model.safetensors and config.json"
    );
    let refs_main = repo.join("refs").join("main");
    let revision = match std::fs::read_to_string(&refs_main) {
        Ok(text) => text.trim().to_string(),
        Err(_) => {
            return Err(Error::WeightsNotFound(format!(
            "Hub model {key} is not in the local Hugging Face cache (looked for {}); {how_to_get}",
            refs_main.display()
        )))
        }
    };
    if revision.is_empty() || revision.contains(['/', '\\']) || revision.starts_with('.') {
        return Err(Error::bad_file(
            &refs_main,
            format!("does not hold a revision hash (`{revision}`)"),
        ));
    }
    let snapshot = repo.join("snapshots").join(&revision);
    if !snapshot.join("model.safetensors").is_file() {
        return Err(Error::WeightsNotFound(format!(
            "Hub model {key}: the cache names revision {revision} but {} has no model.safetensors; {how_to_get}",
            snapshot.display()
        )));
    }
    Ok(snapshot)
}
