//! `[lock]`: once per release across replicas, through the database the app already has.
//!
//! Before the first task, release-tasks connects, opens a transaction and takes a PostgreSQL
//! *transaction-level* advisory lock (`pg_try_advisory_xact_lock`); the transaction stays open for the
//! whole release and its COMMIT is the unlock. Why a transaction and not a session lock: a connection
//! pooler in transaction mode (`PgBouncer` on Supabase's port 6543, Heroku's and Neon's poolers) hands a
//! server connection to other clients between transactions, so a session lock taken through it is
//! neither exclusive nor released; an open transaction pins one server connection, behind a pooler or
//! not (Flyway does the same). The transaction sets `idle_in_transaction_session_timeout` off for
//! itself. If release-tasks dies, its connection drops and PostgreSQL releases the lock by itself.
//! Queries go unprepared (simple or unnamed statements), which poolers also need.
//!
//! A replica that finds the lock taken does not keep its connection: it reads who holds the lock,
//! disconnects, and tries again after a jittered back-off, so a fleet of waiting replicas costs the
//! database at most a few short connections at a time. A database that is not up yet (refused, not
//! resolvable, starting up, too many connections) is tried again within `[lock] connect_timeout`.
//!
//! With `once = true` each release (its version, else its commit) is recorded in `release_tasks_runs`
//! (see `ledger.rs`): "running" when it starts, its outcome in the lock's own transaction, so the
//! outcome becomes visible at the instant the lock is released. A replica that finds the release
//! completed skips every task. URLs are read by `url.rs`, TLS is `tls.rs`.
//!
//! The database URL carries a password: it is never logged, and errors from the driver are scrubbed.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tokio_postgres::types::Type;

use crate::config::{Backend, Lock};
use crate::error::Error;
use crate::gate::Env;
use crate::lock_check::{CheckFuture, LockCheck};
use crate::metadata::Metadata;
use crate::record::{RecordFuture, Recorder, TaskRecord};
use crate::redact;
use crate::report::Report;
use crate::signals::Signals;

mod ledger;
#[cfg(feature = "mysql")]
mod mysql;
mod records;
mod tls;
mod url;

pub use ledger::{Answer, EXIT_FAILED_RELEASE, Query, last_successes, read, wait};

/// The first pause before a waiting replica tries the lock again; it grows to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(300);
const RETRY_MAX: Duration = Duration::from_secs(3);
/// How long one connection attempt (TCP, TLS, login) may take, unless the URL says `connect_timeout`.
const CONNECT_ATTEMPT: Duration = Duration::from_secs(15);
/// How long the check before a task may wait for its answer: a database that cannot answer one
/// small query in this time (a network that went silent) is taken to have lost the lock.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a task record's write (or the read of the last successful runs) may take; a database that
/// does not answer costs each task at most this, and the release goes on.
const RECORD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the ledger's outcome and the COMMIT that releases the lock may take before the
/// connection is closed instead (which releases the lock too, without the outcome).
const FINISH_TIMEOUT: Duration = Duration::from_secs(30);
/// The same bound once release-tasks was told to stop: its grace is short (often 10 s), and a
/// silent database must not keep it from exiting with its summary.
const STOPPING_FINISH_TIMEOUT: Duration = Duration::from_secs(3);

/// The held lock, on the database `[lock]` names, or a release found completed (nothing held).
pub enum ReleaseLock {
    Postgres(PgLock),
    #[cfg(feature = "mysql")]
    Mysql(mysql::Held),
}

/// The held PostgreSQL lock and its transaction, or a release found completed (nothing held).
pub struct PgLock {
    /// The connection whose open transaction holds the lock; `None` when the release was already
    /// completed and no lock was needed.
    client: Option<Client>,
    /// What the lock connection's driver saw when it ended.
    watch: Arc<Watch>,
    /// Held from `key`, which the check looks for in `pg_locks`.
    key: i64,
    completed: Option<PreviousRun>,
    name: String,
    meta: Metadata,
    db: Database,
    /// Why the lock was found lost, once it was; every later check fails with it.
    lost: RefCell<Option<String>>,
    /// With `once`: the second connection that writes the ledger outside the lock's transaction,
    /// so that other sessions see each record at once (`None` until `begin`, or when the database
    /// had no connection to spare: then records go in the lock's transaction).
    writer: RefCell<Option<Rc<Client>>>,
    /// The release being recorded (set by `begin`).
    recording: RefCell<Option<String>>,
    /// Set once release-tasks was told to stop: the outcome and the COMMIT get a short bound.
    stopping: Cell<bool>,
    /// Set once a task record got no answer in time: a silent database costs the release one
    /// wait for its records, not one per task (later records are left out, and said so once).
    records_stalled: Cell<bool>,
    /// Set when the outcome's write got no answer in time: the COMMIT is not waited for then.
    outcome_unanswered: Cell<bool>,
}

/// A completed run of the same release found in the ledger.
#[derive(Debug, Clone)]
pub struct PreviousRun {
    pub holder: String,
    pub finished_at: String,
}

/// The lock key for a name: FNV-1a 64 of `release-tasks:` + name, so that two apps on one database
/// (or an app and its staging) do not share a lock unless they share a key.
#[must_use]
pub fn key_for(name: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in b"release-tasks:".iter().chain(name.as_bytes()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash as i64
}

/// Which release the ledger records: the version, else the commit. `None` when neither is known.
#[must_use]
pub fn release_id(meta: &Metadata) -> Option<String> {
    meta.version.clone().or_else(|| meta.commit.clone())
}

/// The first of `[lock] postgres`'s variables that is set and not empty, with its value.
fn chosen_url<'a>(lock: &'a Lock, env: &'a Env) -> Option<(&'a str, &'a str)> {
    lock.url_vars.iter().find_map(|var| {
        env.get(var)
            .filter(|url| !url.is_empty())
            .map(|url| (var.as_str(), url.as_str()))
    })
}

