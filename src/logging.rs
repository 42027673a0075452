//! Log output: human-readable text (the default) or JSON lines for log
//! collectors (`--log-format json`).
//!
//! A JSON line is one object: `timestamp` (RFC 3339, UTC, milliseconds),
//! `level`, `message`, `target`, the event's own fields, and the fields of
//! the spans it happened in — for a connection `listener`, `peer` and
//! `connection_id`:
//!
//! ```text
//! {"timestamp":"2025-05-01T12:00:00.123Z","level":"INFO","message":"session failed","target":"mail_tls_proxy::session","listener":"imaps","peer":"192.0.2.7:51234","connection_id":17,"side":"client","error":"..."}
//! ```

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormattedFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

use crate::time::date_time;

/// How log lines are written (to standard error).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the process-wide subscriber with `filter` (an `EnvFilter`
/// directive such as `info` or `mail_tls_proxy=debug`).
pub fn init(format: LogFormat, filter: EnvFilter) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .fmt_fields(JsonFields)
            .event_format(JsonLines)
            .init(),
    }
}

/// Formats one event as one JSON object on one line.
pub(crate) struct JsonLines;

/// Formats span fields as JSON members (`"key":value,...`, no braces), so
/// [`JsonLines`] can splice them into the event's object.
pub(crate) struct JsonFields;

impl<'writer> FormatFields<'writer> for JsonFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut members = String::new();
        fields.record(&mut JsonVisitor {
            out: &mut members,
            span_fields: true,
        });
        writer.write_str(&members)
    }

    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let mut members = String::new();
        fields.record(&mut JsonVisitor {
            out: &mut members,
            span_fields: true,
        });
        if !current.fields.is_empty() && !members.is_empty() {
            current.fields.push(',');
        }
        current.fields.push_str(&members);
        Ok(())
    }
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let metadata = event.metadata();
        let mut line = String::with_capacity(256);
        line.push_str("{\"timestamp\":");
        push_json_string(&mut line, &rfc3339_now());
        line.push_str(",\"level\":");
        push_json_string(&mut line, metadata.level().as_str());
        // The message first, then the rest of the event's fields.
        let mut message = None;
        let mut members = String::new();
        event.record(&mut EventVisitor {
            message: &mut message,
            members: JsonVisitor {
                out: &mut members,
                span_fields: false,
            },
        });
        line.push_str(",\"message\":");
        push_json_string(&mut line, message.as_deref().unwrap_or(""));
        line.push_str(",\"target\":");
        push_json_string(&mut line, metadata.target());
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let extensions = span.extensions();
                if let Some(fields) = extensions.get::<FormattedFields<N>>() {
                    if !fields.fields.is_empty() {
                        line.push(',');
                        line.push_str(&fields.fields);
                    }
                }
            }
        }
        if !members.is_empty() {
            line.push(',');
            line.push_str(&members);
        }
        line.push('}');
        writeln!(writer, "{line}")
    }
}

/// Writes fields as JSON members, numbers and booleans as such.
struct JsonVisitor<'a> {
    out: &'a mut String,
    /// Span fields: the connection span's `id` is written `connection_id`.
    span_fields: bool,
}

impl JsonVisitor<'_> {
    fn key(&mut self, field: &Field) {
        if !self.out.is_empty() {
            self.out.push(',');
        }
        let name = match field.name() {
            "id" if self.span_fields => "connection_id",
            name => name.strip_prefix("r#").unwrap_or(name),
        };
        push_json_string(self.out, name);
        self.out.push(':');
    }
}

impl Visit for JsonVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.key(field);
        push_json_string(self.out, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.key(field);
        self.out.push_str(if value { "true" } else { "false" });
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.key(field);
        let _ = write!(self.out, "{value}");
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.key(field);
        let _ = write!(self.out, "{value}");
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.key(field);
        if value.is_finite() {
            let _ = write!(self.out, "{value}");
        } else {
            push_json_string(self.out, &value.to_string());
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.key(field);
        push_json_string(self.out, &value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.key(field);
        push_json_string(self.out, &format!("{value:?}"));
    }
}

/// Takes the `message` field out; everything else goes to `members`.
struct EventVisitor<'a> {
    message: &'a mut Option<String>,
    members: JsonVisitor<'a>,
}

impl Visit for EventVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            *self.message = Some(value.to_string());
        } else {
            self.members.record_str(field, value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            *self.message = Some(format!("{value:?}"));
        } else {
            self.members.record_debug(field, value);
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.members.record_bool(field, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.members.record_i64(field, value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.members.record_u64(field, value);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.members.record_f64(field, value);
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.members.record_error(field, value);
    }
}

/// Appends `value` as a JSON string (RFC 8259 escaping).
fn push_json_string(out: &mut String, value: &str) {
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Now, as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn rfc3339_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(now.as_secs() as i64, now.subsec_millis())
}

fn rfc3339(unix_seconds: i64, millis: u32) -> String {
    format!("{}.{millis:03}Z", date_time(unix_seconds, 'T'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_709_210_096, 7), "2024-02-29T12:34:56.007Z");
    }

    #[test]
    fn strings_are_escaped() {
        let mut out = String::new();
        push_json_string(&mut out, "a\"b\\c\nd\u{1}é");
        assert_eq!(out, r#""a\"b\\c\nd\u0001é""#);
    }

    #[test]
    fn one_object_per_line_with_the_connection_span_fields() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .fmt_fields(JsonFields)
            .event_format(JsonLines)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let peer: std::net::SocketAddr = "192.0.2.7:51234".parse().unwrap();
            let span =
                tracing::info_span!("connection", listener = %"imaps", peer = %peer, id = 17u64);
            let _entered = span.enter();
            tracing::warn!(
                side = "backend",
                seconds = 0.5,
                ok = false,
                "session \"failed\"\nbadly"
            );
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        let line = text.lines().next().unwrap();
        assert!(line.starts_with("{\"timestamp\":\""), "{line}");
        let rest = &line[line.find(",\"level\"").unwrap()..];
        assert_eq!(
            rest,
            r#","level":"WARN","message":"session \"failed\"\nbadly","target":"mail_tls_proxy::logging::tests","listener":"imaps","peer":"192.0.2.7:51234","connection_id":17,"side":"backend","seconds":0.5,"ok":false}"#
        );
    }
}
