//! The pumps: a task's stdout and stderr are copied to release-tasks's stdout and stderr, through
//! [`Lines`], by a task on the run loop's runtime, which reads both pipes as they become readable
//! (epoll, through tokio's `AsyncFd`) and hands what it renders to [`Stdio::send`]: written at
//! once where that cannot block, queued for a writer thread where it could. So no thread wakes for a
//! task's output but the run loop itself, and a slow reader of release-tasks's output can never
//! delay a timeout or a signal: when an output's queue is full, its pipes wait to be read (and the
//! task writing them waits, as it would on a slow pipe of its own), while the run loop goes on.
//!
//! A task's `TaskRun` (`task_run.rs`) owns its [`Pumping`]: it waits for it to finish, and tells it
//! to stop (after a last bounded drain) when a process outside the task holds a pipe open. The last
//! lines of the task ([`Tail`]) are kept by the pump and handed back when it ends.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Instant;

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::unistd;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::lines::{Input, Lines};
use super::pipe::enlarge_pipe;
use super::{Stdio, Target};
use crate::tail::Tail;

/// Size of one read from a task's pipe, at most.
pub(super) const READ_SIZE: usize = 256 * 1024;
/// The first read buffer: most tasks write a few lines, which do not pay for zeroing and faulting in
/// 256 KiB. It grows (to [`READ_SIZE`]) whenever a read fills it.
const FIRST_READ: usize = 16 * 1024;
/// What is still read from a pipe after being told to stop, so a chatty leftover cannot hold us.
const FINAL_DRAIN: usize = 1024 * 1024;

/// A task's two streams being pumped, by a task on the runtime.
pub struct Pumping {
    handle: JoinHandle<Tail>,
    /// The pipes' read ends, which the pump holds open until it ends (on this thread).
    pipes: [RawFd; 2],
    /// Sending on it, or dropping it, tells the pump to drain what is there and stop.
    stop: Option<oneshot::Sender<()>>,
    /// The task's last lines, once the pump has ended.
    tail: Option<Tail>,
}

/// One stream of a task.
struct Stream {
    pipe: AsyncFd<OwnedFd>,
    out: Out,
}

/// Where a stream's lines go.
struct Out {
    target: Target,
    lines: Lines,
    /// Which of the task's streams it is, for the tail: 0 stdout, 1 stderr.
    index: usize,
    /// Whether release-tasks's output still takes it (it is read either way, so the task never
    /// blocks on it).
    open: bool,
    /// Whether the stream has ended (or was given up).
    ended: bool,
}

impl Pumping {
    /// Starts copying a task's `stdout` and `stderr` pipes to `stdio`, each line prefixed with
    /// `prefix` (or as JSON, as `stdio` says), and feeding what passes to `tail` (the task's last
    /// lines). Needs the runtime (with its I/O driver).
    pub fn start(
        stdio: &Stdio,
        [stdout, stderr]: [OwnedFd; 2],
        prefix: &[u8],
        tail: Tail,
    ) -> std::io::Result<Pumping> {
        Pumping::start_to(
            stdio,
            [(stdout, Target::Stdout), (stderr, Target::Stderr)],
            prefix,
            tail,
        )
    }

