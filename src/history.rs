//! `release-tasks history`: the release ledger for people (a text table) and for programs (JSON),
//! from the data a backend read ([`ReleaseEntry`], [`TaskEntry`]). The lock layer reads; this module
//! prints, so that a closed stdout is an output error (74) like `check`'s and `plan`'s.
//!
//! What the ledger holds was written by tasks and replicas, not by the person reading: every value
//! in the text table is shown escaped (a newline or an escape sequence cannot draw a fake row or
//! drive the terminal); JSON escapes by itself.

use std::fmt::Write as _;
use std::io::Write;
use std::time::Duration;

use crate::log::LogFormat;
use crate::record::{ReleaseEntry, TaskEntry};

/// The exit status of `history --show VERSION` when the ledger has no such release (as `grep`
/// finding nothing).
pub const EXIT_NOT_RECORDED: i32 = 1;

/// A stored value as the text table shows it: data, never markup. The ledger holds what any client
/// wrote (a version with a newline would draw a row of its own, an escape sequence would reach the
/// terminal), so control characters (C0, DEL, C1), the Unicode line and paragraph separators, the
/// bidirectional controls and the invisible format characters (zero-width space and joiners, soft
/// hyphen, byte order mark) are written as escapes: `\n`, `\r`, `\t`, else `\u{..}`; a backslash is
/// doubled, so that an escape shown is never mistaken for the characters it names. JSON escapes by
/// itself.
#[must_use]
pub fn shown(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control()
                || matches!(
                    c,
                    '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{061c}'
                        | '\u{00ad}' | '\u{180e}' | '\u{feff}'
                )
                || ('\u{202a}'..='\u{202e}').contains(&c)
                || ('\u{2066}'..='\u{2069}').contains(&c)
                // Invisible format characters (zero-width space and joiners, word joiner, invisible
                // operators): two versions that differ only by one would look the same.
                || ('\u{200b}'..='\u{200d}').contains(&c)
                || ('\u{2060}'..='\u{2064}').contains(&c) =>
            {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out
}

fn seconds(duration_s: Option<f64>) -> String {
    duration_s.map_or_else(
        || "-".to_owned(),
        |s| humantime::format_duration(Duration::from_secs(s.max(0.0).round() as u64)).to_string(),
    )
}

fn millis(duration_ms: Option<i64>) -> String {
    duration_ms.map_or_else(
        || "-".to_owned(),
        |ms| humantime::format_duration(Duration::from_millis(ms.max(0) as u64)).to_string(),
    )
}

/// Rows under a header, each column as wide as its widest cell; the last column is not padded.
fn table<const N: usize>(
    out: &mut dyn Write,
    header: [&str; N],
    rows: Vec<[String; N]>,
) -> std::io::Result<()> {
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(header.map(str::to_owned)).chain(rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == N {
                line.push_str(cell);
            } else {
                line.push_str(cell);
                line.extend(std::iter::repeat_n(' ', w - cell.chars().count() + 2));
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

/// `history`: the last releases of lock `name`, newest first.
pub fn print_releases(
    name: &str,
    entries: &[ReleaseEntry],
    format: LogFormat,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    match format {
        LogFormat::Json => {
            for e in entries {
                writeln!(out, "{}", release_json(name, e))?;
            }
        }
        LogFormat::Text if entries.is_empty() => {
            writeln!(out, "no releases recorded for `{}`", shown(name))?;
        }
        LogFormat::Text => {
            let rows = entries
                .iter()
                .map(|e| {
                    [
                        shown(e.version.as_deref().unwrap_or(&e.release)),
                        shown(e.commit.as_deref().unwrap_or("-")),
                        shown(&e.status),
                        shown(&e.started_at),
                        seconds(e.duration_s),
                        shown(&e.holder),
                    ]
                })
                .collect();
            table(
                out,
                [
                    "VERSION", "COMMIT", "STATUS", "STARTED", "DURATION", "HOLDER",
                ],
                rows,
            )?;
        }
    }
    out.flush()
}

fn release_json(name: &str, e: &ReleaseEntry) -> serde_json::Value {
    serde_json::json!({
        "lock": name,
        "release": e.release,
        "version": e.version,
        "commit": e.commit,
        "status": e.status,
        "started_at": e.started_at,
        "duration_s": e.duration_s,
        "exit_code": e.exit_code,
        "holder": e.holder,
    })
}

/// `history --show VERSION`: one release and its tasks; for a failed task, its last output lines.
pub fn print_release(
    name: &str,
    release: &ReleaseEntry,
    tasks: &[TaskEntry],
    format: LogFormat,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    if format == LogFormat::Json {
        let mut doc = release_json(name, release);
        doc["tasks"] = tasks
            .iter()
            .map(|t| {
                serde_json::json!({
                    "task": t.task,
                    "outcome": t.outcome,
                    "exit_code": t.exit_code,
                    "started_at": t.started_at,
                    "duration_ms": t.duration_ms,
                    "attempts": t.attempts,
                    "detail": t.detail,
                    "output_tail": t.output_tail,
                    "inputs_hash": t.inputs_hash,
                })
            })
            .collect();
        writeln!(out, "{doc}")?;
        return out.flush();
    }
    print_header(name, release, out)?;
    if tasks.is_empty() {
        writeln!(
            out,
            "no task records for this release (it ran before release-tasks kept them, or they were pruned)"
        )?;
        return out.flush();
    }
    let rows = tasks
        .iter()
        .map(|t| {
            let ran = t.started_at.is_some();
            let ended = ran && t.outcome != "running";
            [
                shown(&t.task),
                shown(&t.outcome),
                t.exit_code
                    .map_or_else(|| "-".to_owned(), |c| c.to_string()),
                shown(t.started_at.as_deref().unwrap_or("-")),
                if ended {
                    millis(t.duration_ms)
                } else {
                    "-".to_owned()
                },
                if ran {
                    t.attempts.to_string()
                } else {
                    "-".to_owned()
                },
                if t.outcome == "succeeded" {
                    String::new()
                } else {
                    shown(&t.detail)
                },
            ]
        })
        .collect();
    table(
        out,
        [
            "TASK", "OUTCOME", "EXIT", "STARTED", "DURATION", "ATTEMPTS", "DETAIL",
        ],
        rows,
    )?;
    print_failed_tails(tasks, out)?;
    out.flush()
}

/// The release's own lines above its tasks.
fn print_header(name: &str, release: &ReleaseEntry, out: &mut dyn Write) -> std::io::Result<()> {
    let exit = release
        .exit_code
        .map_or_else(String::new, |c| format!(", exit status {c}"));
    writeln!(
        out,
        "release {} of `{}`: {}{exit}",
        shown(release.version.as_deref().unwrap_or(&release.release)),
        shown(name),
        shown(&release.status)
    )?;
    if let Some(commit) = &release.commit {
        writeln!(out, "  commit   {}", shown(commit))?;
    }
    writeln!(
        out,
        "  started  {}, took {}",
        shown(&release.started_at),
        seconds(release.duration_s)
    )?;
    writeln!(out, "  by       {}", shown(&release.holder))?;
    writeln!(out)?;
    Ok(())
}

/// Each failed task's last output lines, below the table.
fn print_failed_tails(tasks: &[TaskEntry], out: &mut dyn Write) -> std::io::Result<()> {
    for t in tasks.iter().filter(|t| t.failed()) {
        writeln!(out)?;
        let attempts = if t.attempts > 1 {
            format!(" (after {} attempts)", t.attempts)
        } else {
            String::new()
        };
        if t.output_tail.is_empty() {
            writeln!(
                out,
                "{}: {}{attempts}; it printed nothing",
                shown(&t.task),
                shown(&t.detail)
            )?;
            continue;
        }
        writeln!(
            out,
            "{}: {}{attempts}; its last output lines:",
            shown(&t.task),
            shown(&t.detail)
        )?;
        for line in &t.output_tail {
            writeln!(out, "  | {}", shown(line))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_values_are_shown_as_data() {
        assert_eq!(shown("v1.2.3"), "v1.2.3");
        assert_eq!(shown("Версия 2"), "Версия 2");
        assert_eq!(shown("v1\nv0  fake  succeeded"), "v1\\nv0  fake  succeeded");
        assert_eq!(
            shown("\u{1b}[2J\u{1b}]0;title\u{7}x\ry\tz"),
            "\\u{1b}[2J\\u{1b}]0;title\\u{7}x\\ry\\tz"
        );
        assert_eq!(shown("a\\nb"), "a\\\\nb", "a backslash is not an escape");
        assert_eq!(shown("\u{7f}\u{85}\u{9b}"), "\\u{7f}\\u{85}\\u{9b}");
        assert_eq!(
            shown("abc\u{202e}fed\u{2066}\u{2028}"),
            "abc\\u{202e}fed\\u{2066}\\u{2028}"
        );
        assert_eq!(
            shown("v1\u{200b}\u{200d}\u{2060}\u{2064}\u{feff}\u{ad}\u{180e}"),
            "v1\\u{200b}\\u{200d}\\u{2060}\\u{2064}\\u{feff}\\u{ad}\\u{180e}",
            "invisible format characters are shown"
        );
        assert_eq!(
            shown("\u{200a}\u{2065}"),
            "\u{200a}\u{2065}",
            "but not their neighbours"
        );
    }

    fn release() -> ReleaseEntry {
        ReleaseEntry {
            release: "v43".into(),
            version: Some("v43".into()),
            commit: Some("abc123".into()),
            status: "failed".into(),
            holder: "release-tasks pid 7 on web.1".into(),
            started_at: "2026-12-07T13:00:00Z".into(),
            duration_s: Some(12.4),
            exit_code: Some(1),
        }
    }

    fn task(name: &str, outcome: &str, code: Option<i32>, tail: &[&str]) -> TaskEntry {
        TaskEntry {
            task: name.into(),
            position: 1,
            outcome: outcome.into(),
            exit_code: code,
            started_at: code.map(|_| "2026-12-07T13:00:01Z".into()),
            duration_ms: code.map(|_| 3200),
            attempts: if outcome == "failed" {
                3
            } else {
                u32::from(code.is_some())
            },
            detail: match outcome {
                "failed" => "failed with exit code 1".into(),
                "skipped" => "skipped (db/migrate/** unchanged since v41 (a3f9c2))".into(),
                other => other.into(),
            },
            output_tail: tail.iter().map(|l| (*l).to_owned()).collect(),
            inputs_hash: None,
        }
    }

    fn text(tasks: &[TaskEntry]) -> String {
        let mut out = Vec::new();
        print_release("shop", &release(), tasks, LogFormat::Text, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn one_release_whole() {
        let got = text(&[
            task("migrate", "skipped", None, &[]),
            task(
                "seed",
                "failed",
                Some(1),
                &["loading", "PG::Error \x1b[31m\nboom"],
            ),
            task("cache", "not-run", None, &[]),
        ]);
        assert_eq!(
            got,
            "release v43 of `shop`: failed, exit status 1
  commit   abc123
  started  2026-12-07T13:00:00Z, took 12s
  by       release-tasks pid 7 on web.1

TASK     OUTCOME  EXIT  STARTED               DURATION  ATTEMPTS  DETAIL
migrate  skipped  -     -                     -         -         skipped (db/migrate/** unchanged since v41 (a3f9c2))
seed     failed   1     2026-12-07T13:00:01Z  3s 200ms  3         failed with exit code 1
cache    not-run  -     -                     -         -         not-run

seed: failed with exit code 1 (after 3 attempts); its last output lines:
  | loading
  | PG::Error \\u{1b}[31m\\nboom
"
        );
    }

    #[test]
    fn releases_table_and_json_lines() {
        let mut out = Vec::new();
        let mut odd = release();
        odd.version = Some("v1\nv2 FAKE".into());
        print_releases("shop", &[release(), odd], LogFormat::Text, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "VERSION      COMMIT  STATUS  STARTED               DURATION  HOLDER
v43          abc123  failed  2026-12-07T13:00:00Z  12s       release-tasks pid 7 on web.1
v1\\nv2 FAKE  abc123  failed  2026-12-07T13:00:00Z  12s       release-tasks pid 7 on web.1
"
        );
        let mut out = Vec::new();
        print_release(
            "shop",
            &release(),
            &[task("seed", "failed", Some(1), &["boom"])],
            LogFormat::Json,
            &mut out,
        )
        .unwrap();
        let doc: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(doc["tasks"][0]["output_tail"][0], "boom");
        assert_eq!(doc["tasks"][0]["attempts"], 3);
        assert_eq!(doc["status"], "failed");
        let mut out = Vec::new();
        print_releases("shop", &[], LogFormat::Text, &mut out).unwrap();
        assert_eq!(out, b"no releases recorded for `shop`\n");
    }
}
