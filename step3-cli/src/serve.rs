//! `step3 serve`: the OpenAI-compatible HTTP server.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use step3::cli::EngineArgs;
use step3::cli::ModelArgs;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    engine: EngineArgs,
    /// Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/* (default: the STEP3_API_KEY variable, else none).
    #[arg(long, env = "STEP3_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The model name clients use (default: --model, else the directory's name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Allow `file://` image URLs below this directory (never outside it).
    #[arg(long)]
    allowed_local_media_path: Option<PathBuf>,
    /// Allow browsers from this origin (CORS is off otherwise).
    #[arg(long)]
    cors_origin: Option<String>,
    /// Largest request body in MiB.
    #[arg(long, default_value_t = 32)]
    max_body_mb: usize,
}

pub fn run(a: ServeArgs) -> Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let name = match (&a.served_model_name, &a.model.model, a.model.is_demo()) {
        (Some(n), _, _) => n.clone(),
        (None, Some(m), _) => m.clone(),
        (None, None, true) => "step3-demo".into(),
        (None, None, false) => a
            .model
            .model_dir
            .as_ref()
            .and_then(|d| d.file_name())
            .map_or("step3".into(), |n| n.to_string_lossy().into_owned()),
    };
    if let Some(dir) = &a.allowed_local_media_path {
        if !dir.is_dir() {
            anyhow::bail!("--allowed-local-media-path {}: not a directory", dir.display());
        }
    }
    let engine = a.engine.config()?;
    let step3 = Arc::new(a.model.load_with(engine)?);
    if a.model.is_demo() {
        tracing::warn!("serving the bundled demo checkpoint: random weights, so its answers are noise");
    }
    let config = step3_server::ServerConfig {
        served_model_name: name.clone(),
        api_key: a.api_key.filter(|k| !k.is_empty()),
        allowed_local_media_path: a.allowed_local_media_path,
        cors_origin: a.cors_origin,
        body_limit: a.max_body_mb.saturating_mul(1 << 20),
        ..Default::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", a.host, a.port))?;
        let addr = listener.local_addr()?;
        tracing::info!(
            "serving {name} on http://{addr} ({} KV blocks of {} tokens){}",
            step3.engine().kv_blocks(),
            step3.engine().config().block_size,
            if config.api_key.is_some() { ", API key required" } else { "" }
        );
        step3_server::serve(listener, step3, config, shutdown_signal()).await.context("serving")
    })?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down: no new connections; finishing what runs");
}
