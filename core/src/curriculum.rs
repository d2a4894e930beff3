//! The curriculum as a state machine: which stage the job is in, what each step trains
//! (mixture, sequence length, RoPE θ, micro-batch, learning rate, samples), and how it moves from
//! one stage to the next.
//!
//! A stage ends when the job reaches its budget (`until_step`, counted from the start of the job)
//! or when someone asks (`stage next`, `stage set NAME`). A change takes effect at the next step
//! planned, which is ahead of every rank: the coordinator plans one step at a time and sends each
//! rank its stage with its samples, so all ranks switch at the same step. Tokens per step are
//! fixed by the job; a stage's sequence length sets the samples per step and the micro-batch.
//!
//! The sample plan's cursors count tokens per source and persist across stages, so a source used
//! again continues where it stopped. The driver keeps two copies, the one planning and the one at
//! the last committed step, and rewinds to the latter when a step is abandoned; requests from the
//! control API are applied to both, so a rewind never loses one.

use stagecoach_proto::v1;

use crate::clock::now_ms;
use crate::plan::{Plan, PlanError, SampleId};
use crate::schedule::Wsd;

/// What one step trains.
#[derive(Debug, Clone, PartialEq)]
pub struct StepPlan {
    pub step: u64,
    pub stage: v1::StepStage,
    pub stage_name: String,
    /// The whole global batch, in order; ranks take contiguous slices.
    pub samples: Vec<SampleId>,
    pub lr: f64,
    pub global_batch: u32,
    /// The plan's state before the draw of `samples`: the ledger records it instead of them.
    pub draw: v1::PlanDraw,
}

/// A stage change waiting for the next step.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub to: usize,
    pub cause: v1::TransitionCause,
    pub requested_by: String,
}

/// Why a curriculum cannot be built, or a request is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CurriculumError {
    /// The job spec is inconsistent (the spec's validation should have caught it).
    #[error("job spec: {0}")]
    Spec(String),
    /// A stage's mixture cannot be drawn from the data the workers have.
    #[error("stage {stage:?}: {error}")]
    Data { stage: String, error: PlanError },
    /// No stage of that name.
    #[error("{0}")]
    NotFound(String),
    /// The request makes no sense now; the message says why.
    #[error("{0}")]
    Refused(String),
    /// The request is malformed whatever the job's state (a mixture naming an unknown source,
    /// a weight that is not a number); the message says what to fix.
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, PartialEq)]
struct Stage {
    spec: v1::StageSpec,
    /// The mixture in force (the spec's, or the last `mix set`).
    weights: Vec<f64>,
    start: Option<u64>,
    end: Option<u64>,
    /// Tokens planned per source in this stage.
    tokens: Vec<u64>,
}

/// The curriculum of a job. Build with [`Curriculum::new`] (or [`Curriculum::resume`]), then
/// alternate [`Curriculum::due`] / [`Curriculum::apply`] and [`Curriculum::plan_step`], or just
/// call [`Curriculum::next_step`].
#[derive(Debug, Clone, PartialEq)]
pub struct Curriculum {
    job: v1::JobSpec,
    schedule: Wsd,
    stages: Vec<Stage>,
    current: usize,
    /// The next step to plan.
    step: u64,
    plan: Plan,
    pending: Option<Change>,
    transitions: Vec<v1::Transition>,
    evaluations: Vec<v1::Evaluation>,
}

/// The index of the stage named `name` in `job`, or an error that lists the stages.
pub fn stage_index(job: &v1::JobSpec, name: &str) -> Result<usize, CurriculumError> {
    job.stages
        .iter()
        .position(|s| s.name == name)
        .ok_or_else(|| {
            let names: Vec<&str> = job.stages.iter().map(|s| s.name.as_str()).collect();
            CurriculumError::NotFound(format!(
                "no stage named {name:?}; the stages are {}",
                names.join(", ")
            ))
        })
}

