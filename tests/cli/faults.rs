//! Under faults: signals to release-tasks, release-tasks killed, escaped and daemonized processes, PID 1,
//! heartbeats, the release timeout, output under stress, hostile config.

use std::process::Command;
use std::time::Duration;

use crate::harness::{Test, alive, gone_within, none_left_in, read_pid};

/// A task that reports the signal it gets, then exits with 128+N as a well-behaved program does.
const TRAPPING: &str = r#"
[defaults]
grace = "5s"
[tasks.migrate]
run = """
for s in TERM INT HUP QUIT; do trap "echo got $s; exit 7" $s; done
trap 'echo got USR1' USR1
echo $$ > pid
echo ready
while true; do sleep 0.05; done
"""
[tasks.after]
run = "touch after"
"#;

fn forwarded(sig: &str, code: i32) {
    let t = Test::new().config(TRAPPING);
    let running = t.spawn_until("migrate | ready");
    running.signal(sig);
    let out = running.wait();
    out.status(code)
        .stdout_has(&format!("migrate | got {sig}"))
        .stderr_has("forwarding it to the task's process group")
        .stderr_has("summary")
        .stderr_has("task=after outcome=not-run")
        .stderr_has("release failed");
    assert!(!t.path("after").exists(), "no task starts after {sig}");
}

#[test]
fn sigterm_is_forwarded_and_the_release_exits_143() {
    forwarded("TERM", 143);
}

#[test]
fn sigint_is_forwarded_and_the_release_exits_130() {
    forwarded("INT", 130);
}

#[test]
fn sighup_and_sigquit_are_forwarded() {
    forwarded("HUP", 129);
    forwarded("QUIT", 131);
}

#[test]
fn sigusr1_is_forwarded_and_changes_nothing_else() {
    let t = Test::new().config(
        r#"
[tasks.a]
run = "trap 'echo got USR1; touch usr1' USR1; echo ready; while [ ! -e usr1 ]; do sleep 0.05; done; true"
[tasks.b]
run = "touch b"
"#,
    );
    let running = t.spawn_until("a | ready");
    running.signal("USR1");
    running.wait().status(0).stdout_has("a | got USR1");
    assert!(t.path("b").exists());
}

#[test]
fn a_second_sigint_kills_at_once() {
    let t = Test::new().config(
        r#"
[tasks.stubborn]
run = "trap 'echo ignoring INT' INT; echo ready; while true; do sleep 0.05; done"
grace = "50s"
"#,
    );
    let running = t.spawn_until("stubborn | ready");
    running.signal("INT");
    running.wait_for("ignoring INT", Duration::from_secs(10));
    running.signal("INT");
    let out = running.wait();
    out.status(130).stderr_has("second stopping signal");
    assert!(
        out.elapsed < Duration::from_secs(30),
        "waited for the grace period: {:?}",
        out.elapsed
    );
}

#[test]
fn a_task_that_ignores_the_forwarded_signal_gets_sigkill_after_grace() {
    let t = Test::new().config(
        r#"
[tasks.deaf]
run = "trap '' TERM; echo $$ > pid; echo ready; while true; do sleep 0.05; done"
grace = "1s"
"#,
    );
    let running = t.spawn_until("deaf | ready");
    running.signal("TERM");
    let out = running.wait();
    out.status(143).stderr_has("sending SIGKILL");
    assert!(!alive(read_pid(&t.path("pid"))));
}

