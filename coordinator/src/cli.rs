//! What the `stagecoach` CLI does: connect to the coordinator, query it and render the answer.
//! The binary only parses arguments and prints what these functions return.

use std::error::Error as StdError;
use std::io::ErrorKind;
use std::time::Duration;

use serde::Serialize;
use stagecoach_proto::v1::control_client::ControlClient;
use stagecoach_proto::v1::{GetStatusRequest, GetStatusResponse, JobState};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

use crate::Error;

/// Where the CLI looks for the coordinator unless told otherwise.
pub const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:7070";

/// Exit code when the coordinator cannot be reached (clap also uses 2, for bad arguments).
pub const EXIT_UNREACHABLE: u8 = 2;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The process exit code for a command that failed with `err`.
pub fn exit_code(err: &Error) -> u8 {
    match err {
        Error::Unreachable { .. } => EXIT_UNREACHABLE,
        _ => 1,
    }
}

/// Connects to the coordinator at `url` (`http://` is assumed when it has no scheme).
pub async fn connect(url: &str) -> Result<Client, Error> {
    let url = if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    };
    let endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| Error::InvalidAddress {
            reason: innermost(&e).to_string(),
            url: url.clone(),
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT);
    match endpoint.connect().await {
        Ok(channel) => Ok(Client {
            url,
            inner: ControlClient::new(channel),
        }),
        // Every failure to connect means the coordinator is not there to answer.
        Err(e) => Err(Error::Unreachable {
            reason: describe(&e),
            url,
        }),
    }
}

/// A connection to the coordinator's `Control` service.
#[derive(Debug, Clone)]
pub struct Client {
    url: String,
    inner: ControlClient<Channel>,
}

impl Client {
    pub async fn get_status(&mut self) -> Result<GetStatusResponse, Error> {
        match self.inner.get_status(GetStatusRequest {}).await {
            Ok(response) => Ok(response.into_inner()),
            Err(status) if status.code() == Code::Unavailable => Err(Error::Unreachable {
                reason: describe(&status),
                url: self.url.clone(),
            }),
            Err(status) => Err(Error::Rpc {
                url: self.url.clone(),
                status,
            }),
        }
    }
}

/// `stagecoach status`: the coordinator's status, as text for people or as one line of JSON.
pub async fn status(url: &str, json: bool) -> Result<String, Error> {
    let status = connect(url).await?.get_status().await?;
    Ok(render_status(&status, json))
}

/// The JSON form of `stagecoach status`.
#[derive(Debug, Serialize)]
struct StatusReport<'a> {
    job: &'a str,
    state: String,
    version: &'a str,
    uptime_seconds: u64,
    generation: u64,
    step: u64,
    total_steps: u64,
    /// `null` before the first committed step.
    loss: Option<f64>,
    workers_alive: u32,
    world_size: u32,
    detail: &'a str,
}

pub fn render_status(status: &GetStatusResponse, json: bool) -> String {
    let report = StatusReport {
        job: &status.job,
        state: state_name(status.state),
        version: &status.coordinator_version,
        uptime_seconds: status.uptime_seconds,
        generation: status.generation,
        step: status.step,
        total_steps: status.total_steps,
        loss: status.loss.is_finite().then_some(status.loss),
        workers_alive: status.workers_alive,
        world_size: status.world_size,
        detail: &status.detail,
    };
    if json {
        return serde_json::to_string(&report).expect("strings and integers serialize");
    }
    let mut text = format!(
        "job:      {}\nstate:    {}\nversion:  {}\nuptime:   {}",
        report.job,
        report.state,
        report.version,
        format_uptime(report.uptime_seconds)
    );
    if report.total_steps > 0 {
        let loss = report.loss.map_or("-".to_owned(), |l| format!("{l:.4}"));
        text += &format!(
            "\nstep:     {} / {}\nloss:     {loss}\nworkers:  {} alive, {} in generation {}",
            report.step,
            report.total_steps,
            report.workers_alive,
            report.world_size,
            report.generation
        );
    }
    if !report.detail.is_empty() {
        text += &format!("\ndetail:   {}", report.detail);
    }
    text
}

/// `JOB_STATE_WAITING` → `waiting`; a value this CLI does not know → `unknown (7)`.
fn state_name(state: i32) -> String {
    match JobState::try_from(state) {
        Ok(state) => {
            let name = state.as_str_name();
            name.strip_prefix("JOB_STATE_")
                .unwrap_or(name)
                .to_lowercase()
        }
        Err(_) => format!("unknown ({state})"),
    }
}

/// `3725` → `1h 02m 05s`.
fn format_uptime(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3_600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s:02}s"),
        (0, _, _) => format!("{h}h {m:02}m {s:02}s"),
        _ => format!("{d}d {h:02}h {m:02}m {s:02}s"),
    }
}

/// A short reason for a connection failure: the kind of the underlying socket error when it is
/// one a user recognises ("connection refused"), else the innermost error's message.
fn describe(err: &(dyn StdError + 'static)) -> String {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                ErrorKind::ConnectionRefused
                | ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::TimedOut
                | ErrorKind::HostUnreachable
                | ErrorKind::NetworkUnreachable
                | ErrorKind::AddrNotAvailable => io.kind().to_string(),
                _ => io.to_string(),
            };
        }
        next = e.source();
    }
    innermost(err).to_string()
}

fn innermost<'a>(mut err: &'a (dyn StdError + 'static)) -> &'a (dyn StdError + 'static) {
    while let Some(source) = err.source() {
        err = source;
    }
    err
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptime_is_readable() {
        assert_eq!(format_uptime(0), "0s");
        assert_eq!(format_uptime(59), "59s");
        assert_eq!(format_uptime(65), "1m 05s");
        assert_eq!(format_uptime(3_725), "1h 02m 05s");
        assert_eq!(format_uptime(2 * 86_400 + 61), "2d 00h 01m 01s");
    }

    #[test]
    fn renders_status_as_text_and_json() {
        let status = GetStatusResponse {
            job: "llama".into(),
            state: JobState::Running.into(),
            coordinator_version: "0.1.0".into(),
            uptime_seconds: 65,
            ..Default::default()
        };
        assert_eq!(
            render_status(&status, false),
            "job:      llama\nstate:    running\nversion:  0.1.0\nuptime:   1m 05s"
        );
        let json: serde_json::Value = serde_json::from_str(&render_status(&status, true)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "job": "llama", "state": "running", "version": "0.1.0", "uptime_seconds": 65,
                "generation": 0, "step": 0, "total_steps": 0, "loss": 0.0, "workers_alive": 0,
                "world_size": 0, "detail": ""
            })
        );
        let training = GetStatusResponse {
            step: 12,
            total_steps: 100,
            loss: 2.5,
            workers_alive: 3,
            world_size: 2,
            generation: 4,
            detail: "a worker is a spare".into(),
            ..status
        };
        assert_eq!(
            render_status(&training, false),
            "job:      llama\nstate:    running\nversion:  0.1.0\nuptime:   1m 05s\nstep:     12 / 100\n\
             loss:     2.5000\nworkers:  3 alive, 2 in generation 4\ndetail:   a worker is a spare"
        );
        assert_eq!(state_name(42), "unknown (42)");
    }

    #[tokio::test]
    async fn rejects_an_invalid_address() {
        let err = connect("http://bad host:7070").await.unwrap_err();
        assert!(matches!(err, Error::InvalidAddress { .. }), "{err:?}");
        assert_eq!(exit_code(&err), 1);
    }
}
