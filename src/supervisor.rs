//! The supervisor of one running task, in the shape of cargo-nextest's `terminate_child`: the single
//! owner of everything the task has running, and of how it is being ended.
//!
//! For a command task it owns the main process's pid and its process group with whatever escaped it
//! ([`TaskProcesses`], which SIGKILLs them all if dropped), both output pumps, and the reaped exit
//! status. For a notify task it owns the delivery thread and its [`Cancel`]. For both it owns the
//! termination state machine: [`begin`](Supervisor::begin) sends the stop signal and SIGCONT (a
//! stopped process cannot run its trap) and sets when SIGKILL is due; [`kill`](Supervisor::kill)
//! sends SIGKILL; then it is done. A notify task's "signal" is the cancellation of its delivery.
//!
//! It decides nothing: `run.rs` says which deadline applies, what a signal means and which outcome
//! follows, and tells the supervisor what to do. Reaping does not depend on SIGCHLD alone: while the
//! main process runs, [`ended`](Supervisor::ended) also polls `waitpid` on a bounded period, so a
//! lost or blocked SIGCHLD delays the end of a task by at most [`MAX_REAP_POLL`], never forever.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use tokio::sync::oneshot;
use tokio::time::sleep_until;

use crate::notify::{Cancel, Webhook};
use crate::output::{Pump, Target};
use crate::process::{self, TaskProcesses};
use crate::tail::Tail;

/// How often the clean-up after a task checks whether its leftovers are gone.
const CLEANUP_POLL: Duration = Duration::from_millis(20);
/// How long `SIGKILLed` processes get to vanish and their output to drain before release-tasks moves on.
const AFTER_KILL: Duration = Duration::from_secs(1);
/// The first wait between two `waitpid` polls while a task's main process runs; it doubles up to
/// [`MAX_REAP_POLL`].
const FIRST_REAP_POLL: Duration = Duration::from_millis(50);
/// The longest wait between two `waitpid` polls: how late a task's end is seen if SIGCHLD is lost.
pub const MAX_REAP_POLL: Duration = Duration::from_millis(500);

/// Where a task is in being ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Termination {
    Running,
    /// Asked to stop; SIGKILL (or, for a delivery, giving up on its thread) is due at `kill_at`.
    Terminating {
        kill_at: Instant,
    },
    /// SIGKILL was sent at `at`.
    Killed {
        at: Instant,
    },
}

/// What the supervisor runs.
enum Child {
    Command(Command),
    Notify(Notify),
}

struct Command {
    pid: Pid,
    procs: TaskProcesses,
    pumps: [Pump; 2],
    status: Option<WaitStatus>,
    /// The next wait between `waitpid` polls.
    reap_poll: Duration,
    /// Whether something of the task's was alive when last looked (after the main process exited).
    alive: bool,
    /// When the clean-up stops waiting for leftovers with SIGKILL (the end of the grace).
    grace_end: Option<Instant>,
}

struct Notify {
    cancel: Arc<Cancel>,
    done: oneshot::Receiver<Result<u16, String>>,
    thread: Option<JoinHandle<()>>,
    result: Option<Result<u16, String>>,
}

/// How a supervised task ended, for `run.rs` to turn into an outcome.
pub enum Ended {
    Command(WaitStatus),
    Notify(Result<u16, String>),
}

/// The one owner of a running task.
pub struct Supervisor {
    task: String,
    grace: Duration,
    state: Termination,
    child: Child,
}

impl Supervisor {
    /// Starts a command task from what `process::spawn` returned, with its output pumped to
    /// release-tasks's own stdout and stderr under `prefix`.
    pub fn command(
        task: &str,
        grace: Duration,
        spawned: process::Spawned,
        exempt: Vec<Pid>,
        prefix: &[u8],
        tail: &Arc<Mutex<Tail>>,
    ) -> std::io::Result<Supervisor> {
        let pid = spawned.pid;
        // Owned before the pumps start, so a failure to start them still kills the group on drop.
        let procs = TaskProcesses::new(pid, exempt);
        let pumps = [
            Pump::start(
                spawned.stdout,
                Target::Stdout,
                prefix.to_vec(),
                Some(tail.clone()),
            )?,
            Pump::start(
                spawned.stderr,
                Target::Stderr,
                prefix.to_vec(),
                Some(tail.clone()),
            )?,
        ];
        Ok(Supervisor {
            task: task.to_owned(),
            grace,
            state: Termination::Running,
            child: Child::Command(Command {
                pid,
                procs,
                pumps,
                status: None,
                reap_poll: FIRST_REAP_POLL,
                alive: true,
                grace_end: None,
            }),
        })
    }

