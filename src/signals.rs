//! Signals as events: every signal release-tasks handles arrives here, is classified once (a stop, a
//! signal to forward, a child to reap) and is handed to the run loop's `select!` as an [`Event`],
//! instead of being acted on inside a handler or re-decided by each consumer.
//!
//! It also owns the start-up hygiene that makes those signals arrive at all ([`reset_inherited`]): a
//! parent may have blocked or ignored them, and a blocked SIGTERM or SIGCHLD would leave release-tasks
//! deaf or waiting forever. The handlers are installed once, before the first task is spawned, so a
//! signal that arrives while a task is being spawned is held until the loop asks for it, never lost.

use nix::sys::signal::{self, SigHandler, SigSet, SigmaskHow, Signal};
use tokio::signal::unix::{SignalKind, signal};

/// Something that happened to release-tasks, already classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A child changed state: time to reap.
    Child,
    /// A signal that stops the release (SIGTERM, SIGINT, SIGHUP, SIGQUIT): the running task gets it,
    /// no further task starts, and release-tasks exits 128+N.
    Stop(Signal),
    /// A signal passed on to the running task, if a process runs, and otherwise of no consequence.
    Forward(Signal),
}

/// Signals that stop the release.
pub const STOPPING: [Signal; 4] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
];
/// Signals that are only passed on.
const FORWARDED: [Signal; 2] = [Signal::SIGUSR1, Signal::SIGUSR2];

/// Undoes what release-tasks's parent may have left that would keep its signals from arriving: every
/// signal it handles is unblocked, and SIGCHLD (ignored, children would be reaped by the kernel and
/// their exit statuses lost) and the stopping signals go back to their default disposition until the
/// handlers are installed. Called first thing in `main`, before any thread exists, so every thread
/// inherits the clean mask (a mask is per thread). Like tini, which does the same for its children.
pub fn reset_inherited() {
    let mut handled = SigSet::empty();
    for sig in STOPPING.iter().chain(&[Signal::SIGCHLD]) {
        handled.add(*sig);
        // An ignored stopping signal would be replaced by the handler anyway; SIGCHLD must not stay
        // ignored even in the window before. SAFETY: SIG_DFL installs no handler code.
        let _ = unsafe { signal::signal(*sig, SigHandler::SigDfl) };
    }
    for sig in FORWARDED {
        handled.add(sig);
        // SIGUSR1 and SIGUSR2 mean "pass this on", never "stop": until the run loop's handlers take
        // them, they are ignored, since their default action would end release-tasks (with 138/140)
        // while it parses, reads its config or waits. Tasks and `exec`'s command get defaults back.
        // SAFETY: SIG_IGN installs no handler code.
        let _ = unsafe { signal::signal(sig, SigHandler::SigIgn) };
    }
    // A write past `ulimit -f` would kill release-tasks with SIGXFSZ, silently, after the release
    // (writing a report file); ignored, the write fails with EFBIG, which is reported and names the
    // limit (`limits::explain`). Tasks and `exec`'s command get the default back.
    // SAFETY: SIG_IGN installs no handler code.
    let _ = unsafe { signal::signal(Signal::SIGXFSZ, SigHandler::SigIgn) };
    let _ = signal::sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&handled), None);
}

/// The installed handlers.
pub struct Signals {
    child: tokio::signal::unix::Signal,
    handled: Vec<(Event, tokio::signal::unix::Signal)>,
    /// Told of a stop signal, so that the end of the release waits for its output no longer than
    /// for a stalled reader.
    stdio: Option<crate::output::Stdio>,
}

impl Signals {
    /// Installs handlers for SIGCHLD, the stopping signals, SIGUSR1 and SIGUSR2. Needs a runtime.
    ///
    /// tokio's first handler makes a socket pair for its signal driver and panics when it cannot
    /// (`ulimit -n` reached): a pair is made and closed here first, so that running out of file
    /// descriptors is an error (EMFILE) the caller reports, not a panic.
    pub fn install() -> std::io::Result<Signals> {
        // Close-on-exec where the flag exists; elsewhere (macOS) the pair lives for a moment only.
        #[cfg(any(target_os = "linux", target_os = "android"))]
        let flags = nix::sys::socket::SockFlag::SOCK_CLOEXEC;
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        let flags = nix::sys::socket::SockFlag::empty();
        drop(nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::Stream,
            None,
            flags,
        )?);
        let mut handled = Vec::new();
        let stops = STOPPING.iter().map(|&s| (s, Event::Stop(s)));
        let forwards = FORWARDED.iter().map(|&s| (s, Event::Forward(s)));
        for (sig, event) in stops.chain(forwards) {
            handled.push((event, signal(SignalKind::from_raw(sig as i32))?));
        }
        Ok(Signals {
            child: signal(SignalKind::child())?,
            handled,
            stdio: None,
        })
    }

    /// Tells `stdio` of every stop signal from now on (see [`crate::output::Stdio::stopping`]).
    #[must_use]
    pub fn telling(mut self, stdio: &crate::output::Stdio) -> Self {
        self.stdio = Some(stdio.clone());
        self
    }

    /// The next event. Cancel-safe: an event not taken stays queued for the next call.
    pub async fn next(&mut self) -> Event {
        let child = &mut self.child;
        let handled = &mut self.handled;
        let event = std::future::poll_fn(|cx| {
            if child.poll_recv(cx).is_ready() {
                return std::task::Poll::Ready(Event::Child);
            }
            for (event, stream) in handled.iter_mut() {
                if stream.poll_recv(cx).is_ready() {
                    return std::task::Poll::Ready(*event);
                }
            }
            std::task::Poll::Pending
        })
        .await;
        if let (Event::Stop(_), Some(stdio)) = (event, &self.stdio) {
            stdio.stopping();
        }
        event
    }

    /// The next stopping signal, ignoring everything else (for waits before any task runs).
    pub async fn next_stop(&mut self) -> Signal {
        loop {
            if let Event::Stop(sig) = self.next().await {
                return sig;
            }
        }
    }
}
