//! What the `stagecoach` CLI does: connect to the coordinator, query or command it, and render
//! the answer (`cli/render.rs`, `cli/checkpoints.rs`); and, offline, `validate`, which checks a
//! job file (`cli/validate.rs`), and `export`, which copies a checked model out of a checkpoint
//! folder (`cli/export.rs`). The binary only parses arguments and prints what these functions
//! return.
//!
//! Every read command renders either text for people or one line of JSON (`--json`), whose
//! enums are the proto's names in lower case without their prefix (`running`, `manual_next`).

mod checkpoints;
pub mod export;
pub mod plot;
mod render;
mod validate;

use std::error::Error as StdError;
use std::io::ErrorKind;
use std::time::Duration;

use stagecoach_proto::v1::control_client::ControlClient;
use stagecoach_proto::v1::{
    change_stage_request, ChangeStageRequest, ChangeStageResponse, CheckpointNowRequest,
    EvaluateRequest, GetStatusRequest, GetStatusResponse, ListCheckpointsRequest,
    ListCheckpointsResponse, ListEventsRequest, ListEventsResponse, ListStagesRequest,
    ListStagesResponse, PauseRequest, ResumeRequest, RollbackRequest, RollbackResponse,
    SetMixRequest, SourceWeight,
};
use std::sync::OnceLock;

use stagecoach_proto::connect::{AuthedChannel, ClientAuth};
use tonic::Code;

pub use checkpoints::{render_checkpoints, render_events};
pub use export::export;
use render::or_dash;
pub use render::{format_mix, human_count, render_stages, render_status};
pub use validate::{validate, Validation};

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

/// What this process presents to coordinators (TLS material, a token); set once at start.
static CLIENT_AUTH: OnceLock<ClientAuth> = OnceLock::new();

/// Sets what every later call presents to the coordinator (`--ca`, `--cert`, `--key`,
/// `--token-file`); without it, calls go in the clear with no token.
pub fn set_client_auth(auth: ClientAuth) {
    let _ = CLIENT_AUTH.set(auth);
}

/// How long the CLI waits for replicas to elect a leader when every one it reached stands by.
const ELECTION_WAIT: Duration = Duration::from_secs(10);

