//! Crash-safe file output: every file mulo writes goes through [`write_atomic`] (or, for the
//! NVRTC disk cache, [`replace_atomic`]).
//!
//! The bytes go to a fresh temporary file in the destination's directory (same file system,
//! so the final rename is atomic), are flushed to disk (`fsync`), and the temporary file is
//! renamed over the destination; on Unix the directory is then synced too, so the rename
//! itself survives a power loss. A reader of the destination therefore sees either the old
//! complete file or the new complete file, never a mix or a prefix, whether the writer is
//! killed, the disk fills up or two processes write the same path at once (the last rename
//! wins; both files are complete).
//!
//! A writer killed between creating its temporary file and the rename leaves that temporary
//! file behind (`.NAME.XXXXXX.tmp` beside the destination, never read by mulo); an error
//! inside the process removes it.
//!
//! Two destinations are not files to replace: an existing FIFO, character or block device
//! (`/dev/null`, a terminal) or an already-open descriptor (`/dev/stdout`, `/dev/fd/N`,
//! `/proc/self/fd/N`) is written into, as a shell's `>` would, and stays what it was; a
//! symbolic link is followed to its target, which is replaced atomically beside it (the link
//! stays a link). The cache's [`replace_atomic`] follows no link and writes into nothing: it
//! replaces whatever is at the path, so that a link planted there cannot redirect the write.

use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// How many symbolic links [`write_atomic`] follows before giving up (Linux's `ELOOP` limit).
const MAX_LINKS: usize = 40;

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, written,
/// synced to disk, then renamed over `path` (and the directory synced, on Unix). The
/// directory must exist. On error the destination is unchanged and the temporary file
/// removed; the error names `path`.
///
/// A symbolic link is followed (through every hop) and its target replaced, atomically,
/// beside the target; the link is left as it is. An existing FIFO, device node or open
/// descriptor (`/dev/stdout`) is written into instead, appending as `>>` would (a shell's `>`
/// has already truncated a redirected file), and is not replaced: renaming over `/dev/null`
/// would replace the device with a regular file (or fail, as a non-root user).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if writes_into(path) {
        let mut file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        return file.write_all(bytes).map_err(|e| Error::io(path, e));
    }
    let target = resolve_links(path)?;
    replace_with(&target, bytes, true)
}

/// Writes `bytes` to `path` atomically without following a symbolic link: whatever is at
/// `path` (a file, a planted link, a FIFO) is replaced by a regular file of mode 0600, and
/// a link's target is never opened. For files in a private directory, such as the NVRTC
/// disk cache's entries.
pub fn replace_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    replace_with(path, bytes, false)
}

/// Whether `path` is an existing destination to write into rather than replace: a FIFO, a
/// device, a socket, or a descriptor reached through `/dev/fd`, `/dev/std*` or `/proc`.
fn writes_into(path: &Path) -> bool {
    // Following links: `/dev/stdout` is a link to `/proc/self/fd/1`, itself a link to
    // whatever descriptor 1 is (a terminal, a pipe, a redirected file).
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    if !meta.is_file() {
        return !meta.is_dir();
    }
    // A regular file behind a descriptor link (`> out.txt`): the caller's descriptor holds
    // that file open, so replacing the name would leave the descriptor writing nowhere and
    // lose a `>>` file's earlier contents.
    let mut p = path.to_path_buf();
    for _ in 0..MAX_LINKS {
        if p.starts_with("/proc") || p.starts_with("/dev/fd") {
            return true;
        }
        match std::fs::read_link(&p) {
            Ok(next) => p = link_target(&p, next),
            Err(_) => return false,
        }
    }
    false
}

/// Where the link at `link`, holding `target`, points: relative targets are relative to the
/// link's directory.
fn link_target(link: &Path, target: PathBuf) -> PathBuf {
    if target.is_absolute() {
        target
    } else {
        link.parent().unwrap_or(Path::new(".")).join(target)
    }
}

/// `path` with every symbolic link of its last component followed, also a dangling one (the
/// file is then created where the link points, as `fs::write` would).
fn resolve_links(path: &Path) -> Result<PathBuf> {
    let mut p = path.to_path_buf();
    for _ in 0..MAX_LINKS {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let next = std::fs::read_link(&p).map_err(|e| Error::io(path, e))?;
                p = link_target(&p, next);
            }
            _ => return Ok(p),
        }
    }
    Err(Error::io(
        path,
        std::io::Error::other(format!("more than {MAX_LINKS} symbolic links to follow")),
    ))
}

