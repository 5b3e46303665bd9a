//! ctl's accept loop: HTTP/1.1 connections served by hyper with a cap on open connections, a
//! deadline for request headers, and a deadline for whole requests. `axum::serve` has none of
//! these knobs, and a daemon that clients reach must not let slow or idle connections pile up.
#![forbid(unsafe_code)]

use crate::error::ApiError;
use crate::server::Peer;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// A client has this long to send its request line and headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A whole request, body and handler included, has this long: above the longest long poll
/// (30 s), far below "forever".
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(45);
/// After a shutdown signal, open connections get this long to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Wraps every request in [`REQUEST_TIMEOUT`] (a body trickling in counts).
pub async fn request_deadline(req: Request, next: Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::Timeout.into_response(),
    }
}

/// Serves `router` on `listener`, at most `max_connections` at once, until `shutdown`
/// resolves; then stops accepting and gives open connections two seconds.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    max_connections: usize,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(max_connections));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = &mut shutdown => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(_) => {
                // Out of file descriptors or a connection reset before accept: back off a
                // little rather than spin.
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let per_conn = router.clone().layer(Extension(Peer(peer.ip())));
        let service = TowerToHyperService::new(per_conn);
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            // An error here is the client's (reset, timeout, garbage); there is nobody to
            // tell but the client, which hyper already answered or dropped.
            let _ = conn.await;
            drop(permit);
        });
    }
    let all = u32::try_from(max_connections).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, slots.acquire_many(all)).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::net::TcpStream;

    /// One request from a blocking thread (ctl's own std client), so the runtime stays free.
    async fn get_health(addr: std::net::SocketAddr) -> String {
        let url = format!("http://{addr}");
        tokio::task::spawn_blocking(move || {
            let r =
                crate::client::request(&url, "GET", "/health", &[], None, Duration::from_secs(5));
            r.map(|r| format!("{} {}", r.status, r.text()))
                .unwrap_or_else(|e| e.to_string())
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn connections_over_the_cap_wait_for_a_free_slot() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new().route("/health", get(|| async { "ok" }));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, router, 1, async {
            let _ = stop_rx.await;
        }));
        let idle = TcpStream::connect(addr).await.unwrap();
        // The idle connection holds the only slot: the second request is not served...
        let waiting = tokio::spawn(get_health(addr));
        let early = tokio::time::timeout(Duration::from_millis(300), async {
            while !waiting.is_finished() {
                tokio::task::yield_now().await;
            }
        });
        assert!(early.await.is_err(), "served past the connection cap");
        // ...until the idle one goes away.
        drop(idle);
        let answer = tokio::time::timeout(Duration::from_secs(2), waiting)
            .await
            .expect("served once a slot frees")
            .unwrap();
        assert_eq!(answer, "200 ok");
        stop_tx.send(()).unwrap();
        server.await.unwrap();
    }
}