#[test]
fn tasks_start_with_default_signal_dispositions_and_an_empty_mask() {
    // release-tasks started with SIGINT ignored and SIGTERM blocked (as nohup or a careless parent
    // would): the task must still see both at their defaults.
    let t = Test::new().config("[tasks.a]\nrun = \"grep -E '^Sig(Blk|Ign)' /proc/self/status\"\n");
    let script = format!(
        "trap '' INT; exec python3 -c 'import os,signal; signal.pthread_sigmask(signal.SIG_BLOCK,[signal.SIGTERM]); os.execv(\"{}\", [\"release-tasks\"])'",
        crate::harness::BIN
    );
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(t.dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    for line in stdout.lines() {
        let mask = u64::from_str_radix(line.rsplit(['\t', ' ']).next().unwrap(), 16).unwrap();
        // Signals 32 and 33 belong to the C library's threads implementation, not to programs.
        let libc_internal = (1u64 << 31) | (1u64 << 32);
        assert_eq!(
            mask & !libc_internal,
            0,
            "task inherited a signal mask or ignore set: {line}"
        );
    }
}

#[test]
fn a_signal_at_any_moment_stops_the_release() {
    // Before the first task, while it is being spawned, while it runs: the signal is never lost, no
    // further task starts, and nothing is left running.
    for delay_ms in [0, 1, 3, 10, 30, 100] {
        let t = Test::new().config(
            "[tasks.first]\nrun = \"sleep 5\"\ngrace = \"1s\"\n[tasks.second]\nrun = \"touch second\"\n",
        );
        let running = t.spawn();
        std::thread::sleep(Duration::from_millis(delay_ms));
        running.signal("TERM");
        let out = running.wait();
        out.status(143);
        assert!(
            out.elapsed < Duration::from_secs(4),
            "after {delay_ms} ms: took {:?}",
            out.elapsed
        );
        assert!(
            !t.path("second").exists(),
            "after {delay_ms} ms: the second task started"
        );
        // Whether or not the task got as far as writing its pid: nothing of it runs on.
        assert!(
            none_left_in(t.dir.path(), Duration::from_secs(5)),
            "after {delay_ms} ms: the task survived"
        );
    }
}

#[test]
fn an_unreadable_config_is_a_clear_error() {
    // Root reads any file, so the check runs as `nobody` when the tests run as root.
    let uid = Command::new("id").arg("-u").output().unwrap().stdout;
    if uid != b"0\n" {
        crate::harness::cannot_run("needs root to run release-tasks as another user");
        return;
    }
    let t = Test::new().config("[tasks.a]\nrun = \"true\"\n");
    let dir = t.dir.path();
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        t.path("release.toml"),
        std::os::unix::fs::PermissionsExt::from_mode(0o000),
    )
    .unwrap();
    let out = Command::new("runuser")
        .args(["-u", "nobody", "--", crate::harness::BIN, "check"])
        .current_dir(dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("cannot read config file release.toml"),
        "{stderr}"
    );
    assert!(stderr.contains("check its permissions"), "{stderr}");
}

#[test]
fn release_tasks_killed_leaves_no_task_process_behind() {
    let t = Test::new().config(
        r#"
[tasks.migrate]
run = """
sleep 300 & echo $! > child
sh -c 'sleep 301 & echo $! > grandchild; wait' &
setsid sh -c 'echo $$ > daemon; exec sleep 302' </dev/null >/dev/null 2>&1 &
while [ ! -s daemon ]; do sleep 0.01; done
echo ready
wait
"""
"#,
    );
    let running = t.spawn_until("migrate | ready");
    let child = read_pid(&t.path("child"));
    let grandchild = read_pid(&t.path("grandchild"));
    let daemon = read_pid(&t.path("daemon"));
    running.signal("KILL");
    running.wait().status(137);
    assert!(
        gone_within(child, Duration::from_secs(10)),
        "child {child} outlived release-tasks"
    );
    assert!(
        gone_within(daemon, Duration::from_secs(10)),
        "the setsid daemon {daemon} outlived release-tasks"
    );
    assert!(
        gone_within(grandchild, Duration::from_secs(10)),
        "grandchild {grandchild} outlived release-tasks"
    );
}

#[test]
fn a_prompt_without_a_newline_is_visible_while_its_task_waits() {
    let t = Test::new().config(
        "[tasks.ask]\nrun = \"printf 'Continue? [y/N] '; sleep 300\"\ntimeout = \"30s\"\ngrace = \"1s\"\n",
    );
    let running = t.spawn_until("ask | Continue? [y/N] ");
    running.signal("TERM");
    running.wait().status(143);
}

