//! Executes a [`Plan`]: one task at a time, each under a select loop over its exit, its deadline, the
//! release's deadline, a heartbeat and the signals release-tasks receives.
//!
//! Processes are handled through `process.rs`, output through `output.rs`; this module decides *when*:
//! SIGTERM at the deadline, SIGKILL a grace period later, forwarding of signals, clean-up of what a task
//! leaves behind, and that nothing starts after a failure.

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use tokio::time::sleep_until;

use crate::config::{Defaults, On, Task};
use crate::gate::Env;
use crate::guardian::Guardian;
use crate::metadata::Metadata;
use crate::notify::Webhook;
use crate::output::{Pump, Target};
use crate::plan::{Plan, Step};
use crate::process::{self, TaskProcesses};
use crate::report::{EXIT_CANNOT_RUN, EXIT_NOT_FOUND, Outcome, Report, SkipReason, TaskReport};
use crate::signals::{Event, STOPPING, Signals};

/// How often the clean-up after a task checks whether its leftovers are gone.
const CLEANUP_POLL: Duration = Duration::from_millis(20);
/// How long `SIGKILLed` processes get to vanish and their output to drain before release-tasks moves on.
const AFTER_KILL: Duration = Duration::from_secs(1);

/// Runs the plan and reports what happened. `Err` only for release-tasks's own failures.
///
/// The async runtime and the signal handlers are set up only when some task is to run, so a release
/// with every gate off costs no more than reading the config (it replaces a shell script that costs
/// about a millisecond).
pub fn run_release(plan: &Plan, env: &Env) -> crate::error::Result<Report> {
    let meta = plan.meta.clone();
    if plan.to_run().next().is_none() {
        let mut report = Report::new(meta);
        report.tasks = plan
            .steps
            .iter()
            .map(|step| skipped(step, step.skip_reason()))
            .collect();
        return Ok(report);
    }
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
            return run_locked(plan, lock, env, meta, signals).await;
        }
        #[cfg(not(feature = "postgres"))]
        let _ = env; // only [lock] reads it
        Ok(run(plan, &plan.defaults, meta, signals).await?)
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
            let mut report = Report::new(meta);
            report.tasks = plan
                .steps
                .iter()
                .map(|step| skipped(step, SkipReason::Other(reason.clone())))
                .collect();
            held.release().await;
            return Ok(report);
        }
        held.begin(&release).await?;
    }
    let report = run(plan, &plan.defaults, meta, signals).await;
    if let (true, Ok(report)) = (lock.once, &report) {
        held.finish(&release, report).await;
    }
    held.release().await;
    Ok(report?)
}

/// The report line of a step that is not run, and why (its gate, the selection, the ledger).
fn skipped(step: &Step, reason: SkipReason) -> TaskReport {
    tracing::info!(task = %step.task.name, reason = %reason, "task skipped");
    TaskReport {
        name: step.task.name.clone(),
        outcome: Outcome::Skipped(reason),
        duration: Duration::ZERO,
        allow_failure: step.task.allow_failure,
    }
}

async fn run(
    plan: &Plan,
    defaults: &Defaults,
    meta: Metadata,
    signals: Signals,
) -> anyhow::Result<Report> {
    let started = Instant::now();
    let mut runner = Runner {
        signals,
        guardian: None,
        exited: HashMap::new(),
        interrupted: None,
        stopping_signals: 0,
        run_id: crate::guardian::new_run_id(),
        release_deadline: started + defaults.release_timeout,
        release_timeout: defaults.release_timeout,
        heartbeat: defaults.heartbeat,
        name_width: plan.to_run().map(|s| s.task.name.len()).max().unwrap_or(0),
    };
    let mut report = Report::new(meta);
    for step in &plan.steps {
        runner.take_pending_events();
        let task = &step.task;
        let release_failed = report.failed_task().is_some() || runner.interrupted.is_some();
        if !step.run {
            report.tasks.push(skipped(step, step.skip_reason()));
            continue;
        }
        let t0 = Instant::now();
        let outcome = if runner.stopping_signals >= 2 {
            Outcome::NotRun
        } else if !task.on.runs(release_failed) {
            if task.on == On::Failure {
                let reason = SkipReason::OnFailure;
                tracing::info!(task = %task.name, reason = %reason, "task skipped");
                Outcome::Skipped(reason)
            } else {
                Outcome::NotRun
            }
        } else if !release_failed && Instant::now() >= runner.release_deadline {
            tracing::error!(task = %task.name, "release_timeout reached before the task could start");
            Outcome::TimedOut
        } else {
            // After a failure, on = "failure"/"always" tasks get their own timeout, not what is left
            // of the release's: they are how the failure gets cleaned up and told.
            let release_deadline = (!release_failed).then_some(runner.release_deadline);
            match &step.webhook {
                Some(webhook) => {
                    let mut so_far = report.clone();
                    so_far.duration = started.elapsed();
                    so_far.interrupted = runner.interrupted;
                    runner
                        .run_notify(task, webhook, &so_far, release_deadline)
                        .await
                }
                None => runner.run_task(task, release_deadline).await?,
            }
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
            allow_failure: task.allow_failure,
        });
    }
    report.interrupted = runner.interrupted;
    report.duration = started.elapsed();
    Ok(report)
}

