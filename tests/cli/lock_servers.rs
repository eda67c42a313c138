//! `[lock]` on the servers people really have, each started by the project's own scripts: `PgBouncer` in
//! transaction and in session mode (`scripts/test-pgbouncer`), a server that starts after release-tasks
//! does, a role limited to 20 connections facing 64 replicas, and apps racing on a fresh database.

use std::process::Command;
use std::time::Duration;

use crate::harness::{Output, Running, Test, free_port};
use crate::lock::{database_url, locked};

/// Runs one of the project's scripts and returns what it prints, or `None` (the test is skipped; under
/// CI it fails) when it cannot.
pub fn script(name: &str, args: &[&str], env: &[(&str, &str)]) -> Option<String> {
    let path = format!("{}/scripts/{name}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("bash")
        .arg(&path)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .ok();
    match out {
        Some(out) if out.status.success() => {
            Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        }
        other => {
            let why = other.map_or_else(
                || "cannot run bash".to_owned(),
                |o| String::from_utf8_lossy(&o.stderr).into_owned(),
            );
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must run the [lock] server tests, but scripts/{name} {args:?} failed:\n{why}"
            );
            eprintln!("SKIPPED: scripts/{name} {args:?} failed:\n{why}");
            None
        }
    }
}

/// PostgreSQL's own client, installed with the server by scripts/test-postgres.
fn psql() -> Option<String> {
    let found = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| Some(e.ok()?.path().join("bin/psql")))
        .find(|p| p.exists());
    if found.is_none() {
        assert!(std::env::var_os("CI").is_none(), "CI must have psql");
        eprintln!("SKIPPED: no psql under /usr/lib/postgresql");
    }
    found.map(|p| p.display().to_string())
}

/// Eight replicas of one release through `url`: every task runs exactly once in total.
fn eight_replicas_through(url: &str, app: &str) {
    let tasks = "[tasks.migrate]\nrun = \"echo migrate >> rows; sleep 0.5\"\n[tasks.seed]\nrun = \"echo seed >> rows\"\n";
    let t =
        locked(url, app, "once = true\ntimeout = \"1m\"", tasks).env("RELEASE_TASKS_VERSION", "v1");
    let replicas: Vec<Running> = (0..8).map(|_| t.spawn()).collect();
    let outputs: Vec<Output> = replicas.into_iter().map(Running::wait).collect();
    for out in &outputs {
        out.status(0);
    }
    let rows = std::fs::read_to_string(t.path("rows")).unwrap();
    let mut lines: Vec<&str> = rows.lines().collect();
    lines.sort_unstable();
    assert_eq!(lines, ["migrate", "seed"], "each task exactly once");
}

#[test]
fn eight_replicas_through_pgbouncer_run_the_release_once() {
    if database_url().is_none() {
        return;
    }
    let Some(transaction) = script("test-pgbouncer", &["transaction"], &[]) else {
        return;
    };
    let Some(session) = script("test-pgbouncer", &["session"], &[]) else {
        return;
    };
    // A transaction pooler hands server connections around between transactions: the lock lives in
    // one transaction, and no statement is prepared.
    eight_replicas_through(&transaction, "pooled-transaction");
    eight_replicas_through(&session, "pooled-session");
    // A second release through the transaction pooler: the ledger written through it is read back.
    let t = locked(
        &transaction,
        "pooled-transaction",
        "once = true",
        "[tasks.a]\nrun = \"touch ran\"\n",
    )
    .env("RELEASE_TASKS_VERSION", "v1");
    t.run().status(0).stderr_has("skipping every task");
    t.run_with(&["history"]).status(0).stdout_has("succeeded");
}

