//! `[lock]` on MySQL and MariaDB: `GET_LOCK` on one connection held for the whole release.
//!
//! A MySQL named lock belongs to the session that took it: it is released by `RELEASE_LOCK` or when
//! the session ends, and never by a COMMIT. So the lock's connection is opened by release-tasks, used
//! for nothing else, never pooled, and kept open (with TCP keepalives) until the release ends. A
//! replica that finds the lock taken reads who holds it, disconnects and tries again after the same
//! jittered back-off as on PostgreSQL (`super`), so waiting replicas hold no connection between tries.
//!
//! Lock names are server-wide in MySQL (PostgreSQL's advisory locks are per database) and at most 64
//! characters: the name is `release-tasks:` + database + `:` + key, or a hash of that when longer.
//!
//! Servers where `GET_LOCK` is not a lock every client shares are refused before any task: a Galera
//! node (MariaDB Galera Cluster, Percona XtraDB Cluster: `wsrep_on = ON`), where the lock is one
//! node's only and PXC's strict mode refuses it, and Vitess (PlanetScale), which does not support it
//! on its own terms. The client is `wire.rs`, the URL `url.rs`, the ledger `ledger.rs`.

use std::cell::RefCell;
use std::time::Duration;

use tokio::sync::Mutex;

use super::{
    Answer, CHECK_TIMEOUT, CONNECT_ATTEMPT, FINISH_TIMEOUT, PreviousRun, Query, RECORD_TIMEOUT,
    Retry, Wait, application_name, chosen_url, key_for, lock_name, or_stop, release_id, secrets_of,
};
use crate::config::Lock;
use crate::error::Error;
use crate::gate::Env;
use crate::lock_check::{CheckFuture, LockCheck};
use crate::metadata::Metadata;
use crate::record::{RecordFuture, Recorder, TaskRecord};
use crate::redact;
use crate::report::Report;
use crate::signals::Signals;
use wire::{Conn, WireError, quote};

mod auth;
pub(super) mod ledger;
mod records;
pub(super) mod url;
mod wire;

/// TCP keepalive on the lock's connection: first probe after 10 s idle, then every 5 s, and the
/// connection is given up after 4 unanswered probes, so a silent network is noticed within ~30 s.
const KEEPALIVE: (Duration, Duration, u32) = (Duration::from_secs(10), Duration::from_secs(5), 4);

/// The problems with a MySQL URL that can be found before connecting.
pub(super) fn check_url(url: &str) -> Result<(), String> {
    let target = url::parse(url)?;
    super::tls::MakeRustls::new(&target.tls).map(drop)
}

/// The database `[lock]` uses on MySQL: where and how to connect, and what must not be shown.
pub(super) struct Database {
    var: String,
    shown: String,
    options: wire::Options,
    secrets: Vec<String>,
    connect_timeout: Duration,
    attempt_timeout: Duration,
    /// This replica's name, as other replicas see it (the `program_name` connection attribute).
    me: String,
    /// The database's name, part of the lock's name.
    schema: String,
}

impl Database {
    pub(super) fn open(lock: &Lock, env: &Env) -> Result<Database, Error> {
        let Some((var, url)) = chosen_url(lock, env) else {
            return Err(Error::Environment {
                problems: vec![format!(
                    "[lock] mysql names {}, none of which is set",
                    lock.url_vars.join(", ")
                )],
            });
        };
        let mut secrets = secrets_of(url);
        let bad = |e: String| {
            Error::Database(format!(
                "[lock] {var} is not a usable database URL: {}",
                redact::scrub(&e, &secrets)
            ))
        };
        let target = url::parse(url).map_err(bad)?;
        let tls = match target.tls.mode {
            super::url::SslMode::Disable => None,
            mode => Some((
                super::tls::MakeRustls::new(&target.tls)
                    .map_err(bad)?
                    .client_config(),
                mode != super::url::SslMode::Prefer,
            )),
        };
        if !target.password.is_empty() {
            secrets.push(target.password.clone());
        }
        let me = application_name(None);
        Ok(Database {
            var: var.to_owned(),
            shown: redact::url(url),
            schema: target.database.clone().unwrap_or_default(),
            options: wire::Options {
                host: target.host,
                port: target.port,
                user: target.user,
                password: target.password,
                database: target.database,
                tls,
                program_name: me.clone(),
                keepalive: KEEPALIVE,
            },
            secrets,
            connect_timeout: lock.connect_timeout,
            attempt_timeout: target.connect_timeout.unwrap_or(CONNECT_ATTEMPT),
            me,
        })
    }

