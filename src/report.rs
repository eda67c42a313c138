//! Outcomes: what happened to each task, the release's exit status derived from them (in this one
//! place), and the summary logged at the end.

use std::fmt;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use nix::sys::signal::Signal;
use serde_json::json;

use crate::metadata::Metadata;

/// Exit status of a release whose task timed out (as GNU timeout).
pub const EXIT_TIMEOUT: i32 = 124;
/// Exit status when a task's command exists but cannot be run.
pub const EXIT_CANNOT_RUN: i32 = 126;
/// Exit status when a task's command is not found.
pub const EXIT_NOT_FOUND: i32 = 127;
/// Exit status of a release that lost its `[lock]` while it ran (`EX_UNAVAILABLE`, as for a lock
/// database that cannot be reached before the release).
pub const EXIT_LOCK_LOST: i32 = crate::error::EXIT_UNAVAILABLE;

/// The release lost its `[lock]`: no task started after the loss was found, except the clean-up of
/// `on = "failure"` and `on = "always"` tasks, and another replica may run the release again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockLoss {
    /// What showed the loss (see `LockLost`), free of secrets.
    pub reason: String,
    /// The last task that started after a check proved the lock held; `None` when the lock was found
    /// lost before the first task.
    pub last_task: Option<String>,
}

/// What happened to one task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    /// Exited with a nonzero code.
    Failed(i32),
    /// Killed by a signal that release-tasks did not send.
    Signaled(Signal),
    /// Ran past its timeout (or the release's) and was stopped.
    TimedOut,
    /// Stopped because release-tasks received this signal.
    Interrupted(Signal),
    /// Could not be started; the code is 126 or 127.
    CouldNotStart {
        code: i32,
        reason: String,
    },
    /// A notify task whose webhook did not take the report (exit status 1).
    NotDelivered(String),
    /// Its gate or the selection said not to run it.
    Skipped(SkipReason),
    /// Not started because the release had already failed or was interrupted.
    NotRun,
    /// Not started because the release lock was found lost before it could start (`LockCheck`).
    LockLost,
}

impl Outcome {
    /// The word used in logs and reports.
    #[must_use]
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed(_) | Outcome::NotDelivered(_) => "failed",
            Outcome::Signaled(_) => "killed",
            Outcome::TimedOut => "timed-out",
            Outcome::Interrupted(_) => "interrupted",
            Outcome::CouldNotStart { .. } => "not-started",
            Outcome::Skipped(_) => "skipped",
            Outcome::NotRun | Outcome::LockLost => "not-run",
        }
    }

    /// The exit status this outcome stands for, if the task ran or tried to.
    #[must_use]
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            Outcome::Succeeded => Some(0),
            Outcome::Failed(code) | Outcome::CouldNotStart { code, .. } => Some(*code),
            Outcome::Signaled(sig) | Outcome::Interrupted(sig) => Some(128 + *sig as i32),
            Outcome::TimedOut => Some(EXIT_TIMEOUT),
            Outcome::NotDelivered(_) => Some(1),
            Outcome::Skipped(_) | Outcome::NotRun | Outcome::LockLost => None,
        }
    }

    /// Whether this outcome fails the task.
    #[must_use]
    pub fn is_failure(&self) -> bool {
        !matches!(
            self,
            Outcome::Succeeded | Outcome::Skipped(_) | Outcome::NotRun | Outcome::LockLost
        )
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Succeeded => f.write_str("succeeded"),
            Outcome::Failed(code) => write!(f, "failed with exit code {code}"),
            Outcome::Signaled(sig) => write!(f, "killed by {sig}"),
            Outcome::TimedOut => f.write_str("timed out"),
            Outcome::Interrupted(sig) => write!(f, "stopped because release-tasks received {sig}"),
            Outcome::CouldNotStart { reason, .. } => write!(f, "could not start: {reason}"),
            Outcome::NotDelivered(reason) => write!(f, "not delivered: {reason}"),
            Outcome::Skipped(reason) => write!(f, "skipped ({reason})"),
            Outcome::NotRun => f.write_str("not run: the release had already stopped"),
            Outcome::LockLost => {
                f.write_str("not run: the release lock was lost before it could start")
            }
        }
    }
}

