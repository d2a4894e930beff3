//! Protocol definitions shared by the coordinator, the workers and the `stagecoach` CLI.
//!
//! Generated from `proto/stagecoach.proto` by `tonic-prost-build`; [`connect`] is how a client
//! reaches a coordinator (TLS, a bearer token).

pub mod connect;

#[allow(clippy::all, missing_docs, rust_2018_idioms)]
pub mod v1 {
    tonic::include_proto!("stagecoach.v1");
}