    /// One connection attempt, within the URL's `connect_timeout` (else 15 s).
    async fn connect_once(&self) -> Result<Conn, WireError> {
        match tokio::time::timeout(self.attempt_timeout, Conn::connect(&self.options)).await {
            Ok(result) => result,
            Err(_) => Err(WireError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no answer within {} (connect_timeout)",
                    humantime::format_duration(self.attempt_timeout)
                ),
            ))),
        }
    }

    /// Connects, trying again with back-off while the server is not up yet or has no connection to
    /// spare, for up to `[lock] connect_timeout`. A wrong password or database fails at once.
    pub(super) async fn connect(&self, signals: &mut Signals) -> Result<Conn, Error> {
        let mut retry = Retry::new(&self.shown, &self.var, self.connect_timeout, "");
        loop {
            let result = or_stop(signals, async { Ok(self.connect_once().await) }).await?;
            let err = match result {
                Ok(conn) => return Ok(conn),
                Err(err) => err,
            };
            retry
                .after(signals, &self.scrub(&err.to_string()), is_transient(&err))
                .await?;
        }
    }

    fn scrub(&self, text: &str) -> String {
        redact::urls_in(&redact::scrub(text, &self.secrets))
    }

    pub(super) fn error(&self, what: &str, err: &WireError) -> Error {
        Error::Database(self.scrub(&format!("[lock] {what}: {err}")))
    }

    /// `work` (queries before the first task), within the connection attempt's timeout: a server
    /// that accepted the login but stops answering must not hold the release forever.
    async fn bounded<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        tokio::time::timeout(self.attempt_timeout, work)
            .await
            .unwrap_or_else(|_| {
                Err(Error::Database(format!(
                    "[lock] the database at {} (from {}) did not answer within {} before the first task",
                    self.shown,
                    self.var,
                    humantime::format_duration(self.attempt_timeout)
                )))
            })
    }

    /// For `wait`: the release's row, and who holds the lock.
    pub(super) async fn look(
        &self,
        conn: &mut Conn,
        name: &str,
        release: &str,
    ) -> Result<(Option<super::ledger::Status>, Option<String>), Error> {
        let status = ledger::status_of(conn, name, release)
            .await
            .map_err(|e| self.error("cannot read release_tasks_runs", &e))?;
        let holder = holder_of(conn, &self.lock_name(name))
            .await
            .map_err(|e| self.error("cannot read who holds the lock", &e))?;
        Ok((status, holder))
    }

    /// For `history`: the ledger's answer to `query`.
    pub(super) async fn read(
        &self,
        conn: &mut Conn,
        name: &str,
        query: &Query<'_>,
    ) -> Result<Answer, Error> {
        let answer = match query {
            Query::Last(limit) => records::releases(conn, name, *limit)
                .await
                .map(Answer::Releases),
            Query::Show(wanted) => match records::release(conn, name, wanted).await {
                Ok(None) => Ok(Answer::Release(None)),
                Ok(Some(entry)) => records::tasks(conn, name, &entry.release)
                    .await
                    .map(|tasks| Answer::Release(Some((entry, tasks)))),
                Err(err) => Err(err),
            },
        };
        answer.map_err(|e| self.error("cannot read the release ledger", &e))
    }

    /// For `plan`: what each of `tasks` recorded at its last successful run (`Err`: why not, in a few
    /// words, free of secrets).
    pub(super) async fn last_successes(
        &self,
        name: &str,
        tasks: &[String],
    ) -> Result<Vec<(String, crate::changed::LastSuccess)>, String> {
        let mut conn = self
            .connect_once()
            .await
            .map_err(|e| self.scrub(&e.to_string()))?;
        let found = records::last_successes(&mut conn, name, tasks)
            .await
            .map_err(|e| self.scrub(&e.to_string()));
        conn.quit().await;
        found
    }

    /// The server-wide lock name for `name` on this database: at most 64 characters.
    fn lock_name(&self, name: &str) -> String {
        named_lock(&self.schema, name)
    }
}

