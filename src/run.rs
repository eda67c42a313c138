//! Executes a [`Plan`]: the order of tasks, and the decisions between them.
//!
//! This module is policy only, and its decisions are pure functions with unit tests below: whether
//! the next task runs and within which deadline (`next`: after a failure, `on = "failure"` and
//! `"always"` tasks run on their own timeout; after a second stop signal nothing starts), and which
//! outcome follows from how a task ended (`command_outcome`, `delivery_outcome`). Each running
//! task is owned whole by its [`TaskRun`] (`task_run.rs`): spawning is done here, then its process
//! group, output, deadline, SIGTERM + SIGCONT -> grace -> SIGKILL and its leftovers are the
//! `TaskRun`'s, which takes the run loop's signals as [`Order`]s from the `Listener` and returns a
//! typed result. Exit statuses are derived from the outcomes in `report.rs`.

use std::future::Future;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;

use crate::config::{On, Task};
use crate::gate::Env;
use crate::guardian::Guardian;
use crate::lock_check::{LockCheck, LockLost};
use crate::metadata::Metadata;
use crate::notify::Webhook;
use crate::output::Stdio;
use crate::plan::{Plan, Step};
use crate::process;
use crate::record::{Recorder, TaskRecord};
use crate::report::{
    EXIT_CANNOT_RUN, EXIT_NOT_FOUND, LockLoss, Outcome, Report, SkipReason, TaskReport,
};
use crate::signals::{Event, Signals};
use crate::task_run::{Bound, Limit, Order, Orders, Policy, ReleaseDeadline, SignalCount, TaskRun};

/// The shortest heartbeat; the config validator refuses less, and this keeps the loop honest anyway.
const MIN_HEARTBEAT: Duration = Duration::from_secs(1);

