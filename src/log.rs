//! release-tasks's own log lines (tracing), as logfmt-style text or JSON, to stderr.
//!
//! Events carry fields (`task`, `outcome`, `exit_code`, `duration_ms`) rather than sentences with the
//! values baked in, so the JSON format is structured for free and the text format is
//! `TIME LEVEL message key=value ...` with logfmt quoting, which both people and log pipelines read.
//! Lines go through the same lock as task output, so a log line never lands inside a task's line, and
//! a log line that cannot be written (stderr closed or full) is dropped: it never stops the release.

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::sync::OnceLock;
use std::sync::mpsc::{Sender, SyncSender, channel, sync_channel};
use std::time::Duration;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

use crate::output::{self, Target};

/// How release-tasks writes its own log lines (task output is passed through as it is).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per event
    Text,
    /// One JSON object per line
    Json,
}

/// Starts logging in `format`. Colour only when stderr is a terminal and `NO_COLOR` is not set.
pub fn init(format: LogFormat, no_color: bool) {
    let builder = tracing_subscriber::fmt()
        .with_writer(LogWriter)
        .with_max_level(Level::INFO);
    match format {
        LogFormat::Text => {
            let colour = !no_color && std::io::stderr().is_terminal();
            builder.event_format(Logfmt { colour }).init();
        }
        LogFormat::Json => builder
            .json()
            .with_target(false)
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
}

/// The text format: `2026-11-26T15:00:00.123Z INFO task finished task=migrate outcome=failed`.
struct Logfmt {
    colour: bool,
}

impl<S, N> FormatEvent<S, N> for Logfmt
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let level = *event.metadata().level();
        let (name, colour) = match level {
            Level::ERROR => ("ERROR", "31"),
            Level::WARN => ("WARN ", "33"),
            Level::INFO => ("INFO ", "32"),
            Level::DEBUG => ("DEBUG", "34"),
            Level::TRACE => ("TRACE", "35"),
        };
        let now = humantime::format_rfc3339_millis(std::time::SystemTime::now());
        if self.colour {
            write!(w, "{now} \x1b[{colour}m{name}\x1b[0m ")?;
        } else {
            write!(w, "{now} {name} ")?;
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        w.write_str(&fields.message)?;
        w.write_str(&fields.pairs)?;
        writeln!(w)
    }
}

/// Collects an event's message and its other fields as ` key=value` pairs.
#[derive(Default)]
struct Fields {
    message: String,
    pairs: String,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.pairs.push(' ');
            self.pairs.push_str(field.name());
            self.pairs.push('=');
            push_value(&mut self.pairs, value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        self.record_str(field, &text);
    }
}

/// Appends `value`, quoted and escaped the logfmt way when it holds spaces, quotes or `=`.
fn push_value(out: &mut String, value: &str) {
    let plain = !value.is_empty()
        && !value.contains(|c: char| {
            c.is_whitespace() || c.is_control() || matches!(c, '"' | '=' | '\\')
        });
    if plain {
        out.push_str(value);
        return;
    }
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Lines for the background writer, once there is one.
static BACKGROUND: OnceLock<Sender<Message>> = OnceLock::new();

enum Message {
    Line(Vec<u8>),
    /// Answered once every line sent before it is written.
    Flush(SyncSender<()>),
}

/// From now on, log lines are written by a thread of their own, so that the run loop never waits on
/// a stalled log reader: a timeout or a signal must be acted on even when nobody reads stderr.
pub fn write_in_background() {
    let (tx, rx) = channel::<Message>();
    let started = std::thread::Builder::new()
        .name("log".into())
        .stack_size(output::SMALL_STACK)
        .spawn(move || {
            for message in rx {
                match message {
                    // A closed stderr must not stop the release; the line is lost either way.
                    Message::Line(line) => drop(output::write(Target::Stderr, &line)),
                    Message::Flush(done) => drop(done.send(())),
                }
            }
        });
    // Without the thread, lines are written directly, as before the release started.
    if started.is_ok() {
        let _ = BACKGROUND.set(tx);
    }
}

/// Waits until the log lines sent so far are written, for at most `limit` (stderr may be stalled).
pub fn flush(limit: Duration) {
    if let Some(tx) = BACKGROUND.get() {
        let (done, wait) = sync_channel(1);
        if tx.send(Message::Flush(done)).is_ok() {
            let _ = wait.recv_timeout(limit);
        }
    }
}

/// Writes each formatted event to stderr in one locked write (or hands it to the background writer).
#[derive(Clone, Copy)]
struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match BACKGROUND.get() {
            Some(tx) => drop(tx.send(Message::Line(buf.to_vec()))),
            None => drop(output::write(Target::Stderr, buf)),
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl MakeWriter<'_> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&self) -> Self::Writer {
        LogWriter
    }
}

#[cfg(test)]
mod tests {
    use super::push_value;

    #[test]
    fn logfmt_quoting() {
        for (value, want) in [
            ("migrate", "migrate"),
            ("", "\"\""),
            ("two words", "\"two words\""),
            ("a=b", "\"a=b\""),
            ("say \"hi\"\n", "\"say \\\"hi\\\"\\n\""),
        ] {
            let mut out = String::new();
            push_value(&mut out, value);
            assert_eq!(out, want);
        }
    }
}