    /// [`start`](Self::start) with the targets of the two streams (a unit test's files).
    fn start_to(
        stdio: &Stdio,
        [(stdout, out), (stderr, err)]: [(OwnedFd, Target); 2],
        prefix: &[u8],
        tail: Tail,
    ) -> std::io::Result<Pumping> {
        let stream = |pipe: OwnedFd, target: Target, index| -> std::io::Result<Stream> {
            enlarge_pipe(&pipe);
            // Our own end of the task's pipe: nonblocking changes nothing for the task.
            fcntl(&pipe, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
            // SAFETY: the `OwnedFd` moves into the `AsyncFd`, which owns it (and keeps it open, the
            // same descriptor) until both are dropped together.
            let pipe = unsafe { AsyncFd::register_with_interest(pipe, Interest::READABLE) }
                .map_err(|err| {
                    crate::limits::named("cannot watch a task's output", err.into_parts().1, false)
                })?;
            Ok(Stream {
                pipe,
                out: Out {
                    target,
                    // The task's stream, whichever output it goes to.
                    lines: Lines::with_format(
                        stdio.output_format(),
                        ["stdout", "stderr"][index],
                        prefix.to_vec(),
                    ),
                    index,
                    open: true,
                    ended: false,
                },
            })
        };
        let streams = [stream(stdout, out, 0)?, stream(stderr, err, 1)?];
        let pipes = [streams[0].pipe.as_raw_fd(), streams[1].pipe.as_raw_fd()];
        let (stop, stopped) = oneshot::channel();
        let handle = tokio::spawn(pump(stdio.clone(), streams, tail, stopped));
        Ok(Pumping {
            handle,
            pipes,
            stop: Some(stop),
            tail: None,
        })
    }

    /// Waits until both streams have ended (every writer closed them) and all of them was handed
    /// on to be written.
    pub async fn finished(&mut self) {
        if self.tail.is_none() {
            // An error means the runtime is going away; the tail is lost with it.
            let tail = (&mut self.handle).await.unwrap_or_else(|_| Tail::new(0));
            self.tail = Some(tail);
        }
    }

    /// Whether both streams have ended, without waiting.
    #[must_use]
    pub fn is_finished(&self) -> bool {
        self.tail.is_some() || self.handle.is_finished()
    }

    /// Whether every process that could write to the task's pipes has closed them, though what they
    /// wrote may not all be read yet (it waits for release-tasks's own reader): `poll` says so with
    /// `POLLHUP` before the last byte is read.
    #[must_use]
    pub fn writers_gone(&self) -> bool {
        if self.is_finished() {
            return true;
        }
        self.pipes.iter().all(|&fd| {
            // SAFETY: the pump holds the pipes open until it ends, and it ends only on this thread,
            // which is here: it has not ended (just checked).
            let pipe = unsafe { BorrowedFd::borrow_raw(fd) };
            // POLLHUP is reported whatever is asked for: nothing else is asked.
            let mut fds = [PollFd::new(pipe, PollFlags::empty())];
            poll(&mut fds, PollTimeout::ZERO).is_ok()
                && fds[0]
                    .revents()
                    .is_some_and(|r| r.contains(PollFlags::POLLHUP))
        })
    }

    /// Tells the pump to stop waiting for an end of stream that a leftover process is holding back.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// The task's last lines, once [`finished`](Self::finished).
    pub fn take_tail(&mut self) -> Option<Tail> {
        self.tail.take()
    }
}

/// The life of a pump: both streams until they end (or it is told to stop), then the task's tail.
async fn pump(
    stdio: Stdio,
    mut streams: [Stream; 2],
    mut tail: Tail,
    mut stop: oneshot::Receiver<()>,
) -> Tail {
    let mut buf = vec![0u8; FIRST_READ];
    let mut read_some = false;
    let [a, b] = &mut streams;
    while !(a.out.ended && b.out.ended) {
        if read_some {
            // A chatty task keeps its pipe readable: without a turn for the runtime's driver
            // between reads, timers (the task's deadline) and signals would wait for thousands of
            // reads. `yield_now` lets the driver run first.
            tokio::task::yield_now().await;
            read_some = false;
        }
        // An ended stream holds no partial line: its end wrote it out.
        let due = [&a.out, &b.out]
            .iter()
            .filter_map(|o| o.lines.flush_due())
            .min();
        // Asked for before looking at the queues, so that room made in between is not missed.
        let room_a = stdio.room_notify(a.out.target).notified();
        let room_b = stdio.room_notify(b.out.target).notified();
        tokio::pin!(room_a, room_b);
        room_a.as_mut().enable();
        room_b.as_mut().enable();
        let read_a = !a.out.ended && stdio.has_room(a.out.target);
        let read_b = !b.out.ended && stdio.has_room(b.out.target);
        tokio::select! {
            biased;
            _ = &mut stop => {
                for s in [&mut *a, &mut *b] {
                    drain(&stdio, s, &mut tail, &mut buf);
                }
                break;
            }
            ready = a.pipe.readable(), if read_a => match ready {
                Ok(mut guard) => match guard.try_io(|pipe| read(pipe.get_ref(), &mut buf)) {
                    Ok(result) => read_some = a.out.take(&stdio, result.ok(), &mut tail, &mut buf),
                    Err(_would_block) => {}
                },
                Err(_) => a.out.end(&stdio),
            },
            ready = b.pipe.readable(), if read_b => match ready {
                Ok(mut guard) => match guard.try_io(|pipe| read(pipe.get_ref(), &mut buf)) {
                    Ok(result) => read_some = b.out.take(&stdio, result.ok(), &mut tail, &mut buf),
                    Err(_would_block) => {}
                },
                Err(_) => b.out.end(&stdio),
            },
            () = &mut room_a, if !a.out.ended && !read_a => {}
            () = &mut room_b, if !b.out.ended && !read_b => {}
            () = tokio::time::sleep_until(due.unwrap_or_else(Instant::now).into()), if due.is_some() => {
                let now = Instant::now();
                for out in [&mut a.out, &mut b.out] {
                    if out.lines.flush_due().is_some_and(|at| at <= now) {
                        out.emit(&stdio, Input::Flush);
                    }
                }
            }
        }
    }
    for out in [&mut a.out, &mut b.out] {
        out.end(&stdio);
    }
    tail
}

/// One read, as `AsyncFd::try_io` wants it: would-block is an `io::Error` of that kind.
fn read(pipe: &OwnedFd, buf: &mut [u8]) -> std::io::Result<usize> {
    unistd::read(pipe, buf).map_err(std::io::Error::from)
}

impl Out {
    /// What a read came to (`None`: an error, which a read of a nonblocking pipe never is for an
    /// interruption): data (to the tail and out), or the end of the stream. Whether there was data.
    fn take(
        &mut self,
        stdio: &Stdio,
        read: Option<usize>,
        tail: &mut Tail,
        buf: &mut Vec<u8>,
    ) -> bool {
        match read {
            Some(0) | None => self.end(stdio),
            Some(n) => {
                self.feed(stdio, tail, &buf[..n]);
                // Grown while reads fill it, up to READ_SIZE (where this changes nothing).
                if n == buf.len() {
                    buf.resize((4 * n).min(READ_SIZE), 0);
                }
                return true;
            }
        }
        false
    }

