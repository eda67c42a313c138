//! `[lock]` on a real MariaDB (started by `scripts/test-mariadb`, TLS on): the scenarios of
//! `lock.rs` and `lock_servers.rs`, with `mysql = "DATABASE_URL"`. 8 racing replicas, a holder killed,
//! a failed release run again, a wrong password, the lock timeout, a server that starts late, 64
//! replicas on a user limited to 20 connections, `wait`, `history`, URLs as apps have them, and servers
//! that cannot give a shared lock (Vitess, Galera), played by a small fake server on loopback.

use std::io::{Read, Write};
use std::sync::OnceLock;
use std::time::Duration;

use crate::harness::{Output, Running, alive, free_port, read_pid};
use crate::lock::locked_on;
use crate::lock_servers::script;

const PASSWORD: &str = "test-password";

/// The URL of the test server (TLS required), or `None` (the test is skipped; under CI it fails).
pub fn mysql_url() -> Option<&'static str> {
    static URL: OnceLock<Option<String>> = OnceLock::new();
    URL.get_or_init(|| {
        std::env::var("RELEASE_TASKS_TEST_MYSQL_URL")
            .ok()
            .or_else(|| script("test-mariadb", &[], &[]))
    })
    .as_deref()
}

fn locked(url: &str, app: &str, lock: &str, tasks: &str) -> crate::harness::Test {
    locked_on("mysql", url, app, lock, tasks)
}

/// The same server as another of its users.
fn as_user(url: &str, user: &str) -> String {
    url.replacen("release_tasks:", &format!("{user}:"), 1)
}

#[test]
fn eight_replicas_run_each_task_exactly_once() {
    let Some(url) = mysql_url() else { return };
    let tasks = "[tasks.migrate]\nrun = \"echo migrate >> rows; sleep 0.3\"\n[tasks.seed]\nrun = \"echo seed >> rows\"\n";
    let t = locked(url, "my-eight", "once = true\ntimeout = \"1m\"", tasks)
        .env("RELEASE_TASKS_VERSION", "v8");
    let replicas: Vec<Running> = (0..8).map(|_| t.spawn()).collect();
    let outputs: Vec<Output> = replicas.into_iter().map(Running::wait).collect();
    for out in &outputs {
        out.status(0).stderr_lacks(PASSWORD);
    }
    let rows = std::fs::read_to_string(t.path("rows")).unwrap();
    let mut lines: Vec<&str> = rows.lines().collect();
    lines.sort_unstable();
    assert_eq!(lines, ["migrate", "seed"], "each task exactly once");
    let skipped = outputs
        .iter()
        .filter(|o| o.stderr.contains("skipping every task"))
        .count();
    assert_eq!(skipped, 7, "the other replicas skip the completed release");
    assert!(
        outputs.iter().any(|o| o
            .stderr
            .contains("another replica holds the release lock; waiting")
            && o.stderr.contains("holder=\"release-tasks pid ")),
        "a waiting replica says who holds the lock (performance_schema)"
    );
}

#[test]
fn the_lock_is_released_when_its_holder_is_sigkilled() {
    let Some(url) = mysql_url() else { return };
    let tasks = "[tasks.migrate]\nrun = \"echo ran >> rows; [ -e fast ] || { echo $$ > pid; echo ready; sleep 60; }\"\n";
    let t = locked(url, "my-sigkill", "once = true\ntimeout = \"1m\"", tasks)
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
    // The ledger shows the run that completed, not the abandoned one.
    let history = t.run_with(&["history", "--log-format", "json"]);
    history.status(0);
    let rows: Vec<serde_json::Value> = history
        .stdout()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["status"], "succeeded");
}

