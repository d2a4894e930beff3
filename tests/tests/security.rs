//! A secured job as a cluster runs it: `stagecoach certs init` writes the CA, certificates and
//! tokens; the coordinator serves mutual TLS with tokens; two workers join with the worker
//! certificate and train the job to its end, while a client nobody here wrote (Python grpcio,
//! its stubs generated from proto/) calls the coordinator by certificate, by token and with
//! nothing, and reads /metrics over HTTPS. Each role can do what it may, nothing more, and what
//! the operators did is in the audit trail under their authenticated identities.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use stagecoach_e2e::{
    bin, coordinator_with_args, demo_corpus, join_worker, micro_job, python, workspace_dir,
};

/// `stagecoach --coordinator URL --ca … --cert ROLE.pem --key ROLE.key ARGS`: its exit status
/// and stdout + stderr.
fn cli_as(url: &str, certs: &Path, role: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(bin("stagecoach"))
        .args(["--coordinator", url])
        .arg("--ca")
        .arg(certs.join("ca.pem"))
        .arg("--cert")
        .arg(certs.join(format!("{role}.pem")))
        .arg("--key")
        .arg(certs.join(format!("{role}.key")))
        .args(args)
        .output()
        .expect("run stagecoach");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn status_as(url: &str, certs: &Path) -> serde_json::Value {
    let (ok, text) = cli_as(url, certs, "viewer", &["status", "--json"]);
    if !ok {
        return serde_json::Value::Null;
    }
    serde_json::from_str(text.lines().next().unwrap_or_default()).unwrap_or_default()
}

fn wait_status(
    url: &str,
    certs: &Path,
    limit: Duration,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    loop {
        let s = status_as(url, certs);
        if done(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last status: {s}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_mutual_tls_job_trains_and_each_role_is_held_to_what_it_may_do() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let certs = d.join("certs");
    let out = Command::new(bin("stagecoach"))
        .args(["certs", "init"])
        .arg(&certs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let data = demo_corpus(d);
    let job = micro_job(d, "job.toml", "secure", &data, 30, 2);
    let f = |name: &str| certs.join(name).into_os_string();
    let (cert, key, ca, auth) = (
        f("coordinator.pem"),
        f("coordinator.key"),
        f("ca.pem"),
        f("auth.toml"),
    );
    let args: Vec<&OsStr> = vec![
        "--tls-cert".as_ref(),
        &cert,
        "--tls-key".as_ref(),
        &key,
        "--client-ca".as_ref(),
        &ca,
        "--auth".as_ref(),
        &auth,
    ];
    let log = d.join("coordinator.log");
    let (mut coordinator, url, metrics) =
        coordinator_with_args(&job, &d.join("state"), &log, &args);
    assert!(url.starts_with("https://"), "{url}");
    assert!(metrics.starts_with("https://"), "{metrics}");

    // Without the CA the CLI cannot even talk to it; a plain-text client is refused too.
    let out = Command::new(bin("stagecoach"))
        .args(["--coordinator", &url, "status"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let plain = url.replace("https://", "http://");
    let out = Command::new(bin("stagecoach"))
        .args(["--coordinator", &plain, "status"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a plain-text client was served");

    let (w, k) = (
        certs.join("worker.pem").display().to_string(),
        certs.join("worker.key").display().to_string(),
    );
    let ca_s = certs.join("ca.pem").display().to_string();
    let tls = [
        "--ca",
        ca_s.as_str(),
        "--cert",
        w.as_str(),
        "--key",
        k.as_str(),
    ];
    let _w0 = join_worker(&url, d, "worker-0", &tls);
    let token = certs.join("worker.token").display().to_string();
    let _w1 = join_worker(
        &url,
        d,
        "worker-1",
        &["--ca", &ca_s, "--token-file", &token],
    );

    // Pause as soon as the world trains, so the job is still running while the client works.
    wait_status(
        &url,
        &certs,
        Duration::from_secs(120),
        "the first step",
        |s| s["step"].as_u64().unwrap_or(0) >= 1,
    );
    let (ok, text) = cli_as(&url, &certs, "viewer", &["pause"]);
    assert!(!ok, "a viewer paused the job: {text}");
    assert!(
        text.contains("operator"),
        "the refusal should say who may: {text}"
    );
    let (ok, text) = cli_as(&url, &certs, "operator", &["pause"]);
    assert!(ok, "{text}");

    let target = url.strip_prefix("https://").unwrap();
    let out = Command::new(python())
        .arg(workspace_dir().join("tests/python/secure_client.py"))
        .arg("--proto-dir")
        .arg(workspace_dir().join("proto/proto"))
        .args(["--target", target, "--metrics", &metrics])
        .arg("--certs")
        .arg(&certs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the grpcio client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    let expect = serde_json::json!({
        "cert_viewer_status": "OK",
        "cert_viewer_job": "secure",
        "cert_viewer_pause": "PERMISSION_DENIED",
        "cert_operator_pause": "OK",
        "cert_operator_resume": "OK",
        "cert_worker_status": "PERMISSION_DENIED",
        "token_viewer_status": "OK",
        "token_viewer_pause": "PERMISSION_DENIED",
        "token_operator_pause": "OK",
        "token_operator_resume": "OK",
        "token_operator_register": "PERMISSION_DENIED",
        "none_status": "UNAUTHENTICATED",
        "none_register": "UNAUTHENTICATED",
        "untrusted_ca_status": "UNAVAILABLE",
        "healthz_nothing": 200,
        "metrics_no_token": 401,
        "metrics_worker_token": 403,
        "metrics_viewer_token": 200,
        "metrics_has_control_requests": true,
    });
    assert_eq!(got, expect);

    // The job trains to its end with its two workers; nobody else joined.
    let done = wait_status(&url, &certs, Duration::from_secs(300), "the end", |s| {
        s["state"] == "finished"
    });
    assert_eq!(done["step"], 30);
    let ended = coordinator.wait(Duration::from_secs(30));
    assert!(ended.success(), "coordinator: {ended}");

    // The audit trail: every control action under the identity that made it, never the
    // `requested_by` the client claimed.
    let log_text = std::fs::read_to_string(&log).unwrap();
    let audit: Vec<&str> = log_text.lines().filter(|l| l.contains(" audit:")).collect();
    let by = |who: &str, what: &str| {
        audit
            .iter()
            .filter(|l| l.contains(who) && l.contains(what))
            .count()
    };
    assert_eq!(
        by("operator operator (certificate)", "pause"),
        2,
        "{audit:#?}"
    );
    assert_eq!(
        by("operator operator (certificate)", "resume"),
        1,
        "{audit:#?}"
    );
    assert_eq!(by("operator operator (token)", "pause"), 1, "{audit:#?}");
    assert_eq!(by("operator operator (token)", "resume"), 1, "{audit:#?}");
    assert!(
        !log_text.contains("grpcio says it is root"),
        "a claimed identity was recorded"
    );
    // Refusals are audited too.
    assert!(
        audit
            .iter()
            .any(|l| l.contains("viewer viewer") && l.contains("refused")),
        "{audit:#?}"
    );
}