/// A mixture given by source name (sources not named weigh 0) as weights aligned with the
/// job's sources: every name a source of the job, none twice, every weight finite and not
/// negative, their sum 1.
pub fn aligned_weights(
    job: &v1::JobSpec,
    weights: &[(String, f64)],
) -> Result<Vec<f64>, CurriculumError> {
    let names: Vec<&str> = job.sources.iter().map(|s| s.name.as_str()).collect();
    let mut aligned = vec![0.0; names.len()];
    let mut seen = vec![false; names.len()];
    for (name, w) in weights {
        let Some(i) = names.iter().position(|n| n == name) else {
            return Err(CurriculumError::Invalid(format!(
                "no source named {name:?}; the sources are {}",
                names.join(", ")
            )));
        };
        if seen[i] {
            return Err(CurriculumError::Invalid(format!(
                "source {name:?} is given twice"
            )));
        }
        if !w.is_finite() || *w < 0.0 {
            return Err(CurriculumError::Invalid(format!(
                "the weight of {name:?} must be a non-negative number, got {w}"
            )));
        }
        seen[i] = true;
        aligned[i] = *w;
    }
    let sum: f64 = aligned.iter().sum();
    if (sum - 1.0).abs() > 1e-6 {
        return Err(CurriculumError::Invalid(format!(
            "the weights sum to {sum}; they must sum to 1"
        )));
    }
    Ok(aligned)
}

impl Curriculum {
    /// A new job's curriculum, in its first stage at step 0. `source_tokens[i]` is the tokens of
    /// source `i`'s training data as the workers see it; every stage's mixture is checked
    /// against it now, so no later transition can fail on the data.
    pub fn new(job: &v1::JobSpec, source_tokens: &[u64]) -> Result<Curriculum, CurriculumError> {
        let mut c = Curriculum::build(job, source_tokens, vec![0; job.sources.len()])?;
        c.enter(
            0,
            v1::TransitionCause::Start,
            "coordinator",
            vec![0; job.sources.len()],
        )?;
        Ok(c)
    }

    /// The curriculum of a job resumed after its last committed step `last`, with the durable
    /// `record` of its mixture edits, transitions and evaluations (if any was written).
    pub fn resume(
        job: &v1::JobSpec,
        source_tokens: &[u64],
        last: &v1::LedgerStep,
        record: Option<&v1::CurriculumRecord>,
    ) -> Result<Curriculum, CurriculumError> {
        let mut c = Curriculum::build(job, source_tokens, last.cursors.clone())?;
        if let Some(r) = record {
            for (stage, w) in c.stages.iter_mut().zip(&r.weights) {
                if w.weights.len() == stage.weights.len() {
                    stage.weights = w.weights.clone();
                }
            }
            c.transitions = r.transitions.clone();
            c.evaluations = r.evaluations.clone();
        }
        let next = last.step + 1;
        let names: Vec<String> = c.stages.iter().map(|s| s.spec.name.clone()).collect();
        let index = |name: &str| names.iter().position(|n| n == name);
        // Stage starts and ends from the transitions taken up to the next step. One planned for
        // the very next step was applied when that step was dispatched, but not yet committed.
        c.transitions.retain(|t| t.step <= next);
        let mut current = last.stage as usize;
        let mut taken = last.stage_taken.clone();
        let n = job.sources.len();
        for t in &c.transitions {
            let Some(to) = index(&t.to) else { continue };
            if let Some(from) = index(&t.from) {
                if from != to {
                    c.stages[from].end = Some(t.step);
                }
                // The tokens `from` had trained when it was left (or its mixture changed).
                if t.from_tokens.len() == n {
                    c.stages[from].tokens = t.from_tokens.clone();
                }
            }
            c.stages[to].start.get_or_insert(t.step);
            c.stages[to].end = None;
            if t.step == next {
                current = to;
                taken = vec![0; job.sources.len()];
            }
        }
        if current >= c.stages.len() {
            return Err(CurriculumError::Spec(format!(
                "the ledger's last step is in stage {current}, the job has {} stages",
                c.stages.len()
            )));
        }
        if taken.len() != job.sources.len() {
            taken = vec![0; job.sources.len()];
        }
        c.current = current;
        c.step = next;
        c.stages[current].start.get_or_insert(next);
        // And the samples drawn under the current mixture since its last transition.
        let seq_len = u64::from(c.stages[current].spec.seq_len);
        for (tokens, &samples) in c.stages[current].tokens.iter_mut().zip(&taken) {
            *tokens += samples * seq_len;
        }
        let stage = &c.stages[current];
        c.plan
            .set_mix(stage.weights.clone(), u64::from(stage.spec.seq_len), taken)
            .map_err(|error| CurriculumError::Data {
                stage: stage.spec.name.clone(),
                error,
            })?;
        Ok(c)
    }

