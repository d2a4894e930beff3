//! Who may call what: authentication by a client certificate (mutual TLS) or a bearer token,
//! and authorization by role, checked at the top of every RPC and HTTP request.
//!
//! Roles:
//! - `viewer`: status, stages, checkpoints, events, metrics, the status page;
//! - `operator`: everything a viewer may, and stage changes, mixtures, pause, resume,
//!   evaluations, checkpoints and rollbacks;
//! - `worker`: the `Workers` service only (register, the session).
//!
//! A certificate's identity is its Common Name or a DNS SAN. Without rules, a Common Name
//! `ROLE:NAME` (what `stagecoach certs init` writes: `worker:worker`, `operator:ana`) says the
//! role; an auth file can give rules instead (`[[certificate]] identity = "node-*" role =
//! "worker"`). A token is matched by its SHA-256 against the auth file's `[[token]]` entries,
//! in constant time.
//!
//! A coordinator with neither client certificates nor tokens configured is **open**: every
//! caller may do everything, as `anonymous`. The binary allows that only on a loopback
//! address unless `--insecure` is given.
//!
//! The auth file (TOML):
//! ```toml
//! [[token]]
//! name = "ana"                 # who, in the audit trail
//! role = "operator"
//! sha256 = "9f86d0…"           # of the token: `stagecoach certs token` prints both
//!
//! [[certificate]]              # optional: otherwise the CN says ROLE:NAME
//! identity = "node-*.example.org"
//! role = "worker"
//! ```

use std::path::Path;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tonic::{Request, Status};

use crate::error::clip;

/// What a caller is allowed to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Operator,
    Worker,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Worker => "worker",
        }
    }

    fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "worker" => Some(Role::Worker),
            _ => None,
        }
    }

    /// Whether this role may do what `need` asks.
    pub fn allows(self, need: Need) -> bool {
        matches!(
            (self, need),
            (Role::Viewer | Role::Operator, Need::View)
                | (Role::Operator, Need::Operate)
                | (Role::Worker, Need::Work)
        )
    }
}

/// What a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Read the job (a viewer).
    View,
    /// Change the job (an operator).
    Operate,
    /// Take part as a worker.
    Work,
}

impl Need {
    fn role(self) -> &'static str {
        match self {
            Need::View => "viewer (or operator)",
            Need::Operate => "operator",
            Need::Work => "worker",
        }
    }
}

/// The authenticated caller of a request, for decisions and the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    /// `None` on an open coordinator (every caller may do everything).
    pub role: Option<Role>,
    /// How it was told: "certificate", "token" or "open".
    pub by: &'static str,
}

impl Caller {
    /// `operator ana (token)`, or `anonymous` on an open coordinator.
    pub fn describe(&self) -> String {
        match self.role {
            None => self.name.clone(),
            Some(r) => format!("{} {} ({})", r.name(), self.name, self.by),
        }
    }
}

/// Why an auth file or its material cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct AuthError {
    pub path: String,
    pub reason: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthFile {
    #[serde(default)]
    token: Vec<TokenEntry>,
    #[serde(default)]
    certificate: Vec<CertificateRule>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    role: Role,
    sha256: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct CertificateRule {
    identity: String,
    role: Role,
}

/// The coordinator's policy: the tokens it knows, whether client certificates are verified,
/// and how their identities map to roles.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    tokens: Vec<(String, Role, [u8; 32])>,
    /// Client certificates are required and verified by TLS (`--client-ca`).
    certificates: bool,
    rules: Vec<CertificateRule>,
}

impl Auth {
    /// An open coordinator: no certificates, no tokens.
    pub fn open() -> Auth {
        Auth::default()
    }

    /// Reads the auth file at `path` (tokens and certificate rules); `certificates` says
    /// whether TLS verifies client certificates.
    pub fn load(path: Option<&Path>, certificates: bool) -> Result<Auth, AuthError> {
        let mut auth = Auth {
            certificates,
            ..Auth::default()
        };
        let Some(path) = path else {
            return Ok(auth);
        };
        let shown = path.display().to_string();
        let bad = |reason: String| AuthError {
            path: shown.clone(),
            reason,
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad(format!("cannot read the auth file: {e}")))?;
        let file: AuthFile = toml::from_str(&text).map_err(|e| bad(clip(&e.to_string(), 500)))?;
        for (i, t) in file.token.iter().enumerate() {
            let digest = parse_sha256(&t.sha256).ok_or_else(|| {
                bad(format!(
                    "token[{i}] ({:?}): sha256 must be 64 hex digits (`stagecoach certs token` prints it)",
                    clip(&t.name, 64)
                ))
            })?;
            if t.name.trim().is_empty() {
                return Err(bad(format!("token[{i}]: name is empty; name who holds it")));
            }
            auth.tokens.push((t.name.clone(), t.role, digest));
        }
        for (i, r) in file.certificate.iter().enumerate() {
            if r.identity.trim().is_empty() {
                return Err(bad(format!("certificate[{i}]: identity is empty")));
            }
        }
        auth.rules = file.certificate;
        Ok(auth)
    }

