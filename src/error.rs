//! The library's error type: every failure names the file, tensor or argument at fault.

use std::path::PathBuf;

/// Everything that can go wrong in mulo, with enough context for a user to act on it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor shape given by the user is not acceptable.
    #[error("invalid shape `{text}`: {reason}")]
    Shape {
        /// The shape as the user wrote it.
        text: String,
        /// Why it was rejected.
        reason: String,
    },

    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file at fault.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A weights, trajectory or state file is malformed.
    #[error("{}: {reason}", path.display())]
    BadFile {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with it (naming the tensor where one is at fault).
        reason: String,
    },

    /// The learned optimizer's weights were not found where they were looked for.
    #[error("{0}")]
    WeightsNotFound(String),

    /// A buffer or argument passed to a step does not fit the compiled program.
    #[error("invalid argument `{name}`: {reason}")]
    Argument {
        /// The argument or buffer at fault.
        name: String,
        /// Why it was rejected.
        reason: String,
    },

    /// The step IR violates one of its invariants (a bug in a pass or the frontend).
    #[error("IR verification failed: {0}")]
    Verify(String),

    /// A backend failed (ONNX runtime, NVRTC, CUDA driver).
    #[error("{backend} backend: {message}")]
    Backend {
        /// Which backend.
        backend: &'static str,
        /// What it said.
        message: String,
    },
}

impl Error {
    /// Shorthand for [`Error::BadFile`].
    pub fn bad_file(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::BadFile {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::Argument`].
    pub fn argument(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Argument {
            name: name.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::Io`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
