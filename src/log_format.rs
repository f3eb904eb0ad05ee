//! Log lines a fleet's collector can ingest (`INSTRUCTD_LOG_FORMAT=json` or
//! `[log] format = "json"`): one JSON object per line with the time, level,
//! target, message and fields, plus the request id and the trace id of the
//! span the event happened in, so every line of one request can be found by
//! either. Span fields are recorded as JSON (`JsonFields`) and read back here.

use std::fmt;

use serde::Deserialize;
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// `[log] format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines, coloured only when stderr is a terminal.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The JSON line format.
pub struct JsonLines;

/// An event's fields as JSON values.
#[derive(Default)]
struct Fields(Map<String, Value>);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}").into());
    }
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        let mut fields = Fields::default();
        event.record(&mut fields);
        let mut fields = fields.0;
        let message = fields.remove("message").unwrap_or(Value::Null);
        let mut line = Map::new();
        line.insert("timestamp".into(), timestamp.into());
        line.insert("level".into(), event.metadata().level().as_str().into());
        line.insert("target".into(), event.metadata().target().into());
        line.insert("message".into(), message);
        let mut span_fields = Map::new();
        let mut spans = Vec::new();
        let mut trace_id = None;
        if let Some(scope) = ctx.event_scope() {
            // Outermost first, so an inner span's field of the same name wins.
            for span in scope.from_root() {
                spans.push(Value::from(span.name()));
                let extensions = span.extensions();
                if let Some(recorded) = extensions.get::<FormattedFields<N>>()
                    && let Ok(Value::Object(recorded)) = serde_json::from_str::<Value>(&recorded.fields)
                {
                    span_fields.extend(recorded);
                }
                if trace_id.is_none() {
                    trace_id = extensions
                        .get::<tracing_opentelemetry::OtelData>()
                        .and_then(|data| data.trace_id())
                        .filter(|id| *id != opentelemetry::TraceId::INVALID)
                        .map(|id| id.to_string());
                }
            }
        }
        line.insert("request_id".into(), span_fields.remove("request_id").unwrap_or(Value::Null));
        line.insert("trace_id".into(), trace_id.map_or(Value::Null, Value::from));
        if !spans.is_empty() {
            line.insert("spans".into(), spans.into());
        }
        span_fields.extend(fields);
        if !span_fields.is_empty() {
            line.insert("fields".into(), span_fields.into());
        }
        writeln!(writer, "{}", Value::Object(line))
    }
}
