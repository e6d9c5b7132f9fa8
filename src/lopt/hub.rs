//! Hub weights: resolving a key in the local Hugging Face cache, exactly as the Hub client lays
//! it out (`<cache>/models--owner--name/refs/<revision>` holds a commit, whose files are in
//! `<cache>/models--owner--name/snapshots/<commit>/`), and, with the `hub` feature, downloading
//! a key into that same layout on first use (hf-hub's blocking client).

use crate::error::{Error, Result};
use std::path::PathBuf;

/// The revision used when none is named: the Hub's default branch.
pub const DEFAULT_REVISION: &str = "main";

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

/// Whether `HF_HUB_OFFLINE` forbids network access: `1`, `true`, `yes` or `on` (any case), the
/// values huggingface_hub accepts.
pub fn hub_offline_from_env() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

/// The snapshot directory of `owner/name` at `refs/main` in the local cache.
pub fn resolve_hub_snapshot(key: &str) -> Result<PathBuf> {
    resolve_hub_snapshot_at(key, DEFAULT_REVISION)
}

/// The cache directory of one model repository: `<cache>/models--owner--name`.
fn repo_dir(key: &str) -> PathBuf {
    hub_cache_dir().join(format!("models--{}", key.replace('/', "--")))
}

/// A revision is a branch or tag (looked up under `refs/`, which may nest, as `pr/1`) or a
/// commit hash; either way it becomes a path inside the cache, so nothing that climbs out.
fn check_revision(revision: &str) -> Result<()> {
    let bad = revision.is_empty()
        || revision.starts_with('/')
        || revision.contains('\\')
        || revision
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..");
    if bad {
        return Err(Error::argument(
            "revision",
            format!("`{revision}` is not a branch, tag or commit hash"),
        ));
    }
    Ok(())
}