#[test]
fn a_waiting_replica_gives_up_after_the_lock_timeout() {
    let Some(url) = mysql_url() else { return };
    let tasks = "[tasks.migrate]\nrun = \"echo ready; sleep 60\"\ngrace = \"1s\"\n";
    let t = locked(url, "my-timeout", "timeout = \"1s\"", tasks);
    let holder = t.spawn_until("| ready");
    let out = t.run();
    out.status(75)
        .stderr_has(&format!("[lock] release-tasks pid {} on ", holder.pid()))
        .stderr_has("(connection ")
        .stderr_has("still held the release lock")
        .stderr_has("raise [lock] timeout")
        .stdout_lacks("ready");
    // A user that may not read performance_schema sees the connection only.
    let limited = as_user(url, "release_tasks_limited");
    let out = locked(&limited, "my-timeout", "timeout = \"1s\"", tasks).run();
    out.status(75)
        .stderr_has("[lock] connection ")
        .stderr_has("still held the release lock");
    holder.signal("TERM");
    holder.wait().status(143);
}

#[test]
fn a_failed_release_is_recorded_and_run_again() {
    let Some(url) = mysql_url() else { return };
    let t = locked(
        url,
        "my-failed",
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
fn a_wrong_password_fails_before_any_task_without_showing_it() {
    let Some(url) = mysql_url() else { return };
    let wrong = url.replace(PASSWORD, "wrong-hunter2");
    let t = locked(
        &wrong,
        "my-password",
        "",
        "[tasks.migrate]\nrun = \"touch ran\"\n",
    );
    let out = t.run();
    out.status(69)
        .stderr_has("Access denied for user 'release_tasks'")
        .stderr_has("(error 1045, SQLSTATE 28000)")
        .stderr_has("nothing was run")
        .stderr_lacks("wrong-hunter2");
    assert!(!out.stdout().contains("wrong-hunter2"));
    assert!(!t.path("ran").exists());
}

#[test]
fn an_unreachable_server_is_tried_until_connect_timeout() {
    let port = free_port();
    let url = format!("mysql://release_tasks:{PASSWORD}@127.0.0.1:{port}/release_tasks");
    let t = locked(
        &url,
        "my-unreachable",
        "connect_timeout = \"2s\"",
        "[tasks.migrate]\nrun = \"touch ran\"\n",
    );
    let out = t.run();
    out.status(69)
        .stderr_has("the [lock] database is not available yet; trying again")
        .stderr_has("raise [lock] connect_timeout")
        .stderr_has(&format!(
            "cannot use the database at mysql://[redacted]@127.0.0.1:{port}/[redacted] (from DATABASE_URL)"
        ))
        .stderr_lacks(PASSWORD);
    assert!(!t.path("ran").exists());
}

#[test]
fn a_server_that_starts_late_is_waited_for() {
    if mysql_url().is_none() {
        return;
    }
    let port = free_port();
    let dir = format!("/tmp/release-tasks-test-my-late-{}", std::process::id());
    let env = [
        ("RELEASE_TASKS_TEST_MY_DIR", dir.as_str()),
        ("RELEASE_TASKS_TEST_MY_PORT", &port.to_string()),
    ];
    let url = format!(
        "mysql://release_tasks:{PASSWORD}@127.0.0.1:{port}/release_tasks?ssl-mode=REQUIRED"
    );
    let t = locked(
        &url,
        "my-late",
        "connect_timeout = \"90s\"",
        "[tasks.migrate]\nrun = \"touch ran\"\n",
    );
    let release = t.spawn();
    release.wait_for(
        "the [lock] database is not available yet",
        Duration::from_secs(20),
    );
    let started = script("test-mariadb", &[], &env);
    let out = release.wait();
    script("test-mariadb", &["stop"], &env);
    let _ = std::fs::remove_dir_all(&dir);
    if started.is_none() {
        return;
    }
    out.status(0)
        .stderr_has("reason=\"Connection refused")
        .stderr_has("url=mysql://[redacted]@127.0.0.1:")
        .stderr_has("took the release lock")
        .stderr_lacks(PASSWORD);
    assert!(t.path("ran").exists());
}

#[test]
fn sixty_four_replicas_share_a_user_limited_to_twenty_connections() {
    let Some(url) = mysql_url() else { return };
    let limited = as_user(url, "release_tasks_limited");
    // The migration needs a connection of the same user, as the app's would: waiting replicas that
    // kept theirs would leave it none (it tries for 5 s).
    let tasks = "[tasks.migrate]\nrun = \"\"\"n=0; until mariadb -h127.0.0.1 -P\"$PORT\" -urelease_tasks_limited -ptest-password \
                 release_tasks -e 'select 1' >/dev/null 2>&1; do n=$((n+1)); [ $n -ge 25 ] && exit 9; sleep 0.2; done; \
                 echo ran >> rows; sleep 2\"\"\"\n";
    let port = url
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split_once('/'))
        .map(|(port, _)| port.to_owned())
        .unwrap();
    let t = locked(&limited, "my-crowd", "once = true\ntimeout = \"2m\"", tasks)
        .env("RELEASE_TASKS_VERSION", "v64")
        .env("PORT", &port);
    let replicas: Vec<Running> = (0..64).map(|_| t.spawn()).collect();
    let outputs: Vec<Output> = replicas.into_iter().map(Running::wait).collect();
    for out in &outputs {
        out.status(0);
    }
    assert_eq!(std::fs::read_to_string(t.path("rows")).unwrap(), "ran\n");
}

#[test]
fn wait_and_history_read_the_ledger() {
    let Some(url) = mysql_url() else { return };
    let tasks = "[tasks.migrate]\nrun = \"sleep 2; test $RELEASE_TASKS_VERSION != v3\"\n";
    let release = |version: &str| {
        locked(url, "my-ledger", "once = true", tasks)
            .env("RELEASE_TASKS_VERSION", version)
            .env("RELEASE_TASKS_COMMIT", &format!("abc{version}"))
    };
    let waiting = release("v1").args(&["wait", "--timeout", "60s"]);
    let mut waiter = waiting.spawn();
    waiter.wait_for(
        "waiting for the release to complete",
        Duration::from_secs(20),
    );
    assert!(
        waiter.child.try_wait().unwrap().is_none(),
        "wait returned before the release ran"
    );
    for (version, code) in [("v1", 0), ("v2", 0), ("v3", 1)] {
        release(version).run().status(code);
    }
    waiter
        .wait()
        .status(0)
        .stderr_has("ledger=\"not recorded yet\"")
        .stderr_has("the release completed; done waiting");
    let out = release("v9").run_with(&["wait", "--timeout", "2s"]);
    out.status(75)
        .stderr_has("release v9 of `my-ledger-")
        .stderr_has("was not completed within 2s (it is not recorded yet");
    let out = release("v1").run_with(&["history", "-n", "2"]);
    out.status(0);
    let text = out.stdout();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].starts_with("VERSION  COMMIT  STATUS"), "{text}");
    assert!(lines[1].starts_with("v3       abcv3   failed"), "{text}");
    assert!(lines[2].starts_with("v2       abcv2   succeeded"), "{text}");
    // Times are the server's clock at each write: a 2 s release lasts 2 s.
    assert!(lines[2].contains("  2s  "), "{text}");
    let out = release("v1").run_with(&["history", "--log-format", "json"]);
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
    let duration = rows[1]["duration_s"].as_f64().unwrap();
    assert!((2.0..3.5).contains(&duration), "{duration}");
}

