//! The coordinator's TLS: its certificate and key, and the CA its clients' certificates must be
//! signed by (mutual TLS), for the gRPC services (tonic's rustls) and the HTTP endpoint
//! (tokio-rustls with the same material).

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// Why the TLS material cannot be used; the message names the file.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(pub String);

/// The coordinator's TLS material, read once at start.
#[derive(Clone)]
pub struct ServerTls {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    certs: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    client_ca: Option<(Vec<u8>, Vec<CertificateDer<'static>>)>,
    /// With tokens also accepted, a client may come without a certificate.
    client_optional: bool,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("mutual", &self.client_ca.is_some())
            .finish()
    }
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError(format!("{what} {}: {e}", path.display())))
}

impl ServerTls {
    /// Reads the coordinator's certificate chain and key, and the client CA for mutual TLS.
    pub fn load(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
        client_optional: bool,
    ) -> Result<ServerTls, TlsError> {
        let cert_pem = read(cert, "--tls-cert")?;
        let key_pem = read(key, "--tls-key")?;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError(format!("--tls-cert {}: {e}", cert.display())))?;
        if certs.is_empty() {
            return Err(TlsError(format!(
                "--tls-cert {}: no PEM certificate in it",
                cert.display()
            )));
        }
        let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            TlsError(format!(
                "--tls-key {}: no PEM private key in it ({e})",
                key.display()
            ))
        })?;
        let client_ca = match client_ca {
            None => None,
            Some(p) => {
                let pem = read(p, "--client-ca")?;
                let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
                    .collect::<Result<_, _>>()
                    .map_err(|e| TlsError(format!("--client-ca {}: {e}", p.display())))?;
                if roots.is_empty() {
                    return Err(TlsError(format!(
                        "--client-ca {}: no PEM certificate in it",
                        p.display()
                    )));
                }
                Some((pem, roots))
            }
        };
        let tls = ServerTls {
            cert_pem,
            key_pem,
            certs,
            key: Arc::new(private),
            client_ca,
            client_optional,
        };
        // Fail now, naming the files, rather than at the first connection.
        tls.rustls()?;
        Ok(tls)
    }

    /// Whether client certificates are verified.
    pub fn mutual(&self) -> bool {
        self.client_ca.is_some()
    }

    /// For tonic's server.
    pub fn grpc(&self) -> ServerTlsConfig {
        let mut c =
            ServerTlsConfig::new().identity(Identity::from_pem(&self.cert_pem, &self.key_pem));
        if let Some((pem, _)) = &self.client_ca {
            c = c
                .client_ca_root(Certificate::from_pem(pem))
                .client_auth_optional(self.client_optional);
        }
        c
    }

    /// For the HTTP endpoint. A client certificate is asked for but never required at the
    /// handshake, even under mutual TLS: every path but `/healthz` authorizes its caller (a
    /// certificate or a token) itself, and `/healthz` must answer probes that present none
    /// (a kubelet's).
    pub fn rustls(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(format!("TLS: {e}")))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some((_, roots)) => {
                let mut store = rustls::RootCertStore::empty();
                for r in roots {
                    store
                        .add(r.clone())
                        .map_err(|e| TlsError(format!("--client-ca: {e}")))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    store.into(),
                    provider,
                );
                let verifier = verifier
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| TlsError(format!("--client-ca: {e}")))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(self.certs.clone(), self.key.clone_key())
            .map_err(|e| TlsError(format!("--tls-cert and --tls-key do not go together: {e}")))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}