/// Problems with `[lock]` that can be found before connecting: the variables, the URL (its
/// parameters and certificate files) and, for `once`, the release's version.
#[must_use]
pub fn preflight(lock: &Lock, env: &Env, meta: &Metadata) -> Vec<String> {
    preflight_for(lock, env, meta, lock.once)
}

/// [`preflight`], asking for the release's version only when `needs_release` (`history` reads any
/// release, so it needs none).
fn preflight_for(lock: &Lock, env: &Env, meta: &Metadata, needs_release: bool) -> Vec<String> {
    let mut problems = Vec::new();
    match chosen_url(lock, env) {
        None if lock.url_vars.len() == 1 => problems.push(format!(
            "[lock] {} names {}, which is not set; set it to the database URL",
            lock.backend.key(),
            lock.url_vars[0]
        )),
        None => problems.push(format!(
            "[lock] {} names {}, none of which is set; set one of them to the database URL",
            lock.backend.key(),
            lock.url_vars.join(", ")
        )),
        Some((var, url)) => {
            if let Err(err) = check_url(lock.backend, url) {
                problems.push(format!(
                    "[lock] {var} is not a usable database URL: {}",
                    redact::scrub(&err, &secrets_of(url))
                ));
            }
        }
    }
    if lock.key.is_none() && meta.app.is_none() {
        problems.push(
            "[lock] has no key and the app's name is unknown; set `key` in [lock] or RELEASE_TASKS_APP".into(),
        );
    }
    if needs_release && release_id(meta).is_none() {
        problems.push(
            "[lock] once = true needs to know which release this is; set RELEASE_TASKS_VERSION (or enable Heroku's \
             runtime-dyno-metadata)"
                .into(),
        );
    }
    problems
}

/// Whether `url` is usable for `backend`: its form, its parameters and its certificate files. A URL
/// of the other database says so.
fn check_url(backend: Backend, url: &str) -> Result<(), String> {
    #[cfg(feature = "mysql")]
    let is_mysql = mysql::url::is_mysql(url);
    #[cfg(not(feature = "mysql"))]
    let is_mysql = ["mysql://", "mysql2://", "mariadb://"]
        .iter()
        .any(|s| url.starts_with(s));
    match backend {
        Backend::Postgres if is_mysql => Err(
            "it is a MySQL URL, and [lock] says postgres = ...; write mysql = ... in [lock] for MySQL and MariaDB"
                .into(),
        ),
        Backend::Postgres => {
            url::parse(url).and_then(|target| tls::MakeRustls::new(&target.tls).map(drop))
        }
        #[cfg(feature = "mysql")]
        Backend::Mysql if !is_mysql && (url.starts_with("postgres") || url.contains('=')) => Err(
            "it is a PostgreSQL URL, and [lock] says mysql = ...; write postgres = ... in [lock] for PostgreSQL"
                .into(),
        ),
        #[cfg(feature = "mysql")]
        Backend::Mysql => mysql::check_url(url),
        #[cfg(not(feature = "mysql"))]
        Backend::Mysql => Err("this release-tasks was built without MySQL support".into()),
    }
}

/// The lock's name: `key`, else the app's name.
fn lock_name(lock: &Lock, meta: &Metadata) -> String {
    lock.key
        .clone()
        .or_else(|| meta.app.clone())
        .unwrap_or_default()
}

/// Who this replica is, as other replicas see it in `pg_stat_activity.application_name`: the pid
/// first, because PostgreSQL keeps only 63 bytes (of ASCII) and a long pod name must not cut it.
fn application_name(from_url: Option<&str>) -> String {
    let host = std::env::var("DYNO")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown-host".to_owned());
    let mut name = format!("release-tasks pid {} on {host}", std::process::id());
    if let Some(extra) = from_url {
        name = format!("{name} ({extra})");
    }
    name.chars()
        .map(|c| {
            if c.is_ascii() && !c.is_ascii_control() {
                c
            } else {
                '?'
            }
        })
        .take(63)
        .collect()
}

/// The database `[lock]` uses: its parsed URL, the TLS connector, and what must not be shown.
pub(crate) struct Database {
    var: String,
    /// The URL reduced to scheme and host, for messages.
    shown: String,
    /// The configs to connect with, tried in order (see `url::Target::attempts`).
    attempts: Vec<tokio_postgres::Config>,
    /// What an empty `attempts` (which `url::parse` never gives) would connect with.
    attempts_fallback: tokio_postgres::Config,
    tls: tls::MakeRustls,
    secrets: Vec<String>,
    /// How long a database that refuses connections is tried again.
    connect_timeout: Duration,
    /// This replica's `application_name`.
    me: String,
}

impl Database {
    /// The database of the first set variable in `[lock] postgres`.
    fn open(lock: &Lock, env: &Env) -> Result<Database, Error> {
        let Some((var, url)) = chosen_url(lock, env) else {
            return Err(Error::Environment {
                problems: vec![format!(
                    "[lock] postgres names {}, none of which is set",
                    lock.url_vars.join(", ")
                )],
            });
        };
        let secrets = secrets_of(url);
        let bad = |e: String| {
            Error::Database(format!(
                "[lock] {var} is not a usable database URL: {}",
                redact::scrub(&e, &secrets)
            ))
        };
        let target = url::parse(url).map_err(bad)?;
        let tls = tls::MakeRustls::new(&target.tls).map_err(bad)?;
        let me = application_name(target.application_name.as_deref());
        let mut attempts = target.attempts;
        for config in &mut attempts {
            config.application_name(&me);
            if config.get_connect_timeout().is_none() {
                config.connect_timeout(CONNECT_ATTEMPT);
            }
        }
        Ok(Database {
            var: var.to_owned(),
            shown: shown_with_sockets(&redact::url(url), &target.config),
            attempts,
            attempts_fallback: target.config,
            tls,
            secrets,
            connect_timeout: lock.connect_timeout,
            me,
        })
    }

