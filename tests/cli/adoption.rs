//! Where users are: `.env` files for local runs (`--env-file`), `exec` for container entrypoints.

use std::os::unix::ffi::OsStrExt;
use std::process::Command;

use crate::harness::Test;

const GATED: &str =
    "[tasks.migrate]\nrun = [\"printenv\", \"FROM_FILE\"]\nwhen = \"RUN_MIGRATIONS\"\n";

#[test]
fn an_env_file_feeds_gates_and_tasks() {
    Test::new()
        .config(GATED)
        .file(
            ".env.local",
            "# local settings\nRUN_MIGRATIONS=true\nFROM_FILE=\"hello from .env\"\n",
        )
        .args(&["--env-file", ".env.local"])
        .run()
        .status(0)
        .stdout_has("migrate | hello from .env\n");
}

#[test]
fn no_env_file_is_read_unless_named() {
    Test::new()
        .config(GATED)
        .file(".env", "RUN_MIGRATIONS=true\n")
        .run()
        .status(0)
        .stdout_lacks("migrate |")
        .stderr_has("RUN_MIGRATIONS is unset");
}

#[test]
fn the_environment_wins_over_files_and_a_later_file_over_earlier_ones() {
    Test::new()
        .config(GATED)
        .file("a.env", "FROM_FILE=from-a\n")
        .file("b.env", "FROM_FILE=from-b\nRUN_MIGRATIONS=true\n")
        .args(&["--env-file", "a.env", "--env-file", "b.env"])
        .run()
        .status(0)
        .stdout_has("migrate | from-b\n");
    Test::new()
        .config(GATED)
        .file("a.env", "FROM_FILE=from-a\nRUN_MIGRATIONS=true\n")
        .env("FROM_FILE", "from-the-environment")
        .args(&["--env-file", "a.env"])
        .run()
        .status(0)
        .stdout_has("migrate | from-the-environment\n");
    // An empty variable in the environment is still set: the file does not replace it.
    Test::new()
        .config(GATED)
        .file("a.env", "RUN_MIGRATIONS=true\n")
        .env("RUN_MIGRATIONS", "false")
        .args(&["--env-file", "a.env"])
        .run()
        .status(0)
        .stdout_lacks("migrate |");
}

#[test]
fn the_variable_names_one_file() {
    Test::new()
        .config(GATED)
        .file("dev.env", "RUN_MIGRATIONS=yes\nFROM_FILE=via-variable\n")
        .env("RELEASE_TASKS_ENV_FILE", "dev.env")
        .run()
        .status(0)
        .stdout_has("migrate | via-variable\n");
}

#[test]
fn a_missing_file_is_a_usage_error_and_a_bad_one_a_config_error() {
    Test::new()
        .config(GATED)
        .args(&["--env-file", "nope.env"])
        .run()
        .status(2)
        .stderr_has("nope.env");
    Test::new()
        .config(GATED)
        .file(".env", "A=1\n\nB='never closed\nC=3\n")
        .args(&["check", "--env-file", ".env"])
        .run()
        .status(78)
        .stderr_has(".env:3:3: a single quote opened here is never closed");
}

/// An error about a `.env` file names its line and what is wrong, and never quotes its text: a
/// `.env` file is where the secrets live.
#[test]
fn an_env_file_error_never_shows_a_secret() {
    for (text, secret) in [
        ("DB_PASSWORD=\"hunter2\n", "hunter2"),
        ("export API_TOKEN=abc def ghi\n", "def"),
        ("DATABASE_URL=postgres://u:p@ss w@h/db\n", "p@ss"),
        ("A=1\nSECRET_KEY=x'y\n", "x'y"),
    ] {
        Test::new()
            .config(GATED)
            .file(".env", text)
            .args(&["check", "--env-file", ".env"])
            .run()
            .status(78)
            .stderr_has(".env:")
            .stderr_lacks(secret);
    }
    // A line without a quote is not "a quote never closed".
    Test::new()
        .config(GATED)
        .file(".env", "A=1\njust-a-word\n")
        .args(&["check", "--env-file", ".env"])
        .run()
        .status(78)
        .stderr_has(".env:2:")
        .stderr_lacks("quote opened");
}