/// `release-tasks:DATABASE:KEY`, or `release-tasks:` + a hash of it when that is over 64 characters
/// (MySQL's limit for `GET_LOCK`).
fn named_lock(database: &str, name: &str) -> String {
    let full = format!("release-tasks:{database}:{name}");
    if full.chars().count() <= 64 {
        full
    } else {
        format!("release-tasks:{:016x}", key_for(&full) as u64)
    }
}

/// Whether a failed connection attempt may succeed later: nothing listens yet, the connection was cut
/// during the start, or the server (or the user) has no connection to spare. A login failure is not.
fn is_transient(err: &WireError) -> bool {
    match err {
        WireError::Io(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::InvalidInput
        ),
        // 1040 too many connections, 1203 / 1226 the user's connection limit, 1053 shutting down,
        // 1927 connection killed, 2013 lost during the handshake.
        WireError::Server { code, .. } => matches!(code, 1040 | 1203 | 1226 | 1053 | 1927 | 2013),
        WireError::Tls(_) | WireError::Protocol(_) => false,
    }
}

/// Why this server cannot give `[lock]` a lock every replica shares, if it cannot: judged from its
/// version string and its `wsrep_on` and `pxc_strict_mode` variables.
fn unsupported(version: &str, wsrep_on: Option<&str>, pxc_strict: Option<&str>) -> Option<String> {
    let lower = version.to_ascii_lowercase();
    if lower.contains("vitess") || lower.contains("planetscale") {
        return Some(format!(
            "the server is Vitess ({version}), as PlanetScale is: it does not offer GET_LOCK as a lock shared by \
             every client, so [lock] cannot keep replicas apart there; point [lock] at a MySQL server that \
             is not behind Vitess, or run the release from one replica only"
        ));
    }
    if wsrep_on.is_some_and(|v| v.eq_ignore_ascii_case("ON") || v == "1") {
        let strict = pxc_strict
            .filter(|m| {
                !m.eq_ignore_ascii_case("DISABLED") && !m.eq_ignore_ascii_case("PERMISSIVE")
            })
            .map(|m| format!(", and pxc_strict_mode = {m} refuses GET_LOCK"))
            .unwrap_or_default();
        return Some(format!(
            "the server is a node of a Galera cluster (wsrep_on = ON: MariaDB Galera Cluster or Percona XtraDB \
             Cluster): GET_LOCK holds on that one node only, so replicas connected to other nodes would not \
             wait{strict}; point [lock] at a MySQL server that is not a Galera node (or at one fixed node through \
             a URL that no load balancer spreads), or run the release from one replica only"
        ));
    }
    None
}

/// Refuses a server on which `GET_LOCK` is no shared lock (see [`unsupported`]).
async fn refuse_unsupported(db: &Database, conn: &mut Conn) -> Result<(), Error> {
    let version = conn.server_version.clone();
    if let Some(why) = unsupported(&version, None, None) {
        return Err(Error::Database(format!("[lock] {why}")));
    }
    let rows = conn
        .query("SHOW VARIABLES WHERE Variable_name IN ('wsrep_on', 'pxc_strict_mode')")
        .await
        .map_err(|e| db.error("cannot read the server's variables", &e))?;
    let get = |name: &str| {
        rows.iter()
            .find(|r| r.first().and_then(Option::as_deref) == Some(name))
            .and_then(|r| r.get(1).cloned().flatten())
    };
    match unsupported(
        &version,
        get("wsrep_on").as_deref(),
        get("pxc_strict_mode").as_deref(),
    ) {
        Some(why) => Err(Error::Database(format!("[lock] {why}"))),
        None => Ok(()),
    }
}

