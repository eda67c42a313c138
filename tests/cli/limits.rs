//! Limits a user can set on release-tasks itself (`ulimit -n`, `ulimit -u`): every one ends in a
//! documented status with a message naming the limit, never a panic or a silent exit.

use std::process::Command;

use crate::harness::{BIN, Test};

/// A release with a shell-string task, a direct task and an array task.
const CONFIG: &str = r#"
[tasks.a]
run = "sh -c 'echo a-ran'"
[tasks.b]
run = "true"
[tasks.c]
run = ["sh", "-c", "echo c-ran"]
"#;

/// Runs `release-tasks run` in `t`'s directory under `limit` (a `ulimit` command), as user `uid`
/// when given; returns the status and stderr.
fn run_limited(t: &Test, limit: &str, uid: Option<u32>) -> (Option<i32>, String) {
    run_limited_with(t, limit, uid, "run")
}

/// [`run_limited`] with another subcommand.
fn run_limited_with(
    t: &Test,
    limit: &str,
    uid: Option<u32>,
    command: &str,
) -> (Option<i32>, String) {
    let script = format!("{limit} && exec \"$0\" {command}");
    let mut cmd = match uid {
        Some(uid) => {
            let mut c = Command::new("setpriv");
            c.args([
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
                // dash's `ulimit` has no `-u`.
                "bash",
            ]);
            c
        }
        None => Command::new("sh"),
    };
    let out = cmd
        .args(["-c", &script, BIN])
        .current_dir(t.dir.path())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .output()
        .expect("run sh");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_open_file_limit_from_3_to_64_ends_in_a_status_with_a_message() {
    let t = Test::new().config(CONFIG);
    let mut refused = 0;
    for n in 3..=64 {
        let (code, stderr) = run_limited(&t, &format!("ulimit -n {n}"), None);
        assert!(!stderr.contains("panicked"), "ulimit -n {n}: {stderr}");
        match code {
            Some(0) => assert!(stderr.contains("release succeeded"), "{n}: {stderr}"),
            Some(71) => {
                refused += 1;
                assert!(
                    stderr.contains("the limit on open files") && stderr.contains("ulimit -n"),
                    "ulimit -n {n}: {stderr}"
                );
            }
            Some(126) => assert!(
                stderr.contains("the limit on open files was reached (`ulimit -n` is"),
                "ulimit -n {n}: {stderr}"
            ),
            // A binary linked dynamically (a debug build) cannot even load its libraries with no
            // descriptor free: the loader says so. A static build gets to its own message.
            Some(127) if n == 3 => assert!(
                stderr.contains("error while loading shared libraries"),
                "{stderr}"
            ),
            other => panic!("ulimit -n {n}: status {other:?}\n{stderr}"),
        }
    }
    assert!(refused > 0, "a limit of 4 must be refused");
    for n in 3..=8 {
        let (code, stderr) = run_limited_with(&t, &format!("ulimit -n {n}"), None, "check");
        assert!(
            !stderr.contains("panicked"),
            "check, ulimit -n {n}: {stderr}"
        );
        match code {
            Some(0) => {}
            Some(71) => assert!(stderr.contains("`ulimit -n` is"), "{stderr}"),
            Some(127) if n == 3 => assert!(
                stderr.contains("error while loading shared libraries"),
                "{stderr}"
            ),
            other => panic!("check, ulimit -n {n}: status {other:?}\n{stderr}"),
        }
    }
    let (code, stderr) = run_limited(&t, "ulimit -n 64", None);
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn a_low_process_limit_ends_in_126_or_71_naming_it_or_succeeds() {
    // SAFETY: geteuid only reads this process's user id.
    if unsafe { nix::libc::geteuid() } != 0 {
        assert!(
            std::env::var_os("CI").is_none(),
            "this test needs root to run as a user of its own"
        );
        eprintln!("skipped: `ulimit -u` applies per user; needs root to run as a user of its own");
        return;
    }
    // A user of its own (no other process of it exists), so the count is this run's alone; the
    // directory and the binary must be readable by it.
    let uid = 40_000 + std::process::id() % 20_000;
    let t = Test::new().config(CONFIG);
    std::fs::set_permissions(
        t.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    for u in [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 32] {
        for _ in 0..3 {
            let (code, stderr) = run_limited(&t, &format!("ulimit -u {u}"), Some(uid));
            assert!(!stderr.contains("panicked"), "ulimit -u {u}: {stderr}");
            match code {
                Some(0) => assert!(stderr.contains("release succeeded"), "{u}: {stderr}"),
                // A task's process (126) or a thread of release-tasks's own (71).
                Some(126 | 71) => assert!(
                    stderr.contains("the limit on processes was reached"),
                    "ulimit -u {u}: {stderr}"
                ),
                // The task's own shell could not fork: the task's failure, in its own words.
                Some(2) => assert!(
                    stderr.contains("a | /bin/sh: 1: Cannot fork")
                        && stderr.contains("task=a outcome=failed exit_code=2"),
                    "ulimit -u {u}: {stderr}"
                ),
                other => panic!("ulimit -u {u}: status {other:?}\n{stderr}"),
            }
        }
    }
}

/// `ulimit -f`: a report file that cannot be written past the limit is an error that names it (the
/// release's status stands), not a silent SIGXFSZ; a task still gets SIGXFSZ's default action.
#[test]
fn a_file_size_limit_is_named_and_tasks_keep_the_default_sigxfsz() {
    let t = Test::new().config("[tasks.t]\nrun = \"true\"\n");
    let (code, stderr) =
        run_limited_with(&t, "ulimit -f 0", None, "run --report r.json --junit j.xml");
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains(
            "cannot write the report file path=r.json error=\"the limit on file size was reached (`ulimit -f`)\""
        ),
        "{stderr}"
    );
    let t = Test::new().config("[tasks.t]\nrun = [\"sh\", \"-c\", \"echo x > out\"]\n");
    let (code, stderr) = run_limited(&t, "ulimit -f 0", None);
    assert_eq!(code, Some(128 + 25), "SIGXFSZ kills the task:\n{stderr}");
}
