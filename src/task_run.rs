//! One running task, owned whole, in the shape of cargo-nextest's `terminate_child`: a [`TaskRun`]
//! holds everything the task has running (a command's process group, what escaped it, both output
//! pumps, its tail and its guardian registration; a notify task's delivery thread and its
//! [`Cancel`]) and the whole way it is ended: the stop signal and SIGCONT (a stopped process cannot
//! run its trap), the grace, SIGKILL, and the same for whatever the task leaves running after its
//! main process exits.
//!
//! It takes its policy as data ([`Policy`]: the task's own timeout, what is left of the release's,
//! its grace and the heartbeat) and the run loop's orders as events ([`Order`]: reap, forward this
//! signal, a first or a later stop signal), and gives back a typed result, one per kind of task
//! ([`CommandEnded`], [`DeliveryEnded`]). It decides no outcome: `run.rs` turns the result into one.
//!
//! What differs between a process and a delivery is behind the [`Child`] trait, so that the state
//! machine (and every log line it writes) is written once, and is unit-tested below with paused tokio
//! time against a scripted child. Reaping does not depend on SIGCHLD alone: while the main process
//! runs it also polls `waitpid` on a bounded period, so a lost or blocked SIGCHLD delays the end of a
//! task by at most [`MAX_REAP_POLL`], never forever.

use std::future::Future;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use tokio::sync::oneshot;
use tokio::time::{Instant, sleep_until};

use crate::guardian::Guardian;
use crate::notify::{Cancel, Webhook};
use crate::output::{Pumping, STALL_WAIT, Stdio};
use crate::process::{self, TaskProcesses};
use crate::tail::Tail;

/// How often the clean-up after a task checks whether its leftovers are gone.
const CLEANUP_POLL: Duration = Duration::from_millis(20);
/// How long `SIGKILLed` processes get to vanish and their output to drain before release-tasks moves on.
const AFTER_KILL: Duration = Duration::from_secs(1);
/// The first wait between two `waitpid` polls while a task's main process runs; it doubles up to
/// [`MAX_REAP_POLL`].
const FIRST_REAP_POLL: Duration = Duration::from_millis(50);
/// How often a wait for release-tasks's own reader looks whether it is taking anything.
const READER_POLL: Duration = Duration::from_millis(500);
/// The longest wait between two `waitpid` polls: how late a task's end is seen if SIGCHLD is lost.
pub const MAX_REAP_POLL: Duration = Duration::from_millis(500);

/// Which setting a task's deadline comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// The task's own `timeout`.
    Timeout,
    /// The `attempt_timeout` of one attempt of a task with `retries`.
    AttemptTimeout,
    /// What was left of the release's `release_timeout` when the task started.
    ReleaseTimeout,
}

impl Bound {
    /// The setting's name in `release.toml` (and in the `bound` field of the log line).
    #[must_use]
    pub fn key(self) -> &'static str {
        match self {
            Bound::Timeout => "timeout",
            Bound::AttemptTimeout => "attempt_timeout",
            Bound::ReleaseTimeout => "release_timeout",
        }
    }
}

/// The deadline that applies to one task, decided once when it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    pub at: Instant,
    /// Which setting it comes from, and that setting's value.
    pub bound: Bound,
    pub limit: Duration,
}

impl Deadline {
    /// `min(started + timeout, the release's deadline)`, and which one it is; the task's own
    /// timeout when both fall at the same moment.
    #[must_use]
    pub fn earlier(started: Instant, own: Limit, release: Option<ReleaseDeadline>) -> Self {
        let at = started + own.after;
        match release {
            Some(release) if release.at < at => Deadline {
                at: release.at,
                bound: Bound::ReleaseTimeout,
                limit: release.limit,
            },
            _ => Deadline {
                at,
                bound: own.bound,
                limit: own.limit,
            },
        }
    }
}

/// A task's own time limit: how long after its start, from which setting, and that setting's value
/// (an attempt of a retried task may get less than its `timeout`, what is left of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub after: Duration,
    pub bound: Bound,
    pub limit: Duration,
}

impl Limit {
    /// The task's `timeout`, whole.
    #[must_use]
    pub fn timeout(timeout: Duration) -> Self {
        Limit {
            after: timeout,
            bound: Bound::Timeout,
            limit: timeout,
        }
    }
}

/// The release's deadline, for a task that runs within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReleaseDeadline {
    pub at: Instant,
    /// `release_timeout` itself, for the log line.
    pub limit: Duration,
}

/// How one task is run and ended: data, from `run.rs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// The task's own time limit.
    pub own: Limit,
    /// The release's deadline when the task runs within it (`None` after a failure: `on =
    /// "failure"` and `"always"` tasks get their own timeout only).
    pub release: Option<ReleaseDeadline>,
    /// Between the stop signal and SIGKILL.
    pub grace: Duration,
    /// How often a running task is reported as still running.
    pub heartbeat: Duration,
}

/// Which stop signal of the release this one is (nextest's `SignalCount`), which decides what it
/// does to the running task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalCount {
    /// The release's first: the task gets it and SIGCONT, SIGKILL after the grace; it is the
    /// signal the release reports as its interruption.
    First,
    /// A later one: a SIGINT or SIGTERM means "now", SIGKILL at once; another stop signal (SIGHUP,
    /// SIGQUIT) is passed on as the first was.
    Again,
}

/// What the run loop tells a running task, from the signals release-tasks receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// A child changed state: collect exit statuses.
    Reap,
    /// Pass this signal on to the task's processes.
    Forward(Signal),
    /// A stop signal (SIGTERM, SIGINT, SIGHUP, SIGQUIT), and which one of the release's it is.
    Stop(Signal, SignalCount),
}

