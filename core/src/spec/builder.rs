//! [`JobBuilder`]: job files written from code, for tests and tools. It builds the TOML a user
//! would write (so every job it makes goes through the same parser and validation) from a few
//! calls instead of a hand-written text per test.
//!
//! ```
//! use stagecoach_core::spec::builder::JobBuilder;
//! let text = JobBuilder::new("demo")
//!     .source("prose", "data/prose/train")
//!     .source("code", "data/code/train")
//!     .stage("main", 40, 64, &[("prose", 0.8), ("code", 0.2)])
//!     .set("workers.min", 2)
//!     .set("workers.max", 2)
//!     .to_toml();
//! let job = stagecoach_core::spec::JobFile::parse(&text).unwrap();
//! assert_eq!(job.workers.min, 2);
//! ```

use toml::{Table, Value};

/// A job file under construction: sections of keys, sources and stages, in the file's order.
#[derive(Debug, Clone)]
pub struct JobBuilder {
    root: Table,
    sources: Vec<Table>,
    stages: Vec<Table>,
}

impl JobBuilder {
    /// An empty job file: every key is set by the caller.
    pub fn bare() -> JobBuilder {
        JobBuilder {
            root: Table::new(),
            sources: vec![],
            stages: vec![],
        }
    }

    /// A job named `name` training the `micro` preset: WSD with a peak LR of 3e-3 and 4 warmup
    /// steps, 512 tokens per step in micro-batches of 256, one thread. Add sources and stages.
    pub fn new(name: &str) -> JobBuilder {
        JobBuilder::bare()
            .set("job.name", name)
            .set("model.preset", "micro")
            .set("schedule.peak_lr", 3e-3)
            .set("schedule.warmup_steps", 4)
            .set("data.global_batch_tokens", 512)
            .set("data.micro_batch_tokens", 256)
            .set("train.threads", 1)
    }

    /// Sets `key` (dotted: `section.key`, or `section.key.sub` for an inline table such as
    /// `schedule.decay_start.step`) to `value`, creating the tables on the way.
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> JobBuilder {
        let parts: Vec<&str> = key.split('.').collect();
        let (last, tables) = parts.split_last().expect("a non-empty key");
        let mut t = &mut self.root;
        for part in tables {
            t = t
                .entry(part.to_string())
                .or_insert_with(|| Value::Table(Table::new()))
                .as_table_mut()
                .unwrap_or_else(|| panic!("{key}: {part} is not a table"));
        }
        t.insert(last.to_string(), value.into());
        self
    }

    /// Removes `key` (dotted) if it is set.
    pub fn unset(mut self, key: &str) -> JobBuilder {
        let parts: Vec<&str> = key.split('.').collect();
        let (last, tables) = parts.split_last().expect("a non-empty key");
        let mut t = &mut self.root;
        for part in tables {
            match t.get_mut(*part).and_then(Value::as_table_mut) {
                Some(next) => t = next,
                None => return self,
            }
        }
        t.remove(*last);
        self
    }

    /// A source named `name` reading the shard folder `path`.
    pub fn source(mut self, name: &str, path: impl AsRef<std::path::Path>) -> JobBuilder {
        let mut t = Table::new();
        t.insert("name".into(), name.into());
        t.insert("path".into(), path_value(path.as_ref()));
        self.sources.push(t);
        self
    }

    /// A source with a held-out folder for evaluations.
    pub fn source_with_eval(
        mut self,
        name: &str,
        path: impl AsRef<std::path::Path>,
        eval: impl AsRef<std::path::Path>,
    ) -> JobBuilder {
        self = self.source(name, path);
        self.sources
            .last_mut()
            .expect("just added")
            .insert("eval".into(), path_value(eval.as_ref()));
        self
    }

    /// The three training domains of the demo corpus written under `data`
    /// (`stagecoach-worker demo-corpus --output DATA`): prose, math and code, with their
    /// held-out folders when `with_eval`.
    pub fn demo_sources(
        mut self,
        data: impl AsRef<std::path::Path>,
        with_eval: bool,
    ) -> JobBuilder {
        let data = data.as_ref();
        for name in ["prose", "math", "code"] {
            let train = data.join(name).join("train");
            self = if with_eval {
                self.source_with_eval(name, train, data.join(name).join("valid"))
            } else {
                self.source(name, train)
            };
        }
        self
    }

