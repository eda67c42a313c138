//! How a task's process is started (`src/spawn.rs`): what the task finds in its process whatever
//! state release-tasks was started in, the `PATH` search, the errors of every set-up step, signals
//! aimed at release-tasks while tasks start, and hundreds of tasks in a row.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::harness::{BIN, Test};

/// Starts `release-tasks ARGS` the way a careless parent would leave it: SIGHUP, SIGINT, SIGUSR1,
/// SIGPIPE, SIGTERM and the C library's own signals 32 to 34 ignored (raw, since the C library
/// refuses to touch 32 and 33), several of them blocked, and every descriptor above 2 closed so that
/// what the tasks find is what release-tasks gave them.
const CARELESS_PARENT: &str = r#"
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
class Action(ctypes.Structure):
    _fields_ = [("handler", ctypes.c_ulong), ("flags", ctypes.c_ulong),
                ("restorer", ctypes.c_ulong), ("mask", ctypes.c_ulong)]
ignore = Action(1, 0, 0, 0)
for sig in [1, 2, 10, 13, 15, 32, 33, 34, 64]:
    assert libc.syscall(13, sig, ctypes.byref(ignore), None, 8) == 0, sig
blocked = ctypes.c_ulong(sum(1 << (sig - 1) for sig in [10, 15, 32, 33, 64]))
assert libc.syscall(14, 0, ctypes.byref(blocked), None, 8) == 0
os.closerange(3, 65536)
os.execv(sys.argv[1], sys.argv[1:])
"#;

/// Prints what a task finds about its own process, one `key value` line each.
const FACTS: &str = r"
import ctypes, os
libc = ctypes.CDLL(None)
deathsig = ctypes.c_int()
libc.prctl(2, ctypes.byref(deathsig))  # PR_GET_PDEATHSIG
def is_open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False
print('deathsig', deathsig.value)
print('own-group', os.getpgid(0) == os.getpid())
print('same-session', os.getsid(0) == os.getsid(os.getppid()))
print('extra-fds', [fd for fd in range(3, 1024) if is_open(fd)])
print('stdin', os.readlink('/proc/self/fd/0'))
print('stdout', os.readlink('/proc/self/fd/1').split('[')[0])
print('stderr', os.readlink('/proc/self/fd/2').split('[')[0])
print('cwd', os.getcwd())
print('pwd', os.environ.get('PWD'))
print('run-id', 'RELEASE_TASKS_RUN_ID' in os.environ)
print('own-var', os.environ.get('OWN'))
";

