//! The stagecoach control plane: a tonic gRPC server that tracks the job, and the logic of the
//! `stagecoach` CLI that talks to it. This crate never links libtorch.
//!
//! Module map:
//! - [`server`]: the coordinator's in-memory state ([`Coordinator`]), its implementation of the
//!   `Control` gRPC service, and [`serve`], which runs it on a listener until shut down.
//! - [`cli`]: what the `stagecoach` CLI does (connect, query, render); the binary only parses
//!   arguments.
//! - [`driver`]: the job driver, one task owning membership, generations, the plan and the
//!   step in flight; [`workers`]: the `Workers` gRPC service that feeds it.
//! - The job logic (job file, plan, curriculum, schedule, spike detector, checkpoint policy)
//!   is `stagecoach-core`'s; [`datacheck`] checks the data folders a job file names.
//! - [`metrics`]: the Prometheus metrics of the job and the `/metrics` endpoint (the worker
//!   serves its own through it too).
//! - [`error`]: the crate's [`Error`], and its mapping onto gRPC status codes.
//! - [`auth`]: who may call what (client certificates, bearer tokens, roles); [`tls`]: the
//!   coordinator's certificate and client CA; [`certs`]: `stagecoach certs init` and tokens;
//!   [`http`]: the HTTP endpoint (`/metrics`, `/healthz`, the status page) with the same TLS
//!   and auth; [`page`]: the status page and the charts `stagecoach plot` writes.
//! - [`store`]: durable state behind the [`store::StateStore`] trait (etcd, or an embedded
//!   crash-safe log in a directory), opened from a URL, with the conformance suite both pass.
//!
//! The binaries in `src/bin/` are thin: `stagecoach-coordinator` (the server) and `stagecoach`
//! (the user CLI).

pub mod auth;
pub mod certs;
pub mod cli;
pub mod datacheck;
pub mod driver;
pub mod error;
pub mod ha;
pub mod http;
pub mod keys;
pub mod ledger;
pub mod metrics;
pub mod page;
pub mod server;
pub mod status;
pub mod store;
pub mod tls;
pub mod workers;

pub use error::Error;
pub use server::{serve, shutdown_signal, Coordinator};

/// The version of this crate, which the coordinator reports in `GetStatus`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