    /// Starts delivering `body` to `webhook` on a thread of its own (the HTTP client blocks).
    pub fn notify(
        task: &str,
        grace: Duration,
        webhook: &Webhook,
        body: Vec<u8>,
    ) -> std::io::Result<Supervisor> {
        let cancel = Arc::new(Cancel::default());
        let (tx, done) = oneshot::channel();
        let (hook, name, theirs) = (webhook.clone(), task.to_owned(), Arc::clone(&cancel));
        let thread = std::thread::Builder::new()
            .name("notify".into())
            .spawn(move || {
                let _ = tx.send(hook.deliver(&name, &body, &theirs, grace));
            })?;
        Ok(Supervisor {
            task: task.to_owned(),
            grace,
            state: Termination::Running,
            child: Child::Notify(Notify {
                cancel,
                done,
                thread: Some(thread),
                result: None,
            }),
        })
    }

    /// The task's name.
    #[must_use]
    pub fn task(&self) -> &str {
        &self.task
    }

    /// The task's grace period.
    #[must_use]
    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// Whether the task is a process (and not a webhook delivery).
    #[must_use]
    pub fn is_process(&self) -> bool {
        matches!(self.child, Child::Command(_))
    }

    /// The main process's pid (its process group's id), for a command task.
    #[must_use]
    pub fn pid(&self) -> Option<Pid> {
        match &self.child {
            Child::Command(c) => Some(c.pid),
            Child::Notify(_) => None,
        }
    }

    /// Starts ending the task: `sig` and SIGCONT to everything it runs (or its delivery cancelled),
    /// SIGKILL due a grace period later (or sooner, if already due sooner). After SIGKILL it does
    /// nothing.
    pub fn begin(&mut self, sig: Signal) {
        let kill_at = Instant::now() + self.grace;
        self.state = match self.state {
            Termination::Running => Termination::Terminating { kill_at },
            Termination::Terminating { kill_at: due } => Termination::Terminating {
                kill_at: due.min(kill_at),
            },
            Termination::Killed { .. } => return,
        };
        match &mut self.child {
            Child::Command(c) => {
                c.procs.signal(sig);
                c.procs.signal(Signal::SIGCONT);
            }
            Child::Notify(n) => n.cancel.cancel(),
        }
    }

    /// Sends SIGKILL to everything the task runs (a delivery is cancelled, if it was not yet).
    pub fn kill(&mut self) {
        if matches!(self.state, Termination::Killed { .. }) {
            return;
        }
        self.state = Termination::Killed { at: Instant::now() };
        match &mut self.child {
            Child::Command(c) => c.procs.signal(Signal::SIGKILL),
            Child::Notify(n) => n.cancel.cancel(),
        }
    }

    /// When SIGKILL is due, while the task is being ended and has not had it yet.
    #[must_use]
    pub fn kill_due(&self) -> Option<Instant> {
        match self.state {
            Termination::Terminating { kill_at } => Some(kill_at),
            _ => None,
        }
    }

    /// Whether ending the task has begun (a stop signal, a timeout).
    #[must_use]
    pub fn terminating(&self) -> bool {
        self.state != Termination::Running
    }

    /// Whether SIGKILL was sent.
    #[must_use]
    pub fn killed(&self) -> bool {
        matches!(self.state, Termination::Killed { .. })
    }