/// Where a [`TaskRun`] takes its orders from. `next` must be cancel-safe: an order not taken stays
/// for the next call.
pub trait Orders {
    fn next(&mut self) -> impl Future<Output = Order>;
}

/// How a task ended, as its [`TaskRun`] saw it.
#[derive(Debug)]
pub struct Ended<E> {
    /// What the task itself came to.
    pub end: E,
    /// The bound of the deadline that ended it, if one did.
    pub timed_out: Option<Bound>,
    /// The release's first stop signal, if it arrived while this task ran.
    pub stopped: Option<Signal>,
}

/// How a command task ended.
pub type CommandEnded = Ended<CommandEnd>;
/// How a notify task ended: the webhook's HTTP status, or why the report was not delivered.
pub type DeliveryEnded = Ended<Result<u16, String>>;

/// What a command task came to.
#[derive(Debug)]
pub struct CommandEnd {
    /// The main process's status (exits and deaths by signal only: no `WUNTRACED`).
    pub status: WaitStatus,
    /// The task's last output lines, ready to show (secrets hidden).
    pub output_tail: Vec<String>,
}

/// Which kind of thing a task runs, for what the log says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Process,
    Delivery,
}

/// What differs between running a command and delivering a webhook: the mechanism under the one
/// state machine of [`TaskRun`].
pub trait Child {
    /// What the task came to.
    type End;
    const KIND: Kind;
    /// Asks it to stop: `sig` and SIGCONT to every process, or the delivery cancelled.
    fn stop(&mut self, sig: Signal);
    /// SIGKILL to every process; a delivery is cancelled (a thread cannot be killed).
    fn kill(&mut self);
    /// Passes `sig` on; whether any process was there to get it.
    fn forward(&mut self, sig: Signal) -> bool;
    /// Collects exit statuses (on SIGCHLD).
    fn reap(&mut self);
    /// Whether the main process exited, or the delivery returned.
    fn has_ended(&self) -> bool;
    /// Resolves once [`has_ended`](Self::has_ended); cancel-safe.
    fn ended(&mut self) -> impl Future<Output = ()>;
    /// After the end: whether anything of the task still runs (processes it left, the delivery's
    /// thread).
    fn alive(&mut self) -> bool;
    /// Whether its output has ended (every writer closed it).
    fn drained(&mut self) -> bool;
    /// Resolves once [`drained`](Self::drained).
    fn output_ended(&mut self) -> impl Future<Output = ()>;
    /// Whether a process still holds the output open (not drained, and not only because what was
    /// written waits for release-tasks's own reader).
    fn output_held(&mut self) -> bool {
        !self.drained()
    }
    /// How much release-tasks has written of what it queued so far: whether its reader is taking
    /// the output that is left.
    fn output_progress(&self) -> u64 {
        0
    }
    /// Lets go of the task (output a leftover outside the group still holds is abandoned, after a
    /// bounded wait), `alive` saying whether something survived; what it came to.
    fn finish(self, alive: bool) -> impl Future<Output = Self::End>;
}

/// Where a task is in being ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Termination {
    Running,
    /// Asked to stop; SIGKILL (for a delivery: giving up on it) is due at `kill_at`.
    Terminating {
        kill_at: Instant,
    },
    /// SIGKILL was sent at `at`.
    Killed {
        at: Instant,
    },
}

/// The one owner of a running task. Start it with [`TaskRun::command`] or [`TaskRun::delivery`],
/// then [`run`](TaskRun::run) it to its end.
pub struct TaskRun<C: Child> {
    task: String,
    policy: Policy,
    deadline: Deadline,
    started: Instant,
    state: Termination,
    timed_out: Option<Bound>,
    stopped: Option<Signal>,
    child: C,
}

impl<C: Child> TaskRun<C> {
    /// Takes over `child`, started just now.
    pub fn new(task: &str, policy: Policy, child: C) -> Self {
        let started = Instant::now();
        TaskRun {
            task: task.to_owned(),
            policy,
            deadline: Deadline::earlier(started, policy.own, policy.release),
            started,
            state: Termination::Running,
            timed_out: None,
            stopped: None,
            child,
        }
    }

    /// The deadline that applies to the task.
    #[must_use]
    pub fn deadline(&self) -> Deadline {
        self.deadline
    }

    /// Runs the task to its end and through the clean-up of what it left: its end, its deadline
    /// (the stop signal, SIGKILL after the grace), the heartbeat and the run loop's orders; then
    /// what it left running (SIGTERM, SIGKILL after the grace) and its output, still taking orders.
    pub async fn run(mut self, orders: &mut impl Orders) -> Ended<C::End> {
        self.until_ended(orders).await;
        let alive = self.clean_up(orders).await;
        let task = self.task;
        match C::KIND {
            Kind::Process => {
                if self.child.output_held() {
                    tracing::warn!(
                        task = %task,
                        "a process outside the task's process group still holds its output open; not waiting for it"
                    );
                } else if !self.child.drained() {
                    tracing::warn!(
                        task = %task,
                        "release-tasks's stdout or stderr is not taking the task's last output (a stalled reader, or a stop signal came); the rest of it is dropped"
                    );
                }
                if alive {
                    tracing::error!(
                        task = %task,
                        "some of the task's processes survived SIGKILL (stuck in the kernel?)"
                    );
                }
            }
            Kind::Delivery if alive => tracing::warn!(
                task = %task,
                "the webhook delivery did not end within the grace period; not waiting for it"
            ),
            Kind::Delivery => {}
        }
        Ended {
            end: self.child.finish(alive).await,
            timed_out: self.timed_out,
            stopped: self.stopped,
        }
    }

