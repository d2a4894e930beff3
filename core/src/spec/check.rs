//! [`JobFile::validate`]: every problem of a job file that needs no data, each starting with its
//! path in the file and saying what to change.

use std::collections::HashMap;
use std::fmt;

use super::{preset, DecayStart, JobFile, SpecError, SpecErrors, Until, PRESETS};

mod policies;

/// Collects problems, each prefixed with its path in the file.
#[derive(Default)]
pub struct Problems(pub Vec<SpecError>);

impl Problems {
    pub fn at(&mut self, path: impl fmt::Display, msg: impl fmt::Display) {
        self.0.push(SpecError(format!("{path}: {msg}")));
    }
}

/// `stages[2] ("stage3")`, or `stages[2]` for a stage without a name (a name too long to be
/// one is cut, so a message never quotes a huge input).
pub fn item_path(list: &str, i: usize, name: &str) -> String {
    if name.is_empty() {
        format!("{list}[{i}]")
    } else {
        format!("{list}[{i}] ({:?})", shown(name))
    }
}

/// The longest duration in milliseconds any setting may have: a week.
pub const MAX_MS: u64 = 7 * 24 * 3600 * 1000;

/// The longest name (of the job, a source or a stage).
pub const MAX_NAME: usize = 64;

/// The most steps a job may have: far beyond any run (11T tokens at 2M per step is 5.5M
/// steps), small enough that every count of steps, tokens and samples fits a u64.
pub const MAX_STEPS: u64 = 1 << 40;

/// The most tokens a job may train (2^62), and per step.
pub const MAX_TOKENS: u64 = 1 << 62;
pub const MAX_BATCH_TOKENS: u64 = 1 << 40;

/// The most samples one step may have.
pub const MAX_SAMPLES_PER_STEP: u64 = 1 << 24;

/// The most held-out samples per source an evaluation may use.
pub const MAX_EVAL_SAMPLES: u32 = 1_000_000;

/// The most workers a job may have, and training threads per worker.
pub const MAX_WORKERS: u32 = 1 << 20;
pub const MAX_THREADS: u32 = 4096;

/// `name`, cut to at most [`MAX_NAME`] characters with an ellipsis, for messages.
pub fn shown(name: &str) -> String {
    if name.chars().count() <= MAX_NAME {
        return name.to_owned();
    }
    let cut: String = name.chars().take(MAX_NAME).collect();
    format!("{cut}… ({} bytes)", name.len())
}

/// What is wrong with a name of the job file (`what` names its kind for the message), if
/// anything: empty, too long, or outside the plain alphabet.
fn name_problem(name: &str, why: &str) -> Option<String> {
    if name.chars().count() > MAX_NAME {
        return Some(format!(
            "{:?} is longer than {MAX_NAME} characters; use a shorter name",
            shown(name)
        ));
    }
    bad_name_char(name).map(|c| {
        format!(
            "{:?} holds {c:?}; use letters, digits, '-', '_', '.' or '+' ({why})",
            shown(name)
        )
    })
}

/// Names are typed on the command line (`stage set NAME`, `mix set STAGE source=weight`) and
/// label metrics, so they keep to a plain alphabet.
fn bad_name_char(name: &str) -> Option<char> {
    name.chars()
        .find(|c| !(c.is_alphanumeric() || matches!(c, '-' | '_' | '.' | '+')))
}

