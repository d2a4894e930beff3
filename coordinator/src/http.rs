//! The coordinator's HTTP endpoint: `GET /` (or `/status`: the status page, see [`crate::page`];
//! a viewer's), `GET /loss.svg`, `/validation.svg`, `/tokens.svg` (its charts; a viewer's),
//! `GET /metrics` (Prometheus text; a viewer's), `GET /healthz` (anyone: 200 while the
//! coordinator serves), `GET /readyz` (anyone: 200 on the replica that leads, 503 on a
//! standby), over TLS when the coordinator has a certificate, with the same authentication as
//! the control API (a bearer token or a client certificate). Connections are tasks of a
//! `JoinSet` the server owns.

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
use crate::page::{self, PageSource};

/// What the endpoint serves and how it checks callers.
pub struct Endpoint {
    pub registry: Registry,
    pub auth: Arc<Auth>,
    /// TLS for the connections (none: plain HTTP).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The job the status page shows, once a driver runs here (never: a coordinator without
    /// a job; a replica: once it leads).
    pub page: std::sync::OnceLock<PageSource>,
    /// Whether this replica leads (`--ha`), for `GET /readyz`; none: a lone coordinator, always
    /// ready.
    pub leading: Option<tokio::sync::watch::Receiver<bool>>,
}

/// Status pages rendered at once; more callers wait (each asks the driver three questions,
/// and the driver's queue is for the workers first).
const PAGES_AT_ONCE: usize = 4;

/// Serves `endpoint` on `listener` until the future is dropped.
pub async fn serve(listener: TcpListener, endpoint: Arc<Endpoint>) {
    let acceptor = endpoint.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let pages = Arc::new(tokio::sync::Semaphore::new(PAGES_AT_ONCE));
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
        let pages = pages.clone();
        connections.spawn(async move {
            match acceptor {
                None => connection(stream, endpoint, pages, Vec::new()).await,
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
                    connection(tls, endpoint, pages, identities).await
                }
            }
        });
    }
}

async fn connection<IO>(
    io: IO,
    endpoint: Arc<Endpoint>,
    pages: Arc<tokio::sync::Semaphore>,
    identities: Vec<String>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let identities = Arc::new(identities);
    let service = hyper::service::service_fn(move |req| {
        let (endpoint, pages, identities) = (endpoint.clone(), pages.clone(), identities.clone());
        async move { Ok::<_, Infallible>(respond(&endpoint, &pages, &identities, &req).await) }
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

/// A page or chart, never cached (it is out of date by the next step).
fn fresh(content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::OK)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .header(hyper::header::CACHE_CONTROL, "no-store")
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

const HTML: &str = "text/html; charset=utf-8";
const SVG: &str = "image/svg+xml";

async fn respond<B>(
    endpoint: &Endpoint,
    pages: &tokio::sync::Semaphore,
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
    let path = req.uri().path();
    if path == "/healthz" {
        return reply(StatusCode::OK, "text/plain", "ok\n".into());
    }
    // Open to all like /healthz: a load balancer or a Kubernetes Service sends traffic to the
    // leading replica only.
    if path == "/readyz" {
        return match endpoint.leading.as_ref().map(|l| *l.borrow()) {
            None | Some(true) => reply(StatusCode::OK, "text/plain", "ok: leading\n".into()),
            Some(false) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "standing by: another replica leads the job, or an election is under way\n".into(),
            ),
        };
    }
    let page = matches!(path, "/" | "/status");
    let chart = matches!(path, "/loss.svg" | "/validation.svg" | "/tokens.svg");
    if !(page || chart || path == "/metrics") {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: the status page is at GET /, metrics at GET /metrics, health at GET /healthz\n"
                .into(),
        );
    }
    let authorization = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if let Err(status) = endpoint.auth.decide(authorization, identities, Need::View) {
        let code = match status.code() {
            tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            _ => StatusCode::FORBIDDEN,
        };
        let mut response = if page {
            reply(
                code,
                HTML,
                page::render_refused(code.as_u16(), status.message()),
            )
        } else {
            reply(code, "text/plain", format!("{}\n", status.message()))
        };
        if code == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                hyper::header::HeaderValue::from_static("Bearer realm=\"stagecoach\""),
            );
        }
        return response;
    }
    if path == "/metrics" {
        return stagecoach_core::metrics::respond(&endpoint.registry, req);
    }
    let standing_by = endpoint.leading.as_ref().is_some_and(|l| !*l.borrow());
    if standing_by && endpoint.page.get().is_none() {
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "this coordinator stands by: the status page is on the replica that leads (`stagecoach status` names it)\n".into(),
        );
    }
    let Some(source) = endpoint.page.get() else {
        return match page {
            true => reply(StatusCode::NOT_FOUND, HTML, page::render_no_job()),
            false => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "this coordinator runs no job\n".into(),
            ),
        };
    };
    // Waits its turn; the semaphore is never closed.
    let _turn = pages.acquire().await;
    let report = page::gather(source).await;
    match path {
        "/loss.svg" => fresh(SVG, page::svg::loss_chart(&report)),
        "/validation.svg" => fresh(SVG, page::svg::validation_chart(&report)),
        "/tokens.svg" => fresh(SVG, page::svg::tokens_chart(&report)),
        _ => fresh(
            HTML,
            page::render(&report, stagecoach_core::clock::now_ms()),
        ),
    }
}