    /// The first part: until the main process exits or the delivery returns (or is given up on).
    async fn until_ended(&mut self, orders: &mut impl Orders) {
        let mut next_beat = self.started + self.policy.heartbeat;
        while !self.main_over() {
            let kill_due = self.kill_due();
            let running = self.state == Termination::Running;
            tokio::select! {
                biased;
                order = orders.next() => self.obey(order),
                () = self.child.ended() => {}
                () = sleep_until(self.deadline.at), if running => self.time_out(),
                () = sleep_until(kill_due.unwrap_or(self.deadline.at)), if kill_due.is_some() => {
                    if C::KIND == Kind::Process {
                        tracing::warn!(task = %self.task, "grace period over; sending SIGKILL to the task's process group");
                    }
                    self.kill();
                }
                () = sleep_until(next_beat), if running => {
                    self.beat();
                    // From now, not from the last beat: after a stall, one beat, not a burst of them.
                    next_beat = Instant::now() + self.policy.heartbeat;
                }
            }
        }
    }

    /// Whether the main part is over: the main process exited, the delivery returned, or the
    /// delivery was given up on (its SIGKILL: nothing its thread does counts any more).
    fn main_over(&self) -> bool {
        self.child.has_ended()
            || (C::KIND == Kind::Delivery && matches!(self.state, Termination::Killed { .. }))
    }

    /// The second part: what the task left running gets SIGTERM and SIGCONT (again, if it was
    /// being stopped), SIGKILL when the grace ends, and [`AFTER_KILL`] to vanish and for the output
    /// to drain. Returns whether something is still alive.
    async fn clean_up(&mut self, orders: &mut impl Orders) -> bool {
        let mut alive = self.child.alive();
        let now = Instant::now();
        // Until when leftovers (or, with nothing alive, a pipe held open by an outsider) are
        // waited for before SIGKILL.
        let grace_end = match self.state {
            Termination::Terminating { kill_at } => kill_at,
            _ => now + self.policy.grace,
        };
        match self.state {
            // What was killed before gets its full time to vanish and drain from here.
            Termination::Killed { .. } => self.state = Termination::Killed { at: now },
            _ if !alive => {}
            Termination::Running => {
                tracing::warn!(
                    task = %self.task, grace_s = self.policy.grace.as_secs_f64(),
                    "the task exited but left processes running; sending them SIGTERM, SIGKILL after the grace period"
                );
                self.state = Termination::Terminating { kill_at: grace_end };
                self.child.stop(Signal::SIGTERM);
            }
            // What it started since the stop signal gets one too.
            Termination::Terminating { .. } => self.child.stop(Signal::SIGTERM),
        }
        let mut progress = (self.child.output_progress(), Instant::now());
        // When the wait for release-tasks's own reader began, if it did.
        let mut reader_wait: Option<Instant> = None;
        loop {
            let drained = self.child.drained();
            if !alive && drained {
                return false;
            }
            if !alive && !self.child.output_held() {
                // Nothing of the task is left but what it wrote, waiting to be read (by the pump,
                // or by release-tasks's own reader): waited for while that reader takes some of it.
                // After a stop signal, one STALL_WAIT in all, however slowly the reader takes it.
                let now = Instant::now();
                let since = *reader_wait.get_or_insert(now);
                let taken = self.child.output_progress();
                if taken != progress.0 {
                    progress = (taken, now);
                }
                let stopped_long = self.stopped.is_some() && now >= since + STALL_WAIT;
                if stopped_long || now >= progress.1 + STALL_WAIT {
                    return false;
                }
                tokio::select! {
                    biased;
                    order = orders.next() => self.obey(order),
                    () = self.child.output_ended() => {}
                    () = sleep_until(now + READER_POLL) => {}
                }
                continue;
            }
            let now = Instant::now();
            let wake = match self.state {
                Termination::Killed { at } if now >= at + AFTER_KILL => return alive,
                Termination::Killed { at } => at + AFTER_KILL,
                Termination::Terminating { kill_at } if now >= kill_at => {
                    self.kill_leftovers(alive);
                    continue;
                }
                Termination::Running if now >= grace_end => {
                    self.kill_leftovers(alive);
                    continue;
                }
                Termination::Terminating { kill_at } => kill_at,
                Termination::Running => grace_end,
            };
            // While something is alive, poll for it to go; otherwise only the output or a deadline
            // ends the wait.
            let wake = if alive {
                wake.min(now + CLEANUP_POLL)
            } else {
                wake
            };
            tokio::select! {
                biased;
                order = orders.next() => self.obey(order),
                () = self.child.output_ended(), if !drained => {}
                () = sleep_until(wake) => {}
            }
            if alive {
                alive = self.child.alive();
            }
        }
    }

    /// The grace is over for what the task left: SIGKILL to it, if anything is alive.
    fn kill_leftovers(&mut self, alive: bool) {
        if alive {
            if C::KIND == Kind::Process {
                tracing::warn!(task = %self.task, "grace period over; sending SIGKILL to what the task left running");
            }
            self.child.kill();
        }
        self.state = Termination::Killed { at: Instant::now() };
    }

    fn time_out(&mut self) {
        self.timed_out = Some(self.deadline.bound);
        let action = match C::KIND {
            Kind::Process => {
                "task timed out; sending SIGTERM to its process group, SIGKILL after the grace period"
            }
            Kind::Delivery => "task timed out; cancelling the webhook delivery",
        };
        tracing::error!(
            task = %self.task, bound = self.deadline.bound.key(),
            limit = %humantime::format_duration(self.deadline.limit),
            grace_s = self.policy.grace.as_secs_f64(), "{action}"
        );
        self.terminate(Signal::SIGTERM);
    }

