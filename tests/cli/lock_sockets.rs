//! `[lock]` over a Unix socket, as Cloud SQL, Cloud Run and a local server hand it out: `host=/dir`
//! (in the query or as libpq's pair), a percent-encoded `%2Fdir` host; `port` picks
//! `.s.PGSQL.<port>`; no TLS over a socket, even with `sslmode=require` (libpq's rule).

use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use crate::harness::free_port;
use crate::lock::{database_url, locked};
use crate::lock_ledger::superuser_sql;

/// The test server's socket directory and port, when this test can reach the socket (the server
/// runs as the `postgres` user; its directory may be closed to others). `None`: skipped, or under CI
/// a failure.
fn socket_of(url: &str) -> Option<(String, u16)> {
    let dir = superuser_sql("SHOW unix_socket_directories")
        .split(',')
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    let port: u16 = url
        .split("@127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|p| p.parse().ok())
        .expect("the test URL's port");
    let socket = PathBuf::from(&dir).join(format!(".s.PGSQL.{port}"));
    match UnixStream::connect(&socket) {
        Ok(_) => Some((dir, port)),
        Err(err) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must run the Unix socket tests, but {} cannot be reached: {err}",
                socket.display()
            );
            eprintln!("SKIPPED: {} cannot be reached: {err}", socket.display());
            None
        }
    }
}

#[test]
fn a_unix_socket_directory_connects_without_tls() {
    let Some(url) = database_url() else { return };
    let Some((dir, port)) = socket_of(url) else {
        return;
    };
    let encoded = dir.replace('/', "%2F");
    let tasks = "[tasks.migrate]\nrun = \"echo ran >> rows\"\n";
    for (n, socket_url) in [
        // Cloud SQL's form: no host in the authority, the directory in the query.
        format!("postgresql://release_tasks:test-password@/release_tasks?host={dir}&port={port}&sslmode=require"),
        format!("postgres://release_tasks@{encoded}:{port}/release_tasks?sslmode=require"),
        format!("host={dir} port={port} user=release_tasks dbname=release_tasks sslmode=require"),
        format!("postgresql:///release_tasks?host={dir}&port={port}&user=release_tasks&sslmode=prefer"),
    ]
    .iter()
    .enumerate()
    {
        let t = locked(socket_url, &format!("socket{n}"), "once = true", tasks)
            .env("RELEASE_TASKS_VERSION", "v1");
        t.run()
            .status(0)
            .stderr_has("took the release lock")
            .stderr_lacks("test-password");
        t.run().status(0).stderr_has("skipping every task");
        assert_eq!(
            std::fs::read_to_string(t.path("rows")).unwrap(),
            "ran\n",
            "{socket_url}"
        );
        t.run_with(&["history"]).status(0).stdout_has("succeeded");
    }
    // The port names the socket file: another port finds none.
    let other = free_port();
    let t = locked(
        &format!("host={dir} port={other} user=release_tasks dbname=release_tasks"),
        "socket-port",
        "connect_timeout = \"1s\"",
        tasks,
    );
    t.run().status(69).stderr_has(&format!(
        "[lock] cannot use the database at [redacted] (socket {dir}/.s.PGSQL.{other}) (from DATABASE_URL): \
         error connecting to server: No such file or directory"
    ));
    assert!(!t.path("rows").exists());
}
