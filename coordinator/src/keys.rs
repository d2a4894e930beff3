//! Every key the coordinator writes to the state store, in one place.
//!
//! | key | value |
//! |---|---|
//! | `jobs/{job}/ledger/steps/{step:012}` | `v1::LedgerStep` (protobuf): the samples of one committed step |
//! | `jobs/{job}/ledger/last` | `v1::LedgerStep` of the last committed step (its cursors resume the plan) |
//! | `jobs/{job}/curriculum` | `v1::CurriculumRecord`: mixture edits, stage transitions (step, tokens, who, why), evaluations, paused |

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

/// The curriculum record of `job`.
pub fn curriculum(job: &str) -> String {
    format!("jobs/{job}/curriculum")
}
