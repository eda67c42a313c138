//! `[lock]` when the lock is lost mid-release: the holder's backend terminated (what a failover or an
//! idle-connection reaper does), the server restarted, the network silent (a proxy that stops
//! forwarding) or reset. No task starts without the lock but clean-up, the release exits 69 and says
//! which task last ran under the lock; another replica then runs the release, once; and a chaos test
//! does all of it at random moments.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::{Output, Running, Test, free_port};
use crate::lock::{database_url, locked};
use crate::proxy::Proxy;

/// Runs `t`, whose first task prints `ready` and waits for a file `go`: the holder's backend is
/// terminated while the task runs, the loss is seen in the log at once (while the task still
/// runs), then the task is let go; the finished run.
pub fn lose_the_lock_in_the_first_task(t: &Test) -> Output {
    let holder = t.spawn_until("| ready");
    assert_eq!(terminate_backend_of(holder.pid()), 1);
    holder.wait_for(
        "lost the [lock] database connection",
        Duration::from_secs(20),
    );
    std::fs::write(t.path("go"), "").unwrap();
    holder.wait()
}

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
    let t = locked(url, "lost", "once = true", tasks)
        .env("RELEASE_TASKS_VERSION", "v1")
        .args(&["--report", "report.json"]);
    let out = lose_the_lock_in_the_first_task(&t);
    out.status(69);
    let app = t.env_var("RELEASE_TASKS_APP").unwrap();
    assert_eq!(
        normalised(&out.stderr, &app),
        r#"INFO  release started app=APP version=v1 config=release.toml tasks=3 to_run=3
INFO  took the release lock lock=APP
INFO  task started task=migrate command="echo ready; while [ ! -e go ]; do sleep 0.05; done; echo migrate >> rows" timeout_s=1800
ERROR lost the [lock] database connection, and PostgreSQL releases the lock with it: another replica may start the release; a task running now is left to finish, and no further task starts here but clean-up (on = "failure" or "always") error="terminating connection due to administrator command (57P01)"
INFO  task finished task=migrate outcome=succeeded exit_code=0 duration_ms=N
ERROR the release lock is lost, so this task does not start, nor any later one but clean-up (on = "failure" or "always"); another replica may take the lock and run the release again task=seed last_task_under_lock=migrate reason="the database connection is closed (terminating connection due to administrator command (57P01))"
WARN  starting a clean-up task without the release lock task=maintenance-off
INFO  task started task=maintenance-off command="echo maintenance-off >> rows" timeout_s=1800
INFO  task finished task=maintenance-off outcome=succeeded exit_code=0 duration_ms=N
INFO  summary task=migrate outcome=succeeded exit_code=0 duration_ms=N detail=succeeded
INFO  summary task=seed outcome=not-run duration_ms=N detail="not run: the release lock was lost before it could start"
INFO  summary task=maintenance-off outcome=succeeded exit_code=0 duration_ms=N detail=succeeded
ERROR the release lock was lost: no task started after that but clean-up (on = "failure" or "always"); another replica may take the lock and run the release again exit_code=69 last_task_under_lock=migrate reason="lost the release lock `APP`: the database connection is closed (terminating connection due to administrator command (57P01))"
ERROR release failed status=failed exit_code=69 duration_ms=N tasks_run=2
"#
    );
    assert_eq!(
        std::fs::read_to_string(t.path("rows")).unwrap(),
        "migrate\nmaintenance-off\n",
        "the task running at the loss finishes, the next does not start, clean-up does"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path("report.json")).unwrap()).unwrap();
    assert_eq!(report["status"], "failed");
    assert_eq!(report["exit_code"], 69);
    assert_eq!(report["lock_lost"]["last_task_under_lock"], "migrate");
    assert_eq!(
        report["lock_lost"]["rerun"],
        "another replica may take the lock and run the release again"
    );
    assert_eq!(report["tasks"][1]["outcome"], "not-run");
    assert_eq!(report["tasks"][2]["outcome"], "succeeded");
    // The ledger still has the release as running: another replica runs it, and records it.
    let again = locked(url, "lost", "once = true", tasks).env("RELEASE_TASKS_VERSION", "v1");
    std::fs::write(again.path("go"), "").unwrap();
    again.run().status(0).stderr_lacks("skipping every task");
    assert_eq!(
        std::fs::read_to_string(again.path("rows")).unwrap(),
        "migrate\nseed\n"
    );
}