/// The temporary-file-and-rename write of [`write_atomic`] to `path` (no link left to
/// follow); `default_mode`: the permissions `fs::write` would give (the replaced file's,
/// else 0666 less the umask), else the temporary file's private 0600.
fn replace_with(path: &Path, bytes: &[u8], default_mode: bool) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| {
            Error::io(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "not a file path (no file name)",
                ),
            )
        })?
        .to_string_lossy()
        .into_owned();
    let prefix = format!(".{name}.");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    // The permissions `fs::write` would give: those of the file replaced, else the default
    // (0666 less the umask) instead of the temporary file's private 0600.
    #[cfg(unix)]
    let permissions = default_mode.then(|| {
        std::fs::metadata(path)
            .map(|m| m.permissions())
            .unwrap_or_else(|_| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::Permissions::from_mode(0o666)
            })
    });
    #[cfg(unix)]
    if let Some(p) = &permissions {
        builder.permissions(p.clone());
    }
    #[cfg(not(unix))]
    let _ = default_mode;
    let mut tmp = builder.tempfile_in(dir).map_err(|e| Error::io(path, e))?;
    // The creation mode went through the umask; a replaced file's mode is kept as it was.
    #[cfg(unix)]
    if let Some(p) = permissions {
        if std::fs::metadata(path).is_ok() {
            tmp.as_file()
                .set_permissions(p)
                .map_err(|e| Error::io(path, e))?;
        }
    }
    tmp.write_all(bytes).map_err(|e| Error::io(path, e))?;
    // The data on disk before the name points at it: otherwise a power loss after the
    // rename can leave the new name holding a file of zeros or none of its blocks.
    tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    sync_dir(dir).map_err(|e| Error::io(dir, e))
}

/// Creates `dir` (and its parents) when missing, naming it in the error.
pub fn create_dir_all(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}

/// Makes sure `dir` is a private directory, as ssh requires of `~/.ssh`: created with mode
/// 0700 when missing (its parents with the default mode), and refused, with an error naming
/// it, when it is not a directory, is owned by another user than the effective one, or is
/// writable by its group or by others. Anyone who can write into a directory can plant or
/// replace its files, so a cache there could be fed forged entries.
pub fn private_dir(dir: &Path) -> Result<()> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir_all(parent)?;
    }
    let mut builder = std::fs::DirBuilder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    match builder.create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io(dir, e)),
    }
    // Following a link, as ssh does: a link to a private directory is as private.
    let meta = std::fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
    let refuse = |why: String| {
        Err(Error::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::PermissionDenied, why),
        ))
    };
    if !meta.is_dir() {
        return refuse("not a directory".into());
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me {
            return refuse(format!(
                "bad owner or permissions: owned by uid {}, not by this user (uid {me}); \
                 a directory others control may hold forged entries",
                meta.uid()
            ));
        }
        if meta.mode() & 0o022 != 0 {
            return refuse(format!(
                "bad owner or permissions: mode {:04o} lets the group or others write into it \
                 (chmod go-w, or 700)",
                meta.mode() & 0o7777
            ));
        }
    }
    Ok(())
}

/// Reads the regular file at `path` without following a symbolic link and without blocking:
/// a link there is refused (`ELOOP`), as is a FIFO, a device or anything else that is not a
/// regular file. The error names `path`.
pub fn read_no_follow(path: &Path) -> Result<Vec<u8>> {
    let mut options = OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // O_NONBLOCK: opening a planted FIFO for reading would otherwise wait for a writer.
        options.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
    }
    let mut file: File = options.open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
        ));
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    Ok(bytes)
}

