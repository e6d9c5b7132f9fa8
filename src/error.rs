//! The library's error type: every failure names the file, tensor or argument at fault.

use std::path::PathBuf;

/// An underlying error kept as the [`source`](std::error::Error::source) of an [`Error`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

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
        /// The parser's own error, where one failed (its text is part of `reason`).
        #[source]
        source: Option<BoxError>,
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
        /// The library's own error, where one failed (its text is part of `message`).
        #[source]
        source: Option<BoxError>,
    },
}

impl Error {
    /// Shorthand for [`Error::BadFile`].
    pub fn bad_file(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::BadFile {
            path: path.into(),
            reason: reason.into(),
            source: None,
        }
    }

    /// [`Error::BadFile`] caused by a parser's error `source`: the reason reads
    /// `{context}: {source}`, and `source` stays reachable through
    /// [`std::error::Error::source`].
    pub fn bad_file_from(
        path: impl Into<PathBuf>,
        context: &str,
        source: impl Into<BoxError>,
    ) -> Self {
        let source = source.into();
        Error::BadFile {
            path: path.into(),
            reason: format!("{context}: {source}"),
            source: Some(source),
        }
    }

    /// Shorthand for [`Error::Backend`] without an underlying error.
    pub fn backend(backend: &'static str, message: impl Into<String>) -> Self {
        Error::Backend {
            backend,
            message: message.into(),
            source: None,
        }
    }

    /// [`Error::Backend`] caused by a library's error `source`: the message reads
    /// `{context}: {source}` (alternate form, as anyhow's chains print), and `source` stays
    /// reachable through [`std::error::Error::source`].
    pub fn backend_from(backend: &'static str, context: &str, source: impl Into<BoxError>) -> Self {
        let source = source.into();
        Error::Backend {
            backend,
            message: format!("{context}: {source:#}"),
            source: Some(source),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn wrapped_errors_keep_their_source() {
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, "bad bytes");
        let e = Error::backend_from("onnx", "parsing the graph", io);
        assert_eq!(e.to_string(), "onnx backend: parsing the graph: bad bytes");
        assert_eq!(e.source().unwrap().to_string(), "bad bytes");
        let e = Error::bad_file_from("w.safetensors", "not a valid safetensors file", "truncated");
        assert!(
            e.to_string().starts_with("w.safetensors: not a valid"),
            "{e}"
        );
        assert_eq!(e.source().unwrap().to_string(), "truncated");
        assert!(Error::backend("cuda", "no device").source().is_none());
    }
}