/// A network that goes silent (a proxy that stops forwarding, no RST, no FIN): the check before
/// the next task gets no answer and the lock counts as lost within its 10 s bound; once the server
/// drops its side, another replica runs the release, once.
#[test]
fn a_silent_network_is_a_lost_lock_at_the_next_task() {
    let Some(url) = database_url() else { return };
    let proxy = Proxy::start(server_address(url));
    let through = url.replacen(
        &format!("@127.0.0.1:{}/", server_address(url).port()),
        &format!("@127.0.0.1:{}/", proxy.port()),
        1,
    );
    let tasks = r#"
[tasks.migrate]
run = "echo ready; while [ ! -e go ]; do sleep 0.05; done; echo migrate >> rows"
[tasks.seed]
run = "echo seed >> rows"
"#;
    let t = locked(&through, "partition", "once = true", tasks).env("RELEASE_TASKS_VERSION", "v1");
    let holder = t.spawn_until("| ready");
    proxy.freeze();
    let frozen = Instant::now();
    std::fs::write(t.path("go"), "").unwrap();
    let out = holder.wait();
    out.status(69)
        .stderr_has("the database did not answer within 10s")
        .stderr_has("last_task_under_lock=migrate")
        .stderr_lacks("nothing was run");
    let noticed = frozen.elapsed();
    assert!(
        noticed >= Duration::from_secs(9) && noticed < Duration::from_secs(40),
        "{noticed:?}"
    );
    assert_eq!(
        std::fs::read_to_string(t.path("rows")).unwrap(),
        "migrate\n"
    );
    // The server learns of the partition (its keepalives would, in time): the lock is free.
    proxy.close_server_side();
    let other = locked(url, "partition", "once = true", tasks).env("RELEASE_TASKS_VERSION", "v1");
    std::fs::write(other.path("go"), "").unwrap();
    other.run().status(0);
    assert_eq!(
        std::fs::read_to_string(other.path("rows")).unwrap(),
        "migrate\nseed\n"
    );
    assert_one_succeeded_row(&other);
}

/// A stop signal that arrives while the check before a task waits for a slow database keeps the
/// task from starting, as it would have without the check.
#[test]
fn a_stop_signal_during_the_check_keeps_the_task_from_starting() {
    let Some(url) = database_url() else { return };
    let proxy = Proxy::start(server_address(url));
    let through = url.replacen(
        &format!("@127.0.0.1:{}/", server_address(url).port()),
        &format!("@127.0.0.1:{}/", proxy.port()),
        1,
    );
    let tasks = r#"
[tasks.migrate]
run = "echo ready; while [ ! -e go ]; do sleep 0.05; done; echo migrate >> rows"
[tasks.seed]
run = "echo seed >> rows"
"#;
    let t = locked(&through, "slow-check", "", tasks);
    let holder = t.spawn_until("| ready");
    proxy.hold();
    std::fs::write(t.path("go"), "").unwrap();
    // The check's query is now held in the proxy.
    holder.wait_for("task=migrate outcome=succeeded", Duration::from_secs(20));
    holder.signal("TERM");
    proxy.resume();
    holder
        .wait()
        .status(143)
        .stderr_lacks("task started task=seed")
        .stderr_lacks("lost");
    assert_eq!(
        std::fs::read_to_string(t.path("rows")).unwrap(),
        "migrate\n"
    );
}