#[test]
fn urls_as_apps_write_them_are_usable() {
    let Some(url) = mysql_url() else { return };
    let base = url.split_once('?').map_or(url, |(b, _)| b);
    let ca = "/tmp/release-tasks-test-my.crt";
    let hostport = base.rsplit_once('@').unwrap().1;
    for (i, url) in [
        format!("mysql2://release_tasks_native:{PASSWORD}@{hostport}?ssl-mode=disabled&encoding=utf8mb4&pool=5"),
        format!("mariadb://release_tasks_odd:p%2Fw%3Fx%23y%40z@{hostport}?sslmode=Required"),
        // The password as it is, delimiters and all: the credential ends at the last @.
        format!("mysql://release_tasks_odd:p/w?x#y@z@{hostport}?connection_limit=5&pool_timeout=2"),
        format!("mysql://release_tasks:{PASSWORD}@{hostport}?ssl-mode=VERIFY_IDENTITY&ssl-ca={ca}"),
        format!("mysql://release_tasks:{PASSWORD}@{hostport}?sslca={ca}"),
    ]
    .iter()
    .enumerate()
    {
        locked(url, &format!("my-url-{i}"), "", "[tasks.a]\nrun = \"touch ran\"\n")
            .run()
            .status(0)
            .stderr_has("took the release lock")
            .stderr_lacks("p/w?x#y@z")
            .stderr_lacks(PASSWORD);
    }
    // Checking the certificate against the built-in roots fails for a self-signed one: 69, nothing run.
    let strict = format!("mysql://release_tasks:{PASSWORD}@{hostport}?ssl-mode=VERIFY_CA");
    locked(
        &strict,
        "my-url-strict",
        "",
        "[tasks.a]\nrun = \"touch ran\"\n",
    )
    .run()
    .status(69)
    .stderr_has("TLS: invalid peer certificate")
    .stderr_has("nothing was run");
    // An unknown parameter is named before anything runs, without the password.
    let unknown = format!("mysql://release_tasks_odd:p/w?x#y@z@{hostport}?sslmod=REQUIRED");
    locked(
        &unknown,
        "my-url-unknown",
        "",
        "[tasks.a]\nrun = \"touch ran\"\n",
    )
    .run()
    .status(78)
    .stderr_has("parameter sslmod is not one release-tasks knows")
    .stderr_lacks("p/w?x#y@z");
    // A PostgreSQL URL under `mysql =`, and the other way round.
    locked(
        "postgres://u:p@h/db",
        "my-url-wrong",
        "",
        "[tasks.a]\nrun = \"touch ran\"\n",
    )
    .run()
    .status(78)
    .stderr_has("it is a PostgreSQL URL, and [lock] says mysql = ...");
    locked_on(
        "postgres",
        url,
        "my-url-wrong",
        "",
        "[tasks.a]\nrun = \"touch ran\"\n",
    )
    .run()
    .status(78)
    .stderr_has("it is a MySQL URL, and [lock] says postgres = ...");
}