    fn beat(&self) {
        let elapsed = Duration::from_secs(self.started.elapsed().as_secs());
        let left = self.deadline.at.saturating_duration_since(Instant::now());
        tracing::info!(
            task = %self.task,
            elapsed = %humantime::format_duration(elapsed),
            timeout_in = %humantime::format_duration(whole_seconds_up(left)),
            "task still running"
        );
    }

    /// Carries out one order of the run loop.
    fn obey(&mut self, order: Order) {
        match order {
            Order::Reap => self.child.reap(),
            Order::Forward(sig) => {
                if self.child.forward(sig) {
                    tracing::info!(signal = %sig, task = %self.task, "signal forwarded to the task");
                } else {
                    tracing::info!(signal = %sig, "received signal; no task process is running to forward it to");
                }
            }
            Order::Stop(sig, count) => {
                if count == SignalCount::First {
                    self.stopped = Some(sig);
                }
                let now =
                    count == SignalCount::Again && matches!(sig, Signal::SIGINT | Signal::SIGTERM);
                if now {
                    if !matches!(self.state, Termination::Killed { .. }) {
                        tracing::warn!(signal = %sig, "received a second stopping signal; sending SIGKILL to the task's process group");
                        self.kill();
                    }
                    return;
                }
                match C::KIND {
                    Kind::Process => tracing::warn!(
                        signal = %sig, grace_s = self.policy.grace.as_secs_f64(),
                        "received signal; forwarding it to the task's process group, SIGKILL after the grace period; no further task will start"
                    ),
                    Kind::Delivery => tracing::warn!(
                        signal = %sig, task = %self.task,
                        "received signal; cancelling the webhook delivery; no further task will start"
                    ),
                }
                self.terminate(sig);
            }
        }
    }

    /// `sig` and SIGCONT (or the delivery cancelled), SIGKILL due a grace period later, or sooner if
    /// already due sooner. After SIGKILL, nothing.
    fn terminate(&mut self, sig: Signal) {
        let kill_at = Instant::now() + self.policy.grace;
        self.state = match self.state {
            Termination::Running => Termination::Terminating { kill_at },
            Termination::Terminating { kill_at: due } => Termination::Terminating {
                kill_at: due.min(kill_at),
            },
            Termination::Killed { .. } => return,
        };
        self.child.stop(sig);
    }

    fn kill(&mut self) {
        if !matches!(self.state, Termination::Killed { .. }) {
            self.state = Termination::Killed { at: Instant::now() };
            self.child.kill();
        }
    }

    /// When SIGKILL is due, while the task is being stopped and has not had it yet.
    fn kill_due(&self) -> Option<Instant> {
        match self.state {
            Termination::Terminating { kill_at } => Some(kill_at),
            _ => None,
        }
    }
}

/// `d` in whole seconds, rounded up: "timeout in 0s" must not appear while time is left.
fn whole_seconds_up(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs() + u64::from(d.subsec_nanos() > 0))
}

/// A command task's processes and output.
pub struct Process<'g> {
    stdio: Stdio,
    pid: Pid,
    procs: TaskProcesses,
    output: Pumping,
    /// Values hidden in the tail.
    secrets: Vec<String>,
    guardian: Option<&'g Guardian>,
    status: Option<WaitStatus>,
    /// The next wait between `waitpid` polls.
    reap_poll: Duration,
    /// Whether the first look after the main process's end was taken (orphans reaped).
    looked: bool,
}

impl<'g> TaskRun<Process<'g>> {
    /// Takes over a command task from what `process::spawn` returned: its process group (with
    /// what escapes it; `SIGKILLed` if this is dropped), its output pumped to `stdio` under `prefix` with its last `tail_lines` lines kept (`secrets` hidden),
    /// and its registration with the guardian.
    pub fn command(
        stdio: &Stdio,
        task: &str,
        policy: Policy,
        spawned: process::Spawned,
        guardian: Option<&'g Guardian>,
        prefix: &[u8],
        (tail_lines, secrets): (usize, Vec<String>),
    ) -> std::io::Result<Self> {
        let pid = spawned.pid;
        let exempt = guardian.iter().map(|g| g.pid()).collect();
        // Owned before the pumps start, so a failure to start them still kills the group on drop.
        let procs = TaskProcesses::new(pid, exempt);
        let output = Pumping::start(
            stdio,
            [spawned.stdout, spawned.stderr],
            prefix,
            Tail::new(tail_lines),
        )?;
        if let Some(g) = guardian {
            g.tell(pid, true);
        }
        let child = Process {
            stdio: stdio.clone(),
            pid,
            procs,
            output,
            secrets,
            guardian,
            status: None,
            reap_poll: FIRST_REAP_POLL,
            looked: false,
        };
        Ok(TaskRun::new(task, policy, child))
    }
}