/// A host that accepts the connection and then says nothing (a silent network, a hung pooler) is
/// given up after its `connect_timeout`, and the next host of the list is tried.
#[test]
fn a_silent_host_gives_way_to_the_next_one() {
    let Some(url) = database_url() else { return };
    let server = server_address(url).port();
    let proxy = Proxy::start(server_address(url));
    proxy.freeze();
    let listed = url.replacen(
        &format!("@127.0.0.1:{server}/"),
        &format!("@127.0.0.1:{},127.0.0.1:{server}/", proxy.port()),
        1,
    ) + "&connect_timeout=2";
    let t = locked(
        &listed,
        "silent-host",
        "",
        "[tasks.migrate]\nrun = \"touch ran\"\n",
    );
    let out = t.run();
    out.status(0);
    assert!(t.path("ran").exists());
    assert!(out.elapsed < Duration::from_secs(15), "{:?}", out.elapsed);
    // Alone, it is tried again until [lock] connect_timeout, then named.
    let alone = url.replacen(
        &format!("@127.0.0.1:{server}/"),
        &format!("@127.0.0.1:{}/", proxy.port()),
        1,
    ) + "&connect_timeout=2";
    let t = locked(
        &alone,
        "silent-host-alone",
        "connect_timeout = \"3s\"",
        "[tasks.migrate]\nrun = \"touch ran\"\n",
    );
    t.run()
        .status(69)
        .stderr_has("the server did not complete the connection within 2s")
        .stderr_lacks("test-password");
    assert!(!t.path("ran").exists());
}

/// The lock's connection has TCP keepalives that notice a silent network within about 25 s (10 s
/// idle, then 3 probes 5 s apart), and the URL's `keepalives_idle` is honoured; `ss` shows the
/// keepalive timer of the holder's socket.
#[test]
fn the_lock_connection_has_keepalives() {
    let Some(url) = database_url() else { return };
    if Command::new("ss").arg("-V").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have ss (iproute2)"
        );
        eprintln!("SKIPPED: no ss (iproute2)");
        return;
    }
    let tasks = "[tasks.migrate]\nrun = \"echo ready; while [ ! -e go ]; do sleep 0.05; done\"\n";
    for (n, (extra, most)) in [("", 10.0), ("&keepalives_idle=42", 42.0)]
        .iter()
        .enumerate()
    {
        let t = locked(
            &format!("{url}{extra}"),
            &format!("keepalive{n}"),
            "",
            tasks,
        );
        let holder = t.spawn_until("| ready");
        let timer = keepalive_timer(holder.pid(), server_address(url).port());
        std::fs::write(t.path("go"), "").unwrap();
        holder.wait().status(0);
        let seconds = timer.unwrap_or_else(|| panic!("no keepalive timer on the lock's socket"));
        // The kernel re-arms the timer for what is left of the idle time, so any value up to
        // the idle time may show; the system's default would show two hours.
        assert!(
            seconds <= *most && (*most < 11.0 || seconds > 11.0),
            "keepalive in {seconds} s, expected up to {most} s"
        );
    }
}

