//! Limits the system sets on release-tasks itself: open files (`ulimit -n`) and processes
//! (`ulimit -u`, a container's pids limit). A limit that is reached ends in a documented status with a
//! message that names the limit, never in a panic or a silent exit.
//!
//! The open-file limit is checked once before a release starts ([`check_open_files`]): below
//! [`MIN_FREE_FILES`] free descriptors release-tasks refuses to start (exit 71, `EX_OSERR`), since the
//! runtime, its signal handling and every task's pipes need descriptors, and running out half-way
//! (after the lock was taken, between two tasks) helps nobody. Past that check, running out still
//! gives a message naming the limit ([`explain`]): 126 for a task that cannot be started, 71 for
//! release-tasks's own set-up. The process limit is reported where a process or thread cannot be
//! made (`spawn.rs`, 126).

use std::io;

use crate::error::Error;

/// How many free file descriptors a release needs before it starts: the runtime (2), its signal
/// handling (2), the runtime's epoll, each task's stdout, stderr and start-up report pipes (6) and
/// /dev/null, with a little room to spare (a plain release was measured to need 14). 16
/// free is `ulimit -n 19` for a release-tasks started with only stdin, stdout and stderr.
pub const MIN_FREE_FILES: u64 = 16;

/// Refuses to start a release with fewer than [`MIN_FREE_FILES`] free file descriptors (the soft
/// `RLIMIT_NOFILE` less those already open, inherited ones included), with a message naming the
/// limit (exit 71).
pub fn check_open_files() -> Result<(), Error> {
    let Ok((soft, _)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    else {
        return Ok(());
    };
    // A limit this high leaves room whatever is open; counting would cost a call per descriptor.
    if soft >= 1024 {
        return Ok(());
    }
    let open = (0..soft)
        .filter(|&fd| {
            // SAFETY: F_GETFD only reads the descriptor's flags; a closed one answers EBADF.
            i32::try_from(fd)
                .is_ok_and(|fd| unsafe { nix::libc::fcntl(fd, nix::libc::F_GETFD) } != -1)
        })
        .count() as u64;
    let free = soft.saturating_sub(open);
    if free < MIN_FREE_FILES {
        return Err(Error::Limit(format!(
            "the limit on open files is too low to run a release: `ulimit -n` is {soft} and {open} \
             {} already open, which leaves {free}; release-tasks needs {MIN_FREE_FILES} free (for \
             its runtime, signal handling and each task's pipes); raise the limit (`ulimit -n 1024`, \
             or the container's nofile limit); nothing was run",
            if open == 1 { "is" } else { "are" }
        )));
    }
    Ok(())
}

/// The limit an error of the OS means, in words that name it, when it means one: too many open
/// files in this process (`EMFILE`, `ulimit -n`) or in the system (`ENFILE`), or too many processes
/// (`EAGAIN` from `clone`/`fork`, `ulimit -u` or a pids limit: only where `what` made a process).
#[must_use]
pub fn explain(err: &io::Error) -> Option<String> {
    match err.raw_os_error()? {
        nix::libc::EMFILE => Some(format!(
            "the limit on open files was reached (`ulimit -n` is {}); raise it",
            open_files_limit().map_or_else(|| "unknown".to_owned(), |n| n.to_string())
        )),
        nix::libc::ENFILE => {
            Some("the system's limit on open files was reached (fs.file-max)".to_owned())
        }
        nix::libc::EFBIG => Some("the limit on file size was reached (`ulimit -f`)".to_owned()),
        _ => None,
    }
}

/// A limit reached, in words that name it: carried inside an `io::Error` from where it happened up
/// to the error that ends the run, which becomes [`Error::Limit`] (exit 71) whatever wrapped it.
#[derive(Debug)]
pub struct Reached(pub String);

impl std::fmt::Display for Reached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Reached {}

/// `err` from release-tasks's own step `what`, as an error that names the limit when it is one:
/// open files (`EMFILE`, `ENFILE`) or, for `thread`, processes (`EAGAIN`: `ulimit -u` counts threads).
#[must_use]
pub fn named(what: &str, err: io::Error, thread: bool) -> io::Error {
    let limit = match explain(&err) {
        Some(limit) => limit,
        None if thread && err.raw_os_error() == Some(nix::libc::EAGAIN) => {
            "the limit on processes was reached (`ulimit -u`, which counts threads too, or the \
             container's pids limit); raise it"
                .to_owned()
        }
        None => return err,
    };
    io::Error::new(err.kind(), Reached(format!("{what}: {limit}")))
}

/// The limit `err` (or an error it wraps) names, if any.
pub fn reached(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(err);
    while let Some(err) = next {
        if let Some(reached) = err.downcast_ref::<Reached>() {
            return Some(reached.0.clone());
        }
        if let Some(io) = err.downcast_ref::<io::Error>() {
            if let Some(inner) = io.get_ref().and_then(|e| e.downcast_ref::<Reached>()) {
                return Some(inner.0.clone());
            }
            if let Some(limit) = explain(io) {
                return Some(format!("{io}: {limit}"));
            }
        }
        next = err.source();
    }
    None
}

/// The error for a thread of release-tasks's own (`what`) that could not be started before anything
/// ran: the limit on processes or open files reached (exit 71), else an internal failure (70).
#[must_use]
pub fn thread_error(what: &str, err: io::Error) -> Error {
    let err = named(what, err, true);
    match reached(&err) {
        Some(limit) => Error::Limit(format!("{limit}; nothing was run")),
        None => Error::Internal(anyhow::anyhow!("{what}: {err}")),
    }
}

/// The error for release-tasks's own step `what` that failed with `err`: a limit reached (exit 71)
/// when it is one, else an internal failure (exit 70).
#[must_use]
pub fn or_internal(what: &str, err: &io::Error) -> Error {
    match explain(err) {
        Some(limit) => Error::Limit(format!("{what}: {limit}; nothing more was run")),
        None => Error::Internal(anyhow::anyhow!("{what}: {err}")),
    }
}

/// The soft limit on open files, when it can be read.
fn open_files_limit() -> Option<u64> {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .ok()
        .map(|(soft, _)| soft)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emfile_names_the_limit_and_others_do_not() {
        let shown = explain(&io::Error::from_raw_os_error(nix::libc::EMFILE)).unwrap();
        assert!(
            shown.starts_with("the limit on open files was reached (`ulimit -n` is "),
            "{shown}"
        );
        assert!(explain(&io::Error::from_raw_os_error(nix::libc::ENFILE)).is_some());
        assert!(explain(&io::Error::from_raw_os_error(nix::libc::ENOENT)).is_none());
        assert!(explain(&io::Error::other("x")).is_none());
        let err = or_internal(
            "cannot start",
            &io::Error::from_raw_os_error(nix::libc::EMFILE),
        );
        assert_eq!(err.exit_code(), 71);
        let err = or_internal(
            "cannot start",
            &io::Error::from_raw_os_error(nix::libc::EIO),
        );
        assert_eq!(err.exit_code(), 70);
    }

    #[test]
    fn a_limit_is_found_under_whatever_wraps_it() {
        let again = || io::Error::from_raw_os_error(nix::libc::EAGAIN);
        let thread = named("cannot start a thread", again(), true);
        let err: crate::error::Error = anyhow::Error::from(thread).into();
        assert_eq!(err.exit_code(), 71);
        assert!(
            err.to_string().starts_with(
                "cannot start a thread: the limit on processes was reached (`ulimit -u`"
            ),
            "{err}"
        );
        assert_eq!(named("x", again(), false).to_string(), again().to_string());
        let files = anyhow::Error::from(io::Error::from_raw_os_error(nix::libc::EMFILE))
            .context("making pipes");
        assert_eq!(crate::error::Error::from(files).exit_code(), 71);
        let other = anyhow::Error::from(io::Error::from_raw_os_error(nix::libc::EIO));
        assert_eq!(crate::error::Error::from(other).exit_code(), 70);
    }
}
