//! Executes a [`Plan`]: one task at a time, each under a select loop over its end, its deadline, a
//! heartbeat and the signals release-tasks receives.
//!
//! This module is policy only: which deadline applies to a task (its own `timeout` or what is left of
//! `release_timeout`, computed once when it starts), what a signal means (a stop ends the task and
//! the release, a forwarded one only reaches the task's processes), which tasks still run after a
//! failure, and which outcome follows. The mechanism (spawning, signalling a process group with
//! SIGTERM + SIGCONT then SIGKILL, reaping, output pumps, cancelling a webhook delivery, cleaning up
//! what a task leaves) belongs to the task's [`Supervisor`], which the run loop asks and tells.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use tokio::time::sleep_until;

use crate::config::{Defaults, On, Task};
use crate::gate::Env;
use crate::guardian::Guardian;
use crate::lock_check::{LockCheck, LockLost};
use crate::metadata::Metadata;
use crate::notify::Webhook;
use crate::plan::{Plan, Step};
use crate::process;
use crate::report::{
    EXIT_CANNOT_RUN, EXIT_NOT_FOUND, LockLoss, Outcome, Report, SkipReason, TaskReport,
};
use crate::signals::{Event, Signals};
use crate::supervisor::{Ended, Supervisor};
use crate::tail::Tail;

/// The shortest heartbeat; the config validator refuses less, and this keeps the loop honest anyway.
const MIN_HEARTBEAT: Duration = Duration::from_secs(1);

/// Runs the plan and reports what happened. `Err` only for release-tasks's own failures.
///
/// The async runtime and the signal handlers are set up only when some task is to run, so a release
/// with every gate off costs no more than reading the config (it replaces a shell script that costs
/// about a millisecond).
pub fn run_release(plan: &Plan, env: &Env) -> crate::error::Result<Report> {
    let meta = plan.meta.clone();
    if plan.to_run().next().is_none() {
        return Ok(all_skipped(plan, None, meta));
    }
    // Before any thread exists (the log's, the runtime's): the guardian is a fork of this process.
    let run_id = crate::guardian::new_run_id();
    let guardian = match Guardian::start(&run_id) {
        Ok(g) => Some(g),
        Err(err) => {
            tracing::warn!(error = %err, "cannot start the guardian process; if release-tasks is killed, a task's children may outlive it");
            None
        }
    };
    crate::log::write_in_background();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the runtime: {e}"))?;
    runtime.block_on(async {
        let signals = Signals::install()
            .map_err(|e| anyhow::anyhow!("cannot install signal handlers: {e}"))?;
        #[cfg(feature = "postgres")]
        if let Some(lock) = &plan.lock {
            return run_locked(plan, lock, env, meta, signals, (guardian, run_id)).await;
        }
        #[cfg(not(feature = "postgres"))]
        let _ = env; // only [lock] reads it
        Ok(run(
            plan,
            &plan.defaults,
            meta,
            signals,
            (guardian, run_id),
            crate::tail::secrets(env.iter()),
            None,
        )
        .await?
        .0)
    })
}

