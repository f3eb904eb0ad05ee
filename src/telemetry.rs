//! Logging and tracing for every subcommand: logs on stderr (filtered by
//! `INSTRUCTD_LOG`), human-readable and coloured only on a terminal, or JSON
//! lines with the request and trace ids (`[log] format = "json"`,
//! `INSTRUCTD_LOG_FORMAT=json`; see `log_format.rs`), plus OpenTelemetry traces exported over
//! OTLP (HTTP/protobuf) when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set. The exporter reads the
//! standard `OTEL_*` variables itself, so collectors are configured the usual way.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::log_format::{JsonLines, LogFormat};

/// Flushes buffered spans when dropped at the end of `main`.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("warning: flushing OpenTelemetry spans failed: {e}");
        }
    }
}

fn otlp_configured() -> bool {
    ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()))
}

pub fn init(format: LogFormat) -> anyhow::Result<Telemetry> {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_env("INSTRUCTD_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    let logs = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(JsonLines)
            .with_filter(filter)
            .boxed(),
    };
    let provider = if otlp_configured() {
        let exporter = opentelemetry_otlp::SpanExporter::builder().with_http().build()?;
        Some(
            SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(Resource::builder().with_service_name("instructd").build())
                .build(),
        )
    } else if format == LogFormat::Json {
        // No exporter: spans still get W3C trace ids, which JSON log lines carry.
        Some(SdkTracerProvider::builder().build())
    } else {
        None
    };
    // Spans are exported at info level whatever the console shows.
    let traces = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("instructd"))
            .with_filter(EnvFilter::try_from_env("INSTRUCTD_TRACE").unwrap_or_else(|_| EnvFilter::new("info")))
    });
    tracing_subscriber::registry().with(logs).with(traces).init();
    Ok(Telemetry { provider })
}