/// Why a task was not run, as data: the JSON report carries it as it is, so a program reading the
/// report need not parse a sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// A `when` that does not hold, or an `unless` that does: the condition that decided it.
    Gate {
        /// `when` or `unless`.
        gate: &'static str,
        variable: String,
        /// The variable's value as it may be shown (redacted when secret); `None` when unset.
        value: Option<String>,
        /// The rule, like `is true` or `equals "production"`.
        needs: String,
        /// Where the value came from when not from the process environment (a `.env` file).
        source: Option<String>,
    },
    /// Not named in `--only`.
    NotInOnly,
    /// Named in `--skip`.
    NamedInSkip,
    /// `on = "failure"`, and the release has not failed.
    OnFailure,
    /// `changed`: the files its globs match are what they were at its last successful run.
    Unchanged {
        /// The globs, as written.
        patterns: Vec<String>,
        /// The release of that run.
        since: String,
        /// The files' hash (its first 6 hex digits).
        hash: String,
    },
    /// Anything else, as a sentence (the `[lock] once` ledger says the release already ran).
    Other(String),
}

impl SkipReason {
    /// The reason from a gate's verdict: the condition that decided it (the one that failed for
    /// `when`, the last of those that held for `unless`).
    #[must_use]
    pub fn gate(gate: &'static str, verdict: &crate::gate::Verdict) -> SkipReason {
        let Some(reason) = verdict.reasons.last() else {
            return SkipReason::Other(format!("{gate}: no condition"));
        };
        SkipReason::Gate {
            gate,
            variable: reason.var.clone(),
            value: reason
                .value
                .as_ref()
                .map(|v| crate::redact::value(&reason.var, v)),
            needs: reason.rule.clone(),
            source: reason.source.clone(),
        }
    }

    /// The reason as the JSON report's `reason` object.
    #[must_use]
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            SkipReason::Gate {
                gate,
                variable,
                value,
                needs,
                source,
            } => {
                let mut reason =
                    json!({ "gate": gate, "variable": variable, "value": value, "needs": needs });
                if let Some(source) = source {
                    reason["source"] = json!(source);
                }
                reason
            }
            SkipReason::NotInOnly => json!({ "selection": "only" }),
            SkipReason::NamedInSkip => json!({ "selection": "skip" }),
            SkipReason::OnFailure => json!({ "on": "failure" }),
            SkipReason::Unchanged {
                patterns,
                since,
                hash,
            } => json!({ "changed": patterns, "unchanged_since": since, "hash": hash }),
            SkipReason::Other(text) => json!({ "text": text }),
        }
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::Gate {
                gate,
                variable,
                value,
                needs,
                source,
            } => {
                write!(f, "{gate}: ")?;
                match value {
                    None => write!(f, "{variable} is unset")?,
                    Some(v) => write!(f, "{variable}={v:?}")?,
                }
                if let Some(source) = source {
                    write!(f, " (from {source})")?;
                }
                write!(f, " (needs: {variable} {needs})")
            }
            SkipReason::NotInOnly => f.write_str("not in --only"),
            SkipReason::NamedInSkip => f.write_str("named in --skip"),
            SkipReason::OnFailure => f.write_str("on = \"failure\" and the release has not failed"),
            SkipReason::Unchanged {
                patterns,
                since,
                hash,
            } => write!(
                f,
                "{} unchanged since {since} ({hash})",
                patterns.join(", ")
            ),
            SkipReason::Other(text) => f.write_str(text),
        }
    }
}

/// One task's line in the report.
#[derive(Debug, Clone)]
pub struct TaskReport {
    pub name: String,
    pub outcome: Outcome,
    pub duration: Duration,
    pub allow_failure: bool,
    /// The last lines of the task's stdout and stderr, merged, ready to show (see `tail.rs`).
    pub output_tail: Vec<String>,
    /// How many attempts it took (more than 1 only with `retries`); 0 when it did not run.
    pub attempts: u32,
}

/// The whole release.
#[derive(Debug, Clone)]
pub struct Report {
    pub meta: Metadata,
    pub started_at: SystemTime,
    pub tasks: Vec<TaskReport>,
    /// Set when release-tasks itself received a stopping signal.
    pub interrupted: Option<Signal>,
    /// Set when the release's `[lock]` was found lost before a task could start.
    pub lock_lost: Option<LockLoss>,
    pub duration: Duration,
}

impl Report {
    /// An empty report for a release starting now.
    #[must_use]
    pub fn new(meta: Metadata) -> Report {
        Report {
            meta,
            started_at: SystemTime::now(),
            tasks: Vec::new(),
            interrupted: None,
            lock_lost: None,
            duration: Duration::ZERO,
        }
    }