/// A file named by `RELEASE_TASKS_ENV_FILE` that cannot be read is a usage error that names the
/// variable, not an `--env-file` the user never gave.
#[test]
fn a_missing_env_file_named_by_the_variable_names_the_variable() {
    Test::new()
        .config(GATED)
        .env("RELEASE_TASKS_ENV_FILE", "nope.env")
        .run()
        .status(2)
        .stderr_has("RELEASE_TASKS_ENV_FILE nope.env: no such file")
        .stderr_lacks("--env-file");
}

/// `RELEASE_TASKS_ENV_FILE` is a path like `_CONFIG`: one that is not UTF-8 is read as the bytes it is.
#[test]
fn an_env_file_variable_that_is_not_utf8_names_the_file_as_it_is() {
    let t = Test::new()
        .config(GATED)
        .file("x.env", "RUN_MIGRATIONS=true\nFROM_FILE=latin\n");
    let name = std::ffi::OsStr::from_bytes(b"v\xe9.env");
    std::fs::rename(t.path("x.env"), t.path("x.env").with_file_name(name)).unwrap();
    t.env_bytes("RELEASE_TASKS_ENV_FILE", b"v\xe9.env")
        .run()
        .status(0)
        .stdout_has("migrate | latin\n");
}

/// Files as editors and other tools write them: a UTF-8 byte order mark (Windows Notepad), CRLF
/// line ends, `export`, quotes, an empty file, `/dev/null`, the same file named twice.
#[test]
fn env_files_as_editors_write_them() {
    Test::new()
        .config(GATED)
        .file(
            ".env",
            "\u{feff}RUN_MIGRATIONS=true\r\nexport FROM_FILE='with bom'\r\n",
        )
        .args(&["--env-file", ".env", "--env-file", ".env"])
        .run()
        .status(0)
        .stdout_has("migrate | with bom\n");
    Test::new()
        .config(GATED)
        .file("empty.env", "")
        .args(&["--env-file", "empty.env", "--env-file", "/dev/null"])
        .run()
        .status(0)
        .stderr_has("RUN_MIGRATIONS is unset");
}

/// A path that names no readable file (a directory, one without permission) is a usage error that
/// names the option and the path, not a "config file".
#[test]
fn an_env_file_that_is_a_directory_is_a_usage_error_naming_it() {
    let t = Test::new().config(GATED);
    std::fs::create_dir(t.path("envdir")).unwrap();
    t.args(&["--env-file", "envdir"])
        .run()
        .status(2)
        .stderr_has("--env-file envdir")
        .stderr_lacks("config file");
}

#[test]
fn plan_says_where_a_gate_value_came_from_and_hides_secrets() {
    let out = Test::new()
        .config(
            "[tasks.migrate]\nrun = \"true\"\nwhen = \"RUN_MIGRATIONS_DURING_RELEASE\"\n\
             [tasks.seed]\nrun = \"true\"\nwhen = { env = \"API_TOKEN\", equals = \"x\" }\n",
        )
        .file(
            ".env",
            "RUN_MIGRATIONS_DURING_RELEASE=true\nAPI_TOKEN=s3cr3t-token-value\n",
        )
        .args(&["plan", "--env-file", ".env"])
        .run();
    out.status(0)
        .stdout_has("RUN_MIGRATIONS_DURING_RELEASE=\"true\" (from .env)")
        .stdout_has("API_TOKEN=\"[redacted]\" (from .env)")
        .stdout_lacks("s3cr3t");
}