fn toml_string(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

#[test]
fn a_task_gets_a_clean_process_whatever_state_release_tasks_was_started_in() {
    let t = Test::new().config(&format!(
        "[tasks.signals]\nrun = [\"cat\", \"/proc/self/status\"]\n\
         [tasks.facts]\nrun = [\"python3\", \"-c\", {}]\ndir = \"sub\"\nenv = {{ OWN = \"mine\" }}\n",
        toml_string(FACTS)
    ));
    std::fs::create_dir(t.path("sub")).expect("mkdir");
    let out = Command::new("python3")
        .args(["-c", CARELESS_PARENT, BIN])
        .current_dir(t.dir.path())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The tasks' own lines, without the task name and its padding.
    let said = |task: &str| -> Vec<&str> {
        stdout
            .lines()
            .filter_map(|l| l.split_once(" | "))
            .filter(|(name, _)| name.trim_end() == task)
            .map(|(_, line)| line)
            .collect()
    };
    // Every signal at its default, none blocked, none caught (cat installs no handler).
    for field in ["SigBlk", "SigIgn", "SigCgt"] {
        let line = said("signals")
            .into_iter()
            .find(|l| l.starts_with(&format!("{field}:")))
            .unwrap_or_else(|| panic!("no {field} in:\n{stdout}"));
        assert!(
            line.ends_with("\t0000000000000000"),
            "the task inherited a signal state: {line}"
        );
    }
    let sub = std::fs::canonicalize(t.path("sub")).expect("canonical path");
    let sub = sub.to_str().expect("utf-8 temp path");
    for fact in [
        "deathsig 9".to_owned(),
        "own-group True".to_owned(),
        "same-session True".to_owned(),
        "extra-fds []".to_owned(),
        "stdin /dev/null".to_owned(),
        "stdout pipe:".to_owned(),
        "stderr pipe:".to_owned(),
        format!("cwd {sub}"),
        format!("pwd {sub}"),
        "run-id True".to_owned(),
        "own-var mine".to_owned(),
    ] {
        assert!(
            said("facts").contains(&fact.as_str()),
            "the task lacks {fact:?}:\n{stdout}"
        );
    }
}

#[test]
fn the_program_is_looked_up_on_the_tasks_path_as_execvp_does() {
    let t = Test::new();
    let dir = t.dir.path().to_str().expect("utf-8 temp path").to_owned();
    for sub in ["first", "denied", "good", "decoy", "sub", "scripts"] {
        std::fs::create_dir(t.path(sub)).expect("mkdir");
    }
    // A directory named like the program, then a file without permission to run it, a path through
    // a file (ENOTDIR), a missing directory and an empty entry (the task's directory) come first.
    std::fs::create_dir(t.path("first/prog")).expect("mkdir");
    let t = t
        .file("denied/prog", "#!/bin/sh\necho denied\n")
        .file("good/prog", "#!/bin/sh\necho good \"$@\"\n")
        .file("decoy/prog", "#!/bin/sh\necho decoy\n")
        .file("afile", "")
        .file("sub/here", "#!/bin/sh\necho here\n")
        .file("scripts/noshebang", "echo no shebang line \"$@\"\n")
        .file("denied/noshebang", "echo denied\n");
    chmod(&t.path("denied/prog"), 0o644);
    chmod(&t.path("denied/noshebang"), 0o644);
    for file in ["good/prog", "decoy/prog", "sub/here", "scripts/noshebang"] {
        chmod(&t.path(file), 0o755);
    }
    let system = std::env::var("PATH").unwrap_or_default();
    let path = format!(
        "{dir}/first:{dir}/denied:{dir}/afile/bin:{dir}/missing::{dir}/good:{dir}/scripts:{system}"
    );
    let t = t
        .config(&format!(
            "[tasks.search]\nrun = \"prog one\"\nenv = {{ PATH = {path} }}\n\
             [tasks.script]\nrun = \"noshebang two\"\nenv = {{ PATH = {path} }}\n\
             [tasks.empty_entry]\nrun = \"here\"\ndir = \"sub\"\nenv = {{ PATH = {} }}\n\
             [tasks.only_denied]\nrun = \"prog\"\nenv = {{ PATH = {} }}\nallow_failure = true\n",
            toml_string(&format!(":{system}")),
            toml_string(&format!("{dir}/missing:{dir}/denied:{dir}/afile/bin")),
            path = toml_string(&path),
        ))
        // release-tasks's own PATH finds another `prog`: the task's PATH is the one searched.
        .env("PATH", &format!("{dir}/decoy:{system}"));
    let out = t.run();
    out.status(0)
        .stdout_has("search      | good one\n")
        .stdout_has("script      | no shebang line two\n")
        .stdout_has("empty_entry | here\n")
        .stdout_lacks("decoy")
        .stdout_lacks("denied")
        // Only a file without permission on PATH: what `sh -c prog` says and exits with (dash: 127).
        .stderr_has("only_denied | /bin/sh: 1: prog: Permission denied");
    assert!(
        out.stderr
            .contains("task=only_denied outcome=failed exit_code=127"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_working_directory_removed_by_an_earlier_task_is_named_not_called_a_missing_program() {
    let t = Test::new().config(
        "[tasks.cleanup]\nrun = \"rm -r build\"\n\
         [tasks.direct]\nrun = \"ls\"\ndir = \"build\"\nallow_failure = true\n\
         [tasks.shell]\nrun = \"ls | cat\"\ndir = \"build\"\n",
    );
    std::fs::create_dir(t.path("build")).expect("mkdir");
    let out = t.run();
    out.status(126)
        .stderr_has("cannot start the task: cannot enter its working directory")
        .stderr_has("build")
        .stderr_lacks("command not found")
        .stderr_lacks("/bin/sh");
    assert_eq!(
        out.stderr.matches("working directory").count(),
        // Each task's line and its summary line.
        4,
        "{}",
        out.stderr
    );
}

#[test]
fn an_exec_error_of_the_os_names_the_program_and_the_error() {
    // A path longer than the kernel takes (ENAMETOOLONG): the OS's words, about the program.
    let program = format!("/{}", "a".repeat(5000));
    Test::new()
        .config(&format!("[tasks.long]\nrun = [\"{program}\"]\n"))
        .run()
        .status(126)
        .stderr_has("could not start: cannot run `/aaaa")
        .stderr_has("File name too long")
        .stderr_lacks("cannot start the task");
}

#[test]
fn an_argument_list_too_long_for_exec_is_a_clear_error_not_a_hang() {
    let big = "x".repeat(200_000);
    let t = Test::new().config(&format!(
        "[tasks.variable]\nrun = \"true\"\nenv = {{ HUGE = \"{big}\" }}\nallow_failure = true\n\
         [tasks.argument]\nrun = [\"printf\", \"%s\", \"{big}\"]\nallow_failure = true\n\
         [tasks.edge]\nrun = \"true\"\nenv = {{ EDGE = \"{edge}\" }}\nallow_failure = true\n\
         [tasks.fine]\nrun = \"echo still running tasks\"\n",
        // With `EDGE=` and the final NUL: one byte over the limit.
        edge = "e".repeat(131_067),
    ));
    let out = t.run();
    out.status(0)
        .stderr_has("the value of environment variable HUGE is 200000 bytes")
        .stderr_has("argument 2 of the command is 200000 bytes")
        .stderr_has("the value of environment variable EDGE is 131067 bytes")
        .stderr_has("128 KiB")
        .stdout_has("fine     | still running tasks");
    assert!(out.elapsed < Duration::from_secs(20), "{:?}", out.elapsed);

    // Each value under the limit for one, all of them together over the limit for the whole (a
    // quarter of the stack size limit: 2 MiB under the usual 8 MiB).
    let value = "y".repeat(100_000);
    let mut vars: Vec<String> = (0..8).map(|i| format!("CONF{i} = \"{value}\"")).collect();
    // Exactly at the limit for one string (`EDGE=`, the value and the NUL): not the one to blame.
    vars.push(format!("EDGE = \"{}\"", "e".repeat(131_066)));
    let mut t = Test::new().config(&format!(
        "[tasks.t]\nrun = \"true\"\nenv = {{ {} }}\n",
        vars.join(", ")
    ));
    for i in 0..15 {
        t = t.env(&format!("INHERITED{i}"), &value);
    }
    let out = Command::new("sh")
        .args(["-c", "ulimit -s 8192 && exec \"$0\"", BIN])
        .current_dir(t.dir.path())
        .envs((0..15).map(|i| (format!("INHERITED{i}"), value.clone())))
        .output()
        .expect("sh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(126), "{stderr}");
    assert!(
        stderr.contains("the command and its environment take")
            && stderr.contains("ulimit -s")
            && !stderr.contains("128 KiB"),
        "{stderr}"
    );
}

/// `n` tasks that each run `run`, in file order.
fn many_tasks(n: usize, run: &str) -> String {
    (0..n)
        .map(|i| format!("[tasks.t{i:03}]\nrun = {run}\n"))
        .collect::<Vec<_>>()
        .concat()
}

/// The pids of live processes whose environment holds `marker` (as `KEY=VALUE`).
fn processes_marked(marker: &str) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.starts_with(" Z"))
        {
            continue;
        }
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if environ.split(|&b| b == 0).any(|kv| kv == marker.as_bytes()) {
            found.push(pid);
        }
    }
    found
}

/// Sends `sig` to `pid` every half millisecond until it is gone (or for `limit`).
fn storm(pid: i32, sig: Signal, limit: Duration) {
    let until = Instant::now() + limit;
    while Instant::now() < until && kill(Pid::from_raw(pid), sig).is_ok() {
        std::thread::sleep(Duration::from_micros(500));
    }
}

#[test]
fn a_storm_of_stop_signals_while_tasks_start_ends_the_release_and_every_task() {
    for (sig, code) in [(Signal::SIGTERM, 143), (Signal::SIGINT, 130)] {
        let marker = format!("SPAWN_STORM={}-{sig}", std::process::id());
        let (key, value) = marker.split_once('=').expect("a marker is KEY=VALUE");
        let t = Test::new()
            .config(&many_tasks(200, "[\"sleep\", \"0.01\"]"))
            .env(key, value);
        let running = t.spawn();
        running.wait_for("task started task=t002", Duration::from_secs(20));
        let pid = running.pid();
        let stormer = std::thread::spawn(move || storm(pid, sig, Duration::from_secs(30)));
        let out = running.wait();
        stormer.join().expect("the storm thread");
        out.status(code);
        assert!(out.elapsed < Duration::from_secs(20), "{:?}", out.elapsed);
        assert!(
            !out.stderr.contains("task started task=t199"),
            "{sig}: the release went on to its last task"
        );
        let until = Instant::now() + Duration::from_secs(5);
        while !processes_marked(&marker).is_empty() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(
            processes_marked(&marker),
            Vec::<i32>::new(),
            "{sig}: processes of the release outlived it"
        );
    }
}

#[test]
fn a_storm_of_harmless_signals_while_tasks_start_changes_nothing() {
    for sig in [Signal::SIGCHLD, Signal::SIGWINCH, Signal::SIGURG] {
        let t = Test::new().config(&many_tasks(200, "[\"true\"]"));
        let running = t.spawn();
        running.wait_for("task started task=t001", Duration::from_secs(20));
        let pid = running.pid();
        let stormer = std::thread::spawn(move || storm(pid, sig, Duration::from_secs(40)));
        let out = running.wait();
        stormer.join().expect("the storm thread");
        out.status(0);
        assert_eq!(
            out.stderr.matches("outcome=succeeded").count(),
            2 * 200,
            "{sig}: not every task ran to success (a line in the run, one in the summary)"
        );
    }
}

/// What release-tasks (the task's parent) holds, as seen from a task: its descriptors, its zombie
/// children and its resident memory in KiB, on one line.
const PROBE: &str = r"
import os
parent = os.getppid()
zombies = 0
for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
        stat = open('/proc/%s/stat' % pid).read().rsplit(')', 1)[1].split()
    except OSError:
        continue
    if stat[0] == 'Z' and int(stat[1]) == parent:
        zombies += 1
rss = [l.split()[1] for l in open('/proc/%d/status' % parent) if l.startswith('VmRSS:')][0]
print(len(os.listdir('/proc/%d/fd' % parent)), zombies, rss)
";

/// The numbers a task that runs [`PROBE`] printed, in release-tasks's `stdout`.
fn probe_line(stdout: &str, task: &str) -> Vec<u64> {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix(task))
        .unwrap_or_else(|| panic!("no {task} line in:\n{stdout}"));
    line.trim_start_matches([' ', '|'])
        .split_whitespace()
        .map(|n| n.parse().expect("a number"))
        .collect()
}

#[test]
fn hundreds_of_tasks_leave_no_descriptor_zombie_or_memory_behind() {
    let probe = format!("[\"python3\", \"-c\", {}]", toml_string(PROBE));
    let config = format!(
        "[tasks.a_first]\nrun = {probe}\n{}[tasks.z_last]\nrun = {probe}\n",
        many_tasks(300, "[\"true\"]")
    );
    let out = Test::new().config(&config).run();
    out.status(0);
    let stdout = out.stdout();
    let first = probe_line(&stdout, "a_first");
    let last = probe_line(&stdout, "z_last");
    assert_eq!(first[0], last[0], "descriptors: {first:?} then {last:?}");
    assert_eq!(
        (first[1], last[1]),
        (0, 0),
        "zombies: {first:?} then {last:?}"
    );
    assert!(
        last[2] < first[2] + 8 * 1024,
        "resident memory grew from {} KiB to {} KiB over 300 tasks",
        first[2],
        last[2]
    );
}

#[test]
fn a_task_that_cannot_start_leaves_no_zombie_behind() {
    // The child that reports a failed set-up step or exec exits there; release-tasks collects it at
    // once (a child made without SIGCHLD as its exit signal could not be, and would stay a zombie).
    let probe = format!("[\"python3\", \"-c\", {}]", toml_string(PROBE));
    let t = Test::new().config(&format!(
        "[tasks.missing]\nrun = [\"no-such-program-release-tasks\"]\nallow_failure = true\n\
         [tasks.cleanup]\nrun = \"rm -r build\"\n\
         [tasks.removed_dir]\nrun = [\"ls\"]\ndir = \"build\"\nallow_failure = true\n\
         [tasks.probe]\nrun = {probe}\n"
    ));
    std::fs::create_dir(t.path("build")).expect("mkdir");
    let out = t.run();
    out.status(0)
        .stderr_has("command not found: `no-such-program-release-tasks`")
        .stderr_has("cannot start the task: cannot enter its working directory");
    let zombies = probe_line(&out.stdout(), "probe")[1];
    assert_eq!(zombies, 0, "{}", out.stderr);
}

#[test]
fn with_its_own_stdin_stdout_and_stderr_closed_release_tasks_still_gives_tasks_three() {
    const WRITER: &str = r"
import os, sys
with open('fds', 'w') as f:
    for fd in range(3):
        f.write('%d %s\n' % (fd, os.readlink('/proc/self/fd/%d' % fd)))
for i in range(2000):
    print('line %d' % i)
    print('error %d' % i, file=sys.stderr)
";
    let t = Test::new().config(&format!(
        "[tasks.writer]\nrun = [\"python3\", \"-c\", {}]\n[tasks.after]\nrun = \"touch after\"\n",
        toml_string(WRITER)
    ));
    let started = Instant::now();
    let status = Command::new("sh")
        .args(["-c", "exec \"$0\" <&- >&- 2>&-", BIN])
        .current_dir(t.dir.path())
        .status()
        .expect("sh");
    assert_eq!(status.code(), Some(0));
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(t.path("after").exists(), "the second task did not run");
    let fds = std::fs::read_to_string(t.path("fds")).expect("the task wrote fds");
    let targets: Vec<&str> = fds
        .lines()
        .map(|l| l.split_once(' ').map_or("", |(_, target)| target))
        .collect();
    assert_eq!(targets[0], "/dev/null", "{fds}");
    assert!(
        targets[1].starts_with("pipe:") && targets[2].starts_with("pipe:"),
        "{fds}"
    );
    assert_ne!(targets[1], targets[2], "{fds}");
}

#[test]
fn no_process_to_be_had_is_a_clear_error_not_a_hang() {
    // A user with no process yet, allowed one: release-tasks itself. Its threads, its guardian and
    // every task's process fail with EAGAIN, as under a container's full pids limit. Root only.
    let tools = ["setpriv", "prlimit"]
        .iter()
        .all(|tool| Command::new(tool).arg("--version").output().is_ok());
    // SAFETY: geteuid only reads.
    if unsafe { nix::libc::geteuid() } != 0 || !tools {
        crate::harness::cannot_run("needs root, setpriv and prlimit");
        return;
    }
    let t = Test::new().config("[tasks.first]\nrun = \"echo never\"\n");
    chmod(t.dir.path(), 0o755);
    chmod(&t.path("release.toml"), 0o644);
    let uid = "54321";
    let started = Instant::now();
    let out = Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            "prlimit",
            "--nproc=1",
            BIN,
        ])
        .current_dir(t.dir.path())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .output()
        .expect("setpriv");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The thread that writes release-tasks's output is the first to be refused: 71 (its own
    // limit), named, before any task.
    assert_eq!(out.status.code(), Some(71), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(
        stderr.contains(
            "cannot start a thread for release-tasks's output: the limit on processes was reached"
        ),
        "{stderr}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("never"));
}

#[test]
fn a_missing_dev_null_is_named_not_called_a_missing_program() {
    // A mount namespace whose /dev is empty, as in a bare chroot. Root only (unshare, mount).
    let t = Test::new().config("[tasks.t]\nrun = [\"echo\", \"never\"]\n");
    let out = Command::new("unshare")
        .args([
            "--mount",
            "sh",
            "-c",
            "mount -t tmpfs none /dev 2>/dev/null || exit 99; exec \"$0\"",
            BIN,
        ])
        .current_dir(t.dir.path())
        .stdin(Stdio::null())
        .output()
        .expect("sh");
    if out.status.code() == Some(99) || out.stderr.starts_with(b"unshare:") {
        crate::harness::cannot_run("cannot mount an empty /dev here");
        return;
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(126), "{stderr}");
    assert!(
        stderr.contains("cannot open /dev/null as stdin for its process"),
        "{stderr}"
    );
    assert!(!stderr.contains("command not found"), "{stderr}");
}

#[test]
fn job_control_signals_to_release_tasks_group_while_tasks_start_never_stop_a_task_for_good() {
    // Ctrl-Z and `fg` in a terminal: SIGTSTP then SIGCONT to release-tasks's process group. A
    // SIGTSTP that reaches a task's process before it leaves that group must not stop it later in
    // its own group, which the SIGCONT never reaches (release-tasks would wait for it forever).
    // Three releases of 200 tasks: each spawn is a window of a few microseconds.
    for _ in 0..3 {
        job_control_storm();
    }
}

fn job_control_storm() {
    use std::os::unix::process::CommandExt;
    let t = Test::new().config(&many_tasks(200, "[\"true\"]"));
    let mut child = Command::new(BIN)
        .current_dir(t.dir.path())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(t.path("stderr")).expect("stderr file"))
        .process_group(0)
        .spawn()
        .expect("spawn release-tasks");
    let group = Pid::from_raw(child.id() as i32);
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break Some(status);
        }
        if started.elapsed() > Duration::from_secs(40) {
            break None;
        }
        let _ = nix::sys::signal::killpg(group, Signal::SIGTSTP);
        std::thread::sleep(Duration::from_micros(300));
        let _ = nix::sys::signal::killpg(group, Signal::SIGCONT);
        std::thread::sleep(Duration::from_micros(300));
    };
    let Some(status) = status else {
        // What is stopped: release-tasks's children that are not in its group.
        let stopped = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let fields: Vec<&str> = stat
                    .rsplit_once(')')
                    .map_or("", |(_, rest)| rest)
                    .split_whitespace()
                    .collect();
                fields.first() == Some(&"T") && fields.get(1) == Some(&group.to_string().as_str())
            })
            .collect::<Vec<_>>();
        let _ = nix::sys::signal::killpg(group, Signal::SIGKILL);
        for pid in &stopped {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
        let _ = child.wait();
        panic!("release-tasks hung; its stopped children: {stopped:?}");
    };
    let _ = nix::sys::signal::killpg(group, Signal::SIGCONT);
    let stderr = std::fs::read_to_string(t.path("stderr")).expect("stderr file");
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert_eq!(
        stderr.matches("outcome=succeeded").count(),
        2 * 200,
        "{stderr}"
    );
}