fn is_commit_hash(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The snapshot directory of `owner/name` at `revision` (a branch or tag named under `refs/`,
/// or a commit hash) in the local cache; never touches the network.
pub fn resolve_hub_snapshot_at(key: &str, revision: &str) -> Result<PathBuf> {
    check_revision(revision)?;
    let repo = repo_dir(key);
    let how_to_get = format!(
        "download it with the Hub client (`huggingface-cli download {key}` or \
         `huggingface_hub.snapshot_download(\"{key}\")`), or pass `--weights DIR` with a directory \
         holding model.safetensors and config.json"
    );
    let ref_path = repo.join("refs").join(revision);
    let commit = match std::fs::read_to_string(&ref_path) {
        Ok(text) => text.trim().to_string(),
        // A commit hash needs no ref: the Hub client stores it under snapshots/ directly.
        Err(_) if is_commit_hash(revision) && repo.join("snapshots").join(revision).is_dir() => {
            revision.to_string()
        }
        Err(_) => {
            return Err(Error::WeightsNotFound(format!(
            "Hub model {key} is not in the local Hugging Face cache (looked for {}); {how_to_get}",
            ref_path.display()
        )))
        }
    };
    if commit.is_empty() || commit.contains(['/', '\\']) || commit.starts_with('.') {
        return Err(Error::bad_file(
            &ref_path,
            format!("does not hold a revision hash (`{commit}`)"),
        ));
    }
    let snapshot = repo.join("snapshots").join(&commit);
    if !snapshot.join("model.safetensors").is_file() {
        return Err(Error::WeightsNotFound(format!(
            "Hub model {key}: the cache names revision {commit} but {} has no model.safetensors; {how_to_get}",
            snapshot.display()
        )));
    }
    Ok(snapshot)
}

/// Seconds a whole first-use download may take: for each of its 2 files,
/// `$HF_HUB_ETAG_TIMEOUT` + `$HF_HUB_DOWNLOAD_TIMEOUT` (10 each by default), as mulo's Python
/// side bounds it.
///
/// hf-hub's client sets no read timeout and its builder takes none, so a server that accepts the
/// connection and never answers would block forever; mulo bounds the whole download instead
/// (μLO_M's files are a few kilobytes).
#[cfg(feature = "hub")]
fn download_timeout() -> Result<std::time::Duration> {
    let seconds = |name: &str| -> Result<f64> {
        match std::env::var(name) {
            Err(_) => Ok(10.0),
            Ok(text) => match text.trim().parse::<f64>() {
                Ok(s) if s.is_finite() && s > 0.0 => Ok(s),
                _ => Err(Error::argument(
                    name,
                    format!("`{text}` is not a number of seconds > 0"),
                )),
            },
        }
    };
    let per_file = seconds("HF_HUB_ETAG_TIMEOUT")? + seconds("HF_HUB_DOWNLOAD_TIMEOUT")?;
    Ok(std::time::Duration::from_secs_f64(2.0 * per_file))
}

/// The endpoint: `$HF_ENDPOINT` (without a trailing slash, which would double the one hf-hub
/// adds), else the Hub.
#[cfg(feature = "hub")]
fn endpoint() -> String {
    std::env::var("HF_ENDPOINT")
        .ok()
        .map(|e| e.trim().trim_end_matches('/').to_string())
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| "https://huggingface.co".to_string())
}

/// The files in a repository's `blobs/` directory.
#[cfg(feature = "hub")]
fn blob_files(repo: &std::path::Path) -> Vec<PathBuf> {
    std::fs::read_dir(repo.join("blobs"))
        .map(|dir| dir.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}

/// After a failed download: removes what hf-hub left that was not there before (its `.part`
/// download in progress and `.lock` file, then the directories it made if they are empty),
/// so the cache is as it was.
#[cfg(feature = "hub")]
fn clean_up_after_failure(repo: &std::path::Path, repo_existed: bool, blobs_before: &[PathBuf]) {
    for file in blob_files(repo) {
        let leftover = file.extension().is_some_and(|x| x == "part" || x == "lock");
        if leftover && !blobs_before.contains(&file) {
            let _ = std::fs::remove_file(file);
        }
    }
    if !repo_existed {
        // remove_dir, not remove_dir_all: a directory that holds anything is kept.
        let _ = std::fs::remove_dir(repo.join("blobs"));
        let _ = std::fs::remove_dir(repo);
    }
}

/// Downloads `model.safetensors` and `config.json` of `owner/name` at `revision` into the local
/// Hugging Face cache, in the Hub client's layout, and returns the snapshot directory.
///
/// Honors `HF_ENDPOINT`, `HF_HOME`/`HF_HUB_CACHE` (through [`hub_cache_dir`]), `HF_TOKEN` (else
/// the token file the Hub client's login writes) and `HF_HUB_ETAG_TIMEOUT` +
/// `HF_HUB_DOWNLOAD_TIMEOUT` (seconds per file for the whole download, 10 + 10 by default).
/// Refused when `HF_HUB_OFFLINE` is set. hf-hub writes each file
/// to `blobs/<etag>.part` and links it into the snapshot only once complete, so a failed or
/// interrupted download leaves the snapshot as it was; the `.part` and `.lock` files this
/// attempt left are removed too. A progress bar is drawn on standard error when it is a terminal.
#[cfg(feature = "hub")]
pub fn download_hub_snapshot(key: &str, revision: &str) -> Result<PathBuf> {
    use hf_hub::api::sync::ApiBuilder;
    use hf_hub::{Cache, Repo, RepoType};

    check_revision(revision)?;
    if hub_offline_from_env() {
        return Err(Error::WeightsNotFound(format!(
            "Hub model {key} (revision {revision}): not downloaded because HF_HUB_OFFLINE is set"
        )));
    }
    let timeout = download_timeout()?;
    let endpoint = endpoint();
    let cache = Cache::new(hub_cache_dir());
    // hf-hub reads only the token file; HF_TOKEN comes first, as in huggingface_hub.
    let token = std::env::var("HF_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty())
        .or_else(|| cache.token());
    let api = ApiBuilder::from_cache(cache)
        .with_endpoint(endpoint.clone())
        .with_token(token)
        .with_progress(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .build()
        .map_err(|e| {
            Error::WeightsNotFound(format!("Hub client for {endpoint} could not start: {e}"))
        })?;
    let repo = api.repo(Repo::with_revision(
        key.to_string(),
        RepoType::Model,
        revision.to_string(),
    ));
    let repo_path = repo_dir(key);
    let repo_existed = repo_path.exists();
    let blobs_before = blob_files(&repo_path);
    let what = format!("Hub model {key} (revision {revision}) from {endpoint}");

    // A worker thread, so that a server that never answers costs `timeout` and no more; on a
    // timeout the worker is left blocked on its socket (hf-hub offers no way to cancel it).
    let (send, receive) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // model.safetensors first: refs/<revision> moves to the new commit only once a file of
        // it is complete, and a snapshot with model.safetensors is a usable one.
        let result = repo
            .download("model.safetensors")
            .and_then(|model| repo.download("config.json").map(|_| model));
        let _ = send.send(result);
    });
    let failure = match receive.recv_timeout(timeout) {
        Ok(Ok(model)) => {
            let snapshot = model
                .parent()
                .map(std::path::Path::to_path_buf)
                .ok_or_else(|| Error::WeightsNotFound(format!("{what}: no snapshot directory")))?;
            return Ok(snapshot);
        }
        Ok(Err(e)) => describe_hub_error(&e),
        Err(_) => format!(
            "no complete answer within {} s (for each file, HF_HUB_ETAG_TIMEOUT + \
             HF_HUB_DOWNLOAD_TIMEOUT seconds)",
            timeout.as_secs_f64()
        ),
    };
    clean_up_after_failure(&repo_path, repo_existed, &blobs_before);
    Err(Error::WeightsNotFound(format!(
        "{what} could not be downloaded: {failure}; the cache is as it was"
    )))
}

/// hf-hub's error with a hint for the usual causes.
#[cfg(feature = "hub")]
fn describe_hub_error(e: &hf_hub::api::sync::ApiError) -> String {
    use hf_hub::api::sync::ApiError;
    match e {
        ApiError::RequestError(inner) => match inner.as_ref() {
            ureq::Error::Status(401 | 403, _) => {
                format!("{e} (the repository may be gated or private: set HF_TOKEN)")
            }
            ureq::Error::Status(404, _) => format!("{e} (no such repository, revision or file)"),
            ureq::Error::Status(..) => e.to_string(),
            ureq::Error::Transport(_) => format!("{e} (the Hub could not be reached)"),
        },
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revisions_stay_inside_the_cache() {
        for good in [
            "main",
            "v1.0",
            "refs/pr/1",
            "0123456789abcdef0123456789abcdef01234567",
        ] {
            assert!(check_revision(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "..",
            "../main",
            "a/../../b",
            "/etc",
            "a//b",
            "a\\b",
            "main/",
        ] {
            let err = check_revision(bad).unwrap_err().to_string();
            assert!(err.contains("revision"), "{bad}: {err}");
        }
        assert!(is_commit_hash("0123456789abcdef0123456789abcdef01234567"));
        assert!(!is_commit_hash("main"));
    }
}
