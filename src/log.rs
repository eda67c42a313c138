//! release-tasks's own log lines (tracing), as logfmt-style text or JSON, to stderr.
//!
//! Events carry fields (`task`, `outcome`, `exit_code`, `duration_ms`) rather than sentences with the
//! values baked in, so the JSON format is structured for free and the text format is
//! `TIME LEVEL message key=value ...` with logfmt quoting, which both people and log pipelines read.
//! Lines go through the same lock as task output, so a log line never lands inside a task's line, and
//! a log line that cannot be written (stderr closed or full) is dropped: it never stops the release.

use std::fmt::Write as _;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

use crate::output::Stdio;

/// How release-tasks writes its own log lines (task output is passed through as it is).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per event
    #[default]
    Text,
    /// One JSON object per line
    Json,
}

/// Whether text log lines get colour, from the variables users set for that (read through `var`)
/// and whether stderr is a terminal. In order: `NO_COLOR` set and not empty turns it off (an empty
/// one counts as unset, as no-color.org says); `CLICOLOR_FORCE` or `FORCE_COLOR` set, not empty and
/// not `0` turns it on, even off a terminal (a CI log viewer that renders ANSI); otherwise colour
/// only on a terminal whose `TERM` is not `dumb`.
#[must_use]
pub fn colour<S: AsRef<str>>(var: impl Fn(&str) -> Option<S>, stderr_is_terminal: bool) -> bool {
    let value = |name| var(name).map(|v| v.as_ref().to_owned());
    let set = |name| value(name).is_some_and(|v| !v.is_empty());
    let forced = |name| value(name).is_some_and(|v| !v.is_empty() && v != "0");
    if set("NO_COLOR") {
        false
    } else if forced("CLICOLOR_FORCE") || forced("FORCE_COLOR") {
        true
    } else {
        stderr_is_terminal && value("TERM").as_deref() != Some("dumb")
    }
}

/// Starts logging in `format` to `stdio`'s stderr; `colour` (see [`colour`]) applies to the text
/// format only.
pub fn init(format: LogFormat, colour: bool, stdio: &Stdio) {
    let builder = tracing_subscriber::fmt()
        .with_writer(LogWriter(stdio.clone()))
        .with_max_level(Level::INFO);
    match format {
        LogFormat::Text => builder.event_format(Logfmt { colour }).init(),
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

/// Writes each formatted event to stderr through the [`Stdio`] handle, in one locked write (or
/// queued for stderr's writer thread), never for ever (see [`Stdio::log`]).
#[derive(Clone)]
struct LogWriter(Stdio);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Every log line, text or JSON, error or not, passes here: the one place its secrets are
        // hidden (`secrets.rs`), in whatever form the formatter escaped them.
        let masked = match std::str::from_utf8(buf) {
            Ok(text) => match crate::secrets::mask(text) {
                std::borrow::Cow::Owned(masked) => Some(masked.into_bytes()),
                std::borrow::Cow::Borrowed(_) => None,
            },
            Err(_) => None,
        };
        self.0.log(masked.as_deref().unwrap_or(buf));
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl MakeWriter<'_> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&self) -> Self::Writer {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::{colour, push_value};

    /// The decision with exactly `vars` set.
    fn colour_with(vars: &[(&str, &str)], terminal: bool) -> bool {
        let var = |name: &str| vars.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
        colour(var, terminal)
    }

    #[test]
    fn colour_on_a_terminal_unless_no_color_or_a_dumb_terminal() {
        assert!(colour_with(&[], true));
        assert!(!colour_with(&[], false));
        assert!(colour_with(&[("TERM", "xterm-256color")], true));
        assert!(!colour_with(&[("TERM", "dumb")], true));
        assert!(!colour_with(&[("NO_COLOR", "1")], true));
        assert!(!colour_with(&[("NO_COLOR", "0")], true), "any value counts");
        assert!(colour_with(&[("NO_COLOR", "")], true), "empty is unset");
    }

    #[test]
    fn forced_colour_off_a_terminal_but_never_over_no_color() {
        for force in ["CLICOLOR_FORCE", "FORCE_COLOR"] {
            assert!(colour_with(&[(force, "1")], false), "{force}");
            assert!(colour_with(&[(force, "true")], false), "{force}");
            assert!(
                colour_with(&[(force, "1"), ("TERM", "dumb")], true),
                "{force}"
            );
            assert!(!colour_with(&[(force, "0")], false), "{force}=0");
            assert!(!colour_with(&[(force, "")], false), "{force} empty");
            assert!(
                !colour_with(&[(force, "1"), ("NO_COLOR", "1")], true),
                "{force}"
            );
            assert!(
                colour_with(&[(force, "1"), ("NO_COLOR", "")], false),
                "{force}"
            );
        }
    }

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