/// `exec` after a successful release: the command is release-tasks's own process (same pid, and
/// /proc/PID/exe now names the command), with the tasks' environment (an `--env-file` included),
/// no blocked or ignored signal even when release-tasks's parent left some, and no descriptor but
/// 0, 1 and 2 (`ls` opens 3 itself to read the directory).
#[test]
fn exec_replaces_release_tasks_with_a_clean_command() {
    let t = Test::new()
        .config("[tasks.migrate]\nrun = \"echo migrated\"\n")
        .file("app.env", "FROM_FILE=seen-by-the-server\n");
    let out = t
        .args(&[
            "--env-file",
            "app.env",
            "exec",
            "--",
            "sh",
            "-c",
            "printenv FROM_FILE; printenv RELEASE_TASKS_RUN_ID || echo no-run-id",
        ])
        .run();
    out.status(0)
        .stdout_has("migrate | migrated\n")
        .stdout_has("\nseen-by-the-server\nno-run-id\n");

    // Same pid, the command's executable, a clean signal state, no stray descriptors: started by a
    // parent that blocked SIGUSR1 and ignored SIGHUP (and Rust's runtime ignores SIGPIPE).
    let t = Test::new().config("[tasks.migrate]\nrun = \"echo migrated\"\n");
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            &format!(
                "import os, signal\n\
             signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])\n\
             signal.signal(signal.SIGHUP, signal.SIG_IGN)\n\
             print('pid', os.getpid(), flush=True)\n\
             os.execv({bin:?}, [{bin:?}, 'exec', '--', 'cat', '/proc/self/status'])\n",
                bin = crate::harness::BIN
            ),
        ])
        .current_dir(t.dir.path())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pid = stdout
        .lines()
        .find_map(|l| l.strip_prefix("pid "))
        .expect("the helper printed its pid");
    assert!(
        stdout.contains(&format!("\nPid:\t{pid}\n")),
        "not the same pid:\n{stdout}"
    );
    assert!(stdout.contains("\nName:\tcat\n"), "{stdout}");
    assert!(
        stdout.contains("\nSigBlk:\t0000000000000000\n"),
        "a blocked signal was handed on:\n{stdout}"
    );
    assert!(
        stdout.contains("\nSigIgn:\t0000000000000000\n"),
        "an ignored signal was handed on:\n{stdout}"
    );

    // Descriptors: `ls` itself opens 3 to read the directory; anything above is a leak.
    let out = Test::new()
        .config("[tasks.migrate]\nrun = \"echo migrated\"\n")
        .args(&["exec", "--", "ls", "/proc/self/fd"])
        .run();
    out.status(0);
    let fds: Vec<String> = out
        .stdout()
        .lines()
        .filter(|l| !l.contains('|'))
        .map(str::to_owned)
        .collect();
    assert_eq!(fds, ["0", "1", "2", "3"], "{}", out.stdout());
}

#[test]
fn exec_checks_the_process_after_the_exec() {
    // While the command runs, /proc/PID/exe of release-tasks's pid is the command, and release-tasks
    // left no child behind (the guardian is gone before the exec).
    let t = Test::new()
        .config("[tasks.migrate]\nrun = \"echo migrated\"\n")
        .args(&["exec", "--", "sleep", "30"]);
    let running = t.spawn_until("migrate | migrated");
    let pid = running.pid();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        if exe.file_name().is_some_and(|n| n == "sleep") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still {exe:?}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    assert_eq!(children.trim(), "", "children left to the command");
    running.signal("TERM");
    assert_eq!(
        running.wait().code,
        Some(143),
        "sleep dies of SIGTERM: the signal reached it directly"
    );
}

#[test]
fn exec_does_not_start_the_command_after_a_failed_release() {
    let t = Test::new()
        .config("[tasks.migrate]\nrun = [\"sh\", \"-c\", \"exit 3\"]\n")
        .args(&["exec", "--", "touch", "started"]);
    t.run().status(3);
    assert!(!t.path("started").exists());
}

#[test]
fn exec_of_a_missing_command_is_127_and_needs_a_command() {
    Test::new()
        .config("[tasks.migrate]\nrun = \"true\"\n")
        .args(&["exec", "--", "no-such-server-anywhere", "-p", "3000"])
        .run()
        .status(127)
        .stderr_has("no-such-server-anywhere");
    Test::new()
        .config("[tasks.migrate]\nrun = \"true\"\n")
        .args(&["exec"])
        .run()
        .status(2);
}

