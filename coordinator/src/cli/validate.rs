//! `stagecoach validate`: a job file checked offline, with every problem or a summary of the plan.

use std::path::Path;

use serde::Serialize;
use stagecoach_proto::v1;

use super::render::{
    format_lr, format_theta, format_weights, human_count, lr_phase_name, to_json, Align, Table,
    WeightReport,
};
use stagecoach_core::retention::CheckpointConfig;
use stagecoach_core::spec::{JobFile, SpecErrors};
use stagecoach_core::spike::SpikeConfig;

/// What `stagecoach validate` prints, and whether the job file passed.
#[derive(Debug, Clone, PartialEq)]
pub struct Validation {
    pub valid: bool,
    pub output: String,
}

/// The JSON form of `stagecoach validate`.
#[derive(Debug, Serialize)]
struct ValidationReport<'a> {
    file: String,
    valid: bool,
    /// The folder the data was checked under; `null` with `--no-data`.
    data_root: Option<String>,
    problems: Vec<&'a str>,
    /// `null` when the file could not be read or parsed into a job.
    job: Option<JobSummary<'a>>,
    /// The checkpoint and spike policy, `null` as `job` is.
    checkpoints: Option<CheckpointsSummary>,
    spikes: Option<SpikesSummary>,
}

#[derive(Debug, Serialize)]
struct CheckpointsSummary {
    dir: String,
    /// 0: only on demand.
    every_steps: u64,
    keep: u32,
}

#[derive(Debug, Serialize)]
struct SpikesSummary {
    enabled: bool,
    window: u32,
    min_steps: u32,
    zscore: f64,
    /// 0: off.
    ratio: f64,
    grad_norm_zscore: f64,
    consecutive: u32,
    ladder: Vec<String>,
    skip_before: u64,
    skip_after: u64,
    lr_factor: f64,
    lr_steps: u64,
    max_rollbacks: u32,
    window_steps: u64,
}

/// The checkpoint and spike policy of a valid job file.
type Policy = (CheckpointConfig, SpikeConfig);

#[derive(Debug, Serialize)]
struct JobSummary<'a> {
    name: &'a str,
    model: String,
    total_steps: u64,
    total_tokens: u64,
    global_batch_tokens: u64,
    /// The longest stage's.
    seq_len: u32,
    stages: Vec<PlannedStage<'a>>,
}

#[derive(Debug, Serialize)]
struct PlannedStage<'a> {
    name: &'a str,
    until_step: u64,
    until_tokens: u64,
    seq_len: u32,
    /// 0: the model's own.
    rope_theta: f64,
    lr_phase: &'static str,
    samples_per_step: u64,
    mix: Vec<WeightReport<'a>>,
}

/// `stagecoach validate JOB`: checks the job file at `path` without a coordinator, and its data
/// under `data_root` unless that is `None`.
pub fn validate(path: &Path, data_root: Option<&Path>, json: bool) -> Validation {
    let (spec, policy, problems) = match JobFile::load(path) {
        Ok(file) => {
            let problems =
                data_root.map_or_else(Vec::new, |root| crate::datacheck::check_data(&file, root));
            let policy = (file.checkpoint_config(), file.spike_config());
            (Some(file.to_proto()), Some(policy), problems)
        }
        Err(SpecErrors(problems)) => (None, None, problems),
    };
    let problems: Vec<&str> = problems.iter().map(|p| p.0.as_str()).collect();
    render_validation(
        path,
        data_root,
        spec.as_ref(),
        policy.as_ref(),
        &problems,
        json,
    )
}

