//! `[lock]` against a real PostgreSQL server (started by `scripts/test-postgres`, TLS on): exactly once
//! across 8 concurrent replicas, the lock freed when its holder is killed with SIGKILL, a bounded wait,
//! clear, password-free errors for an unreachable database or a wrong password; URLs as ORMs write them,
//! `sslrootcert`, channel binding, a list of variables, `wait` and `history`. Poolers, slow starts and
//! crowds are in `lock_servers.rs`.

use std::sync::OnceLock;
use std::time::Duration;

use crate::harness::{Test, alive, free_port, read_pid};

/// The URL of the test server, or `None` (the test is skipped) when no server can be had here.
pub fn database_url() -> Option<&'static str> {
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
pub fn locked(url: &str, app: &str, lock: &str, tasks: &str) -> Test {
    locked_on("postgres", url, app, lock, tasks)
}

/// [`locked`] on the database `backend` names (`postgres` or `mysql`).
pub fn locked_on(backend: &str, url: &str, app: &str, lock: &str, tasks: &str) -> Test {
    Test::new()
        .config(&format!(
            "[lock]\n{backend} = \"DATABASE_URL\"\n{lock}\n{tasks}"
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
    // A 60-character host name: the holder's name keeps its pid within PostgreSQL's 63 bytes.
    let host = format!(
        "pod-myapp-release-migrations-7d9f8b6c5d-x2k4q-{}",
        "h".repeat(14)
    );
    assert_eq!(host.len(), 60);
    let t = locked(url, "timeout", "timeout = \"1s\"", tasks).env("HOSTNAME", &host);
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
    let port = free_port();
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
fn a_stop_signal_ends_the_wait_for_a_database_that_is_not_up() {
    let port = free_port();
    let url = format!("postgres://release_tasks:{PASSWORD}@127.0.0.1:{port}/release_tasks");
    let t = locked(
        &url,
        "stop-waiting",
        "",
        "[tasks.migrate]\nrun = \"touch ran\"\n",
    );
    let running = t.spawn();
    running.wait_for("not available yet", Duration::from_secs(20));
    running.signal("TERM");
    let out = running.wait();
    out.status(143)
        .stderr_has("received SIGTERM before any task started");
    assert!(out.elapsed < Duration::from_secs(20), "{:?}", out.elapsed);
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

/// A second URL for the same database through a name the certificate does not carry.
fn via_localhost(url: &str) -> String {
    url.replace("@127.0.0.1:", "@localhost:")
}

/// The test server's own certificate (see scripts/test-postgres), or `None` when it is not there.
fn server_certificate() -> Option<String> {
    let dir = std::env::var("RELEASE_TASKS_TEST_PG_DIR")
        .unwrap_or_else(|_| "/tmp/release-tasks-test-pg".to_owned());
    let path = format!("{dir}.crt");
    if std::path::Path::new(&path).exists() {
        return Some(path);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must run the sslrootcert tests, but {path} is missing"
    );
    eprintln!("SKIPPED: no {path} (the certificate written by scripts/test-postgres)");
    None
}

#[test]
fn urls_as_orms_write_them_are_usable_and_unknown_parameters_are_named() {
    let Some(url) = database_url() else { return };
    let tasks = "[tasks.migrate]\nrun = \"touch ran\"\n";
    let prisma = format!("{url}&schema=public&pgbouncer=true&connection_limit=1&pool_timeout=5");
    let t = locked(&prisma, "prisma", "", tasks);
    t.run_with(&["check"]).status(0).stderr_lacks("warning");
    t.run().status(0);
    assert!(t.path("ran").exists());
    // A host list: the first host refuses, the second is the server.
    let port = free_port();
    let listed = url.replacen("@127.0.0.1:", &format!("@127.0.0.1:{port},127.0.0.1:"), 1);
    let t = locked(&listed, "hosts", "", tasks);
    t.run().status(0);
    assert!(t.path("ran").exists());
    // check and run agree on a URL that cannot be used, and both name the parameter.
    let typo = format!("{url}&sslmod=verify-full");
    let t = locked(&typo, "typo", "", tasks);
    t.run_with(&["check"])
        .status(0)
        .stderr_has("DATABASE_URL is not a usable database URL: parameter sslmod is not one")
        .stderr_lacks(PASSWORD);
    t.run()
        .status(78)
        .stderr_has("parameter sslmod is not one")
        .stderr_lacks(PASSWORD);
    assert!(!t.path("ran").exists());
}

#[test]
fn sslrootcert_checks_the_servers_own_certificate() {
    let Some(url) = database_url() else { return };
    let Some(cert) = server_certificate() else {
        return;
    };
    let tasks = "[tasks.migrate]\nrun = \"touch ran\"\n";
    // The certificate is self-signed and a CA itself (what `openssl req -x509` makes), issued for
    // 127.0.0.1: accepted as its own root.
    let full = url.replace(
        "sslmode=require",
        &format!("sslmode=verify-full&sslrootcert={cert}"),
    );
    let t = locked(&full, "rootcert", "", tasks);
    t.run().status(0);
    assert!(t.path("ran").exists());
    // verify-ca does not check the host name (libpq's rule), verify-full does.
    let ca = via_localhost(&url.replace(
        "sslmode=require",
        &format!("sslmode=verify-ca&sslrootcert={cert}"),
    ));
    locked(&ca, "rootcert-ca", "", tasks).run().status(0);
    let t = locked(&via_localhost(&full), "rootcert-name", "", tasks);
    t.run().status(69).stderr_has("TLS").stderr_lacks(PASSWORD);
    assert!(!t.path("ran").exists());
    // Another CA's certificate does not vouch for the server.
    let other = format!("{}/other.crt", t.path("").display());
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-new",
            "-x509",
            "-days",
            "1",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
        ])
        .args(["-addext", "subjectAltName=IP:127.0.0.1", "-keyout"])
        .arg(t.path("other.key"))
        .args(["-out", &other])
        .output()
        .unwrap();
    assert!(made.status.success());
    let wrong = url.replace(
        "sslmode=require",
        &format!("sslmode=verify-full&sslrootcert={other}"),
    );
    locked(&wrong, "rootcert-other", "", tasks).run().status(69);
    let missing = url.replace(
        "sslmode=require",
        "sslmode=verify-ca&sslrootcert=/nonexistent.crt",
    );
    locked(&missing, "rootcert-missing", "", tasks)
        .run()
        .status(78)
        .stderr_has("sslrootcert=/nonexistent.crt: cannot read the certificates");
}

#[test]
fn channel_binding_is_used_when_required() {
    let Some(url) = database_url() else { return };
    let tasks = "[tasks.migrate]\nrun = \"touch ran\"\n";
    // Neon's default URL: the server offers SCRAM-SHA-256-PLUS over TLS.
    let neon = format!("{url}&channel_binding=require");
    let t = locked(&neon, "binding", "", tasks);
    t.run().status(0);
    assert!(t.path("ran").exists());
    let plain = url.replace("sslmode=require", "sslmode=disable&channel_binding=require");
    locked(&plain, "binding-plain", "", tasks)
        .run()
        .status(78)
        .stderr_has("channel_binding=require needs TLS");
    let off = format!("{url}&channel_binding=disable");
    locked(&off, "binding-off", "", tasks).run().status(0);
}

#[test]
fn the_first_set_variable_of_a_list_wins() {
    let Some(url) = database_url() else { return };
    let config =
        |app: &str| {
            Test::new()
            .config(
                "[lock]\npostgres = [\"DIRECT_URL\", \"DATABASE_URL\"]\nconnect_timeout = \"1s\"\n\
                 [tasks.migrate]\nrun = \"touch ran\"\n",
            )
            .env("RELEASE_TASKS_APP", &format!("{app}-{}", std::process::id()))
        };
    // Only DATABASE_URL set: it is used.
    let t = config("list").env("DATABASE_URL", url);
    t.run().status(0);
    assert!(t.path("ran").exists());
    // DIRECT_URL set: it wins, even over a working DATABASE_URL.
    let port = free_port();
    let t = config("list-direct").env("DATABASE_URL", url).env(
        "DIRECT_URL",
        &format!("postgres://u:{PASSWORD}@127.0.0.1:{port}/db"),
    );
    t.run().status(69).stderr_has("(from DIRECT_URL)");
    assert!(!t.path("ran").exists());
    config("list-none")
        .run()
        .status(78)
        .stderr_has("[lock] postgres names DIRECT_URL, DATABASE_URL, none of which is set");
    // A list where one value is expected says so.
    Test::new()
        .config(
            "[lock]\npostgres = \"DATABASE_URL\"\nkey = [\"a\", \"b\"]\n[tasks.a]\nrun = \"x\"\n",
        )
        .run()
        .status(78)
        .stderr_has("takes one value, not a list");
}

#[test]
fn wait_returns_once_the_release_completed_and_times_out_on_a_missing_one() {
    let Some(url) = database_url() else { return };
    let tasks = "[tasks.migrate]\nrun = \"touch ran\"\n";
    let release = || locked(url, "wait", "once = true", tasks).env("RELEASE_TASKS_VERSION", "v7");
    let waiting = release().args(&["wait", "--timeout", "60s"]);
    let mut waiter = waiting.spawn();
    waiter.wait_for(
        "waiting for the release to complete",
        Duration::from_secs(20),
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        waiter.child.try_wait().unwrap().is_none(),
        "wait returned before the release ran"
    );
    let t = release();
    t.run().status(0);
    assert!(t.path("ran").exists());
    let out = waiter.wait();
    out.status(0)
        .stderr_has("ledger=\"not recorded yet\"")
        .stderr_has("the release completed; done waiting")
        .stdout_lacks("ran");
    // A release nobody runs: 75 after --timeout, saying what the ledger holds.
    let missing = locked(url, "wait", "once = true", tasks).env("RELEASE_TASKS_VERSION", "v8");
    let out = missing.run_with(&["wait", "--timeout", "2s"]);
    out.status(75)
        .stderr_has("release v8 of `wait-")
        .stderr_has("was not completed within 2s (it is not recorded yet");
    assert!(out.elapsed < Duration::from_secs(20), "{:?}", out.elapsed);
    // Without once, there is no ledger to wait for.
    locked(url, "wait", "", tasks)
        .run_with(&["wait"])
        .status(78)
        .stderr_has("add once = true to [lock]");
}

#[test]
fn history_shows_the_last_releases() {
    let Some(url) = database_url() else { return };
    let tasks = "[tasks.migrate]\nrun = \"test $RELEASE_TASKS_VERSION != v3\"\n";
    for (version, code) in [("v1", 0), ("v2", 0), ("v3", 1)] {
        locked(url, "history", "once = true", tasks)
            .env("RELEASE_TASKS_VERSION", version)
            .env("RELEASE_TASKS_COMMIT", &format!("abc{version}"))
            .run()
            .status(code);
    }
    let t = locked(url, "history", "", tasks);
    let out = t.run_with(&["history", "-n", "2"]);
    out.status(0);
    let text = out.stdout();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].starts_with("VERSION  COMMIT  STATUS"), "{text}");
    assert!(lines[1].starts_with("v3       abcv3   failed"), "{text}");
    assert!(lines[2].starts_with("v2       abcv2   succeeded"), "{text}");
    assert!(lines[1].contains("release-tasks pid "), "{text}");
    let out = t.run_with(&["history", "--log-format", "json"]);
    out.status(0);
    let rows: Vec<serde_json::Value> = out
        .stdout()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let statuses: Vec<&str> = rows.iter().map(|r| r["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["failed", "succeeded", "succeeded"]);
    assert_eq!(rows[2]["version"], "v1");
    assert_eq!(rows[2]["commit"], "abcv1");
    assert_eq!(rows[0]["exit_code"], 1);
}