/// A failing task whose error is on stderr among many lines, in colour, with a secret in it.
const FAILING: &str = r#"
[defaults]
tail_lines = 3

[tasks.migrate]
run = ["sh", "fail.sh"]
env = { API_TOKEN = "tok-s3cr3t-value" }
"#;

/// Two pipes have no order between them: the pause lets the stdout lines arrive before the error on
/// stderr, as they would from a real migration that works a while before it fails.
const FAIL_SH: &str = "for i in 1 2 3 4 5; do echo step $i; done\n\
    sleep 0.3\n\
    printf '\\033[31mPG::UndefinedColumn: column \"x\" does not exist\\033[0m (token %s)\\n' \"$API_TOKEN\" >&2\n\
    exit 3\n";

#[test]
fn the_failure_is_in_the_report_the_log_and_junit() {
    let t = Test::new().config(FAILING).file("fail.sh", FAIL_SH).args(&[
        "--report",
        "report.json",
        "--junit",
        "junit.xml",
    ]);
    let out = t.run();
    out.status(3)
        .stderr_has("release failed")
        .stderr_has("failed_task=migrate")
        .stderr_has(
            "last_line=\"PG::UndefinedColumn: column \\\"x\\\" does not exist (token [redacted])\"",
        );
    out.stderr_lacks("\"x\\\" does not exist (token tok-s3cr3t-value)");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path("report.json")).unwrap()).unwrap();
    assert_eq!(
        report["tasks"][0]["output_tail"],
        serde_json::json!([
            "step 4",
            "step 5",
            "PG::UndefinedColumn: column \"x\" does not exist (token [redacted])"
        ])
    );
    // JUnit, read by a real XML parser: the failure's body names the last line, <system-out> has
    // the tail.
    let junit = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys, xml.etree.ElementTree as ET\n\
             case = ET.parse(sys.argv[1]).getroot().find('testsuite/testcase')\n\
             print(case.find('failure').text)\n\
             print('---')\n\
             print(case.find('system-out').text, end='')",
            t.path("junit.xml").to_str().unwrap(),
        ])
        .output()
        .expect("python3 runs");
    let text = String::from_utf8_lossy(&junit.stdout);
    assert!(
        junit.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&junit.stderr)
    );
    assert_eq!(
        text,
        "task `migrate` failed with exit code 3\n\
         last line: PG::UndefinedColumn: column \"x\" does not exist (token [redacted])\n\
         ---\n\
         step 4\nstep 5\nPG::UndefinedColumn: column \"x\" does not exist (token [redacted])\n"
    );
    assert!(
        !std::fs::read_to_string(t.path("junit.xml"))
            .unwrap()
            .contains("s3cr3t")
    );
}

#[test]
fn the_slack_message_shows_the_failed_tasks_last_lines() {
    let server = crate::webhook::Server::start(&[200], std::time::Duration::ZERO);
    let config = format!(
        "{FAILING}\n[tasks.notify]\nnotify = {{ url = \"http://127.0.0.1:{}/hook\", format = \"slack\" }}\non = \"always\"\n",
        server.port
    );
    Test::new()
        .config(&config)
        .file("fail.sh", FAIL_SH)
        .run()
        .status(3);
    let received = server.received();
    let text = received[0].json()["text"].as_str().unwrap().to_owned();
    assert!(
        text.contains(
            "Last lines of `migrate`:\n```\nstep 4\nstep 5\nPG::UndefinedColumn: column \"x\" does not exist (token [redacted])\n```"
        ),
        "{text}"
    );
}