fn render_validation(
    path: &Path,
    data_root: Option<&Path>,
    spec: Option<&v1::JobSpec>,
    policy: Option<&Policy>,
    problems: &[&str],
    json: bool,
) -> Validation {
    let file = path.display().to_string();
    let valid = problems.is_empty();
    let report = ValidationReport {
        file: file.clone(),
        valid,
        data_root: data_root.map(|r| r.display().to_string()),
        problems: problems.to_vec(),
        job: spec.map(summarize),
        checkpoints: policy.map(|(c, _)| CheckpointsSummary {
            dir: c.dir.display().to_string(),
            every_steps: c.every_steps,
            keep: c.keep,
        }),
        spikes: policy.map(|(_, s)| SpikesSummary {
            enabled: s.enabled,
            window: s.window,
            min_steps: s.min_steps,
            zscore: s.zscore,
            ratio: s.ratio,
            grad_norm_zscore: s.grad_norm_zscore,
            consecutive: s.consecutive,
            ladder: s.ladder.iter().map(|r| r.name().to_owned()).collect(),
            skip_before: s.skip_before,
            skip_after: s.skip_after,
            lr_factor: s.lr_factor,
            lr_steps: s.lr_steps,
            max_rollbacks: s.max_rollbacks,
            window_steps: s.window_steps,
        }),
    };
    if json {
        return Validation {
            valid,
            output: to_json(&report),
        };
    }
    let job = match (&report.job, valid) {
        (Some(job), true) => job,
        _ => {
            // A problem with the file as a whole (it cannot be read) may name it already.
            let output = problems
                .iter()
                .map(|p| match p.starts_with(&format!("{file}:")) {
                    true => (*p).to_owned(),
                    false => format!("{file}: {p}"),
                })
                .collect::<Vec<_>>()
                .join("\n");
            return Validation { valid, output };
        }
    };
    let data = match &report.data_root {
        Some(root) => format!("its data is in place under {root}"),
        None => "data not checked (--no-data)".to_owned(),
    };
    let mut out = format!("{file}: job {:?} is valid; {data}\n", job.name);
    out += &format!("model:    {}\n", job.model);
    out += &format!(
        "total:    {} steps, {} tokens ({} tokens per step); longest seq_len {}\n",
        job.total_steps,
        human_count(job.total_tokens),
        job.global_batch_tokens,
        job.seq_len
    );
    if let Some(s) = spec.and_then(|s| s.schedule.as_ref()) {
        let decay = if s.decay_start_step >= job.total_steps {
            "no decay".to_owned()
        } else if s.decay_start_stage.is_empty() {
            format!("decay from step {}", s.decay_start_step)
        } else {
            format!(
                "decay from the start of {} (planned: step {})",
                s.decay_start_stage, s.decay_start_step
            )
        };
        out += &format!(
            "lr:       peak {}, {} warmup steps, {decay}\n",
            format_lr(s.peak_lr),
            s.warmup_steps
        );
    }
    if let Some((c, s)) = policy {
        out += &format!("checkpoints: {}\n", describe_checkpoints(c));
        out += &format!("spikes:   {}\n", describe_spikes(s));
    }
    let mut table = Table::new(&[
        ("#", Align::Right),
        ("stage", Align::Left),
        ("until step", Align::Right),
        ("until tokens", Align::Right),
        ("seq_len", Align::Right),
        ("rope θ", Align::Right),
        ("lr", Align::Left),
        ("samples/step", Align::Right),
        ("mix", Align::Left),
    ]);
    for (i, s) in job.stages.iter().enumerate() {
        table.row(vec![
            (i + 1).to_string(),
            s.name.to_owned(),
            s.until_step.to_string(),
            human_count(s.until_tokens),
            s.seq_len.to_string(),
            format_theta(s.rope_theta),
            s.lr_phase.to_owned(),
            s.samples_per_step.to_string(),
            format_weights(s.mix.iter().map(|w| (w.source, w.weight))),
        ]);
    }
    out += &table.render();
    Validation { valid, output: out }
}

/// `every 50 steps into runs/demo/checkpoints, the last 3 kept`.
fn describe_checkpoints(c: &CheckpointConfig) -> String {
    let when = match c.every_steps {
        0 => "on demand only".to_owned(),
        n => format!("every {n} steps"),
    };
    format!("{when} into {}, the last {} kept", c.dir.display(), c.keep)
}