    /// One connection attempt (each of the URL's hosts in turn), and the watch on its connection.
    /// Each host gets its `connect_timeout` for the whole of it (TCP, TLS, login), as in libpq: a
    /// server (or a network) that accepts the connection and then says nothing must not hold
    /// release-tasks for ever.
    async fn connect_once(&self) -> Result<(Client, Arc<Watch>), Failed> {
        // `url::parse` never gives an empty list; the first config stands in for one anyway.
        let (last, earlier) = self
            .attempts
            .split_last()
            .unwrap_or((&self.attempts_fallback, &[]));
        let mut connected = None;
        for config in earlier {
            if let Ok(pair) = self.attempt(config).await {
                connected = Some(pair);
                break;
            }
        }
        let (client, connection) = match connected {
            Some(pair) => pair,
            None => self.attempt(last).await?,
        };
        let watch = Arc::new(Watch {
            holds_lock: AtomicBool::new(false),
            ended: Mutex::new(None),
            secrets: self.secrets.clone(),
        });
        tokio::spawn(drive(connection, Arc::clone(&watch)));
        Ok((client, watch))
    }

    /// One host's attempt, bounded by its `connect_timeout`.
    async fn attempt(
        &self,
        config: &tokio_postgres::Config,
    ) -> Result<
        (
            Client,
            tokio_postgres::Connection<tokio_postgres::Socket, tls::Stream<tokio_postgres::Socket>>,
        ),
        Failed,
    > {
        let bound = config
            .get_connect_timeout()
            .copied()
            .unwrap_or(CONNECT_ATTEMPT);
        match tokio::time::timeout(bound, config.connect(self.tls.clone())).await {
            Ok(result) => result.map_err(Failed::Driver),
            Err(_) => Err(Failed::Silent(bound)),
        }
    }

    /// Connects, trying again with back-off while the database is not up yet (refused, not
    /// resolvable, starting up, too many connections), for up to `[lock] connect_timeout`; each
    /// failed attempt is logged. A wrong password, an unknown database or a TLS failure fails at once.
    async fn connect(&self, signals: &mut Signals) -> Result<(Client, Arc<Watch>), Error> {
        // A socket file that is not there is more often a wrong directory or port than a server
        // still starting: say both, as libpq does.
        let socket = if self.has_socket() {
            "is the server running and listening on that socket (its unix_socket_directories \
             and port)? If not, correct the URL's host or port; "
        } else {
            ""
        };
        let mut retry = Retry::new(&self.shown, &self.var, self.connect_timeout, socket);
        loop {
            let result = tokio::select! {
                biased;
                sig = signals.next_stop() => return Err(Error::Interrupted(sig)),
                result = self.connect_once() => result,
            };
            let err = match result {
                Ok(connected) => return Ok(connected),
                Err(err) => err,
            };
            retry
                .after(signals, &self.scrub(&err.describe()), err.is_transient())
                .await?;
        }
    }

    /// Whether some host of the URL is a Unix socket's directory.
    fn has_socket(&self) -> bool {
        self.attempts_fallback
            .get_hosts()
            .iter()
            .any(|h| matches!(h, tokio_postgres::config::Host::Unix(_)))
    }

    /// `work` (queries before any task starts), unless the database says nothing for
    /// [`FINISH_TIMEOUT`]: a network gone silent must not hold the release for ever.
    async fn bounded<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        tokio::time::timeout(FINISH_TIMEOUT, work)
            .await
            .unwrap_or_else(|_| {
                Err(Error::Database(format!(
                    "[lock] the database at {} (from {}) did not answer within {}s",
                    self.shown,
                    self.var,
                    FINISH_TIMEOUT.as_secs()
                )))
            })
    }

    fn scrub(&self, text: &str) -> String {
        redact::urls_in(&redact::scrub(text, &self.secrets))
    }

    fn error(&self, what: &str, err: &tokio_postgres::Error) -> Error {
        Error::Database(self.scrub(&format!("[lock] {what}: {}", describe(err))))
    }
}

/// A connection attempt that failed: the driver's error, or no answer within the attempt's bound.
#[derive(Debug)]
enum Failed {
    Driver(tokio_postgres::Error),
    Silent(Duration),
}

impl Failed {
    fn describe(&self) -> String {
        match self {
            Failed::Driver(err) => describe(err),
            Failed::Silent(bound) => format!(
                "the server did not complete the connection within {}s (set connect_timeout in the URL to wait longer)",
                bound.as_secs()
            ),
        }
    }

    /// A silent server may answer later, as one that is not up yet may start.
    fn is_transient(&self) -> bool {
        match self {
            Failed::Driver(err) => is_transient(err),
            Failed::Silent(_) => true,
        }
    }
}

/// The URL as it may be shown, followed by the socket files it names (a directory is no secret, and
/// the file is where "No such file or directory" looked, as libpq says it).
fn shown_with_sockets(shown: &str, config: &tokio_postgres::Config) -> String {
    let ports = config.get_ports();
    let sockets: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .filter_map(|(i, host)| match host {
            tokio_postgres::config::Host::Unix(dir) => {
                let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
                Some(dir.join(format!(".s.PGSQL.{port}")).display().to_string())
            }
            tokio_postgres::config::Host::Tcp(_) => None,
        })
        .collect();
    match sockets.len() {
        0 => shown.to_owned(),
        1 => format!("{shown} (socket {})", sockets[0]),
        _ => format!("{shown} (sockets {})", sockets.join(", ")),
    }
}

/// Whether a failed connection attempt may succeed later: the server is not there yet, is starting,
/// or has no connection to spare. Login and TLS failures are not.
fn is_transient(err: &tokio_postgres::Error) -> bool {
    if let Some(db) = err.as_db_error() {
        // 57P03 cannot_connect_now (starting up), 53300 too_many_connections, 53400 limit exceeded,
        // 08xxx connection failures reported by the server (or a pooler in front of it).
        return matches!(
            db.code().code(),
            "57P03" | "53300" | "53400" | "08000" | "08001" | "08004" | "08006"
        );
    }
    // tokio-postgres does not expose its error kinds: these are its messages for a failed TCP
    // connect or DNS look-up, a connect timeout, and a connection closed during the startup.
    let text = err.to_string();
    [
        "error connecting to server",
        "timeout waiting for server",
        "connection closed",
    ]
    .iter()
    .any(|m| text.starts_with(m))
}