    /// The report as the JSON document that notify tasks POST and `--report` writes.
    #[must_use]
    pub fn to_json(&self) -> serde_json::Value {
        let finished_at = self.started_at + self.duration;
        let tasks: Vec<serde_json::Value> = self
            .tasks
            .iter()
            .map(|t| {
                let mut task = json!({
                    "name": t.name,
                    "outcome": t.outcome.label(),
                    "exit_code": t.outcome.exit_code(),
                    "duration_ms": t.duration.as_millis() as u64,
                    "allow_failure": t.allow_failure,
                    "detail": t.outcome.to_string(),
                });
                if let Outcome::Skipped(reason) = &t.outcome {
                    task["reason"] = reason.to_json();
                }
                if t.outcome.exit_code().is_some() {
                    task["output_tail"] = json!(t.output_tail);
                    task["attempts"] = json!(t.attempts);
                }
                task
            })
            .collect();
        json!({
            "status": if self.succeeded() { "succeeded" } else { "failed" },
            "exit_code": self.exit_code(),
            "app": self.meta.app,
            "version": self.meta.version,
            "commit": self.meta.commit,
            "platform": self.meta.platform,
            "started_at": humantime::format_rfc3339_millis(self.started_at).to_string(),
            "finished_at": humantime::format_rfc3339_millis(finished_at).to_string(),
            "duration_ms": self.duration.as_millis() as u64,
            "failed_task": self.failed_task().map(|t| t.name.as_str()),
            "interrupted_by": self.interrupted.map(Signal::as_str),
            "lock_lost": self.lock_lost.as_ref().map(|lost| json!({
                "reason": lost.reason,
                "last_task_under_lock": lost.last_task,
                "rerun": "another replica may take the lock and run the release again",
            })),
            "tasks": tasks,
        })
    }

    /// The report as `JUnit` XML: one test case per task, for CI systems that show those.
    #[must_use]
    pub fn to_junit(&self) -> String {
        let failures = self.tasks.iter().filter(|t| t.outcome.is_failure()).count();
        let skipped = self
            .tasks
            .iter()
            .filter(|t| t.outcome.exit_code().is_none())
            .count();
        let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        let _ = writeln!(
            xml,
            "<testsuites><testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\" skipped=\"{skipped}\" time=\"{:.3}\">",
            xml_escape(&self.meta.title()),
            self.tasks.len(),
            self.duration.as_secs_f64()
        );
        for t in &self.tasks {
            let _ = write!(
                xml,
                "  <testcase classname=\"release-tasks\" name=\"{}\" time=\"{:.3}\"",
                xml_escape(&t.name),
                t.duration.as_secs_f64()
            );
            let detail = xml_escape(&t.outcome.to_string());
            // The failure's body says what happened and ends with the task's last line; the whole
            // tail goes to <system-out>, which GitLab and Jenkins show beside the test case.
            let out = if t.output_tail.is_empty() {
                String::new()
            } else {
                format!(
                    "<system-out>{}</system-out>",
                    xml_escape(&(t.output_tail.join("\n") + "\n"))
                )
            };
            if t.outcome.is_failure() {
                let mut body = format!("task `{}` {}", t.name, t.outcome);
                if let Some(last) = t.output_tail.last() {
                    let _ = write!(body, "\nlast line: {last}");
                }
                let _ = writeln!(
                    xml,
                    "><failure message=\"{detail}\">{}</failure>{out}</testcase>",
                    xml_escape(&body)
                );
            } else if t.outcome.exit_code().is_none() {
                let _ = writeln!(xml, "><skipped message=\"{detail}\"/></testcase>");
            } else if out.is_empty() {
                xml.push_str("/>\n");
            } else {
                let _ = writeln!(xml, ">{out}</testcase>");
            }
        }
        xml.push_str("</testsuite></testsuites>\n");
        xml
    }

    /// The first task whose failure fails the release.
    #[must_use]
    pub fn failed_task(&self) -> Option<&TaskReport> {
        self.tasks
            .iter()
            .find(|t| t.outcome.is_failure() && !t.allow_failure)
    }

    /// The release's exit status: 128+N if release-tasks was stopped by signal N, else 69 if the
    /// release lost its `[lock]`, else the first required failure's own status, else 0.
    #[must_use]
    pub fn exit_code(&self) -> i32 {
        if let Some(sig) = self.interrupted {
            return 128 + sig as i32;
        }
        if self.lock_lost.is_some() {
            return EXIT_LOCK_LOST;
        }
        self.failed_task()
            .and_then(|t| t.outcome.exit_code())
            .unwrap_or(0)
    }