struct Runner {
    signals: Signals,
    guardian: Option<Guardian>,
    /// Exit statuses reaped but not yet claimed.
    exited: HashMap<Pid, WaitStatus>,
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
}

/// What the run loop has done to a task's processes so far.
#[derive(Default)]
struct Stopping {
    /// When SIGKILL follows the SIGTERM (or forwarded signal) already sent.
    kill_at: Option<Instant>,
    killed: bool,
}

impl Runner {
    async fn run_task(
        &mut self,
        task: &Task,
        release_deadline: Option<Instant>,
    ) -> anyhow::Result<Outcome> {
        let command = crate::redact::urls_in(&task.command.to_string());
        tracing::info!(task = %task.name, command = %command, timeout_s = task.timeout.as_secs(), "task started");
        if self.guardian.is_none() {
            match Guardian::start(&self.run_id) {
                Ok(g) => self.guardian = Some(g),
                Err(err) => {
                    tracing::warn!(error = %err, "cannot start the guardian process; if release-tasks is killed, a task's children may outlive it");
                }
            }
        }
        let spawned = match process::spawn(task, &self.run_id) {
            Ok(spawned) => spawned,
            Err(err) => {
                let outcome = could_not_start(task, &err);
                Self::log_finished(task, &outcome, Duration::ZERO);
                return Ok(outcome);
            }
        };
        let started = Instant::now();
        let pid = spawned.pid;
        let exempt = self.guardian.iter().map(Guardian::pid).collect();
        let mut procs = TaskProcesses::new(pid, exempt);
        if let Some(g) = &self.guardian {
            g.tell(pid, true);
        }
        let prefix = format!("{:<w$} | ", task.name, w = self.name_width).into_bytes();
        let mut pumps = [
            Pump::start(spawned.stdout, Target::Stdout, prefix.clone())?,
            Pump::start(spawned.stderr, Target::Stderr, prefix)?,
        ];

        let task_deadline = started + task.timeout;
        let deadline = release_deadline.map_or(task_deadline, |r| task_deadline.min(r));
        let far = started + Duration::from_secs(100 * 365 * 24 * 3600);
        let mut stop = Stopping::default();
        let mut timed_out = false;
        let interrupted_before = self.interrupted;
        let mut next_beat = started + self.heartbeat;
        let status = loop {
            if let Some(status) = self.exited.remove(&pid) {
                break status;
            }
            tokio::select! {
                biased;
                event = self.signals.next() => self.on_event(event, Some(&procs), &mut stop, task.grace),
                () = sleep_until(deadline.into()), if !timed_out && stop.kill_at.is_none() => {
                    timed_out = true;
                    let (bound, limit) = if deadline < task_deadline {
                        ("release_timeout", self.release_timeout)
                    } else {
                        ("timeout", task.timeout)
                    };
                    tracing::error!(
                        task = %task.name, bound, limit = %humantime::format_duration(limit),
                        grace_s = task.grace.as_secs_f64(),
                        "task timed out; sending SIGTERM to its process group, SIGKILL after the grace period"
                    );
                    procs.signal(Signal::SIGTERM);
                    stop.kill_at = Some(Instant::now() + task.grace);
                }
                () = sleep_until(stop.kill_at.unwrap_or(far).into()), if stop.kill_at.is_some() && !stop.killed => {
                    tracing::warn!(task = %task.name, "grace period over; sending SIGKILL to the task's process group");
                    procs.signal(Signal::SIGKILL);
                    stop.killed = true;
                }
                () = sleep_until(next_beat.into()) => {
                    let elapsed = started.elapsed();
                    tracing::info!(
                        task = %task.name,
                        elapsed = %humantime::format_duration(Duration::from_secs(elapsed.as_secs())),
                        timeout_in = %humantime::format_duration(Duration::from_secs(deadline.saturating_duration_since(Instant::now()).as_secs())),
                        "task still running"
                    );
                    next_beat += self.heartbeat;
                }
            }
        };
        self.clean_up(task, &mut procs, &mut pumps, &mut stop).await;
        if let Some(g) = &self.guardian {
            g.tell(pid, false);
        }
        self.exited.clear();

        let outcome = match (status, timed_out, self.interrupted) {
            (_, true, _) => Outcome::TimedOut,
            (WaitStatus::Exited(_, 0), _, _) => Outcome::Succeeded,
            (_, _, Some(sig)) if interrupted_before.is_none() => Outcome::Interrupted(sig),
            (WaitStatus::Exited(_, code), _, _) => Outcome::Failed(code),
            (WaitStatus::Signaled(_, sig, _), _, _) => Outcome::Signaled(sig),
            // waitpid without WUNTRACED reports only exits and deaths by signal.
            _ => Outcome::Failed(1),
        };
        Self::log_finished(task, &outcome, started.elapsed());
        Ok(outcome)
    }