/// The release under `[lock]`: the lock first, then (with `once`) the ledger, the tasks, the outcome
/// in the ledger, and the unlock, also when the release failed.
#[cfg(feature = "postgres")]
async fn run_locked(
    plan: &Plan,
    lock: &crate::config::Lock,
    env: &Env,
    meta: Metadata,
    mut signals: Signals,
    guardian: (Option<Guardian>, String),
) -> crate::error::Result<Report> {
    let held = crate::lock::acquire(lock, env, &meta, &mut signals).await?;
    let release = crate::lock::release_id(&meta).unwrap_or_default();
    if lock.once {
        if let Some(previous) = held.previous(&release).await? {
            let reason = format!(
                "release {release} already completed by {} at {}",
                previous.holder, previous.finished_at
            );
            tracing::info!(lock = %held.name(), release = %release, reason = %reason, "skipping every task");
            let report = all_skipped(plan, Some(&reason), meta);
            // Nothing was written in the transaction: a failed COMMIT (logged) changes nothing.
            let _ = held.release().await;
            return Ok(report);
        }
        held.begin(&release).await?;
    }
    let held_name = held.name().to_owned();
    let report = run(
        plan,
        &plan.defaults,
        meta,
        signals,
        guardian,
        crate::tail::secrets(env.iter()),
        Some(&held),
    )
    .await;
    let (mut report, last_task) = match report {
        Ok(ran) => ran,
        Err(err) => {
            let _ = held.release().await;
            return Err(err.into());
        }
    };
    // A lost lock took its transaction with it: nothing is written and nothing committed (another
    // replica may hold the lock and the ledger's row by now).
    if report.lock_lost.is_some() {
        held.abandon();
        return Ok(report);
    }
    if report.interrupted.is_some() {
        held.hurry();
    }
    let recorded = if lock.once {
        held.finish(&release, &report).await
    } else {
        Ok(())
    };
    let committed = held.release().await;
    // A COMMIT that succeeds proves that the lock was held from the moment it was taken to the
    // end; one that fails, that it was lost on the way, during the last task at the latest: a
    // lost lock like any other. With `once`, the outcome is written in the lock's transaction: if
    // it was not committed, the ledger does not have the release as completed, so another replica
    // will run it again.
    if let Err(reason) = recorded.and(committed) {
        let reason = if lock.once {
            tracing::error!(
                lock = %held_name, last_task_under_lock = last_task.as_deref(), reason = %reason,
                "the release's outcome could not be recorded in the ledger; another replica may take the lock and run the release again"
            );
            format!("the outcome could not be recorded in release_tasks_runs: {reason}")
        } else {
            tracing::error!(
                lock = %held_name, last_task_under_lock = last_task.as_deref(), reason = %reason,
                "the lock's transaction could not be committed: the lock was lost before the release ended; another replica may take the lock and run the release again"
            );
            format!("the lock's transaction could not be committed: {reason}")
        };
        report.lock_lost = Some(LockLoss { reason, last_task });
    }
    Ok(report)
}

/// The report of a release in which no task runs: each step skipped for `reason`, or for its own
/// (its gate, the selection) when there is none.
fn all_skipped(plan: &Plan, reason: Option<&str>, meta: Metadata) -> Report {
    let mut report = Report::new(meta);
    report.tasks = plan
        .steps
        .iter()
        .map(|step| {
            let why =
                reason.map_or_else(|| step.skip_reason(), |r| SkipReason::Other(r.to_owned()));
            skipped(step, why)
        })
        .collect();
    report
}

/// The report line of a step that is not run, and why (its gate, the selection, the ledger).
fn skipped(step: &Step, reason: SkipReason) -> TaskReport {
    tracing::info!(task = %step.task.name, reason = %reason, "task skipped");
    TaskReport {
        output_tail: Vec::new(),
        name: step.task.name.clone(),
        outcome: Outcome::Skipped(reason),
        duration: Duration::ZERO,
        allow_failure: step.task.allow_failure,
    }
}