    /// Passes `sig` on to the task's processes; returns whether any process was there to get it
    /// (a delivery has none).
    #[must_use = "whether a process got the signal decides what the log says"]
    pub fn forward(&self, sig: Signal) -> bool {
        match &self.child {
            Child::Command(c) if c.procs.alive() => {
                c.procs.signal(sig);
                true
            }
            _ => false,
        }
    }

    /// Collects every exited child, keeping the main process's status; orphans are dropped.
    pub fn reap(&mut self) {
        if let Child::Command(c) = &mut self.child {
            for (pid, status) in process::reap() {
                if pid == c.pid {
                    c.status = Some(status);
                }
            }
        }
    }

    /// Whether the main process exited, or the delivery returned or was given up on (SIGKILL's due
    /// time passed: a thread cannot be killed, but nothing it does counts any more).
    #[must_use]
    pub fn has_ended(&self) -> bool {
        match &self.child {
            Child::Command(c) => c.status.is_some(),
            Child::Notify(n) => n.result.is_some() || self.killed(),
        }
    }

    /// Resolves once the main process exited or the delivery returned. Cancel-safe: what it found
    /// is kept. For a command it polls `waitpid` on a bounded period besides SIGCHLD, which `run.rs`
    /// turns into [`reap`](Self::reap) calls.
    pub async fn ended(&mut self) {
        loop {
            if self.has_ended() {
                return;
            }
            match &mut self.child {
                Child::Command(c) => {
                    tokio::time::sleep(c.reap_poll).await;
                    c.reap_poll = (c.reap_poll * 2).min(MAX_REAP_POLL);
                    self.reap();
                }
                Child::Notify(n) => {
                    let result = (&mut n.done).await;
                    n.result =
                        Some(result.unwrap_or_else(|_| Err("the sending thread stopped".into())));
                }
            }
        }
    }

    /// After the main process exited (or the delivery was cut short): ends what the task left
    /// behind and waits for its output, in steps, so that the run loop keeps handling signals
    /// meanwhile. Call [`settle_step`](Self::settle_step) until it returns `None`, awaiting
    /// [`settle_wait`](Self::settle_wait) until the moment it returns; then [`finish`](Self::finish).
    pub fn settle_step(&mut self) -> Option<Instant> {
        let now = Instant::now();
        let task = &self.task;
        let grace = self.grace;
        let killed_at = match self.state {
            Termination::Killed { at } => Some(at),
            _ => None,
        };
        let state = self.state;
        match &mut self.child {
            Child::Notify(n) => {
                // A delivery that returned is ending its thread now. One that was given up on gets a
                // moment to see its cancellation; one stuck in a connect (bounded by the grace, and
                // failing once done) is left to it.
                let Some(thread) = n.thread.take_if(|t| n.result.is_some() || t.is_finished())
                else {
                    let waited = killed_at.is_some_and(|at| now >= at + AFTER_KILL);
                    if !waited && n.thread.is_some() {
                        return Some(now + CLEANUP_POLL);
                    }
                    if n.thread.take().is_some() {
                        tracing::warn!(task = %task, "the webhook delivery did not end within the grace period; not waiting for it");
                    }
                    return None;
                };
                let _ = thread.join();
                None
            }
            Child::Command(c) => {
                if c.grace_end.is_none() {
                    #[cfg(debug_assertions)]
                    panic_if_asked();
                    // First look: scanning for escaped processes reads /proc, so it is done once here
                    // and then only while something is alive; once nothing is, nothing comes back.
                    // The main process's status is in hand; what else exited were orphans.
                    let _ = process::reap();
                    c.alive = c.procs.alive();
                    let grace_end = match state {
                        Termination::Terminating { kill_at } => kill_at,
                        _ => now + grace,
                    };
                    c.grace_end = Some(grace_end);
                    match state {
                        // What was killed before gets its full time to vanish and drain from here.
                        Termination::Killed { .. } => self.state = Termination::Killed { at: now },
                        _ if !c.alive => {}
                        Termination::Running => {
                            tracing::warn!(
                                task = %task, grace_s = grace.as_secs_f64(),
                                "the task exited but left processes running; sending them SIGTERM, SIGKILL after the grace period"
                            );
                            self.state = Termination::Terminating { kill_at: grace_end };
                            c.procs.signal(Signal::SIGTERM);
                            c.procs.signal(Signal::SIGCONT);
                        }
                        Termination::Terminating { .. } => {
                            c.procs.signal(Signal::SIGTERM);
                            c.procs.signal(Signal::SIGCONT);
                        }
                    }
                }
                let drained = c.pumps.iter_mut().all(Pump::is_finished);
                if !c.alive && drained {
                    return None;
                }
                let grace_end = c.grace_end.unwrap_or(now);
                let cut_at = match self.state {
                    Termination::Killed { at } => at,
                    _ if now >= grace_end => {
                        // With nothing alive, only a pipe held open by an outsider is waited for;
                        // the grace is over for it too.
                        if c.alive {
                            tracing::warn!(task = %task, "grace period over; sending SIGKILL to what the task left running");
                            c.procs.signal(Signal::SIGKILL);
                        }
                        self.state = Termination::Killed { at: now };
                        now
                    }
                    _ => {
                        return Some(if c.alive {
                            now + CLEANUP_POLL
                        } else {
                            grace_end
                        });
                    }
                };
                if now >= cut_at + AFTER_KILL {
                    return None;
                }
                // While something is alive, poll for it to go; otherwise only a deadline ends the wait.
                Some(if c.alive {
                    now + CLEANUP_POLL
                } else {
                    cut_at + AFTER_KILL
                })
            }
        }
    }

