//! Telemetry wiring of `cnsmctl serve` (the only place that installs anything global): the
//! log subscriber, the OpenTelemetry SDK providers, the Prometheus registry behind `/metrics`,
//! the OTLP/HTTP exporters, and the audit log. See docs/observability.md.
//!
//! - Logs: `--log-format text|json` on stderr, filtered by `RUST_LOG` (default `info`).
//! - Metrics: on unless `--no-metrics`; always readable at `/metrics` (Prometheus text, or
//!   OpenMetrics with exemplars on `Accept: application/openmetrics-text`), and exported over
//!   OTLP/HTTP (protobuf) when `OTEL_EXPORTER_OTLP_ENDPOINT` or
//!   `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` is set (interval `OTEL_METRIC_EXPORT_INTERVAL`).
//! - Spans: exported over OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set; sampling from `OTEL_TRACES_SAMPLER` /
//!   `OTEL_TRACES_SAMPLER_ARG` (default parent-based always-on). `OTEL_SDK_DISABLED=true`,
//!   `OTEL_TRACES_EXPORTER=none` and `OTEL_METRICS_EXPORTER=none` turn exporting off.
//! - Resource: `service.name` from `OTEL_SERVICE_NAME` (default `cnsm`), plus
//!   `OTEL_RESOURCE_ATTRIBUTES`.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, ValueEnum};
use cnsm_runtime::Telemetry;
use cnsm_runtime::audit::{AuditLog, AuditSink};
use cnsm_server::{MetricsFormat, MetricsText};
use cnsm_store::Store;
use opentelemetry::global::BoxedTracer;
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;

use crate::error::CliError;

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines
    Text,
    /// One JSON object per line (fields flattened; transition lines carry trace_id/span_id)
    Json,
}

/// Telemetry flags of `serve`.
#[derive(Debug, Clone, Args)]
pub struct TelemetryArgs {
    /// Log line format on stderr; `RUST_LOG` filters (e.g. `info,cnsm_runtime=debug`)
    #[arg(
        long,
        env = "CNSM_LOG_FORMAT",
        value_enum,
        default_value = "text",
        value_name = "FORMAT"
    )]
    pub log_format: LogFormat,
    /// Turn the cnsm.* metrics off (/metrics then says so)
    #[arg(long)]
    pub no_metrics: bool,
    /// Audit log: a file (ECS JSON lines; rotated by size) or `-` for stdout
    #[arg(long, env = "CNSM_AUDIT_LOG", value_name = "FILE|-")]
    pub audit_log: Option<String>,
    /// Rotate the audit file when it grows past this many bytes (0 = never)
    #[arg(
        long,
        env = "CNSM_AUDIT_MAX_BYTES",
        default_value_t = 100 << 20,
        value_name = "BYTES"
    )]
    pub audit_max_bytes: u64,
    /// Rotated audit files kept (audit.jsonl.1 is the newest)
    #[arg(long, env = "CNSM_AUDIT_KEEP", default_value_t = 5, value_name = "N")]
    pub audit_keep: usize,
}

/// Everything wired for one server; [`Wired::shutdown`] flushes the exporters.
pub struct Wired {
    pub telemetry: Telemetry,
    pub metrics: Option<MetricsText>,
    pub audit: Option<AuditLog>,
    tracer_provider: Option<SdkTracerProvider>,
    meter_provider: Option<SdkMeterProvider>,
}

impl Wired {
    /// Exports the gate status of every flag the runtime evaluated (`ACTIVE`, `STABLE`,
    /// `DISABLED`, `DEGRADED`, from the evaluation reason) as `cnsm.flag.gate.status`: one
    /// series per flag key with its status as an attribute and the value 1. Flag keys are
    /// bounded by the flag file.
    pub fn observe_flag_gates(&self, flags: Arc<dyn cnsm_runtime::FlagEvaluator>) {
        let Some(mp) = &self.meter_provider else {
            return;
        };
        let _gauge = mp
            .meter("cnsm")
            .u64_observable_gauge("cnsm.flag.gate.status")
            .with_description("Gate status of each evaluated flag (1 for its current status)")
            .with_callback(move |observer| {
                for (key, status) in flags.gate_statuses() {
                    observer.observe(
                        1,
                        &[
                            opentelemetry::KeyValue::new("feature_flag.key", key),
                            opentelemetry::KeyValue::new("cnsm.flag.gate.status", status),
                        ],
                    );
                }
            })
            .build();
    }

    /// The meter of the `cnsm.*` instruments, when metrics are on.
    pub fn meter(&self) -> Option<opentelemetry::metrics::Meter> {
        self.meter_provider.as_ref().map(|mp| mp.meter("cnsm"))
    }