/// `flag a loss 6σ or 2x above the mean of the last 50 steps; skip, rollback (data of 2 steps
/// before to 2 after); at most 3 rollbacks in 1000 steps`.
fn describe_spikes(s: &SpikeConfig) -> String {
    if !s.enabled {
        return "off".to_owned();
    }
    let mut rules = vec![format!("{}σ", s.zscore)];
    if s.ratio > 0.0 {
        rules.push(format!("{}x", s.ratio));
    }
    let mut out = format!(
        "flag a loss {} above the mean of the last {} steps",
        rules.join(" or "),
        s.window
    );
    if s.grad_norm_zscore > 0.0 {
        out += &format!(" or a grad norm {}σ above its mean", s.grad_norm_zscore);
    }
    if s.consecutive > 1 {
        out += &format!(", {} in a row", s.consecutive);
    }
    let ladder: Vec<&str> = s.ladder.iter().map(|r| r.name()).collect();
    out += &match ladder.is_empty() {
        true => "; detection only".to_owned(),
        false => format!("; {}", ladder.join(", ")),
    };
    if s.has(stagecoach_core::spike::Rung::Rollback) {
        out += &format!(
            " (data of {} steps before to {} after); at most {} rollbacks in {} steps",
            s.skip_before, s.skip_after, s.max_rollbacks, s.window_steps
        );
        if s.lr_factor != 1.0 {
            out += &format!(", then lr x{} for {} steps", s.lr_factor, s.lr_steps);
        }
    }
    out
}