    /// Whether the release succeeded.
    #[must_use]
    pub fn succeeded(&self) -> bool {
        self.exit_code() == 0
    }

    /// Logs one summary event per task and one for the release.
    pub fn log_summary(&self) {
        for t in &self.tasks {
            let duration_ms = t.duration.as_millis() as u64;
            let exit_code = t.outcome.exit_code();
            let outcome = t.outcome.label();
            let detail = t.outcome.to_string();
            if t.outcome.is_failure() && !t.allow_failure {
                tracing::error!(task = %t.name, outcome, exit_code, duration_ms, detail = %detail, "summary");
            } else if t.outcome.is_failure() {
                tracing::warn!(task = %t.name, outcome, exit_code, duration_ms, allow_failure = true, detail = %detail, "summary");
            } else {
                tracing::info!(task = %t.name, outcome, exit_code, duration_ms, detail = %detail, "summary");
            }
        }
        let exit_code = self.exit_code();
        let duration_ms = self.duration.as_millis() as u64;
        let ran = self
            .tasks
            .iter()
            .filter(|t| t.outcome.exit_code().is_some())
            .count();
        if exit_code == 0 {
            tracing::info!(
                status = "succeeded",
                exit_code,
                duration_ms,
                tasks_run = ran,
                "release succeeded"
            );
        } else {
            if let Some(lost) = &self.lock_lost {
                let last_task_under_lock = lost.last_task.as_deref();
                tracing::error!(
                    exit_code, last_task_under_lock, reason = %lost.reason,
                    "the release lock was lost: no task started after that but clean-up (on = \"failure\" or \"always\"); \
                     another replica may take the lock and run the release again"
                );
            }
            let failed = self.failed_task();
            let failed_task = failed.map(|t| t.name.as_str());
            let last_line = failed
                .and_then(|t| t.output_tail.last())
                .map(String::as_str);
            tracing::error!(
                status = "failed",
                exit_code,
                duration_ms,
                tasks_run = ran,
                failed_task,
                last_line,
                "release failed"
            );
        }
    }
}

/// Escapes `text` for an XML 1.0 attribute: markup characters as entities, and every character XML
/// 1.0 forbids (controls but tab and newline, lone surrogates cannot occur in a `str`, U+FFFE, U+FFFF)
/// replaced with U+FFFD. Newlines and tabs are written as character references, so an attribute
/// keeps them instead of having them normalised to spaces.
fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\n' => out.push_str("&#10;"),
            '\t' => out.push_str("&#9;"),
            '\r' => out.push_str("&#13;"),
            c if xml_allowed(c) => out.push(c),
            _ => out.push('\u{fffd}'),
        }
    }
    out
}

