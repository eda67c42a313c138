//! What the release ledger keeps, as plain data that every database backend writes and reads the
//! same way: a task's record as the release proceeds ([`TaskRecord`]), and what `history` reads
//! back ([`ReleaseEntry`], [`TaskEntry`]). No SQL here (that is each backend's), no printing (that is
//! `history.rs`).

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use crate::changed::Inputs;
use crate::report::TaskReport;

/// The most bytes of a task's output tail the ledger keeps; older lines are dropped first.
pub const MAX_TAIL_BYTES: usize = 16 * 1024;

/// How many releases per lock key keep their task records (a task's last successful run with a
/// `changed` gate is kept beyond that: the gate compares with it).
pub const KEEP_RELEASES: i64 = 100;

/// One task of a release, as the ledger keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRecord {
    pub task: String,
    /// Its place in the release's order, from 1.
    pub position: u32,
    /// `running` while it runs, then the outcome's label (`succeeded`, `failed`, `skipped`, ...).
    pub outcome: String,
    pub exit_code: Option<i32>,
    /// When its first attempt started; `None` for a task that did not run.
    pub started_at: Option<SystemTime>,
    pub duration: Duration,
    /// How many attempts it took (0 for a task that did not run).
    pub attempts: u32,
    /// The outcome in words, or why the task was skipped.
    pub detail: String,
    /// The last lines of its output, redacted as in the report, at most [`MAX_TAIL_BYTES`].
    pub output_tail: Vec<String>,
    /// For a task with a `changed` gate: the hash of its files.
    pub inputs_hash: Option<String>,
    /// And the per-file hashes, kept with a successful run only (see `changed.rs`).
    pub inputs_manifest: Option<String>,
}

impl TaskRecord {
    /// The record of a task that has just started.
    #[must_use]
    pub fn started(task: &str, position: u32, attempt: u32) -> TaskRecord {
        TaskRecord {
            task: task.to_owned(),
            position,
            outcome: "running".to_owned(),
            exit_code: None,
            started_at: Some(SystemTime::now()),
            duration: Duration::ZERO,
            attempts: attempt,
            detail: format!("attempt {attempt} running"),
            output_tail: Vec::new(),
            inputs_hash: None,
            inputs_manifest: None,
        }
    }

    /// The record of a task that has ended (or was skipped), from its report line.
    #[must_use]
    pub fn finished(report: &TaskReport, position: u32, inputs: Option<&Inputs>) -> TaskRecord {
        let ran = report.outcome.exit_code().is_some();
        let succeeded = report.outcome == crate::report::Outcome::Succeeded;
        TaskRecord {
            task: report.name.clone(),
            position,
            outcome: report.outcome.label().to_owned(),
            exit_code: report.outcome.exit_code(),
            started_at: ran
                .then(|| SystemTime::now().checked_sub(report.duration))
                .flatten(),
            duration: report.duration,
            attempts: report.attempts,
            detail: report.outcome.to_string(),
            output_tail: bounded_tail(&report.output_tail),
            // A skipped task's files were not run: only a run's hash is compared with later.
            inputs_hash: inputs.filter(|_| ran).map(|i| i.hash.clone()),
            inputs_manifest: inputs.filter(|_| succeeded).map(Inputs::manifest),
        }
    }
}

/// The last lines of `tail` that fit in [`MAX_TAIL_BYTES`] (a single longer line is cut at the end).
#[must_use]
pub fn bounded_tail(tail: &[String]) -> Vec<String> {
    let mut kept = Vec::new();
    let mut size = 0;
    for line in tail.iter().rev() {
        if size + line.len() + 1 > MAX_TAIL_BYTES {
            if kept.is_empty() {
                let mut end = MAX_TAIL_BYTES.min(line.len());
                while !line.is_char_boundary(end) {
                    end -= 1;
                }
                kept.push(line[..end].to_owned());
            }
            break;
        }
        size += line.len() + 1;
        kept.push(line.clone());
    }
    kept.reverse();
    kept
}

/// The future a [`Recorder`] returns: not `Send`, because the run loop is single-threaded.
pub type RecordFuture<'a> = Pin<Box<dyn Future<Output = ()> + 'a>>;

/// Where the run loop writes each task's record as the release proceeds (the ledger of `[lock]`
/// with `once = true`). A record that cannot be written is logged by the recorder, and the release
/// goes on: the ledger is the release's memory, not a condition of it.
pub trait Recorder {
    /// Writes one record, bounded in time.
    fn record(&self, record: TaskRecord) -> RecordFuture<'_>;
}

/// One release as `history` lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReleaseEntry {
    pub release: String,
    pub version: Option<String>,
    pub commit: Option<String>,
    pub status: String,
    pub holder: String,
    /// RFC 3339, UTC, whole seconds.
    pub started_at: String,
    pub duration_s: Option<f64>,
    pub exit_code: Option<i32>,
}

/// One task of a release as `history --show` reads it back.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskEntry {
    pub task: String,
    pub position: u32,
    pub outcome: String,
    pub exit_code: Option<i32>,
    /// RFC 3339, UTC, whole seconds; `None` for a task that did not run.
    pub started_at: Option<String>,
    pub duration_ms: Option<i64>,
    pub attempts: u32,
    pub detail: String,
    pub output_tail: Vec<String>,
    pub inputs_hash: Option<String>,
}

impl TaskEntry {
    /// Whether the task failed (its tail is worth showing).
    #[must_use]
    pub fn failed(&self) -> bool {
        !matches!(
            self.outcome.as_str(),
            "succeeded" | "skipped" | "not-run" | "running"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_keeps_the_last_lines_that_fit() {
        let lines: Vec<String> = (0..100).map(|i| format!("{i:0>999}")).collect();
        let kept = bounded_tail(&lines);
        assert_eq!(kept.len(), 16);
        assert_eq!(kept.last(), lines.last());
        assert_eq!(kept[0], lines[84]);
        let huge = vec!["é".repeat(MAX_TAIL_BYTES)];
        let kept = bounded_tail(&huge);
        assert!(kept[0].len() <= MAX_TAIL_BYTES && !kept[0].is_empty());
        assert_eq!(bounded_tail(&["a".into(), "b".into()]), ["a", "b"]);
    }
}