/// Runs the plan and reports what happened. `Err` only for release-tasks's own failures.
///
/// The async runtime and the signal handlers are set up only when some task is to run, so a release
/// with every gate off costs no more than reading the config (it replaces a shell script that costs
/// about a millisecond).
pub fn run_release(plan: &Plan, env: &Env, stdio: &Stdio) -> crate::error::Result<Report> {
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
    stdio.write_in_background().map_err(|err| {
        crate::limits::thread_error("cannot start a thread for release-tasks's output", err)
    })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| crate::limits::or_internal("cannot start the runtime", &e))?;
    runtime.block_on(async {
        let signals = Signals::install()
            .map_err(|e| crate::limits::or_internal("cannot install signal handlers", &e))?
            .telling(stdio);
        #[cfg(feature = "postgres")]
        if let Some(lock) = &plan.lock {
            // Boxed: the locked release's future holds the lock's and the ledger's state.
            return Box::pin(run_locked(
                plan,
                lock,
                env,
                meta,
                signals,
                (guardian, run_id),
                stdio,
            ))
            .await;
        }
        #[cfg(not(feature = "postgres"))]
        let _ = env; // only [lock] reads it
        Ok(run(
            plan,
            meta,
            signals,
            (guardian, run_id),
            crate::tail::secrets(env.iter()),
            stdio,
            (None, None),
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
    stdio: &Stdio,
) -> crate::error::Result<Report> {
    let held = crate::lock::acquire(lock, env, &meta, &mut signals).await?;
    let release = crate::lock::release_id(&meta).unwrap_or_default();
    if lock.once {
        // A stop signal ends these at once, as it ends the wait for the lock: a silent database
        // must not keep release-tasks from its short grace (closing the connection unlocks).
        if let Some(previous) =
            crate::lock::or_stop(&mut signals, Box::pin(held.previous(&release))).await?
        {
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
        crate::lock::or_stop(&mut signals, Box::pin(held.begin(&release))).await?;
    }
    let held_name = held.name().to_owned();
    // The `changed` gates, decided under the lock from the ledger's last successful runs.
    let mut plan = plan.clone();
    let undecided = plan.undecided_changed();
    if !undecided.is_empty() {
        if plan.force {
            plan.apply_ledger(&std::collections::HashMap::new(), true);
        } else {
            match held.last_successes(&undecided).await {
                Ok(last) => plan.apply_ledger(&last, false),
                Err(err) => {
                    tracing::warn!(error = %err, "cannot read the tasks' last successful runs; tasks with `changed` run");
                    plan.ledger_unread(&err.to_string());
                }
            }
        }
        for step in plan.steps.iter().filter(|s| s.verdict.is_some()) {
            tracing::info!(task = %step.task.name, decision = %step.reason, "changed gate");
        }
    }
    let plan = &plan;
    let report = run(
        plan,
        meta,
        signals,
        guardian,
        crate::tail::secrets(env.iter()),
        stdio,
        (Some(&held), lock.once.then_some(&held as &dyn Recorder)),
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
        attempts: 0,
        name: step.task.name.clone(),
        outcome: Outcome::Skipped(reason),
        duration: Duration::ZERO,
        allow_failure: step.task.allow_failure,
    }
}

/// Runs the tasks: the report, and the last task that started after a check proved the lock held.
async fn run(
    plan: &Plan,
    meta: Metadata,
    signals: Signals,
    (guardian, run_id): (Option<Guardian>, String),
    secrets: Vec<String>,
    stdio: &Stdio,
    (lock, recorder): (Option<&dyn LockCheck>, Option<&dyn Recorder>),
) -> anyhow::Result<(Report, Option<String>)> {
    let started = Instant::now();
    let mut runner = Runner::new(plan, signals, (guardian, run_id), secrets, stdio);
    let mut report = Report::new(meta);
    let mut lock = HeldLock {
        lock,
        last_task: None,
    };
    for (position, step) in (1u32..).zip(&plan.steps) {
        runner.listener.take_pending().await;
        let task = &step.task;
        if !step.run {
            report.tasks.push(skipped(step, step.skip_reason()));
            record_last(&mut runner.listener, recorder, &report, position, step).await;
            continue;
        }
        let mut failed = report.failed_task().is_some()
            || runner.listener.stops.first.is_some()
            || report.lock_lost.is_some();
        // A lock lost during the last task is found by the next check only: an on = "failure"
        // clean-up that would be skipped asks first, for the loss fails the release.
        if !failed && task.on == On::Failure {
            failed = lock.found_lost(&mut report, &mut runner.listener).await;
        }
        let expired = tokio::time::Instant::now() >= runner.release.at;
        let t0 = Instant::now();
        let mut allow_failure = task.allow_failure;
        let mut output_tail = Vec::new();
        let mut attempts = 0;
        let outcome = match next(task.on, failed, expired, runner.listener.stops.count) {
            Next::NotRun(outcome) => {
                log_not_run(task, &outcome);
                outcome
            }
            Next::Run { .. }
                if !lock
                    .before_start(task, &mut report, &mut runner.listener)
                    .await
                    && task.on == On::Success =>
            {
                Outcome::LockLost
            }
            Next::Run { within_release } => {
                // Immediately before the task starts (the lock was checked by the arm above): a
                // stop signal that came during the check keeps it from starting.
                if lock
                    .stopped_meanwhile(&mut runner.listener, task, failed)
                    .await
                {
                    Outcome::NotRun
                } else {
                    let release = within_release.then_some(runner.release);
                    let (ran, attempt) = runner
                        .run_attempts(
                            step,
                            release,
                            (&mut report, started),
                            (&mut lock, recorder),
                            position,
                        )
                        .await?;
                    attempts = attempt;
                    // A task cut off by release_timeout is the release's failure, which allow_failure
                    // does not excuse: the release did not finish in time.
                    allow_failure &= !ran.cut_by_release;
                    if ran.outcome != Outcome::NotRun {
                        Runner::log_finished(task, &ran.outcome, allow_failure, t0.elapsed());
                    }
                    output_tail = ran.output_tail;
                    ran.outcome
                }
            }
        };
        let outcome_ran = outcome.exit_code().is_some();
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
            attempts: if outcome_ran { attempts.max(1) } else { 0 },
        });
        record_last(&mut runner.listener, recorder, &report, position, step).await;
    }
    // A stop signal that came after the last task's end is the release's too: take the signals
    // over (for `exec`, which asks before it starts its command), then what is still queued.
    crate::exec::hold_stop_signals();
    runner.listener.take_pending().await;
    report.interrupted = runner.listener.stops.first;
    report.duration = started.elapsed();
    Ok((report, lock.last_task))
}

/// Says why a step that was to run does not (a second stop signal says nothing more).
fn log_not_run(task: &Task, outcome: &Outcome) {
    match outcome {
        Outcome::TimedOut => {
            tracing::error!(task = %task.name, "release_timeout reached before the task could start");
        }
        Outcome::Skipped(reason) => {
            tracing::info!(task = %task.name, reason = %reason, "task skipped");
        }
        _ => {}
    }
}

/// How long the record of a task may wait for the database once release-tasks was told to stop.
const STOPPING_RECORD_WAIT: Duration = Duration::from_secs(1);

/// Writes the record of the task last added to `report` (the ledger, with `once`). A stop signal
/// ends the wait at once, and after one the wait is short: a silent database must not keep
/// release-tasks from acting on a stop within its grace.
async fn record_last(
    listener: &mut Listener,
    recorder: Option<&dyn Recorder>,
    report: &Report,
    position: u32,
    step: &Step,
) {
    if let (Some(recorder), Some(last)) = (recorder, report.tasks.last()) {
        let record = TaskRecord::finished(last, position, step.inputs.as_ref());
        listener.record(recorder, record).await;
    }
}

impl Listener {
    /// Writes a task's record: a stop signal ends the wait at once, and after one the wait is
    /// short (`STOPPING_RECORD_WAIT`).
    async fn record(&mut self, recorder: &dyn Recorder, record: TaskRecord) {
        if self.unanswered {
            return;
        }
        let task = record.task.clone();
        let write = recorder.record(record);
        if self.stops.first.is_some() {
            if tokio::time::timeout(STOPPING_RECORD_WAIT, write)
                .await
                .is_err()
            {
                tracing::warn!(task = %task, "the database did not answer within {}s after the stop signal; this record of the task is not written, nor the ones after it", STOPPING_RECORD_WAIT.as_secs());
                self.unanswered = true;
            }
        } else {
            let _ = self.unless_stopped(write).await;
        }
    }
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
    async fn stopped_meanwhile(&self, listener: &mut Listener, task: &Task, failed: bool) -> bool {
        if self.lock.is_none() {
            return false;
        }
        listener.take_pending().await;
        listener.stops.count >= 2 || !task.on.runs(failed || listener.stops.first.is_some())
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
        listener: &mut Listener,
    ) -> bool {
        let Some(lock) = self.lock else {
            return true;
        };
        if report.lock_lost.is_some() {
            tracing::warn!(task = %task.name, "starting a clean-up task without the release lock");
            return false;
        }
        if listener.stops.first.is_some() {
            return true;
        }
        let Some(checked) = checked_unless_stopped(lock, listener).await else {
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
    async fn found_lost(&mut self, report: &mut Report, listener: &mut Listener) -> bool {
        let Some(lock) = self.lock else {
            return false;
        };
        if report.lock_lost.is_some() {
            return true;
        }
        match checked_unless_stopped(lock, listener).await {
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
    listener: &mut Listener,
) -> Option<Result<(), LockLost>> {
    listener.unless_stopped(lock.check()).await
}

impl Listener {
    /// `work`, while the signals that arrive meanwhile are handled: `None` when a stop signal came
    /// first (the work is dropped).
    async fn unless_stopped<T>(&mut self, work: impl Future<Output = T>) -> Option<T> {
        let mut work = std::pin::pin!(work);
        loop {
            tokio::select! {
                biased;
                result = &mut work => return Some(result),
                order = self.next() => match order {
                Order::Reap => drop(process::reap()),
                Order::Forward(sig) => {
                    tracing::info!(signal = %sig, "received signal; no task process is running to forward it to");
                }
                Order::Stop(sig, _) => {
                    tracing::warn!(signal = %sig, "received signal; no further task will start");
                    return None;
                }
            },
            }
        }
    }
}

/// What becomes of a step that is to run, decided before it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Next {
    /// It runs: within the release's deadline, or on its own timeout only.
    Run { within_release: bool },
    /// It does not run, and this is its outcome.
    NotRun(Outcome),
}

/// Whether the next task runs, from its `on`, whether the release has failed (a task failed, or a
/// stop signal arrived), whether `release_timeout` has passed, and how many stop signals arrived.
///
/// An expired `release_timeout` fails the release like anything else, through the task it cut off
/// or the next `on = "success"` task, which cannot start; what follows a failure (`on = "failure"`
/// and `"always"`) still runs, on its own timeout only: it is how the failure gets cleaned up and
/// told. After a second stop signal nothing starts.
fn next(on: On, failed: bool, expired: bool, stops: u32) -> Next {
    if stops >= 2 {
        Next::NotRun(Outcome::NotRun)
    } else if on == On::Success && !failed && expired {
        Next::NotRun(Outcome::TimedOut)
    } else if !on.runs(failed) {
        Next::NotRun(if on == On::Failure {
            Outcome::Skipped(SkipReason::OnFailure)
        } else {
            Outcome::NotRun
        })
    } else {
        Next::Run {
            within_release: !(failed || expired),
        }
    }
}

/// The outcome of a command task from how it ended: a timeout first (whatever the process did
/// after its SIGTERM), then a clean exit (a task that exits 0 on its stop signal succeeded), then the
/// release's stop signal, then its own code or signal.
fn command_outcome(
    status: WaitStatus,
    timed_out: Option<Bound>,
    stopped: Option<Signal>,
) -> Outcome {
    match (status, timed_out, stopped) {
        (_, Some(_), _) => Outcome::TimedOut,
        (WaitStatus::Exited(_, 0), _, _) => Outcome::Succeeded,
        (_, _, Some(sig)) => Outcome::Interrupted(sig),
        (WaitStatus::Exited(_, code), _, _) => Outcome::Failed(code),
        (WaitStatus::Signaled(_, sig, _), _, _) => Outcome::Signaled(sig),
        // waitpid without WUNTRACED reports only exits and deaths by signal.
        _ => Outcome::Failed(1),
    }
}

/// The outcome of a notify task: a timeout first, then the webhook's answer, then the release's
/// stop signal that cancelled it, then why it was not delivered.
fn delivery_outcome(
    result: Result<u16, String>,
    timed_out: Option<Bound>,
    stopped: Option<Signal>,
) -> Outcome {
    match (result, timed_out, stopped) {
        (_, Some(_), _) => Outcome::TimedOut,
        (Ok(_), _, _) => Outcome::Succeeded,
        (Err(_), _, Some(sig)) => Outcome::Interrupted(sig),
        (Err(why), _, _) => Outcome::NotDelivered(why),
    }
}

/// The signals release-tasks receives, as orders for the running task, and what they add up to for
/// the release.
struct Listener {
    signals: Signals,
    stops: Stops,
    /// A record got no answer after a stop signal: the records after it are not written.
    unanswered: bool,
}

/// The stop signals of the release so far.
#[derive(Debug, Default)]
struct Stops {
    /// How many arrived; after the second nothing more starts.
    count: u32,
    /// The first, which the release reports as its interruption.
    first: Option<Signal>,
}

impl Stops {
    /// Counts a stop signal: the release's first, or a later one.
    fn add(&mut self, sig: Signal) -> SignalCount {
        self.count += 1;
        if self.first.is_none() {
            self.first = Some(sig);
            SignalCount::First
        } else {
            SignalCount::Again
        }
    }
}

impl Listener {
    /// Handles events that queued up while no task was running, without waiting for more.
    async fn take_pending(&mut self) {
        // A signal's handler only writes to tokio's self-pipe; the runtime's driver turns that into
        // an event when it next runs. Yielding lets it run, or a signal that arrived since the last
        // await would be missed here (and a task would start after a stop, or `exec` go on).
        tokio::task::yield_now().await;
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        loop {
            let order = {
                let mut next = std::pin::pin!(self.next());
                match next.as_mut().poll(&mut cx) {
                    std::task::Poll::Ready(order) => order,
                    std::task::Poll::Pending => return,
                }
            };
            match order {
                // Between tasks only orphans exit; collecting them is all there is to do.
                Order::Reap => drop(process::reap()),
                Order::Forward(sig) => {
                    tracing::info!(signal = %sig, "received signal; no task process is running to forward it to");
                }
                Order::Stop(sig, _) => {
                    tracing::warn!(signal = %sig, "received signal; no further task will start");
                }
            }
        }
    }
}

impl Listener {
    /// Waits `delay` between two attempts of a task, handling signals meanwhile; a stop signal ends
    /// the wait at once. Whether the wait ran its course (no stop signal).
    async fn pause(&mut self, delay: Duration) -> bool {
        let until = tokio::time::Instant::now() + delay;
        loop {
            tokio::select! {
                biased;
                order = self.next() => match order {
                    Order::Reap => drop(process::reap()),
                    Order::Forward(sig) => {
                        tracing::info!(signal = %sig, "received signal between two attempts; no task process is running to forward it to");
                    }
                    Order::Stop(sig, _) => {
                        tracing::warn!(signal = %sig, "received signal; no further attempt or task will start");
                        return false;
                    }
                },
                () = tokio::time::sleep_until(until) => return true,
            }
        }
    }
}

/// What follows an attempt of a task.
#[derive(Debug, Clone, PartialEq, Eq)]
enum AfterAttempt {
    /// Its outcome is the task's; with why a failed attempt is not tried again, when that is worth
    /// saying (no time left, a timeout not listed in `retry_on`).
    Done(Option<String>),
    /// Another attempt, after this pause.
    RetryIn(Duration),
}

/// The pure decision after attempt number `attempt` (from 1) ended with `outcome`: whether it is
/// tried again and after how long. `cut_by_attempt` says a timeout came from `attempt_timeout` (not
/// from the task's `timeout` or the release's); `left` is the time left for all attempts; `stops`
/// counts the stop signals received.
fn after_attempt(
    retry: &crate::config::Retry,
    attempt: u32,
    outcome: &Outcome,
    cut_by_attempt: bool,
    left: Duration,
    stops: u32,
) -> AfterAttempt {
    let statuses = &retry.on.statuses;
    let listed = |code: i32| statuses.is_empty() || statuses.contains(&code);
    let retryable = match outcome {
        Outcome::Failed(code) => listed(*code),
        Outcome::Signaled(sig) => listed(128 + *sig as i32),
        Outcome::TimedOut if cut_by_attempt => {
            if !retry.on.timeout {
                return AfterAttempt::Done((attempt <= retry.retries).then(|| {
                    "the attempt ran past attempt_timeout, and retry_on does not list \"timeout\"".to_owned()
                }));
            }
            true
        }
        // A success is done; a timeout of the whole task or the release, a stop signal, a command
        // that cannot start, a lost lock: another attempt would not be different.
        _ => false,
    };
    if !retryable || attempt > retry.retries || stops > 0 {
        return AfterAttempt::Done(None);
    }
    let doubled = retry.delay.saturating_mul(1u32 << (attempt - 1).min(20));
    let delay = doubled.min(crate::config::Retry::MAX_DELAY.max(retry.delay));
    if delay >= left {
        return AfterAttempt::Done(Some(format!(
            "the pause of {} before another attempt would pass the task's timeout (or the release's)",
            humantime::format_duration(delay)
        )));
    }
    AfterAttempt::RetryIn(delay)
}

impl Orders for Listener {
    async fn next(&mut self) -> Order {
        match self.signals.next().await {
            Event::Child => Order::Reap,
            Event::Forward(sig) => Order::Forward(sig),
            Event::Stop(sig) => Order::Stop(sig, self.stops.add(sig)),
        }
    }
}

struct Runner {
    stdio: Stdio,
    listener: Listener,
    guardian: Option<Guardian>,
    /// Marks this run's processes for the guardian.
    run_id: String,
    release: ReleaseDeadline,
    heartbeat: Duration,
    name_width: usize,
    /// How many last lines of each task's output to keep for the report.
    tail_lines: usize,
    /// Values hidden wherever a task's output is shown again (see `tail.rs`).
    secrets: Vec<String>,
}

/// How a task that was started went.
struct Ran {
    outcome: Outcome,
    /// The task's last output lines, ready to show.
    output_tail: Vec<String>,
    /// Whether `release_timeout` (not the task's own timeout) cut it off.
    cut_by_release: bool,
}

impl Runner {
    /// The runner of `plan`'s tasks; the release's deadline starts now.
    fn new(
        plan: &Plan,
        signals: Signals,
        (guardian, run_id): (Option<Guardian>, String),
        secrets: Vec<String>,
        stdio: &Stdio,
    ) -> Runner {
        let defaults = &plan.defaults;
        Runner {
            stdio: stdio.clone(),
            tail_lines: defaults.tail_lines,
            secrets,
            listener: Listener {
                signals,
                stops: Stops::default(),
                unanswered: false,
            },
            guardian,
            run_id,
            release: ReleaseDeadline {
                at: tokio::time::Instant::now() + defaults.release_timeout,
                limit: defaults.release_timeout,
            },
            heartbeat: defaults.heartbeat.max(MIN_HEARTBEAT),
            name_width: plan.to_run().map(|s| s.task.name.len()).max().unwrap_or(0),
        }
    }

    fn policy(&self, task: &Task, own: Limit, release: Option<ReleaseDeadline>) -> Policy {
        Policy {
            own,
            release,
            grace: task.grace,
            heartbeat: self.heartbeat,
        }
    }

    /// Runs a task's attempts: one, or with `retries` as many as [`after_attempt`] allows, all
    /// within the task's `timeout` counted from the first start (and the release's deadline); the
    /// lock is checked and the start recorded before each. The last attempt and how many there were.
    async fn run_attempts(
        &mut self,
        step: &Step,
        release: Option<ReleaseDeadline>,
        (report, started): (&mut Report, Instant),
        (lock, recorder): (&mut HeldLock<'_>, Option<&dyn Recorder>),
        position: u32,
    ) -> anyhow::Result<(Ran, u32)> {
        let task = &step.task;
        if let Some(recorder) = recorder {
            let stops = self.listener.stops.count;
            self.listener
                .record(recorder, TaskRecord::started(&task.name, position, 1))
                .await;
            // A stop signal that came while the record was written keeps the task from starting,
            // as it would have a moment before (clean-up still starts after a first one).
            if self.listener.stops.count > stops
                && (self.listener.stops.count >= 2 || task.on == On::Success)
            {
                let not_run = Ran {
                    outcome: Outcome::NotRun,
                    output_tail: Vec::new(),
                    cut_by_release: false,
                };
                return Ok((not_run, 0));
            }
        }
        let task_until = tokio::time::Instant::now() + task.timeout;
        let all_until = release.map_or(task_until, |r| r.at.min(task_until));
        let mut attempt = 1;
        loop {
            let left = task_until.saturating_duration_since(tokio::time::Instant::now());
            let limited = task.retry.attempt_timeout.filter(|t| *t < left);
            let own = if task.retry.retries == 0 {
                Limit::timeout(task.timeout)
            } else {
                // Each attempt gets what is left of the task's timeout, or its attempt_timeout.
                match limited {
                    Some(attempt) => Limit {
                        after: attempt,
                        bound: Bound::AttemptTimeout,
                        limit: attempt,
                    },
                    None => Limit {
                        after: left.max(Duration::from_millis(1)),
                        bound: Bound::Timeout,
                        limit: task.timeout,
                    },
                }
            };
            let ran = self.run_one(step, own, release, (report, started)).await?;
            let left = all_until.saturating_duration_since(tokio::time::Instant::now());
            let cut_by_attempt = limited.is_some() && !ran.cut_by_release;
            match after_attempt(
                &task.retry,
                attempt,
                &ran.outcome,
                cut_by_attempt,
                left,
                self.listener.stops.count,
            ) {
                AfterAttempt::Done(why) => {
                    if let Some(why) = why {
                        tracing::warn!(task = %task.name, attempt, outcome = ran.outcome.label(), "not trying again: {why}");
                    }
                    return Ok((ran, attempt));
                }
                AfterAttempt::RetryIn(delay) => {
                    tracing::warn!(
                        task = %task.name, attempt, of = task.retry.retries + 1, outcome = ran.outcome.label(),
                        exit_code = ran.outcome.exit_code(), retry_in_ms = delay.as_millis() as u64,
                        "attempt failed; trying again"
                    );
                    if !self.listener.pause(delay).await
                        || !lock.before_start(task, report, &mut self.listener).await
                    {
                        return Ok((ran, attempt));
                    }
                    attempt += 1;
                    if let Some(recorder) = recorder {
                        self.listener
                            .record(recorder, TaskRecord::started(&task.name, position, attempt))
                            .await;
                    }
                }
            }
        }
    }

    /// Runs one task, start to end: the one call a step that runs makes, whatever its kind. A
    /// notify task sends `so_far` (the report until now, and when the release started).
    async fn run_one(
        &mut self,
        step: &Step,
        own: Limit,
        release: Option<ReleaseDeadline>,
        (so_far, started): (&Report, Instant),
    ) -> anyhow::Result<Ran> {
        let task = &step.task;
        Ok(match &step.webhook {
            Some(webhook) => {
                let mut so_far = so_far.clone();
                so_far.duration = started.elapsed();
                so_far.interrupted = self.listener.stops.first;
                self.run_notify(task, webhook, &so_far, own, release).await
            }
            None => self.run_task(task, own, release).await?,
        })
    }

    /// Runs a command task: started here, then owned by its [`TaskRun`] to its end, within `own`.
    async fn run_task(
        &mut self,
        task: &Task,
        own: Limit,
        release: Option<ReleaseDeadline>,
    ) -> anyhow::Result<Ran> {
        let command = crate::redact::command(&task.command.to_string());
        // Whole seconds as an integer (`timeout_s=1800`), less as a fraction (`0.3`), never `0`.
        if own.after.subsec_millis() == 0 && !own.after.is_zero() {
            tracing::info!(task = %task.name, command = %command, timeout_s = own.after.as_secs(), "task started");
        } else {
            tracing::info!(task = %task.name, command = %command, timeout_s = seconds(own.after), "task started");
        }
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
        let prefix = format!("{:<w$} | ", task.name, w = self.name_width).into_bytes();
        let mut secrets = self.secrets.clone();
        secrets.extend(crate::tail::secrets(task.env.iter()));
        let policy = self.policy(task, own, release);
        let run = TaskRun::command(
            &self.stdio,
            &task.name,
            policy,
            spawned,
            self.guardian.as_ref(),
            &prefix,
            (self.tail_lines, secrets),
        )?;
        let ended = run.run(&mut self.listener).await;
        Ok(Ran {
            outcome: command_outcome(ended.end.status, ended.timed_out, ended.stopped),
            output_tail: ended.end.output_tail,
            cut_by_release: ended.timed_out == Some(Bound::ReleaseTimeout),
        })
    }

    /// Runs a notify task: the report so far, sent from its [`TaskRun`]'s delivery thread while
    /// signals and the deadline are still handled, either of which cancels the delivery.
    async fn run_notify(
        &mut self,
        task: &Task,
        webhook: &Webhook,
        report: &Report,
        own: Limit,
        release: Option<ReleaseDeadline>,
    ) -> Ran {
        tracing::info!(
            task = %task.name, url = %webhook.shown_url(), format = %webhook.format,
            retries = webhook.retries, "task started"
        );
        let policy = self.policy(task, own, release);
        let run = match TaskRun::delivery(&task.name, policy, webhook, webhook.body(report)) {
            Ok(run) => run,
            Err(err) => {
                return Ran {
                    outcome: Outcome::NotDelivered(format!(
                        "cannot start the sending thread: {err}"
                    )),
                    output_tail: Vec::new(),
                    cut_by_release: false,
                };
            }
        };
        let ended = run.run(&mut self.listener).await;
        if let Ok(status) = &ended.end {
            if ended.timed_out.is_none() {
                tracing::info!(task = %task.name, status, "the webhook took the report");
            }
        }
        Ran {
            outcome: delivery_outcome(ended.end, ended.timed_out, ended.stopped),
            output_tail: Vec::new(),
            cut_by_release: ended.timed_out == Some(Bound::ReleaseTimeout),
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

/// A time limit in seconds, to the millisecond, for a log field: never `0` for a limit that is not.
fn seconds(d: Duration) -> f64 {
    let ms = u32::try_from(d.as_millis().max(u128::from(!d.is_zero()))).unwrap_or(u32::MAX);
    f64::from(ms) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::unistd::Pid;

    const PID: Pid = Pid::from_raw(7);

    fn retry(retries: u32, statuses: &[i32], timeout: bool) -> crate::config::Retry {
        crate::config::Retry {
            retries,
            delay: Duration::from_secs(5),
            on: crate::config::RetryOn {
                statuses: statuses.to_vec(),
                timeout,
            },
            attempt_timeout: None,
        }
    }

    const PLENTY: Duration = Duration::from_secs(3600);

    #[test]
    fn failed_attempts_are_retried_with_a_doubling_capped_pause() {
        let r = retry(10, &[], false);
        let failed = Outcome::Failed(1);
        let pauses: Vec<_> = (1..=6)
            .map(|n| after_attempt(&r, n, &failed, false, PLENTY, 0))
            .collect();
        let s = Duration::from_secs;
        assert_eq!(
            pauses,
            [5, 10, 20, 40, 60, 60].map(|n| AfterAttempt::RetryIn(s(n)))
        );
        // A retry_delay above the cap is used as it is.
        let long = crate::config::Retry {
            delay: s(90),
            ..r.clone()
        };
        assert_eq!(
            after_attempt(&long, 3, &failed, false, PLENTY, 0),
            AfterAttempt::RetryIn(s(90))
        );
        // The last attempt is the task's outcome.
        assert_eq!(
            after_attempt(&r, 11, &failed, false, PLENTY, 0),
            AfterAttempt::Done(None)
        );
        assert_eq!(
            after_attempt(&retry(2, &[], false), 3, &failed, false, PLENTY, 0),
            AfterAttempt::Done(None)
        );
    }

    #[test]
    fn what_is_retried() {
        let any = retry(2, &[], false);
        let listed = retry(2, &[75, 137], false);
        let r = |r: &crate::config::Retry, o: Outcome, by_attempt: bool| {
            matches!(
                after_attempt(r, 1, &o, by_attempt, PLENTY, 0),
                AfterAttempt::RetryIn(_)
            )
        };
        assert!(r(&any, Outcome::Failed(1), false));
        assert!(r(&any, Outcome::Signaled(Signal::SIGKILL), false));
        assert!(!r(&any, Outcome::Succeeded, false));
        assert!(r(&listed, Outcome::Failed(75), false));
        assert!(!r(&listed, Outcome::Failed(1), false));
        assert!(
            r(&listed, Outcome::Signaled(Signal::SIGKILL), false),
            "128 + 9"
        );
        // Never: a stop signal, a command that cannot start, the whole task's timeout.
        assert!(!r(&any, Outcome::Interrupted(Signal::SIGTERM), false));
        assert!(!r(
            &any,
            Outcome::CouldNotStart {
                code: 127,
                reason: String::new()
            },
            false
        ));
        assert!(!r(&any, Outcome::TimedOut, false));
        // An attempt cut off by attempt_timeout only with "timeout" in retry_on, and then it says why not.
        assert!(!r(&any, Outcome::TimedOut, true));
        assert!(matches!(
            after_attempt(&any, 1, &Outcome::TimedOut, true, PLENTY, 0),
            AfterAttempt::Done(Some(why)) if why.contains("retry_on")
        ));
        assert!(r(&retry(2, &[], true), Outcome::TimedOut, true));
        assert!(r(&retry(2, &[3], true), Outcome::TimedOut, true));
        assert!(!r(&retry(2, &[3], true), Outcome::Failed(1), true));
    }

    #[test]
    fn no_retry_after_a_stop_signal_or_past_the_timeout() {
        let r = retry(3, &[], false);
        assert_eq!(
            after_attempt(&r, 1, &Outcome::Failed(1), false, PLENTY, 1),
            AfterAttempt::Done(None)
        );
        assert!(matches!(
            after_attempt(&r, 1, &Outcome::Failed(1), false, Duration::from_secs(5), 0),
            AfterAttempt::Done(Some(why)) if why.contains("timeout")
        ));
        assert_eq!(
            after_attempt(&r, 1, &Outcome::Failed(1), false, Duration::from_secs(6), 0),
            AfterAttempt::RetryIn(Duration::from_secs(5))
        );
    }

    #[test]
    fn the_first_stop_signal_is_the_releases_and_the_rest_come_again() {
        let mut stops = Stops::default();
        assert_eq!(stops.add(Signal::SIGHUP), SignalCount::First);
        assert_eq!(stops.add(Signal::SIGTERM), SignalCount::Again);
        assert_eq!(stops.add(Signal::SIGINT), SignalCount::Again);
        assert_eq!((stops.count, stops.first), (3, Some(Signal::SIGHUP)));
        // What the count means for the next task: after the second, nothing starts.
        let mut stops = Stops::default();
        stops.add(Signal::SIGTERM);
        assert_ne!(
            next(On::Always, true, false, stops.count),
            Next::NotRun(Outcome::NotRun)
        );
        stops.add(Signal::SIGTERM);
        assert_eq!(
            next(On::Always, true, false, stops.count),
            Next::NotRun(Outcome::NotRun)
        );
    }

    #[test]
    fn tasks_run_on_success_until_something_fails() {
        let within = Next::Run {
            within_release: true,
        };
        assert_eq!(next(On::Success, false, false, 0), within);
        assert_eq!(next(On::Always, false, false, 0), within);
        assert_eq!(
            next(On::Success, true, false, 0),
            Next::NotRun(Outcome::NotRun)
        );
        assert_eq!(
            next(On::Failure, false, false, 0),
            Next::NotRun(Outcome::Skipped(SkipReason::OnFailure))
        );
    }

    #[test]
    fn after_a_failure_cleanup_tasks_run_on_their_own_timeout() {
        let own = Next::Run {
            within_release: false,
        };
        assert_eq!(next(On::Failure, true, false, 0), own);
        assert_eq!(next(On::Always, true, false, 0), own);
        // A first stop signal fails the release: clean-up still runs.
        assert_eq!(next(On::Failure, true, false, 1), own);
        assert_eq!(next(On::Always, true, true, 1), own);
    }

    #[test]
    fn an_expired_release_timeout_fails_the_next_success_task() {
        assert_eq!(
            next(On::Success, false, true, 0),
            Next::NotRun(Outcome::TimedOut)
        );
        assert_eq!(
            next(On::Always, false, true, 0),
            Next::Run {
                within_release: false
            }
        );
        assert_eq!(
            next(On::Failure, false, true, 0),
            Next::NotRun(Outcome::Skipped(SkipReason::OnFailure))
        );
    }

    #[test]
    fn after_a_second_stop_signal_nothing_starts() {
        for on in [On::Success, On::Failure, On::Always] {
            for (failed, expired) in [(false, false), (true, false), (true, true)] {
                assert_eq!(
                    next(on, failed, expired, 2),
                    Next::NotRun(Outcome::NotRun),
                    "{on} {failed} {expired}"
                );
                assert_eq!(next(on, failed, expired, 3), Next::NotRun(Outcome::NotRun));
            }
        }
    }

    #[test]
    fn a_commands_outcome() {
        let exited = |code| WaitStatus::Exited(PID, code);
        let killed = |sig| WaitStatus::Signaled(PID, sig, false);
        let term = Some(Signal::SIGTERM);
        let timeout = Some(Bound::Timeout);
        assert_eq!(command_outcome(exited(0), None, None), Outcome::Succeeded);
        assert_eq!(command_outcome(exited(3), None, None), Outcome::Failed(3));
        assert_eq!(
            command_outcome(killed(Signal::SIGSEGV), None, None),
            Outcome::Signaled(Signal::SIGSEGV)
        );
        // A timeout wins over whatever the process did after its SIGTERM.
        assert_eq!(command_outcome(exited(0), timeout, None), Outcome::TimedOut);
        assert_eq!(
            command_outcome(killed(Signal::SIGKILL), Some(Bound::ReleaseTimeout), term),
            Outcome::TimedOut
        );
        // A task that exits 0 on the stop signal succeeded; otherwise it was interrupted.
        assert_eq!(command_outcome(exited(0), None, term), Outcome::Succeeded);
        assert_eq!(
            command_outcome(exited(143), None, term),
            Outcome::Interrupted(Signal::SIGTERM)
        );
        assert_eq!(
            command_outcome(killed(Signal::SIGKILL), None, Some(Signal::SIGINT)),
            Outcome::Interrupted(Signal::SIGINT)
        );
        assert_eq!(
            command_outcome(WaitStatus::StillAlive, None, None),
            Outcome::Failed(1)
        );
    }

    #[test]
    fn a_deliverys_outcome() {
        let no = || Err::<u16, _>("HTTP 500".to_owned());
        assert_eq!(delivery_outcome(Ok(200), None, None), Outcome::Succeeded);
        assert_eq!(
            delivery_outcome(Ok(200), Some(Bound::Timeout), None),
            Outcome::TimedOut
        );
        assert_eq!(
            delivery_outcome(Ok(204), None, Some(Signal::SIGTERM)),
            Outcome::Succeeded
        );
        assert_eq!(
            delivery_outcome(no(), None, Some(Signal::SIGHUP)),
            Outcome::Interrupted(Signal::SIGHUP)
        );
        assert_eq!(
            delivery_outcome(no(), None, None),
            Outcome::NotDelivered("HTTP 500".into())
        );
        assert_eq!(
            delivery_outcome(no(), Some(Bound::ReleaseTimeout), None),
            Outcome::TimedOut
        );
    }

    /// The task `migrate` that runs `argv` directly, with `PATH` in its own environment.
    fn exec_task(argv: &str, path: &str) -> Task {
        let src = format!("[tasks.migrate]\nrun = {argv}\n");
        let mut config = crate::config::parse(std::path::Path::new("release.toml"), &src)
            .expect("valid test config");
        let mut task = config.tasks.remove(0);
        task.env.insert("PATH".to_owned(), path.to_owned());
        task
    }

    fn cannot_start(code: i32, reason: &str) -> Outcome {
        Outcome::CouldNotStart {
            code,
            reason: reason.to_owned(),
        }
    }

    #[test]
    fn a_command_that_cannot_start_says_why_with_127_or_126() {
        let task = exec_task(r#"["db-migrate", "--all"]"#, "/nonexistent-release-tasks");
        let os = std::io::Error::from_raw_os_error;
        assert_eq!(
            could_not_start(&task, &os(nix::libc::ENOENT)),
            cannot_start(
                127,
                "command not found: `db-migrate`; is it installed and on PATH?"
            )
        );
        assert_eq!(
            could_not_start(&task, &os(nix::libc::EACCES)),
            cannot_start(
                126,
                "permission denied running `db-migrate`; is it executable (chmod +x)?"
            )
        );
        // Any other error of the exec: the OS's words, about the program.
        assert_eq!(
            could_not_start(&task, &os(nix::libc::ENAMETOOLONG)),
            cannot_start(
                126,
                "cannot run `db-migrate`: File name too long (os error 36)"
            )
        );
        // A set-up step's own words (spawn.rs) are not about the program.
        let removed = std::io::Error::other(
            "cannot enter its working directory /app/build (was it removed or renamed by an \
             earlier task?): No such file or directory (os error 2)",
        );
        assert_eq!(
            could_not_start(&task, &removed),
            cannot_start(
                126,
                "cannot start the task: cannot enter its working directory /app/build (was it \
                 removed or renamed by an earlier task?): No such file or directory (os error 2)"
            )
        );
    }

    #[test]
    fn a_directory_found_on_the_tasks_path_is_named_as_one() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join("db-migrate")).expect("mkdir");
        let path = format!("/nonexistent-release-tasks:{}", dir.path().display());
        let task = exec_task(r#"["db-migrate"]"#, &path);
        assert_eq!(
            could_not_start(&task, &std::io::Error::from_raw_os_error(nix::libc::EACCES)),
            cannot_start(
                126,
                &format!(
                    "`db-migrate` is a directory ({}), not a program; give the path of the \
                     program to run",
                    dir.path().join("db-migrate").display()
                )
            )
        );
    }

    #[test]
    fn the_attempt_numbered_retries_is_still_followed_by_one_more() {
        // retries = 2: attempts 1 and 2 fail and are tried again, the third is the last.
        let r = retry(2, &[], false);
        let after = |attempt| after_attempt(&r, attempt, &Outcome::Failed(1), false, PLENTY, 0);
        assert_eq!(after(2), AfterAttempt::RetryIn(Duration::from_secs(10)));
        assert_eq!(after(3), AfterAttempt::Done(None));
    }

    #[test]
    fn a_timeout_of_the_whole_task_is_never_retried_nor_explained_as_attempt_timeout() {
        for on_timeout in [false, true] {
            assert_eq!(
                after_attempt(
                    &retry(2, &[], on_timeout),
                    1,
                    &Outcome::TimedOut,
                    false,
                    PLENTY,
                    0
                ),
                AfterAttempt::Done(None),
                "retry_on timeout: {on_timeout}"
            );
        }
    }
}