/// `base` scaled by a factor between 0.5 and 1.5, so that replicas started together spread out.
/// A replica's wait for the lock that another replica holds (PostgreSQL's and MySQL's acquire): who
/// held it last (said once per holder), until `[lock] timeout`, with a jittered back-off between
/// tries; a stopping signal ends it at once.
pub(crate) struct Wait<'a> {
    name: &'a str,
    timeout: Duration,
    started: Instant,
    last_holder: Option<String>,
    pause: Duration,
}

impl<'a> Wait<'a> {
    pub(crate) fn new(name: &'a str, timeout: Duration) -> Wait<'a> {
        Wait {
            name,
            timeout,
            started: Instant::now(),
            last_holder: None,
            pause: RETRY_MIN,
        }
    }

    /// Says that the lock was taken, and after how long a wait if there was one.
    pub(crate) fn took(&self) {
        if self.last_holder.is_some() {
            tracing::info!(lock = %self.name, waited_s = self.started.elapsed().as_secs(), "took the release lock");
        } else {
            tracing::info!(lock = %self.name, "took the release lock");
        }
    }

    /// After a try found the lock held by `holder`: waits before the next try, or gives up with
    /// [`Error::LockTimeout`] once `[lock] timeout` has passed.
    pub(crate) async fn held_by(
        &mut self,
        signals: &mut Signals,
        holder: String,
    ) -> Result<(), Error> {
        let name = self.name;
        if self.last_holder.as_deref() != Some(holder.as_str()) {
            tracing::warn!(
                lock = %name, holder = %holder, timeout = %humantime::format_duration(self.timeout),
                "another replica holds the release lock; waiting"
            );
        }
        let deadline = self.started + self.timeout;
        if Instant::now() >= deadline {
            return Err(Error::LockTimeout(format!(
                "[lock] {holder} still held the release lock `{name}` after {}; raise [lock] timeout if its releases take longer",
                humantime::format_duration(self.timeout)
            )));
        }
        self.last_holder = Some(holder);
        let wait = jittered(self.pause).min(deadline.saturating_duration_since(Instant::now()));
        tokio::select! {
            biased;
            sig = signals.next_stop() => return Err(Error::Interrupted(sig)),
            () = tokio::time::sleep(wait) => {}
        }
        self.pause = (self.pause * 3 / 2).min(RETRY_MAX);
        Ok(())
    }
}

/// The back-off of [`Database::connect`] (and MySQL's): a failed attempt is tried again while it is
/// transient and `[lock] connect_timeout` lasts, each retry logged with the URL (password hidden)
/// and the reason; otherwise it ends in an error that names the URL and the variable and says
/// what to do.
pub(crate) struct Retry<'a> {
    shown: &'a str,
    var: &'a str,
    connect_timeout: Duration,
    /// Said before "raise `[lock] connect_timeout`" when every attempt failed (a socket's hint).
    hint: &'a str,
    started: Instant,
    attempt: u32,
    pause: Duration,
}

impl<'a> Retry<'a> {
    pub(crate) fn new(
        shown: &'a str,
        var: &'a str,
        connect_timeout: Duration,
        hint: &'a str,
    ) -> Retry<'a> {
        Retry {
            shown,
            var,
            connect_timeout,
            hint,
            started: Instant::now(),
            attempt: 0,
            pause: Duration::from_millis(250),
        }
    }

    /// After a failed attempt (`reason`, free of secrets): waits the jittered back-off, or returns
    /// the final error; a stopping signal ends the wait at once.
    pub(crate) async fn after(
        &mut self,
        signals: &mut Signals,
        reason: &str,
        transient: bool,
    ) -> Result<(), Error> {
        self.attempt = self.attempt.saturating_add(1);
        let left = self.connect_timeout.saturating_sub(self.started.elapsed());
        if !transient || left.is_zero() {
            let hint = if transient {
                format!(
                    " (tried {} times for {}; {}raise [lock] connect_timeout if the database takes longer to start)",
                    self.attempt,
                    humantime::format_duration(Duration::from_secs(
                        self.started.elapsed().as_secs()
                    )),
                    self.hint
                )
            } else {
                String::new()
            };
            return Err(Error::Database(format!(
                "[lock] cannot use the database at {} (from {}): {reason}{hint}",
                self.shown, self.var
            )));
        }
        let wait = jittered(self.pause).min(left);
        tracing::warn!(
            url = %self.shown, attempt = self.attempt, reason = %reason, retry_in_ms = wait.as_millis() as u64,
            "the [lock] database is not available yet; trying again"
        );
        tokio::select! {
            biased;
            sig = signals.next_stop() => return Err(Error::Interrupted(sig)),
            () = tokio::time::sleep(wait) => {}
        }
        self.pause = (self.pause * 2).min(Duration::from_secs(5));
        Ok(())
    }
}

fn jittered(base: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let seed = (u64::from(nanos) ^ (u64::from(std::process::id()) << 32))
        .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    // The top 20 bits, as a fraction of 1.
    let unit = f64::from((seed >> 44) as u32) / f64::from(1u32 << 20);
    base.mul_f64(0.5 + unit)
}

