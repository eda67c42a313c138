//! release-tasks's stdout and stderr: the one [`Stdio`] handle that every write goes through, made
//! in `main` and passed down.
//!
//! The handle owns what must be shared by everything that writes: the locks (every write carries
//! whole lines under a lock shared by everything that writes to the same pipe, so a log collector
//! that merges stdout and stderr never sees two lines mixed), the output format of task lines, the
//! pool of pump threads, the background writer of log lines, and one memory of a stalled stderr
//! (a full pipe that nobody reads), so that such a stderr holds release-tasks up for at most
//! [`STALL_WAIT`] before the release and as much at its end, however many lines, flushes and
//! messages there are to write.
//!
//! What it leaves to others: splitting and rendering task output ([`lines`], pure), copying a
//! task's streams ([`pump`]), pipe helpers ([`pipe`]), and the formatting of log lines (`log.rs`).

pub mod lines;
pub mod pipe;
pub mod pump;

use std::io::IoSlice;
use std::os::fd::{BorrowedFd, RawFd};
use std::sync::mpsc::{Sender, SyncSender, channel, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::unistd;

pub use lines::{OutputFormat, PARTIAL_FLUSH};
pub use pipe::{SMALL_STACK, cloexec_pipe};
pub use pump::Pump;

/// How long a stalled stderr may hold release-tasks up before the release, and again at its end.
pub const STALL_WAIT: Duration = Duration::from_secs(5);

/// Where a stream goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Stdout,
    Stderr,
    /// A file a unit test reads back (it shares stdout's lock).
    #[cfg(test)]
    Fd(RawFd),
}

impl Target {
    /// The stream's name in a JSON line.
    fn stream(self) -> &'static str {
        match self {
            Target::Stderr => "stderr",
            Target::Stdout => "stdout",
            #[cfg(test)]
            Target::Fd(_) => "stdout",
        }
    }

    fn fd(self) -> RawFd {
        match self {
            Target::Stdout => 1,
            Target::Stderr => 2,
            #[cfg(test)]
            Target::Fd(fd) => fd,
        }
    }
}

/// The handle on release-tasks's stdout and stderr. Cheap to clone: every clone is the same handle.
#[derive(Clone)]
pub struct Stdio(Arc<Shared>);

struct Shared {
    /// Serialize writes to stdout and to stderr (task output and log lines alike). When both are
    /// the same pipe or file (a log collector's), the first serves both, so that two lines never
    /// mix; otherwise each has its own, so a stalled stdout does not hold up the log on stderr.
    locks: [Mutex<()>; 2],
    one_file: bool,
    /// The format of task output lines, set once the settings are read.
    format: OnceLock<OutputFormat>,
    stall: Mutex<Stall>,
    /// Log lines for the background writer, once there is one.
    background: OnceLock<Sender<Message>>,
    /// Pump threads waiting for their next stream (see `pump.rs`). One still busy (blocked on a
    /// stalled stdout) is simply not here, and a new thread is started instead.
    idle_pumps: Mutex<Vec<Sender<pump::Job>>>,
}

/// What a stalled stderr has cost: the end of the wait that found it stalled, before the release
/// and at its end. The first wait that times out in a part sets when every later one in that part
/// ends, so that release-tasks waits once per part, not once per line.
#[derive(Debug, Default)]
struct Stall {
    ending: bool,
    stalled: [Option<Instant>; 2],
}

enum Message {
    Line(Vec<u8>),
    /// Answered once every line sent before it is written.
    Flush(SyncSender<()>),
}

impl Default for Stdio {
    fn default() -> Self {
        Stdio::new()
    }
}

impl Stdio {
    /// The handle on fds 1 and 2; make one, in `main`.
    #[must_use]
    pub fn new() -> Self {
        let id = |fd| {
            // SAFETY: fds 1 and 2 stay open for the whole life of release-tasks.
            nix::sys::stat::fstat(unsafe { BorrowedFd::borrow_raw(fd) })
                .map(|st| (st.st_dev, st.st_ino))
        };
        Stdio(Arc::new(Shared {
            locks: [Mutex::new(()), Mutex::new(())],
            one_file: matches!((id(1), id(2)), (Ok(a), Ok(b)) if a == b),
            format: OnceLock::new(),
            stall: Mutex::new(Stall::default()),
            background: OnceLock::new(),
            idle_pumps: Mutex::new(Vec::new()),
        }))
    }

    /// Chooses how task output is written (a later call changes nothing).
    pub fn set_output_format(&self, format: OutputFormat) {
        let _ = self.0.format.set(format);
    }

