//! The coordinator's integration tests, one binary: a module per concern (one binary for each
//! would link the library and its dependencies once per file).

mod common;

mod binaries;
mod control;
mod driver;
mod node_session;
mod security;
mod store;
mod store_segments;
mod unattended;
mod validate;
mod workers_rpc;