/// Takes the lock, waiting up to `lock.timeout` while another replica holds it and saying who that
/// is; between tries the connection is closed. With `once`, a release found completed in the ledger
/// needs no lock. A stopping signal ends the wait.
pub async fn acquire(
    lock: &Lock,
    env: &Env,
    meta: &Metadata,
    signals: &mut Signals,
) -> Result<ReleaseLock, Error> {
    match lock.backend {
        Backend::Postgres => acquire_postgres(lock, env, meta, signals)
            .await
            .map(ReleaseLock::Postgres),
        #[cfg(feature = "mysql")]
        Backend::Mysql => mysql::acquire(lock, env, meta, signals)
            .await
            .map(ReleaseLock::Mysql),
        #[cfg(not(feature = "mysql"))]
        Backend::Mysql => Err(Error::Database(
            "[lock] mysql = ... needs MySQL support, and this release-tasks was built without it"
                .into(),
        )),
    }
}

/// Runs `$call` on the backend's lock, whichever it is.
macro_rules! each_backend {
    ($lock:expr, $l:ident => $call:expr) => {
        match $lock {
            ReleaseLock::Postgres($l) => $call,
            #[cfg(feature = "mysql")]
            ReleaseLock::Mysql($l) => $call,
        }
    };
}

impl ReleaseLock {
    /// The lock's name, for messages.
    #[must_use]
    pub fn name(&self) -> &str {
        each_backend!(self, l => l.name())
    }

    /// The completed run of `release`, if the ledger has one (read under the lock).
    pub async fn previous(&self, release: &str) -> Result<Option<PreviousRun>, Error> {
        each_backend!(self, l => l.previous(release).await)
    }

    /// Records that this replica is running `release`, visible to `wait` and `history` at once, and
    /// forgets the task records of an earlier run of it.
    pub async fn begin(&self, release: &str) -> Result<(), Error> {
        each_backend!(self, l => l.begin(release).await)
    }

    /// What each task of `tasks` recorded at its last successful run under this key (for the
    /// `changed` gate), read under the lock.
    pub async fn last_successes(
        &self,
        tasks: &[String],
    ) -> Result<std::collections::HashMap<String, crate::changed::LastSuccess>, Error> {
        each_backend!(self, l => l.last_successes(tasks).await)
    }

    /// Records how `release` ended. `Err` says why the outcome could not be written under the lock
    /// (free of secrets): the ledger then does not record the release as completed.
    pub async fn finish(&self, release: &str, report: &Report) -> Result<(), String> {
        each_backend!(self, l => l.finish(release, report).await)
    }

    /// Releases the lock and closes its connection. `Err` says why the release was not clean.
    pub async fn release(self) -> Result<(), String> {
        each_backend!(self, l => l.release().await)
    }

    /// Closes the connection of a lock found lost, writing nothing.
    pub fn abandon(self) {
        each_backend!(self, l => l.abandon());
    }

    /// From now on the outcome and the unlock wait at most a few seconds for the database:
    /// release-tasks was told to stop, and its grace is short. (MySQL's statements are bounded by
    /// the lock connection's own timeouts.)
    pub fn hurry(&self) {
        match self {
            ReleaseLock::Postgres(l) => l.hurry(),
            #[cfg(feature = "mysql")]
            ReleaseLock::Mysql(_) => {}
        }
    }
}

impl Recorder for ReleaseLock {
    fn record(&self, record: TaskRecord) -> RecordFuture<'_> {
        each_backend!(self, l => l.record(record))
    }
}

impl LockCheck for ReleaseLock {
    fn check(&self) -> CheckFuture<'_> {
        each_backend!(self, l => l.check())
    }
}

/// [`acquire`] on PostgreSQL.
async fn acquire_postgres(
    lock: &Lock,
    env: &Env,
    meta: &Metadata,
    signals: &mut Signals,
) -> Result<PgLock, Error> {
    let db = Database::open(lock, env)?;
    let name = lock_name(lock, meta);
    let key = key_for(&name);
    let release = if lock.once { release_id(meta) } else { None };
    let mut wait = Wait::new(&name, lock.timeout);
    let mut ledger_ready = false;
    loop {
        let (client, watch) = db.connect(signals).await?;
        // The queries of one try: the ledger (with `once`), then the lock.
        let one_try = async {
            if let Some(release) = &release {
                if !ledger_ready {
                    ledger::ensure_table(&client)
                        .await
                        .map_err(|e| db.error("cannot create the release_tasks_runs table", &e))?;
                    ledger_ready = true;
                }
                let previous = ledger::completed(&client, &name, release)
                    .await
                    .map_err(|e| db.error("cannot read release_tasks_runs", &e))?;
                if let Some(previous) = previous {
                    return Ok(Err(previous));
                }
            }
            try_lock(&client, key)
                .await
                .map(Ok)
                .map_err(|e| db.error("cannot take the release lock", &e))
        };
        let holder = match or_stop(signals, db.bounded(one_try)).await? {
            Ok(holder) => holder,
            Err(previous) => {
                return Ok(PgLock {
                    client: None,
                    watch,
                    key,
                    completed: Some(previous),
                    name,
                    meta: meta.clone(),
                    db,
                    lost: RefCell::new(None),
                    writer: RefCell::new(None),
                    recording: RefCell::new(None),
                    stopping: Cell::new(false),
                    records_stalled: Cell::new(false),
                    outcome_unanswered: Cell::new(false),
                });
            }
        };
        let Some(holder) = holder else {
            wait.took();
            watch.holds_lock.store(true, Ordering::Relaxed);
            return Ok(PgLock {
                client: Some(client),
                watch,
                key,
                completed: None,
                name,
                meta: meta.clone(),
                db,
                lost: RefCell::new(None),
                writer: RefCell::new(None),
                recording: RefCell::new(None),
                stopping: Cell::new(false),
                records_stalled: Cell::new(false),
                outcome_unanswered: Cell::new(false),
            });
        };
        // Waiting costs the database no connection.
        drop(client);
        wait.held_by(signals, holder).await?;
    }
}