/// Runs the tasks: the report, and the last task that started after a check proved the lock held.
async fn run(
    plan: &Plan,
    defaults: &Defaults,
    meta: Metadata,
    signals: Signals,
    (guardian, run_id): (Option<Guardian>, String),
    secrets: Vec<String>,
    lock: Option<&dyn LockCheck>,
) -> anyhow::Result<(Report, Option<String>)> {
    let started = Instant::now();
    let mut runner = Runner {
        tail_lines: defaults.tail_lines,
        secrets,
        signals,
        guardian,
        interrupted: None,
        stopping_signals: 0,
        run_id,
        release_deadline: started + defaults.release_timeout,
        release_timeout: defaults.release_timeout,
        heartbeat: defaults.heartbeat.max(MIN_HEARTBEAT),
        name_width: plan.to_run().map(|s| s.task.name.len()).max().unwrap_or(0),
    };
    let mut report = Report::new(meta);
    let mut lock = HeldLock {
        lock,
        last_task: None,
    };
    for step in &plan.steps {
        runner.take_pending_events().await;
        let task = &step.task;
        if !step.run {
            report.tasks.push(skipped(step, step.skip_reason()));
            continue;
        }
        let mut failed = report.failed_task().is_some()
            || runner.interrupted.is_some()
            || report.lock_lost.is_some();
        // A lock lost during the last task is found by the next check only: an on = "failure"
        // clean-up that would be skipped asks first, for the loss fails the release.
        if !failed && task.on == On::Failure {
            failed = lock.found_lost(&mut report, &mut runner).await;
        }
        // An expired release_timeout fails the release like anything else, through the task it cut
        // off or the next on = "success" task, which cannot start; what follows a failure
        // (on = "failure" and "always") still runs, on its own timeout.
        let expired = Instant::now() >= runner.release_deadline;
        let t0 = Instant::now();
        let mut allow_failure = task.allow_failure;
        let mut output_tail = Vec::new();
        let outcome = if runner.stopping_signals >= 2 {
            Outcome::NotRun
        } else if task.on == On::Success && !failed && expired {
            tracing::error!(task = %task.name, "release_timeout reached before the task could start");
            Outcome::TimedOut
        } else if !task.on.runs(failed) {
            if task.on == On::Failure {
                let reason = SkipReason::OnFailure;
                tracing::info!(task = %task.name, reason = %reason, "task skipped");
                Outcome::Skipped(reason)
            } else {
                Outcome::NotRun
            }
        } else if !lock.before_start(task, &mut report, &mut runner).await && task.on == On::Success
        {
            Outcome::LockLost
        } else if lock.stopped_meanwhile(&mut runner, task, failed).await {
            Outcome::NotRun
        } else {
            // After a failure, on = "failure"/"always" tasks get their own timeout, not what is left
            // of the release's: they are how the failure gets cleaned up and told.
            let release_deadline = (!(failed || expired)).then_some(runner.release_deadline);
            let ran = match &step.webhook {
                Some(webhook) => {
                    let mut so_far = report.clone();
                    so_far.duration = started.elapsed();
                    so_far.interrupted = runner.interrupted;
                    runner
                        .run_notify(task, webhook, &so_far, release_deadline)
                        .await?
                }
                None => runner.run_task(task, release_deadline).await?,
            };
            // A task cut off by release_timeout is the release's failure, which allow_failure does not
            // excuse: the release did not finish in time.
            allow_failure &= !ran.cut_by_release;
            Runner::log_finished(task, &ran.outcome, allow_failure, t0.elapsed());
            output_tail = ran.output_tail;
            ran.outcome
        };
        let duration = if outcome.exit_code().is_some() {
            t0.elapsed()
        } else {
            Duration::ZERO
        };
        report.tasks.push(TaskReport {
            name: task.name.clone(),
            outcome,
            duration,
            allow_failure,
            output_tail,
        });
    }
    // A stop signal that came after the last task's end is the release's too: take the signals
    // over (for `exec`, which asks before it starts its command), then what is still queued.
    crate::exec::hold_stop_signals();
    runner.take_pending_events().await;
    report.interrupted = runner.interrupted;
    report.duration = started.elapsed();
    Ok((report, lock.last_task))
}

/// The release's `[lock]` as the run loop sees it: checked immediately before each task starts.
struct HeldLock<'a> {
    /// `None` for a release without `[lock]`.
    lock: Option<&'a dyn LockCheck>,
    /// The last task that started after a check proved the lock held.
    last_task: Option<String>,
}

