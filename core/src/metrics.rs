//! Metrics helpers both binaries use: registering a metric in a registry of its own
//! ([`register`]), a tokens-per-second (or steps-per-second) estimate over a sliding window
//! ([`Throughput`]), and, with the `http` feature, the `/metrics` endpoint ([`serve`]).

use std::collections::VecDeque;
use std::time::Instant;

use prometheus::Registry;

/// Registers `metric` in `registry` and returns it.
pub fn register<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: Result<M, prometheus::Error>,
) -> M {
    let metric = metric.expect("a valid metric definition");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique");
    metric
}

/// Tokens (or steps) per second over a sliding window of recent steps, by wall clock.
#[derive(Debug, Default)]
pub struct Throughput {
    steps: VecDeque<(Instant, u64)>,
}

impl Throughput {
    /// Steps in the window.
    const WINDOW: usize = 20;

    /// Records a step of `tokens` that ended `at`; returns the rate once the window spans two
    /// steps (the first step's tokens are not counted: the window starts as it ends).
    pub fn record(&mut self, at: Instant, tokens: u64) -> Option<f64> {
        if self.steps.len() == Self::WINDOW {
            self.steps.pop_front();
        }
        self.steps.push_back((at, tokens));
        self.rate()
    }

    /// The rate over the window: tokens (or steps, recorded as 1 each) per second, once the
    /// window spans two records at different times.
    pub fn rate(&self) -> Option<f64> {
        let (first, _) = *self.steps.front()?;
        let (last, _) = *self.steps.back()?;
        let seconds = last.saturating_duration_since(first).as_secs_f64();
        let tokens: u64 = self.steps.iter().skip(1).map(|(_, n)| n).sum();
        (seconds > 0.0).then(|| tokens as f64 / seconds)
    }

    /// Forgets the window (training paused).
    pub fn clear(&mut self) {
        self.steps.clear();
    }
}

#[cfg(feature = "http")]
mod http {
    use std::convert::Infallible;
    use std::time::Duration;

    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Method, Request, Response, StatusCode};
    use prometheus::{Registry, TextEncoder};
    use tracing::{debug, warn};

    /// Serves `registry` in the Prometheus text format on `GET /metrics` (anything else: 404)
    /// until the future is dropped; the connections are tasks of a `JoinSet` it owns, so they
    /// end with it.
    pub async fn serve(listener: tokio::net::TcpListener, registry: Registry) {
        serve_with(listener, move |req| respond(&registry, req)).await
    }

    /// Serves HTTP/1 on `listener`, answering every request with `respond`, until dropped.
    pub async fn serve_with<F>(listener: tokio::net::TcpListener, respond: F)
    where
        F: Fn(&Request<hyper::body::Incoming>) -> Response<Full<Bytes>>
            + Clone
            + Send
            + Sync
            + 'static,
    {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                // Reap finished connections so the set does not grow.
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
            let respond = respond.clone();
            connections.spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let response = respond(&req);
                    async move { Ok::<_, Infallible>(response) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await
                {
                    debug!(error = %e, "HTTP endpoint: connection ended");
                }
            });
        }
    }

    /// The `/metrics` page of `registry`, or 404.
    pub fn respond<B>(registry: &Registry, req: &Request<B>) -> Response<Full<Bytes>> {
        let reply = |status: StatusCode, content_type: &str, body: String| {
            Response::builder()
                .status(status)
                .header(hyper::header::CONTENT_TYPE, content_type)
                .body(Full::new(Bytes::from(body)))
                .expect("a valid response")
        };
        if req.method() != Method::GET || req.uri().path() != "/metrics" {
            let body = "not found: metrics are at GET /metrics\n".to_owned();
            return reply(StatusCode::NOT_FOUND, "text/plain", body);
        }
        match TextEncoder::new().encode_to_string(&registry.gather()) {
            Ok(text) => reply(StatusCode::OK, prometheus::TEXT_FORMAT, text),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("cannot encode the metrics: {e}\n"),
            ),
        }
    }
}

#[cfg(feature = "http")]
pub use http::{respond, serve, serve_with};

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn throughput_over_a_window() {
        let mut t = Throughput::default();
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        assert_eq!(t.record(at(0), 100), None);
        assert_eq!(t.record(at(500), 100), Some(200.0));
        assert_eq!(t.record(at(1000), 300), Some(400.0));
        for i in 0..Throughput::WINDOW as u64 {
            t.record(at(2000 + i * 100), 10);
        }
        // The window now holds 20 steps 100 ms apart: 19 steps of 10 tokens in 1.9 s.
        let rate = t.record(at(2000 + 20 * 100), 10).unwrap();
        assert!((rate - 100.0).abs() < 1e-9, "{rate}");
        t.clear();
        assert_eq!(t.record(at(5000), 10), None);
    }

    #[cfg(feature = "http")]
    #[tokio::test]
    async fn serves_metrics_and_404() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let registry = Registry::new();
        let up = register(
            &registry,
            prometheus::IntGauge::new("stagecoach_job_workers_alive", "w"),
        );
        up.set(0);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, registry.clone()));
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let ok = get("/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("text/plain; version=0.0.4"), "{ok}");
        assert!(ok.contains("\nstagecoach_job_workers_alive 0\n"), "{ok}");
        let missing = get("/").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        server.abort();
    }
}
