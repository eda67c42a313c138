//! `[lock]` as a hostile user tries it, from the README's words: a lock lost during the last task
//! (noticed only by the clean-up's check or by the final COMMIT) is a lost lock like any other;
//! keepalive values the system refuses are config errors; a stop signal is acted on at once while
//! the lock's database says nothing.

use std::time::{Duration, Instant};

use crate::lock::{database_url, locked};
use crate::lock_loss::{lose_the_lock_in_the_first_task, normalised, server_address};
use crate::proxy::Proxy;

/// The lock is lost while the last `on = "success"` task runs, and an `on = "failure"` clean-up
/// follows it: the release counts as failed (69), so the clean-up runs, with or without `once`,
/// and no line says the release has not failed or succeeded.
#[test]
fn a_loss_in_the_last_task_runs_the_clean_up_and_exits_69() {
    let Some(url) = database_url() else { return };
    let tasks = r#"
[tasks.migrate]
run = "echo ready; while [ ! -e go ]; do sleep 0.05; done; echo migrate >> rows"
[tasks.maintenance-off]
run = "echo maintenance-off >> rows"
on = "failure"
"#;
    for (n, once) in ["once = true", ""].iter().enumerate() {
        let t = locked(url, &format!("late-loss{n}"), once, tasks)
            .env("RELEASE_TASKS_VERSION", "v1")
            .args(&["--report", "report.json"]);
        let out = lose_the_lock_in_the_first_task(&t);
        out.status(69);
        let app = t.env_var("RELEASE_TASKS_APP").unwrap();
        assert_eq!(
            normalised(&out.stderr, &app),
            format!(
                r#"INFO  release started app=APP version=v1 config=release.toml tasks=2 to_run=2
INFO  took the release lock lock=APP
INFO  task started task=migrate command="echo ready; while [ ! -e go ]; do sleep 0.05; done; echo migrate >> rows" timeout_s=1800
ERROR lost the [lock] database connection, and PostgreSQL releases the lock with it: another replica may start the release; a task running now is left to finish, and no further task starts here but clean-up (on = "failure" or "always") error="terminating connection due to administrator command (57P01)"
INFO  task finished task=migrate outcome=succeeded exit_code=0 duration_ms=N
ERROR the release lock is lost, so no task starts from now on but clean-up (on = "failure" or "always"); another replica may take the lock and run the release again last_task_under_lock=migrate reason="the database connection is closed (terminating connection due to administrator command (57P01))"
WARN  starting a clean-up task without the release lock task=maintenance-off
INFO  task started task=maintenance-off command="echo maintenance-off >> rows" timeout_s=1800
INFO  task finished task=maintenance-off outcome=succeeded exit_code=0 duration_ms=N
INFO  summary task=migrate outcome=succeeded exit_code=0 duration_ms=N detail=succeeded
INFO  summary task=maintenance-off outcome=succeeded exit_code=0 duration_ms=N detail=succeeded
ERROR the release lock was lost: no task started after that but clean-up (on = "failure" or "always"); another replica may take the lock and run the release again exit_code=69 last_task_under_lock=migrate reason="lost the release lock `APP`: the database connection is closed (terminating connection due to administrator command (57P01))"
ERROR release failed status=failed exit_code=69 duration_ms=N tasks_run=2
"#
            ),
            "{once:?}"
        );
        assert_eq!(
            std::fs::read_to_string(t.path("rows")).unwrap(),
            "migrate\nmaintenance-off\n",
            "{once:?}"
        );
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(t.path("report.json")).unwrap()).unwrap();
        assert_eq!(report["exit_code"], 69, "{once:?}");
        assert_eq!(report["lock_lost"]["last_task_under_lock"], "migrate");
    }
}

/// The lock is lost while the last task runs and no task follows: only the final COMMIT can tell,
/// and it does: the release exits 69, also without `once`, after the connection's loss was said.
#[test]
fn a_loss_in_the_very_last_task_exits_69_without_once() {
    let Some(url) = database_url() else { return };
    let tasks = r#"
[tasks.migrate]
run = "echo ready; while [ ! -e go ]; do sleep 0.05; done; echo migrate >> rows"
"#;
    let t = locked(url, "last-loss", "", tasks).args(&["--report", "report.json"]);
    let out = lose_the_lock_in_the_first_task(&t);
    out.status(69)
        .stderr_has("last_task_under_lock=migrate")
        .stderr_lacks("release succeeded")
        .stderr_lacks("nothing was run");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path("report.json")).unwrap()).unwrap();
    assert_eq!(report["exit_code"], 69);
    assert_eq!(report["status"], "failed");
    assert_eq!(report["lock_lost"]["last_task_under_lock"], "migrate");
}