    /// Whether every caller may do everything (nothing to authenticate with).
    pub fn is_open(&self) -> bool {
        self.tokens.is_empty() && !self.certificates
    }

    /// Tokens are configured.
    pub fn has_tokens(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// The caller of `request` if it may do what `need` asks; `Unauthenticated` when it says
    /// who it is in no way this coordinator accepts, `PermissionDenied` when its role does not
    /// allow it. Nothing else is done for a refused request.
    pub fn check<T>(&self, request: &Request<T>, need: Need) -> Result<Caller, Status> {
        let bearer = request
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().unwrap_or_default().to_owned());
        let identities = request
            .peer_certs()
            .and_then(|certs| certs.first().map(|c| cert_identities(c.as_ref())))
            .unwrap_or_default();
        self.decide(bearer.as_deref(), &identities, need)
    }

    /// The decision for a caller presenting `authorization` (the header's value) and a client
    /// certificate with `identities` (Common Name first, then DNS SANs).
    pub fn decide(
        &self,
        authorization: Option<&str>,
        identities: &[String],
        need: Need,
    ) -> Result<Caller, Status> {
        let caller = self.identify(authorization, identities, need)?;
        let Some(role) = caller.role else {
            return Ok(caller);
        };
        if !role.allows(need) {
            return Err(Status::permission_denied(format!(
                "{} may not do this: it needs the {} role",
                caller.describe(),
                need.role()
            )));
        }
        Ok(caller)
    }

    /// The caller of `request`, whatever its role (a standby tells any authenticated caller
    /// where the leader is).
    pub fn authenticated<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let bearer = request
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().unwrap_or_default().to_owned());
        let identities = request
            .peer_certs()
            .and_then(|certs| certs.first().map(|c| cert_identities(c.as_ref())))
            .unwrap_or_default();
        self.identify(bearer.as_deref(), &identities, Need::View)
    }

    /// Who presents `authorization` and a certificate with `identities`; `need` only words the
    /// refusal of an unauthenticated caller.
    fn identify(
        &self,
        authorization: Option<&str>,
        identities: &[String],
        need: Need,
    ) -> Result<Caller, Status> {
        if self.is_open() {
            return Ok(Caller {
                name: "anonymous".into(),
                role: None,
                by: "open",
            });
        }
        let caller = match authorization {
            Some(value) => {
                let token = value
                    .strip_prefix("Bearer ")
                    .or_else(|| value.strip_prefix("bearer "))
                    .ok_or_else(|| {
                        Status::unauthenticated(
                            "the authorization header must be `Bearer TOKEN`",
                        )
                    })?;
                self.token_caller(token.trim()).ok_or_else(|| {
                    Status::unauthenticated("the token is not one this coordinator knows")
                })?
            }
            None => match self.certificate_caller(identities) {
                Some(c) => c,
                None if identities.is_empty() => {
                    return Err(Status::unauthenticated(format!(
                        "this coordinator needs a {} token (authorization: Bearer TOKEN) or a client certificate",
                        need.role()
                    )))
                }
                None => {
                    return Err(Status::permission_denied(format!(
                        "the certificate of {:?} has no role here (a Common Name ROLE:NAME, or a [[certificate]] rule in the auth file)",
                        clip(&identities[0], 100)
                    )))
                }
            },
        };
        Ok(caller)
    }

    fn token_caller(&self, token: &str) -> Option<Caller> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Every entry is compared in full, whatever matched before.
        let mut found = None;
        for (name, role, want) in &self.tokens {
            if constant_time_eq(&digest, want) {
                found = Some((name, role));
            }
        }
        found.map(|(name, role)| Caller {
            name: name.clone(),
            role: Some(*role),
            by: "token",
        })
    }

    fn certificate_caller(&self, identities: &[String]) -> Option<Caller> {
        if !self.certificates || identities.is_empty() {
            return None;
        }
        let by_rule = self.rules.iter().find_map(|r| {
            identities
                .iter()
                .find(|id| matches_pattern(&r.identity, id))
                .map(|id| (id.clone(), r.role))
        });
        let (name, role) = match by_rule {
            Some(found) => found,
            None if self.rules.is_empty() => {
                let cn = &identities[0];
                let (role, name) = cn.split_once(':')?;
                (name.to_owned(), Role::parse(role)?)
            }
            None => return None,
        };
        Some(Caller {
            name,
            role: Some(role),
            by: "certificate",
        })
    }
}

/// `pattern` matches `identity` exactly, or, ending in `*`, as a prefix.
fn matches_pattern(pattern: &str, identity: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => identity.starts_with(prefix),
        None => pattern == identity,
    }
}

/// The Common Name(s) and DNS SANs of a DER certificate, Common Name first.
pub fn cert_identities(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return vec![];
    };
    let mut out: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = name {
                out.push((*d).to_owned());
            }
        }
    }
    out
}

fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Equal, in a time that does not depend on where they differ.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The SHA-256 of a token, in lower-case hex (what the auth file holds).
pub fn token_sha256(token: &str) -> String {
    Sha256::digest(token.trim().as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn auth(tokens: &[(&str, Role, &str)], certificates: bool) -> Auth {
        Auth {
            tokens: tokens
                .iter()
                .map(|(n, r, t)| ((*n).into(), *r, parse_sha256(&token_sha256(t)).unwrap()))
                .collect(),
            certificates,
            rules: vec![],
        }
    }

    #[test]
    fn roles_allow_what_they_say() {
        let a = auth(
            &[
                ("ana", Role::Operator, "op-secret"),
                ("vic", Role::Viewer, "view-secret"),
                ("w", Role::Worker, "join-secret"),
            ],
            true,
        );
        let bearer = |t: &str| format!("Bearer {t}");
        assert!(a
            .decide(Some(&bearer("op-secret")), &[], Need::Operate)
            .is_ok());
        assert!(a
            .decide(Some(&bearer("op-secret")), &[], Need::View)
            .is_ok());
        assert_eq!(
            a.decide(Some(&bearer("op-secret")), &[], Need::Work)
                .unwrap_err()
                .code(),
            Code::PermissionDenied
        );
        assert_eq!(
            a.decide(Some(&bearer("view-secret")), &[], Need::Operate)
                .unwrap_err()
                .code(),
            Code::PermissionDenied
        );
        assert_eq!(
            a.decide(Some(&bearer("join-secret")), &[], Need::View)
                .unwrap_err()
                .code(),
            Code::PermissionDenied
        );
        assert!(a
            .decide(Some(&bearer("join-secret")), &[], Need::Work)
            .is_ok());
        assert_eq!(
            a.decide(Some(&bearer("guess")), &[], Need::View)
                .unwrap_err()
                .code(),
            Code::Unauthenticated
        );
        assert_eq!(
            a.decide(Some("Basic x"), &[], Need::View)
                .unwrap_err()
                .code(),
            Code::Unauthenticated
        );
        assert_eq!(
            a.decide(None, &[], Need::View).unwrap_err().code(),
            Code::Unauthenticated
        );
        // Certificates: the Common Name says the role.
        let id = |s: &str| vec![s.to_owned()];
        let c = a.decide(None, &id("operator:ana"), Need::Operate).unwrap();
        assert_eq!(c.describe(), "operator ana (certificate)");
        assert_eq!(
            a.decide(None, &id("worker:node-1"), Need::Operate)
                .unwrap_err()
                .code(),
            Code::PermissionDenied
        );
        assert_eq!(
            a.decide(None, &id("mallory"), Need::View)
                .unwrap_err()
                .code(),
            Code::PermissionDenied
        );
        assert_eq!(
            a.decide(None, &id("root:x"), Need::View)
                .unwrap_err()
                .code(),
            Code::PermissionDenied
        );
        // Open: anyone, anything.
        let open = Auth::open();
        assert_eq!(
            open.decide(None, &[], Need::Operate).unwrap().describe(),
            "anonymous"
        );
    }

    #[test]
    fn rules_map_identities_and_the_file_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth.toml");
        std::fs::write(
            &path,
            format!(
                "[[token]]\nname = \"ci\"\nrole = \"viewer\"\nsha256 = \"{}\"\n[[certificate]]\nidentity = \"node-*\"\nrole = \"worker\"\n",
                token_sha256("abc")
            ),
        )
        .unwrap();
        let a = Auth::load(Some(&path), true).unwrap();
        let ids = vec!["node-7.cluster".to_owned()];
        assert_eq!(
            a.decide(None, &ids, Need::Work).unwrap().name,
            "node-7.cluster"
        );
        // With rules, the CN convention no longer applies.
        let ids = vec!["operator:ana".to_owned()];
        assert_eq!(
            a.decide(None, &ids, Need::Operate).unwrap_err().code(),
            Code::PermissionDenied
        );
        assert!(a.decide(Some("Bearer abc"), &[], Need::View).is_ok());
        for (text, says) in [
            (
                "[[token]]\nname = \"x\"\nrole = \"viewer\"\nsha256 = \"nothex\"\n",
                "64 hex digits",
            ),
            (
                "[[token]]\nname = \"x\"\nrole = \"admin\"\nsha256 = \"00\"\n",
                "unknown variant",
            ),
            ("[[tokens]]\n", "unknown field"),
            (
                "[[certificate]]\nidentity = \"\"\nrole = \"worker\"\n",
                "identity is empty",
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = Auth::load(Some(&path), false).unwrap_err().to_string();
            assert!(err.contains(says), "{err}");
        }
        assert!(Auth::load(Some(&dir.path().join("nope")), false)
            .unwrap_err()
            .to_string()
            .contains("cannot read"));
    }
}