/// The held lock (its connection) on MySQL, or nothing when the release was found completed.
pub struct Held {
    conn: Option<Mutex<Conn>>,
    completed: Option<PreviousRun>,
    /// The `[lock]` key (the ledger's `lock_key`).
    name: String,
    /// The server-wide `GET_LOCK` name.
    lock: String,
    meta: Metadata,
    db: Database,
    /// Why the lock is known lost (a failed check or write); every later check fails with it.
    lost: RefCell<Option<String>>,
    /// The release being recorded (set by `begin`).
    recording: RefCell<Option<String>>,
}

/// Takes the lock on MySQL: as `super::acquire` does on PostgreSQL.
pub(super) async fn acquire(
    lock: &Lock,
    env: &Env,
    meta: &Metadata,
    signals: &mut Signals,
) -> Result<Held, Error> {
    let db = Database::open(lock, env)?;
    let name = lock_name(lock, meta);
    let lock_id = db.lock_name(&name);
    let release = if lock.once { release_id(meta) } else { None };
    let mut wait = Wait::new(&name, lock.timeout);
    let mut checked = false;
    loop {
        let mut conn = db.connect(signals).await?;
        let one_try = async {
            if !checked {
                refuse_unsupported(&db, &mut conn).await?;
                if release.is_some() {
                    ledger::ensure_table(&mut conn)
                        .await
                        .map_err(|e| db.error("cannot create the release_tasks_runs table", &e))?;
                }
                checked = true;
            }
            if let Some(release) = &release {
                let previous = ledger::completed(&mut conn, &name, release)
                    .await
                    .map_err(|e| db.error("cannot read release_tasks_runs", &e))?;
                if let Some(previous) = previous {
                    return Ok(Err(previous));
                }
            }
            try_lock(&mut conn, &lock_id).await.map(Ok).map_err(|e| {
                Error::Database(db.scrub(&format!(
                    "[lock] cannot take the release lock: {e}{}",
                    refusal_hint(&e)
                )))
            })
        };
        let holder = match or_stop(signals, db.bounded(one_try)).await? {
            Ok(holder) => holder,
            Err(previous) => {
                conn.quit().await;
                return Ok(Held {
                    conn: None,
                    completed: Some(previous),
                    name,
                    lock: lock_id,
                    meta: meta.clone(),
                    db,
                    lost: RefCell::new(None),
                    recording: RefCell::new(None),
                });
            }
        };
        let Some(holder) = holder else {
            // The lock's connection sits idle while tasks run: the server must not close it as idle
            // after `wait_timeout` (8 h by default, minutes on some hosts), which would release the
            // lock. A server or proxy that refuses the setting keeps its own; the check before each
            // task notices a connection it closed.
            if let Err(err) = conn.query("SET SESSION wait_timeout = 31536000").await {
                tracing::warn!(error = %db.scrub(&err.to_string()), "cannot raise wait_timeout on the lock's connection; a task longer than the server's wait_timeout loses the lock");
            }
            wait.took();
            return Ok(Held {
                conn: Some(Mutex::new(conn)),
                completed: None,
                name,
                lock: lock_id,
                meta: meta.clone(),
                db,
                lost: RefCell::new(None),
                recording: RefCell::new(None),
            });
        };
        conn.quit().await;
        wait.held_by(signals, holder).await?;
    }
}

/// What to do when `GET_LOCK` itself is refused (a proxy or cluster that does not support it).
fn refusal_hint(err: &WireError) -> &'static str {
    match err {
        // 1235 "not supported yet" (MariaDB Galera), 1105 unknown error (PXC strict mode, Vitess),
        // 1305 no such function, 1148 not allowed.
        WireError::Server {
            code: 1235 | 1105 | 1305 | 1148,
            ..
        } => {
            "; this server or proxy does not support GET_LOCK (Vitess/PlanetScale, a Galera cluster in strict \
             mode): point [lock] at a MySQL server that does, or run the release from one replica only"
        }
        _ => "",
    }
}

