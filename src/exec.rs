//! `release-tasks exec -- CMD ARGS...`: after a successful release, release-tasks replaces itself with
//! the app's server through `execve`, so a container entrypoint needs no shell in between.
//!
//! The server keeps release-tasks's pid (PID 1 stays PID 1, and the platform's signals reach the
//! server directly) and gets the environment the tasks saw. It must not inherit anything of
//! release-tasks's own: this module makes every descriptor above stderr close on exec, empties the
//! signal mask and puts every disposition back to its default (Rust's runtime ignores SIGPIPE, which
//! `execve` would otherwise hand on). That no helper process outlives the release (the guardian)
//! is the run's business (`run.rs`), done before this is called.
//!
//! A stop signal that arrives between the release's end and the exec must not be lost (the server
//! would start after the platform asked to stop): [`hold_stop_signals`] takes the stop signals over
//! from the run's handlers when the release ends, and [`stop_received`] is asked before the exec.

use std::ffi::{CString, OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

use nix::errno::Errno;
use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal};

use crate::error::Error;
use crate::report::{EXIT_CANNOT_RUN, EXIT_NOT_FOUND};
use crate::signals::STOPPING;

/// The first stop signal that arrived once the release's own handlers were gone (0: none).
static STOP_RECEIVED: AtomicI32 = AtomicI32::new(0);

extern "C" fn record_stop(sig: nix::libc::c_int) {
    // Async-signal-safe: one atomic operation.
    let _ = STOP_RECEIVED.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst);
}

/// From now until the exec, a stop signal is recorded for [`stop_received`] instead of going to the
/// run loop's handlers, which nobody polls once the release has ended. Call it while those handlers
/// are still installed and then take what they queued, so that no signal falls in between.
pub fn hold_stop_signals() {
    let action = SigAction::new(
        SigHandler::Handler(record_stop),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in STOPPING {
        // SAFETY: the handler makes one atomic store, which is async-signal-safe.
        let _ = unsafe { signal::sigaction(sig, &action) };
    }
}

/// The first stop signal received since [`hold_stop_signals`], if any.
#[must_use]
pub fn stop_received() -> Option<Signal> {
    Signal::try_from(STOP_RECEIVED.load(Ordering::SeqCst)).ok()
}

/// Replaces release-tasks with `argv`, looked up on `PATH` as a shell would, with `env` as its whole
/// environment. Returns only when that cannot be done, with the error to exit with: 127 when the
/// program is not found, 126 when it cannot be executed.
pub fn replace_with(argv: &[OsString], env: &[(OsString, OsString)]) -> Error {
    let Some(program) = argv.first() else {
        return Error::Usage(
            "`exec` needs a command to run after the release: `release-tasks exec -- CMD ARGS...`"
                .into(),
        );
    };
    let Some(c_argv) = to_cstrings(argv.iter().map(OsString::as_os_str)) else {
        return Error::Usage("`exec`: a command argument contains a NUL byte".into());
    };
    let environ: Vec<OsString> = env
        .iter()
        .map(|(k, v)| {
            let mut kv = k.clone();
            kv.push("=");
            kv.push(v);
            kv
        })
        .collect();
    let Some(environ) = to_cstrings(environ.iter().map(OsString::as_os_str)) else {
        return Error::Usage("`exec`: an environment variable contains a NUL byte".into());
    };
    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_os_str());
    let candidates = candidates(Path::new(program), path);
    wait_for_children(CHILDREN_GONE);
    prepare_for_exec();
    // Past this point a stop signal takes its default action and ends release-tasks with 128+N;
    // one that came before must not be lost in the exec.
    if let Some(sig) = stop_received() {
        return interrupted(sig);
    }
    let mut last = Errno::ENOENT;
    for candidate in &candidates {
        let Some(file) = to_cstrings(std::iter::once(candidate.as_os_str())) else {
            continue;
        };
        // Returns only on failure. EACCES on one PATH entry does not hide the program later on PATH
        // (execvp's rule); the error reported is the most telling one seen.
        let Err(mut err) = nix::unistd::execve(&file[0], &c_argv, &environ);
        if err == Errno::ENOEXEC {
            // A script without a `#!` line: the shell runs it, as execvp and a shell would.
            let mut sh_argv = vec![c"/bin/sh".to_owned(), file[0].clone()];
            sh_argv.extend(c_argv.iter().skip(1).cloned());
            let Err(sh_err) = nix::unistd::execve(c"/bin/sh", &sh_argv, &environ);
            err = sh_err;
        }
        if err != Errno::ENOENT && err != Errno::ENOTDIR {
            last = err;
        }
    }
    let shown = program.to_string_lossy();
    if last == Errno::ENOENT {
        Error::Exec {
            code: EXIT_NOT_FOUND,
            message: format!("`exec`: command not found: `{shown}`; is it installed and on PATH?"),
        }
    } else {
        Error::Exec {
            code: EXIT_CANNOT_RUN,
            message: format!(
                "`exec`: cannot run `{shown}`: {}; is it an executable file (chmod +x)?",
                std::io::Error::from(last)
            ),
        }
    }
}