    /// Flushes spans, metrics and the audit log.
    pub fn shutdown(self) {
        if let Some(audit) = &self.audit {
            if let Err(e) = audit.sync() {
                eprintln!("cnsm: warning: audit log: {e}");
            }
            audit.stop();
        }
        // The SDK's exporters block (reqwest's blocking client); keep them off the async runtime.
        let (tp, mp) = (self.tracer_provider, self.meter_provider);
        let _ = std::thread::spawn(move || {
            if let Some(tp) = tp {
                let _ = tp.shutdown();
            }
            if let Some(mp) = mp {
                let _ = mp.shutdown();
            }
        })
        .join();
    }
}

/// Installs the global log subscriber (once per process).
pub fn init_logs(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
}

fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty())
}

fn env_is(name: &str, value: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v.trim().eq_ignore_ascii_case(value))
}

/// Builds the providers and exporters the flags and `OTEL_*` variables ask for, and the audit
/// log over `store`.
pub fn wire(args: &TelemetryArgs, store: &Arc<dyn Store>) -> Result<Wired, CliError> {
    let disabled = env_is("OTEL_SDK_DISABLED", "true");
    let otlp_traces = !disabled
        && !env_is("OTEL_TRACES_EXPORTER", "none")
        && (env_set("OTEL_EXPORTER_OTLP_ENDPOINT")
            || env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"));
    let otlp_metrics = !disabled
        && !args.no_metrics
        && !env_is("OTEL_METRICS_EXPORTER", "none")
        && (env_set("OTEL_EXPORTER_OTLP_ENDPOINT")
            || env_set("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"));
    // reqwest's blocking client must not be built inside the async runtime: build on a thread.
    let no_metrics = args.no_metrics;
    let built = std::thread::spawn(move || build(otlp_traces, otlp_metrics, no_metrics))
        .join()
        .map_err(|_| CliError::unavailable("telemetry setup panicked"))??;
    let (tracer_provider, meter_provider, registry) = built;
    let mut telemetry = Telemetry::default();
    if let Some(tp) = &tracer_provider {
        telemetry = telemetry.with_tracer(BoxedTracer::new(Box::new(tp.tracer("cnsm"))));
    }
    if let Some(mp) = &meter_provider {
        telemetry = telemetry.with_meter(&mp.meter("cnsm"));
    }
    let exemplars = telemetry.exemplars();
    let metrics = registry.map(|registry| {
        MetricsText(Arc::new(move |format| {
            let families = registry.gather();
            match format {
                MetricsFormat::Prometheus => prometheus::TextEncoder::new()
                    .encode_to_string(&families)
                    .unwrap_or_else(|e| format!("# encoding failed: {e}\n")),
                MetricsFormat::OpenMetrics => {
                    crate::openmetrics::encode(&families, exemplars.as_deref())
                }
            }
        }))
    });
    let audit = match args.audit_log.as_deref() {
        None => None,
        Some(target) => {
            let sink = if target == "-" {
                AuditSink::Stdout
            } else {
                AuditSink::File {
                    path: PathBuf::from(target),
                    max_bytes: args.audit_max_bytes,
                    keep: args.audit_keep,
                }
            };
            let audit = AuditLog::start(Arc::clone(store), sink, 65_536)
                .map_err(|e| CliError::unavailable(e.to_string()))?;
            telemetry = telemetry.with_hook(Arc::new(audit.clone()));
            Some(audit)
        }
    };
    Ok(Wired {
        telemetry,
        metrics,
        audit,
        tracer_provider,
        meter_provider,
    })
}

type Built = (
    Option<SdkTracerProvider>,
    Option<SdkMeterProvider>,
    Option<prometheus::Registry>,
);

fn build(otlp_traces: bool, otlp_metrics: bool, no_metrics: bool) -> Result<Built, CliError> {
    let mut resource = Resource::builder();
    if !env_set("OTEL_SERVICE_NAME") {
        resource = resource.with_service_name("cnsm");
    }
    let resource = resource.build();
    let exporter_error = |what: &str, e: &dyn std::fmt::Display| {
        CliError::invalid(format!("OTLP {what} exporter: {e}"))
    };
    let tracer_provider = if otlp_traces {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .build()
            .map_err(|e| exporter_error("span", &e))?;
        Some(
            SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource.clone())
                .build(),
        )
    } else {
        None
    };
    if no_metrics {
        return Ok((tracer_provider, None, None));
    }
    let registry = prometheus::Registry::new();
    let prom = opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        .scope_info_enabled(false)
        .without_target_info()
        .build()
        .map_err(|e| CliError::unavailable(format!("Prometheus exporter: {e}")))?;
    let mut meters = SdkMeterProvider::builder()
        .with_reader(prom)
        .with_resource(resource);
    if otlp_metrics {
        let exporter = opentelemetry_otlp::MetricExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .build()
            .map_err(|e| exporter_error("metric", &e))?;
        meters = meters.with_periodic_exporter(exporter);
    }
    Ok((tracer_provider, Some(meters.build()), Some(registry)))
}
