//! The crate's error type and its mapping onto gRPC status codes.

use tonic::{Code, Status};

use crate::store::StoreError;

/// The longest message a status carries: a longer one (an error that quotes a huge input) is
/// cut, so the client gets the error and not RESOURCE_EXHAUSTED on its headers.
pub const MAX_MESSAGE: usize = 1024;

/// `text`, cut at `max` bytes (on a character boundary) with a note of its full length.
pub fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes in all)", &text[..end], text.len())
}

/// Everything that can go wrong in the coordinator or in the CLI's calls to it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A worker id the driver does not know (never registered, or its lease expired).
    #[error("unknown worker {0:?}: register first")]
    UnknownWorker(String),

    /// A request or message is malformed or out of range; its message says what to change.
    #[error("{0}")]
    InvalidArgument(String),

    /// A request that cannot be served in the job's present state (not now, or not at all).
    #[error("{0}")]
    FailedPrecondition(String),

    /// The job has ended (`finished`, or not): a worker that registers has nothing to do.
    #[error("the job is over ({detail})")]
    JobOver { finished: bool, detail: String },

    /// The caller is not allowed this (another caller's worker id, say).
    #[error("{0}")]
    PermissionDenied(String),

    /// A named thing (stage, checkpoint) does not exist.
    #[error("{0}")]
    NotFound(String),

    /// The state store refused or could not be reached.
    #[error("state store: {0}")]
    Store(#[from] StoreError),

    /// The coordinator address given by the user is not a usable URI.
    #[error("invalid coordinator address {url:?}: {reason}")]
    InvalidAddress { url: String, reason: String },

    /// What a client was told to present (a CA, a certificate, a token) cannot be used.
    #[error("{0}")]
    Client(String),

    /// No connection could be made to the coordinator (nothing listening, host down, timeout),
    /// or it went away during a call. Retrying later may succeed.
    #[error(
        "cannot reach the coordinator at {url}: {reason}; is stagecoach-coordinator running? \
         (set --coordinator or STAGECOACH_COORDINATOR)"
    )]
    Unreachable { url: String, reason: String },

    /// The coordinator refused a request it understood (a bad argument, or not now); its
    /// message says what to change.
    #[error("the coordinator refused: {message}")]
    Refused { code: Code, message: String },

    /// The coordinator answered a call with an error status.
    #[error("the coordinator at {url} answered {:?}: {}", .status.code(), .status.message())]
    Rpc { url: String, status: Status },

    /// A checkpoint folder is incomplete, or a file of it does not match its manifest: it must
    /// not be used (nothing was taken from it).
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: String, reason: String },

    /// A folder the CLI was asked to write into cannot be used (it is not empty, or not a
    /// folder, or not writable).
    #[error("{path}: {reason}")]
    Destination { path: String, reason: String },

    /// Binding or reading the listening socket failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),

    /// The gRPC server failed while serving.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        let code = match &err {
            Error::UnknownWorker(_) | Error::NotFound(_) => Code::NotFound,
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::Store(e) if e.retryable() => Code::Unavailable,
            Error::Store(_) => Code::Internal,
            Error::InvalidAddress { .. } | Error::Destination { .. } | Error::Client(_) => {
                Code::InvalidArgument
            }
            Error::Checkpoint { .. } => Code::FailedPrecondition,
            Error::Unreachable { .. } => Code::Unavailable,
            Error::Refused { code, message } => {
                return Status::new(*code, clip(message, MAX_MESSAGE))
            }
            Error::JobOver { finished, .. } => {
                let mut status = Status::failed_precondition(clip(&err.to_string(), MAX_MESSAGE));
                let state = if *finished { "finished" } else { "failed" };
                status.metadata_mut().insert(
                    stagecoach_proto::JOB_OVER_METADATA,
                    tonic::metadata::MetadataValue::from_static(state),
                );
                return status;
            }
            // Pass the upstream status through unchanged, details and metadata included.
            Error::Rpc { status, .. } => return status.clone(),
            Error::Io(_) | Error::Transport(_) => Code::Internal,
        };
        Status::new(code, clip(&err.to_string(), MAX_MESSAGE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_onto_grpc_codes() {
        let url = || "http://127.0.0.1:1".to_owned();
        let reason = || "r".to_owned();
        let cases = [
            (
                Error::InvalidAddress {
                    url: url(),
                    reason: reason(),
                },
                Code::InvalidArgument,
            ),
            (
                Error::Unreachable {
                    url: url(),
                    reason: reason(),
                },
                Code::Unavailable,
            ),
            (
                Error::Rpc {
                    url: url(),
                    status: Status::not_found("no job"),
                },
                Code::NotFound,
            ),
            (
                Error::Refused {
                    code: Code::FailedPrecondition,
                    message: "the job is finished".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                Error::Checkpoint {
                    path: "ck/step-00000100".into(),
                    reason: "the sha256 of model.safetensors is 00, manifest.json says ff".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                Error::Destination {
                    path: "out".into(),
                    reason: "the folder is not empty".into(),
                },
                Code::InvalidArgument,
            ),
            (
                Error::Io(std::io::ErrorKind::AddrInUse.into()),
                Code::Internal,
            ),
        ];
        for (err, code) in cases {
            assert_eq!(Status::from(err).code(), code);
        }
    }

    #[test]
    fn long_messages_are_clipped() {
        let huge = "é".repeat(2_000_000);
        let status = Status::from(Error::NotFound(format!("no stage {huge:?}")));
        assert_eq!(status.code(), Code::NotFound);
        assert!(
            status.message().len() < MAX_MESSAGE + 64,
            "{}",
            status.message().len()
        );
        assert!(status.message().ends_with("bytes in all)"));
        assert_eq!(clip("short", 10), "short");
    }
}
