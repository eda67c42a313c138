//! `[lock]` when the lock is lost mid-release: the holder's backend terminated (what a failover, a
//! restart or an idle-connection reaper does). No task starts without the lock but clean-up, the
//! release exits 69 and says which task last ran under the lock.

use std::process::Command;

use crate::lock::{database_url, locked};

/// Terminates the database backend that holds the lock for the release-tasks with this pid (found
/// by its `application_name` and its advisory lock: with `once`, its second connection, which
/// writes the ledger's task records, is left alone), as the superuser; returns how many backends
/// were terminated.
pub fn terminate_backend_of(pid: i32) -> usize {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/test-postgres");
    let sql = format!(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name LIKE 'release-tasks pid {pid} on %' \
           AND pid IN (SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted)"
    );
    let out = Command::new("bash")
        .args([script, "psql", "-At", "-c", &sql])
        .output()
        .expect("run scripts/test-postgres psql");
    assert!(
        out.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a count")
}

#[test]
fn no_task_starts_after_the_lock_is_lost() {
    let Some(url) = database_url() else { return };
    let tasks = r#"
[tasks.migrate]
run = "echo ready; while [ ! -e go ]; do sleep 0.05; done; echo migrate >> rows"
[tasks.seed]
run = "echo seed >> rows"
[tasks.maintenance-off]
run = "echo maintenance-off >> rows"
on = "failure"
"#;
    let t = locked(url, "lost", "once = true", tasks).env("RELEASE_TASKS_VERSION", "v1");
    let holder = t.spawn_until("| ready");
    assert_eq!(terminate_backend_of(holder.pid()), 1);
    std::fs::write(t.path("go"), "").unwrap();
    let out = holder.wait();
    out.status(69)
        .stderr_has("last_task_under_lock=migrate")
        .stderr_has("another replica may take the lock and run the release again")
        .stderr_has("task=seed outcome=not-run")
        .stderr_lacks("nothing was run")
        .stderr_lacks("task=seed outcome=succeeded");
    assert_eq!(
        std::fs::read_to_string(t.path("rows")).unwrap(),
        "migrate\nmaintenance-off\n",
        "the task running at the loss finishes, the next does not start, clean-up does"
    );
}