/// A stop signal that arrives after the last task but before the exec (here while release-tasks
/// waits for a slow stderr reader to take its last log lines) is not lost: the command never starts
/// and release-tasks exits 128+N, as it would for a signal during the release.
#[test]
fn exec_does_not_start_the_command_after_a_stop_signal_at_the_end_of_the_release() {
    use std::io::Write;
    for (sig, code) in [("TERM", 143), ("INT", 130)] {
        let t = Test::new().config("[tasks.migrate]\nrun = \"echo migrated\"\n");
        // A stderr pipe with room for the first log lines only, and nobody reading it.
        let (reader, mut writer) = std::io::pipe().expect("pipe");
        writer
            .write_all(&vec![b'x'; 65536 - 400])
            .expect("fill the pipe");
        let mut child = std::process::Command::new(crate::harness::BIN)
            .args(["exec", "--", "sh", "-c", "touch started; exec sleep 30"])
            .current_dir(t.dir.path())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(t.path("stdout")).expect("stdout file"))
            .stderr(writer)
            .spawn()
            .expect("spawn release-tasks");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !std::fs::read_to_string(t.path("stdout")).is_ok_and(|s| s.contains("migrated")) {
            assert!(std::time::Instant::now() < deadline, "the task never ran");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // The release's last log lines are stuck in the full pipe: a thread of release-tasks is
        // blocked writing them (the release has ended, the exec waits for them).
        crate::harness::wait_blocked_writing(child.id() as i32);
        let sent = std::time::Instant::now();
        let status = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        // The signal is taken while the lines are stuck; then the reader catches up: the release's
        // last lines get out and release-tasks moves on.
        crate::harness::wait_no_signal_pending(child.id() as i32, sig);
        let drain = std::thread::spawn(move || {
            let mut reader = reader;
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        let code_seen = loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                break std::os::unix::process::ExitStatusExt::signal(&status)
                    .map_or(status.code(), |s| Some(128 + s));
            }
            if sent.elapsed() > std::time::Duration::from_secs(15) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("SIG{sig} before the exec was lost: the command runs on");
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        drop(drain);
        assert_eq!(code_seen, Some(code), "SIG{sig}");
        assert!(
            !t.path("started").exists(),
            "SIG{sig} arrived before the exec, yet the command started"
        );
    }
}

/// However close to the release's end a SIGTERM comes (while the last task ends, between the
/// release and the exec, after the exec), it is never lost: either release-tasks exits 143 or the
/// command got it (`sleep` dies of it, 143 too). A lost one would leave `sleep 30` running.
#[test]
fn exec_never_loses_a_sigterm_sent_around_the_end_of_the_release() {
    let t = Test::new().config("[tasks.migrate]\nrun = \"true\"\n");
    for i in 0..150u64 {
        let delay = std::time::Duration::from_micros(2000 + (i % 50) * 400);
        // The log goes to a file, so that a lost signal says where release-tasks was.
        let log = t.path("log");
        let mut child = std::process::Command::new(crate::harness::BIN)
            .args(["exec", "--", "sleep", "30"])
            .current_dir(t.dir.path())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn release-tasks");
        std::thread::sleep(delay);
        let status = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let sent = std::time::Instant::now();
        let code = loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                break std::os::unix::process::ExitStatusExt::signal(&status)
                    .map_or(status.code(), |s| Some(128 + s));
            }
            if sent.elapsed() > std::time::Duration::from_secs(10) {
                let _ = child.kill();
                let _ = child.wait();
                let seen = std::fs::read_to_string(&log).unwrap_or_default();
                panic!("SIGTERM {delay:?} after the start was lost: the command runs on\n{seen}");
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert_eq!(code, Some(143), "SIGTERM {delay:?} after the start");
    }
}

/// A script without a `#!` line, which execve refuses (ENOEXEC), is run by /bin/sh, as execvp, a
/// shell and release-tasks's own tasks do.
#[test]
fn exec_runs_a_script_without_a_shebang_through_the_shell() {
    let t = Test::new()
        .config("[tasks.migrate]\nrun = \"true\"\n")
        .file("server", "echo served \"$1\"\n")
        .args(&["exec", "--", "./server", "on 3000"]);
    let status = Command::new("chmod")
        .args(["+x", &t.path("server").display().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    t.run().status(0).stdout_has("served on 3000\n");
}