/// The seconds left on the keepalive timer of `pid`'s connection to `port`, as `ss` shows it
/// (`timer:(keepalive,9.8sec,0)`).
fn keepalive_timer(pid: i32, port: u16) -> Option<f64> {
    let out = Command::new("ss")
        .args([
            "-tnopH",
            "state",
            "established",
            &format!("( dport = :{port} )"),
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text.lines().find(|l| l.contains(&format!("pid={pid},")))?;
    let timer = line.split("timer:(keepalive,").nth(1)?.split(',').next()?;
    if let Some(seconds) = timer.strip_suffix("sec") {
        return seconds.parse().ok();
    }
    if let Some(ms) = timer.strip_suffix("ms") {
        return ms.parse::<f64>().ok().map(|ms| ms / 1000.0);
    }
    None
}

/// A server restarted mid-release (`pg_ctl restart -m immediate`, as a crash or failover does) on a
/// server of the test's own: the holder's lock is gone with it; the next task does not start; after
/// the restart another run completes the release, and the ledger has it once.
#[test]
fn a_restarted_server_is_a_lost_lock() {
    if database_url().is_none() {
        return;
    }
    let Some(bin) = postgres_bin() else { return };
    let port = free_port();
    let dir = format!("/tmp/release-tasks-test-pg-restart-{}", std::process::id());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/test-postgres");
    let env = [
        ("RELEASE_TASKS_TEST_PG_DIR", dir.as_str()),
        ("RELEASE_TASKS_TEST_PG_PORT", &port.to_string()),
    ];
    let started = Command::new("bash")
        .arg(script)
        .envs(env)
        .output()
        .expect("run test-postgres");
    if !started.status.success() {
        let why = String::from_utf8_lossy(&started.stderr);
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must start its own server: {why}"
        );
        eprintln!("SKIPPED: cannot start a server of this test's own: {why}");
        return;
    }
    let url = String::from_utf8_lossy(&started.stdout).trim().to_owned();
    let tasks = r#"
[tasks.migrate]
run = "echo ready; while [ ! -e go ]; do sleep 0.05; done; echo migrate >> rows"
[tasks.seed]
run = "echo seed >> rows"
"#;
    let t = locked(&url, "restart", "once = true", tasks).env("RELEASE_TASKS_VERSION", "v1");
    let holder = t.spawn_until("| ready");
    // pg_ctl refuses to run as root: as scripts/test-postgres does, run it as postgres then.
    let mut ctl = if is_root() {
        let mut ctl = Command::new("runuser");
        ctl.args(["-u", "postgres", "--", &format!("{bin}/pg_ctl")]);
        ctl
    } else {
        Command::new(format!("{bin}/pg_ctl"))
    };
    let restarted = ctl
        .args([
            "-D",
            &dir,
            "-l",
            &format!("{dir}/server.log"),
            "-m",
            "immediate",
            "-w",
            "restart",
        ])
        .output()
        .expect("run pg_ctl");
    let holder_out = {
        std::fs::write(t.path("go"), "").unwrap();
        holder.wait()
    };
    let again = if restarted.status.success() {
        let other =
            locked(&url, "restart", "once = true", tasks).env("RELEASE_TASKS_VERSION", "v1");
        std::fs::write(other.path("go"), "").unwrap();
        let out = other.run();
        let rows = std::fs::read_to_string(other.path("rows")).unwrap_or_default();
        let ledger = other.run_with(&["history", "--log-format", "json"]);
        Some((out, rows, ledger))
    } else {
        None
    };
    Command::new("bash")
        .args([script, "stop"])
        .envs(env)
        .output()
        .ok();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        restarted.status.success(),
        "pg_ctl restart failed: {}",
        String::from_utf8_lossy(&restarted.stderr)
    );
    holder_out
        .status(69)
        .stderr_has("lost the [lock] database connection")
        .stderr_has("last_task_under_lock=migrate")
        .stderr_lacks("nothing was run");
    assert_eq!(
        std::fs::read_to_string(t.path("rows")).unwrap(),
        "migrate\n"
    );
    let (out, rows, ledger) = again.expect("ran after the restart");
    out.status(0);
    assert_eq!(rows, "migrate\nseed\n");
    ledger.status(0);
    let lines: Vec<serde_json::Value> = ledger
        .stdout()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{}", ledger.stdout());
    assert_eq!(lines[0]["status"], "succeeded");
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// The PostgreSQL server binaries (`pg_ctl`), as scripts/test-postgres finds them.
fn postgres_bin() -> Option<String> {
    let mut found: Vec<String> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| Some(e.ok()?.path().join("bin")))
        .filter(|p| p.join("pg_ctl").exists())
        .map(|p| p.display().to_string())
        .collect();
    found.sort();
    let bin = found.pop();
    if bin.is_none() {
        assert!(std::env::var_os("CI").is_none(), "CI must have pg_ctl");
        eprintln!("SKIPPED: no pg_ctl under /usr/lib/postgresql");
    }
    bin
}