#[test]
fn a_database_that_starts_late_is_waited_for() {
    if database_url().is_none() {
        return;
    }
    let port = free_port();
    let dir = format!("/tmp/release-tasks-test-pg-late-{}", std::process::id());
    let env = [
        ("RELEASE_TASKS_TEST_PG_DIR", dir.as_str()),
        ("RELEASE_TASKS_TEST_PG_PORT", &port.to_string()),
    ];
    let url = format!(
        "postgres://release_tasks:test-password@127.0.0.1:{port}/release_tasks?sslmode=require"
    );
    let t = locked(
        &url,
        "late",
        "connect_timeout = \"90s\"",
        "[tasks.migrate]\nrun = \"touch ran\"\n",
    );
    let release = t.spawn();
    release.wait_for(
        "the [lock] database is not available yet",
        Duration::from_secs(20),
    );
    std::thread::sleep(Duration::from_secs(3));
    let started = script("test-postgres", &[], &env);
    let out = release.wait();
    script("test-postgres", &["stop"], &env);
    let _ = std::fs::remove_dir_all(&dir);
    if started.is_none() {
        return;
    }
    out.status(0)
        .stderr_has("reason=\"error connecting to server")
        .stderr_has("url=postgres://[redacted]@127.0.0.1:")
        .stderr_has("took the release lock")
        .stderr_lacks("test-password");
    assert!(t.path("ran").exists());
}

#[test]
fn sixty_four_replicas_share_a_role_limited_to_twenty_connections() {
    let Some(url) = database_url() else { return };
    let limited = url
        .replace("release_tasks:", "release_tasks_limited:")
        .replace("/release_tasks?", "/release_tasks_limited?");
    // The migration itself needs a connection of the same role, as the app's would: waiting replicas
    // that kept theirs would leave it none (it tries for 5 s).
    let Some(psql) = psql() else { return };
    let tasks = format!(
        "[tasks.migrate]\nrun = \"\"\"n=0; until {psql} \"$DATABASE_URL\" -Atc 'select 1' >/dev/null 2>&1; do \
         n=$((n+1)); [ $n -ge 25 ] && exit 9; sleep 0.2; done; echo ran >> rows; sleep 2\"\"\"\n"
    );
    let t = locked(&limited, "crowd", "once = true\ntimeout = \"2m\"", &tasks)
        .env("RELEASE_TASKS_VERSION", "v64");
    let replicas: Vec<Running> = (0..64).map(|_| t.spawn()).collect();
    let outputs: Vec<Output> = replicas.into_iter().map(Running::wait).collect();
    for out in &outputs {
        out.status(0);
    }
    assert_eq!(std::fs::read_to_string(t.path("rows")).unwrap(), "ran\n");
    assert!(
        outputs
            .iter()
            .any(|o| o.stderr.contains("holder=\"release-tasks pid ")),
        "a waiting replica says who holds the lock"
    );
}

#[test]
fn apps_racing_on_a_fresh_database_all_create_their_ledger() {
    let Some(url) = database_url() else { return };
    // A fresh schema per round stands for a fresh database: the ledger table is created in it. Without
    // the fix, 16 apps over 8 rounds failed in 2 of 3 runs here; 15 rounds make a miss unlikely.
    for round in 0..15 {
        let schema = format!("fresh_{}_{round}", std::process::id());
        let create = format!("CREATE SCHEMA {schema} AUTHORIZATION release_tasks");
        if script("test-postgres", &["psql", "-c", &create], &[]).is_none() {
            return;
        }
        // Without TLS the logins take about as long each, and the creations collide more often.
        let fresh = format!("{url}&options=-c%20search_path%3D{schema}")
            .replace("sslmode=require", "sslmode=disable");
        let apps: Vec<Test> = (0..16)
            .map(|app| {
                locked(
                    &fresh,
                    &format!("race-{round}-{app}"),
                    "once = true",
                    "[tasks.a]\nrun = \"true\"\n",
                )
                .env("RELEASE_TASKS_VERSION", "v1")
            })
            .collect();
        let running: Vec<Running> = apps.iter().map(Test::spawn).collect();
        for out in running.into_iter().map(Running::wait) {
            out.status(0).stderr_lacks("already exists");
        }
        let drop = format!("DROP SCHEMA {schema} CASCADE");
        script("test-postgres", &["psql", "-c", &drop], &[]);
    }
}
