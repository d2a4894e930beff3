//! The crate's error type and its mapping onto gRPC status codes.

use tonic::{Code, Status};

/// Everything that can go wrong in the coordinator or in the CLI's calls to it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The coordinator address given by the user is not a usable URI.
    #[error("invalid coordinator address {url:?}: {reason}")]
    InvalidAddress { url: String, reason: String },

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
            Error::InvalidAddress { .. } | Error::Destination { .. } => Code::InvalidArgument,
            Error::Checkpoint { .. } => Code::FailedPrecondition,
            Error::Unreachable { .. } => Code::Unavailable,
            Error::Refused { code, message } => return Status::new(*code, message.clone()),
            // Pass the upstream status through unchanged, details and metadata included.
            Error::Rpc { status, .. } => return status.clone(),
            Error::Io(_) | Error::Transport(_) => Code::Internal,
        };
        Status::new(code, err.to_string())
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
}