/// The test server's address, from its URL.
pub fn server_address(url: &str) -> std::net::SocketAddr {
    let port: u16 = url
        .split("@127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|p| p.parse().ok())
        .expect("the test URL's port");
    std::net::SocketAddr::from(([127, 0, 0, 1], port))
}

/// The ledger of `t`'s release has exactly one row, `succeeded`.
fn assert_one_succeeded_row(t: &Test) {
    let out = t.run_with(&["history", "--log-format", "json"]);
    out.status(0);
    let rows: Vec<serde_json::Value> = out
        .stdout()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 1, "{}", out.stdout());
    assert_eq!(rows[0]["status"], "succeeded", "{}", out.stdout());
}

/// How the chaos test takes the lock away.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// `pg_terminate_backend` on the holder's sessions.
    Terminate,
    /// Every connection through the proxy closed, both sides, at once.
    Cut,
}

/// xorshift64*: enough randomness for moments, reproducible from the seed it prints.
struct Moments(u64);

impl Moments {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// The lock taken away at random moments of a release (before a task, in a task, between tasks, in
/// the ledger write, after the end) while a second replica waits: no task starts in the holder after
/// the loss (but the one whose check passed just before it), the holder exits 0 or 69, the other
/// replica then runs the release to completion once (or skips it, if the holder's outcome was
/// committed), and the ledger ends with one row, `succeeded`, whose duration is the completing run's.
/// `RELEASE_TASKS_CHAOS_SEED` replays a run.
#[test]
fn chaos_the_lock_taken_away_at_random_moments() {
    let Some(url) = database_url() else { return };
    let seed = std::env::var("RELEASE_TASKS_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    eprintln!("chaos seed: RELEASE_TASKS_CHAOS_SEED={seed}");
    let mut moments = Moments(seed);
    for round in 0..8 {
        let fault = if round % 2 == 0 {
            Fault::Terminate
        } else {
            Fault::Cut
        };
        let delay = Duration::from_millis(moments.below(1400));
        chaos_round(url, round, fault, delay, seed);
    }
}

/// One round of the chaos test: `fault` `delay` after the holder took the lock.
fn chaos_round(url: &str, round: u32, fault: Fault, delay: Duration, seed: u64) {
    let proxy = Proxy::start(server_address(url));
    let through = url.replacen(
        &format!("@127.0.0.1:{}/", server_address(url).port()),
        &format!("@127.0.0.1:{}/", proxy.port()),
        1,
    );
    let app = format!("chaos{round}");
    // Where every task of both replicas says that it started, with its release-tasks's pid.
    let shared = tempfile::tempdir().unwrap();
    let starts = shared.path().join("starts").display().to_string();
    let tasks = ["t1", "t2", "t3"]
        .map(|t| format!("[tasks.{t}]\nrun = \"echo $PPID {t} >> {starts}; sleep 0.3\"\n"))
        .concat();
    let holder_test = locked(
        match fault {
            Fault::Terminate => url,
            Fault::Cut => &through,
        },
        &app,
        "once = true\ntimeout = \"2m\"",
        &tasks,
    )
    .env("RELEASE_TASKS_VERSION", "v1")
    .args(&["--report", "report.json"]);
    let other_test = locked(url, &app, "once = true\ntimeout = \"2m\"", &tasks)
        .env("RELEASE_TASKS_VERSION", "v1")
        .args(&["--report", "report.json"]);
    let holder = holder_test.spawn_until("took the release lock");
    let holder_pid = holder.pid();
    let other: Running = other_test.spawn();
    // The random moment itself: what the test waits for is the fault, not a condition.
    std::thread::sleep(delay);
    match fault {
        Fault::Terminate => drop(terminate_backend_of(holder_pid)),
        Fault::Cut => proxy.cut(),
    }
    append(&starts, "FAULT");
    let holder_out = holder.wait();
    let other_out = other.wait();
    let context = format!(
        "round {round}, {fault:?} after {delay:?} (seed {seed})\nholder:\n{}\nother:\n{}",
        holder_out.stderr, other_out.stderr
    );
    let code = holder_out.code;
    eprintln!("round {round}: {fault:?} after {delay:?}: the holder exited {code:?}");
    assert!(
        code == Some(0) || code == Some(69),
        "holder exit {code:?}; {context}"
    );
    assert_eq!(other_out.code, Some(0), "{context}");
    let log = std::fs::read_to_string(&starts).unwrap_or_default();
    let holder_ran = log
        .lines()
        .any(|l| l.starts_with(&format!("{holder_pid} ")));
    assert!(
        !(holder_ran && holder_out.stderr.contains("nothing was run")),
        "a line says nothing was run, and something did; {context}\n{log}"
    );
    let (before, after) = log.split_once("FAULT\n").unwrap_or((&log, ""));
    let holder_after = after
        .lines()
        .filter(|l| l.starts_with(&format!("{holder_pid} ")))
        .count();
    assert!(
        holder_after <= 1,
        "{holder_after} tasks started in the holder after the fault; {context}\n{log}"
    );
    let other_ran: Vec<&str> = log
        .lines()
        .filter(|l| !l.starts_with(&format!("{holder_pid} ")) && *l != "FAULT")
        .map(|l| l.split(' ').nth(1).unwrap_or_default())
        .collect();
    let completing = if code == Some(0) {
        assert!(
            other_out.stderr.contains("skipping every task"),
            "the holder's release was committed, the other must skip it; {context}"
        );
        assert!(other_ran.is_empty(), "{context}\n{log}");
        assert_eq!(before.lines().count() + holder_after, 3, "{context}\n{log}");
        &holder_test
    } else {
        assert_eq!(
            other_ran,
            ["t1", "t2", "t3"],
            "the other replica runs the release, once; {context}\n{log}"
        );
        &other_test
    };
    assert_ledger_is_the_run_of(&other_test, completing, &context);
}

/// The ledger (read through `t`) has one row, `succeeded`, whose duration is the length of the run
/// that completed the release (its `--report`).
fn assert_ledger_is_the_run_of(t: &Test, completing: &Test, context: &str) {
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(completing.path("report.json")).unwrap())
            .unwrap();
    let length = report["duration_ms"].as_f64().unwrap() / 1000.0;
    let ledger = t.run_with(&["history", "--log-format", "json"]);
    ledger.status(0);
    let rows: Vec<serde_json::Value> = ledger
        .stdout()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 1, "{context}\n{}", ledger.stdout());
    assert_eq!(rows[0]["status"], "succeeded", "{context}");
    let recorded = rows[0]["duration_s"].as_f64().unwrap();
    assert!(
        (recorded - length).abs() < 1.0,
        "the ledger says {recorded} s, the completing run took {length} s; {context}"
    );
}

/// Appends a line to `path` (one write, `O_APPEND`, as the tasks' `>>` does).
fn append(path: &str, line: &str) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    file.write_all(format!("{line}\n").as_bytes()).unwrap();
}

/// `stderr` with what varies from run to run replaced: each line's timestamp dropped, the app's
/// unique name as `APP`, every `duration_ms` as `N`.
pub fn normalised(stderr: &str, app: &str) -> String {
    let mut out = String::new();
    for line in stderr.lines() {
        let line = line.split_once(' ').map_or(line, |(_, rest)| rest);
        let line = line.replace(app, "APP");
        let mut words: Vec<String> = Vec::new();
        for word in line.split(' ') {
            if word.starts_with("duration_ms=") {
                words.push("duration_ms=N".to_owned());
            } else {
                words.push(word.to_owned());
            }
        }
        out.push_str(&words.join(" "));
        out.push('\n');
    }
    out
}