    fn build(
        job: &v1::JobSpec,
        source_tokens: &[u64],
        cursors: Vec<u64>,
    ) -> Result<Curriculum, CurriculumError> {
        let n = job.sources.len();
        if job.stages.is_empty() {
            return Err(CurriculumError::Spec("the job has no stage".into()));
        }
        if source_tokens.len() != n {
            return Err(CurriculumError::Spec(format!(
                "{} source sizes for {n} sources",
                source_tokens.len()
            )));
        }
        let schedule = Wsd::from_job(job).map_err(|e| CurriculumError::Spec(e.0))?;
        let plan = Plan::new(
            job.data_seed,
            u64::from(job.seq_len),
            source_tokens,
            cursors,
        )
        .map_err(|e| CurriculumError::Spec(e.to_string()))?;
        let mut stages = Vec::with_capacity(job.stages.len());
        for spec in &job.stages {
            if spec.weights.len() != n {
                return Err(CurriculumError::Spec(format!(
                    "stage {:?} has {} weights for {n} sources",
                    spec.name,
                    spec.weights.len()
                )));
            }
            if spec.seq_len == 0
                || !job
                    .global_batch_tokens
                    .is_multiple_of(u64::from(spec.seq_len))
            {
                return Err(CurriculumError::Spec(format!(
                    "stage {:?}: seq_len {} does not divide global_batch_tokens {}",
                    spec.name, spec.seq_len, job.global_batch_tokens
                )));
            }
            // The check a transition would do, done now.
            let mut probe = plan.clone();
            probe
                .set_mix(spec.weights.clone(), u64::from(spec.seq_len), vec![0; n])
                .map_err(|error| CurriculumError::Data {
                    stage: spec.name.clone(),
                    error,
                })?;
            stages.push(Stage {
                spec: spec.clone(),
                weights: spec.weights.clone(),
                start: None,
                end: None,
                tokens: vec![0; n],
            });
        }
        Ok(Curriculum {
            job: job.clone(),
            schedule,
            stages,
            current: 0,
            step: 0,
            plan,
            pending: None,
            transitions: vec![],
            evaluations: vec![],
        })
    }

    /// Makes stage `to` current from the next step on and records the transition.
    fn enter(
        &mut self,
        to: usize,
        cause: v1::TransitionCause,
        requested_by: &str,
        taken: Vec<u64>,
    ) -> Result<v1::Transition, CurriculumError> {
        let from = (cause != v1::TransitionCause::Start).then_some(self.current);
        let stage = &self.stages[to];
        self.plan
            .set_mix(stage.weights.clone(), u64::from(stage.spec.seq_len), taken)
            .map_err(|error| CurriculumError::Data {
                stage: stage.spec.name.clone(),
                error,
            })?;
        if let Some(from) = from.filter(|&f| f != to) {
            self.stages[from].end = Some(self.step);
        }
        self.current = to;
        self.stages[to].start = Some(self.step);
        self.stages[to].end = None;
        let detail = describe_stage(&self.job, &self.stages[to]);
        let from_tokens = from
            .map(|f| self.stages[f].tokens.clone())
            .unwrap_or_default();
        let t = v1::Transition {
            step: self.step,
            tokens: self.tokens(),
            from: from
                .map(|f| self.stages[f].spec.name.clone())
                .unwrap_or_default(),
            to: self.stages[to].spec.name.clone(),
            cause: cause.into(),
            requested_by: requested_by.to_owned(),
            unix_ms: now_ms(),
            detail,
            from_tokens,
        };
        self.transitions.push(t.clone());
        Ok(t)
    }

    /// The change to make before the next step, if any: a request, or the current stage's budget
    /// reached (with a stage after it).
    pub fn due(&self) -> Option<Change> {
        if let Some(p) = &self.pending {
            return Some(p.clone());
        }
        let next = self.current + 1;
        (next < self.stages.len() && self.step >= self.stages[self.current].spec.until_step).then(
            || Change {
                to: next,
                cause: v1::TransitionCause::Budget,
                requested_by: "coordinator".into(),
            },
        )
    }

    /// Applies `change` (from [`Curriculum::due`]): the next step trains under its stage.
    pub fn apply(&mut self, change: Change) -> Result<v1::Transition, CurriculumError> {
        self.pending = None;
        let n = self.job.sources.len();
        self.enter(change.to, change.cause, &change.requested_by, vec![0; n])
    }