    /// A chunk read: to the tail, and its lines out.
    fn feed(&mut self, stdio: &Stdio, tail: &mut Tail, data: &[u8]) {
        tail.feed(self.index, data);
        self.emit(stdio, Input::Data(data));
    }

    /// The stream has ended: what is held of its last line goes out.
    fn end(&mut self, stdio: &Stdio) {
        if !self.ended {
            self.ended = true;
            self.emit(stdio, Input::End);
        }
    }

    /// Sends what `lines` renders for `input`, until our own output turns out to be closed.
    fn emit(&mut self, stdio: &Stdio, input: Input<'_>) {
        let mut slices = self.lines.render(input, Instant::now());
        if self.open && !slices.is_empty() && stdio.send(self.target, &mut slices).is_err() {
            // Our own output is gone (a closed pipe): keep draining the task so it never blocks.
            self.open = false;
        }
    }
}

/// Reads what is already in the stream's pipe without waiting for more, up to [`FINAL_DRAIN`]
/// bytes, and ends the stream.
fn drain(stdio: &Stdio, stream: &mut Stream, tail: &mut Tail, buf: &mut [u8]) {
    let mut total = 0;
    while !stream.out.ended && total < FINAL_DRAIN {
        match unistd::read(stream.pipe.get_ref(), buf) {
            Ok(n) if n > 0 => {
                total += n;
                stream.out.feed(stdio, tail, &buf[..n]);
            }
            // The pipe is nonblocking: never interrupted; empty (or ended), the drain is over.
            _ => break,
        }
    }
    stream.out.end(stdio);
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::output::pipe::PIPE_SIZE;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    /// A file for a pump to write to, and the target that writes there.
    fn output_file() -> (tempfile::NamedTempFile, Target) {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        let target = Target::Fd(std::os::fd::AsRawFd::as_raw_fd(&file));
        (file, target)
    }

    /// Starts pumping the read ends of two new pipes into `target`, during a release (writes that
    /// could block are queued); returns the pump and the pipes' write ends.
    fn start(stdio: &Stdio, target: Target) -> (Pumping, OwnedFd, OwnedFd) {
        start_with(stdio, target, b"t | ")
    }

    /// [`start`] with the lines' prefix (`NAME | `, which names the task in JSON).
    fn start_with(stdio: &Stdio, target: Target, prefix: &[u8]) -> (Pumping, OwnedFd, OwnedFd) {
        stdio.write_in_background().expect("writer threads");
        let (out, out_w) = unistd::pipe().expect("pipe");
        let (err, err_w) = unistd::pipe().expect("pipe");
        let pumping =
            Pumping::start_to(stdio, [(out, target), (err, target)], prefix, Tail::new(10))
                .expect("pump");
        (pumping, out_w, err_w)
    }

    /// Waits (at most 10 s, else the test fails) for `pumping` to finish; what it wrote.
    async fn finished(pumping: &mut Pumping) {
        tokio::time::timeout(Duration::from_secs(10), pumping.finished())
            .await
            .expect("the pump ended");
    }

    #[test]
    fn a_pump_finishes_only_when_every_writer_has_closed_its_streams() {
        let (file, target) = output_file();
        let stdio = Stdio::new();
        runtime().block_on(async {
            let (mut pumping, out, err) = start(&stdio, target);
            unistd::write(&out, b"a\n").expect("write");
            drop(out);
            let early = tokio::time::timeout(Duration::from_millis(300), pumping.finished()).await;
            assert!(early.is_err(), "finished while a writer held stderr");
            assert!(!pumping.is_finished());
            unistd::write(&err, b"b").expect("write");
            drop(err);
            finished(&mut pumping).await;
            assert!(pumping.is_finished());
        });
        stdio.flush();
        assert_eq!(std::fs::read(file.path()).expect("read"), b"t | a\nt | b\n");
    }

    #[test]
    fn the_tail_keeps_what_both_streams_said() {
        let (_file, target) = output_file();
        let stdio = Stdio::new();
        let tail = runtime().block_on(async {
            let (mut pumping, out, err) = start(&stdio, target);
            unistd::write(&out, b"to stdout\n").expect("write");
            unistd::write(&err, b"to stderr\n").expect("write");
            drop((out, err));
            finished(&mut pumping).await;
            pumping.take_tail().expect("the tail")
        });
        let mut tail = tail;
        tail.finish();
        let lines = tail.render(&[]).join("\n");
        assert!(lines.contains("to stdout"), "{lines}");
        assert!(lines.contains("to stderr"), "{lines}");
    }

    #[test]
    fn json_lines_name_the_task_and_the_stream() {
        let (file, target) = output_file();
        let stdio = Stdio::new();
        stdio.set_output_format(crate::output::OutputFormat::Json);
        runtime().block_on(async {
            let (mut pumping, out_w, err_w) = start_with(&stdio, target, b"mig | ");
            unistd::write(&out_w, b"to out\n").expect("write");
            drop(out_w);
            unistd::write(&err_w, b"to err\n").expect("write");
            drop(err_w);
            finished(&mut pumping).await;
        });
        stdio.flush();
        let text = std::fs::read_to_string(file.path()).expect("read");
        let mut lines: Vec<&str> = text.lines().collect();
        lines.sort_unstable();
        assert_eq!(
            lines,
            [
                r#"{"task":"mig","stream":"stderr","line":"to err"}"#,
                r#"{"task":"mig","stream":"stdout","line":"to out"}"#,
            ]
        );
    }

    #[test]
    fn the_writers_are_gone_before_the_pump_has_read_what_they_wrote() {
        let (_file, target) = output_file();
        let stdio = Stdio::new();
        runtime().block_on(async {
            let (mut pumping, out, err) = start(&stdio, target);
            // The pump has not run yet (this task has not yielded): nothing of it is read.
            unistd::write(&out, b"unread\n").expect("write");
            unistd::write(&err, b"unread too\n").expect("write");
            assert!(
                !pumping.writers_gone(),
                "both writers are there, data to read"
            );
            drop(out);
            assert!(!pumping.writers_gone(), "stderr's writer is there");
            drop(err);
            assert!(
                pumping.writers_gone(),
                "no writer left, though a line is unread"
            );
            assert!(!pumping.is_finished());
            finished(&mut pumping).await;
            assert!(pumping.take_tail().is_some());
            assert!(
                pumping.is_finished(),
                "still finished once the tail is taken"
            );
            assert!(pumping.writers_gone());
        });
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_pump_does_not_read_while_its_outputs_queue_is_full() {
        let (file, target) = output_file();
        let stdio = Stdio::new();
        let unread = |fd: &OwnedFd| {
            let mut n: nix::libc::c_int = 0;
            // SAFETY: FIONREAD writes one int into `n`, which lives for the call.
            unsafe { nix::libc::ioctl(fd.as_raw_fd(), nix::libc::FIONREAD, &mut n) };
            n
        };
        runtime().block_on(async {
            let (mut pumping, out, err) = start(&stdio, target);
            // The queue is full (as if a stalled reader held it).
            stdio.queue(target).state.lock().expect("lock").bytes = crate::output::QUEUE_LIMIT;
            unistd::write(&out, b"waits\n").expect("write");
            unistd::write(&err, b"also\n").expect("write");
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            assert_eq!(unread(&out), 6, "stdout read while the queue was full");
            assert_eq!(unread(&err), 5, "stderr read while the queue was full");
            stdio.queue(target).state.lock().expect("lock").bytes = 0;
            stdio.room_notify(target).notify_waiters();
            drop((out, err));
            finished(&mut pumping).await;
        });
        stdio.flush();
        let written = std::fs::read(file.path()).expect("read");
        assert!(
            written == b"t | waits\nt | also\n" || written == b"t | also\nt | waits\n",
            "{}",
            String::from_utf8_lossy(&written)
        );
    }

    #[test]
    fn a_pump_stopped_after_its_writers_left_drains_to_the_end_and_stops() {
        let (file, target) = output_file();
        let stdio = Stdio::new();
        runtime().block_on(async {
            let (mut pumping, out, err) = start(&stdio, target);
            unistd::write(&out, b"last\nwords").expect("write");
            drop((out, err));
            pumping.stop();
            finished(&mut pumping).await;
        });
        stdio.flush();
        assert_eq!(
            std::fs::read(file.path()).expect("read"),
            b"t | last\nt | words\n"
        );
    }

    #[test]
    fn a_stopped_pump_ends_though_a_writer_still_holds_the_stream() {
        let (file, target) = output_file();
        let stdio = Stdio::new();
        let writers = runtime().block_on(async {
            let (mut pumping, out, err) = start(&stdio, target);
            unistd::write(&out, b"whole\npartial").expect("write");
            pumping.stop();
            finished(&mut pumping).await;
            (out, err)
        });
        stdio.flush();
        assert_eq!(
            std::fs::read(file.path()).expect("read"),
            b"t | whole\nt | partial\n"
        );
        drop(writers);
    }

    /// 64-byte lines, so that byte counts tell how many were written.
    fn line() -> Vec<u8> {
        [b"x".repeat(63), b"\n".to_vec()].concat()
    }

    // Needs a 1 MiB pipe, which only Linux grants.
    #[cfg(target_os = "linux")]
    #[test]
    fn what_is_in_the_pipe_when_told_to_stop_is_still_written() {
        let (file, target) = output_file();
        let stdio = Stdio::new();
        // More than one read's worth waits in the pipe, and its writer is still there: the final
        // drain must read all of it.
        let count = 2 * READ_SIZE / line().len() + 7;
        let writers = runtime().block_on(async {
            let (mut pumping, out, err) = start(&stdio, target);
            fcntl(&out, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE)).expect("a 1 MiB pipe");
            for _ in 0..count {
                unistd::write(&out, &line()).expect("write");
            }
            pumping.stop();
            finished(&mut pumping).await;
            (out, err)
        });
        stdio.flush();
        let out = std::fs::read(file.path()).expect("read");
        assert_eq!(out.len(), count * (line().len() + 4));
        drop(writers);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_final_drain_is_bounded_while_there_is_more_to_read() {
        // A writer that never stops (a chatty leftover): the drain must stop at its bound.
        let (file, target) = output_file();
        let stdio = Stdio::new();
        runtime().block_on(async {
            let (mut pumping, out, err) = start(&stdio, target);
            fcntl(&out, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE)).expect("a 1 MiB pipe");
            let (tx, rx) = std::sync::mpsc::channel();
            let chatty = std::thread::spawn(move || {
                let _ = tx.send(nix::unistd::gettid());
                while unistd::write(&out, &line()).is_ok() {}
            });
            let tid = rx.recv().expect("the writer's id");
            // The pipe is full once the writer blocks; the pump has not read yet (this thread
            // has not yielded to it).
            while !std::fs::read_to_string(format!("/proc/self/task/{tid}/wchan"))
                .is_ok_and(|w| w.contains("pipe_write"))
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            pumping.stop();
            finished(&mut pumping).await;
            // The pump has let go of the pipe: the writer gets EPIPE and ends.
            chatty.join().expect("writer");
            drop(err);
        });
        stdio.flush();
        let out = std::fs::read(file.path()).expect("read").len();
        let lines = out / (line().len() + 4);
        assert!(
            lines * line().len() >= FINAL_DRAIN && lines * line().len() < FINAL_DRAIN + READ_SIZE,
            "{lines} lines"
        );
    }

    #[test]
    fn a_read_that_fills_the_buffer_grows_it_and_one_that_does_not_leaves_it() {
        let (_file, target) = output_file();
        let stdio = Stdio::new();
        let mut out = Out {
            target,
            lines: Lines::new(b"t | ".to_vec()),
            index: 0,
            open: true,
            ended: false,
        };
        let mut tail = Tail::new(1);
        let mut buf = vec![b'x'; FIRST_READ];
        assert!(out.take(&stdio, Some(FIRST_READ - 1), &mut tail, &mut buf));
        assert_eq!(buf.len(), FIRST_READ);
        out.take(&stdio, Some(FIRST_READ), &mut tail, &mut buf);
        assert_eq!(buf.len(), 4 * FIRST_READ);
        buf.resize(READ_SIZE, 0);
        out.take(&stdio, Some(READ_SIZE), &mut tail, &mut buf);
        assert_eq!(buf.len(), READ_SIZE, "never past READ_SIZE");
        assert!(!out.ended);
        assert!(!out.take(&stdio, Some(0), &mut tail, &mut buf));
        assert!(out.ended, "a read of nothing is the end");
    }
}