/// Tries the lock: `None` when taken, else who holds it.
async fn try_lock(conn: &mut Conn, lock: &str) -> Result<Option<String>, WireError> {
    for attempt in 1..=3u64 {
        let got = conn
            .value(&format!("SELECT GET_LOCK({}, 0)", quote(lock)))
            .await?;
        if got.as_deref() == Some("1") {
            return Ok(None);
        }
        if let Some(holder) = holder_of(conn, lock).await? {
            return Ok(Some(holder));
        }
        tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
    }
    Ok(Some("another session".to_owned()))
}

/// Who holds `lock`: the holder's `program_name` connection attribute where `performance_schema`
/// shows it (MySQL 8 by default), else its user and host from the process list (visible to the same
/// user, or with the PROCESS privilege), else only its connection id. `None` when nobody holds it.
pub(super) async fn holder_of(conn: &mut Conn, lock: &str) -> Result<Option<String>, WireError> {
    let Some(id) = conn
        .value(&format!("SELECT IS_USED_LOCK({})", quote(lock)))
        .await?
    else {
        return Ok(None);
    };
    let id: u64 = id.parse().unwrap_or_default();
    // Either may be missing (performance_schema off, as on MariaDB by default) or refused.
    let mut program = None;
    for table in ["session_account_connect_attrs", "session_connect_attrs"] {
        program = conn
            .value(&format!(
                "SELECT ATTR_VALUE FROM performance_schema.{table} \
                 WHERE PROCESSLIST_ID = {id} AND ATTR_NAME = 'program_name' LIMIT 1"
            ))
            .await
            .ok()
            .flatten();
        if program.is_some() {
            break;
        }
    }
    if let Some(program) = program.filter(|p| !p.is_empty()) {
        return Ok(Some(format!("{program} (connection {id})")));
    }
    let who = conn
        .value(&format!(
            "SELECT CONCAT(USER, '@', HOST) FROM information_schema.PROCESSLIST WHERE ID = {id}"
        ))
        .await
        .ok()
        .flatten();
    Ok(Some(match who {
        Some(who) => format!("connection {id} ({who})"),
        None => format!("connection {id}"),
    }))
}

impl Held {
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    pub async fn previous(&self, release: &str) -> Result<Option<PreviousRun>, Error> {
        if let Some(previous) = &self.completed {
            return Ok(Some(previous.clone()));
        }
        let Some(conn) = &self.conn else {
            return Ok(None);
        };
        ledger::completed(&mut *conn.lock().await, &self.name, release)
            .await
            .map_err(|e| self.db.error("cannot read release_tasks_runs", &e))
    }

    /// One round trip on the lock's connection that proves it is alive and this session still
    /// holds the lock, within `CHECK_TIMEOUT`.
    async fn probe(&self, conn: &Mutex<Conn>) -> Result<(), String> {
        let sql = format!(
            "SELECT IS_USED_LOCK({}) = CONNECTION_ID()",
            quote(&self.lock)
        );
        let mut conn = conn.lock().await;
        match tokio::time::timeout(CHECK_TIMEOUT, conn.value(&sql)).await {
            Err(_) => Err(format!(
                "the database did not answer within {}s",
                CHECK_TIMEOUT.as_secs()
            )),
            Ok(Err(err)) => Err(self.db.scrub(&err.to_string())),
            Ok(Ok(held)) if held.as_deref() == Some("1") => Ok(()),
            Ok(Ok(_)) => Err("the lock's session no longer holds it".to_owned()),
        }
    }