    /// Whether every step of the job has been planned.
    pub fn finished(&self) -> bool {
        self.step >= self.job.total_steps
    }

    /// Plans the next step under the current stage (apply what [`Curriculum::due`] says first).
    pub fn plan_step(&mut self) -> StepPlan {
        let stage = &self.stages[self.current];
        let seq_len = stage.spec.seq_len;
        let global_batch = (self.job.global_batch_tokens / u64::from(seq_len)) as u32;
        let micro = (self.job.micro_batch_tokens / u64::from(seq_len)).max(1) as u32;
        let draw = self.plan.draw_state(global_batch);
        let samples = self.plan.take(global_batch as usize);
        let lr = self.lr(self.step);
        let stage = &mut self.stages[self.current];
        for s in &samples {
            stage.tokens[s.source] += u64::from(seq_len);
        }
        let plan = StepPlan {
            step: self.step,
            stage: v1::StepStage {
                index: self.current as u32,
                seq_len,
                rope_theta: stage.spec.rope_theta,
                micro_batch_size: micro,
            },
            stage_name: stage.spec.name.clone(),
            samples,
            lr,
            global_batch,
            draw,
        };
        self.step += 1;
        plan
    }

    /// The next step, with any due change applied first; `None` once the job is done. For a
    /// single process that plans and trains alone (no control API, no evaluation).
    pub fn next_step(&mut self) -> Option<StepPlan> {
        if self.finished() {
            return None;
        }
        while let Some(change) = self.due() {
            // Every stage's mixture was checked against the data in `new`.
            if self.apply(change).is_err() {
                return None;
            }
        }
        Some(self.plan_step())
    }

    /// The learning rate of `step` under the current stage.
    pub fn lr(&self, step: u64) -> f64 {
        let w = &self.schedule;
        if step < w.warmup_steps {
            return w.lr(step);
        }
        let stage = &self.stages[self.current];
        match stage.spec.lr_phase() {
            v1::LrPhase::Stable => w.peak_lr,
            v1::LrPhase::Decay => {
                let start = stage.start.unwrap_or(step).max(w.warmup_steps);
                w.decay_over(w.peak_lr, start, stage.spec.until_step, step)
            }
            v1::LrPhase::Unspecified => {
                let start = self.decay_start();
                if step < start || start >= self.job.total_steps {
                    w.peak_lr
                } else {
                    w.decay_over(w.peak_lr, start, self.job.total_steps, step)
                }
            }
        }
    }

    /// Where the schedule's decay starts: where its stage actually started, if it is given by
    /// stage and that stage has begun (a manual transition can move it), else the planned step.
    fn decay_start(&self) -> u64 {
        let s = self.job.schedule.as_ref();
        let planned = s.map_or(self.job.total_steps, |s| s.decay_start_step);
        s.filter(|s| !s.decay_start_stage.is_empty())
            .and_then(|s| {
                self.stages
                    .iter()
                    .find(|st| st.spec.name == s.decay_start_stage)
            })
            .and_then(|st| st.start)
            .unwrap_or(planned)
    }

    fn index(&self, name: &str) -> Result<usize, CurriculumError> {
        stage_index(&self.job, name)
    }

    /// Asks for a move to stage `target` (`None`: the next one) at the next step. Returns the
    /// names of the stages left and entered.
    pub fn request_stage(
        &mut self,
        target: Option<&str>,
        requested_by: &str,
    ) -> Result<(String, String), CurriculumError> {
        if self.finished() {
            return Err(CurriculumError::Refused(
                "the job has planned its last step; no stage follows".into(),
            ));
        }
        let (to, cause) = match target {
            None => {
                let to = self.pending.as_ref().map_or(self.current, |p| p.to) + 1;
                if to >= self.stages.len() {
                    return Err(CurriculumError::Refused(format!(
                        "stage {:?} is the last one; nothing follows it",
                        self.stages[to - 1].spec.name
                    )));
                }
                (to, v1::TransitionCause::ManualNext)
            }
            Some(name) => {
                let to = self.index(name)?;
                if to == self.current && self.pending.is_none() {
                    return Err(CurriculumError::Refused(format!(
                        "the job is already in stage {name:?}"
                    )));
                }
                (to, v1::TransitionCause::ManualSet)
            }
        };
        let until = self.stages[to].spec.until_step;
        if until <= self.step {
            return Err(CurriculumError::Refused(format!(
                "stage {:?} ends at step {until} and the job is at step {}: it would end at once",
                self.stages[to].spec.name, self.step
            )));
        }
        self.pending = Some(Change {
            to,
            cause,
            requested_by: requested_by.to_owned(),
        });
        Ok((
            self.stages[self.current].spec.name.clone(),
            self.stages[to].spec.name.clone(),
        ))
    }