/// Opens the lock's transaction and tries the lock: `None` when taken (the transaction stays open),
/// else who holds it (the transaction is rolled back). A holder that cannot be read (the lock changed
/// hands between the try and the look) is looked for again before it is called "another session".
async fn try_lock(client: &Client, key: i64) -> Result<Option<String>, tokio_postgres::Error> {
    client
        .batch_execute(
            "BEGIN; SET LOCAL idle_in_transaction_session_timeout = 0; SET LOCAL statement_timeout = 0",
        )
        .await?;
    for attempt in 1..=3u64 {
        let row = client
            .query_typed_one(
                "SELECT pg_try_advisory_xact_lock($1)",
                &[(&key, Type::INT8)],
            )
            .await?;
        if row.try_get::<_, bool>(0)? {
            return Ok(None);
        }
        if let Some(holder) = holder_of(client, key).await? {
            client.batch_execute("ROLLBACK").await?;
            return Ok(Some(holder));
        }
        tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
    }
    client.batch_execute("ROLLBACK").await?;
    Ok(Some("another session".to_owned()))
}

/// `work`, unless a stopping signal comes first: then the work is dropped (its connection closes).
pub(crate) async fn or_stop<T>(
    signals: &mut Signals,
    work: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::select! {
        biased;
        sig = signals.next_stop() => Err(Error::Interrupted(sig)),
        result = work => result,
    }
}

/// The `application_name` and backend pid of the session holding the advisory lock `key`, if any.
async fn holder_of(client: &Client, key: i64) -> Result<Option<String>, tokio_postgres::Error> {
    // An advisory lock on a bigint shows in pg_locks as its high and low halves.
    let (high, low) = (i64::from((key >> 32) as u32), i64::from(key as u32));
    let row = client
        .query_typed_opt(
            "SELECT coalesce(nullif(a.application_name, ''), 'a session') || ' (backend pid ' || a.pid || ')' \
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
               AND l.classid::bigint = $1 AND l.objid::bigint = $2 LIMIT 1",
            &[(&high, Type::INT8), (&low, Type::INT8)],
        )
        .await?;
    row.map(|r| r.try_get(0)).transpose()
}

/// What became of one connection, as its driver task saw it.
struct Watch {
    /// Set once the connection holds the release lock.
    holds_lock: AtomicBool,
    /// Why the connection ended, if it ended with an error (scrubbed).
    ended: Mutex<Option<String>>,
    secrets: Vec<String>,
}

impl Watch {
    fn ended(&self) -> Option<String> {
        self.ended
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Drives the connection. If the lock's connection drops mid-release the lock is gone, and that is
/// said at once, loudly (a task running now is left to finish; the check before the next task
/// stops the release).
async fn drive<F: std::future::Future<Output = Result<(), tokio_postgres::Error>>>(
    connection: F,
    watch: Arc<Watch>,
) {
    if let Err(err) = connection.await {
        let reason = redact::urls_in(&redact::scrub(&describe(&err), &watch.secrets));
        if watch.holds_lock.load(Ordering::Relaxed) {
            tracing::error!(
                error = %reason,
                "lost the [lock] database connection, and PostgreSQL releases the lock with it: another replica may start \
                 the release; a task running now is left to finish, and no further task starts here but clean-up \
                 (on = \"failure\" or \"always\")"
            );
        }
        *watch.ended.lock().unwrap_or_else(PoisonError::into_inner) = Some(reason);
    }
}

/// The driver's message with its cause, which is where "password authentication failed" lives.
fn describe(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => match std::error::Error::source(err) {
            Some(cause) => format!("{err}: {cause}"),
            None => err.to_string(),
        },
    }
}

/// The URL and its password, to scrub from anything the driver says.
fn secrets_of(url: &str) -> Vec<String> {
    let mut secrets = vec![url.to_owned()];
    if let Some(auth) = url
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .map(|(auth, _)| auth)
    {
        if let Some((_, password)) = auth.split_once(':') {
            secrets.push(password.to_owned());
        }
    }
    // `?password=` in a URL, `password=` in key=value pairs (quoted or not).
    for pair in url.split(['&', '?', ' ']) {
        if let Some(password) = pair.strip_prefix("password=") {
            secrets.push(password.trim_matches('\'').to_owned());
        }
    }
    if let Ok(target) = url::parse(url) {
        if let Some(password) = target.config.get_password() {
            secrets.push(String::from_utf8_lossy(password).into_owned());
        }
    }
    secrets.retain(|s| !s.is_empty());
    secrets
}

impl PgLock {
    /// The lock's name, for messages.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The completed run of `release`, if the ledger has one (read under the lock).
    pub async fn previous(&self, release: &str) -> Result<Option<PreviousRun>, Error> {
        if let Some(previous) = &self.completed {
            return Ok(Some(previous.clone()));
        }
        let Some(client) = &self.client else {
            return Ok(None);
        };
        // Read in a savepoint that is rolled back: the lock's transaction must not keep the table's
        // lock for the whole release, where it would hold up another app's change to the table and
        // everyone queued behind that.
        let read = async {
            client.batch_execute("SAVEPOINT ledger").await?;
            let previous = ledger::completed(client, &self.name, release).await?;
            client
                .batch_execute("ROLLBACK TO SAVEPOINT ledger; RELEASE SAVEPOINT ledger")
                .await?;
            Ok(previous)
        };
        self.db
            .bounded(async {
                read.await
                    .map_err(|e| self.db.error("cannot read release_tasks_runs", &e))
            })
            .await
    }

    /// Records that this replica is running `release` (a failed or abandoned earlier run is
    /// replaced). Written through a second, short connection so that it is visible at once (to
    /// `wait` and `history`) while the lock's transaction stays open; when the database has no
    /// connection to spare for it, written in the lock's transaction instead (visible with the outcome).
    pub async fn begin(&self, release: &str) -> Result<(), Error> {
        self.recording.replace(Some(release.to_owned()));
        self.db.bounded(self.record_start(release)).await
    }