/// Connects to the coordinator at `url` (`http://` is assumed when it has no scheme; it becomes
/// `https://` with TLS material). `url` may list several replicas separated by commas: the
/// client connects to the one that leads, following a standby's word on who that is, and waits
/// up to [`ELECTION_WAIT`] while an election is under way.
pub async fn connect(url: &str) -> Result<Client, Error> {
    let urls: Vec<&str> = url
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    if urls.is_empty() {
        return Err(Error::InvalidAddress {
            url: url.to_owned(),
            reason: "no URL: give one, or several separated by commas".into(),
        });
    }
    let started = std::time::Instant::now();
    loop {
        let mut last = None;
        for url in &urls {
            match leader_at(url).await {
                Ok(client) => return Ok(client),
                Err(e) => last = Some(e),
            }
        }
        let e = last.expect("at least one URL was tried");
        let electing =
            matches!(&e, Error::Unreachable { reason, .. } if reason.contains("stands by"));
        if !electing || started.elapsed() >= ELECTION_WAIT {
            return Err(match e {
                Error::Unreachable { reason, .. } if urls.len() > 1 => Error::Unreachable {
                    url: urls.join(","),
                    reason: format!(
                        "no replica could be reached as the leader (the last: {reason})"
                    ),
                },
                e => e,
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// How long the probe that finds the leader waits for one replica's answer: a stopped
/// replica accepts the connection but never answers.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// A client of the coordinator at `url`, or of the leader it names when it stands by.
async fn leader_at(url: &str) -> Result<Client, Error> {
    let client = connect_one(url).await?;
    match probe(client).await? {
        Ok(client) => Ok(client),
        Err(Some(leader)) => match probe(connect_one(&leader).await?).await? {
            Ok(client) => Ok(client),
            Err(_) => Err(Error::Unreachable {
                url: leader,
                reason: "named the leader by a standby, but it stands by too".into(),
            }),
        },
        Err(None) => Err(Error::Unreachable {
            url: url.to_owned(),
            reason: "it stands by and no replica leads yet (an election is under way)".into(),
        }),
    }
}

/// Asks `client`'s coordinator for its status: `Ok(client)` when it answers as the one that
/// serves the job (or refuses the caller, which the real call will report), `Err(leader)`
/// when it stands by, naming the leader if it knows it; an error when it does not answer.
async fn probe(mut client: Client) -> Result<Result<Client, Option<String>>, Error> {
    let mut request = tonic::Request::new(GetStatusRequest {});
    request.set_timeout(PROBE_TIMEOUT);
    match client.inner.get_status(request).await {
        Ok(_) => Ok(Ok(client)),
        Err(status)
            if status.code() == Code::Unavailable
                && status
                    .metadata()
                    .contains_key(stagecoach_proto::LEADER_METADATA) =>
        {
            Ok(Err(status
                .metadata()
                .get(stagecoach_proto::LEADER_METADATA)
                .and_then(|v| v.to_str().ok())
                .filter(|l| !l.is_empty())
                .map(str::to_owned)))
        }
        Err(status)
            if matches!(
                status.code(),
                Code::Unauthenticated | Code::PermissionDenied
            ) =>
        {
            Ok(Ok(client))
        }
        Err(status) => Err(Error::Unreachable {
            reason: describe(&status),
            url: client.url,
        }),
    }
}

/// Connects to the coordinator at `url`.
async fn connect_one(url: &str) -> Result<Client, Error> {
    let auth = CLIENT_AUTH.get().cloned().unwrap_or_default();
    let url = auth.url(url);
    tonic::transport::Endpoint::from_shared(url.clone()).map_err(|e| Error::InvalidAddress {
        reason: innermost(&e).to_string(),
        url: url.clone(),
    })?;
    let endpoint = auth
        .endpoint(&url, CONNECT_TIMEOUT)
        .map_err(|e| Error::Client(e.to_string()))?
        .timeout(CALL_TIMEOUT);
    match endpoint.connect().await {
        Ok(channel) => Ok(Client {
            url,
            inner: ControlClient::with_interceptor(channel, auth.bearer()),
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
    inner: ControlClient<AuthedChannel>,
}

impl Client {
    pub async fn get_status(&mut self) -> Result<GetStatusResponse, Error> {
        let reply = self.inner.get_status(GetStatusRequest {}).await;
        self.answer(reply)
    }

    pub async fn list_stages(&mut self) -> Result<ListStagesResponse, Error> {
        let reply = self.inner.list_stages(ListStagesRequest {}).await;
        self.answer(reply)
    }

    /// Moves to the stage named `stage`, or to the next one when it is `None`.
    pub async fn change_stage(
        &mut self,
        stage: Option<&str>,
        requested_by: &str,
    ) -> Result<ChangeStageResponse, Error> {
        let target = match stage {
            Some(name) => change_stage_request::Target::Stage(name.to_owned()),
            None => change_stage_request::Target::Next(true),
        };
        let request = ChangeStageRequest {
            target: Some(target),
            requested_by: requested_by.to_owned(),
        };
        let reply = self.inner.change_stage(request).await;
        self.answer(reply)
    }

    /// Replaces the mixture of `stage`; returns the first step drawn from it (0: not yet known,
    /// the stage has not started).
    pub async fn set_mix(
        &mut self,
        stage: &str,
        weights: Vec<SourceWeight>,
        requested_by: &str,
    ) -> Result<u64, Error> {
        let request = SetMixRequest {
            stage: stage.to_owned(),
            weights,
            requested_by: requested_by.to_owned(),
        };
        let reply = self.inner.set_mix(request).await;
        self.answer(reply).map(|r| r.effective_step)
    }

    /// Returns the committed steps when the pause takes hold.
    pub async fn pause(&mut self, requested_by: &str) -> Result<u64, Error> {
        let request = PauseRequest {
            requested_by: requested_by.to_owned(),
        };
        let reply = self.inner.pause(request).await;
        self.answer(reply).map(|r| r.step)
    }

    /// Returns the committed steps when training resumes.
    pub async fn resume(&mut self, requested_by: &str) -> Result<u64, Error> {
        let request = ResumeRequest {
            requested_by: requested_by.to_owned(),
        };
        let reply = self.inner.resume(request).await;
        self.answer(reply).map(|r| r.step)
    }

    /// Returns the committed steps the evaluation runs after.
    pub async fn evaluate(&mut self, requested_by: &str) -> Result<u64, Error> {
        let request = EvaluateRequest {
            requested_by: requested_by.to_owned(),
        };
        let reply = self.inner.evaluate(request).await;
        self.answer(reply).map(|r| r.step)
    }

    /// Returns the committed steps the checkpoint will hold.
    pub async fn checkpoint_now(&mut self, requested_by: &str) -> Result<u64, Error> {
        let request = CheckpointNowRequest {
            requested_by: requested_by.to_owned(),
        };
        let reply = self.inner.checkpoint_now(request).await;
        self.answer(reply).map(|r| r.step)
    }

    pub async fn list_checkpoints(&mut self) -> Result<ListCheckpointsResponse, Error> {
        let reply = self.inner.list_checkpoints(ListCheckpointsRequest {}).await;
        self.answer(reply)
    }

    /// Rolls back to `checkpoint` (a path or a step), or to the latest known-good checkpoint
    /// when it is `None`.
    pub async fn rollback(
        &mut self,
        checkpoint: Option<&str>,
        requested_by: &str,
    ) -> Result<RollbackResponse, Error> {
        let request = RollbackRequest {
            checkpoint: checkpoint.unwrap_or_default().to_owned(),
            requested_by: requested_by.to_owned(),
        };
        let reply = self.inner.rollback(request).await;
        self.answer(reply)
    }

    pub async fn list_events(&mut self) -> Result<ListEventsResponse, Error> {
        let reply = self.inner.list_events(ListEventsRequest {}).await;
        self.answer(reply)
    }

    /// Sorts a call's outcome by what the user can do about it: start the coordinator, fix the
    /// request (the coordinator's message says how), or report a fault.
    fn answer<T>(&self, reply: Result<tonic::Response<T>, tonic::Status>) -> Result<T, Error> {
        match reply {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => Err(match status.code() {
                Code::Unavailable => Error::Unreachable {
                    reason: describe(&status),
                    url: self.url.clone(),
                },
                Code::InvalidArgument | Code::FailedPrecondition | Code::NotFound => {
                    Error::Refused {
                        code: status.code(),
                        message: status.message().to_owned(),
                    }
                }
                _ => Error::Rpc {
                    url: self.url.clone(),
                    status,
                },
            }),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------------

/// `stagecoach status`.
pub async fn status(url: &str, json: bool) -> Result<String, Error> {
    let status = connect(url).await?.get_status().await?;
    Ok(render_status(&status, json))
}

/// `stagecoach stages`.
pub async fn stages(url: &str, json: bool) -> Result<String, Error> {
    let stages = connect(url).await?.list_stages().await?;
    Ok(render_stages(&stages, json))
}

/// `stagecoach stage next` (`stage` is `None`) and `stagecoach stage set NAME`.
pub async fn change_stage(url: &str, stage: Option<&str>) -> Result<String, Error> {
    let changed = connect(url)
        .await?
        .change_stage(stage, &requested_by())
        .await?;
    Ok(format!(
        "stage {} → {} at step {}",
        or_dash(&changed.from),
        changed.to,
        changed.effective_step
    ))
}

/// `stagecoach mix set STAGE source=weight...`, with `weights` from [`parse_mix`].
pub async fn set_mix(url: &str, stage: &str, weights: Vec<SourceWeight>) -> Result<String, Error> {
    let mix = format_mix(&weights);
    let mut client = connect(url).await?;
    let step = client.set_mix(stage, weights, &requested_by()).await?;
    // 0 is also the first step of a job that has not trained yet: only the status tells a
    // current first stage from an upcoming one.
    let current = step > 0 || client.get_status().await?.stage == stage;
    Ok(if current {
        format!("mix of {stage} set to {mix}, from step {step}")
    } else {
        format!("mix of {stage} set to {mix}; applies when {stage} starts")
    })
}

/// `stagecoach pause`.
pub async fn pause(url: &str) -> Result<String, Error> {
    let step = connect(url).await?.pause(&requested_by()).await?;
    Ok(format!(
        "paused after step {step}: no further step starts until `stagecoach resume`"
    ))
}

/// `stagecoach resume`.
pub async fn resume(url: &str) -> Result<String, Error> {
    let step = connect(url).await?.resume(&requested_by()).await?;
    Ok(format!("resumed at step {step}"))
}

/// `stagecoach eval`.
pub async fn evaluate(url: &str) -> Result<String, Error> {
    let step = connect(url).await?.evaluate(&requested_by()).await?;
    Ok(format!(
        "evaluation requested: it runs after step {step}; `stagecoach stages` shows its losses"
    ))
}

/// `stagecoach checkpoint now`.
pub async fn checkpoint_now(url: &str) -> Result<String, Error> {
    let step = connect(url).await?.checkpoint_now(&requested_by()).await?;
    Ok(format!(
        "checkpoint requested: it holds the state after step {step}; `stagecoach checkpoints` \
         lists it once written"
    ))
}

/// `stagecoach checkpoints`.
pub async fn checkpoints(url: &str, json: bool) -> Result<String, Error> {
    let mut client = connect(url).await?;
    let list = client.list_checkpoints().await?;
    // Stage names make the table readable; without them the stages are numbered.
    let names: Vec<String> = match client.list_stages().await {
        Ok(stages) => stages.stages.into_iter().map(|s| s.name).collect(),
        Err(_) => Vec::new(),
    };
    Ok(render_checkpoints(&list, &names, json))
}

/// `stagecoach rollback [CHECKPOINT]` (a path or a step; `None`: the latest known-good one).
pub async fn rollback(url: &str, checkpoint: Option<&str>) -> Result<String, Error> {
    let checkpoint = checkpoint.map(str::trim).filter(|c| !c.is_empty());
    let done = connect(url)
        .await?
        .rollback(checkpoint, &requested_by())
        .await?;
    Ok(format!(
        "rolling back to {} (step {}): every rank reloads it and training resumes at step {}",
        done.checkpoint, done.step, done.step
    ))
}

/// `stagecoach events`.
pub async fn events(url: &str, json: bool) -> Result<String, Error> {
    let list = connect(url).await?.list_events().await?;
    Ok(render_events(&list, json))
}

/// Who is asking, for the coordinator's records: `$USER@hostname`.
pub fn requested_by() -> String {
    let user = ["USER", "LOGNAME", "USERNAME"]
        .iter()
        .find_map(|name| std::env::var(name).ok().filter(|u| !u.trim().is_empty()))
        .or_else(login_name);
    requested_by_from(user, hostname())
}

/// The name of this process's user from the password file, for when the environment has none
/// (containers and service managers often start processes without `$USER`).
#[cfg(unix)]
fn login_name() -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    // A process owns its /proc entry, so its owner is our uid, without a libc call.
    let uid = std::fs::metadata("/proc/self").ok()?.uid();
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let name = passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        (fields.nth(1)?.parse::<u32>().ok()? == uid).then(|| name.to_owned())
    });
    Some(name.unwrap_or_else(|| format!("uid{uid}")))
}

#[cfg(not(unix))]
fn login_name() -> Option<String> {
    None
}

fn requested_by_from(user: Option<String>, host: Option<String>) -> String {
    let clean = |s: Option<String>, fallback: &str| {
        s.map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| fallback.to_owned())
    };
    format!(
        "{}@{}",
        clean(user, "unknown-user"),
        clean(host, "unknown-host")
    )
}

/// The host name, from the kernel or the environment (no libc call needed for a label).
fn hostname() -> Option<String> {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|path| std::fs::read_to_string(path).ok())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

// ---------------------------------------------------------------------------------------------
// `mix set` arguments
// ---------------------------------------------------------------------------------------------

const MIX_FORM: &str = "expected source=weight, e.g. prose=0.75";

/// One `source=weight` argument.
pub fn parse_source_weight(arg: &str) -> Result<SourceWeight, String> {
    let Some((source, weight)) = arg.split_once('=') else {
        return Err(format!("{arg:?} has no weight: {MIX_FORM}"));
    };
    let source = source.trim();
    if source.is_empty() {
        return Err(format!("{arg:?} has no source name: {MIX_FORM}"));
    }
    let weight: f64 = weight
        .trim()
        .parse()
        .map_err(|_| format!("{arg:?}: the weight {weight:?} is not a number; {MIX_FORM}"))?;
    if !weight.is_finite() || weight < 0.0 {
        return Err(format!(
            "{arg:?}: a weight must be a finite number ≥ 0; {MIX_FORM}"
        ));
    }
    Ok(SourceWeight {
        source: source.to_owned(),
        weight,
    })
}

/// Checks that no source is given twice.
pub fn check_mix(weights: &[SourceWeight]) -> Result<(), String> {
    for (i, w) in weights.iter().enumerate() {
        if weights[..i]
            .iter()
            .any(|earlier| earlier.source == w.source)
        {
            return Err(format!(
                "source {:?} is given twice: {MIX_FORM}, once per source",
                w.source
            ));
        }
    }
    Ok(())
}

/// The arguments of `mix set` after the stage: one `source=weight` each, no source twice.
pub fn parse_mix<S: AsRef<str>>(args: &[S]) -> Result<Vec<SourceWeight>, String> {
    if args.is_empty() {
        return Err(format!("no weights given: {MIX_FORM}"));
    }
    let weights = args
        .iter()
        .map(|a| parse_source_weight(a.as_ref()))
        .collect::<Result<Vec<_>, _>>()?;
    check_mix(&weights)?;
    Ok(weights)
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

    fn weight(source: &str, weight: f64) -> SourceWeight {
        SourceWeight {
            source: source.into(),
            weight,
        }
    }

    #[test]
    fn parses_source_weight_arguments() {
        assert_eq!(
            parse_mix(&["prose=0.75", "code = 0.2", "math=5e-2"]).unwrap(),
            vec![
                weight("prose", 0.75),
                weight("code", 0.2),
                weight("math", 0.05)
            ]
        );
        assert_eq!(
            format_mix(&parse_mix(&["prose=0.75", "code=0.20", "math=0.05", "web=0"]).unwrap()),
            "prose=0.75 code=0.20 math=0.05"
        );
        let cases = [
            (
                vec!["prose"],
                "\"prose\" has no weight: expected source=weight",
            ),
            (
                vec!["prose=abc"],
                "\"prose=abc\": the weight \"abc\" is not a number; expected source=weight",
            ),
            (
                vec!["=0.5"],
                "\"=0.5\" has no source name: expected source=weight",
            ),
            (
                vec!["prose=-0.1"],
                "\"prose=-0.1\": a weight must be a finite number ≥ 0; expected source=weight",
            ),
            (vec!["prose=inf"], "a weight must be a finite number"),
            (
                vec!["prose=0.5", "code=0.2", "prose=0.3"],
                "source \"prose\" is given twice: expected source=weight",
            ),
            (vec![], "no weights given: expected source=weight"),
        ];
        for (args, expected) in cases {
            let err = parse_mix(&args).unwrap_err();
            assert!(err.contains(expected), "{args:?}: {err}");
            assert!(err.contains("e.g. prose=0.75"), "{args:?}: {err}");
        }
    }

    #[test]
    fn requested_by_is_user_at_host_with_fallbacks() {
        let s = |v: &str| Some(v.to_owned());
        assert_eq!(requested_by_from(s("ana"), s("gpu-07\n")), "ana@gpu-07");
        assert_eq!(requested_by_from(None, s("gpu-07")), "unknown-user@gpu-07");
        assert_eq!(requested_by_from(s(" "), None), "unknown-user@unknown-host");
        let me = requested_by();
        let (user, host) = me.split_once('@').unwrap();
        assert!(!user.is_empty() && !host.is_empty(), "{me}");
    }

    /// Without `$USER`, the name comes from the password file, as `id -un` finds it.
    #[cfg(unix)]
    #[test]
    fn login_name_matches_id() {
        let id = std::process::Command::new("id")
            .arg("-un")
            .output()
            .unwrap();
        assert!(id.status.success(), "{id:?}");
        let expected = String::from_utf8(id.stdout).unwrap();
        assert_eq!(login_name().as_deref(), Some(expected.trim()));
    }

    #[tokio::test]
    async fn rejects_an_invalid_address() {
        let err = connect("http://bad host:7070").await.unwrap_err();
        assert!(matches!(err, Error::InvalidAddress { .. }), "{err:?}");
        assert_eq!(exit_code(&err), 1);
    }
}