    /// Records that this replica is running `release`. On MySQL every statement commits by itself, so
    /// the record is written on the lock's own connection and seen by `wait` and `history` at once.
    pub async fn begin(&self, release: &str) -> Result<(), Error> {
        let Some(conn) = &self.conn else {
            return Ok(());
        };
        self.recording.replace(Some(release.to_owned()));
        let mut conn = conn.lock().await;
        let failed = |e: &WireError| {
            self.db
                .error("cannot record the release in release_tasks_runs", e)
        };
        ledger::begin(&mut conn, &self.name, release, &self.db.me, &self.meta)
            .await
            .map_err(|e| failed(&e))?;
        records::clear(&mut conn, &self.name, release)
            .await
            .map_err(|e| failed(&e))
    }

    /// What each task of `tasks` recorded at its last successful run under this key (for the
    /// `changed` gate), read under the lock.
    pub async fn last_successes(
        &self,
        tasks: &[String],
    ) -> Result<std::collections::HashMap<String, crate::changed::LastSuccess>, Error> {
        let Some(conn) = self.conn.as_ref().filter(|_| !tasks.is_empty()) else {
            return Ok(std::collections::HashMap::new());
        };
        let mut conn = conn.lock().await;
        let read = records::last_successes(&mut conn, &self.name, tasks);
        match tokio::time::timeout(RECORD_TIMEOUT, read).await {
            Ok(Ok(found)) => Ok(found.into_iter().collect()),
            Ok(Err(err)) => Err(self.db.error("cannot read release_tasks_task_runs", &err)),
            Err(_) => {
                let why = format!(
                    "the database did not answer within {}s",
                    RECORD_TIMEOUT.as_secs()
                );
                self.lost.replace(Some(why.clone()));
                Err(Error::Database(format!(
                    "[lock] cannot read release_tasks_task_runs: {why}"
                )))
            }
        }
    }

    /// Writes one task's record on the lock's connection (each statement commits by itself, so it is
    /// visible at once). A record that cannot be written is logged; the release goes on. A write that
    /// gets no answer leaves the connection in an unknown state: the lock is then taken as lost.
    async fn write_record(&self, record: TaskRecord) {
        let Some(release) = self.recording.borrow().clone() else {
            return;
        };
        let Some(conn) = &self.conn else { return };
        if self.lost.borrow().is_some() {
            return;
        }
        let mut conn = conn.lock().await;
        let write = records::write(&mut conn, &self.name, &release, &record);
        let why = match tokio::time::timeout(RECORD_TIMEOUT, write).await {
            Ok(Ok(())) => return,
            Ok(Err(err)) => self.db.scrub(&err.to_string()),
            Err(_) => {
                let why = format!("no answer within {}s", RECORD_TIMEOUT.as_secs());
                self.lost.replace(Some(format!(
                    "the database did not answer a record's write: {why}"
                )));
                why
            }
        };
        tracing::warn!(
            task = %record.task, outcome = %record.outcome, reason = %why,
            "cannot write the task's record to release_tasks_task_runs; `history --show` will not have it"
        );
    }