impl HeldLock<'_> {
    /// Whether a stopping signal that arrived during the check (which may wait up to its bound for
    /// a silent database) keeps `task` from starting, as it would have before the check.
    async fn stopped_meanwhile(&self, runner: &mut Runner, task: &Task, failed: bool) -> bool {
        if self.lock.is_none() {
            return false;
        }
        runner.take_pending_events().await;
        runner.stopping_signals >= 2 || !task.on.runs(failed || runner.interrupted.is_some())
    }

    /// Whether `task` may start under the lock: one check of the lock (none without `[lock]`, none
    /// once it is known lost). The first loss is recorded in the report, with the last task that
    /// started under the lock; the caller decides what a task does without it (an `on = "success"`
    /// task does not start, clean-up does).
    ///
    /// A stop signal is acted on during the check, which a silent database can make last its whole
    /// bound: the check is given up (`true`: the caller's stop test keeps an `on = "success"` task
    /// from starting). After a stop, clean-up starts without a check: the release is ending, and
    /// clean-up runs whether the lock is held or not.
    async fn before_start(
        &mut self,
        task: &Task,
        report: &mut Report,
        runner: &mut Runner,
    ) -> bool {
        let Some(lock) = self.lock else {
            return true;
        };
        if report.lock_lost.is_some() {
            tracing::warn!(task = %task.name, "starting a clean-up task without the release lock");
            return false;
        }
        if runner.interrupted.is_some() {
            return true;
        }
        let Some(checked) = checked_unless_stopped(lock, runner).await else {
            return true;
        };
        match checked {
            Ok(()) => {
                self.last_task = Some(task.name.clone());
                true
            }
            Err(lost) => {
                if task.on == On::Success {
                    tracing::error!(
                        task = %task.name, last_task_under_lock = self.last_task.as_deref(), reason = %lost.reason,
                        "the release lock is lost, so this task does not start, nor any later one but clean-up \
                         (on = \"failure\" or \"always\"); another replica may take the lock and run the release again"
                    );
                    report.lock_lost = Some(LockLoss {
                        reason: lost.to_string(),
                        last_task: self.last_task.clone(),
                    });
                } else {
                    self.record_loss(&lost, report);
                    tracing::warn!(task = %task.name, "starting a clean-up task without the release lock");
                }
                false
            }
        }
    }

    /// Whether the lock, not known lost yet, is found lost by a check now (recorded in the report).
    /// Asked before an `on = "failure"` task that a release without failure would skip: a lock
    /// lost during the last task fails the release, and the clean-up is then due.
    /// A stop signal during the check fails the release as well (`true`, nothing recorded).
    async fn found_lost(&mut self, report: &mut Report, runner: &mut Runner) -> bool {
        let Some(lock) = self.lock else {
            return false;
        };
        if report.lock_lost.is_some() {
            return true;
        }
        match checked_unless_stopped(lock, runner).await {
            None => true,
            Some(Ok(())) => false,
            Some(Err(lost)) => {
                self.record_loss(&lost, report);
                true
            }
        }
    }

    /// Says that the lock is lost and records it, with the last task that started under it.
    fn record_loss(&self, lost: &LockLost, report: &mut Report) {
        tracing::error!(
            last_task_under_lock = self.last_task.as_deref(), reason = %lost.reason,
            "the release lock is lost, so no task starts from now on but clean-up \
             (on = \"failure\" or \"always\"); another replica may take the lock and run the release again"
        );
        report.lock_lost = Some(LockLoss {
            reason: lost.to_string(),
            last_task: self.last_task.clone(),
        });
    }
}

/// One check of the lock, while the signals that arrive meanwhile are handled: `None` when a stop
/// signal came first (the check is given up: a silent database can make it last its whole bound).
async fn checked_unless_stopped(
    lock: &dyn LockCheck,
    runner: &mut Runner,
) -> Option<Result<(), LockLost>> {
    let mut check = lock.check();
    loop {
        tokio::select! {
            biased;
            result = &mut check => return Some(result),
            event = runner.signals.next() => {
                runner.on_event(event, None);
                if runner.interrupted.is_some() {
                    return None;
                }
            }
        }
    }
}

struct Runner {
    signals: Signals,
    guardian: Option<Guardian>,
    /// The first stopping signal release-tasks received.
    interrupted: Option<Signal>,
    /// How many stopping signals arrived; after the second nothing more starts.
    stopping_signals: u32,
    /// Marks this run's processes for the guardian.
    run_id: String,
    release_deadline: Instant,
    release_timeout: Duration,
    heartbeat: Duration,
    name_width: usize,
    /// How many last lines of each task's output to keep for the report.
    tail_lines: usize,
    /// Values hidden wherever a task's output is shown again (see `tail.rs`).
    secrets: Vec<String>,
}

/// The deadline that applies to one task, decided once when it starts.
struct Deadline {
    at: Instant,
    /// Which setting it comes from (`timeout` or `release_timeout`), and that setting's value.
    bound: &'static str,
    limit: Duration,
}

