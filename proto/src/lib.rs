//! Protocol definitions shared by the coordinator, the workers and the `stagecoach` CLI.
//!
//! Generated from `proto/stagecoach.proto` by `tonic-prost-build`; [`connect`] is how a client
//! reaches a coordinator (TLS, a bearer token); [`relay`] carries the sessions of a node's
//! workers over one stream.

pub mod connect;
pub mod relay;

/// Metadata on the `FailedPrecondition` that answers a Register once the job is over: the
/// job's end state, `finished` or `failed`, so that a worker (or any client) can tell "nothing
/// left to do" from a refusal without reading the message.
pub const JOB_OVER_METADATA: &str = "stagecoach-job-over";

/// Metadata on the `Unavailable` a standby coordinator (one of several replicas, `--ha`)
/// answers every call with: the URL of the replica that leads, or empty while none does (an
/// election is under way). Its presence is what says "a standby"; clients (workers, the CLI)
/// call the leader instead, or another replica.
pub const LEADER_METADATA: &str = "stagecoach-leader";

#[allow(clippy::all, missing_docs, rust_2018_idioms)]
pub mod v1 {
    tonic::include_proto!("stagecoach.v1");
}
