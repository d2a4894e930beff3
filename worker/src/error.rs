//! The worker's error type: one enum whose variants say what went wrong and where, so the CLI
//! can print a message that tells the user what to fix.

use std::path::PathBuf;

/// Everything that can go wrong in the worker library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A token shard (`.ds`, `.ds.index`, `.ds.metadata`) is missing, truncated or inconsistent.
    #[error("shard {path}: {reason}")]
    Shard { path: PathBuf, reason: String },

    /// The data itself cannot be trained on: a token of the shard file `path` at token
    /// `offset` (counted in that file) is not an id of the model's vocabulary. The shards or
    /// the model must change, not the code; a step that meets it fails before the model runs.
    #[error("{path}, token {offset}: {reason}")]
    Data {
        path: PathBuf,
        offset: u64,
        reason: String,
    },

    /// A configuration (job file, model config, preset name, CLI value) is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// A checkpoint or a transformers model folder cannot be read or does not fit the model.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },

    /// Tokenizer loading or encoding failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// The requested device is not usable (no CUDA library, no GPU).
    #[error("device: {0}")]
    Device(String),

    /// An input file or folder could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A collective operation failed (a peer died or timed out, a rendezvous was refused).
    #[error("collective: {0}")]
    Collective(String),

    /// The coordinator refused a call, or cannot be reached (again).
    #[error("coordinator: {0}")]
    Coordinator(String),

    /// The coordinator's job has ended: `finished` (nothing left to do), or failed.
    #[error("coordinator: {message}")]
    JobOver { finished: bool, message: String },

    /// libtorch raised an error (bad shapes, out of memory...).
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// The worker's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether trying again can help, as the coordinator's failure budget counts it.
    pub fn failure_kind(&self) -> stagecoach_proto::v1::FailureKind {
        use stagecoach_proto::v1::FailureKind;
        match self {
            // The same samples fail the same way until the data is fixed.
            Error::Shard { .. } | Error::Data { .. } | Error::Io { .. } => FailureKind::Data,
            Error::Config(_) | Error::Tokenizer(_) => FailureKind::Config,
            Error::Checkpoint { .. } => FailureKind::Checkpoint,
            Error::Device(_) | Error::Torch(_) => FailureKind::Resource,
            Error::Collective(_) | Error::Coordinator(_) | Error::JobOver { .. } => {
                FailureKind::Transient
            }
        }
    }

    pub(crate) fn shard(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Shard {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn checkpoint(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// Attaches the path to an I/O error.
pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Io {
            path: path.into(),
            source,
        })
    }
}