/// A sum or weight as a person would write it (0.9, not 0.9000000000000001).
fn round6(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

fn positive_number(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

fn list(names: impl IntoIterator<Item = impl AsRef<str>>) -> String {
    names
        .into_iter()
        .map(|n| n.as_ref().to_owned())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks a mixture against the sources and aligns it with them (missing sources weigh 0).
/// The messages carry no path: the caller says which stage (the job file or `mix set`).
pub fn align_mix<S: AsRef<str>>(
    sources: &[S],
    mix: &[(String, f64)],
) -> Result<Vec<f64>, Vec<String>> {
    let mut problems = Vec::new();
    if mix.is_empty() {
        let example = sources.first().map(|s| s.as_ref()).unwrap_or("prose");
        return Err(vec![format!(
            "no weights; give weights by source name, e.g. {{ {example} = 1.0 }}"
        )]);
    }
    let mut weights = vec![0.0; sources.len()];
    let mut known = Vec::new();
    let mut all_numbers = true;
    for (name, w) in mix {
        match sources.iter().position(|s| s.as_ref() == name) {
            Some(i) => {
                weights[i] = *w;
                known.push(name.as_str());
            }
            None => problems.push(format!(
                "no source named {name:?}; the sources are {}",
                list(sources)
            )),
        }
        if !w.is_finite() || *w < 0.0 {
            all_numbers = false;
            problems.push(format!(
                "the weight of {name} is {w}; weights must be non-negative numbers"
            ));
        }
    }
    if all_numbers {
        let sum: f64 = mix.iter().map(|(_, w)| w).sum();
        if (sum - 1.0).abs() > 1e-6 {
            problems.push(format!(
                "weights sum to {}; they must sum to 1 (change one of {})",
                round6(sum),
                list(&known)
            ));
        }
    }
    if problems.is_empty() {
        Ok(weights)
    } else {
        Err(problems)
    }
}

/// Divisors of `n` nearest below and above `s`, to suggest a seq_len that fits.
fn nearest_divisors(n: u32, s: u32) -> (Option<u32>, Option<u32>) {
    let mut below = None;
    let mut above = None;
    let mut d = 1u32;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            for x in [d, n / d] {
                if x < s && below.is_none_or(|b| x > b) {
                    below = Some(x);
                }
                if x > s && above.is_none_or(|a| x < a) {
                    above = Some(x);
                }
            }
        }
        d += 1;
    }
    (below, above)
}

fn suggest(options: (Option<u64>, Option<u64>)) -> String {
    match options {
        (Some(a), Some(b)) => format!(" (e.g. {a} or {b})"),
        (Some(a), None) | (None, Some(a)) => format!(" (e.g. {a})"),
        (None, None) => String::new(),
    }
}

impl JobFile {
    /// Checks everything that can be checked without the data, and reports every problem.
    pub fn validate(&self) -> Result<(), SpecErrors> {
        let mut p = Problems::default();
        self.check_job(&mut p);
        self.check_model(&mut p);
        self.check_optimizer(&mut p);
        let budgets_ok = self.check_stage_budgets(&mut p);
        self.check_schedule(&mut p, budgets_ok);
        self.check_data_section(&mut p);
        self.check_sources(&mut p);
        self.check_stages(&mut p);
        self.check_batches(&mut p);
        self.check_train_and_workers(&mut p);
        self.check_checkpoints(&mut p);
        self.check_spikes(&mut p);
        self.check_recovery(&mut p);
        // Stage budgets are checked first (the schedule needs them) but belong with the stages.
        p.0.sort_by_key(|e| section_rank(&e.0));
        if p.0.is_empty() {
            Ok(())
        } else {
            Err(SpecErrors(p.0))
        }
    }

    fn check_job(&self, p: &mut Problems) {
        let name = &self.job.name;
        if name.trim().is_empty() {
            p.at(
                "job.name",
                "empty; name the job (it labels the metrics and the state)",
            );
        } else if let Some(msg) = name_problem(
            name,
            "the name is a folder of the state and of the checkpoints",
        ) {
            p.at("job.name", msg);
        } else if name.starts_with('.') {
            p.at(
                "job.name",
                format!("{name:?} starts with '.'; the job name is a folder name (checkpoints/<job name>), start it with a letter or digit"),
            );
        }
    }

    fn check_model(&self, p: &mut Problems) {
        let m = &self.model;
        match (&m.preset, &m.from) {
            (Some(pr), Some(from)) => p.at(
                "model",
                format!(
                    "give preset or from, not both (preset {pr:?}, from {:?})",
                    from.display().to_string()
                ),
            ),
            (None, None) => p.at(
                "model",
                format!(
                    "give preset = \"NAME\" (one of {}) or from = \"a transformers model folder\"",
                    list(PRESETS.iter().map(|p| p.name))
                ),
            ),
            (Some(name), None) if preset(name).is_none() => p.at(
                "model.preset",
                format!(
                    "unknown preset {name:?}; the presets are {}",
                    list(PRESETS.iter().map(|p| p.name))
                ),
            ),
            (None, Some(from)) if from.as_os_str().is_empty() => p.at(
                "model.from",
                "empty; give a transformers model folder (config.json and safetensors)",
            ),
            _ => {}
        }
        if let Some(theta) = m.rope_theta {
            if !positive_number(theta) {
                p.at(
                    "model.rope_theta",
                    format!("must be a positive number, got {theta}"),
                );
            }
        }
        if m.max_seq_len == Some(0) {
            p.at("model.max_seq_len", "must be positive");
        }
    }

    fn check_optimizer(&self, p: &mut Problems) {
        let o = &self.optimizer;
        if !(0.0..1.0).contains(&o.betas.0) || !(0.0..1.0).contains(&o.betas.1) {
            p.at(
                "optimizer.betas",
                format!(
                    "both must lie in [0, 1), got [{}, {}]",
                    o.betas.0, o.betas.1
                ),
            );
        }
        if !positive_number(o.eps) {
            p.at(
                "optimizer.eps",
                format!("must be a positive number, got {}", o.eps),
            );
        }
        for (key, v) in [("weight_decay", o.weight_decay), ("grad_clip", o.grad_clip)] {
            if !v.is_finite() || v < 0.0 {
                p.at(
                    format!("optimizer.{key}"),
                    format!("must be a non-negative number, got {v}"),
                );
            }
        }
    }

    /// Checks every stage's `until` and that they increase; true when the budgets are sound,
    /// so that what depends on the job's length can be checked.
    fn check_stage_budgets(&self, p: &mut Problems) -> bool {
        let mut ok = !self.stages.is_empty();
        let g = self.data.global_batch_tokens;
        // The last stage with a usable budget: (path, until as written, its step).
        let mut prev: Option<(String, Until, u64)> = None;
        for (i, st) in self.stages.iter().enumerate() {
            let path = item_path("stages", i, &st.name);
            let Some(table) = &st.until else {
                p.at(
                    format!("{path}.until"),
                    "missing; give where this stage ends, counted from the start of the job: \
                     until = { steps = N } or until = { tokens = N }",
                );
                ok = false;
                continue;
            };
            let Some(until) = table.get() else {
                let msg = if table.steps.is_some() {
                    "give steps or tokens, not both"
                } else {
                    "give one of steps or tokens, e.g. until = { steps = 1000 }"
                };
                p.at(format!("{path}.until"), msg);
                ok = false;
                continue;
            };
            let too_far = match until {
                Until::Steps(n) => (n > MAX_STEPS).then(|| format!("{MAX_STEPS} steps")),
                Until::Tokens(t) => (t > MAX_TOKENS).then(|| format!("{MAX_TOKENS} tokens")),
            };
            if let Some(limit) = too_far {
                p.at(
                    format!("{path}.until"),
                    format!("{until} is beyond the largest job stagecoach runs ({limit}); give the stage's real budget"),
                );
                ok = false;
                continue;
            }
            if matches!(until, Until::Steps(0) | Until::Tokens(0)) {
                p.at(
                    format!("{path}.until"),
                    format!("{until} ends the stage before the job starts; give a positive value"),
                );
                ok = false;
                continue;
            }
            let step = match until {
                Until::Steps(n) => n,
                Until::Tokens(_) if g == 0 => {
                    // Tokens cannot become steps; data.global_batch_tokens is reported.
                    ok = false;
                    continue;
                }
                Until::Tokens(t) => t.div_ceil(g),
            };
            if let Some((prev_path, prev_until, prev_step)) = &prev {
                if step <= *prev_step {
                    let at = |u: &Until, s: u64| match u {
                        Until::Steps(_) => u.to_string(),
                        Until::Tokens(_) => format!("{u} (step {s})"),
                    };
                    let hint = match until {
                        Until::Steps(n) => format!(
                            " (for {n} more steps after it, write {})",
                            Until::Steps(prev_step.saturating_add(n))
                        ),
                        Until::Tokens(t) => match prev_until {
                            Until::Tokens(pt) => format!(
                                " (for {t} more tokens after it, write {})",
                                Until::Tokens(pt.saturating_add(t))
                            ),
                            Until::Steps(_) => String::new(),
                        },
                    };
                    p.at(
                        format!("{path}.until"),
                        format!(
                            "{} does not come after {prev_path}.until = {}: a budget that goes \
                             backwards; until counts from the start of the job, so each stage \
                             must end after the one before{hint}",
                            at(&until, step),
                            at(prev_until, *prev_step),
                        ),
                    );
                    ok = false;
                    continue;
                }
            }
            if step.checked_mul(g).is_none_or(|t| t > MAX_TOKENS) {
                p.at(
                    format!("{path}.until"),
                    format!(
                        "{until} at {g} tokens per step is more than {MAX_TOKENS} tokens; give \
                         the stage's real budget"
                    ),
                );
                ok = false;
                continue;
            }
            prev = Some((path, until, step));
        }
        ok && g > 0
    }

    fn check_schedule(&self, p: &mut Problems, budgets_ok: bool) {
        let s = &self.schedule;
        if !positive_number(s.peak_lr) {
            p.at(
                "schedule.peak_lr",
                format!("must be a positive number, got {}", s.peak_lr),
            );
        }
        if positive_number(s.peak_lr) && !(0.0..=s.peak_lr).contains(&s.min_lr) {
            p.at(
                "schedule.min_lr",
                format!("{} must lie in [0, peak_lr] = [0, {}]", s.min_lr, s.peak_lr),
            );
        }
        let total = self.total_steps();
        if budgets_ok && s.warmup_steps >= total {
            p.at(
                "schedule.warmup_steps",
                format!(
                    "{} is not below the job's {total} steps (the end of the last stage); shorten \
                     the warmup",
                    s.warmup_steps
                ),
            );
        }
        let Some(table) = &s.decay_start else {
            return;
        };
        let Some(start) = table.get() else {
            let given: Vec<&str> = [
                table.stage.as_ref().map(|_| "stage"),
                table.step.map(|_| "step"),
                table.tokens.map(|_| "tokens"),
            ]
            .into_iter()
            .flatten()
            .collect();
            let msg = if given.is_empty() {
                "give one of { stage = \"NAME\" }, { step = N } or { tokens = N }".to_owned()
            } else {
                format!(
                    "give exactly one of stage, step or tokens, not {}",
                    given.join(" and ")
                )
            };
            p.at("schedule.decay_start", msg);
            return;
        };
        let (key, step) = match &start {
            DecayStart::Stage(name) => {
                let Some(i) = self.stages.iter().position(|st| &st.name == name) else {
                    if self.stages.is_empty() {
                        return; // "stages: none" says it all
                    }
                    p.at(
                        "schedule.decay_start.stage",
                        format!(
                            "no stage named {name:?}; the stages are {}",
                            list(self.stages.iter().map(|st| st.name.as_str()))
                        ),
                    );
                    return;
                };
                (
                    "stage",
                    i.checked_sub(1).map_or(0, |j| self.stage_until_steps()[j]),
                )
            }
            DecayStart::Step(n) => ("step", *n),
            DecayStart::Tokens(t) => ("tokens", t.div_ceil(self.data.global_batch_tokens.max(1))),
        };
        if !budgets_ok {
            return;
        }
        let at = match &start {
            DecayStart::Stage(name) => format!("stage {name:?} starts at step {step}"),
            DecayStart::Step(_) => format!("step {step}"),
            DecayStart::Tokens(t) => format!(
                "{t} tokens is step {step} at {} tokens per step",
                self.data.global_batch_tokens
            ),
        };
        if step >= total {
            p.at(
                format!("schedule.decay_start.{key}"),
                format!(
                    "{at}, at or after the end of the job (step {total}); the decay must start \
                     before the last stage ends"
                ),
            );
        } else if step < s.warmup_steps {
            p.at(
                format!("schedule.decay_start.{key}"),
                format!(
                    "{at}, before the warmup ends (schedule.warmup_steps = {}); start the decay \
                     later or shorten the warmup",
                    s.warmup_steps
                ),
            );
        }
    }

    fn check_data_section(&self, p: &mut Problems) {
        let d = &self.data;
        for (key, tokens) in [
            ("global_batch_tokens", d.global_batch_tokens),
            ("micro_batch_tokens", d.micro_batch_tokens),
        ] {
            if tokens > MAX_BATCH_TOKENS {
                p.at(
                    format!("data.{key}"),
                    format!(
                        "{tokens} is more than {MAX_BATCH_TOKENS} tokens; give a real batch size"
                    ),
                );
            }
        }
        if d.eval_samples.is_some_and(|n| n > MAX_EVAL_SAMPLES) {
            p.at(
                "data.eval_samples",
                format!(
                    "{} held-out samples per source is more than {MAX_EVAL_SAMPLES}; an \
                     evaluation runs between two steps, keep it to a few hundred",
                    d.eval_samples.unwrap_or_default()
                ),
            );
        }
        if d.global_batch_tokens == 0 {
            p.at(
                "data.global_batch_tokens",
                "must be positive (tokens per optimizer step over all workers)",
            );
        }
        if d.micro_batch_tokens == 0 {
            p.at(
                "data.micro_batch_tokens",
                "must be positive (tokens per forward/backward on one worker)",
            );
        } else if d.micro_batch_tokens > d.global_batch_tokens && d.global_batch_tokens > 0 {
            p.at(
                "data.micro_batch_tokens",
                format!(
                    "{} exceeds data.global_batch_tokens ({}); a micro-batch is a part of one \
                     worker's share of a step",
                    d.micro_batch_tokens, d.global_batch_tokens
                ),
            );
        }
        if let Some(n) = d.eval_samples {
            if n > 0 && self.sources.iter().all(|s| s.eval.is_none()) {
                p.at(
                    "data.eval_samples",
                    format!(
                        "{n} held-out samples per source asked for, but no [[sources]] has an eval \
                         folder; add eval = \"FOLDER\" to the sources to evaluate, or remove \
                         eval_samples"
                    ),
                );
            }
        }
        match (d.eval_seq_len, self.context()) {
            (Some(0), _) => p.at("data.eval_seq_len", "must be positive"),
            (Some(n), Some(ctx)) if n > ctx => p.at(
                "data.eval_seq_len",
                format!(
                    "{n} exceeds the model's context of {ctx} ({}); lower it or raise \
                     [model] max_seq_len",
                    self.context_origin()
                ),
            ),
            _ => {}
        }
    }

    fn check_sources(&self, p: &mut Problems) {
        if self.sources.is_empty() {
            p.at(
                "sources",
                "none; add a [[sources]] table (name, path, optional eval) for every source a \
                 stage draws from",
            );
        }
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (i, src) in self.sources.iter().enumerate() {
            let path = item_path("sources", i, &src.name);
            if src.name.is_empty() {
                p.at(
                    format!("{path}.name"),
                    "missing or empty; name the source (stages weigh it by name)",
                );
            } else if let Some(msg) = name_problem(
                &src.name,
                "names are typed as source=weight on the command line",
            ) {
                p.at(format!("{path}.name"), msg);
            } else if let Some(first) = seen.insert(&src.name, i) {
                seen.insert(&src.name, first);
                p.at(
                    format!("{path}.name"),
                    format!(
                        "{:?} is also the name of sources[{first}]; names must be unique",
                        src.name
                    ),
                );
            }
            if src.path.as_os_str().is_empty() {
                p.at(
                    format!("{path}.path"),
                    "missing or empty; give a folder of .ds shards",
                );
            }
            if src.eval.as_ref().is_some_and(|e| e.as_os_str().is_empty()) {
                p.at(
                    format!("{path}.eval"),
                    "empty; give a folder of held-out .ds shards, or remove the key",
                );
            }
        }
    }

    fn check_stages(&self, p: &mut Problems) {
        if self.stages.is_empty() {
            p.at(
                "stages",
                "none; add at least one [[stages]] table (name, until, seq_len, mix)",
            );
            return;
        }
        let source_names: Vec<&str> = self.sources.iter().map(|s| s.name.as_str()).collect();
        let ctx = self.context();
        let largest = self.largest_seq_len();
        let largest_at = self
            .stages
            .iter()
            .position(|st| st.seq_len == Some(largest))
            .map(|i| item_path("stages", i, &self.stages[i].name))
            .unwrap_or_default();
        let mut names: HashMap<&str, usize> = HashMap::new();
        for (i, st) in self.stages.iter().enumerate() {
            let path = item_path("stages", i, &st.name);
            if st.name.is_empty() {
                p.at(
                    format!("{path}.name"),
                    "missing or empty; name the stage (`stage set NAME` and the metrics use it)",
                );
            } else if let Some(msg) = name_problem(&st.name, "names are typed on the command line")
            {
                p.at(format!("{path}.name"), msg);
            } else if let Some(first) = names.insert(&st.name, i) {
                names.insert(&st.name, first);
                p.at(
                    format!("{path}.name"),
                    format!(
                        "{:?} is also the name of stages[{first}]; names must be unique",
                        st.name
                    ),
                );
            }
            match st.seq_len {
                None => p.at(
                    format!("{path}.seq_len"),
                    "missing; give the sequence length of this stage's samples",
                ),
                Some(0) => p.at(format!("{path}.seq_len"), "must be positive"),
                Some(s) => self.check_seq_len(p, &path, s, ctx, (largest, &largest_at)),
            }
            if let Some(theta) = st.rope_theta {
                if !positive_number(theta) {
                    p.at(
                        format!("{path}.rope_theta"),
                        format!("must be a positive number, got {theta}"),
                    );
                }
            }
            if let Err(problems) = align_mix(&source_names, &st.mix) {
                for msg in problems {
                    p.at(format!("{path}.mix"), msg);
                }
            }
        }
    }

    fn check_seq_len(
        &self,
        p: &mut Problems,
        path: &str,
        s: u32,
        ctx: Option<u32>,
        (largest, largest_at): (u32, &str),
    ) {
        if let Some(ctx) = ctx {
            if s > ctx {
                p.at(
                    format!("{path}.seq_len"),
                    format!(
                        "{s} exceeds the model's context of {ctx} ({}); for context extension \
                         raise [model] max_seq_len (and usually set this stage's rope_theta), or \
                         shorten the stage's seq_len",
                        self.context_origin()
                    ),
                );
            }
        }
        if !largest.is_multiple_of(s) {
            p.at(
                format!("{path}.seq_len"),
                format!(
                    "{s} does not divide the largest seq_len, {largest}, of {largest_at}; sequence \
                     lengths must divide each other so a source's tokens tile without repeats{}",
                    {
                        let (a, b) = nearest_divisors(largest, s);
                        suggest((a.map(u64::from), b.map(u64::from)))
                    }
                ),
            );
        }
    }

    /// The batches against the stages' lengths: one problem per key, naming every length it
    /// does not fit.
    fn check_batches(&self, p: &mut Problems) {
        let d = &self.data;
        let largest = u64::from(self.largest_seq_len());
        if largest == 0 {
            return;
        }
        // Each distinct seq_len with the first stage that uses it.
        let mut lengths: Vec<(u64, String)> = Vec::new();
        for (i, st) in self.stages.iter().enumerate() {
            if let Some(s) = st.seq_len.filter(|s| *s > 0).map(u64::from) {
                if lengths.iter().all(|(l, _)| *l != s) {
                    lengths.push((s, item_path("stages", i, &st.name)));
                }
            }
        }
        for (key, tokens) in [
            ("global_batch_tokens", d.global_batch_tokens),
            ("micro_batch_tokens", d.micro_batch_tokens),
        ] {
            let misfits: Vec<String> = lengths
                .iter()
                .filter(|(s, _)| tokens > 0 && !tokens.is_multiple_of(*s))
                .map(|(s, at)| format!("{s} ({at})"))
                .collect();
            if misfits.is_empty() {
                continue;
            }
            // A multiple of the largest seq_len suits every stage.
            let below = tokens / largest * largest;
            let options = (Some(below).filter(|b| *b > 0), below.checked_add(largest));
            p.at(
                format!("data.{key}"),
                format!(
                    "{tokens} is not a multiple of seq_len {}; every stage's samples must fill \
                     whole batches, so make it a multiple of the largest seq_len, {largest}{}",
                    misfits.join(" nor "),
                    suggest(options)
                ),
            );
        }
        // The shortest samples make the most per step: each is a sample reference in every
        // step's message and ledger record.
        if let Some((smallest, at)) = lengths.iter().min_by_key(|(s, _)| *s) {
            let most = d.global_batch_tokens / smallest;
            if most > MAX_SAMPLES_PER_STEP && d.global_batch_tokens <= MAX_BATCH_TOKENS {
                p.at(
                    "data.global_batch_tokens",
                    format!(
                        "{} tokens at seq_len {smallest} ({at}) make {most} samples per step, more \
                         than {MAX_SAMPLES_PER_STEP}; lower the batch or raise the seq_len",
                        d.global_batch_tokens
                    ),
                );
            }
        }
        // The longest samples make the fewest per step.
        let samples = d.global_batch_tokens / largest;
        if d.global_batch_tokens > 0
            && samples < u64::from(self.workers.max)
            && self.workers.max <= MAX_WORKERS
        {
            let at = lengths
                .iter()
                .find(|(s, _)| *s == largest)
                .map_or(String::new(), |(_, at)| at.clone());
            p.at(
                format!("{at}.seq_len"),
                format!(
                    "{samples} samples per step (data.global_batch_tokens {} / seq_len {largest}) \
                     is fewer than workers.max ({}); every worker needs at least one sample per \
                     step: raise data.global_batch_tokens or lower workers.max",
                    d.global_batch_tokens, self.workers.max
                ),
            );
        }
    }

    fn check_train_and_workers(&self, p: &mut Problems) {
        if self.train.log_every == 0 {
            p.at("train.log_every", "must be positive");
        }
        if self.train.threads > MAX_THREADS {
            p.at(
                "train.threads",
                format!("{} is more than {MAX_THREADS}; give the threads of one worker (0: libtorch's default)", self.train.threads),
            );
        }
        let w = &self.workers;
        if w.max > MAX_WORKERS {
            p.at(
                "workers.max",
                format!("{} is more than {MAX_WORKERS} workers", w.max),
            );
        }
        for (key, ms) in [
            ("lease_ms", w.lease_ms),
            ("heartbeat_ms", w.heartbeat_ms),
            ("collective_timeout_ms", w.collective_timeout_ms),
            ("rendezvous_ms", w.rendezvous_ms),
        ] {
            if ms > MAX_MS {
                p.at(
                    format!("workers.{key}"),
                    format!("{ms} ms is more than a week ({MAX_MS} ms)"),
                );
            }
        }
        if w.min == 0 {
            p.at("workers.min", "must be at least 1");
        } else if w.max < w.min {
            p.at(
                "workers.max",
                format!(
                    "{} is below workers.min ({}); need 1 <= min <= max",
                    w.max, w.min
                ),
            );
        }
        if w.heartbeat_ms == 0 {
            p.at("workers.heartbeat_ms", "must be positive");
        } else if w.lease_ms <= w.heartbeat_ms {
            p.at(
                "workers.lease_ms",
                format!(
                    "{} must exceed heartbeat_ms ({}): a lease should span a few heartbeats",
                    w.lease_ms, w.heartbeat_ms
                ),
            );
        }
        if w.collective_timeout_ms == 0 {
            p.at("workers.collective_timeout_ms", "must be positive");
        }
    }
}

/// Orders problems as they appear in a job file: by section, then by item (`stages[3]`).
fn section_rank(msg: &str) -> (usize, usize) {
    const ORDER: [&str; 12] = [
        "job",
        "model",
        "optimizer",
        "schedule",
        "data",
        "sources",
        "stages",
        "train",
        "workers",
        "checkpoints",
        "spikes",
        "recovery",
    ];
    let head = msg
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .next()
        .unwrap_or("");
    let section = ORDER.iter().position(|s| *s == head).unwrap_or(ORDER.len());
    let item = msg[head.len()..]
        .strip_prefix('[')
        .and_then(|rest| rest.split(']').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    (section, item)
}
