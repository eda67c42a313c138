//! `[lock]` against a real PostgreSQL server (started by `scripts/test-postgres`, TLS on): exactly once
//! across 8 concurrent replicas, the lock freed when its holder is killed with SIGKILL, a bounded wait, and
//! clear, password-free errors for an unreachable database or a wrong password.

use std::sync::OnceLock;
use std::time::Duration;

use crate::harness::{Test, alive, read_pid};

/// The URL of the test server, or `None` (the test is skipped) when no server can be had here.
fn database_url() -> Option<&'static str> {
    static URL: OnceLock<Option<String>> = OnceLock::new();
    let url = URL.get_or_init(|| {
        if let Ok(url) = std::env::var("RELEASE_TASKS_TEST_DATABASE_URL") {
            return Some(url);
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/test-postgres");
        let out = std::process::Command::new("bash")
            .arg(script)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "scripts/test-postgres failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    });
    if url.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the PostgreSQL tests, but no server could be started"
        );
        eprintln!(
            "SKIPPED: no PostgreSQL server (apt-get install postgresql, or set RELEASE_TASKS_TEST_DATABASE_URL)"
        );
    }
    url.as_deref()
}

/// A test dir whose release is named uniquely, so that tests running at once do not share a lock.
fn locked(url: &str, app: &str, lock: &str, tasks: &str) -> Test {
    Test::new()
        .config(&format!(
            "[lock]\npostgres = \"DATABASE_URL\"\n{lock}\n{tasks}"
        ))
        .env("DATABASE_URL", url)
        .env(
            "RELEASE_TASKS_APP",
            &format!("{app}-{}", std::process::id()),
        )
}

const PASSWORD: &str = "test-password";

#[test]
fn eight_replicas_run_each_task_exactly_once() {
    let Some(url) = database_url() else { return };
    let tasks = r#"
[tasks.migrate]
run = "echo migrate >> rows; sleep 0.3"
[tasks.seed]
run = "echo seed >> rows"
[tasks.cache-clear]
run = "echo cache-clear >> rows"
"#;
    let t = locked(url, "eight", "once = true\ntimeout = \"1m\"", tasks)
        .env("RELEASE_TASKS_VERSION", "v8");
    let replicas: Vec<_> = (0..8).map(|_| t.spawn()).collect();
    let outputs: Vec<_> = replicas
        .into_iter()
        .map(crate::harness::Running::wait)
        .collect();
    for out in &outputs {
        out.status(0);
        assert!(!out.stderr.contains(PASSWORD) && !out.stdout().contains(PASSWORD));
    }
    let rows = std::fs::read_to_string(t.path("rows")).unwrap();
    let mut lines: Vec<&str> = rows.lines().collect();
    lines.sort_unstable();
    assert_eq!(
        lines,
        ["cache-clear", "migrate", "seed"],
        "each task exactly once"
    );
    let skipped = outputs
        .iter()
        .filter(|o| o.stderr.contains("skipping every task"))
        .count();
    assert_eq!(skipped, 7, "the other replicas skip the completed release");
    assert!(
        outputs.iter().any(|o| o
            .stderr
            .contains("another replica holds the release lock; waiting")
            && o.stderr.contains("holder=\"release-tasks ")),
        "a waiting replica says who holds the lock"
    );
}

#[test]
fn the_lock_is_released_when_its_holder_is_sigkilled() {
    let Some(url) = database_url() else { return };
    let tasks = "[tasks.migrate]\nrun = \"echo ran >> rows; [ -e fast ] || { echo $$ > pid; echo ready; sleep 60; }\"\n";
    let t = locked(url, "sigkill", "once = true\ntimeout = \"1m\"", tasks)
        .env("RELEASE_TASKS_VERSION", "v1");
    let holder = t.spawn_until("| ready");
    let task = read_pid(&t.path("pid"));
    let waiter = t.spawn();
    waiter.wait_for(
        "another replica holds the release lock",
        Duration::from_secs(20),
    );
    std::fs::write(t.path("fast"), "").unwrap();
    holder.signal("KILL");
    holder.wait().status(137);
    let out = waiter.wait();
    out.status(0)
        .stderr_has("took the release lock")
        .stderr_has("task=migrate outcome=succeeded");
    assert!(out.elapsed < Duration::from_secs(30), "{:?}", out.elapsed);
    assert_eq!(
        std::fs::read_to_string(t.path("rows")).unwrap(),
        "ran\nran\n",
        "the killed release ran again"
    );
    assert!(!alive(task), "the killed holder's task survived");
}