    /// Checks a new mixture for `stage` (by source name; sources not named weigh 0) and returns
    /// the stage's index and the weights aligned with the job's sources.
    pub fn check_mix(
        &self,
        stage: &str,
        weights: &[(String, f64)],
    ) -> Result<(usize, Vec<f64>), CurriculumError> {
        let index = self.index(stage)?;
        if let Some(end) = self.stages[index].end {
            return Err(CurriculumError::Refused(format!(
                "stage {stage:?} ended at step {end}; only the current stage or one to come can change"
            )));
        }
        let aligned = aligned_weights(&self.job, weights)?;
        let mut probe = self.plan.clone();
        probe
            .set_mix(
                aligned.clone(),
                u64::from(self.stages[index].spec.seq_len),
                vec![0; aligned.len()],
            )
            .map_err(|error| CurriculumError::Data {
                stage: stage.to_owned(),
                error,
            })?;
        Ok((index, aligned))
    }

    /// Sets the mixture of stage `index` (checked by [`Curriculum::check_mix`]). For the current
    /// stage it applies from the next step, and the change is recorded as a transition.
    pub fn set_mix(
        &mut self,
        index: usize,
        weights: Vec<f64>,
        requested_by: &str,
    ) -> Result<Option<u64>, CurriculumError> {
        self.stages[index].weights = weights;
        if index != self.current {
            return Ok(None);
        }
        let n = self.job.sources.len();
        self.enter(
            index,
            v1::TransitionCause::MixChange,
            requested_by,
            vec![0; n],
        )?;
        // `enter` treats the stage as starting afresh; it began earlier.
        let start = self
            .transitions
            .iter()
            .rev()
            .find(|t| {
                t.to == self.stages[index].spec.name
                    && t.cause != i32::from(v1::TransitionCause::MixChange)
            })
            .map_or(self.step, |t| t.step);
        self.stages[index].start = Some(start);
        Ok(Some(self.step))
    }

    /// Draws the data of `batches` steps without training it (a rollback's skip range): the
    /// cursors move past it, the step counter and the stage's budget do not.
    pub fn skip_batches(&mut self, batches: u64) -> Vec<SampleId> {
        let seq_len = u64::from(self.stages[self.current].spec.seq_len);
        let per_step = (self.job.global_batch_tokens / seq_len) as usize;
        (0..batches)
            .flat_map(|_| self.plan.take(per_step))
            .collect()
    }

    /// Keeps an evaluation in the stage history.
    pub fn record_evaluation(&mut self, evaluation: v1::Evaluation) {
        self.evaluations.push(evaluation);
    }

    /// What the state store keeps.
    pub fn record(&self, paused: bool) -> v1::CurriculumRecord {
        v1::CurriculumRecord {
            weights: self
                .stages
                .iter()
                .map(|s| v1::StageWeights {
                    weights: s.weights.clone(),
                })
                .collect(),
            transitions: self.transitions.clone(),
            evaluations: self.evaluations.clone(),
            paused,
        }
    }

    /// The next step to plan.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Tokens planned before the next step.
    pub fn tokens(&self) -> u64 {
        self.step * self.job.global_batch_tokens
    }

    pub fn current(&self) -> usize {
        self.current
    }

    pub fn current_spec(&self) -> &v1::StageSpec {
        &self.stages[self.current].spec
    }

    pub fn num_stages(&self) -> usize {
        self.stages.len()
    }

    /// Tokens consumed per source (the plan's cursors) and samples drawn per source under the
    /// current mixture.
    pub fn cursors(&self) -> &[u64] {
        self.plan.cursors()
    }

    pub fn taken(&self) -> &[u64] {
        self.plan.taken()
    }

    pub fn transitions(&self) -> &[v1::Transition] {
        &self.transitions
    }

    pub fn evaluations(&self) -> &[v1::Evaluation] {
        &self.evaluations
    }

