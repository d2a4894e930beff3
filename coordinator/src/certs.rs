//! `stagecoach certs init DIR`: everything a cluster needs to run a coordinator with mutual TLS
//! and tokens, made with rcgen:
//!
//! ```text
//! DIR/ca.pem, ca.key                    the cluster's CA (keep ca.key off the cluster)
//! DIR/coordinator.pem, coordinator.key  the coordinator's certificate: localhost, 127.0.0.1,
//!                                       ::1 and every --host NAME
//! DIR/worker.pem, worker.key            a client certificate, Common Name worker:worker
//! DIR/operator.pem, operator.key        ... operator:operator
//! DIR/viewer.pem, viewer.key            ... viewer:viewer
//! DIR/worker.token, operator.token, viewer.token   a random token per role
//! DIR/auth.toml                         the tokens' SHA-256 with their roles (--auth)
//! ```
//! Keys and tokens are written readable by their owner only. `stagecoach certs token` adds a
//! token for one person.

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::auth::token_sha256;
use crate::Error;

/// How long the certificates are valid.
const DAYS: i64 = 365;

fn destination(path: &Path, reason: impl Into<String>) -> Error {
    Error::Destination {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Writes `contents` to `dir/name` (readable by its owner only when `secret`), refusing to
/// replace a file.
fn write(dir: &Path, name: &str, contents: &str, secret: bool) -> Result<PathBuf, Error> {
    let path = dir.join(name);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut f = options.open(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => destination(
            &path,
            "already exists; certs init never replaces a file (choose an empty folder)",
        ),
        _ => destination(&path, e.to_string()),
    })?;
    f.write_all(contents.as_bytes())
        .map_err(|e| destination(&path, e.to_string()))?;
    Ok(path)
}

fn rcgen_error(what: &str) -> impl FnOnce(rcgen::Error) -> Error + '_ {
    move |e| Error::InvalidArgument(format!("cannot make the {what} certificate: {e}"))
}

fn validity(params: &mut CertificateParams) {
    let now = time_now();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(DAYS);
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// A random token: 32 bytes in hex.
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the operating system's random numbers");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `stagecoach certs init DIR`: see the module documentation. Returns what to print.
pub fn init(dir: &Path, hosts: &[String]) -> Result<String, Error> {
    std::fs::create_dir_all(dir).map_err(|e| destination(dir, e.to_string()))?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(rcgen_error("CA"))?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "stagecoach cluster CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut ca_params);
    let ca_key = KeyPair::generate().map_err(rcgen_error("CA"))?;
    let ca_cert = ca_params.self_signed(&ca_key).map_err(rcgen_error("CA"))?;
    write(dir, "ca.pem", &ca_cert.pem(), false)?;
    write(dir, "ca.key", &ca_key.serialize_pem(), true)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    names.extend(hosts.iter().cloned());
    leaf(dir, "coordinator", "coordinator", names, true, &issuer)?;
    for role in ["worker", "operator", "viewer"] {
        leaf(dir, role, &format!("{role}:{role}"), vec![], false, &issuer)?;
    }
    let mut auth = String::from(
        "# Tokens the coordinator accepts (--auth FILE), by the SHA-256 of each; the tokens are\n\
         # in the *.token files next to this one. Add people with `stagecoach certs token`.\n",
    );
    for role in ["worker", "operator", "viewer"] {
        let token = new_token();
        write(dir, &format!("{role}.token"), &format!("{token}\n"), true)?;
        auth.push_str(&format!(
            "\n[[token]]\nname = \"{role}\"\nrole = \"{role}\"\nsha256 = \"{}\"\n",
            token_sha256(&token)
        ));
    }
    write(dir, "auth.toml", &auth, false)?;
    Ok(format!(
        "wrote a CA, certificates for the coordinator ({}) and for a worker, an operator and a viewer, a token per role and auth.toml into {}\n\
         coordinator: --tls-cert {d}/coordinator.pem --tls-key {d}/coordinator.key --client-ca {d}/ca.pem --auth {d}/auth.toml\n\
         workers:     --ca {d}/ca.pem --cert {d}/worker.pem --key {d}/worker.key   (or --token-file {d}/worker.token)\n\
         CLI:         --ca {d}/ca.pem --cert {d}/operator.pem --key {d}/operator.key   (or --token-file {d}/operator.token)\n\
         keep {d}/ca.key away from the cluster: it signs new certificates",
        hosts_list(hosts),
        dir.display(),
        d = dir.display()
    ))
}

fn hosts_list(hosts: &[String]) -> String {
    let mut all = vec!["localhost", "127.0.0.1", "::1"];
    all.extend(hosts.iter().map(String::as_str));
    all.join(", ")
}

/// One certificate signed by the CA: a server's (with `names` as SANs) or a client's.
fn leaf(
    dir: &Path,
    file: &str,
    common_name: &str,
    names: Vec<String>,
    server: bool,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<(), Error> {
    let mut params = CertificateParams::new(names).map_err(rcgen_error(file))?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    validity(&mut params);
    let key = KeyPair::generate().map_err(rcgen_error(file))?;
    let cert = params.signed_by(&key, issuer).map_err(rcgen_error(file))?;
    write(dir, &format!("{file}.pem"), &cert.pem(), false)?;
    write(dir, &format!("{file}.key"), &key.serialize_pem(), true)?;
    Ok(())
}

/// `stagecoach certs token --name NAME --role ROLE --out FILE`: a new token in FILE (readable
/// by its owner only) and the `[[token]]` entry to add to the auth file, printed.
pub fn token(name: &str, role: crate::auth::Role, out: &Path) -> Result<String, Error> {
    if name.trim().is_empty() || name.len() > 128 || name.contains(['"', '\n', '\\']) {
        return Err(Error::InvalidArgument(
            "--name: a plain name of at most 128 characters (who holds the token)".into(),
        ));
    }
    let token = new_token();
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file = out
        .file_name()
        .and_then(|f| f.to_str())
        .ok_or_else(|| destination(out, "not a file name"))?;
    write(dir, file, &format!("{token}\n"), true)?;
    Ok(format!(
        "wrote the token to {}; add this to the coordinator's auth file:\n\n[[token]]\nname = \"{name}\"\nrole = \"{}\"\nsha256 = \"{}\"",
        out.display(),
        role.name(),
        token_sha256(&token)
    ))
}