    async fn record_start(&self, release: &str) -> Result<(), Error> {
        let failed = |e: &tokio_postgres::Error| {
            self.db
                .error("cannot record the release in release_tasks_runs", e)
        };
        let mut pause = Duration::from_millis(200);
        for _ in 0..3 {
            match self.db.connect_once().await {
                Ok((client, _)) => {
                    ledger::begin(&client, &self.name, release, &self.db.me, &self.meta)
                        .await
                        .map_err(|e| failed(&e))?;
                    records::clear(&client, &self.name, release)
                        .await
                        .map_err(|e| failed(&e))?;
                    self.writer.replace(Some(Rc::new(client)));
                    return Ok(());
                }
                Err(err) if err.is_transient() => {
                    tracing::debug!(reason = %self.db.scrub(&err.describe()), "no second connection for the ledger yet");
                    tokio::time::sleep(jittered(pause)).await;
                    pause *= 2;
                }
                Err(err) => {
                    return Err(Error::Database(self.db.scrub(&format!(
                        "[lock] cannot connect to record the release: {}",
                        err.describe()
                    ))));
                }
            }
        }
        let Some(client) = &self.client else {
            return Ok(());
        };
        ledger::begin(client, &self.name, release, &self.db.me, &self.meta)
            .await
            .map_err(|e| failed(&e))?;
        records::clear(client, &self.name, release)
            .await
            .map_err(|e| failed(&e))
    }

    /// What each task of `tasks` recorded at its last successful run under this key (for the
    /// `changed` gate), read under the lock.
    pub async fn last_successes(
        &self,
        tasks: &[String],
    ) -> Result<std::collections::HashMap<String, crate::changed::LastSuccess>, Error> {
        let Some(client) = self.client.as_ref().filter(|_| !tasks.is_empty()) else {
            return Ok(std::collections::HashMap::new());
        };
        // In a savepoint that is rolled back, as `previous` reads: the lock's transaction keeps no
        // lock on the table.
        let read = async {
            client.batch_execute("SAVEPOINT ledger").await?;
            let found = records::last_successes(client, &self.name, tasks).await?;
            client
                .batch_execute("ROLLBACK TO SAVEPOINT ledger; RELEASE SAVEPOINT ledger")
                .await?;
            Ok(found)
        };
        let found = tokio::time::timeout(RECORD_TIMEOUT, read)
            .await
            .map_err(|_| {
                Error::Database(format!(
                    "[lock] cannot read release_tasks_task_runs: the database did not answer within {}s",
                    RECORD_TIMEOUT.as_secs()
                ))
            })?
            .map_err(|e| self.db.error("cannot read release_tasks_task_runs", &e))?;
        Ok(found.into_iter().collect())
    }

    /// Writes one task's record: on the second connection (visible at once), reconnecting once if it
    /// dropped; failing that, in the lock's transaction, in a savepoint so that a failed write cannot
    /// abort the transaction that holds the lock (visible with the outcome). A record that cannot be
    /// written is logged; the release goes on.
    async fn write_record(&self, record: TaskRecord) {
        let Some(release) = self.recording.borrow().clone() else {
            return;
        };
        // A lost lock may be someone else's by now, and the ledger with it; a ledger that stopped
        // answering was given its one wait already.
        if self.lost.borrow().is_some() || self.records_stalled.get() {
            return;
        }
        let mut writer = self.writer.borrow().clone();
        if writer.as_ref().is_some_and(|c| c.is_closed()) {
            writer = match tokio::time::timeout(RECORD_TIMEOUT, self.db.connect_once()).await {
                Ok(Ok((client, _))) => Some(Rc::new(client)),
                _ => None,
            };
            self.writer.replace(writer.clone());
        }
        let mut why = String::new();
        if let Some(writer) = writer {
            match tokio::time::timeout(
                RECORD_TIMEOUT,
                records::write(&writer, &self.name, &release, &record),
            )
            .await
            {
                Ok(Ok(())) => return,
                Ok(Err(err)) => why = self.db.scrub(&describe(&err)),
                // The database (or the network to it) is silent: the lock's own connection would
                // wait as long, so the record is not tried there too.
                Err(_) => {
                    self.records_stalled.set(true);
                    why = format!(
                        "no answer within {}s; later task records of this release are left out",
                        RECORD_TIMEOUT.as_secs()
                    );
                }
            }
        }
        if let (Some(client), false) = (&self.client, self.records_stalled.get()) {
            let in_lock = async {
                client.batch_execute("SAVEPOINT record").await?;
                match records::write(client, &self.name, &release, &record).await {
                    Ok(()) => client.batch_execute("RELEASE SAVEPOINT record").await,
                    Err(err) => {
                        client
                            .batch_execute("ROLLBACK TO SAVEPOINT record; RELEASE SAVEPOINT record")
                            .await?;
                        Err(err)
                    }
                }
            };
            match tokio::time::timeout(RECORD_TIMEOUT, in_lock).await {
                Ok(Ok(())) => return,
                Ok(Err(err)) => why = self.db.scrub(&describe(&err)),
                Err(_) => {
                    self.records_stalled.set(true);
                    why = format!(
                        "no answer within {}s; later task records of this release are left out",
                        RECORD_TIMEOUT.as_secs()
                    );
                }
            }
        }
        tracing::warn!(
            task = %record.task, outcome = %record.outcome, reason = %why,
            "cannot write the task's record to release_tasks_task_runs; `history --show` will not have it"
        );
    }

