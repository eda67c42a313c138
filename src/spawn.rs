//! Starting a program: where to look for it on `PATH` (as `execvp` does), putting every signal back
//! to its default, and on Linux starting a task's process without copying release-tasks's memory.
//!
//! `fork` copies the page tables of the whole process, and every page either side then writes costs
//! a fault until the child has exec'd: with the runtime's threads and buffers that was the largest
//! per-task cost measured (README, "Benchmarks"). A task's process is therefore started as C
//! libraries start one for `posix_spawn`: `clone(CLONE_VM | CLONE_VFORK)`, a child on a stack of its
//! own that shares release-tasks's memory and only makes system calls until it execs, while the
//! calling thread waits. `posix_spawn` itself cannot be used: it has no `PR_SET_PDEATHSIG`.
//!
//! The child cannot report a failure through memory it shares (qemu-user runs `CLONE_VFORK` as a
//! plain fork), so, like musl's `posix_spawn`, it writes the step that failed and its error number
//! to a close-on-exec pipe: nothing to read means the exec happened. The step matters to the user: a
//! working directory removed by an earlier task fails with the same ENOENT as a missing program.

use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Where to look for `program`: itself when it names a path, else each `PATH` entry in turn (an
/// empty entry is the working directory), with the shell's default search path when `PATH` is unset.
#[must_use]
pub fn candidates(program: &Path, path: Option<&OsStr>) -> Vec<PathBuf> {
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

/// Each item as a C string; `None` when one holds a NUL byte.
pub fn to_cstrings<'a>(items: impl Iterator<Item = &'a OsStr>) -> Option<Vec<CString>> {
    items.map(|s| CString::new(s.as_bytes()).ok()).collect()
}

/// Puts every signal's disposition back to the default. On Linux this goes to the kernel directly:
/// the C library refuses to touch the signals it reserves for itself (32 and 33 in glibc, 32 to 34
/// in musl), yet an ignored one of those would still be handed on through exec. Async-signal-safe
/// and allocation-free: a task's child calls it before exec.
#[cfg(target_os = "linux")]
pub fn reset_dispositions() {
    set_dispositions(nix::libc::SIG_DFL, !0);
}

/// Gives each signal in `signals` (bit N-1 for signal N) `handler`: `SIG_DFL` or `SIG_IGN`, no
/// handler code. The kernel refuses SIGKILL and SIGSTOP (EINVAL), which is ignored.
#[cfg(target_os = "linux")]
fn set_dispositions(handler: nix::libc::sighandler_t, signals: u64) {
    /// The kernel's `struct sigaction` (`x86_64` and `aarch64` lay it out alike).
    #[repr(C)]
    struct KernelSigaction {
        handler: usize,
        flags: nix::libc::c_ulong,
        restorer: usize,
        mask: u64,
    }
    let action = KernelSigaction {
        handler,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    for number in (1..=64).filter(|n| signals & (1 << (n - 1)) != 0) {
        // SAFETY: installs SIG_DFL or SIG_IGN, no handler code; the kernel only reads `action`.
        unsafe {
            nix::libc::syscall(
                nix::libc::SYS_rt_sigaction,
                number,
                &raw const action,
                std::ptr::null_mut::<KernelSigaction>(),
                8usize,
            );
        }
    }
}

/// Puts every signal's disposition back to the default.
#[cfg(not(target_os = "linux"))]
pub fn reset_dispositions() {
    use nix::sys::signal::{self, SigHandler, Signal};
    for number in 1..32 {
        if let Ok(sig) = Signal::try_from(number) {
            if sig != Signal::SIGKILL && sig != Signal::SIGSTOP {
                // SAFETY: SIG_DFL installs no handler code.
                let _ = unsafe { signal::signal(sig, SigHandler::SigDfl) };
            }
        }
    }
}

#[cfg(target_os = "linux")]
pub use linux::{Child, spawn};

#[cfg(target_os = "linux")]
mod linux {
    use std::ffi::{CString, OsStr, OsString, c_void};
    use std::io;
    use std::os::fd::{AsRawFd, OwnedFd, RawFd};
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    use nix::libc::{self, c_char, c_int};
    use nix::unistd::Pid;

    /// What a task's process is to be: everything the child needs, made ready by the parent, since
    /// the child may not allocate.
    pub struct Child<'a> {
        pub argv: &'a [&'a str],
        /// Added to (or replacing) release-tasks's own environment.
        pub env: &'a [(&'a OsStr, &'a OsStr)],
        pub dir: &'a Path,
        pub stdin: &'a OwnedFd,
        pub stdout: &'a OwnedFd,
        pub stderr: &'a OwnedFd,
    }

    /// The child's instructions, in memory it shares with the waiting parent.
    struct Plan {
        /// Null-terminated lists of pointers into `_strings`.
        files: Vec<*const c_char>,
        argv: Vec<*const c_char>,
        /// `/bin/sh FILE ARGS...` for a file without a `#!` line (execvp's rule): the child writes
        /// the file's pointer into the second slot before it execs it.
        script_argv: std::cell::UnsafeCell<Vec<*const c_char>>,
        envp: Vec<*const c_char>,
        dir: CString,
        fds: [RawFd; 3],
        report: RawFd,
        parent: libc::pid_t,
        _strings: Vec<CString>,
    }

    /// The child's stack: it runs a few system call wrappers and nothing else.
    const STACK: usize = 64 * 1024;

    /// The step of the child's set-up that failed, as it reports it next to the error number.
    const STEP_EXEC: i32 = 0;
    const STEP_GROUP: i32 = 1;
    const STEP_STDIO: i32 = 2;
    const STEP_DIR: i32 = 3;
    const STEP_DEATHSIG: i32 = 4;

    /// The most exec takes in one argument or variable (Linux's `MAX_ARG_STRLEN`, 32 pages of 4 KiB).
    const MAX_ARG_STRLEN: usize = 32 * 4096;

    /// Starts `child` in a new process group, with an empty signal mask, default dispositions and
    /// `PR_SET_PDEATHSIG` (SIGKILL), its program looked up on `PATH` as `execvp` does. An error is
    /// the exec's (or a set-up step's), as `std::process::Command::spawn` would return it.
    pub fn spawn(child: &Child<'_>) -> io::Result<Pid> {
        let (plan, report) = Plan::new(child)?;
        let mut stack: Vec<u8> = Vec::with_capacity(STACK);
        // The stack grows down from its 16-byte-aligned top.
        let top = (stack.as_mut_ptr() as usize + STACK) & !15;
        // The kernel's signal sets are 64 bits wide; every bit set blocks every signal.
        let all: u64 = !0;
        let mut old: u64 = 0;
        // SAFETY: `clone` runs `start` on `stack` with `plan`, both alive until it returns: with
        // CLONE_VFORK this thread sleeps until the child has exec'd or exited. Every signal is
        // blocked around it (raw, so that the C library's own signals are too), so that no handler
        // of release-tasks runs on the child's side of the shared memory; the child puts every
        // disposition back to default before it unblocks them.
        let pid = unsafe {
            libc::syscall(
                libc::SYS_rt_sigprocmask,
                libc::SIG_SETMASK,
                &raw const all,
                &raw mut old,
                8usize,
            );
            let pid = libc::clone(
                start,
                top as *mut c_void,
                libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                (&raw const plan).cast_mut().cast::<c_void>(),
            );
            let clone_error = io::Error::last_os_error();
            libc::syscall(
                libc::SYS_rt_sigprocmask,
                libc::SIG_SETMASK,
                &raw const old,
                std::ptr::null_mut::<u64>(),
                8usize,
            );
            if pid < 0 {
                return Err(cannot_clone(&clone_error));
            }
            pid
        };
        drop(stack);
        let (read, write) = report;
        drop(write);
        let mut failure = [0u8; 8];
        // A write of 8 bytes to a pipe is never split: all of them, or none when the exec happened.
        if read_full(&read, &mut failure) < failure.len() {
            return Ok(Pid::from_raw(pid));
        }
        // The child exited 127 without running anything; it is collected here, so that nobody
        // else takes its exit for a task's.
        while let Err(nix::errno::Errno::EINTR) = nix::sys::wait::waitpid(Pid::from_raw(pid), None)
        {
        }
        let [s0, s1, s2, s3, e0, e1, e2, e3] = failure;
        let step = i32::from_ne_bytes([s0, s1, s2, s3]);
        let errno = i32::from_ne_bytes([e0, e1, e2, e3]);
        Err(plan.error(child, step, errno))
    }

    /// The error of a `clone` that failed: no process could be made at all, which is not the
    /// program's fault; most often a limit on processes (a container's pids limit, `ulimit -u`).
    fn cannot_clone(err: &io::Error) -> io::Error {
        let why = match err.raw_os_error() {
            Some(libc::EAGAIN) => {
                ", the limit on processes was reached (the container's pids limit or `ulimit -u`)"
            }
            Some(libc::ENOMEM) => ", out of memory",
            _ => "",
        };
        io::Error::new(err.kind(), format!("cannot start a process{why}: {err}"))
    }

    /// Reads until `buf` is full or the pipe's end; returns how much was read.
    fn read_full(fd: &OwnedFd, buf: &mut [u8]) -> usize {
        let mut done = 0;
        while done < buf.len() {
            match nix::unistd::read(fd, &mut buf[done..]) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(nix::errno::Errno::EINTR) => {}
                Err(_) => break,
            }
        }
        done
    }

    impl Plan {
        /// What the user is told when the child's `step` failed with `errno`. An exec's error is
        /// returned as the OS gave it (the caller looks at its kind and number), except an argument
        /// list too long, which says what is too long; a set-up step says which it was.
        fn error(&self, child: &Child<'_>, step: i32, errno: i32) -> io::Error {
            let err = io::Error::from_raw_os_error(errno);
            let what = match step {
                STEP_EXEC if errno == libc::E2BIG => return self.too_big(&err),
                STEP_EXEC => return err,
                STEP_GROUP => "cannot give it a process group of its own".to_owned(),
                STEP_STDIO => "cannot connect its stdin, stdout and stderr".to_owned(),
                STEP_DIR => format!(
                    "cannot enter its working directory {} (was it removed or renamed by an \
                     earlier task?)",
                    child.dir.display()
                ),
                STEP_DEATHSIG => {
                    "cannot make it die with release-tasks (PR_SET_PDEATHSIG)".to_owned()
                }
                _ => "cannot prepare its process".to_owned(),
            };
            // Not the exec's kind: a missing directory must not read as a missing program.
            io::Error::other(format!("{what}: {err}"))
        }

        /// The exec's E2BIG explained: one string over the kernel's limit for a single string, or
        /// all of them together over the limit that the stack size sets.
        fn too_big(&self, err: &io::Error) -> io::Error {
            let strings = |list: &[*const c_char]| -> Vec<&[u8]> {
                list.iter()
                    .take_while(|p| !p.is_null())
                    // SAFETY: every pointer before the null points into one of `_strings`.
                    .map(|&p| unsafe { std::ffi::CStr::from_ptr(p) }.to_bytes())
                    .collect()
            };
            let (argv, envp) = (strings(&self.argv), strings(&self.envp));
            let total: usize = argv.iter().chain(&envp).map(|s| s.len() + 1).sum();
            let largest_arg = argv.iter().enumerate().max_by_key(|(_, a)| a.len());
            let largest_var = envp.iter().max_by_key(|kv| kv.len());
            let arg_len = largest_arg.map_or(0, |(_, a)| a.len());
            let var_len = largest_var.map_or(0, |kv| kv.len());
            let message = if var_len.max(arg_len) + 1 > MAX_ARG_STRLEN {
                let name = if var_len >= arg_len {
                    let kv = largest_var.copied().unwrap_or_default();
                    let name = kv.split(|&b| b == b'=').next().unwrap_or_default();
                    format!(
                        "the value of environment variable {} is {} bytes",
                        String::from_utf8_lossy(name),
                        var_len.saturating_sub(name.len() + 1)
                    )
                } else {
                    let n = largest_arg.map_or(0, |(n, _)| n);
                    format!("argument {n} of the command is {arg_len} bytes")
                };
                format!(
                    "{name}, and exec takes at most 128 KiB ({MAX_ARG_STRLEN} bytes) in any one \
                     argument or variable; pass it in a file instead"
                )
            } else {
                format!(
                    "the command and its environment take {total} bytes, more than exec takes \
                     (a quarter of the stack size limit, `ulimit -s`); pass large values in files"
                )
            };
            io::Error::new(err.kind(), format!("{message} ({err})"))
        }

        fn new(child: &Child<'_>) -> io::Result<(Plan, (OwnedFd, OwnedFd))> {
            let nul = |what: &str| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{what} contains a NUL byte"),
                )
            };
            let mut env: std::collections::BTreeMap<OsString, OsString> =
                std::env::vars_os().collect();
            for (key, value) in child.env {
                env.insert((*key).to_owned(), (*value).to_owned());
            }
            let Some(program) = child.argv.first() else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "the task has no command to run",
                ));
            };
            let files = super::candidates(
                Path::new(program),
                env.get(OsStr::new("PATH")).map(OsString::as_os_str),
            );
            let mut strings = Vec::with_capacity(files.len() + child.argv.len() + env.len());
            let mut list =
                |items: &mut dyn Iterator<Item = Vec<u8>>| -> Option<Vec<*const c_char>> {
                    let mut pointers = Vec::new();
                    for item in items {
                        let item = CString::new(item).ok()?;
                        pointers.push(item.as_ptr());
                        // Moving a CString moves the pointer to its heap buffer, not the buffer.
                        strings.push(item);
                    }
                    pointers.push(std::ptr::null());
                    Some(pointers)
                };
            // execvp: an empty name is not found, whatever PATH holds.
            let files = if program.is_empty() {
                vec![std::ptr::null()]
            } else {
                list(&mut files.iter().map(|f| f.as_os_str().as_bytes().to_vec()))
                    .ok_or_else(|| nul("the program's path"))?
            };
            let argv = list(&mut child.argv.iter().map(|a| a.as_bytes().to_vec()))
                .ok_or_else(|| nul("the command"))?;
            // The second slot (the script's path) is filled in by the child; "/bin/sh" stands in.
            let script_argv = list(
                &mut [b"/bin/sh".to_vec(), b"/bin/sh".to_vec()]
                    .into_iter()
                    .chain(child.argv.iter().skip(1).map(|a| a.as_bytes().to_vec())),
            )
            .ok_or_else(|| nul("the command"))?;
            let envp = list(&mut env.iter().map(|(k, v)| {
                let mut kv = k.as_bytes().to_vec();
                kv.push(b'=');
                kv.extend_from_slice(v.as_bytes());
                kv
            }))
            .ok_or_else(|| nul("an environment variable"))?;
            let dir = CString::new(child.dir.as_os_str().as_bytes())
                .map_err(|_| nul("the working directory"))?;
            let report = crate::output::cloexec_pipe()?;
            let plan = Plan {
                files,
                argv,
                script_argv: std::cell::UnsafeCell::new(script_argv),
                envp,
                dir,
                fds: [
                    child.stdin.as_raw_fd(),
                    child.stdout.as_raw_fd(),
                    child.stderr.as_raw_fd(),
                ],
                report: report.1.as_raw_fd(),
                parent: nix::unistd::getpid().as_raw(),
                _strings: strings,
            };
            Ok((plan, report))
        }
    }

    /// The child, between clone and exec: it shares the parent's memory (and its thread's
    /// thread-local storage), so it only reads `plan` and makes system calls; no allocation, no
    /// lock, no panic. It ends in the exec or in `_exit(127)` after writing the error number.
    extern "C" fn start(plan: *mut c_void) -> c_int {
        /// Hands the step that failed and its error number to the parent, and exits.
        unsafe fn fail(plan: &Plan, step: i32) -> ! {
            // SAFETY: errno is this thread's; write and _exit are plain system calls.
            unsafe {
                let [s0, s1, s2, s3] = step.to_ne_bytes();
                let [e0, e1, e2, e3] = (*libc::__errno_location()).to_ne_bytes();
                let bytes = [s0, s1, s2, s3, e0, e1, e2, e3];
                libc::write(plan.report, bytes.as_ptr().cast(), bytes.len());
                libc::_exit(127)
            }
        }
        // SAFETY: `spawn` passes a `Plan` that outlives this child's use of it (see there); every
        // pointer list in it is null-terminated and points into its own C strings, and every call
        // below is an async-signal-safe system call wrapper.
        unsafe {
            let plan = &*plan.cast::<Plan>();
            // Every signal stays blocked until just before the exec: no handler of release-tasks
            // may ever run here.
            if libc::setpgid(0, 0) != 0 {
                fail(plan, STEP_GROUP);
            }
            // Out of release-tasks's group, nothing more is aimed at this process until it is the
            // task: whatever is pending was meant for release-tasks's group (a terminal's Ctrl-Z or
            // Ctrl-C), which release-tasks handles itself. Ignoring a signal discards it, blocked or
            // not; a pending SIGTSTP would otherwise stop the task in a group that the SIGCONT to
            // release-tasks's group never reaches, with release-tasks waiting here for ever.
            // Only what is pending needs it: out of the group, no more can come.
            let mut pending: u64 = 0;
            libc::syscall(libc::SYS_rt_sigpending, &raw mut pending, 8usize);
            super::set_dispositions(libc::SIG_IGN, pending);
            super::reset_dispositions();
            // Release-tasks keeps descriptors 0 to 2 open (Rust's runtime opens /dev/null on any
            // that are closed), so none of these sources is a target another dup2 overwrites first.
            for (target, &source) in plan.fds.iter().enumerate() {
                if libc::dup2(source, target as c_int) < 0 {
                    fail(plan, STEP_STDIO);
                }
            }
            if libc::chdir(plan.dir.as_ptr()) != 0 {
                fail(plan, STEP_DIR);
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                fail(plan, STEP_DEATHSIG);
            }
            // Release-tasks may have died before the prctl; then no signal would ever come.
            if libc::getppid() != plan.parent {
                libc::_exit(137);
            }
            let empty: u64 = 0;
            libc::syscall(
                libc::SYS_rt_sigprocmask,
                libc::SIG_SETMASK,
                &raw const empty,
                std::ptr::null_mut::<u64>(),
                8usize,
            );
            // glibc's execvp search: a missing file or directory, or one without permission (or on
            // a stale or absent file system), moves on to the next PATH entry (EACCES is
            // remembered); any other error ends the search. A file without a `#!` line (ENOEXEC)
            // is run by /bin/sh, as execvp runs it.
            let mut denied = false;
            let mut file = plan.files.as_ptr();
            while !(*file).is_null() {
                libc::execve(*file, plan.argv.as_ptr(), plan.envp.as_ptr());
                if *libc::__errno_location() == libc::ENOEXEC {
                    let script = (*plan.script_argv.get()).as_mut_ptr();
                    script.add(1).write(*file);
                    libc::execve(*script, script, plan.envp.as_ptr());
                    // The file's own error is the one to report, not the shell's.
                    *libc::__errno_location() = libc::ENOEXEC;
                }
                match *libc::__errno_location() {
                    libc::EACCES => denied = true,
                    libc::ENOENT
                    | libc::ENOTDIR
                    | libc::ESTALE
                    | libc::ENODEV
                    | libc::ETIMEDOUT => {}
                    _ => fail(plan, STEP_EXEC),
                }
                file = file.add(1);
            }
            *libc::__errno_location() = if denied { libc::EACCES } else { libc::ENOENT };
            fail(plan, STEP_EXEC)
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// The plan of a child that runs `argv` with `env` added, in `/srv/app/build`, with
        /// /dev/null as its stdin, stdout and stderr; nothing is started.
        fn with_plan<T>(
            argv: &[&str],
            env: &[(&OsStr, &OsStr)],
            then: impl FnOnce(&Child<'_>, &Plan) -> T,
        ) -> T {
            let null: OwnedFd = std::fs::File::open("/dev/null").expect("/dev/null").into();
            let child = Child {
                argv,
                env,
                dir: Path::new("/srv/app/build"),
                stdin: &null,
                stdout: &null,
                stderr: &null,
            };
            let (plan, _report) = Plan::new(&child).expect("a plan");
            then(&child, &plan)
        }

        /// What the user reads and what the caller looks at: the message, the kind, the OS error.
        fn seen(err: &io::Error) -> (String, io::ErrorKind, Option<i32>) {
            (err.to_string(), err.kind(), err.raw_os_error())
        }

        #[test]
        fn an_exec_error_is_the_oss_and_a_set_up_step_says_which_step_failed() {
            with_plan(&["migrate"], &[], |child, plan| {
                let error = |step, errno| seen(&plan.error(child, step, errno));
                // The caller tells a missing program (127) from one it cannot run (126) by these.
                assert_eq!(
                    error(STEP_EXEC, libc::ENOENT),
                    (
                        "No such file or directory (os error 2)".to_owned(),
                        io::ErrorKind::NotFound,
                        Some(libc::ENOENT)
                    )
                );
                assert_eq!(
                    error(STEP_EXEC, libc::EACCES),
                    (
                        "Permission denied (os error 13)".to_owned(),
                        io::ErrorKind::PermissionDenied,
                        Some(libc::EACCES)
                    )
                );
                // A set-up step is not the program's fault: its own words, never the exec's kind.
                let other = |message: &str| (message.to_owned(), io::ErrorKind::Other, None);
                assert_eq!(
                    error(STEP_GROUP, libc::EPERM),
                    other(
                        "cannot give it a process group of its own: Operation not permitted \
                         (os error 1)"
                    )
                );
                assert_eq!(
                    error(STEP_STDIO, libc::EBADF),
                    other(
                        "cannot connect its stdin, stdout and stderr: Bad file descriptor \
                         (os error 9)"
                    )
                );
                assert_eq!(
                    error(STEP_DIR, libc::ENOENT),
                    other(
                        "cannot enter its working directory /srv/app/build (was it removed or \
                         renamed by an earlier task?): No such file or directory (os error 2)"
                    )
                );
                assert_eq!(
                    error(STEP_DEATHSIG, libc::EINVAL),
                    other(
                        "cannot make it die with release-tasks (PR_SET_PDEATHSIG): Invalid \
                         argument (os error 22)"
                    )
                );
                assert_eq!(
                    error(99, libc::EIO),
                    other("cannot prepare its process: Input/output error (os error 5)")
                );
                // E2BIG is explained; the same number from a set-up step is not.
                assert!(
                    error(STEP_EXEC, libc::E2BIG)
                        .0
                        .starts_with("the command and")
                );
                assert_eq!(
                    error(STEP_GROUP, libc::E2BIG).0,
                    "cannot give it a process group of its own: Argument list too long \
                     (os error 7)"
                );
            });
        }

        /// A task's variable.
        fn var<'a>(name: &'a str, value: &'a str) -> (&'a OsStr, &'a OsStr) {
            (OsStr::new(name), OsStr::new(value))
        }

        /// The E2BIG error of a plan for `argv` and `env`.
        fn too_big(argv: &[&str], env: &[(&OsStr, &OsStr)]) -> (String, io::ErrorKind) {
            with_plan(argv, env, |child, plan| {
                let err = plan.error(child, STEP_EXEC, libc::E2BIG);
                (err.to_string(), err.kind())
            })
        }

        fn one_too_long(what: &str) -> (String, io::ErrorKind) {
            (
                format!(
                    "{what}, and exec takes at most 128 KiB (131072 bytes) in any one argument \
                     or variable; pass it in a file instead (Argument list too long (os error 7))"
                ),
                io::ErrorKind::ArgumentListTooLong,
            )
        }

        #[test]
        fn an_argument_list_too_long_names_the_longest_argument_or_variable() {
            let big = "x".repeat(200_000);
            let bigger = "y".repeat(200_001);
            assert_eq!(
                too_big(&["printf", "%s", &big], &[]),
                one_too_long("argument 2 of the command is 200000 bytes")
            );
            assert_eq!(
                too_big(&["true"], &[var("RT_TEST_HUGE", &big)]),
                one_too_long("the value of environment variable RT_TEST_HUGE is 200000 bytes")
            );
            // Both too long: the longer string is named, whichever it is (a variable's is
            // `NAME=VALUE`, 13 bytes more than its value here).
            let longer = "z".repeat(200_014);
            assert_eq!(
                too_big(&["printf", &longer], &[var("RT_TEST_HUGE", &big)]),
                one_too_long("argument 1 of the command is 200014 bytes")
            );
            assert_eq!(
                too_big(&["printf", &big], &[var("RT_TEST_HUGE", &bigger)]),
                one_too_long("the value of environment variable RT_TEST_HUGE is 200001 bytes")
            );
            // One byte over the limit, with its NUL: named.
            assert_eq!(
                too_big(&["printf", &"z".repeat(131_072)], &[]),
                one_too_long("argument 1 of the command is 131072 bytes")
            );
        }

        #[test]
        fn an_argument_list_too_long_in_all_says_how_large_it_is() {
            // Exactly at the limit with its NUL: not the one to blame, the whole is.
            let edge = "e".repeat(131_071);
            let argv = ["printf", "%s", edge.as_str()];
            let env = [(OsStr::new("RT_TEST_VAR"), OsStr::new("value"))];
            // Each string and its NUL: the arguments, then every variable of this process's
            // environment and the task's, as NAME=VALUE.
            let mut total: usize = argv.iter().map(|a| a.len() + 1).sum();
            total += std::env::vars_os()
                .filter(|(name, _)| name != "RT_TEST_VAR")
                .map(|(name, value)| name.len() + 1 + value.len() + 1)
                .sum::<usize>();
            total += "RT_TEST_VAR=value".len() + 1;
            assert_eq!(
                too_big(&argv, &env),
                (
                    format!(
                        "the command and its environment take {total} bytes, more than exec \
                         takes (a quarter of the stack size limit, `ulimit -s`); pass large \
                         values in files (Argument list too long (os error 7))"
                    ),
                    io::ErrorKind::ArgumentListTooLong
                )
            );
        }

        #[test]
        fn a_clone_that_fails_says_why_no_process_could_be_made() {
            let error = |errno| seen(&cannot_clone(&io::Error::from_raw_os_error(errno)));
            assert_eq!(
                error(libc::EAGAIN),
                (
                    "cannot start a process, the limit on processes was reached (the container's \
                     pids limit or `ulimit -u`): Resource temporarily unavailable (os error 11)"
                        .to_owned(),
                    io::ErrorKind::WouldBlock,
                    None
                )
            );
            assert_eq!(
                error(libc::ENOMEM),
                (
                    "cannot start a process, out of memory: Cannot allocate memory (os error 12)"
                        .to_owned(),
                    io::ErrorKind::OutOfMemory,
                    None
                )
            );
            assert_eq!(
                error(libc::EINVAL),
                (
                    "cannot start a process: Invalid argument (os error 22)".to_owned(),
                    io::ErrorKind::InvalidInput,
                    None
                )
            );
        }

        #[test]
        fn the_childs_report_is_read_until_full_or_the_pipes_end() {
            let (read, write) = nix::unistd::pipe().expect("pipe");
            assert_eq!(nix::unistd::write(&write, b"0123"), Ok(4));
            assert_eq!(nix::unistd::write(&write, b"456789"), Ok(6));
            // Closed first, so that a reader that loses count ends instead of waiting.
            drop(write);
            let mut buf = [0u8; 8];
            assert_eq!(read_full(&read, &mut buf), 8);
            assert_eq!(&buf, b"01234567");
            // What is left, then the end of the pipe: short.
            let mut buf = [0u8; 8];
            assert_eq!(read_full(&read, &mut buf), 2);
            assert_eq!(&buf[..2], b"89");
            assert_eq!(read_full(&read, &mut buf), 0);
        }
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
        // An empty entry, or an empty PATH, is the working directory.
        assert_eq!(
            candidates(Path::new("puma"), Some(OsStr::new(""))),
            [PathBuf::from("./puma")]
        );
        assert_eq!(
            candidates(Path::new("bin/web"), Some(OsStr::new("/a"))),
            [PathBuf::from("bin/web")]
        );
    }

    #[test]
    fn without_a_path_the_shells_default_search_path_is_used() {
        assert_eq!(
            candidates(Path::new("x"), None),
            ["/usr/local/bin/x", "/usr/bin/x", "/bin/x"].map(PathBuf::from)
        );
    }

    #[test]
    fn strings_become_c_strings_unless_one_holds_a_nul() {
        let strings = |items: &[&str]| to_cstrings(items.iter().map(OsStr::new));
        assert_eq!(
            strings(&["sh", "-c", ""]),
            Some(vec![c"sh".to_owned(), c"-c".to_owned(), c"".to_owned()])
        );
        assert_eq!(strings(&[]), Some(vec![]));
        assert_eq!(strings(&["a", "b\0c"]), None);
    }
}