    /// After the task's main process exited: terminate what it left (TERM, grace, KILL), wait for its
    /// output to end, and never wait past the grace period for a pipe some stray process holds open.
    async fn clean_up(
        &mut self,
        task: &Task,
        procs: &mut TaskProcesses,
        pumps: &mut [Pump; 2],
        stop: &mut Stopping,
    ) {
        self.reap();
        // Scanning for escaped processes reads /proc, so it is done once here and then only while
        // something is still alive: once nothing of the task's is left, nothing can come back.
        let mut alive = procs.alive();
        if alive && !stop.killed {
            if stop.kill_at.is_none() {
                tracing::warn!(
                    task = %task.name, grace_s = task.grace.as_secs_f64(),
                    "the task exited but left processes running; sending them SIGTERM, SIGKILL after the grace period"
                );
                stop.kill_at = Some(Instant::now() + task.grace);
            }
            procs.signal(Signal::SIGTERM);
        }
        let grace_end = stop.kill_at.unwrap_or_else(|| Instant::now() + task.grace);
        let mut killed_at = stop.killed.then(Instant::now);
        loop {
            let drained = pumps.iter_mut().all(Pump::is_finished);
            if !alive && drained {
                break;
            }
            let now = Instant::now();
            if killed_at.is_none() && now >= grace_end {
                if alive {
                    tracing::warn!(task = %task.name, "grace period over; sending SIGKILL to what the task left running");
                    procs.signal(Signal::SIGKILL);
                }
                killed_at = Some(now);
            }
            if killed_at.is_some_and(|t| now >= t + AFTER_KILL) {
                break;
            }
            // While something is alive, poll for it to go; otherwise only a deadline can end the wait.
            let wake = if alive {
                now + CLEANUP_POLL
            } else {
                killed_at.map_or(grace_end, |t| t + AFTER_KILL)
            };
            let [out, err] = &mut *pumps;
            tokio::select! {
                biased;
                event = self.signals.next() => {
                    self.on_event(event, Some(procs), stop, task.grace);
                    if stop.killed && killed_at.is_none() {
                        killed_at = Some(Instant::now());
                    }
                }
                () = async { out.finished().await; err.finished().await; }, if !drained => {}
                () = sleep_until(wake.into()) => {}
            }
            if alive {
                self.reap();
                alive = procs.alive();
            }
        }
        if !pumps.iter_mut().all(Pump::is_finished) {
            tracing::warn!(
                task = %task.name,
                "a process outside the task's process group still holds its output open; not waiting for it"
            );
            for pump in pumps.iter_mut() {
                pump.stop();
                // A pump blocked writing to a stalled stdout cannot stop; it is left behind.
                let _ = tokio::time::timeout(AFTER_KILL, pump.finished()).await;
            }
        }
        if alive {
            tracing::error!(task = %task.name, "some of the task's processes survived SIGKILL (stuck in the kernel?)");
        }
        procs.finish(alive);
    }

