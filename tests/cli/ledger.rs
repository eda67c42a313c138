//! The ledger as the release's memory, against the real PostgreSQL (and `PgBouncer` in transaction
//! mode): per-task records visible while the lock is held, `history --show`, `history` without a
//! release version, pruning, the `changed` gate across releases and replicas, `--force`, and `wait
//! --fail-fast`.

use std::time::Duration;

use crate::harness::{Output, Test};
use crate::lock::{database_url, locked, locked_on};

/// The text a person reads, with what changes from run to run replaced: timestamps (`<T>`),
/// durations (`<D>`), the holder's pid and host; runs of spaces (table padding, which follows the
/// widest duration) made one.
fn normalised(text: &str) -> String {
    let is_time = |t: &str| {
        t.len() >= 20 && t.as_bytes()[4] == b'-' && t.as_bytes()[10] == b'T' && t.contains('Z')
    };
    let is_duration = |t: &str| {
        let t = t.trim_end_matches(',');
        let digits = t.trim_end_matches(|c: char| c.is_ascii_alphabetic());
        !digits.is_empty()
            && digits.chars().all(|c| c.is_ascii_digit())
            && matches!(&t[digits.len()..], "ms" | "s" | "m" | "us" | "ns" | "h")
    };
    text.lines()
        .map(|line| {
            let mut out: Vec<String> = Vec::new();
            let mut after_pid = 0;
            for word in line.split_whitespace() {
                let shown = if after_pid == 1 {
                    after_pid = 2;
                    "<PID>".to_owned()
                } else if after_pid == 3 {
                    after_pid = 0;
                    "<HOST>".to_owned()
                } else if is_time(word) {
                    format!("<T>{}", if word.ends_with(',') { "," } else { "" })
                } else if is_duration(word) {
                    if out.last().is_some_and(|l| l == "<D>") {
                        continue;
                    }
                    "<D>".to_owned()
                } else {
                    word.to_owned()
                };
                if word == "pid" {
                    after_pid = 1;
                } else if after_pid == 2 && word == "on" {
                    after_pid = 3;
                }
                out.push(shown);
            }
            out.join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The release's tasks for these tests: a migration that succeeds, a task that says it is ready
/// and waits for a file, then fails with some output.
const TASKS: &str = r#"
[tasks.migrate]
run = "echo migrated"
[tasks.seed]
run = "echo ready; while [ ! -e go ]; do sleep 0.05; done; echo 'PG::LockNotAvailable: lock timeout'; echo token=hunter2; exit 3"
env = { SEED_TOKEN = "hunter2" }
[tasks.cache]
run = "echo cleared"
"#;

/// Records are written as the release proceeds and read back, while the lock is held, by a
/// session that has only the database URL and the app's name (no release version).
pub fn records_while_held(backend: &str, url: &str, app: &str) {
    let t = locked_on(backend, url, app, "once = true", TASKS).env("RELEASE_TASKS_VERSION", "v43");
    let holder = t.spawn_until("seed    | ready");
    // From "a laptop": no version, no [require]d variables, no gates.
    let laptop = locked_on(backend, url, app, "once = true", TASKS);
    let out = laptop.run_with(&["history", "--show", "v43"]);
    out.status(0);
    assert_eq!(
        normalised(&out.stdout()),
        "release v43 of `APP`: running
started <T>, took -
by release-tasks pid <PID> on <HOST>

TASK OUTCOME EXIT STARTED DURATION ATTEMPTS DETAIL
migrate succeeded 0 <T> <D> 1
seed running - <T> - 1 attempt 1 running"
            .replace("APP", &format!("{app}-{}", std::process::id())),
        "the records are visible while the lock is held"
    );
    std::fs::write(t.path("go"), "").unwrap();
    holder.wait().status(3);
    let out = laptop.run_with(&["history", "--show", "v43"]);
    out.status(0);
    assert_eq!(
        normalised(&out.stdout()),
        "release v43 of `APP`: failed, exit status 3
started <T>, took <D>
by release-tasks pid <PID> on <HOST>

TASK OUTCOME EXIT STARTED DURATION ATTEMPTS DETAIL
migrate succeeded 0 <T> <D> 1
seed failed 3 <T> <D> 1 failed with exit code 3
cache not-run - - - - not run: the release had already stopped

seed: failed with exit code 3; its last output lines:
| ready
| PG::LockNotAvailable: lock timeout
| token=[redacted]"
            .replace("APP", &format!("{app}-{}", std::process::id())),
    );
    assert!(!out.stdout().contains("hunter2"), "the tail is redacted");
    let out = laptop.run_with(&["history", "--show", "v43", "--log-format", "json"]);
    out.status(0);
    let doc: serde_json::Value = serde_json::from_str(out.stdout().trim()).unwrap();
    assert_eq!(doc["status"], "failed");
    assert_eq!(doc["exit_code"], 3);
    let tasks = doc["tasks"].as_array().unwrap();
    let outcomes: Vec<&str> = tasks
        .iter()
        .map(|t| t["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["succeeded", "failed", "not-run"]);
    assert_eq!(tasks[1]["exit_code"], 3);
    assert_eq!(tasks[1]["attempts"], 1);
    assert_eq!(
        tasks[1]["output_tail"][1],
        "PG::LockNotAvailable: lock timeout"
    );
    assert!(tasks[1]["duration_ms"].as_i64().unwrap() >= 0);
    // An unknown release: exit 1, saying so.
    laptop
        .run_with(&["history", "--show", "v99"])
        .status(1)
        .stderr_has("no release v99 recorded for `");
}

#[test]
fn records_are_visible_as_the_release_proceeds_and_history_show_says_why_it_failed() {
    let Some(url) = database_url() else { return };
    records_while_held("postgres", url, "why");
}

#[test]
fn records_work_through_pgbouncer_in_transaction_mode() {
    if database_url().is_none() {
        return;
    }
    let Some(pooled) = crate::lock_servers::script("test-pgbouncer", &["transaction"], &[]) else {
        return;
    };
    records_while_held("postgres", &pooled, "why-pooled");
}

#[test]
fn history_needs_no_release_version_nor_the_releases_variables() {
    let Some(url) = database_url() else { return };
    let config = "once = true\n[require]\nenv = [\"SECRET_KEY_BASE\"]";
    locked(url, "noversion", config, "[tasks.a]\nrun = \"true\"\n")
        .env("RELEASE_TASKS_VERSION", "v1")
        .env("SECRET_KEY_BASE", "x")
        .run()
        .status(0);
    let laptop = locked(url, "noversion", config, "[tasks.a]\nrun = \"true\"\n");
    let out = laptop.run_with(&["history"]);
    out.status(0).stdout_has("v1 ");
    let out = laptop.run_with(&["history", "--show", "v1"]);
    out.status(0);
    assert!(
        normalised(&out.stdout()).ends_with("\na succeeded 0 <T> <D> 1"),
        "{}",
        out.stdout()
    );
    // `wait` does need to know which release to wait for.
    laptop
        .run_with(&["wait"])
        .status(78)
        .stderr_has("set RELEASE_TASKS_VERSION");
}

/// Runs SQL as the test server's superuser.
fn sql(statement: &str) -> Option<String> {
    crate::lock_servers::script("test-postgres", &["psql", "-tAc", statement], &[])
}

#[test]
fn task_records_are_pruned_to_the_last_100_releases_keeping_each_tasks_last_success() {
    let Some(url) = database_url() else { return };
    let key = format!("prune-{}", std::process::id());
    // 150 old releases, each with a record of `migrate` (its files' hash) and of `seed`; the oldest
    // is the last successful run of `migrate` with a hash, which pruning keeps.
    let setup = format!(
        "DELETE FROM release_tasks_task_runs WHERE lock_key = '{key}'; \
         DELETE FROM release_tasks_runs WHERE lock_key = '{key}'; \
         INSERT INTO release_tasks_runs (lock_key, release, status, holder, started_at, finished_at) \
           SELECT '{key}', 'old' || i, 'succeeded', 'test', now() - (200 - i) * interval '1 hour', \
                  now() - (200 - i) * interval '1 hour' FROM generate_series(1, 150) i; \
         INSERT INTO release_tasks_task_runs (lock_key, release, task, position, outcome, inputs_hash, recorded_at) \
           SELECT '{key}', 'old' || i, 'migrate', 1, CASE WHEN i = 1 THEN 'succeeded' ELSE 'skipped' END, \
                  CASE WHEN i = 1 THEN 'feed' END, now() - (200 - i) * interval '1 hour' FROM generate_series(1, 150) i; \
         INSERT INTO release_tasks_task_runs (lock_key, release, task, position, outcome, recorded_at) \
           SELECT '{key}', 'old' || i, 'seed', 2, 'succeeded', now() - (200 - i) * interval '1 hour' \
           FROM generate_series(1, 150) i"
    );
    // The tables exist once any release ran with once = true.
    Test::new()
        .config(&format!(
            "[lock]\npostgres = \"DATABASE_URL\"\nkey = \"{key}\"\nonce = true\n[tasks.seed]\nrun = \"true\"\n"
        ))
        .env("DATABASE_URL", url)
        .env("RELEASE_TASKS_VERSION", "first")
        .run()
        .status(0);
    let Some(_) = sql(&setup) else { return };
    Test::new()
        .config(&format!(
            "[lock]\npostgres = \"DATABASE_URL\"\nkey = \"{key}\"\nonce = true\n[tasks.seed]\nrun = \"true\"\n"
        ))
        .env("DATABASE_URL", url)
        .env("RELEASE_TASKS_VERSION", "new")
        .run()
        .status(0);
    let count = |q: &str| {
        sql(&format!(
            "SELECT count(DISTINCT release) FROM release_tasks_task_runs WHERE lock_key = '{key}' {q}"
        ))
        .unwrap()
    };
    assert_eq!(
        count(""),
        "101",
        "the last 100 releases, and the kept success"
    );
    assert_eq!(count("AND release = 'new'"), "1");
    assert_eq!(
        count("AND release = 'old1' AND task = 'migrate' AND outcome = 'succeeded'"),
        "1",
        "the last successful run with a hash is kept"
    );
    assert_eq!(count("AND release = 'old1' AND task = 'seed'"), "0");
    // The newest 100: `new`, then old150 down to old52 (`first` went with the set-up).
    assert_eq!(count("AND release = 'old52'"), "1", "the 100th newest");
    assert_eq!(count("AND release = 'old51'"), "0");
}

fn changed_release(url: &str, app: &str, version: &str) -> Test {
    changed_release_on("postgres", url, app, version)
}

/// [`changed_release`] on the database `backend` names.
pub fn changed_release_on(backend: &str, url: &str, app: &str, version: &str) -> Test {
    let tasks = r#"
[tasks.migrate]
run = "echo migrating >> ran"
changed = ["db/migrate/**", "prisma/*.sql"]
[tasks.seed]
run = "echo seeding >> ran"
changed = "db/seeds.rb"
when = "SEED"
"#;
    let t = locked_on(backend, url, app, "once = true\ntimeout = \"1m\"", tasks)
        .env("RELEASE_TASKS_VERSION", version)
        .file("db/migrate/001_init.rb", "create table")
        .file("db/seeds.rb", "seed");
    std::fs::create_dir_all(t.path("prisma")).unwrap();
    t
}

/// The tasks that ran, from the file each appends to.
pub fn ran(t: &Test) -> String {
    std::fs::read_to_string(t.path("ran")).unwrap_or_default()
}

#[test]
fn the_changed_gate_skips_what_did_not_change_across_releases_and_replicas() {
    let Some(url) = database_url() else { return };
    let app = "changed";
    // v41: the first run always runs.
    let t = changed_release(url, app, "v41");
    let plan = t.run_with(&["plan"]);
    plan.status(0);
    let text = plan.stdout();
    assert!(
        text.contains("because changed: no successful run recorded yet, so it runs (db/migrate/**, prisma/*.sql: 1 file, "),
        "{text}"
    );
    t.run().status(0);
    assert_eq!(ran(&t), "migrating\n");
    // v42, a config-only release on four replicas: migrate is skipped, with the reason; seed is
    // gated off by `when` (and so never compared).
    let t = changed_release(url, app, "v42");
    let hash = {
        let plan = t.run_with(&["plan", "--log-format", "json"]);
        plan.status(0);
        let line: serde_json::Value =
            serde_json::from_str(plan.stdout().lines().next().unwrap()).unwrap();
        assert_eq!(line["skip"]["unchanged_since"], "v41", "{line}");
        line["skip"]["hash"].as_str().unwrap().to_owned()
    };
    assert_eq!(hash.len(), 6);
    let plan = t.run_with(&["plan"]);
    assert_eq!(
        plan.stdout()
            .lines()
            .skip(1)
            .take(2)
            .map(str::trim)
            .collect::<Vec<_>>(),
        [
            "skip  migrate  echo migrating >> ran".to_owned(),
            format!("because db/migrate/**, prisma/*.sql unchanged since v41 ({hash})"),
        ]
    );
    let replicas: Vec<_> = (0..4).map(|_| t.spawn()).collect();
    let outs: Vec<Output> = replicas
        .into_iter()
        .map(crate::harness::Running::wait)
        .collect();
    for out in &outs {
        out.status(0);
    }
    assert_eq!(ran(&t), "", "nothing ran in any replica");
    assert_eq!(
        outs.iter()
            .filter(|o| o.stderr.contains(&format!(
                "reason=\"db/migrate/**, prisma/*.sql unchanged since v41 ({hash})\""
            )))
            .count(),
        1,
        "the replica that ran the release skipped migrate for its files; the others skipped the release"
    );
    // --force and RELEASE_TASKS_FORCE run it anyway (flags win over the variable).
    let t = changed_release(url, app, "v43");
    t.run_with(&["plan", "--force"])
        .status(0)
        .stdout_has("because changed: forced by --force or RELEASE_TASKS_FORCE");
    let forced = changed_release(url, app, "v43").env("RELEASE_TASKS_FORCE", "ture");
    forced
        .run_with(&["plan"])
        .status(78)
        .stderr_has("RELEASE_TASKS_FORCE=\"ture\" is not true or false");
    forced.run_with(&["--force"]).status(0);
    assert_eq!(ran(&forced), "migrating\n");
    // v44: two files changed (one edited, one added) since the last successful run (v43's).
    let t = changed_release(url, app, "v44")
        .file("db/migrate/001_init.rb", "create table; add index")
        .file("prisma/002.sql", "alter table");
    t.run_with(&["plan"])
        .status(0)
        .stdout_has("because 2 files changed since v43 (db/migrate/**, prisma/*.sql: ");
    // A failed run is not a successful one: v45 still compares with v43.
    let failing = t.file("fail", "");
    let config = std::fs::read_to_string(failing.path("release.toml"))
        .unwrap()
        .replace(
            "echo migrating >> ran",
            "echo migrating >> ran; ! test -e fail",
        );
    let failing = failing.config(&config);
    failing.run().status(1);
    let t = changed_release(url, app, "v45")
        .file("db/migrate/001_init.rb", "create table; add index")
        .file("prisma/002.sql", "alter table");
    t.run_with(&["plan"])
        .status(0)
        .stdout_has("because 2 files changed since v43");
    t.run().status(0);
    assert_eq!(ran(&t), "migrating\n");
    // The seed's gate combines with `when`: with SEED on, its first run runs.
    let t = changed_release(url, app, "v46")
        .file("db/migrate/001_init.rb", "create table; add index")
        .file("prisma/002.sql", "alter table")
        .env("SEED", "true");
    t.run().status(0);
    assert_eq!(ran(&t), "seeding\n");
}

#[test]
fn changed_without_the_ledger_is_a_config_error_and_an_empty_glob_a_warning() {
    Test::new()
        .config("[tasks.migrate]\nrun = \"m\"\nchanged = [\"db/migrate/**\"]\n")
        .run_with(&["check"])
        .status(78)
        .stderr_has(
            "release.toml:3:11: task `migrate`: `changed` compares the files with the release ledger's record of the \
             task's last successful run; add [lock] with postgres = \"DATABASE_URL\" and once = true",
        );
    let t = Test::new().config(
        "[lock]\npostgres = \"DATABASE_URL\"\nkey = \"k\"\nonce = true\n[tasks.migrate]\nrun = \"m\"\nchanged = [\"db/migrat/**\"]\n",
    );
    let out = t.run_with(&["check"]);
    out.status(0).stderr_has(&format!(
        "release-tasks: warning: task `migrate`: `changed` pattern \"db/migrat/**\" matches no file below {}; check the path (patterns are relative to the config file's directory)",
        std::fs::canonicalize(t.dir.path()).unwrap().display()
    ));
}

#[test]
fn wait_fail_fast_ends_as_soon_as_the_release_failed_and_nobody_holds_the_lock() {
    let Some(url) = database_url() else { return };
    wait_fail_fast_on("postgres", url, "failfast");
}

/// `wait --fail-fast` against the database `backend` names.
pub fn wait_fail_fast_on(backend: &str, url: &str, app: &str) {
    let tasks = "[tasks.migrate]\nrun = \"exit 4\"\n";
    let t = locked_on(backend, url, app, "once = true", tasks).env("RELEASE_TASKS_VERSION", "v9");
    t.run().status(4);
    let out = t.run_with(&["wait", "--fail-fast", "--timeout", "60s"]);
    out.status(1)
        .stderr_has("the release is recorded as failed and no replica holds the lock; not waiting (--fail-fast)")
        .stderr_has("history --show v9");
    assert!(out.elapsed < Duration::from_secs(20), "{:?}", out.elapsed);
    // Without it, a failed release is waited for (another replica may run it again).
    t.run_with(&["wait", "--timeout", "2s"])
        .status(75)
        .stderr_has("it is recorded as failed");
    // A release not recorded yet is waited for even with --fail-fast.
    locked_on(backend, url, app, "once = true", tasks)
        .env("RELEASE_TASKS_VERSION", "v10")
        .run_with(&["wait", "--fail-fast", "--timeout", "2s"])
        .status(75);
}

#[test]
fn history_exits_74_when_stdout_cannot_be_written() {
    let Some(url) = database_url() else { return };
    let t = locked(
        url,
        "history74",
        "once = true",
        "[tasks.a]\nrun = \"true\"\n",
    )
    .env("RELEASE_TASKS_VERSION", "v1");
    t.run().status(0);
    let full = || -> std::process::Stdio {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("open /dev/full")
            .into()
    };
    for args in [
        &["history"][..],
        &["history", "--log-format", "json"],
        &["history", "--show", "v1"],
        &["history", "--show", "v1", "--log-format", "json"],
    ] {
        assert_eq!(
            t.run_into(args, full(), std::process::Stdio::piped()),
            Some(74),
            "{args:?} >/dev/full"
        );
    }
}

/// A FIFO or a socket below a `changed` glob (a `tmp/` with a server's socket under `**`) is not
/// opened: opening a FIFO waits for a writer forever, a socket cannot be opened at all. It counts
/// by its path and kind, so `plan` and `run` go on, and the gate still sees it come and go.
#[test]
fn the_changed_gate_does_not_open_fifos_or_sockets() {
    let Some(url) = database_url() else { return };
    let t = changed_release(url, "changed-fifo", "v1");
    let fifo = t.path("db/migrate/events.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let socket = std::os::unix::net::UnixListener::bind(t.path("db/migrate/app.sock")).unwrap();
    let plan = t.run_with(&["plan"]);
    plan.status(0);
    assert!(
        plan.stdout()
            .contains("(db/migrate/**, prisma/*.sql: 3 files, "),
        "{}",
        plan.stdout()
    );
    t.run().status(0);
    assert_eq!(ran(&t), "migrating\n");
    drop(socket);
    std::fs::remove_file(t.path("db/migrate/app.sock")).unwrap();
    let plan = t.run_with(&["plan"]);
    plan.status(0);
    assert!(
        plan.stdout().contains("because 1 file changed since v1"),
        "{}",
        plan.stdout()
    );
}

/// `history -n 0` asks for nothing: it is a usage error (2), not "no releases recorded" for a key
/// that has some; nor is an empty `--show` a release the ledger lacks (1).
#[test]
fn history_refuses_zero_releases_and_an_empty_version_as_usage_errors() {
    let t = Test::new()
        .config("[lock]\npostgres = \"DATABASE_URL\"\nkey = \"k\"\nonce = true\n[tasks.a]\nrun = \"true\"\n")
        .env("DATABASE_URL", "postgres://u:p@127.0.0.1:9/db");
    t.run_with(&["history", "-n", "0"])
        .status(2)
        .stderr_has("invalid value '0' for '--limit <N>': 0 is not in 1..=4294967295");
    t.run_with(&["history", "--show", ""])
        .status(2)
        .stderr_has("a value is required for '--show <VERSION>' but none was supplied");
}
