//! What the driver is asked and how it answers: the events of its queue, the control
//! requests, its refusals, and how it is set up.

use std::time::Duration;

use stagecoach_core::curriculum::CurriculumError;
use stagecoach_core::recovery::RecoveryConfig;
use stagecoach_core::retention::CheckpointConfig;
use stagecoach_core::spike::SpikeConfig;
use stagecoach_proto::v1;
use tokio::sync::oneshot;

use crate::Error;

/// Events the driver reacts to.
#[derive(Debug)]
pub enum Event {
    Register {
        request: v1::RegisterRequest,
        /// Who registers (the authenticated caller; `anonymous` on an open coordinator): the
        /// worker id it gets is bound to it.
        identity: String,
        reply: oneshot::Sender<Result<v1::RegisterResponse, Error>>,
    },
    /// Session `session` opened for `worker_id`; messages for it go to `outbox`.
    Attach {
        worker_id: String,
        /// Who opens the session: it must be who registered `worker_id`.
        identity: String,
        session: u64,
        outbox: super::Outbox,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    Message {
        worker_id: String,
        kind: v1::worker_message::Kind,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    /// Messages of several workers, at most one of each, judged in order: a node session's
    /// batch (the answers in the same order).
    Messages {
        messages: Vec<(String, v1::worker_message::Kind)>,
        reply: oneshot::Sender<Vec<Result<(), Error>>>,
    },
    /// Session `session` of `worker_id` ended (its lease still decides whether it is dead); a
    /// newer session of the same worker is left alone.
    Detach { worker_id: String, session: u64 },
    /// A request from the control API.
    Control {
        request: ControlRequest,
        reply: oneshot::Sender<Result<ControlReply, Error>>,
    },
}

/// What the control API asks of the job.
#[derive(Debug, Clone, PartialEq)]
pub enum ControlRequest {
    ListStages,
    /// `stage: None`: the next stage.
    ChangeStage {
        stage: Option<String>,
        requested_by: String,
    },
    SetMix {
        stage: String,
        weights: Vec<(String, f64)>,
        requested_by: String,
    },
    Pause {
        requested_by: String,
    },
    Resume {
        requested_by: String,
    },
    Evaluate {
        requested_by: String,
    },
    CheckpointNow {
        requested_by: String,
    },
    ListCheckpoints,
    /// `checkpoint: None`: the latest known-good one.
    Rollback {
        checkpoint: Option<String>,
        requested_by: String,
    },
    ListEvents,
}

/// The driver's answer to a [`ControlRequest`].
#[derive(Debug, Clone, PartialEq)]
pub enum ControlReply {
    Stages(v1::ListStagesResponse),
    StageChanged(v1::ChangeStageResponse),
    MixSet(v1::SetMixResponse),
    Paused(v1::PauseResponse),
    Resumed(v1::ResumeResponse),
    Evaluating(v1::EvaluateResponse),
    CheckpointScheduled(v1::CheckpointNowResponse),
    Checkpoints(v1::ListCheckpointsResponse),
    RolledBack(v1::RollbackResponse),
    Events(v1::ListEventsResponse),
}

impl From<CurriculumError> for Error {
    fn from(e: CurriculumError) -> Error {
        match e {
            CurriculumError::NotFound(m) => Error::NotFound(m),
            CurriculumError::Refused(m) => Error::FailedPrecondition(m),
            CurriculumError::Invalid(m) => Error::InvalidArgument(m),
            e => Error::InvalidArgument(e.to_string()),
        }
    }
}

/// The checkpoint and spike policy of a job, and what a restarted coordinator found of it.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub checkpoints: Option<CheckpointConfig>,
    pub spikes: Option<SpikeConfig>,
    /// What to do when generations fail and the store goes away (`[recovery]`).
    pub recovery: RecoveryConfig,
    /// The checkpoint index and the spike events so far (from the state store).
    pub index: Vec<v1::CheckpointRecord>,
    pub events: Vec<v1::SpikeEvent>,
}

/// Where a restarted coordinator picks the job up: its last committed step and the
/// curriculum's record.
#[derive(Debug, Clone, Default)]
pub struct Resume {
    pub last: Option<v1::LedgerStep>,
    pub record: Option<v1::CurriculumRecord>,
}

/// Membership and timing settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub min: u32,
    pub max: u32,
    pub lease: Duration,
    pub heartbeat: Duration,
    /// Once `min` workers are present, how long to wait for more (up to `max`) before forming.
    pub rendezvous: Duration,
}
