//! Every key the coordinator writes to the state store, in one place.
//!
//! | key | value |
//! |---|---|
//! | `jobs/{job}/ledger/steps/{step:012}` | `v1::LedgerStep` (protobuf): the samples of one committed step |
//! | `jobs/{job}/ledger/last` | `v1::LedgerStep` of the last committed step (its cursors resume the plan) |
//! | `jobs/{job}/ledger/rolled_back/{event:06}/{step:012}` | `v1::LedgerStep`: committed steps a rollback set aside |
//! | `jobs/{job}/ledger/rewinding` | `v1::Rewind`: a rewind whose steps are still being moved aside (absent when none) |
//! | `jobs/{job}/ledger/skipped/{event:06}` | `v1::SkippedRange`: samples a rollback skipped (drawn, never trained) |
//! | `jobs/{job}/checkpoints/{step:012}` | `v1::CheckpointRecord`: the checkpoint index and lineage |
//! | `jobs/{job}/events/{n:06}` | `v1::SpikeEvent`: spike detections, rollbacks, pauses |
//! | `jobs/{job}/curriculum` | `v1::CurriculumRecord`: mixture edits, stage transitions (step, tokens, who, why), evaluations, paused |
//! | `elections/{job}/{lease:x}` | a coordinator replica's URL (`--ha`), written by etcd's election API under the replica's lease; the oldest leads |

/// The ledger entry of `step`; zero-padded so that a range read returns steps in order.
pub fn ledger_step(job: &str, step: u64) -> String {
    format!("jobs/{job}/ledger/steps/{step:012}")
}

/// The prefix of all ledger steps of `job`.
pub fn ledger_steps(job: &str) -> String {
    format!("jobs/{job}/ledger/steps/")
}

/// The last committed step of `job`.
pub fn ledger_last(job: &str) -> String {
    format!("jobs/{job}/ledger/last")
}

/// The rewind of `job` under way, if any.
pub fn rewinding(job: &str) -> String {
    format!("jobs/{job}/ledger/rewinding")
}

/// The curriculum record of `job`.
pub fn curriculum(job: &str) -> String {
    format!("jobs/{job}/curriculum")
}

/// Where rollback `event` sets aside the committed `step`.
pub fn rolled_back_step(job: &str, event: u64, step: u64) -> String {
    format!("jobs/{job}/ledger/rolled_back/{event:06}/{step:012}")
}

/// The samples rollback `event` skipped.
pub fn skipped(job: &str, event: u64) -> String {
    format!("jobs/{job}/ledger/skipped/{event:06}")
}

/// The prefix of every skipped range of `job`.
pub fn skipped_all(job: &str) -> String {
    format!("jobs/{job}/ledger/skipped/")
}

/// The index entry of the checkpoint holding `step` committed steps.
pub fn checkpoint(job: &str, step: u64) -> String {
    format!("jobs/{job}/checkpoints/{step:012}")
}

/// The prefix of the checkpoint index of `job`.
pub fn checkpoints(job: &str) -> String {
    format!("jobs/{job}/checkpoints/")
}

/// Spike event number `n`.
pub fn event(job: &str, n: u64) -> String {
    format!("jobs/{job}/events/{n:06}")
}

/// The prefix of every spike event of `job`.
pub fn events(job: &str) -> String {
    format!("jobs/{job}/events/")
}

/// The name of the election of `job`'s coordinator replicas (`--ha`); etcd's election API
/// keeps one key per candidate under it.
pub fn election(job: &str) -> String {
    format!("elections/{job}")
}