#[test]
fn a_daemon_that_escaped_with_setsid_is_gone_after_its_task() {
    let t = Test::new().config(
        r#"
[tasks.spring]
run = "setsid sh -c 'echo $$ > daemon; exec sleep 300' </dev/null >/dev/null 2>&1 & sleep 0.5; echo started"
grace = "2s"
[tasks.check]
run = "echo second task"
"#,
    );
    let out = t.run();
    out.status(0)
        .stderr_has("left processes running")
        .stdout_has("second task");
    let daemon = read_pid(&t.path("daemon"));
    assert!(
        !alive(daemon),
        "the setsid daemon {daemon} outlived its task"
    );
}

#[test]
fn as_pid_1_orphans_are_reaped_and_no_zombie_lingers() {
    let probe = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "true"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        crate::harness::cannot_run("this machine refuses `unshare --pid --fork --mount-proc`");
        return;
    }
    let t = Test::new().config(
        r#"
[tasks.orphans]
run = "for i in 1 2 3 4 5; do (sleep 0.1 &) ; done; sleep 0.5"
[tasks.count]
run = "sleep 0.5; echo pid1=$(cat /proc/1/comm); echo zombies=$(grep -l '^State:.Z' /proc/[0-9]*/status 2>/dev/null | wc -l)"
"#,
    );
    let out = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", crate::harness::BIN])
        .current_dir(t.dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("| pid1=release-tasks"), "{stdout}");
    assert!(stdout.contains("| zombies=0"), "{stdout}");
}

#[test]
fn a_long_task_logs_a_heartbeat() {
    let t = Test::new().config(
        "[defaults]\nheartbeat = \"1s\"\n[tasks.slow]\nrun = \"sleep 2.5\"\ntimeout = \"1h\"\n",
    );
    t.run()
        .status(0)
        .stderr_has("task still running task=slow elapsed=")
        .stderr_has("timeout_in=");
}

#[test]
fn the_release_timeout_bounds_the_whole_release() {
    let t = Test::new().config(
        r#"
[defaults]
release_timeout = "3s"
grace = "1s"
[tasks.one]
run = "sleep 1"
[tasks.two]
run = "sleep 30"
[tasks.three]
run = "touch three"
"#,
    );
    let out = t.run();
    out.status(124)
        .stderr_has("bound=release_timeout")
        .stderr_has("task=two outcome=timed-out");
    assert!(out.elapsed < Duration::from_secs(20), "{:?}", out.elapsed);
    assert!(!t.path("three").exists());
}

#[test]
fn merged_stdout_and_stderr_never_mix_mid_line() {
    let t = Test::new()
        .config(
            r#"
[tasks.a]
run = "(i=0; while [ $i -lt 3000 ]; do echo out-$i-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa; i=$((i+1)); done) & (i=0; while [ $i -lt 3000 ]; do echo err-$i-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb >&2; i=$((i+1)); done); wait"
"#,
        )
        .merged();
    let out = t.run();
    out.status(0);
    let text = out.stdout();
    let mut seen = 0;
    for line in text.lines().filter(|l| !l.contains(" INFO ")) {
        let ok = line.starts_with("a | out-") && line.ends_with(&"a".repeat(46))
            || line.starts_with("a | err-") && line.ends_with(&"b".repeat(37));
        assert!(ok, "mixed line: {line:?}");
        seen += 1;
    }
    assert_eq!(seen, 6000);
}

#[test]
fn output_written_during_the_grace_period_still_arrives() {
    let t = Test::new().config(
        r#"
[tasks.slow-stop]
run = "trap 'sleep 0.5; echo cleaned up; exit 1' TERM; echo ready; while true; do sleep 0.05; done"
timeout = "1s"
grace = "5s"
"#,
    );
    t.run().status(124).stdout_has("slow-stop | cleaned up");
}

