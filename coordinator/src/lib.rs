//! The stagecoach control plane: a tonic gRPC server that tracks the job, and the logic of the
//! `stagecoach` CLI that talks to it. This crate never links libtorch.
//!
//! Module map:
//! - [`server`]: the coordinator's in-memory state ([`Coordinator`]), its implementation of the
//!   `Control` gRPC service, and [`serve`], which runs it on a listener until shut down.
//! - [`cli`]: what the `stagecoach` CLI does (connect, query, render); the binary only parses
//!   arguments.
//! - [`error`]: the crate's [`Error`], and its mapping onto gRPC status codes.
//!
//! The binaries in `src/bin/` are thin: `stagecoach-coordinator` (the server) and `stagecoach`
//! (the user CLI).

pub mod cli;
pub mod error;
pub mod server;

pub use error::Error;
pub use server::{serve, shutdown_signal, Coordinator};

/// The version of this crate, which the coordinator reports in `GetStatus`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
