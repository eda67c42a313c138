//! The `[lock] once` ledger tells the truth: its times are the server's clock when each write runs
//! (a release of known length shows that length in `history`, its JSON and "completed at"), and
//! `history` shows stored values as data, whatever a client wrote into them.

use std::process::Command;
use std::time::{Duration, SystemTime};

use crate::lock::{database_url, locked};

/// Runs SQL as the test server's superuser (`scripts/test-postgres psql`); returns its output.
pub fn superuser_sql(sql: &str) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/test-postgres");
    let out = Command::new("bash")
        .args([script, "psql", "-At", "-c", sql])
        .output()
        .expect("run scripts/test-postgres psql");
    assert!(
        out.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn time(text: &str) -> SystemTime {
    humantime::parse_rfc3339(text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
}

fn apart(a: SystemTime, b: SystemTime) -> Duration {
    a.duration_since(b)
        .or_else(|_| b.duration_since(a))
        .unwrap_or_default()
}

#[test]
fn ledger_times_are_true_to_the_second() {
    let Some(url) = database_url() else { return };
    // Taken a while before the release: the lock's transaction is old by the time the ledger is
    // written, which is what showed `now()`'s error.
    let tasks = "[tasks.migrate]\nrun = \"sleep 3\"\n[tasks.seed]\nrun = \"sleep 1\"\n";
    let t = locked(url, "clock", "once = true", tasks)
        .env("RELEASE_TASKS_VERSION", "v1")
        .args(&["--report", "report.json"]);
    t.run().status(0);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path("report.json")).unwrap()).unwrap();
    let length = Duration::from_millis(report["duration_ms"].as_u64().unwrap());
    assert!(length >= Duration::from_secs(4), "{length:?}");
    let finished = time(report["finished_at"].as_str().unwrap());

    let out = t.run_with(&["history", "--log-format", "json"]);
    out.status(0);
    let row: serde_json::Value = serde_json::from_str(out.stdout().trim()).unwrap();
    let recorded = row["duration_s"].as_f64().unwrap();
    assert!(
        (recorded - length.as_secs_f64()).abs() < 1.0,
        "history says {recorded} s, the release took {length:?}"
    );
    let started = time(row["started_at"].as_str().unwrap());
    let report_started = time(report["started_at"].as_str().unwrap());
    assert!(
        apart(started, report_started) < Duration::from_millis(1500),
        "started_at {started:?} vs the report's {report_started:?}"
    );
    let text = t.run_with(&["history"]);
    text.status(0);
    let line = text.stdout().lines().nth(1).unwrap_or_default().to_owned();
    let shown = format!("  {}s  ", length.as_secs_f64().round());
    assert!(line.contains(&shown), "{line:?} lacks {shown:?}");

    // "already completed ... at T" names the completion, to the second.
    let again = t.run();
    again.status(0).stderr_has("skipping every task");
    let at = again
        .stderr
        .split(" at ")
        .nth(1)
        .and_then(|rest| rest.split(['"', ' ']).next())
        .unwrap_or_default()
        .to_owned();
    assert!(
        apart(time(&at), finished) < Duration::from_millis(1500),
        "completed at {at} but the release finished at {finished:?}:\n{}",
        again.stderr
    );
}

#[test]
fn history_shows_stored_values_as_data() {
    let Some(url) = database_url() else { return };
    let t = locked(
        url,
        "hostile-history",
        "once = true",
        "[tasks.a]\nrun = \"true\"\n",
    )
    .env("RELEASE_TASKS_VERSION", "v1");
    t.run().status(0);
    let key = t.env_var("RELEASE_TASKS_APP").unwrap();
    // What any client of the database may have written; fixed times, so the output is exact.
    superuser_sql(&format!(
        "DELETE FROM release_tasks_runs WHERE lock_key = '{key}'; \
         INSERT INTO release_tasks_runs (lock_key, release, status, holder, started_at, finished_at, exit_code, version, commit) VALUES \
         ('{key}', 'r1', 'succeeded', E'web.1\\ttab', '2026-01-02 03:04:05+00', '2026-01-02 03:04:08+00', 0, E'v2\\nv1      fake    succeeded', 'abc'), \
         ('{key}', 'r2', 'failed', E'\\033]0;owned\\007\\033[2J', '2026-01-01 00:00:00+00', '2026-01-01 00:01:30+00', 1, E'v\\\\n\\r\\u202e', NULL)"
    ));
    let out = t.run_with(&["history"]);
    out.status(0);
    assert_eq!(
        out.stdout(),
        "VERSION                        COMMIT  STATUS     STARTED               DURATION  HOLDER\n\
         v2\\nv1      fake    succeeded  abc     succeeded  2026-01-02T03:04:05Z  3s        web.1\\ttab\n\
         v\\\\n\\r\\u{202e}                 -       failed     2026-01-01T00:00:00Z  1m 30s    \\u{1b}]0;owned\\u{7}\\u{1b}[2J\n"
    );
}