#[test]
fn a_waiting_replica_gives_up_after_the_lock_timeout() {
    let Some(url) = database_url() else { return };
    let tasks = "[tasks.migrate]\nrun = \"echo ready; sleep 60\"\ngrace = \"1s\"\n";
    let t = locked(url, "timeout", "timeout = \"1s\"", tasks);
    let holder = t.spawn_until("| ready");
    let out = t.run();
    out.status(75)
        .stderr_has(&format!("release-tasks pid {} on ", holder.pid()))
        .stderr_has("(backend pid ")
        .stderr_has("still held the release lock")
        .stderr_has("raise [lock] timeout")
        .stdout_lacks("ready");
    holder.signal("TERM");
    holder.wait().status(143);
}

#[test]
fn a_failed_release_is_recorded_and_run_again() {
    let Some(url) = database_url() else { return };
    let t = locked(
        url,
        "failed",
        "once = true",
        "[tasks.migrate]\nrun = \"echo ran >> rows; [ -e ok ]\"\n",
    )
    .env("RELEASE_TASKS_VERSION", "v2");
    t.run().status(1);
    std::fs::write(t.path("ok"), "").unwrap();
    t.run().status(0).stderr_lacks("skipping every task");
    t.run().status(0).stderr_has("skipping every task");
    assert_eq!(
        std::fs::read_to_string(t.path("rows")).unwrap(),
        "ran\nran\n"
    );
}

#[test]
fn an_unreachable_database_fails_before_any_task() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://release_tasks:{PASSWORD}@127.0.0.1:{port}/release_tasks");
    let t = locked(
        &url,
        "unreachable",
        "connect_timeout = \"2s\"",
        "[tasks.migrate]\nrun = \"touch ran\"\n",
    );
    let out = t.run();
    out.status(69)
        .stderr_has("the [lock] database is not available yet; trying again")
        .stderr_has("raise [lock] connect_timeout")
        .stderr_has(&format!("cannot use the database at postgres://[redacted]@127.0.0.1:{port}/[redacted] (from DATABASE_URL)"))
        .stderr_has("nothing was run")
        .stderr_lacks(PASSWORD);
    assert!(!t.path("ran").exists());
}

#[test]
fn a_wrong_password_fails_before_any_task_without_showing_it() {
    let Some(url) = database_url() else { return };
    let wrong = url.replace(PASSWORD, "wrong-hunter2");
    let t = locked(
        &wrong,
        "password",
        "",
        "[tasks.migrate]\nrun = \"touch ran\"\n",
    );
    let out = t.run();
    out.status(69)
        .stderr_has("password authentication failed")
        .stderr_lacks("wrong-hunter2");
    assert!(!out.stdout().contains("wrong-hunter2"));
    assert!(!t.path("ran").exists());
}

#[test]
fn plan_shows_the_lock() {
    let t = Test::new()
        .config(
            "[lock]\npostgres = \"DATABASE_URL\"\nonce = true\n[tasks.a]\nrun = \"touch ran\"\n",
        )
        .env("RELEASE_TASKS_APP", "shop");
    t.run_with(&["plan"])
        .status(0)
        .stdout_has("lock  PostgreSQL advisory lock `shop` through DATABASE_URL, waiting up to 30m; once per release");
}

#[test]
fn lock_settings_are_checked_before_anything_runs() {
    let t = Test::new().config(
        "[lock]\npostgres = \"DATABASE_URL\"\nonce = true\n[tasks.a]\nrun = \"touch ran\"\n",
    );
    t.run()
        .status(78)
        .stderr_has("[lock] postgres names DATABASE_URL, which is not set")
        .stderr_has("once = true needs to know which release this is");
    Test::new()
        .config("[lock]\npostgres = \"postgres://u:pw@h/db\"\n[tasks.a]\nrun = \"x\"\n")
        .run()
        .status(78)
        .stderr_has("must name the variable that holds the database URL")
        .stderr_lacks(":pw@");
}

#[test]
fn sslmode_is_honoured() {
    let Some(url) = database_url() else { return };
    let tasks = "[tasks.migrate]\nrun = \"touch ran\"\n";
    // The test server's certificate is self-signed: verify-full must refuse it...
    let strict = url.replace("sslmode=require", "sslmode=verify-full");
    let t = locked(&strict, "verify", "", tasks);
    t.run()
        .status(69)
        .stderr_has("cannot use the database")
        .stderr_lacks(PASSWORD);
    assert!(!t.path("ran").exists());
    // ...while disable connects without TLS, and require (the default URL) with it.
    let plain = url.replace("sslmode=require", "sslmode=disable");
    let t = locked(&plain, "plain", "", tasks);
    t.run().status(0);
    assert!(t.path("ran").exists());
}