/// How a task that was started went.
struct Ran {
    outcome: Outcome,
    /// The task's last output lines, ready to show.
    output_tail: Vec<String>,
    /// Whether `release_timeout` (not the task's own timeout) cut it off.
    cut_by_release: bool,
}

/// How the run loop left a supervised task.
struct Supervised {
    ended: Ended,
    timed_out: Option<&'static str>,
    /// The stopping signal that arrived while this task ran, if it was the release's first.
    interrupted: Option<Signal>,
}

impl Runner {
    /// `min(task timeout, what is left of release_timeout)` from `started`, and which one it is.
    fn deadline(&self, task: &Task, started: Instant, release: Option<Instant>) -> Deadline {
        let own = started + task.timeout;
        match release {
            Some(release) if release < own => Deadline {
                at: release,
                bound: "release_timeout",
                limit: self.release_timeout,
            },
            _ => Deadline {
                at: own,
                bound: "timeout",
                limit: task.timeout,
            },
        }
    }

    async fn run_task(
        &mut self,
        task: &Task,
        release_deadline: Option<Instant>,
    ) -> anyhow::Result<Ran> {
        let command = crate::redact::command(&task.command.to_string());
        tracing::info!(task = %task.name, command = %command, timeout_s = task.timeout.as_secs(), "task started");
        let spawned = match process::spawn(task, &self.run_id) {
            Ok(spawned) => spawned,
            Err(err) => {
                return Ok(Ran {
                    outcome: could_not_start(task, &err),
                    output_tail: Vec::new(),
                    cut_by_release: false,
                });
            }
        };
        let started = Instant::now();
        let pid = spawned.pid;
        let exempt = self.guardian.iter().map(Guardian::pid).collect();
        let prefix = format!("{:<w$} | ", task.name, w = self.name_width).into_bytes();
        let tail = Arc::new(Mutex::new(Tail::new(self.tail_lines)));
        let supervisor =
            Supervisor::command(&task.name, task.grace, spawned, exempt, &prefix, &tail)?;
        if let Some(g) = &self.guardian {
            g.tell(pid, true);
        }
        let deadline = self.deadline(task, started, release_deadline);
        let done = self.supervise(task, supervisor, &deadline, started).await;
        if let Some(g) = &self.guardian {
            g.tell(pid, false);
        }
        let Ended::Command(status) = done.ended else {
            unreachable!("a command task ends as a command");
        };
        let outcome = match (status, done.timed_out, done.interrupted) {
            (_, Some(_), _) => Outcome::TimedOut,
            (WaitStatus::Exited(_, 0), _, _) => Outcome::Succeeded,
            (_, _, Some(sig)) => Outcome::Interrupted(sig),
            (WaitStatus::Exited(_, code), _, _) => Outcome::Failed(code),
            (WaitStatus::Signaled(_, sig, _), _, _) => Outcome::Signaled(sig),
            // waitpid without WUNTRACED reports only exits and deaths by signal.
            _ => Outcome::Failed(1),
        };
        let output_tail = {
            let mut tail = tail.lock().unwrap_or_else(PoisonError::into_inner);
            tail.finish();
            let mut secrets = self.secrets.clone();
            secrets.extend(crate::tail::secrets(task.env.iter()));
            tail.render(&secrets)
        };
        Ok(Ran {
            outcome,
            output_tail,
            cut_by_release: done.timed_out == Some("release_timeout"),
        })
    }

