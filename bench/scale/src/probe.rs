//! What the bench reads beside the protocol: a process's CPU time and peak memory from
//! `/proc`, the coordinator's Prometheus `/metrics`, and the size of a state folder.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};

/// CPU seconds (user + system) and peak resident memory of a process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    pub cpu_seconds: f64,
    /// `VmHWM`: the peak resident set size, in bytes.
    pub peak_rss_bytes: u64,
}

/// The clock ticks per second `/proc/<pid>/stat` counts CPU time in (`getconf CLK_TCK`;
/// 100, Linux's value on every common architecture, if that cannot be run).
pub fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// The usage of process `pid` ("self" for this one).
pub fn usage(pid: &str, ticks: f64) -> anyhow::Result<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat (is process {pid} running?)"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    Ok(Usage {
        cpu_seconds: cpu_ticks(&stat)? as f64 / ticks,
        peak_rss_bytes: peak_rss(&status)?,
    })
}

/// utime + stime of a `/proc/<pid>/stat` line (fields 14 and 15; the command name, field 2,
/// may hold spaces and parentheses, so the fields are counted after its last `)`).
pub fn cpu_ticks(stat: &str) -> anyhow::Result<u64> {
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("a /proc stat line without its command name")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (the state): utime is field 14, stime 15.
    let field = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i - 3)
            .context("a /proc stat line too short")?
            .parse()
            .context("a /proc stat field that is not a number")
    };
    Ok(field(14)? + field(15)?)
}

/// `VmHWM` of a `/proc/<pid>/status` text, in bytes.
pub fn peak_rss(status: &str) -> anyhow::Result<u64> {
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM in /proc status")?;
    let kb: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .context("VmHWM is not a number of kB")?;
    Ok(kb * 1024)
}

/// Bytes of every file under `dir` (recursively).
pub fn folder_bytes(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            total += folder_bytes(&entry.path())?;
        } else {
            total += meta.len();
        }
    }
    Ok(total)
}

/// The samples of a Prometheus text exposition, by series (`name` or `name{labels}`).
pub fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.trim().to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

/// The sum of every series of metric `name` (all its label sets), if it has any.
pub fn metric_sum(samples: &BTreeMap<String, f64>, name: &str) -> Option<f64> {
    let mut found = false;
    let sum = samples
        .iter()
        .filter(|(series, _)| {
            series.as_str() == name
                || series
                    .strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('{'))
        })
        .map(|(_, v)| {
            found = true;
            *v
        })
        .sum();
    found.then_some(sum)
}

/// `GET /metrics` from `url` (`http://host:port[/path]`, plain HTTP), within `timeout`.
pub fn scrape(url: &str, timeout: Duration) -> anyhow::Result<BTreeMap<String, f64>> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("--metrics-url {url:?} must start with http://"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/metrics"),
    };
    let addr: SocketAddr = authority
        .to_socket_addrs()
        .with_context(|| format!("--metrics-url {url:?}: {authority:?} is not host:port"))?
        .next()
        .with_context(|| format!("--metrics-url {url:?}: {authority:?} resolves to nothing"))?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {url}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .with_context(|| format!("reading {url}"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("{url} answered something that is not HTTP"))?;
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        bail!("{url} answered {status:?}");
    }
    Ok(parse_metrics(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_count_past_a_command_name_with_spaces() {
        let stat = "4242 (stagecoach (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 75 0 0 20 0 9 0 123 456 789";
        assert_eq!(cpu_ticks(stat).unwrap(), 325);
        assert!(cpu_ticks("4242 (short) S 1").is_err());
    }

    #[test]
    fn peak_rss_is_read_in_bytes() {
        let status = "Name:\tx\nVmPeak:\t  9000 kB\nVmHWM:\t    1234 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(peak_rss(status).unwrap(), 1234 * 1024);
        assert!(peak_rss("Name:\tx\n").is_err());
    }

    #[test]
    fn metrics_are_summed_over_labels_and_told_apart_by_name() {
        let text = "# HELP stagecoach_job_step Steps\n# TYPE stagecoach_job_step gauge\n\
                    stagecoach_job_step 17\n\
                    stagecoach_job_steps_extra 5\n\
                    stagecoach_job_failures_total{kind=\"transient\"} 2\n\
                    stagecoach_job_failures_total{kind=\"data\"} 1\n";
        let m = parse_metrics(text);
        assert_eq!(metric_sum(&m, "stagecoach_job_step"), Some(17.0));
        assert_eq!(metric_sum(&m, "stagecoach_job_failures_total"), Some(3.0));
        assert_eq!(metric_sum(&m, "stagecoach_job_generation"), None);
    }

    #[test]
    fn this_process_has_a_usage() {
        let u = usage("self", clock_ticks()).unwrap();
        assert!(u.peak_rss_bytes > 0);
        assert!(u.cpu_seconds >= 0.0);
    }
}