impl Child for Process<'_> {
    type End = CommandEnd;
    const KIND: Kind = Kind::Process;

    fn stop(&mut self, sig: Signal) {
        self.procs.signal(sig);
        self.procs.signal(Signal::SIGCONT);
    }

    fn kill(&mut self) {
        self.procs.signal(Signal::SIGKILL);
    }

    fn forward(&mut self, sig: Signal) -> bool {
        let alive = self.procs.alive();
        if alive {
            self.procs.signal(sig);
        }
        alive
    }

    fn reap(&mut self) {
        for (pid, status) in process::reap() {
            if pid == self.pid {
                self.status = Some(status);
            }
        }
    }

    fn has_ended(&self) -> bool {
        self.status.is_some()
    }

    async fn ended(&mut self) {
        while self.status.is_none() {
            tokio::time::sleep(self.reap_poll).await;
            self.reap_poll = (self.reap_poll * 2).min(MAX_REAP_POLL);
            self.reap();
        }
    }

    fn alive(&mut self) -> bool {
        if !self.looked {
            self.looked = true;
            #[cfg(debug_assertions)]
            panic_if_asked();
        }
        // The main process's status is in hand; what else exited were orphans.
        let _ = process::reap();
        self.procs.alive()
    }

    fn drained(&mut self) -> bool {
        self.output.is_finished()
    }

    async fn output_ended(&mut self) {
        self.output.finished().await;
    }

    fn output_held(&mut self) -> bool {
        !self.output.writers_gone()
    }

    fn output_progress(&self) -> u64 {
        self.stdio.written()
    }

    async fn finish(mut self, alive: bool) -> CommandEnd {
        if !self.drained() {
            // The pump drains what is in the pipes, hands it on (never waiting on a reader) and ends.
            self.output.stop();
        }
        // Bounded all the same: the tail is only a report's detail.
        let _ = tokio::time::timeout(AFTER_KILL, self.output.finished()).await;
        self.procs.finish(alive);
        if let Some(g) = self.guardian {
            g.tell(self.pid, false);
        }
        let output_tail = match self.output.take_tail() {
            Some(mut tail) => {
                tail.finish();
                tail.render(&self.secrets)
            }
            None => Vec::new(),
        };
        CommandEnd {
            // waitpid without WUNTRACED reports only exits and deaths by signal.
            status: self.status.unwrap_or(WaitStatus::Exited(self.pid, 1)),
            output_tail,
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

/// A notify task's delivery, on a thread of its own (the HTTP client blocks).
pub struct Delivery {
    cancel: Arc<Cancel>,
    done: oneshot::Receiver<Result<u16, String>>,
    thread: Option<JoinHandle<()>>,
    result: Option<Result<u16, String>>,
}

impl TaskRun<Delivery> {
    /// Starts delivering `body` to `webhook`.
    pub fn delivery(
        task: &str,
        policy: Policy,
        webhook: &Webhook,
        body: Vec<u8>,
    ) -> std::io::Result<Self> {
        let cancel = Arc::new(Cancel::default());
        let (tx, done) = oneshot::channel();
        let (hook, name, theirs) = (webhook.clone(), task.to_owned(), Arc::clone(&cancel));
        let grace = policy.grace;
        let thread = std::thread::Builder::new()
            .name("notify".into())
            .spawn(move || {
                let _ = tx.send(hook.deliver(&name, &body, &theirs, grace));
            })?;
        let child = Delivery {
            cancel,
            done,
            thread: Some(thread),
            result: None,
        };
        Ok(TaskRun::new(task, policy, child))
    }
}

impl Child for Delivery {
    type End = Result<u16, String>;
    const KIND: Kind = Kind::Delivery;

    fn stop(&mut self, _: Signal) {
        self.cancel.cancel();
    }

    fn kill(&mut self) {
        self.cancel.cancel();
    }

    fn forward(&mut self, _: Signal) -> bool {
        false
    }

    fn reap(&mut self) {
        // Between tasks only orphans exit; collecting them is all there is to do.
        drop(process::reap());
    }

    fn has_ended(&self) -> bool {
        self.result.is_some()
    }

    async fn ended(&mut self) {
        if self.result.is_none() {
            let result = (&mut self.done).await;
            self.result = Some(result.unwrap_or_else(|_| Err("the sending thread stopped".into())));
        }
    }

    fn alive(&mut self) -> bool {
        // A delivery that returned is ending its thread now; one given up on is waited for while
        // it sees its cancellation (one stuck in a connect, bounded by the grace, is left to it).
        let ending =
            self.result.is_some() || self.thread.as_ref().is_some_and(JoinHandle::is_finished);
        if ending {
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
        self.thread.is_some()
    }

    fn drained(&mut self) -> bool {
        true
    }

    async fn output_ended(&mut self) {}

    async fn finish(mut self, _: bool) -> Result<u16, String> {
        self.result
            .take()
            .unwrap_or_else(|| Err("the delivery was cancelled".into()))
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        // A delivery must not go on once nobody waits for it.
        self.cancel.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted child: what it does at which (paused) moment, and a record of what it was told.
    #[derive(Default)]
    struct Script {
        t0: Option<Instant>,
        /// The main process exits by itself this long after the start.
        exits_after: Option<Duration>,
        /// ... or this long after a stop signal (None: it ignores them).
        exits_after_stop: Option<Duration>,
        /// It leaves a process that ignores SIGTERM.
        leaves_stubborn: bool,
        /// It leaves a process that ends on SIGTERM.
        leaves_polite: bool,
        /// It leaves a process that not even SIGKILL ends (stuck in the kernel).
        survives_kill: bool,
        /// Its output is held open by an outsider until this long after the start.
        output_held: Option<Duration>,
        stopped_at: Option<Instant>,
        status: Option<WaitStatus>,
        /// What it was told, and when (from the start).
        told: Vec<(Duration, String)>,
    }

    impl Script {
        fn now(&self) -> Duration {
            Instant::now() - self.t0.unwrap_or_else(Instant::now)
        }

        fn exit_at(&self) -> Option<Instant> {
            let t0 = self.t0?;
            let own = self.exits_after.map(|d| t0 + d);
            let stop = self
                .stopped_at
                .zip(self.exits_after_stop)
                .map(|(at, d)| at + d);
            match (own, stop) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        }
    }

    const PID: Pid = Pid::from_raw(4242);

    impl Child for Script {
        type End = (Option<WaitStatus>, Vec<(Duration, String)>);
        const KIND: Kind = Kind::Process;

        fn stop(&mut self, sig: Signal) {
            let now = self.now();
            self.told.push((now, format!("{sig}+SIGCONT")));
            if self.stopped_at.is_none() {
                self.stopped_at = Some(Instant::now());
            }
            self.leaves_polite = false;
        }

        fn kill(&mut self) {
            let now = self.now();
            self.told.push((now, "SIGKILL".into()));
            if self.survives_kill {
                return;
            }
            self.leaves_polite = false;
            self.leaves_stubborn = false;
            if self.status.is_none() {
                self.status = Some(WaitStatus::Signaled(PID, Signal::SIGKILL, false));
            }
        }

        fn forward(&mut self, sig: Signal) -> bool {
            let now = self.now();
            self.told.push((now, format!("forward {sig}")));
            true
        }

        fn reap(&mut self) {
            if self.status.is_none() && self.exit_at().is_some_and(|at| at <= Instant::now()) {
                self.status = Some(WaitStatus::Exited(PID, 0));
            }
        }

        fn has_ended(&self) -> bool {
            self.status.is_some()
        }

        async fn ended(&mut self) {
            while self.status.is_none() {
                match self.exit_at() {
                    Some(at) => sleep_until(at).await,
                    None => std::future::pending().await,
                }
                self.reap();
            }
        }

        fn alive(&mut self) -> bool {
            self.leaves_polite || self.leaves_stubborn || self.survives_kill
        }

        fn drained(&mut self) -> bool {
            match (self.t0, self.output_held) {
                (Some(t0), Some(held)) => Instant::now() >= t0 + held,
                _ => true,
            }
        }

        async fn output_ended(&mut self) {
            if let (Some(t0), Some(held)) = (self.t0, self.output_held) {
                sleep_until(t0 + held).await;
            }
        }

        async fn finish(self, alive: bool) -> Self::End {
            let mut told = self.told;
            told.push((
                Instant::now() - self.t0.unwrap_or_else(Instant::now),
                format!("finish alive={alive}"),
            ));
            (self.status, told)
        }
    }

    /// Orders that arrive at set moments after the start.
    struct Timed {
        t0: Instant,
        orders: std::collections::VecDeque<(Duration, Order)>,
    }

    impl Orders for Timed {
        async fn next(&mut self) -> Order {
            let Some(&(at, order)) = self.orders.front() else {
                return std::future::pending().await;
            };
            sleep_until(self.t0 + at).await;
            self.orders.pop_front();
            order
        }
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    fn policy(timeout: f64, grace: f64) -> Policy {
        Policy {
            own: Limit::timeout(secs(timeout)),
            release: None,
            grace: secs(grace),
            heartbeat: secs(1000.0),
        }
    }

    /// Runs `script` under `policy` with `orders` at their moments; what it ended as, and what the
    /// child was told when.
    async fn run(
        mut script: Script,
        policy: Policy,
        orders: &[(f64, Order)],
    ) -> (Ended<()>, Option<WaitStatus>, Vec<(Duration, String)>) {
        let t0 = Instant::now();
        script.t0 = Some(t0);
        let mut orders = Timed {
            t0,
            orders: orders.iter().map(|&(at, o)| (secs(at), o)).collect(),
        };
        let ended = TaskRun::new("t", policy, script).run(&mut orders).await;
        let (status, told) = ended.end;
        let ended = Ended {
            end: (),
            timed_out: ended.timed_out,
            stopped: ended.stopped,
        };
        (ended, status, told)
    }

    fn told(list: &[(f64, &str)]) -> Vec<(Duration, String)> {
        list.iter().map(|&(t, s)| (secs(t), s.to_owned())).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_ends_in_time_is_told_nothing() {
        let script = Script {
            exits_after: Some(secs(3.0)),
            ..Script::default()
        };
        let (ended, status, log) = run(script, policy(10.0, 5.0), &[]).await;
        assert_eq!(status, Some(WaitStatus::Exited(PID, 0)));
        assert_eq!(ended.timed_out, None);
        assert_eq!(ended.stopped, None);
        assert_eq!(log, told(&[(3.0, "finish alive=false")]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_sends_sigterm_and_sigcont_and_a_polite_task_ends() {
        let script = Script {
            exits_after_stop: Some(secs(0.5)),
            ..Script::default()
        };
        let (ended, status, log) = run(script, policy(10.0, 5.0), &[]).await;
        assert_eq!(ended.timed_out, Some(Bound::Timeout));
        assert_eq!(status, Some(WaitStatus::Exited(PID, 0)));
        assert_eq!(
            log,
            told(&[(10.0, "SIGTERM+SIGCONT"), (10.5, "finish alive=false")])
        );
    }

    #[tokio::test(start_paused = true)]
    async fn sigkill_follows_exactly_one_grace_after_an_ignored_sigterm() {
        let (ended, status, log) = run(Script::default(), policy(10.0, 5.0), &[]).await;
        assert_eq!(ended.timed_out, Some(Bound::Timeout));
        assert_eq!(
            status,
            Some(WaitStatus::Signaled(PID, Signal::SIGKILL, false))
        );
        assert_eq!(
            log,
            told(&[
                (10.0, "SIGTERM+SIGCONT"),
                (15.0, "SIGKILL"),
                (15.0, "finish alive=false"),
            ])
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_stop_signal_is_passed_on_and_a_second_sigint_kills_at_once() {
        let orders = [
            (2.0, Order::Stop(Signal::SIGINT, SignalCount::First)),
            (3.0, Order::Stop(Signal::SIGINT, SignalCount::Again)),
        ];
        let (ended, _, log) = run(Script::default(), policy(10.0, 5.0), &orders).await;
        assert_eq!(ended.stopped, Some(Signal::SIGINT));
        assert_eq!(ended.timed_out, None);
        assert_eq!(
            log,
            told(&[
                (2.0, "SIGINT+SIGCONT"),
                (3.0, "SIGKILL"),
                (3.0, "finish alive=false"),
            ])
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_sighup_is_passed_on_and_keeps_the_first_grace() {
        let orders = [
            (2.0, Order::Stop(Signal::SIGTERM, SignalCount::First)),
            (4.0, Order::Stop(Signal::SIGHUP, SignalCount::Again)),
        ];
        let (ended, _, log) = run(Script::default(), policy(100.0, 5.0), &orders).await;
        assert_eq!(ended.stopped, Some(Signal::SIGTERM));
        assert_eq!(
            log,
            told(&[
                (2.0, "SIGTERM+SIGCONT"),
                (4.0, "SIGHUP+SIGCONT"),
                (7.0, "SIGKILL"),
                (7.0, "finish alive=false"),
            ])
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_signal_that_is_not_the_releases_first_is_not_its_interruption() {
        let script = Script {
            exits_after_stop: Some(secs(0.0)),
            ..Script::default()
        };
        let orders = [(1.0, Order::Stop(Signal::SIGHUP, SignalCount::Again))];
        let (ended, _, log) = run(script, policy(100.0, 5.0), &orders).await;
        assert_eq!(ended.stopped, None);
        assert_eq!(
            log,
            told(&[(1.0, "SIGHUP+SIGCONT"), (1.0, "finish alive=false")])
        );
    }

    #[tokio::test(start_paused = true)]
    async fn forwarded_signals_reach_the_task_and_change_nothing_else() {
        let script = Script {
            exits_after: Some(secs(2.0)),
            ..Script::default()
        };
        let orders = [(1.0, Order::Forward(Signal::SIGUSR1)), (1.5, Order::Reap)];
        let (ended, status, log) = run(script, policy(10.0, 5.0), &orders).await;
        assert_eq!((ended.stopped, ended.timed_out), (None, None));
        assert_eq!(status, Some(WaitStatus::Exited(PID, 0)));
        assert_eq!(
            log,
            told(&[(1.0, "forward SIGUSR1"), (2.0, "finish alive=false")])
        );
    }

    #[tokio::test(start_paused = true)]
    async fn leftovers_get_sigterm_then_sigkill_after_the_grace() {
        let script = Script {
            exits_after: Some(secs(1.0)),
            leaves_stubborn: true,
            ..Script::default()
        };
        let (ended, status, log) = run(script, policy(100.0, 5.0), &[]).await;
        assert_eq!(ended.timed_out, None);
        assert_eq!(status, Some(WaitStatus::Exited(PID, 0)));
        assert_eq!(
            log,
            told(&[
                (1.0, "SIGTERM+SIGCONT"),
                (6.0, "SIGKILL"),
                // Found gone at the next look, a CLEANUP_POLL later.
                (6.02, "finish alive=false"),
            ])
        );
    }

    #[tokio::test(start_paused = true)]
    async fn leftovers_that_end_on_sigterm_are_not_killed() {
        let script = Script {
            exits_after: Some(secs(1.0)),
            leaves_polite: true,
            ..Script::default()
        };
        let (_, _, log) = run(script, policy(100.0, 5.0), &[]).await;
        assert_eq!(
            log,
            told(&[(1.0, "SIGTERM+SIGCONT"), (1.02, "finish alive=false")])
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_sigterm_kills_leftovers_at_once() {
        let script = Script {
            exits_after: Some(secs(1.0)),
            leaves_stubborn: true,
            ..Script::default()
        };
        let orders = [
            (2.0, Order::Stop(Signal::SIGTERM, SignalCount::First)),
            (2.5, Order::Stop(Signal::SIGTERM, SignalCount::Again)),
        ];
        let (ended, _, log) = run(script, policy(100.0, 5.0), &orders).await;
        assert_eq!(ended.stopped, Some(Signal::SIGTERM));
        assert_eq!(
            log,
            told(&[
                (1.0, "SIGTERM+SIGCONT"),
                (2.0, "SIGTERM+SIGCONT"),
                (2.5, "SIGKILL"),
                (2.5, "finish alive=false"),
            ])
        );
    }

    #[tokio::test(start_paused = true)]
    async fn leftovers_of_a_timed_out_task_share_its_grace() {
        let script = Script {
            exits_after_stop: Some(secs(1.0)),
            leaves_stubborn: true,
            ..Script::default()
        };
        let (_, _, log) = run(script, policy(10.0, 5.0), &[]).await;
        assert_eq!(
            log,
            told(&[
                (10.0, "SIGTERM+SIGCONT"),
                (11.0, "SIGTERM+SIGCONT"),
                (15.0, "SIGKILL"),
                (15.02, "finish alive=false"),
            ])
        );
    }

    #[tokio::test(start_paused = true)]
    async fn output_held_by_an_outsider_is_waited_for_a_grace_then_a_second() {
        let script = Script {
            exits_after: Some(secs(1.0)),
            output_held: Some(secs(1000.0)),
            ..Script::default()
        };
        let (_, _, log) = run(script, policy(100.0, 5.0), &[]).await;
        // Nothing alive to kill: the grace, then AFTER_KILL, then it is let go.
        assert_eq!(log, told(&[(7.0, "finish alive=false")]));
    }

    #[tokio::test(start_paused = true)]
    async fn output_that_ends_within_the_grace_is_waited_for_no_longer() {
        let script = Script {
            exits_after: Some(secs(1.0)),
            output_held: Some(secs(2.5)),
            ..Script::default()
        };
        let (_, _, log) = run(script, policy(100.0, 5.0), &[]).await;
        assert_eq!(log, told(&[(2.5, "finish alive=false")]));
    }

    #[tokio::test(start_paused = true)]
    async fn something_alive_after_sigkill_is_let_go_a_second_later() {
        let script = Script {
            exits_after: Some(secs(1.0)),
            survives_kill: true,
            ..Script::default()
        };
        let (_, _, log) = run(script, policy(100.0, 2.0), &[]).await;
        assert_eq!(
            log,
            told(&[
                (1.0, "SIGTERM+SIGCONT"),
                (3.0, "SIGKILL"),
                (4.0, "finish alive=true"),
            ])
        );
    }

    /// The log lines written while `f` runs (with a subscriber of this thread's own).
    async fn logged<F: Future>(f: F) -> (F::Output, String) {
        #[derive(Clone, Default)]
        struct Lines(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Lines {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().expect("lock").extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .without_time()
            .with_ansi(false)
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        let out = f.await;
        drop(guard);
        let text = String::from_utf8_lossy(&lines.0.lock().expect("lock")).into_owned();
        (out, text)
    }

    #[tokio::test(start_paused = true)]
    async fn a_running_task_is_reported_every_heartbeat_from_its_start() {
        let script = Script {
            exits_after: Some(secs(10.5)),
            ..Script::default()
        };
        let policy = Policy {
            heartbeat: secs(3.0),
            ..policy(100.0, 5.0)
        };
        let (_, log) = logged(run(script, policy, &[])).await;
        let beats: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("task still running"))
            .collect();
        // At 3, 6 and 9 s: none at the start, none after the end.
        assert_eq!(beats.len(), 3, "{log}");
        assert!(beats[0].contains("elapsed=3s"), "{log}");
        assert!(beats[2].contains("elapsed=9s timeout_in=1m 31s"), "{log}");
    }

    #[tokio::test(start_paused = true)]
    async fn what_the_log_says_at_each_step_of_a_timeout() {
        let (_, log) = logged(run(Script::default(), policy(10.0, 5.0), &[])).await;
        let messages: Vec<&str> = log
            .lines()
            .map(|l| l.split_once(": ").map_or(l, |(_, m)| m))
            .collect();
        assert_eq!(
            messages,
            [
                "task timed out; sending SIGTERM to its process group, SIGKILL after the grace period task=t bound=\"timeout\" limit=10s grace_s=5.0",
                "grace period over; sending SIGKILL to the task's process group task=t",
            ],
            "{log}"
        );
    }

    #[test]
    fn the_deadline_is_the_earlier_of_the_tasks_and_the_releases() {
        let t0 = Instant::now();
        let release = |at: f64| {
            Some(ReleaseDeadline {
                at: t0 + secs(at),
                limit: secs(600.0),
            })
        };
        let own = Deadline {
            at: t0 + secs(10.0),
            bound: Bound::Timeout,
            limit: secs(10.0),
        };
        assert_eq!(Deadline::earlier(t0, Limit::timeout(secs(10.0)), None), own);
        assert_eq!(
            Deadline::earlier(t0, Limit::timeout(secs(10.0)), release(10.0)),
            own
        );
        assert_eq!(
            Deadline::earlier(t0, Limit::timeout(secs(10.0)), release(11.0)),
            own
        );
        assert_eq!(
            Deadline::earlier(t0, Limit::timeout(secs(10.0)), release(9.0)),
            Deadline {
                at: t0 + secs(9.0),
                bound: Bound::ReleaseTimeout,
                limit: secs(600.0),
            }
        );
        assert_eq!(Bound::Timeout.key(), "timeout");
        assert_eq!(Bound::ReleaseTimeout.key(), "release_timeout");
        assert_eq!(Bound::AttemptTimeout.key(), "attempt_timeout");
        let attempt = Limit {
            after: secs(2.0),
            bound: Bound::AttemptTimeout,
            limit: secs(2.0),
        };
        assert_eq!(
            Deadline::earlier(t0, attempt, release(9.0)),
            Deadline {
                at: t0 + secs(2.0),
                bound: Bound::AttemptTimeout,
                limit: secs(2.0),
            },
            "an attempt's own limit, with its setting"
        );
        let rest = Limit {
            after: secs(4.0),
            bound: Bound::Timeout,
            limit: secs(10.0),
        };
        assert_eq!(
            Deadline::earlier(t0, rest, None),
            Deadline {
                at: t0 + secs(4.0),
                bound: Bound::Timeout,
                limit: secs(10.0),
            },
            "what is left of the timeout, named by the timeout's own value"
        );
    }

    #[test]
    fn time_left_is_rounded_up_to_whole_seconds() {
        assert_eq!(whole_seconds_up(secs(0.0)), secs(0.0));
        assert_eq!(whole_seconds_up(secs(0.001)), secs(1.0));
        assert_eq!(whole_seconds_up(secs(2.0)), secs(2.0));
        assert_eq!(whole_seconds_up(secs(2.5)), secs(3.0));
    }
}