    /// A stage named `name` ending before step `until_steps`, at `seq_len`, with `mix`.
    pub fn stage(
        mut self,
        name: &str,
        until_steps: u64,
        seq_len: u32,
        mix: &[(&str, f64)],
    ) -> JobBuilder {
        let mut until = Table::new();
        until.insert("steps".into(), to_value(until_steps));
        let mut m = Table::new();
        for (source, w) in mix {
            m.insert(source.to_string(), (*w).into());
        }
        let mut t = Table::new();
        t.insert("name".into(), name.into());
        t.insert("until".into(), Value::Table(until));
        t.insert("seq_len".into(), i64::from(seq_len).into());
        t.insert("mix".into(), Value::Table(m));
        self.stages.push(t);
        self
    }

    /// Sets `key` of the last stage added (e.g. `rope_theta`, `lr`).
    pub fn stage_set(mut self, key: &str, value: impl Into<Value>) -> JobBuilder {
        self.stages
            .last_mut()
            .expect("a stage to set a key of")
            .insert(key.into(), value.into());
        self
    }

    /// The `[workers]` settings most tests share: exactly `n` workers, a lease of `lease_ms`,
    /// heartbeats every 200 ms, collectives that give up on a silent peer after 5 s.
    pub fn workers(self, n: u32, lease_ms: u64) -> JobBuilder {
        self.set("workers.min", i64::from(n))
            .set("workers.max", i64::from(n))
            .set("workers.lease_ms", to_value(lease_ms))
            .set("workers.heartbeat_ms", 200)
            .set("workers.collective_timeout_ms", 5000)
    }

    /// The job file's text.
    pub fn to_toml(&self) -> String {
        let mut root = self.root.clone();
        if !self.sources.is_empty() {
            root.insert(
                "sources".into(),
                Value::Array(self.sources.iter().cloned().map(Value::Table).collect()),
            );
        }
        if !self.stages.is_empty() {
            root.insert(
                "stages".into(),
                Value::Array(self.stages.iter().cloned().map(Value::Table).collect()),
            );
        }
        toml::to_string(&root).expect("a table of plain values serializes")
    }

    /// Writes the job file to `path` and returns it.
    pub fn write(&self, path: impl AsRef<std::path::Path>) -> std::path::PathBuf {
        let path = path.as_ref();
        std::fs::write(path, self.to_toml())
            .unwrap_or_else(|e| panic!("cannot write the job file {}: {e}", path.display()));
        path.to_path_buf()
    }
}

fn path_value(p: &std::path::Path) -> Value {
    Value::String(p.to_string_lossy().into_owned())
}

/// A count as a TOML integer (TOML integers are i64).
fn to_value(n: u64) -> Value {
    Value::Integer(i64::try_from(n).expect("a count below 2^63"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::JobFile;

    #[test]
    fn builds_a_job_the_parser_accepts() {
        let text = JobBuilder::new("t")
            .demo_sources("/d", true)
            .stage(
                "one",
                10,
                64,
                &[("prose", 0.5), ("math", 0.3), ("code", 0.2)],
            )
            .stage("two", 20, 128, &[("math", 1.0)])
            .stage_set("rope_theta", 40_000.0)
            .workers(2, 4000)
            .set("schedule.decay_start.step", 12)
            .set("checkpoints.dir", "/ck")
            .to_toml();
        let job = JobFile::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(job.job.name, "t");
        assert_eq!(job.sources.len(), 3);
        assert_eq!(job.stage_until_steps(), vec![10, 20]);
        assert_eq!(job.workers.lease_ms, 4000);
        assert_eq!(job.to_proto().stages[1].rope_theta, 40_000.0);
        let without = JobBuilder::new("t")
            .set("train.threads", 2)
            .unset("train.threads");
        assert!(!without.to_toml().contains("threads"));
    }
}
