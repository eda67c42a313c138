//! Pipe helpers that the pumps, the spawning of tasks and the guardian share: pipes no task
//! inherits, and larger pipes for a task's output.

use std::os::fd::OwnedFd;

use nix::fcntl::{FcntlArg, fcntl};
use nix::unistd;

/// Stack size of release-tasks's own threads (the output writers, a message's writer, a webhook's
/// delivery): their buffers live on the heap, and a small stack is cheaper to set up than 2 MiB.
pub const SMALL_STACK: usize = 128 * 1024;

/// The capacity asked for a task's output pipes: fewer wake-ups for a chatty task (Linux's default
/// is 64 KiB; a smaller grant is fine).
#[cfg(target_os = "linux")]
pub(super) const PIPE_SIZE: i32 = 1024 * 1024;

/// Asks for a larger pipe; a smaller grant (or none) only costs wake-ups.
#[cfg(target_os = "linux")]
pub(super) fn enlarge_pipe(source: &OwnedFd) {
    let _ = fcntl(source, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
}

/// macOS sizes a pipe by itself (up to 64 KiB as it fills): nothing to ask for.
#[cfg(not(target_os = "linux"))]
pub(super) fn enlarge_pipe(_source: &OwnedFd) {}

/// A pipe that no task inherits: a task holding another task's pipe (or the guardian's) open would
/// keep that one from ever ending.
#[cfg(target_os = "linux")]
pub fn cloexec_pipe() -> nix::Result<(OwnedFd, OwnedFd)> {
    unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
}

/// Without `pipe2`, close-on-exec is set just after `pipe`. Tasks are spawned from the thread that
/// starts pumps, so no fork falls between the two calls.
#[cfg(not(target_os = "linux"))]
pub fn cloexec_pipe() -> nix::Result<(OwnedFd, OwnedFd)> {
    use nix::fcntl::FdFlag;
    let (read, write) = unistd::pipe()?;
    for fd in [&read, &write] {
        fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    }
    Ok((read, write))
}