    /// Waits until `until`, or until the output has ended, then looks again at what is alive.
    pub async fn settle_wait(&mut self, until: Instant) {
        let Child::Command(c) = &mut self.child else {
            sleep_until(until.into()).await;
            return;
        };
        let drained = c.pumps.iter_mut().all(Pump::is_finished);
        if drained && !c.alive {
            // The output ended since `settle_step` last looked (it asked to wait for it, up to the
            // grace): nothing is left to wait for, so let it look again now, not at `until`.
            return;
        }
        let [out, err] = &mut c.pumps;
        tokio::select! {
            () = async { out.finished().await; err.finished().await; }, if !drained => {}
            () = sleep_until(until.into()) => {}
        }
        if c.alive {
            let _ = process::reap();
            c.alive = c.procs.alive();
        }
    }

    /// Lets go of the task: output pumps a leftover outside the group still holds are told to stop,
    /// and how it ended is returned.
    pub async fn finish(mut self) -> Ended {
        let task = self.task.clone();
        match &mut self.child {
            Child::Command(c) => {
                if !c.pumps.iter_mut().all(Pump::is_finished) {
                    tracing::warn!(
                        task = %task,
                        "a process outside the task's process group still holds its output open; not waiting for it"
                    );
                    for pump in &mut c.pumps {
                        pump.stop();
                        // A pump blocked writing to a stalled stdout cannot stop; it is left behind.
                        let _ = tokio::time::timeout(AFTER_KILL, pump.finished()).await;
                    }
                }
                if c.alive {
                    tracing::error!(task = %task, "some of the task's processes survived SIGKILL (stuck in the kernel?)");
                }
                c.procs.finish(c.alive);
                // waitpid without WUNTRACED reports only exits and deaths by signal.
                Ended::Command(c.status.unwrap_or(WaitStatus::Exited(c.pid, 1)))
            }
            Child::Notify(n) => Ended::Notify(
                n.result
                    .take()
                    .unwrap_or_else(|| Err("the delivery was cancelled".into())),
            ),
        }
    }
}

/// How the tests reach the panic hook (`main.rs`) with a task's leftovers running; a release build
/// has no such switch.
#[cfg(debug_assertions)]
fn panic_if_asked() {
    assert!(
        std::env::var_os("RELEASE_TASKS_TEST_PANIC").is_none(),
        "RELEASE_TASKS_TEST_PANIC is set"
    );
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        // The process group is SIGKILLed by TaskProcesses's own drop; a delivery must not go on.
        if let Child::Notify(n) = &self.child {
            n.cancel.cancel();
        }
    }
}