/// Keepalive parameters the system would refuse (Linux takes 1 to 32767 s of idle and interval, 1
/// to 127 probes, a `tcp_user_timeout` that fits an int) or that are not numbers: a config error that
/// names the parameter, from `run` (78, at once, nothing tried) and as a warning from `check`, not
/// "Invalid argument (os error 22)" retried for a minute as if the database were not up yet.
#[test]
fn keepalive_values_the_system_refuses_are_config_errors() {
    let Some(url) = database_url() else { return };
    for (param, value) in [
        ("keepalives", "yes"),
        ("keepalives_idle", "99999999"),
        ("keepalives_interval", "40000"),
        ("keepalives_count", "1000"),
        ("tcp_user_timeout", "99999999999"),
    ] {
        let t = locked(
            &format!("{url}&{param}={value}"),
            "keepalive-values",
            "",
            "[tasks.migrate]\nrun = \"touch ran\"\n",
        );
        let out = t.run();
        out.status(78)
            .stderr_has(&format!("parameter {param}=\"{value}\": "))
            .stderr_lacks("os error")
            .stderr_lacks("test-password");
        assert!(
            out.elapsed < Duration::from_secs(10),
            "{param}: {:?}",
            out.elapsed
        );
        assert!(!t.path("ran").exists());
        t.run_with(&["check"]).status(0).stderr_has(&format!(
            "warning: [lock] DATABASE_URL is not a usable database URL: parameter {param}=\"{value}\": "
        ));
    }
}

/// A network that goes silent after the first task, then SIGTERM (a pod evicted from a partitioned
/// node): the signal is acted on at once, not after the check's 10 s and the final COMMIT's 30 s
/// (a container's grace period is often 10 s): the next task does not start, the `on = "always"`
/// clean-up runs, and release-tasks exits 143 with its summary.
#[test]
fn a_stop_signal_is_acted_on_at_once_while_the_database_is_silent() {
    let Some(url) = database_url() else { return };
    let tasks = r#"
[tasks.migrate]
run = "echo ready; while [ ! -e go ]; do sleep 0.05; done; echo migrate >> rows"
[tasks.seed]
run = "echo seed >> rows"
[tasks.maintenance-off]
run = "echo maintenance-off >> rows"
"#;
    // The check before `seed`, and the one an on = "failure" clean-up makes before it would be
    // skipped (no `seed` then).
    for (n, (once, on)) in [("once = true", "always"), ("", "always"), ("", "failure")]
        .iter()
        .enumerate()
    {
        let tasks = if *on == "failure" {
            tasks.replace("[tasks.seed]\nrun = \"echo seed >> rows\"\n", "")
        } else {
            tasks.to_owned()
        } + &format!("on = \"{on}\"\n");
        let proxy = Proxy::start(server_address(url));
        let through = url.replacen(
            &format!("@127.0.0.1:{}/", server_address(url).port()),
            &format!("@127.0.0.1:{}/", proxy.port()),
            1,
        );
        let t = locked(&through, &format!("silent-stop{n}"), once, &tasks)
            .env("RELEASE_TASKS_VERSION", "v1");
        let holder = t.spawn_until("| ready");
        proxy.freeze();
        std::fs::write(t.path("go"), "").unwrap();
        holder.wait_for("task=migrate outcome=succeeded", Duration::from_secs(20));
        let signalled = Instant::now();
        holder.signal("TERM");
        let out = holder.wait();
        out.status(143)
            .stderr_lacks("task started task=seed")
            .stderr_has("summary task=maintenance-off outcome=succeeded")
            // The clean-up after the stop started without a check: it did not run under the lock.
            .stderr_lacks("last_task_under_lock=maintenance-off");
        assert!(
            signalled.elapsed() < Duration::from_secs(8),
            "{once:?} {on}: exited {:?} after the signal; stderr:\n{}",
            signalled.elapsed(),
            out.stderr
        );
        assert_eq!(
            std::fs::read_to_string(t.path("rows")).unwrap(),
            "migrate\nmaintenance-off\n",
            "{once:?}"
        );
    }
}

/// A socket directory where no server listens (a wrong `host=` or `port`, a Cloud SQL proxy not
/// started): the error names the socket file that was tried and says what to do, and no password.
#[test]
fn a_wrong_socket_directory_says_what_was_tried_and_what_to_do() {
    if database_url().is_none() {
        return;
    }
    let dir = tempfile_dir();
    for url in [
        format!("postgresql://app:s3cret-pw@/db?host={dir}&port=6543&sslmode=require"),
        format!(
            "postgresql://app:s3cret-pw@{}:6543/db",
            dir.replace('/', "%2F")
        ),
        format!("host={dir} port=6543 user=app password=s3cret-pw dbname=db"),
    ] {
        let t = locked(
            &url,
            "wrong-socket",
            "connect_timeout = \"1s\"",
            "[tasks.migrate]\nrun = \"touch ran\"\n",
        );
        let out = t.run();
        out.status(69)
            .stderr_has(&format!("(socket {dir}/.s.PGSQL.6543) (from DATABASE_URL): error connecting to server: No such file or directory"))
            .stderr_has("is the server running and listening on that socket (its unix_socket_directories and port)? If not, correct the URL's host or port; raise [lock] connect_timeout if the database takes longer to start)")
            .stderr_lacks("s3cret-pw");
        assert!(!t.path("ran").exists());
    }
}

/// An empty directory of this test's own.
fn tempfile_dir() -> String {
    let dir = std::env::temp_dir().join(format!("release-tasks-no-socket-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.display().to_string()
}