    /// Runs a notify task: the report so far, sent from the supervisor's delivery thread while the
    /// run loop keeps handling signals and the deadline, either of which cancels the delivery.
    async fn run_notify(
        &mut self,
        task: &Task,
        webhook: &Webhook,
        report: &Report,
        release_deadline: Option<Instant>,
    ) -> anyhow::Result<Ran> {
        tracing::info!(
            task = %task.name, url = %webhook.shown_url(), format = %webhook.format,
            retries = webhook.retries, "task started"
        );
        let started = Instant::now();
        let supervisor =
            match Supervisor::notify(&task.name, task.grace, webhook, webhook.body(report)) {
                Ok(supervisor) => supervisor,
                Err(err) => {
                    return Ok(Ran {
                        outcome: Outcome::NotDelivered(format!(
                            "cannot start the sending thread: {err}"
                        )),
                        output_tail: Vec::new(),
                        cut_by_release: false,
                    });
                }
            };
        let deadline = self.deadline(task, started, release_deadline);
        let done = self.supervise(task, supervisor, &deadline, started).await;
        let Ended::Notify(result) = done.ended else {
            unreachable!("a notify task ends as a notify task");
        };
        let outcome = match (result, done.timed_out, done.interrupted) {
            (_, Some(_), _) => Outcome::TimedOut,
            (Ok(status), _, _) => {
                tracing::info!(task = %task.name, status, "the webhook took the report");
                Outcome::Succeeded
            }
            (Err(_), _, Some(sig)) => Outcome::Interrupted(sig),
            (Err(why), _, _) => Outcome::NotDelivered(why),
        };
        Ok(Ran {
            outcome,
            output_tail: Vec::new(),
            cut_by_release: done.timed_out == Some("release_timeout"),
        })
    }

    /// The select loop over one task: its end, its deadline (SIGTERM + SIGCONT), SIGKILL after the
    /// grace, the heartbeat, and signals; then the clean-up of what it left, still handling signals.
    async fn supervise(
        &mut self,
        task: &Task,
        mut sup: Supervisor,
        deadline: &Deadline,
        started: Instant,
    ) -> Supervised {
        let interrupted_before = self.interrupted;
        let mut timed_out = None;
        let mut next_beat = started + self.heartbeat;
        let far = started + Duration::from_secs(100 * 365 * 24 * 3600);
        while !sup.has_ended() {
            let kill_due = sup.kill_due();
            let terminating = sup.terminating();
            tokio::select! {
                biased;
                event = self.signals.next() => self.on_event(event, Some(&mut sup)),
                () = sup.ended() => {}
                () = sleep_until(deadline.at.into()), if !terminating => {
                    timed_out = Some(deadline.bound);
                    let action = if sup.is_process() {
                        "task timed out; sending SIGTERM to its process group, SIGKILL after the grace period"
                    } else {
                        "task timed out; cancelling the webhook delivery"
                    };
                    tracing::error!(
                        task = %task.name, bound = deadline.bound,
                        limit = %humantime::format_duration(deadline.limit),
                        grace_s = task.grace.as_secs_f64(), "{action}"
                    );
                    sup.begin(Signal::SIGTERM);
                }
                () = sleep_until(kill_due.unwrap_or(far).into()), if kill_due.is_some() => {
                    if sup.is_process() {
                        tracing::warn!(task = %task.name, "grace period over; sending SIGKILL to the task's process group");
                    }
                    sup.kill();
                }
                () = sleep_until(next_beat.into()), if !terminating => {
                    tracing::info!(
                        task = %task.name,
                        elapsed = %humantime::format_duration(Duration::from_secs(started.elapsed().as_secs())),
                        timeout_in = %humantime::format_duration(whole_seconds_up(deadline.at.saturating_duration_since(Instant::now()))),
                        "task still running"
                    );
                    // From now, not from the last beat: after a stall, one beat, not a burst of them.
                    next_beat = Instant::now() + self.heartbeat;
                }
            }
        }
        while let Some(until) = sup.settle_step() {
            tokio::select! {
                biased;
                event = self.signals.next() => self.on_event(event, Some(&mut sup)),
                () = sup.settle_wait(until) => {}
            }
        }
        let interrupted = self.interrupted.filter(|_| interrupted_before.is_none());
        Supervised {
            ended: sup.finish().await,
            timed_out,
            interrupted,
        }
    }