    /// Acts on one event: reaps on SIGCHLD, forwards signals to the running task, and records a
    /// stopping signal (a second SIGINT or SIGTERM kills the task at once).
    fn on_event(
        &mut self,
        event: Event,
        procs: Option<&TaskProcesses>,
        stop: &mut Stopping,
        grace: Duration,
    ) {
        let sig = match event {
            Event::Child => return self.reap(),
            Event::Signal(sig) => sig,
        };
        if !STOPPING.contains(&sig) {
            tracing::info!(signal = %sig, "forwarding signal to the running task");
            if let Some(procs) = procs {
                procs.signal(sig);
            }
            return;
        }
        self.stopping_signals += 1;
        let again = self.stopping_signals >= 2 && matches!(sig, Signal::SIGINT | Signal::SIGTERM);
        if self.interrupted.is_none() {
            self.interrupted = Some(sig);
        }
        let Some(procs) = procs else {
            tracing::warn!(signal = %sig, "received signal; no further task will start");
            return;
        };
        if again {
            if !stop.killed {
                tracing::warn!(signal = %sig, "received a second stopping signal; sending SIGKILL to the task's process group");
                procs.signal(Signal::SIGKILL);
                stop.killed = true;
            }
        } else {
            tracing::warn!(
                signal = %sig, grace_s = grace.as_secs_f64(),
                "received signal; forwarding it to the task's process group, SIGKILL after the grace period; no further task will start"
            );
            procs.signal(sig);
            let kill_at = Instant::now() + grace;
            stop.kill_at = Some(stop.kill_at.map_or(kill_at, |t| t.min(kill_at)));
        }
    }

    /// Runs a notify task: the report so far, sent from a helper thread (the HTTP client blocks)
    /// while the run loop keeps handling signals and the deadline.
    async fn run_notify(
        &mut self,
        task: &Task,
        webhook: &Webhook,
        report: &Report,
        release_deadline: Option<Instant>,
    ) -> Outcome {
        tracing::info!(
            task = %task.name, url = %webhook.shown_url(), format = %webhook.format,
            retries = webhook.retries, "task started"
        );
        let started = Instant::now();
        let body = webhook.body(report);
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let (hook, name) = (webhook.clone(), task.name.clone());
        let sender = std::thread::Builder::new()
            .name("notify".into())
            .spawn(move || {
                let _ = tx.send(hook.deliver(&name, &body));
            });
        let outcome = if let Err(err) = sender {
            Outcome::NotDelivered(format!("cannot start the sending thread: {err}"))
        } else {
            let task_deadline = started + task.timeout;
            let deadline = release_deadline.map_or(task_deadline, |r| task_deadline.min(r));
            let mut stop = Stopping::default();
            loop {
                tokio::select! {
                    biased;
                    event = self.signals.next() => {
                        self.on_event(event, None, &mut stop, task.grace);
                        if let (Some(sig), true) = (self.interrupted, self.stopping_signals >= 2) {
                            break Outcome::Interrupted(sig);
                        }
                    }
                    result = &mut rx => break match result {
                        Ok(Ok(status)) => {
                            tracing::info!(task = %task.name, status, "the webhook took the report");
                            Outcome::Succeeded
                        }
                        Ok(Err(why)) => Outcome::NotDelivered(why),
                        Err(_) => Outcome::NotDelivered("the sending thread stopped".into()),
                    },
                    () = sleep_until(deadline.into()) => break Outcome::TimedOut,
                }
            }
        };
        Self::log_finished(task, &outcome, started.elapsed());
        outcome
    }

    /// Handles events that queued up while no task was running, without waiting for more.
    fn take_pending_events(&mut self) {
        let mut stop = Stopping::default();
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        loop {
            let event = {
                let mut next = std::pin::pin!(self.signals.next());
                match next.as_mut().poll(&mut cx) {
                    std::task::Poll::Ready(event) => event,
                    std::task::Poll::Pending => return,
                }
            };
            self.on_event(event, None, &mut stop, Duration::ZERO);
        }
    }

    fn reap(&mut self) {
        self.exited.extend(process::reap());
    }

    fn log_finished(task: &Task, outcome: &Outcome, duration: Duration) {
        let duration_ms = duration.as_millis() as u64;
        let exit_code = outcome.exit_code();
        if outcome.is_failure() {
            tracing::error!(task = %task.name, outcome = outcome.label(), exit_code, duration_ms, allow_failure = task.allow_failure, detail = %outcome, "task finished");
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
            match task.program_directory(std::env::var_os("PATH").as_deref()) {
                Some(dir) => format!(
                    "`{program}` is a directory ({}), not a program; give the path of the program to run",
                    dir.display()
                ),
                None => {
                    format!("permission denied running `{program}`; is it executable (chmod +x)?")
                }
            },
        ),
        _ => (EXIT_CANNOT_RUN, format!("cannot run `{program}`: {err}")),
    };
    Outcome::CouldNotStart { code, reason }
}