/// A server that greets as `version`, accepts any login, and answers every query with the one row
/// `wsrep_on | wsrep`: enough to be Vitess or a Galera node to the client. Returns its port.
fn fake_server(version: &'static str, wsrep: &'static str) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            std::thread::spawn(move || {
                let packet = |s: &mut std::net::TcpStream, seq: u8, body: &[u8]| {
                    let mut p = (body.len() as u32).to_le_bytes()[..3].to_vec();
                    p.push(seq);
                    p.extend_from_slice(body);
                    s.write_all(&p)
                };
                let read = |s: &mut std::net::TcpStream| -> Option<Vec<u8>> {
                    let mut h = [0u8; 4];
                    s.read_exact(&mut h).ok()?;
                    let mut b = vec![0; usize::from(h[0]) | usize::from(h[1]) << 8];
                    s.read_exact(&mut b).ok()?;
                    Some(b)
                };
                let mut hello = vec![10];
                hello.extend_from_slice(version.as_bytes());
                hello.extend_from_slice(&[0, 1, 0, 0, 0]);
                hello.extend_from_slice(b"abcdefgh\0");
                // Protocol 4.1 + secure connection + plugin auth, no TLS.
                hello.extend_from_slice(&[0x00, 0x82, 45, 2, 0, 0x08, 0x00, 21]);
                hello.extend_from_slice(&[0; 10]);
                hello.extend_from_slice(b"ijklmnopqrst\0mysql_native_password\0");
                let _ = packet(&mut s, 0, &hello);
                if read(&mut s).is_none() {
                    return;
                }
                let _ = packet(&mut s, 2, &[0, 0, 0, 2, 0, 0, 0]);
                while let Some(query) = read(&mut s) {
                    if query.first() != Some(&3) {
                        return;
                    }
                    let column = |name: &str| {
                        let mut c = Vec::new();
                        for part in ["def", "", "", "", name, name] {
                            c.push(part.len() as u8);
                            c.extend_from_slice(part.as_bytes());
                        }
                        c.extend_from_slice(&[0x0c, 45, 0, 0, 1, 0, 0, 0xfd, 0, 0, 0, 0, 0]);
                        c
                    };
                    let mut row = Vec::new();
                    for v in ["wsrep_on", wsrep] {
                        row.push(v.len() as u8);
                        row.extend_from_slice(v.as_bytes());
                    }
                    let eof = [0xfe, 0, 0, 2, 0];
                    let ok = packet(&mut s, 1, &[2])
                        .and_then(|()| packet(&mut s, 2, &column("Variable_name")))
                        .and_then(|()| packet(&mut s, 3, &column("Value")))
                        .and_then(|()| packet(&mut s, 4, &eof))
                        .and_then(|()| packet(&mut s, 5, &row))
                        .and_then(|()| packet(&mut s, 6, &eof));
                    if ok.is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

#[test]
fn servers_without_a_shared_get_lock_are_refused_before_any_task() {
    for (version, wsrep, says) in [
        (
            "8.0.31-Vitess",
            "OFF",
            "the server is Vitess (8.0.31-Vitess)",
        ),
        (
            "10.6.16-MariaDB-log",
            "ON",
            "the server is a node of a Galera cluster (wsrep_on = ON",
        ),
    ] {
        let port = fake_server(version, wsrep);
        let url = format!("mysql://app:{PASSWORD}@127.0.0.1:{port}/shop");
        let t = locked(
            &url,
            "my-refused",
            "once = true",
            "[tasks.a]\nrun = \"touch ran\"\n",
        )
        .env("RELEASE_TASKS_VERSION", "v1");
        t.run()
            .status(69)
            .stderr_has(says)
            .stderr_has("nothing was run")
            .stderr_lacks(PASSWORD);
        assert!(!t.path("ran").exists());
    }
}

/// Ends the MariaDB session of the release-tasks with this pid (found by its `program_name`
/// connection attribute), as root, as a failover or an idle-connection reaper would; returns how
/// many sessions were ended.
fn kill_session_of(pid: i32) -> usize {
    let find = format!(
        "SELECT PROCESSLIST_ID FROM performance_schema.session_connect_attrs \
         WHERE ATTR_NAME = 'program_name' AND ATTR_VALUE LIKE 'release-tasks pid {pid} on %'"
    );
    let ids = script("test-mariadb", &["sql", "-N", "-e", &find], &[]).unwrap_or_default();
    let ids: Vec<&str> = ids.split_whitespace().collect();
    for id in &ids {
        script("test-mariadb", &["sql", "-e", &format!("KILL {id}")], &[]);
    }
    ids.len()
}

#[test]
fn no_task_starts_after_the_lock_is_lost_and_another_replica_runs_the_release() {
    let Some(url) = mysql_url() else { return };
    let tasks = r#"
[tasks.migrate]
run = "echo ready; while [ ! -e go ]; do sleep 0.05; done; echo migrate >> rows"
[tasks.seed]
run = "echo seed >> rows"
[tasks.maintenance-off]
run = "echo maintenance-off >> rows"
on = "failure"
"#;
    let t = locked(url, "my-lost", "once = true", tasks).env("RELEASE_TASKS_VERSION", "v1");
    let holder = t.spawn_until("| ready");
    assert_eq!(kill_session_of(holder.pid()), 1);
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
    // The ledger was left "running"; the next replica runs the release whole, once.
    t.run().status(0).stderr_lacks("skipping every task");
    t.run().status(0).stderr_has("skipping every task");
    assert_eq!(
        std::fs::read_to_string(t.path("rows")).unwrap(),
        "migrate\nmaintenance-off\nmigrate\nseed\n"
    );
}

#[test]
fn task_records_are_visible_as_the_release_proceeds_and_history_show_says_why_it_failed() {
    let Some(url) = mysql_url() else { return };
    crate::ledger::records_while_held("mysql", url, "my-why");
}

#[test]
fn wait_fail_fast_ends_as_soon_as_the_release_failed_and_nobody_holds_the_lock() {
    let Some(url) = mysql_url() else { return };
    crate::ledger::wait_fail_fast_on("mysql", url, "my-failfast");
}

#[test]
fn the_changed_gate_skips_what_did_not_change() {
    let Some(url) = mysql_url() else { return };
    let release = |v: &str| crate::ledger::changed_release_on("mysql", url, "my-changed", v);
    let t = release("v41");
    t.run().status(0);
    assert_eq!(crate::ledger::ran(&t), "migrating\n");
    // A config-only release: the migration's files are as at v41.
    let t = release("v42");
    t.run().status(0).stderr_has("unchanged since v41");
    assert_eq!(crate::ledger::ran(&t), "", "migrate was skipped");
    // A new migration file: it runs.
    let t = release("v43").file("db/migrate/002_more.rb", "alter table");
    t.run().status(0);
    assert_eq!(crate::ledger::ran(&t), "migrating\n");
    let out = t.run_with(&["history", "--show", "v43", "--log-format", "json"]);
    out.status(0);
    let doc: serde_json::Value = serde_json::from_str(out.stdout().trim()).unwrap();
    assert_eq!(doc["tasks"][0]["task"], "migrate");
    assert_eq!(doc["tasks"][0]["outcome"], "succeeded");
}

/// A loopback TCP proxy to `target` that can stop forwarding while it keeps every socket open, as a
/// network partition does (no RST, no FIN). Returns its port and the switch.
fn partition_proxy(target: u16) -> (u16, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let cut = Arc::new(AtomicBool::new(false));
    let switch = Arc::clone(&cut);
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", target)) else {
                continue;
            };
            for (mut from, mut to) in [
                (client.try_clone().unwrap(), server.try_clone().unwrap()),
                (server, client),
            ] {
                let cut = Arc::clone(&cut);
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16 * 1024];
                    loop {
                        let Ok(n) = from.read(&mut buf) else { return };
                        if n == 0 {
                            let _ = to.shutdown(std::net::Shutdown::Write);
                            return;
                        }
                        // Partitioned: what was read is never delivered, and nothing more is read.
                        while cut.load(Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        if to.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        }
    });
    (port, switch)
}

#[test]
fn a_silent_network_is_noticed_before_the_next_task() {
    let Some(url) = mysql_url() else { return };
    let port: u16 = url
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split_once('/'))
        .and_then(|(port, _)| port.parse().ok())
        .unwrap();
    let (proxy, cut) = partition_proxy(port);
    let through = url.replace(&format!(":{port}/"), &format!(":{proxy}/"));
    let tasks = r#"
[tasks.migrate]
run = "echo ready; while [ ! -e go ]; do sleep 0.05; done; echo migrate >> rows"
[tasks.seed]
run = "echo seed >> rows"
"#;
    let t = locked(&through, "my-partition", "", tasks);
    let holder = t.spawn_until("| ready");
    cut.store(true, std::sync::atomic::Ordering::SeqCst);
    std::fs::write(t.path("go"), "").unwrap();
    let out = holder.wait();
    out.status(69)
        .stderr_has("the database did not answer within 10s")
        .stderr_has("last_task_under_lock=migrate")
        .stderr_has("task=seed outcome=not-run");
    assert!(out.elapsed < Duration::from_secs(60), "{:?}", out.elapsed);
    assert_eq!(
        std::fs::read_to_string(t.path("rows")).unwrap(),
        "migrate\n",
        "no task starts once the lock cannot be proved"
    );
}