    /// The stage that follows the current one by budget, and the step it starts at.
    pub fn next_transition(&self) -> Option<(String, u64)> {
        let next = self.current + 1;
        (next < self.stages.len()).then(|| {
            (
                self.stages[next].spec.name.clone(),
                self.stages[self.current].spec.until_step,
            )
        })
    }

    /// Every stage, planned and done, for the control API.
    pub fn stage_infos(&self) -> Vec<v1::StageInfo> {
        stage_infos(&self.job, &self.stages)
    }
}

/// The stages of a job that has not started yet, as its spec plans them.
pub fn planned_stages(job: &v1::JobSpec) -> Vec<v1::StageInfo> {
    let stages: Vec<Stage> = job
        .stages
        .iter()
        .map(|spec| Stage {
            spec: spec.clone(),
            weights: spec.weights.clone(),
            start: None,
            end: None,
            tokens: vec![0; job.sources.len()],
        })
        .collect();
    stage_infos(job, &stages)
}

fn stage_infos(job: &v1::JobSpec, stages: &[Stage]) -> Vec<v1::StageInfo> {
    let tokens_per_step = job.global_batch_tokens;
    stages
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let seq = u64::from(s.spec.seq_len);
            v1::StageInfo {
                index: i as u32,
                name: s.spec.name.clone(),
                until_step: s.spec.until_step,
                until_tokens: s.spec.until_step * tokens_per_step,
                seq_len: s.spec.seq_len,
                rope_theta: s.spec.rope_theta,
                lr_phase: s.spec.lr_phase,
                global_batch: (tokens_per_step / seq.max(1)) as u32,
                micro_batch_size: (job.micro_batch_tokens / seq.max(1)).max(1) as u32,
                mix: job
                    .sources
                    .iter()
                    .zip(&s.weights)
                    .map(|(src, &weight)| v1::SourceWeight {
                        source: src.name.clone(),
                        weight,
                    })
                    .collect(),
                started: s.start.is_some(),
                start_step: s.start.unwrap_or(0),
                ended: s.end.is_some(),
                end_step: s.end.unwrap_or(0),
                tokens: job
                    .sources
                    .iter()
                    .zip(&s.tokens)
                    .map(|(src, &tokens)| v1::SourceTokens {
                        source: src.name.clone(),
                        tokens,
                    })
                    .collect(),
            }
        })
        .collect()
}

