//! Signals as events: every signal release-tasks handles arrives here as an [`Event`] for the run
//! loop's `select!`, instead of being acted on inside a handler.
//!
//! The handlers are installed once, before the first task is spawned, so a signal that arrives while a
//! task is being spawned is held until the loop asks for it, never lost.

use nix::sys::signal::Signal;
use tokio::signal::unix::{SignalKind, signal};

/// Something that happened to release-tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A child changed state: time to reap.
    Child,
    /// A signal to forward (and, for stopping signals, to act on).
    Signal(Signal),
}

/// Signals that stop the release: forwarded, then the release ends with 128+N.
pub const STOPPING: &[Signal] = &[
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
];

/// The installed handlers.
pub struct Signals {
    child: tokio::signal::unix::Signal,
    forwarded: Vec<(Signal, tokio::signal::unix::Signal)>,
}

impl Signals {
    /// Installs handlers for SIGCHLD, the stopping signals, SIGUSR1 and SIGUSR2. Needs a runtime.
    pub fn install() -> std::io::Result<Signals> {
        let mut forwarded = Vec::new();
        for &sig in STOPPING.iter().chain(&[Signal::SIGUSR1, Signal::SIGUSR2]) {
            forwarded.push((sig, signal(SignalKind::from_raw(sig as i32))?));
        }
        Ok(Signals {
            child: signal(SignalKind::child())?,
            forwarded,
        })
    }

    /// The next event. Cancel-safe: an event not taken stays queued for the next call.
    pub async fn next(&mut self) -> Event {
        let child = &mut self.child;
        let forwarded = &mut self.forwarded;
        std::future::poll_fn(|cx| {
            if child.poll_recv(cx).is_ready() {
                return std::task::Poll::Ready(Event::Child);
            }
            for (sig, stream) in forwarded.iter_mut() {
                if stream.poll_recv(cx).is_ready() {
                    return std::task::Poll::Ready(Event::Signal(*sig));
                }
            }
            std::task::Poll::Pending
        })
        .await
    }
}