#[test]
fn hostile_config_files_get_a_clear_error() {
    let huge = format!("# {}\n", "x".repeat(2 * 1024 * 1024));
    Test::new()
        .config(&huge)
        .run()
        .status(78)
        .stderr_has("over the 1048576-byte limit");

    let deep = format!("a = {}{}\n", "[".repeat(10_000), "]".repeat(10_000));
    Test::new()
        .config(&deep)
        .run()
        .status(78)
        .stderr_has("release.toml");

    let t = Test::new();
    std::fs::write(t.path("release.toml"), b"[tasks.a]\nrun = \"echo \xff\"\n").unwrap();
    t.run()
        .status(78)
        .stderr_has("line 2, column 13: not valid UTF-8");

    let t = Test::new();
    std::fs::create_dir(t.path("release.toml")).unwrap();
    t.run().status(78).stderr_has("not a regular file");

    let mut many = String::from("[tasks.t0]\nrun = \"true\"\n");
    for i in 1..3000 {
        many.push_str(
            &[
                "[tasks.t",
                &i.to_string(),
                "]\nrun = \"true\"\nafter = [\"t",
                &(i - 1).to_string(),
                "\"]\n",
            ]
            .concat(),
        );
    }
    let out = Test::new().config(&many).args(&["check"]).run();
    out.status(0).stdout_has("ok, 3000 tasks");
}

#[test]
fn a_stalled_stdout_reader_does_not_stop_the_timeout() {
    // Nobody reads release-tasks's stdout: the task blocks on its output, but the timeout still fires,
    // the log on stderr still flows, and release-tasks still exits.
    let t = Test::new().config(
        "[tasks.chatty]\nrun = \"while true; do echo aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa; done\"\ntimeout = \"1s\"\ngrace = \"1s\"\n",
    );
    let mut child = start_in(
        &t,
        std::process::Stdio::piped(),
        std::process::Stdio::piped(),
    );
    let _unread_stdout = child.stdout.take();
    let mut stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        text
    });
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "release-tasks hung on a stalled stdout"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(124));
    let log = log.join().unwrap();
    assert!(log.contains("task timed out"), "{log}");
    assert!(log.contains("release failed"), "{log}");
}