fn summarize(spec: &v1::JobSpec) -> JobSummary<'_> {
    let model = if spec.model_from.is_empty() {
        format!("preset {}", spec.model_preset)
    } else {
        format!("from {}", spec.model_from)
    };
    JobSummary {
        name: &spec.name,
        model,
        total_steps: spec.total_steps,
        total_tokens: spec.total_steps.saturating_mul(spec.global_batch_tokens),
        global_batch_tokens: spec.global_batch_tokens,
        seq_len: spec.seq_len,
        stages: spec
            .stages
            .iter()
            .map(|s| PlannedStage {
                name: &s.name,
                until_step: s.until_step,
                until_tokens: s.until_step.saturating_mul(spec.global_batch_tokens),
                seq_len: s.seq_len,
                rope_theta: s.rope_theta,
                lr_phase: lr_phase_name(s.lr_phase),
                samples_per_step: spec.global_batch_tokens / u64::from(s.seq_len.max(1)),
                mix: spec
                    .sources
                    .iter()
                    .zip(&s.weights)
                    .map(|(source, &weight)| WeightReport {
                        source: &source.name,
                        weight,
                    })
                    .collect(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stagecoach_proto::v1::{LrPhase, StageSpec};

    fn demo_spec() -> v1::JobSpec {
        let source = |name: &str| v1::SourceSpec {
            name: name.into(),
            ..Default::default()
        };
        let stage = |name: &str, until_step, seq_len, weights: &[f64], lr: LrPhase| StageSpec {
            name: name.into(),
            weights: weights.to_vec(),
            until_step,
            seq_len,
            rope_theta: 10_000.0,
            lr_phase: lr.into(),
        };
        v1::JobSpec {
            name: "demo".into(),
            model_preset: "tiny".into(),
            seq_len: 1024,
            total_steps: 300,
            global_batch_tokens: 4_096,
            sources: vec![source("prose"), source("code")],
            stages: vec![
                stage("stable-1", 120, 256, &[0.9, 0.1], LrPhase::Unspecified),
                stage("decay", 300, 1024, &[0.5, 0.5], LrPhase::Decay),
            ],
            schedule: Some(v1::ScheduleSpec {
                peak_lr: 3e-3,
                warmup_steps: 30,
                decay_start_step: 120,
                decay_start_stage: "decay".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn renders_a_valid_job_file() {
        let path = Path::new("examples/demo.toml");
        let spec = demo_spec();
        let policy = (CheckpointConfig::for_job("demo"), SpikeConfig::default());
        let v = render_validation(path, None, Some(&spec), Some(&policy), &[], false);
        assert!(v.valid);
        assert_eq!(
            v.output,
            "examples/demo.toml: job \"demo\" is valid; data not checked (--no-data)\n\
             model:    preset tiny\n\
             total:    300 steps, 1.2M tokens (4096 tokens per step); longest seq_len 1024\n\
             lr:       peak 3.00e-3, 30 warmup steps, decay from the start of decay (planned: step 120)\n\
             checkpoints: every 100 steps into checkpoints/demo, the last 3 kept\n\
             spikes:   flag a loss 6σ or 2x above the mean of the last 50 steps; skip, rollback (data of 2 steps before to 2 after); at most 3 rollbacks in 1000 steps\n\
             #  stage     until step  until tokens  seq_len  rope θ  lr        samples/step  mix\n\
             1  stable-1         120        491.5K      256   10000  schedule            16  prose=0.90 code=0.10\n\
             2  decay            300          1.2M     1024   10000  decay                4  prose=0.50 code=0.50"
        );
        let v = render_validation(
            path,
            Some(Path::new("/data")),
            Some(&spec),
            Some(&policy),
            &[],
            true,
        );
        let json: serde_json::Value = serde_json::from_str(&v.output).unwrap();
        assert_eq!(json["valid"], true);
        assert_eq!(json["data_root"], "/data");
        assert_eq!(json["problems"], serde_json::json!([]));
        assert_eq!(json["job"]["total_tokens"], 1_228_800);
        assert_eq!(json["job"]["stages"][1]["samples_per_step"], 4);
        assert_eq!(json["job"]["stages"][1]["lr_phase"], "decay");
        assert_eq!(
            json["checkpoints"],
            serde_json::json!({"dir": "checkpoints/demo", "every_steps": 100, "keep": 3})
        );
        assert_eq!(
            json["spikes"]["ladder"],
            serde_json::json!(["skip", "rollback"])
        );
        assert_eq!(json["spikes"]["zscore"], 6.0);
        assert_eq!(
            json["job"]["stages"][0]["mix"],
            serde_json::json!([{"source": "prose", "weight": 0.9},
                               {"source": "code", "weight": 0.1}])
        );
    }

    #[test]
    fn describes_the_checkpoint_and_spike_policy() {
        let c = CheckpointConfig {
            every_steps: 0,
            ..CheckpointConfig::for_job("x")
        };
        assert_eq!(
            describe_checkpoints(&c),
            "on demand only into checkpoints/x, the last 3 kept"
        );
        let off = SpikeConfig {
            enabled: false,
            ..SpikeConfig::default()
        };
        assert_eq!(describe_spikes(&off), "off");
        let detect = SpikeConfig {
            ladder: vec![],
            ratio: 0.0,
            grad_norm_zscore: 5.0,
            consecutive: 3,
            ..SpikeConfig::default()
        };
        assert_eq!(
            describe_spikes(&detect),
            "flag a loss 6σ above the mean of the last 50 steps or a grad norm 5σ above its mean, 3 in \
             a row; detection only"
        );
        let lower = SpikeConfig {
            lr_factor: 0.5,
            lr_steps: 20,
            ..SpikeConfig::default()
        };
        assert!(
            describe_spikes(&lower).ends_with(", then lr x0.5 for 20 steps"),
            "{}",
            describe_spikes(&lower)
        );
    }

    #[test]
    fn lists_every_problem_of_a_job_file() {
        let path = Path::new("bad.toml");
        let problems = [
            "[stages][1].mix: the weights sum to 0.9; make them sum to 1",
            "[stages][2].until: 100 steps is not after the previous stage's 120",
        ];
        let v = render_validation(path, None, None, None, &problems, false);
        assert!(!v.valid);
        assert_eq!(
            v.output,
            "bad.toml: [stages][1].mix: the weights sum to 0.9; make them sum to 1\n\
             bad.toml: [stages][2].until: 100 steps is not after the previous stage's 120"
        );
        // The data can be wrong in a file that parsed: the problems only, no summary.
        let spec = demo_spec();
        let missing = ["[[sources]] prose: the folder runs/prose does not exist"];
        let v = render_validation(
            path,
            Some(Path::new(".")),
            Some(&spec),
            None,
            &missing,
            false,
        );
        assert!(!v.valid);
        assert_eq!(
            v.output,
            "bad.toml: [[sources]] prose: the folder runs/prose does not exist"
        );
        let unreadable = ["bad.toml: cannot read the job file: No such file or directory"];
        let v = render_validation(path, None, None, None, &unreadable, false);
        assert_eq!(v.output, unreadable[0]);
        let v = render_validation(path, None, None, None, &problems, true);
        let json: serde_json::Value = serde_json::from_str(&v.output).unwrap();
        assert_eq!(json["valid"], false);
        assert_eq!(json["file"], "bad.toml");
        assert_eq!(json["job"], serde_json::Value::Null);
        assert_eq!(json["spikes"], serde_json::Value::Null);
        assert_eq!(json["problems"][1], problems[1]);
    }
}