/// "seq_len 512, rope θ 40000, mix prose=0.62 code=0.24 math=0.14" for a transition's detail.
fn describe_stage(job: &v1::JobSpec, stage: &Stage) -> String {
    let mix: Vec<String> = job
        .sources
        .iter()
        .zip(&stage.weights)
        .filter(|(_, &w)| w > 0.0)
        .map(|(s, w)| format!("{}={w}", s.name))
        .collect();
    let theta = if stage.spec.rope_theta > 0.0 {
        format!("{}", stage.spec.rope_theta)
    } else {
        "the model's".into()
    };
    format!(
        "seq_len {}, rope θ {theta}, mix {}",
        stage.spec.seq_len,
        mix.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three sources, three stages: a, then b at twice the sequence length with a new θ, then a
    /// decay stage.
    fn job() -> v1::JobSpec {
        let source = |name: &str| v1::SourceSpec {
            name: name.into(),
            path: format!("data/{name}"),
            eval_path: String::new(),
        };
        let stage =
            |name: &str, weights: [f64; 3], until: u64, seq: u32, theta: f64| v1::StageSpec {
                name: name.into(),
                weights: weights.to_vec(),
                until_step: until,
                seq_len: seq,
                rope_theta: theta,
                lr_phase: v1::LrPhase::Unspecified.into(),
            };
        v1::JobSpec {
            name: "t".into(),
            seq_len: 16,
            global_batch_tokens: 64,
            micro_batch_tokens: 32,
            data_seed: 3,
            sources: vec![source("web"), source("code"), source("math")],
            stages: vec![
                stage("one", [0.75, 0.25, 0.0], 10, 8, 10_000.0),
                stage("two", [0.5, 0.25, 0.25], 20, 16, 40_000.0),
                stage("three", [0.5, 0.0, 0.5], 30, 8, 40_000.0),
            ],
            total_steps: 30,
            schedule: Some(v1::ScheduleSpec {
                peak_lr: 1.0,
                warmup_steps: 2,
                decay: v1::DecayShape::Linear.into(),
                min_lr: 0.0,
                decay_start_step: 20,
                decay_start_stage: "three".into(),
            }),
            ..Default::default()
        }
    }

    const TOKENS: [u64; 3] = [10_000, 10_000, 10_000];

    #[test]
    fn budgets_move_the_job_through_every_stage() {
        let mut c = Curriculum::new(&job(), &TOKENS).unwrap();
        let steps: Vec<StepPlan> = std::iter::from_fn(|| c.next_step()).collect();
        assert_eq!(steps.len(), 30);
        let stage_of = |s: &StepPlan| s.stage.index;
        assert!(steps[..10].iter().all(|s| stage_of(s) == 0));
        assert!(steps[10..20].iter().all(|s| stage_of(s) == 1));
        assert!(steps[20..].iter().all(|s| stage_of(s) == 2));
        // Tokens per step are fixed; the micro-batch and the samples per step follow seq_len.
        assert_eq!(
            (steps[0].global_batch, steps[0].stage.micro_batch_size),
            (8, 4)
        );
        assert_eq!(
            (steps[10].global_batch, steps[10].stage.micro_batch_size),
            (4, 2)
        );
        assert_eq!(steps[10].stage.rope_theta, 40_000.0);
        // Exact shares per stage: stage one drew 60 web and 20 code samples.
        let count = |r: std::ops::Range<usize>, src: usize| {
            steps[r]
                .iter()
                .flat_map(|s| &s.samples)
                .filter(|s| s.source == src)
                .count()
        };
        assert_eq!(
            (count(0..10, 0), count(0..10, 1), count(0..10, 2)),
            (60, 20, 0)
        );
        assert_eq!(
            (count(10..20, 0), count(10..20, 1), count(10..20, 2)),
            (20, 10, 10)
        );
        let causes: Vec<_> = c
            .transitions()
            .iter()
            .map(|t| (t.step, t.cause()))
            .collect();
        assert_eq!(
            causes,
            [
                (0, v1::TransitionCause::Start),
                (10, v1::TransitionCause::Budget),
                (20, v1::TransitionCause::Budget)
            ]
        );
        assert_eq!(c.transitions()[2].tokens, 20 * 64);
        // Warmup, stable, then the decay from stage three's start to the end.
        assert_eq!(steps[0].lr, 0.5);
        assert_eq!(steps[19].lr, 1.0);
        assert!((steps[20].lr - 0.9).abs() < 1e-12);
        assert!(steps[29].lr.abs() < 1e-12);
    }

    #[test]
    fn no_token_is_planned_twice_across_stages() {
        let mut c = Curriculum::new(&job(), &TOKENS).unwrap();
        let mut targets = std::collections::HashSet::new();
        while let Some(step) = c.next_step() {
            let len = u64::from(step.stage.seq_len);
            for s in step.samples {
                for t in s.index + 1..=s.index + len {
                    assert!(
                        targets.insert((s.source, t)),
                        "token {t} of {} twice",
                        s.source
                    );
                }
            }
        }
    }

    #[test]
    fn a_manual_change_applies_at_the_next_step_and_moves_the_decay() {
        let mut c = Curriculum::new(&job(), &TOKENS).unwrap();
        for _ in 0..4 {
            c.next_step().unwrap();
        }
        let (from, to) = c.request_stage(Some("three"), "ana@host").unwrap();
        assert_eq!((from.as_str(), to.as_str()), ("one", "three"));
        let step = c.next_step().unwrap();
        assert_eq!((step.step, step.stage.index), (4, 2));
        let t = c.transitions().last().unwrap();
        assert_eq!(
            (t.step, t.cause(), t.requested_by.as_str()),
            (4, v1::TransitionCause::ManualSet, "ana@host")
        );
        // The decay now starts where stage three did.
        assert!((step.lr - (1.0 - 1.0 / 26.0)).abs() < 1e-12, "{}", step.lr);
        assert_eq!(c.stage_infos()[0].end_step, 4);
        assert!(!c.stage_infos()[1].started);
        assert!(
            c.request_stage(None, "x").is_err(),
            "three is the last stage"
        );
        for _ in 0..6 {
            c.next_step().unwrap();
        }
        let spent = c.request_stage(Some("one"), "x").unwrap_err().to_string();
        assert!(
            spent.contains("ends at step 10 and the job is at step 11"),
            "{spent}"
        );
        assert!(matches!(
            c.request_stage(Some("nine"), "x"),
            Err(CurriculumError::NotFound(_))
        ));
    }

    #[test]
    fn mixtures_are_checked_and_apply_to_the_current_stage_at_once() {
        let mut c = Curriculum::new(&job(), &TOKENS).unwrap();
        c.next_step().unwrap();
        let bad = |c: &Curriculum, w: &[(&str, f64)]| {
            let w: Vec<(String, f64)> = w.iter().map(|(n, w)| (n.to_string(), *w)).collect();
            c.check_mix("one", &w).unwrap_err().to_string()
        };
        assert!(bad(&c, &[("web", 0.5)]).contains("sum to 0.5"));
        assert!(bad(&c, &[("web", 0.5), ("wbe", 0.5)]).contains("no source named \"wbe\""));
        assert!(bad(&c, &[("web", 1.5), ("code", -0.5)]).contains("non-negative"));
        let (i, w) = c.check_mix("one", &[("math".into(), 1.0)]).unwrap();
        assert_eq!(c.set_mix(i, w, "ana").unwrap(), Some(1));
        let step = c.next_step().unwrap();
        assert!(step.samples.iter().all(|s| s.source == 2));
        assert_eq!(
            c.stage_infos()[0].start_step,
            0,
            "a new mix does not restart the stage"
        );
        // An upcoming stage's mixture waits for it.
        let (i, w) = c.check_mix("two", &[("code".into(), 1.0)]).unwrap();
        assert_eq!(c.set_mix(i, w, "ana").unwrap(), None);
    }

    #[test]
    fn a_resumed_curriculum_continues_exactly() {
        let mut whole = Curriculum::new(&job(), &TOKENS).unwrap();
        let first: Vec<StepPlan> = (0..13).map(|_| whole.next_step().unwrap()).collect();
        let last = v1::LedgerStep {
            step: 12,
            cursors: whole.cursors().to_vec(),
            stage: 1,
            stage_taken: whole.taken().to_vec(),
            ..Default::default()
        };
        let mut resumed =
            Curriculum::resume(&job(), &TOKENS, &last, Some(&whole.record(false))).unwrap();
        assert_eq!(resumed.next_step(), whole.next_step());
        assert_eq!(first.len(), 13);
        let rest_a: Vec<_> = std::iter::from_fn(|| resumed.next_step()).collect();
        let rest_b: Vec<_> = std::iter::from_fn(|| whole.next_step()).collect();
        assert_eq!(rest_a, rest_b);
        assert_eq!(resumed.transitions().len(), whole.transitions().len());
    }

    /// Each stage's tokens survive a resume: through a stage change and a mixture change, the
    /// resumed curriculum reports what the uninterrupted one does, and goes on counting alike.
    #[test]
    fn a_resumed_curriculum_knows_each_stages_tokens() {
        let mut whole = Curriculum::new(&job(), &TOKENS).unwrap();
        for _ in 0..13 {
            whole.next_step().unwrap();
        }
        let (i, w) = whole.check_mix("two", &[("math".into(), 1.0)]).unwrap();
        whole.set_mix(i, w, "ana").unwrap();
        for _ in 0..3 {
            whole.next_step().unwrap();
        }
        let last = v1::LedgerStep {
            step: whole.step() - 1,
            cursors: whole.cursors().to_vec(),
            stage: whole.current() as u32,
            stage_taken: whole.taken().to_vec(),
            ..Default::default()
        };
        let tokens = |c: &Curriculum| -> Vec<Vec<u64>> {
            c.stage_infos()
                .iter()
                .map(|s| s.tokens.iter().map(|t| t.tokens).collect())
                .collect()
        };
        let mut resumed =
            Curriculum::resume(&job(), &TOKENS, &last, Some(&whole.record(false))).unwrap();
        assert!(tokens(&whole)[0].iter().sum::<u64>() > 0);
        assert_eq!(tokens(&resumed), tokens(&whole));
        resumed.next_step().unwrap();
        whole.next_step().unwrap();
        assert_eq!(tokens(&resumed), tokens(&whole));
    }

    #[test]
    fn a_mixture_the_data_cannot_give_is_refused_up_front() {
        let err = Curriculum::new(&job(), &[10_000, 10_000, 5]).unwrap_err();
        assert!(err.to_string().contains("stage \"two\""), "{err}");
    }
}