    /// Records how `release` ended, in one statement that writes only while this session holds the
    /// lock. `Err` says why it was not written (free of secrets).
    pub async fn finish(&self, release: &str, report: &Report) -> Result<(), String> {
        let Some(conn) = &self.conn else {
            return Ok(());
        };
        let status = if report.succeeded() {
            "succeeded"
        } else {
            "failed"
        };
        let mut conn = conn.lock().await;
        // Old task records go first (see `record::KEEP_RELEASES`); a failure is logged.
        match tokio::time::timeout(RECORD_TIMEOUT, records::prune(&mut conn, &self.name)).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::warn!(reason = %self.db.scrub(&err.to_string()), "cannot prune old task records");
            }
            Err(_) => {
                let why =
                    "the database did not answer while old task records were pruned".to_owned();
                self.lost.replace(Some(why.clone()));
                return Err(why);
            }
        }
        let write = ledger::finish(
            &mut conn,
            &self.name,
            release,
            &self.lock,
            status,
            report.exit_code(),
        );
        let result = match tokio::time::timeout(FINISH_TIMEOUT, write).await {
            Ok(Ok(true)) => return Ok(()),
            Ok(Ok(false)) => "the lock's session no longer holds it".to_owned(),
            Ok(Err(err)) => self.db.scrub(&err.to_string()),
            Err(_) => format!(
                "the database did not answer within {}s",
                FINISH_TIMEOUT.as_secs()
            ),
        };
        self.lost.replace(Some(result.clone()));
        Err(result)
    }

    /// `RELEASE_LOCK`, then the connection is closed (which releases the lock anyway). `Err` says
    /// why the release was not clean: the lock was no longer this session's, or no answer.
    pub async fn release(self) -> Result<(), String> {
        let Some(conn) = self.conn else {
            return Ok(());
        };
        let mut conn = conn.into_inner();
        // After a failed write the connection's state is unknown: closing it is the release.
        if let Some(reason) = self.lost.into_inner() {
            drop(conn);
            return Err(reason);
        }
        let sql = format!("SELECT RELEASE_LOCK({})", quote(&self.lock));
        let result = match tokio::time::timeout(FINISH_TIMEOUT, conn.value(&sql)).await {
            Ok(Ok(Some(released))) if released == "1" => {
                tracing::info!(lock = %self.name, "released the release lock");
                conn.quit().await;
                return Ok(());
            }
            Ok(Ok(_)) => "the lock's session no longer held it".to_owned(),
            Ok(Err(err)) => self.db.scrub(&err.to_string()),
            Err(_) => format!(
                "the database did not answer RELEASE_LOCK within {}s",
                FINISH_TIMEOUT.as_secs()
            ),
        };
        tracing::warn!(lock = %self.name, error = %result, "cannot release the lock; closing the connection instead, which releases it");
        Err(result)
    }

    /// Closes the connection of a lock found lost, writing nothing.
    pub fn abandon(self) {
        drop(self);
    }
}

impl Recorder for Held {
    fn record(&self, record: TaskRecord) -> RecordFuture<'_> {
        Box::pin(self.write_record(record))
    }
}

impl LockCheck for Held {
    fn check(&self) -> CheckFuture<'_> {
        Box::pin(async move {
            let Some(conn) = &self.conn else {
                return Ok(());
            };
            crate::lock_check::remembered(&self.name, &self.lost, self.probe(conn)).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_names_fit_in_64_characters() {
        assert_eq!(named_lock("shop", "web"), "release-tasks:shop:web");
        let long = named_lock("shop", &"é".repeat(60));
        assert!(
            long.starts_with("release-tasks:") && long.chars().count() <= 64,
            "{long}"
        );
        assert_ne!(long, named_lock("shop", &"é".repeat(61)));
        assert_ne!(named_lock("a", "b"), named_lock("c", "b"));
    }

    #[test]
    fn galera_and_vitess_are_refused() {
        assert!(unsupported("10.11.6-MariaDB", Some("OFF"), None).is_none());
        assert!(unsupported("8.0.36", None, None).is_none());
        let galera = unsupported("10.6.16-MariaDB-log", Some("ON"), None).unwrap();
        assert!(galera.contains("Galera"), "{galera}");
        let pxc = unsupported("8.0.35-27.1", Some("ON"), Some("ENFORCING")).unwrap();
        assert!(
            pxc.contains("pxc_strict_mode = ENFORCING refuses GET_LOCK"),
            "{pxc}"
        );
        assert!(
            unsupported("8.0.31-Vitess", None, None)
                .unwrap()
                .contains("Vitess")
        );
    }

    #[test]
    fn login_failures_are_not_retried() {
        let denied = WireError::Server {
            code: 1045,
            state: "28000".into(),
            message: "Access denied".into(),
        };
        assert!(!is_transient(&denied));
        let busy = WireError::Server {
            code: 1040,
            state: "08004".into(),
            message: "Too many connections".into(),
        };
        assert!(is_transient(&busy));
        let refused = WireError::Io(std::io::ErrorKind::ConnectionRefused.into());
        assert!(is_transient(&refused));
    }
}