    /// How task output is written.
    #[must_use]
    pub fn output_format(&self) -> OutputFormat {
        self.0.format.get().copied().unwrap_or_default()
    }

    fn lock(&self, target: Target) -> MutexGuard<'_, ()> {
        // stdout (and a test's file) use the first lock; stderr the second unless it is stdout's file.
        let index = usize::from(!self.0.one_file && target == Target::Stderr);
        self.0.locks[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes `bytes` to `target` whole, under the output lock. Errors (a closed pipe) are returned
    /// for the caller to decide; nothing is retried except interrupted and would-block writes.
    pub fn write(&self, target: Target, bytes: &[u8]) -> std::io::Result<()> {
        self.write_vectored(target, &mut [IoSlice::new(bytes)])
    }

    /// Writes all of `slices` under the output lock, `IOV_MAX` slices at a time.
    pub fn write_vectored(
        &self,
        target: Target,
        mut slices: &mut [IoSlice<'_>],
    ) -> std::io::Result<()> {
        const IOV_MAX: usize = 1024;
        let _guard = self.lock(target);
        // SAFETY: fds 1 and 2 stay open for the whole life of release-tasks.
        let fd = unsafe { BorrowedFd::borrow_raw(target.fd()) };
        while !slices.is_empty() {
            let batch = slices.len().min(IOV_MAX);
            match nix::sys::uio::writev(fd, &slices[..batch]) {
                Ok(n) => IoSlice::advance_slices(&mut slices, n),
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => {
                    // Our stdout is a non-blocking file description shared with someone else: wait
                    // for room.
                    let mut fds = [PollFd::new(fd, PollFlags::POLLOUT)];
                    let _ = poll(&mut fds, PollTimeout::NONE);
                }
                Err(err) => return Err(err.into()),
            }
        }
        Ok(())
    }

    /// Writes `bytes` to `target` under the output lock, waiting at most until `deadline` for
    /// room: a stalled reader (a full pipe nobody reads) makes it give up with `TimedOut` instead
    /// of blocking forever. Pieces of at most `PIPE_BUF` bytes go out only once `poll` says there is
    /// room, and a pipe with room takes that much without blocking.
    fn write_until(
        &self,
        target: Target,
        mut bytes: &[u8],
        deadline: Instant,
    ) -> std::io::Result<()> {
        const PIPE_BUF: usize = 4096;
        let _guard = self.lock(target);
        // SAFETY: fds 1 and 2 stay open for the whole life of release-tasks.
        let fd = unsafe { BorrowedFd::borrow_raw(target.fd()) };
        while !bytes.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            let wait = PollTimeout::try_from(left.as_millis().min(60_000) as i32)
                .unwrap_or(PollTimeout::ZERO);
            let mut fds = [PollFd::new(fd, PollFlags::POLLOUT)];
            // Room, or an error or hang-up that the write then reports.
            match poll(&mut fds, wait) {
                Ok(0) => return Err(std::io::ErrorKind::TimedOut.into()),
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(err) => return Err(err.into()),
            }
            match unistd::write(fd, &bytes[..bytes.len().min(PIPE_BUF)]) {
                Ok(n) => bytes = &bytes[n..],
                Err(Errno::EINTR | Errno::EAGAIN) => {}
                Err(err) => return Err(err.into()),
            }
        }
        Ok(())
    }

    /// When a wait for stderr must end: [`STALL_WAIT`] from now, or when the wait that found it
    /// stalled ended, in this part of the run (then it may be past already).
    fn stall_deadline(&self) -> Instant {
        let stall = self.0.stall.lock().unwrap_or_else(PoisonError::into_inner);
        stall.stalled[usize::from(stall.ending)].unwrap_or_else(|| Instant::now() + STALL_WAIT)
    }

    /// Remembers that a wait ended at `deadline` with its lines still waiting.
    fn stalled(&self, deadline: Instant) {
        let mut stall = self.0.stall.lock().unwrap_or_else(PoisonError::into_inner);
        let part = usize::from(stall.ending);
        stall.stalled[part].get_or_insert(deadline);
    }

    /// The release (or the command) has ended: what is written from now on is its end, which a
    /// reader that stalled before may be back for, and which gets its own wait.
    pub fn ending(&self) {
        self.0
            .stall
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .ending = true;
    }

    /// Writes a message to stderr for people. Where stderr cannot be written there is nobody to
    /// tell, and the exit status still says what happened, so the error is dropped. A stderr that
    /// nobody reads would block the write, and the output lock behind it, for ever: the write gets
    /// what is left of [`STALL_WAIT`] on a thread of its own, then release-tasks goes on without it.
    pub fn tell(&self, line: &str) {
        let deadline = self.stall_deadline();
        if deadline <= Instant::now() {
            return;
        }
        let (theirs, stdio) = (line.to_owned(), self.clone());
        let (said, wait) = std::sync::mpsc::channel();
        let writer = std::thread::Builder::new().spawn(move || {
            let _ = stdio.write(Target::Stderr, theirs.as_bytes());
            let _ = said.send(());
        });
        let said = match writer {
            Ok(_) => {
                let left = deadline.saturating_duration_since(Instant::now());
                wait.recv_timeout(left).is_ok()
            }
            // No thread can be made (the limit on processes, `ulimit -u`): the message still goes
            // out, written from here, for as long as the deadline allows.
            Err(_) => self
                .write_until(Target::Stderr, line.as_bytes(), deadline)
                .is_ok(),
        };
        if !said {
            self.stalled(deadline);
        }
    }

    /// Writes one log line to stderr: handed to the background writer once there is one;
    /// before, written directly within what is left of [`STALL_WAIT`].
    pub fn log(&self, line: &[u8]) {
        if let Some(tx) = self.0.background.get() {
            drop(tx.send(Message::Line(line.to_vec())));
            return;
        }
        let deadline = self.stall_deadline();
        if self.write_until(Target::Stderr, line, deadline).is_err() {
            self.stalled(deadline);
        }
    }

    /// From now on, log lines are written by a thread of their own, so that the run loop never
    /// waits on a stalled log reader: a timeout or a signal must be acted on even when nobody reads
    /// stderr.
    pub fn write_in_background(&self) {
        if self.0.background.get().is_some() {
            return;
        }
        let (tx, rx) = channel::<Message>();
        let stdio = self.clone();
        let started = std::thread::Builder::new()
            .name("log".into())
            .stack_size(SMALL_STACK)
            .spawn(move || {
                for message in rx {
                    match message {
                        // A closed stderr must not stop the release; the line is lost either way.
                        Message::Line(line) => drop(stdio.write(Target::Stderr, &line)),
                        Message::Flush(done) => drop(done.send(())),
                    }
                }
            });
        // Without the thread, lines are written directly, as before the release started.
        if started.is_ok() {
            let _ = self.0.background.set(tx);
        }
    }

    /// Waits until the log lines sent so far are written, within what is left of [`STALL_WAIT`]
    /// (stderr may be stalled).
    pub fn flush(&self) {
        if let Some(tx) = self.0.background.get() {
            let (done, wait) = sync_channel(1);
            if tx.send(Message::Flush(done)).is_ok() {
                let deadline = self.stall_deadline();
                let left = deadline.saturating_duration_since(Instant::now());
                if wait.recv_timeout(left).is_err() {
                    self.stalled(deadline);
                }
            }
        }
    }

    /// A pump thread waiting for its next stream, if one is.
    fn idle_pump(&self) -> Option<Sender<pump::Job>> {
        self.0
            .idle_pumps
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
    }

    /// A pump thread is free for the next stream.
    fn pump_idle(&self, worker: Sender<pump::Job>) {
        self.0
            .idle_pumps
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(worker);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stall_is_waited_for_once_before_the_release_and_once_at_its_end() {
        let stdio = Stdio::new();
        let first = stdio.stall_deadline();
        assert!(first + Duration::from_secs(1) > Instant::now() + STALL_WAIT);
        stdio.stalled(first);
        assert_eq!(
            stdio.stall_deadline(),
            first,
            "later waits end with the first"
        );
        stdio.stalled(first + STALL_WAIT);
        assert_eq!(
            stdio.stall_deadline(),
            first,
            "the first stall is the one kept"
        );
        stdio.ending();
        let end = stdio.stall_deadline();
        assert!(end >= first, "the end gets a wait of its own");
        stdio.stalled(end);
        assert_eq!(stdio.stall_deadline(), end);
    }

    #[test]
    fn the_output_format_is_set_once() {
        let stdio = Stdio::new();
        assert_eq!(stdio.output_format(), OutputFormat::Text);
        stdio.set_output_format(OutputFormat::Json);
        stdio.set_output_format(OutputFormat::Text);
        assert_eq!(stdio.output_format(), OutputFormat::Json);
        assert_eq!(stdio.clone().output_format(), OutputFormat::Json);
    }
}
