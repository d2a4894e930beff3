//! The coordinator's HTTP endpoint: `GET /metrics` (Prometheus text; a viewer's), `GET
//! /healthz` (anyone: 200 while the coordinator serves), over TLS when the coordinator has a
//! certificate, with the same authentication as the control API (a bearer token or a client
//! certificate). Connections are tasks of a `JoinSet` the server owns.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio_rustls::rustls;
use tracing::{debug, warn};

use crate::auth::{cert_identities, Auth, Need};

/// What the endpoint serves and how it checks callers.
pub struct Endpoint {
    pub registry: Registry,
    pub auth: Arc<Auth>,
    /// TLS for the connections (none: plain HTTP).
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// Serves `endpoint` on `listener` until the future is dropped.
pub async fn serve(listener: TcpListener, endpoint: Arc<Endpoint>) {
    let acceptor = endpoint.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!(error = %e, "HTTP endpoint: cannot accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let endpoint = endpoint.clone();
        let acceptor = acceptor.clone();
        connections.spawn(async move {
            match acceptor {
                None => connection(stream, endpoint, Vec::new()).await,
                Some(acceptor) => {
                    let tls = match tokio::time::timeout(
                        Duration::from_secs(10),
                        acceptor.accept(stream),
                    )
                    .await
                    {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            return debug!(error = %e, "HTTP endpoint: TLS handshake failed")
                        }
                        Err(_) => return debug!("HTTP endpoint: TLS handshake timed out"),
                    };
                    let identities = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first().map(|c| cert_identities(c.as_ref())))
                        .unwrap_or_default();
                    connection(tls, endpoint, identities).await
                }
            }
        });
    }
}

async fn connection<IO>(io: IO, endpoint: Arc<Endpoint>, identities: Vec<String>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let response = respond(&endpoint, &identities, &req);
        async move { Ok::<_, Infallible>(response) }
    });
    let io = hyper_util::rt::TokioIo::new(io);
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, service)
        .await
    {
        debug!(error = %e, "HTTP endpoint: connection ended");
    }
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

fn respond<B>(
    endpoint: &Endpoint,
    identities: &[String],
    req: &Request<B>,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".into(),
        );
    }
    match req.uri().path() {
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/metrics" => {
            let authorization = req
                .headers()
                .get(hyper::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            if let Err(status) = endpoint.auth.decide(authorization, identities, Need::View) {
                let code = match status.code() {
                    tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
                    _ => StatusCode::FORBIDDEN,
                };
                return reply(code, "text/plain", format!("{}\n", status.message()));
            }
            stagecoach_core::metrics::respond(&endpoint.registry, req)
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: metrics are at GET /metrics, health at GET /healthz\n".into(),
        ),
    }
}
