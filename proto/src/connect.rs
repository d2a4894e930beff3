//! How a client (the `stagecoach` CLI, a worker) reaches a coordinator: over TLS when it has a
//! CA to check the coordinator against (and a certificate of its own for mutual TLS), with a
//! bearer token on every call when it has one. Tokens come from a file or the environment,
//! never from the command line.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A channel that adds the caller's token to every request.
pub type AuthedChannel = InterceptedService<Channel, Bearer>;

/// The environment variable holding a token itself (instead of `--token-file`).
pub const TOKEN_ENV: &str = "STAGECOACH_TOKEN";

/// What a client presents: the CA that signed the coordinator's certificate, its own
/// certificate and key (mutual TLS), and a bearer token.
#[derive(Debug, Clone, Default)]
pub struct ClientAuth {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    token: Option<String>,
}

/// Why a client cannot be set up; the message names the file or value to fix.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConnectError(pub String);

impl ClientAuth {
    /// From the files a user names: the token is read from `token_file` or, without one, from
    /// the `STAGECOACH_TOKEN` environment variable.
    pub fn from_files(
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
        token_file: Option<&Path>,
    ) -> Result<ClientAuth, ConnectError> {
        if cert.is_some() != key.is_some() {
            return Err(ConnectError(
                "give both --cert and --key (a client certificate and its private key), or neither"
                    .into(),
            ));
        }
        for (what, path) in [("--ca", ca), ("--cert", cert), ("--key", key)] {
            if let Some(p) = path {
                if !p.is_file() {
                    return Err(ConnectError(format!(
                        "{what} {}: no such file",
                        p.display()
                    )));
                }
            }
        }
        let token = match token_file {
            Some(p) => {
                let t = std::fs::read_to_string(p).map_err(|e| {
                    ConnectError(format!("--token-file {}: cannot read it: {e}", p.display()))
                })?;
                Some(t)
            }
            None => std::env::var(TOKEN_ENV).ok(),
        };
        let token = token.map(|t| t.trim().to_owned()).filter(|t| !t.is_empty());
        if let Some(t) = &token {
            if MetadataValue::<Ascii>::try_from(format!("Bearer {t}")).is_err() {
                return Err(ConnectError(
                    "the token holds characters an HTTP header cannot carry".into(),
                ));
            }
        }
        Ok(ClientAuth {
            ca: ca.map(Path::to_path_buf),
            cert: cert.map(Path::to_path_buf),
            key: key.map(Path::to_path_buf),
            token,
        })
    }

    /// Whether the connection uses TLS (a CA or a client certificate was given).
    pub fn tls(&self) -> bool {
        self.ca.is_some() || self.cert.is_some()
    }

    /// The interceptor that adds the token to each call (nothing without a token).
    pub fn bearer(&self) -> Bearer {
        Bearer(
            self.token
                .as_ref()
                .and_then(|t| MetadataValue::try_from(format!("Bearer {t}")).ok()),
        )
    }

    /// `url` as the connection will use it: `http://` is assumed without a scheme, and
    /// becomes `https://` when TLS is configured.
    pub fn url(&self, url: &str) -> String {
        let url = if url.contains("://") {
            url.to_owned()
        } else {
            format!("http://{url}")
        };
        match (self.tls(), url.strip_prefix("http://")) {
            (true, Some(rest)) => format!("https://{rest}"),
            _ => url,
        }
    }

    /// An endpoint for `url` with this TLS material.
    pub fn endpoint(&self, url: &str, connect_timeout: Duration) -> Result<Endpoint, ConnectError> {
        let url = self.url(url);
        let mut endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| ConnectError(format!("invalid coordinator address {url:?}: {e}")))?
            .connect_timeout(connect_timeout);
        if self.tls() || url.starts_with("https://") {
            let Some(ca) = &self.ca else {
                return Err(ConnectError(format!(
                    "{url} is TLS: give --ca, the certificate of the CA that signed the coordinator's"
                )));
            };
            let mut tls =
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca, "--ca")?));
            if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
                tls = tls.identity(Identity::from_pem(
                    read(cert, "--cert")?,
                    read(key, "--key")?,
                ));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| {
                    ConnectError(format!(
                        "TLS for {url}: {} (check that --cert and --key are a pair of PEM files, the certificate an X.509 v3 one)",
                        chain(&e)
                    ))
                })?;
        }
        Ok(endpoint)
    }
}

/// An error with its causes: "transport error: ..." says more than "transport error".
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, ConnectError> {
    std::fs::read(path).map_err(|e| ConnectError(format!("{what} {}: {e}", path.display())))
}

/// Adds `authorization: Bearer TOKEN` to every request (when there is a token).
#[derive(Debug, Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}
