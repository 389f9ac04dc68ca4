//! Helpers shared by the subcommands: flag parsing and graceful shutdown.

use anyhow::Context;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Stop flag shared with the services (`forest_processor::Shutdown` and the fulfilment's are
/// the same type).
pub type Shutdown = Arc<AtomicBool>;

pub fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!(
            "expected key=value (a librdkafka setting), got {s:?}"
        )),
    }
}

/// Sets the returned flag on SIGTERM or Ctrl-C.
pub fn shutdown_on_signal() -> anyhow::Result<Shutdown> {
    let flag: Shutdown = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("signal runtime")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            rt.block_on(async {
                #[cfg(unix)]
                {
                    let mut term = match tokio::signal::unix::signal(
                        tokio::signal::unix::SignalKind::terminate(),
                    ) {
                        Ok(t) => t,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot listen for SIGTERM");
                            let _ = tokio::signal::ctrl_c().await;
                            return;
                        }
                    };
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                }
                #[cfg(not(unix))]
                let _ = tokio::signal::ctrl_c().await;
            });
            tracing::info!("shutdown requested: finishing the batch and committing");
            f.store(true, Ordering::Relaxed);
        })?;
    Ok(flag)
}

/// Every topic the processor and fulfilment use, once each.
pub fn all_topics(
    t: &forest_processor::Topics,
    f: &forest_fulfilment::FulfilmentTopics,
) -> Vec<String> {
    let mut v = vec![
        t.payments.clone(),
        t.mobility.clone(),
        t.commands.clone(),
        t.trees.clone(),
        t.dlq.clone(),
        t.changelog.clone(),
        f.trees.clone(),
        f.dlq.clone(),
        f.confirmations.clone(),
        f.orders.clone(),
        f.certificates.clone(),
    ];
    v.sort();
    v.dedup();
    v
}

/// Why the process is not ready, or `Ok` (the `/readyz` answer).
pub type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Serves, on `addr` (`off` disables): `/metrics` (Prometheus text, every Forest metric
/// described), `/healthz` (200 while the process runs) and `/readyz` (200 when `ready` says so,
/// else 503 with the reason). One port, so one probe configuration covers all three.
pub fn install_metrics(addr: &str, ready: Readiness) -> anyhow::Result<()> {
    if addr == "off" {
        return Ok(());
    }
    let socket: std::net::SocketAddr = addr
        .parse()
        .with_context(|| format!("--metrics-addr {addr:?} is not HOST:PORT (or `off`)"))?;
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            &[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0, 300.0,
            ],
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Suffix("_events".into()),
                &[
                    1.0, 10.0, 100.0, 500.0, 1_000.0, 2_000.0, 5_000.0, 10_000.0, 50_000.0,
                ],
            )
        })
        .context("histogram buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    forest_processor::metrics::describe();
    forest_fulfilment::metrics::describe();
    forest_kafka::health::describe();
    forest_store::metrics::describe();
    // Bind here, so a port in use fails start-up with a clear message.
    let listener = std::net::TcpListener::bind(socket).with_context(|| {
        format!("cannot serve metrics on {addr} (port in use? pass --metrics-addr)")
    })?;
    listener.set_nonblocking(true).context("metrics listener")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("metrics runtime")?;
    std::thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            rt.block_on(async move {
                use axum::http::StatusCode;
                use axum::routing::get;
                let app = axum::Router::new()
                    .route(
                        "/metrics",
                        get(move || {
                            let h = handle.clone();
                            async move {
                                h.run_upkeep();
                                h.render()
                            }
                        }),
                    )
                    .route("/healthz", get(|| async { "ok\n" }))
                    .route(
                        "/readyz",
                        get(move || {
                            let r = ready.clone();
                            async move {
                                match r() {
                                    Ok(()) => (StatusCode::OK, "ready\n".to_string()),
                                    Err(why) => (
                                        StatusCode::SERVICE_UNAVAILABLE,
                                        format!("not ready: {why}\n"),
                                    ),
                                }
                            }
                        }),
                    );
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => {
                        if let Err(e) = axum::serve(l, app).await {
                            tracing::error!(error = %e, "metrics server stopped");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "metrics listener"),
                }
            })
        })
        .context("metrics thread")?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    Ok(())
}