    /// Acts on one event: reaps on SIGCHLD, forwards a signal to the running task's processes, and
    /// records a stopping signal, which begins ending the running task (a second SIGINT or SIGTERM
    /// kills it at once).
    fn on_event(&mut self, event: Event, sup: Option<&mut Supervisor>) {
        match event {
            Event::Child => match sup {
                Some(sup) => sup.reap(),
                // Between tasks only orphans exit; collecting them is all there is to do.
                None => drop(process::reap()),
            },
            Event::Forward(sig) => match sup {
                Some(sup) if sup.forward(sig) => {
                    tracing::info!(signal = %sig, task = %sup.task(), "signal forwarded to the task");
                }
                _ => {
                    tracing::info!(signal = %sig, "received signal; no task process is running to forward it to");
                }
            },
            Event::Stop(sig) => {
                self.stopping_signals += 1;
                let again =
                    self.stopping_signals >= 2 && matches!(sig, Signal::SIGINT | Signal::SIGTERM);
                self.interrupted.get_or_insert(sig);
                let Some(sup) = sup else {
                    tracing::warn!(signal = %sig, "received signal; no further task will start");
                    return;
                };
                if again {
                    if !sup.killed() {
                        tracing::warn!(signal = %sig, "received a second stopping signal; sending SIGKILL to the task's process group");
                        sup.kill();
                    }
                } else if sup.is_process() {
                    tracing::warn!(
                        signal = %sig, grace_s = sup.grace().as_secs_f64(),
                        "received signal; forwarding it to the task's process group, SIGKILL after the grace period; no further task will start"
                    );
                    sup.begin(sig);
                } else {
                    tracing::warn!(signal = %sig, task = %sup.task(), "received signal; cancelling the webhook delivery; no further task will start");
                    sup.begin(sig);
                }
            }
        }
    }

    /// Handles events that queued up while no task was running, without waiting for more.
    async fn take_pending_events(&mut self) {
        // A signal's handler only writes to tokio's self-pipe; the runtime's driver turns that into
        // an event when it next runs. Yielding lets it run, or a signal that arrived since the last
        // await would be missed here (and a task would start after a stop, or `exec` go on).
        tokio::task::yield_now().await;
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        loop {
            let event = {
                let mut next = std::pin::pin!(self.signals.next());
                match next.as_mut().poll(&mut cx) {
                    std::task::Poll::Ready(event) => event,
                    std::task::Poll::Pending => return,
                }
            };
            self.on_event(event, None);
        }
    }

    fn log_finished(task: &Task, outcome: &Outcome, allow_failure: bool, duration: Duration) {
        let duration_ms = duration.as_millis() as u64;
        let exit_code = outcome.exit_code();
        if outcome.is_failure() {
            tracing::error!(task = %task.name, outcome = outcome.label(), exit_code, duration_ms, allow_failure, detail = %outcome, "task finished");
        } else {
            tracing::info!(task = %task.name, outcome = outcome.label(), exit_code, duration_ms, "task finished");
        }
    }
}

/// `d` in whole seconds, rounded up: "timeout in 0s" must not appear while time is left.
fn whole_seconds_up(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs() + u64::from(d.subsec_nanos() > 0))
}

fn could_not_start(task: &Task, err: &std::io::Error) -> Outcome {
    let program = task
        .command
        .argv()
        .first()
        .copied()
        .unwrap_or_default()
        .to_owned();
    let (code, reason) = match err.kind() {
        std::io::ErrorKind::NotFound => (
            EXIT_NOT_FOUND,
            format!("command not found: `{program}`; is it installed and on PATH?"),
        ),
        std::io::ErrorKind::PermissionDenied => (
            EXIT_CANNOT_RUN,
            match task.program_directory(
                task.env
                    .get("PATH")
                    .map(std::ffi::OsString::from)
                    .or_else(|| std::env::var_os("PATH"))
                    .as_deref(),
            ) {
                Some(dir) => format!(
                    "`{program}` is a directory ({}), not a program; give the path of the program to run",
                    dir.display()
                ),
                None => {
                    format!("permission denied running `{program}`; is it executable (chmod +x)?")
                }
            },
        ),
        // An error of the OS's own, from the exec.
        _ if err.raw_os_error().is_some() => {
            (EXIT_CANNOT_RUN, format!("cannot run `{program}`: {err}"))
        }
        // release-tasks's own words for a set-up step that failed (`spawn.rs`), which are not about
        // the program: a removed working directory, a limit on processes, a variable too large.
        _ => (EXIT_CANNOT_RUN, format!("cannot start the task: {err}")),
    };
    Outcome::CouldNotStart { code, reason }
}