/// XML 1.0's `Char` production: `#x9 | #xA | #xD | [#x20-#xD7FF] | [#xE000-#xFFFD] | [#x10000-#x10FFFF]`.
fn xml_allowed(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{d7ff}' | '\u{e000}'..='\u{fffd}' | '\u{10000}'..)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(name: &str, outcome: Outcome, allow_failure: bool) -> TaskReport {
        TaskReport {
            output_tail: Vec::new(),
            attempts: 1,
            name: name.into(),
            outcome,
            duration: Duration::ZERO,
            allow_failure,
        }
    }

    #[test]
    fn exit_code_is_the_first_required_failure() {
        let mut r = Report::new(Metadata::default());
        assert_eq!(r.exit_code(), 0);
        r.tasks.push(task("a", Outcome::Failed(3), true));
        r.tasks
            .push(task("b", Outcome::Skipped(SkipReason::NotInOnly), false));
        assert_eq!(r.exit_code(), 0, "allow_failure does not fail the release");
        r.tasks.push(task("c", Outcome::TimedOut, false));
        r.tasks.push(task("d", Outcome::Failed(5), false));
        assert_eq!(r.exit_code(), 124);
        assert_eq!(r.failed_task().map(|t| t.name.as_str()), Some("c"));
        r.interrupted = Some(Signal::SIGTERM);
        assert_eq!(r.exit_code(), 143);
    }

    #[test]
    fn a_lost_lock_is_69_below_a_signal_and_above_a_task_failure() {
        let mut r = Report::new(Metadata::default());
        r.tasks.push(task("migrate", Outcome::Succeeded, false));
        r.tasks.push(task("seed", Outcome::LockLost, false));
        r.tasks.push(task("cleanup", Outcome::Failed(4), false));
        r.lock_lost = Some(LockLoss {
            reason: "lost the release lock `shop`: the database connection is closed".into(),
            last_task: Some("migrate".into()),
        });
        assert_eq!(r.exit_code(), 69);
        assert!(!r.succeeded());
        let j = r.to_json();
        assert_eq!(j["exit_code"], 69);
        assert_eq!(
            j["lock_lost"],
            json!({
                "reason": "lost the release lock `shop`: the database connection is closed",
                "last_task_under_lock": "migrate",
                "rerun": "another replica may take the lock and run the release again",
            })
        );
        assert_eq!(j["tasks"][1]["outcome"], "not-run");
        assert_eq!(
            j["tasks"][1]["detail"],
            "not run: the release lock was lost before it could start"
        );
        assert_eq!(j["tasks"][1]["exit_code"], serde_json::Value::Null);
        r.interrupted = Some(Signal::SIGTERM);
        assert_eq!(r.exit_code(), 143);
        assert_eq!(
            Report::new(Metadata::default()).to_json()["lock_lost"],
            serde_json::Value::Null
        );
    }

    #[test]
    fn outcome_codes() {
        assert_eq!(Outcome::Signaled(Signal::SIGKILL).exit_code(), Some(137));
        assert_eq!(
            Outcome::CouldNotStart {
                code: 127,
                reason: String::new()
            }
            .exit_code(),
            Some(127)
        );
        assert_eq!(Outcome::NotRun.exit_code(), None);
    }

    #[test]
    fn json_and_junit_renderings() {
        let mut r = Report::new(Metadata::default());
        r.tasks.push(task("migrate", Outcome::Failed(3), false));
        r.tasks.push(task(
            "seed <x>",
            Outcome::Skipped(SkipReason::Gate {
                gate: "when",
                variable: "SEED".into(),
                value: None,
                needs: "is true".into(),
                source: None,
            }),
            false,
        ));
        let j = r.to_json();
        assert_eq!(j["status"], "failed");
        assert_eq!(j["failed_task"], "migrate");
        assert_eq!(j["tasks"][0]["exit_code"], 3);
        assert_eq!(j["tasks"][1]["exit_code"], serde_json::Value::Null);
        assert_eq!(
            j["tasks"][1]["reason"],
            json!({"gate": "when", "variable": "SEED", "value": null, "needs": "is true"})
        );
        assert_eq!(
            j["tasks"][1]["detail"],
            "skipped (when: SEED is unset (needs: SEED is true))"
        );
        let x = r.to_junit();
        assert!(
            x.contains("tests=\"2\" failures=\"1\" skipped=\"1\""),
            "{x}"
        );
        assert!(x.contains("name=\"seed &lt;x&gt;\""), "{x}");
    }

    #[test]
    fn junit_has_only_characters_xml_allows() {
        let mut r = Report::new(Metadata::default());
        r.tasks.push(task(
            "t",
            Outcome::NotDelivered(
                "a\u{fffe}b\u{ffff}c\u{1}d\u{1b}[31m\u{7f}\u{85}\nnext\ttab\u{10000}".into(),
            ),
            false,
        ));
        let x = r.to_junit();
        for bad in ['\u{fffe}', '\u{ffff}', '\u{1}', '\u{1b}'] {
            assert!(!x.contains(bad), "{bad:?} in {x}");
        }
        assert!(
            x.contains("a\u{fffd}b\u{fffd}c\u{fffd}d\u{fffd}[31m"),
            "{x}"
        );
        assert!(x.contains("&#10;next&#9;tab\u{10000}"), "{x}");
        assert!(x.chars().all(|c| c == '\n' || xml_allowed(c)));
    }

    #[test]
    fn a_carriage_return_survives_attribute_normalization() {
        // A raw CR in an attribute is read back as a space (XML 1.0 section 3.3.3); as a character
        // reference it stays a CR.
        let mut r = Report::new(Metadata::default());
        r.tasks
            .push(task("t", Outcome::NotDelivered("a\r\nb".into()), false));
        let x = r.to_junit();
        assert!(x.contains("a&#13;&#10;b"), "{x}");
        assert!(!x.contains('\r'), "{x}");
    }
}
