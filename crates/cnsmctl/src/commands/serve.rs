//! `serve`: the HTTP API on the embedded store in `--data-dir` (or the PostgreSQL store of
//! `--store`, as one of several nodes), until SIGTERM or Ctrl-C.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;

use cnsm_runtime::delivery::{Deliverer, DeliveryOptions};
use cnsm_runtime::{Runtime, RuntimeOptions};
use cnsm_server::auth::AuthConfig;
use cnsm_server::{ServeError, ServerOptions};
use cnsm_store::embedded::EmbeddedStore;

use super::Context;
use crate::cli::ServeArgs;
use crate::error::CliError;
use crate::output::Out;

/// The address of `--listen`: `HOST:PORT`, a name resolved once (`localhost:8080`).
fn listen_address(text: &str) -> Result<SocketAddr, CliError> {
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Ok(address);
    }
    text.to_socket_addrs()
        .ok()
        .and_then(|mut addresses| addresses.next())
        .ok_or_else(|| {
            CliError::invalid(format!(
                "--listen '{text}' is not an address like 127.0.0.1:8080"
            ))
        })
}

/// Serves until a signal, then drains and flushes. The first line of stdout names the
/// address (useful with port 0).
pub async fn run(context: &Context, args: &ServeArgs, out: &mut Out) -> Result<(), CliError> {
    if context.server.is_some() {
        return Err(CliError::invalid(
            "serve runs a server on --data-dir; it does not take --server (unset CNSM_SERVER)",
        ));
    }
    let address = listen_address(&args.listen)?;
    // A bad auth file is refused before the store is opened or anything listens.
    let auth = match &args.auth_file {
        Some(path) => {
            let (config, warnings) =
                AuthConfig::load(path).map_err(|e| CliError::invalid(e.to_string()))?;
            for warning in warnings {
                eprintln!("cnsm: warning: {warning}");
            }
            Some(Arc::new(config))
        }
        None => None,
    };
    // So is a bad certificate or key (the message names the file).
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(
            cnsm_server::tls::server_config(cert, key)
                .map_err(|e| CliError::invalid(e.to_string()))?,
        ),
        (None, None) => None,
        _ => {
            return Err(CliError::invalid(
                "--tls-cert and --tls-key go together: give both or neither",
            ));
        }
    };
    // And a bad CA file for https:// notify targets.
    let mut transport = cnsm_server::delivery_transport::HttpTransport::new();
    if let Some(ca) = &args.delivery_ca_cert {
        transport = transport.with_tls(
            cnsm_server::tls::client_config(ca).map_err(|e| CliError::invalid(e.to_string()))?,
        );
    }
    let scheme = if tls.is_some() { "https" } else { "http" };
    cnsm_server::check_listen_address(address, auth.is_some(), args.insecure)
        .map_err(|e| CliError::invalid(e.to_string()))?;
    // The store: PostgreSQL (a node among several) or the embedded one of --data-dir.
    let (store, options, serving): (Arc<dyn cnsm_store::Store>, RuntimeOptions, String) =
        match &context.store {
            Some(url) => {
                let store = crate::postgres::open(url, true)?;
                // The name of this node in timer claims.
                let node_id = std::env::var("CNSM_NODE_ID")
                    .unwrap_or_else(|_| format!("{address}-{}", std::process::id()));
                let options = crate::postgres::runtime_options(node_id, true);
                (
                    store,
                    options,
                    format!("at {}", crate::postgres::redact(url)),
                )
            }
            None => (
                Arc::new(open_embedded(&context.data_dir)?),
                RuntimeOptions::default(),
                format!("in {}", context.data_dir.display()),
            ),
        };
    crate::telemetry::init_logs(args.telemetry.log_format);
    let wired = crate::telemetry::wire(&args.telemetry, &store)?;
    if let Some(flags) = &context.flags {
        wired.observe_flag_gates(Arc::clone(flags));
    }
    let (node_id, shared_store) = (options.node_id.clone(), options.shared_store);
    let runtime = match Runtime::open_shared(
        store,
        RuntimeOptions {
            flags: context.flags.clone(),
            ..options
        }
        .with_telemetry(wired.telemetry.clone()),
    ) {
        Ok(runtime) => runtime,
        Err(e) => {
            wired.shutdown();
            return Err(e.into());
        }
    };
    if let Some(audit) = &wired.audit {
        runtime.subscribe(Arc::new(audit.clone()));
    }
    // Push delivery to the machines' notify targets (one node per target on a shared store).
    let mut delivery = DeliveryOptions::new(Arc::new(transport));
    delivery.node_id = node_id;
    delivery.meter = wired.meter();
    if shared_store {
        delivery.settle_ms = args.delivery_settle_ms;
    } else {
        // One process opens an embedded store at a time: a stable name lets a restart after a
        // crash take its targets back at once instead of waiting for the old lease to expire.
        delivery.node_id = "local".into();
    }
    let deliverer = match Deliverer::start(&runtime, delivery) {
        Ok(deliverer) => deliverer,
        Err(e) => {
            runtime.shutdown();
            wired.shutdown();
            return Err(e.into());
        }
    };
    let listener = match tokio::net::TcpListener::bind(address).await {
        Ok(listener) => listener,
        Err(e) => {
            deliverer.stop();
            runtime.shutdown();
            wired.shutdown();
            return Err(CliError::unavailable(format!(
                "cannot listen on {address}: {e}"
            )));
        }
    };
    let bound = listener.local_addr().unwrap_or(address);
    out.line(format_args!("listening on {scheme}://{bound}"));
    eprintln!(
        "cnsm: serving the store {serving} on {scheme}://{bound}{}; SIGTERM or Ctrl-C stops",
        if auth.is_some() {
            " with bearer-token authentication (--auth-file)"
        } else if bound.ip().is_loopback() {
            ""
        } else {
            " WITHOUT authentication (--insecure)"
        }
    );
    let options = ServerOptions {
        insecure: args.insecure,
        auth,
        tls,
        metrics: wired.metrics.clone(),
        ..ServerOptions::default()
    };
    let served =
        cnsm_server::serve(listener, runtime, options, cnsm_server::shutdown_signal()).await;
    // The runtime has stopped: write the delivery cursors, flush the audit log and exporters.
    deliverer.stop();
    wired.shutdown();
    match served {
        Ok(()) => {
            eprintln!("cnsm: stopped; every acknowledged event is durable");
            Ok(())
        }
        Err(ServeError::NotLoopback(_)) => Err(CliError::invalid(
            "refusing a non-loopback address without --auth-file or --insecure",
        )),
        Err(e) => Err(CliError::unavailable(e.to_string())),
    }
}

/// Opens (creating the directory) the embedded store of `--data-dir`.
fn open_embedded(data_dir: &std::path::Path) -> Result<EmbeddedStore, CliError> {
    std::fs::create_dir_all(data_dir).map_err(|e| {
        CliError::unavailable(format!(
            "cannot create data directory {}: {e}",
            data_dir.display()
        ))
    })?;
    let store = EmbeddedStore::open(data_dir).map_err(|e| {
        let mut error = CliError::from(e);
        error.message = format!(
            "cannot open the store in {}: {}",
            data_dir.display(),
            error.message
        );
        error
    })?;
    Ok(store)
}