/// A task that writes without a pause (`yes`) keeps its pipe readable all the time: its timeout
/// and a stop signal are still acted on at once, not after thousands of reads of its output.
#[test]
fn a_task_that_never_stops_writing_still_times_out_and_stops_on_time() {
    let t = Test::new().config("[tasks.y]\nrun = \"yes\"\ntimeout = \"1s\"\ngrace = \"1s\"\n");
    let started = std::time::Instant::now();
    let code = t.run_into(
        &[],
        std::process::Stdio::null(),
        std::process::Stdio::null(),
    );
    assert_eq!(code, Some(124));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the 1 s timeout took {:?}",
        started.elapsed()
    );
    let t = Test::new().config("[tasks.y]\nrun = \"touch started; exec yes\"\ngrace = \"1s\"\n");
    let mut child = start_in(&t, std::process::Stdio::null(), std::process::Stdio::null());
    let limit = std::time::Instant::now() + Duration::from_secs(30);
    while !t.path("started").exists() {
        assert!(std::time::Instant::now() < limit, "the task never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    let sent = std::time::Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(143));
    assert!(
        sent.elapsed() < Duration::from_secs(10),
        "SIGTERM took {:?}",
        sent.elapsed()
    );
}

/// A reader of stdout that takes nothing for a while (a log collector catching up) and then reads
/// slowly gets every line, in order: task output waits in the task's pipe and in release-tasks's
/// queue, bounded, and is written before release-tasks exits.
#[test]
fn a_stdout_reader_that_pauses_still_gets_every_line() {
    let t = Test::new().config("[tasks.big]\nrun = \"seq 1 300000; echo done >&2\"\n");
    let mut child = start_in(
        &t,
        std::process::Stdio::piped(),
        std::process::Stdio::piped(),
    );
    let mut stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    // The pause and the slow reads are what is tested, not a synchronisation: everything written
    // meanwhile must wait, and what is still queued when the task ends must go out before the exit.
    std::thread::sleep(Duration::from_secs(1));
    let mut bytes = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = std::io::Read::read(&mut stdout, &mut buf).unwrap();
        if n == 0 {
            break;
        }
        bytes.extend_from_slice(&buf[..n]);
        std::thread::sleep(Duration::from_millis(1));
    }
    let out = String::from_utf8(bytes).unwrap();
    let status = child.wait().unwrap();
    let mut log = String::new();
    std::io::Read::read_to_string(&mut { stderr }, &mut log).unwrap();
    assert_eq!(status.code(), Some(0), "{log}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 300_000, "{log}");
    assert!(
        lines
            .iter()
            .enumerate()
            .all(|(i, l)| *l == format!("big | {}", i + 1)),
        "lines out of order or altered"
    );
    assert!(log.contains("big | done"), "{log}");
}

/// Starts release-tasks in `t`'s directory, stdin from /dev/null, with its stdout and stderr.
fn start_in(
    t: &Test,
    stdout: std::process::Stdio,
    stderr: std::process::Stdio,
) -> std::process::Child {
    Command::new(crate::harness::BIN)
        .current_dir(t.dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .unwrap()
}

/// Starts release-tasks in `t`'s directory through a parent that blocked SIGTERM, SIGINT and SIGCHLD
/// before exec (some supervisors and language runtimes do), with its output in files.
fn spawn_with_signals_blocked(t: &Test) -> std::process::Child {
    let script = "import os, signal, sys\n\
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM, signal.SIGINT, signal.SIGCHLD])\n\
        os.execv(sys.argv[1], sys.argv[1:])\n";
    Command::new("python3")
        .args(["-c", script, crate::harness::BIN])
        .current_dir(t.dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(t.path("stdout")).unwrap())
        .stderr(std::fs::File::create(t.path("stderr")).unwrap())
        .spawn()
        .unwrap()
}

/// Waits up to `limit` for `child` to exit; kills it and fails the test if it does not.
#[track_caller]
fn exit_within(child: &mut std::process::Child, limit: Duration, t: &Test) -> i32 {
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return std::os::unix::process::ExitStatusExt::signal(&status)
                .map_or_else(|| status.code().unwrap(), |sig| 128 + sig);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "release-tasks did not exit within {limit:?}; stderr:\n{}",
                std::fs::read_to_string(t.path("stderr")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn signals_blocked_by_the_parent_neither_deafen_nor_hang_release_tasks() {
    // With SIGCHLD blocked, a fast task is still reaped at once (not at its timeout, not never).
    let t = Test::new().config("[tasks.fast]\nrun = \"echo hello\"\ntimeout = \"20s\"\n");
    let mut child = spawn_with_signals_blocked(&t);
    assert_eq!(exit_within(&mut child, Duration::from_secs(10), &t), 0);
    let stdout = std::fs::read_to_string(t.path("stdout")).unwrap();
    assert!(stdout.contains("fast | hello"), "{stdout}");

    // With SIGTERM blocked, SIGTERM still stops the release.
    let t = Test::new().config(
        "[tasks.slow]\nrun = \"echo ready; sleep 30\"\ngrace = \"1s\"\n[tasks.after]\nrun = \"touch after\"\n",
    );
    let mut child = spawn_with_signals_blocked(&t);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(t.path("stdout")).is_ok_and(|s| s.contains("| ready")) {
        assert!(
            std::time::Instant::now() < deadline,
            "the task never started"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(exit_within(&mut child, Duration::from_secs(10), &t), 143);
    assert!(!t.path("after").exists());
}

#[test]
fn a_stopped_task_gets_sigcont_and_runs_its_trap_on_timeout() {
    let t = Test::new().config(
        r#"
[tasks.frozen]
run = "trap 'echo trapped; exit 3' TERM; echo ready; kill -STOP $$; echo resumed without a signal"
timeout = "1s"
grace = "20s"
"#,
    );
    let out = t.run();
    out.status(124).stdout_has("frozen | trapped");
    assert!(
        out.elapsed < Duration::from_secs(10),
        "the stopped task waited for SIGKILL: {:?}",
        out.elapsed
    );
}

#[test]
fn a_heartbeat_under_a_second_is_a_config_error() {
    Test::new()
        .config("[defaults]\nheartbeat = \"1ns\"\n[tasks.a]\nrun = \"true\"\n")
        .args(&["check"])
        .run()
        .status(78)
        .stderr_has("shorter than the minimum of 1s");
}

#[test]
fn the_heartbeat_rounds_up_and_stops_at_the_timeout() {
    let t = Test::new().config(
        r#"
[defaults]
heartbeat = "1s"
[tasks.slow]
run = "trap 'sleep 2.5; exit 1' TERM; while true; do sleep 0.05; done"
timeout = "2500ms"
grace = "10s"
"#,
    );
    let out = t.run();
    out.status(124)
        .stderr_has("task still running task=slow")
        .stderr_lacks("timeout_in=0s");
    let after_timeout = out.stderr.split("task timed out").nth(1).unwrap();
    assert!(
        !after_timeout.contains("still running"),
        "heartbeat after the timeout's SIGTERM:\n{}",
        out.stderr
    );
}

#[test]
fn an_expired_release_timeout_still_runs_the_always_task() {
    let t = Test::new().config(
        r#"
[defaults]
release_timeout = "2s"
grace = "1s"
[tasks.slow]
run = "sleep 30"
allow_failure = true
[tasks.next]
run = "touch next"
[tasks.rollback]
run = "touch rollback"
on = "failure"
[tasks.off]
run = "touch off"
on = "always"
"#,
    );
    let out = t.run();
    out.status(124)
        .stderr_has("bound=release_timeout")
        .stderr_has("task=off outcome=succeeded")
        .stderr_lacks("before the task could start");
    assert!(t.path("off").exists(), "the always task did not run");
    assert!(t.path("rollback").exists(), "the failure task did not run");
    assert!(!t.path("next").exists());
}

#[test]
fn a_forwarded_signal_is_logged_with_the_task_that_got_it() {
    let t = Test::new().config(
        "[tasks.a]\nrun = \"trap 'touch usr1' USR1; echo ready; while [ ! -e usr1 ]; do sleep 0.05; done; true\"\n",
    );
    let running = t.spawn_until("a | ready");
    running.signal("USR1");
    running
        .wait()
        .status(0)
        .stderr_has("signal forwarded to the task signal=SIGUSR1 task=a");
}

#[test]
fn a_panic_kills_the_task_processes_and_exits_70() {
    // A debug build panics where the clean-up of a task begins when RELEASE_TASKS_TEST_PANIC is set;
    // the release binary aborts on panic, so the hook, not a destructor, must kill what runs.
    let t = Test::new()
        .config(
            r#"
[tasks.leaves]
run = """
sleep 300 & echo $! > child
setsid sh -c 'echo $$ > daemon; exec sleep 301' </dev/null >/dev/null 2>&1 &
while [ ! -s daemon ]; do sleep 0.01; done
"""
"#,
        )
        .env("RELEASE_TASKS_TEST_PANIC", "1");
    let out = t.run();
    out.status(70).stderr_has("panicked");
    let child = read_pid(&t.path("child"));
    let daemon = read_pid(&t.path("daemon"));
    assert!(
        gone_within(child, Duration::from_secs(10)),
        "child {child} outlived the panic"
    );
    assert!(
        gone_within(daemon, Duration::from_secs(10)),
        "the setsid daemon {daemon} outlived the panic"
    );
}

/// SIGUSR1 and SIGUSR2 change nothing, in every phase: before the run loop's handlers exist (here
/// while release-tasks opens its `--report` file, a FIFO that gets a reader only after the signal),
/// and in a release with no task to run, which installs none. Their default action would end
/// release-tasks with 138/140.
#[test]
fn sigusr1_and_sigusr2_before_any_task_change_nothing() {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    /// `O_NONBLOCK` on Linux (the tests do not depend on libc).
    const O_NONBLOCK: i32 = 0o4000;
    for sig in ["USR1", "USR2"] {
        let t = Test::new()
            .config("[tasks.off]\nrun = \"true\"\nwhen = \"NEVER_SET\"\n")
            .args(&["--report", "report.json"]);
        let status = Command::new("mkfifo")
            .arg(t.path("report.json"))
            .status()
            .unwrap();
        assert!(status.success());
        let running = t.spawn();
        // release-tasks is blocked opening the FIFO until a reader comes: the signal arrives then.
        running.wait_blocked_on_fifo();
        running.signal_taken(sig);
        let mut fifo = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(O_NONBLOCK)
            .open(t.path("report.json"))
            .unwrap();
        let out = running.wait();
        out.status(0).stderr_has("release succeeded");
        // The report went out whole, after the signal: the one task, skipped by its gate.
        let mut report = String::new();
        fifo.read_to_string(&mut report).expect("read the report");
        let report: serde_json::Value = serde_json::from_str(&report).expect("a JSON report");
        assert_eq!(report["tasks"][0]["name"], "off", "{report}");
        assert_eq!(report["tasks"][0]["outcome"], "skipped", "{report}");
    }
}

/// SIGUSR1 while release-tasks is still reading its settings (here an `--env-file` that is a FIFO
/// nobody has opened yet) changes nothing either: the signal is ignored from the first instruction.
#[test]
fn sigusr1_while_the_settings_are_read_changes_nothing() {
    let t = Test::new()
        .config("[tasks.a]\nrun = \"true\"\n")
        .args(&["--env-file", "vars.env"]);
    let status = Command::new("mkfifo")
        .arg(t.path("vars.env"))
        .status()
        .unwrap();
    assert!(status.success());
    let running = t.spawn();
    running.wait_blocked_on_fifo();
    running.signal_taken("USR1");
    std::fs::write(t.path("vars.env"), "A=1\n").unwrap();
    running.wait().status(0).stderr_has("release succeeded");
}

/// An error to report while stderr is a full pipe that nobody reads: release-tasks still exits, with
/// its status, after a bounded wait, instead of blocking on the write for ever.
#[test]
fn a_stalled_stderr_never_holds_up_the_exit_status() {
    let (reader, writer) = full_pipe();
    let t = Test::new();
    let started = std::time::Instant::now();
    let code = t.run_into(&["check"], std::process::Stdio::null(), writer.into());
    assert_eq!(code, Some(78), "no config: 78, said or not");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    drop(reader);
}

/// A pipe that is full and that nobody reads: (its read end, to keep open, and its write end).
fn full_pipe() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    // Close-on-exec: a release-tasks started by a test running beside this one must not inherit
    // (and hold open) this pipe's ends.
    let (reader, writer) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
    nix::fcntl::fcntl(
        &writer,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .expect("nonblocking");
    let chunk = [b'x'; 4096];
    while nix::unistd::write(&writer, &chunk).is_ok() {}
    nix::fcntl::fcntl(
        &writer,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
    )
    .expect("blocking again");
    (reader, writer)
}

/// A release with its stderr a full pipe that nobody reads: the log lines before the first task
/// (`release started`) must not hold the release up for ever, nor an error logged as JSON. The
/// tasks run and the status is the release's, after a bounded wait (5 s for stderr, once).
#[test]
fn a_stalled_stderr_never_holds_up_the_release() {
    let t = Test::new().config("[tasks.a]\nrun = \"touch ran; exit 3\"\n");
    for args in [&[][..], &["--log-format", "json"]] {
        let (reader, writer) = full_pipe();
        let started = std::time::Instant::now();
        let code = t.run_into(args, std::process::Stdio::null(), writer.into());
        assert_eq!(code, Some(3), "{args:?}");
        assert!(t.path("ran").exists(), "{args:?}: the task did not run");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{args:?}: took {:?}",
            started.elapsed()
        );
        drop(reader);
    }
    let (reader, writer) = full_pipe();
    let started = std::time::Instant::now();
    let code = Test::new().run_into(
        &["--log-format", "json"],
        std::process::Stdio::null(),
        writer.into(),
    );
    assert_eq!(code, Some(78), "no config, reported as JSON");
    assert!(started.elapsed() < Duration::from_secs(30));
    drop(reader);
}

/// A stalled stderr is waited for once, not once per line: `check` with many warnings to log into
/// a full pipe that nobody reads still ends within about one wait (5 s), not one per warning.
#[test]
fn a_stalled_stderr_is_waited_for_once_not_once_per_line() {
    let mut config = String::new();
    for i in 0..12 {
        use std::fmt::Write as _;
        let _ = write!(config, "[tasks.t{i}]\nrun = [\"/tmp\"]\n");
    }
    let t = Test::new().config(&config);
    let (reader, writer) = full_pipe();
    let started = std::time::Instant::now();
    let code = t.run_into(&["check"], std::process::Stdio::null(), writer.into());
    assert_eq!(code, Some(0), "warnings only");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "12 warnings took {:?}",
        started.elapsed()
    );
    drop(reader);
}

/// A stalled stderr costs one wait (5 s) before the release and one at its end, in all: an `exec`
/// whose command cannot be found logs before the release (a wait), then flushes its log lines,
/// reports the error and flushes again at the end, which share the second wait. Three separate
/// memories of the stall made this 15 s.
#[test]
fn a_stalled_stderr_costs_one_wait_before_the_release_and_one_at_its_end() {
    let t = Test::new().config("[tasks.a]\nrun = \"touch ran\"\n");
    let (reader, writer) = full_pipe();
    let started = std::time::Instant::now();
    let code = t.run_into(
        &["exec", "--", "release-tasks-no-such-command"],
        std::process::Stdio::null(),
        writer.into(),
    );
    let took = started.elapsed();
    assert_eq!(code, Some(127), "the command is not found");
    assert!(t.path("ran").exists(), "the task did not run");
    assert!(
        took >= Duration::from_secs(9),
        "took {took:?}: the waits did not happen, so the test shows nothing"
    );
    assert!(took < Duration::from_secs(13), "took {took:?}, not 5 + 5 s");
    drop(reader);
}

/// A stderr that is slow rather than stalled (its reader comes back within the wait) loses no line
/// written before the release starts.
#[test]
fn a_slow_stderr_loses_no_early_line() {
    let t = Test::new().config("[tasks.a]\nrun = \"true\"\n");
    let (reader, writer) = full_pipe();
    let drained = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        let mut all = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::fs::File::from(reader), &mut all);
        all
    });
    let code = t.run_into(&[], std::process::Stdio::null(), writer.into());
    assert_eq!(code, Some(0));
    let all = drained.join().expect("reader");
    let text = String::from_utf8_lossy(&all);
    assert!(
        text.contains("release started"),
        "{}",
        text.trim_start_matches('x')
    );
    assert!(
        text.contains("release succeeded"),
        "{}",
        text.trim_start_matches('x')
    );
}

/// A task's output that ends just after the clean-up first looked at it must not make release-tasks
/// sit out the whole grace period (a race that held up about one short task in a hundred): many
/// short tasks with a long grace finish in well under one grace.
#[test]
fn output_that_ends_just_after_the_exit_never_costs_the_grace() {
    let mut config = String::from("[defaults]\ngrace = \"30s\"\n");
    for i in 0..80 {
        use std::fmt::Write as _;
        let _ = write!(
            config,
            "[tasks.t{i}]\nrun = [\"sh\", \"-c\", \"echo out; echo err >&2\"]\n"
        );
    }
    let t = Test::new().config(&config);
    for _ in 0..4 {
        let out = t.run();
        out.status(0);
        assert!(
            out.elapsed < Duration::from_secs(20),
            "80 short tasks took {:?}",
            out.elapsed
        );
    }
}
