//! What a status query sees of the job: the driver publishes a [`Snapshot`] after every event;
//! the control API and the metrics read it.

/// What a status query sees.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub state: i32,
    pub generation: u64,
    pub step: u64,
    pub total_steps: u64,
    /// Global loss of the last committed step (none before the first).
    pub loss: Option<f64>,
    pub workers_alive: u32,
    pub world_size: u32,
    pub detail: String,
    pub stage: String,
    pub stage_index: u32,
    pub stages: u32,
    pub tokens: u64,
    pub total_tokens: u64,
    /// The stage the budget moves to next, and the step it starts at.
    pub next_transition: Option<(String, u64)>,
    pub seq_len: u32,
    pub rope_theta: f64,
    pub lr: f64,
    /// Committed steps per second over the recent past.
    pub steps_per_second: Option<f64>,
    /// The last failure and what is done about it.
    pub last_failure: Option<stagecoach_proto::v1::Failure>,
    /// Writes waiting for the state store.
    pub pending_writes: u32,
}