    /// Prunes old task records (see `record::KEEP_RELEASES`) on the second connection; a failure is
    /// logged.
    async fn prune(&self) {
        // Pruning can wait for the next release: not when told to stop, nor when the database was
        // already found silent.
        if self.stopping.get() || self.records_stalled.get() {
            return;
        }
        let Some(writer) = self.writer.borrow().clone() else {
            return;
        };
        match tokio::time::timeout(RECORD_TIMEOUT, records::prune(&writer, &self.name)).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::warn!(reason = %self.db.scrub(&describe(&err)), "cannot prune old task records");
            }
            Err(_) => tracing::warn!("cannot prune old task records: the database did not answer"),
        }
    }

    /// Records how `release` ended, in the lock's transaction: the outcome is committed with the
    /// unlock. A failure to record is logged: the release itself is over.
    ///
    /// `Err` says why the outcome could not be written (the lock's transaction is gone with its
    /// connection, or the database refused), free of secrets: the ledger then does not record the
    /// release as completed, and another replica may run it again.
    pub async fn finish(&self, release: &str, report: &Report) -> Result<(), String> {
        let Some(client) = &self.client else {
            return Ok(());
        };
        let status = if report.succeeded() {
            "succeeded"
        } else {
            "failed"
        };
        let write = ledger::finish(client, &self.name, release, status, report.exit_code());
        // Old task records go first, on the second connection (see `record::KEEP_RELEASES`).
        self.prune().await;
        let bound = self.finish_bound();
        match tokio::time::timeout(bound, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(self.failure(&err)),
            Err(_) => {
                // A COMMIT on the same silent connection would only wait again.
                self.outcome_unanswered.set(true);
                Err(format!(
                    "the database did not answer within {}s",
                    bound.as_secs()
                ))
            }
        }
    }

    /// From now on the outcome and the COMMIT wait at most a few seconds for the database:
    /// release-tasks was told to stop.
    pub fn hurry(&self) {
        self.stopping.set(true);
    }

    fn finish_bound(&self) -> Duration {
        if self.stopping.get() {
            STOPPING_FINISH_TIMEOUT
        } else {
            FINISH_TIMEOUT
        }
    }

    /// Commits the lock's transaction, which releases the lock (and, with `once`, makes the outcome
    /// visible), and closes the connection. `Err` says why the COMMIT did not succeed; closing the
    /// connection releases the lock anyway, but nothing of the transaction was written.
    pub async fn release(self) -> Result<(), String> {
        let Some(client) = &self.client else {
            return Ok(());
        };
        if self.outcome_unanswered.get() {
            let result =
                "the database did not answer the outcome, so no COMMIT was tried".to_owned();
            tracing::warn!(lock = %self.name, error = %result, "cannot commit the lock's transaction; closing the connection instead, which releases the lock");
            return Err(result);
        }
        let bound = self.finish_bound();
        let result = match tokio::time::timeout(bound, client.batch_execute("COMMIT")).await {
            Ok(Ok(())) => {
                tracing::info!(lock = %self.name, "released the release lock");
                return Ok(());
            }
            Ok(Err(err)) => self.failure(&err),
            Err(_) => format!(
                "the database did not answer the COMMIT within {}s",
                bound.as_secs()
            ),
        };
        tracing::warn!(lock = %self.name, error = %result, "cannot commit the lock's transaction; closing the connection instead, which releases the lock");
        Err(result)
    }

    /// The driver's error, with why the connection ended when it did, free of secrets.
    fn failure(&self, err: &tokio_postgres::Error) -> String {
        let text = self.db.scrub(&describe(err));
        match self.watch.ended() {
            Some(why) if !text.contains(&why) => format!("{text} ({why})"),
            _ => text,
        }
    }

    /// Closes the connection of a lock found lost, writing and committing nothing: its transaction
    /// is gone, and another replica may hold the lock by now.
    pub fn abandon(self) {
        drop(self);
    }

    /// One round trip in the lock's transaction: whether this backend still holds the advisory lock.
    async fn probe(&self, client: &Client) -> Result<(), String> {
        if client.is_closed() {
            return Err(self.watch.ended().map_or_else(
                || "the database connection is closed".to_owned(),
                |why| format!("the database connection is closed ({why})"),
            ));
        }
        let (high, low) = (
            i64::from((self.key >> 32) as u32),
            i64::from(self.key as u32),
        );
        let params = [(&high as _, Type::INT8), (&low as _, Type::INT8)];
        let query = client.query_typed_one(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted \
               AND pid = pg_backend_pid() AND objsubid = 1 \
               AND classid::bigint = $1 AND objid::bigint = $2)",
            &params,
        );
        match tokio::time::timeout(CHECK_TIMEOUT, query).await {
            Err(_) => Err(format!(
                "the database did not answer within {}s",
                CHECK_TIMEOUT.as_secs()
            )),
            Ok(Err(err)) => Err(self.db.scrub(&describe(&err))),
            Ok(Ok(row)) => match row.try_get::<_, bool>(0) {
                Ok(true) => Ok(()),
                Ok(false) => Err("the lock's session no longer holds it".to_owned()),
                Err(err) => Err(self.db.scrub(&describe(&err))),
            },
        }
    }
}

impl Recorder for PgLock {
    fn record(&self, record: TaskRecord) -> RecordFuture<'_> {
        Box::pin(self.write_record(record))
    }
}

impl LockCheck for PgLock {
    fn check(&self) -> CheckFuture<'_> {
        Box::pin(async move {
            let Some(client) = &self.client else {
                return Ok(());
            };
            crate::lock_check::remembered(&self.name, &self.lost, self.probe(client)).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_and_distinct() {
        assert_eq!(key_for("shop"), key_for("shop"));
        assert_ne!(key_for("shop"), key_for("shop-staging"));
    }

    #[test]
    fn the_holder_name_keeps_the_pid_within_63_bytes() {
        let name = application_name(Some(&"x".repeat(80)));
        assert!(name.starts_with(&format!("release-tasks pid {} on ", std::process::id())));
        assert!(name.len() <= 63);
    }

    #[test]
    fn passwords_are_scrubbed() {
        let secrets = secrets_of("postgres://app:hunter2@db:5432/app");
        assert_eq!(secrets[1], "hunter2");
        let keywords = secrets_of("host=db password='p w' user=app");
        assert!(keywords.iter().any(|s| s == "p w"), "{keywords:?}");
        assert_eq!(
            redact::scrub("login for app with hunter2 failed", &secrets),
            "login for app with [redacted] failed"
        );
    }
}