/// The error for a stop signal that arrived after the release but before the command started.
#[must_use]
pub fn interrupted(sig: Signal) -> Error {
    Error::Exec {
        code: 128 + sig as i32,
        message: format!(
            "`exec`: received {sig} after the release ended; the command was not started"
        ),
    }
}

/// How long the release's last helper processes get to exit before the command starts anyway.
const CHILDREN_GONE: std::time::Duration = std::time::Duration::from_secs(2);

/// Waits until release-tasks has no child left: the guardian ends once the release closed its pipe,
/// and must be gone before the server takes over this pid (a guardian still sweeping could take the
/// server for a leftover of the release). Every task's processes were reaped by the run already.
fn wait_for_children(limit: std::time::Duration) {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    let deadline = std::time::Instant::now() + limit;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            Ok(WaitStatus::StillAlive) => {
                tracing::warn!(
                    "a helper process of the release is still running; starting the command anyway"
                );
                return;
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

/// Where to look for `program`: itself when it names a path, else each `PATH` entry in turn (an
/// empty entry is the working directory), with the shell's default search path when `PATH` is unset.
fn candidates(program: &Path, path: Option<&OsStr>) -> Vec<PathBuf> {
    if program.as_os_str().as_bytes().contains(&b'/') {
        return vec![program.to_path_buf()];
    }
    let path = path.unwrap_or(OsStr::new("/usr/local/bin:/usr/bin:/bin"));
    path.as_bytes()
        .split(|&b| b == b':')
        .map(|dir| {
            let dir = if dir.is_empty() {
                Path::new(".")
            } else {
                Path::new(OsStr::from_bytes(dir))
            };
            dir.join(program)
        })
        .collect()
}

fn to_cstrings<'a>(items: impl Iterator<Item = &'a OsStr>) -> Option<Vec<CString>> {
    items.map(|s| CString::new(s.as_bytes()).ok()).collect()
}

/// What the server must not inherit: descriptors other than 0, 1 and 2, a blocked signal, an ignored
/// one. A signal that arrives from here on kills release-tasks by its default action, as it would
/// kill the server an instant later.
fn prepare_for_exec() {
    close_descriptors_on_exec();
    reset_dispositions();
    let _ = signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
}

/// Puts every signal's disposition back to the default. On Linux this goes to the kernel directly:
/// the C library refuses to touch the signals it reserves for itself (32 and 33 in glibc, 32 to 34
/// in musl), yet an ignored one of those would still be handed on through exec.
#[cfg(target_os = "linux")]
fn reset_dispositions() {
    /// The kernel's `struct sigaction` (`x86_64` and `aarch64` lay it out alike).
    #[repr(C)]
    struct KernelSigaction {
        handler: usize,
        flags: nix::libc::c_ulong,
        restorer: usize,
        mask: u64,
    }
    let default = KernelSigaction {
        handler: nix::libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    for number in 1..=64 {
        if number != nix::libc::SIGKILL && number != nix::libc::SIGSTOP {
            // SAFETY: installs the default action, no handler code; the kernel only reads `default`,
            // and a number it does not know fails with EINVAL, which is ignored.
            unsafe {
                nix::libc::syscall(
                    nix::libc::SYS_rt_sigaction,
                    number,
                    &raw const default,
                    std::ptr::null_mut::<KernelSigaction>(),
                    8usize,
                );
            }
        }
    }
}

/// Puts every signal's disposition back to the default.
#[cfg(not(target_os = "linux"))]
fn reset_dispositions() {
    use nix::sys::signal::{SigHandler, Signal};
    for number in 1..32 {
        if let Ok(sig) = Signal::try_from(number) {
            if sig != Signal::SIGKILL && sig != Signal::SIGSTOP {
                // SAFETY: SIG_DFL installs no handler code.
                let _ = unsafe { signal::signal(sig, SigHandler::SigDfl) };
            }
        }
    }
}

/// Marks every open descriptor above stderr close-on-exec. Listing them (rather than looping to the
/// descriptor limit) keeps this quick when the limit is a million.
fn close_descriptors_on_exec() {
    let dir = if cfg!(target_os = "linux") {
        "/proc/self/fd"
    } else {
        "/dev/fd"
    };
    let fds: Vec<i32> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: setting FD_CLOEXEC changes no memory; a descriptor that was the directory's own
        // (already closed) just fails with EBADF.
        unsafe { nix::libc::fcntl(fd, nix::libc::F_SETFD, nix::libc::FD_CLOEXEC) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_name_is_looked_up_on_each_path_entry_in_order() {
        assert_eq!(
            candidates(Path::new("puma"), Some(OsStr::new("/a:/b/c::/d"))),
            ["/a/puma", "/b/c/puma", "./puma", "/d/puma"].map(PathBuf::from)
        );
        assert_eq!(
            candidates(Path::new("./bin/web"), Some(OsStr::new("/a"))),
            [PathBuf::from("./bin/web")]
        );
        assert_eq!(candidates(Path::new("x"), None).len(), 3);
    }
}