/// Syncs a directory so that a rename in it is durable. A file system that cannot sync a
/// directory (`EINVAL`, unsupported) is not an error: the rename is atomic without it.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let d = File::open(dir)?;
        match d.sync_all() {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::InvalidInput | std::io::ErrorKind::Unsupported
                ) =>
            {
                Ok(())
            }
            r => r,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.bin");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second, longer").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second, longer");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["x.bin"]);
    }

    #[cfg(unix)]
    #[test]
    fn new_files_get_the_default_mode_and_replaced_ones_keep_theirs() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.bin");
        std::fs::write(dir.path().join("plain"), b"").unwrap();
        let plain = std::fs::metadata(dir.path().join("plain")).unwrap();
        write_atomic(&path, b"a").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), plain.permissions().mode() & 0o777);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        write_atomic(&path, b"b").unwrap();
        assert_eq!(mode(&path), 0o640);
    }

    #[cfg(unix)]
    #[test]
    fn writes_through_a_symbolic_link() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("real.bin");
        let link = dir.path().join("link.bin");
        std::fs::write(&target, b"old").unwrap();
        std::os::unix::fs::symlink(&target, &link).unwrap();
        write_atomic(&link, b"new").unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
    }

    #[cfg(unix)]
    #[test]
    fn writes_through_a_link_into_another_directory_beside_the_target() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let target = b.path().join("real.bin");
        let link = a.path().join("link.bin");
        // Relative, through a second link: every hop is followed.
        let hop = a.path().join("hop.bin");
        std::os::unix::fs::symlink(&target, &hop).unwrap();
        std::os::unix::fs::symlink("hop.bin", &link).unwrap();
        // Dangling: the target is created where the link points.
        write_atomic(&link, b"first").unwrap();
        write_atomic(&link, b"second").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"second");
        let names = |d: &Path| {
            let mut v: Vec<String> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(a.path()), ["hop.bin", "link.bin"]);
        assert_eq!(names(b.path()), ["real.bin"]);
        for l in [&link, &hop] {
            assert!(std::fs::symlink_metadata(l).unwrap().is_symlink());
        }
    }

    #[cfg(unix)]
    #[test]
    fn writes_into_a_fifo_and_a_device_which_stay_what_they_are() {
        use std::os::unix::fs::FileTypeExt;
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::read(fifo).unwrap())
        };
        write_atomic(&fifo, b"through the pipe").unwrap();
        assert_eq!(reader.join().unwrap(), b"through the pipe");
        assert!(std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file"
        );
        let null = Path::new("/dev/null");
        write_atomic(null, b"discarded").unwrap();
        assert!(std::fs::metadata(null)
            .unwrap()
            .file_type()
            .is_char_device());
    }

    #[cfg(unix)]
    #[test]
    fn the_cache_writer_replaces_a_planted_link_and_its_reader_refuses_one() {
        use std::os::unix::fs::FileTypeExt;
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let entry = dir.path().join("entry");
        std::os::unix::fs::symlink(&victim, &entry).unwrap();
        let err = read_no_follow(&entry).unwrap_err().to_string();
        assert!(err.contains("entry"), "{err}");
        replace_atomic(&entry, b"cache entry").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(std::fs::symlink_metadata(&entry).unwrap().is_file());
        assert_eq!(read_no_follow(&entry).unwrap(), b"cache entry");
        // A planted FIFO is refused at once (no wait for a writer), then replaced.
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(read_no_follow(&fifo).is_err());
        replace_atomic(&fifo, b"x").unwrap();
        assert!(!std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo());
    }

    #[cfg(unix)]
    #[test]
    fn private_dirs_are_created_0700_and_shared_or_foreign_ones_refused() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a").join("cache");
        private_dir(&dir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&dir), 0o700);
        private_dir(&dir).unwrap();
        for bad in [0o777, 0o770, 0o702, 0o1777] {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(bad)).unwrap();
            let err = private_dir(&dir).unwrap_err().to_string();
            assert!(
                err.contains("cache") && err.contains("bad owner or permissions"),
                "{bad:o}: {err}"
            );
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&dir).unwrap();
        let file = root.path().join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(private_dir(&file).is_err());
        // Owned by another user: as root, hand it to `nobody`; otherwise a directory of root's.
        // SAFETY: no preconditions.
        let foreign = if unsafe { libc::geteuid() } == 0 {
            let c = std::ffi::CString::new(dir.to_str().unwrap()).unwrap();
            // SAFETY: a valid NUL-terminated path.
            assert_eq!(unsafe { libc::chown(c.as_ptr(), 65534, 65534) }, 0);
            dir.clone()
        } else {
            PathBuf::from("/")
        };
        let err = private_dir(&foreign).unwrap_err().to_string();
        assert!(err.contains("owned by uid"), "{err}");
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.bin");
        write_atomic(&path, b"old").unwrap();
        // A directory in the way of the rename: the write fails, the old file is untouched.
        let blocked = dir.path().join("sub");
        std::fs::create_dir(&blocked).unwrap();
        std::fs::write(blocked.join("inside"), b"keep").unwrap();
        let err = write_atomic(&blocked, b"new").unwrap_err().to_string();
        assert!(err.contains("sub"), "{err}");
        assert_eq!(std::fs::read(blocked.join("inside")).unwrap(), b"keep");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        let missing = dir.path().join("no-such-dir").join("x.bin");
        let err = write_atomic(&missing, b"new").unwrap_err().to_string();
        assert!(err.contains("no-such-dir"), "{err}");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    }
}
