//! The release ledger, `release_tasks_runs`: which release ran, when, by whom, and how it ended; and
//! reading it for the two subcommands, `wait` (block until this release completed) and `history`
//! (whose printing is `history.rs`'s: the lock layer returns data). The per-task records are
//! `records.rs`.
//!
//! Every query is unprepared (the simple protocol, or an unnamed statement with typed parameters), so
//! that it works through a pooler in transaction mode, where a named prepared statement may land on
//! another server connection.

use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tokio_postgres::types::Type;

use super::{
    Database, PreviousRun, holder_of, jittered, key_for, lock_name, or_stop, records, release_id,
};
use crate::config::Lock;
use crate::error::{Error, Result};
use crate::gate::Env;
use crate::metadata::Metadata;
use crate::record::{ReleaseEntry, TaskEntry};
use crate::signals::Signals;

/// Serialises the creation of the ledger table across every app on the database: `CREATE TABLE IF
/// NOT EXISTS` run by two sessions at once fails in one of them (`pg_type_typname_nsp_index`).
const CREATE_KEY: i64 = 0x7274_6c65_6467_6572; // "rtledger"

/// The per-task records' table (`records.rs`), created with the releases' table.
const TASKS_TABLE: &str = super::records::CREATE_TABLE;

/// Creates the ledger tables (or adds the columns a table from an earlier release-tasks lacks), under a
/// lock that every release-tasks takes for it. Costs one query when the table is already there.
pub(super) async fn ensure_table(client: &Client) -> Result<(), tokio_postgres::Error> {
    let ready = client
        .simple_query(
            "SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('release_tasks_runs') \
             AND attname = 'commit' AND NOT attisdropped \
             AND to_regclass('release_tasks_task_runs') IS NOT NULL",
        )
        .await?
        .iter()
        .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)));
    if ready {
        return Ok(());
    }
    // Under the lock, CREATE TABLE IF NOT EXISTS finds a table created meanwhile; the columns of an
    // older table are added only when missing (ALTER TABLE waits for every open transaction that has
    // read the table, and everything after it waits too), and not waited for past the lock timeout.
    client
        .batch_execute(&format!(
            "BEGIN; \
             SET LOCAL lock_timeout = '10s'; \
             SELECT pg_advisory_xact_lock({CREATE_KEY}); \
             CREATE TABLE IF NOT EXISTS release_tasks_runs (\
               lock_key text NOT NULL, \
               release text NOT NULL, \
               status text NOT NULL, \
               holder text NOT NULL, \
               started_at timestamptz NOT NULL DEFAULT now(), \
               finished_at timestamptz, \
               exit_code integer, \
               version text, \
               commit text, \
               PRIMARY KEY (lock_key, release)); \
             DO $$ BEGIN \
               IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'release_tasks_runs'::regclass \
                              AND attname = 'commit' AND NOT attisdropped) THEN \
                 ALTER TABLE release_tasks_runs ADD COLUMN IF NOT EXISTS version text, \
                   ADD COLUMN IF NOT EXISTS commit text; \
               END IF; \
             END $$; \
             {TASKS_TABLE} \
             COMMIT"
        ))
        .await
}

/// The completed run of `release`, if there is one. A missing table means none.
pub(super) async fn completed(
    client: &Client,
    name: &str,
    release: &str,
) -> Result<Option<PreviousRun>, tokio_postgres::Error> {
    let Some(row) = status_of(client, name, release).await? else {
        return Ok(None);
    };
    Ok((row.state == "succeeded").then(|| PreviousRun {
        holder: row.holder,
        finished_at: row.finished_at.unwrap_or_default(),
    }))
}

/// One release's row.
pub(super) struct Status {
    pub(super) state: String,
    pub(super) holder: String,
    pub(super) finished_at: Option<String>,
}

async fn status_of(
    client: &Client,
    name: &str,
    release: &str,
) -> Result<Option<Status>, tokio_postgres::Error> {
    let result = client
        .query_typed_opt(
            "SELECT status, holder, to_char(finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') \
             FROM release_tasks_runs WHERE lock_key = $1 AND release = $2",
            &[(&name, Type::TEXT), (&release, Type::TEXT)],
        )
        .await;
    let row = match result {
        Ok(row) => row,
        Err(err) if is_undefined_table(&err) => return Ok(None),
        Err(err) => return Err(err),
    };
    row.map(|r| {
        Ok(Status {
            state: r.try_get(0)?,
            holder: r.try_get(1)?,
            finished_at: r.try_get(2)?,
        })
    })
    .transpose()
}

pub(super) fn is_undefined_table(err: &tokio_postgres::Error) -> bool {
    err.as_db_error()
        .is_some_and(|db| db.code().code() == "42P01")
}

/// Records `release` as running by `holder`, started now.
///
/// Times come from `clock_timestamp()`, the server's clock when the statement runs: `now()` is the
/// start of the transaction, and the ledger may be written in the lock's transaction, which was
/// opened when the lock was taken (a 3 s release would show as 0 s, "completed at" would name the
/// moment the lock was taken).
pub(super) async fn begin(
    client: &Client,
    name: &str,
    release: &str,
    holder: &str,
    meta: &Metadata,
) -> Result<(), tokio_postgres::Error> {
    client
        .query_typed(
            "INSERT INTO release_tasks_runs (lock_key, release, status, holder, started_at, version, commit) \
             VALUES ($1, $2, 'running', $3, clock_timestamp(), $4, $5) \
             ON CONFLICT (lock_key, release) DO UPDATE \
             SET status = 'running', holder = $3, started_at = clock_timestamp(), finished_at = NULL, exit_code = NULL, \
                 version = $4, commit = $5",
            &[
                (&name, Type::TEXT),
                (&release, Type::TEXT),
                (&holder, Type::TEXT),
                (&meta.version, Type::TEXT),
                (&meta.commit, Type::TEXT),
            ],
        )
        .await
        .map(drop)
}

/// Records how `release` ended, finished now (`clock_timestamp()`, see [`begin`]).
pub(super) async fn finish(
    client: &Client,
    name: &str,
    release: &str,
    status: &str,
    exit_code: i32,
) -> Result<(), tokio_postgres::Error> {
    client
        .query_typed(
            "UPDATE release_tasks_runs SET status = $3, finished_at = clock_timestamp(), exit_code = $4 \
             WHERE lock_key = $1 AND release = $2",
            &[
                (&name, Type::TEXT),
                (&release, Type::TEXT),
                (&status, Type::TEXT),
                (&exit_code, Type::INT4),
            ],
        )
        .await
        .map(drop)
}

/// What `wait` and `history` need before connecting: the database URL and the lock's key, and for
/// `wait` the release's version; not `[require] env` or the gates' variables, which a laptop asking
/// about a release does not have.
fn ready(lock: &Lock, env: &Env, meta: &Metadata, needs_release: bool) -> Result<()> {
    let problems = super::preflight_for(lock, env, meta, needs_release);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Environment { problems })
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the runtime: {e}"))?)
}

/// `release-tasks wait`: blocks until the ledger records this release as completed (0), for up to
/// `timeout` (default the lock's `timeout`; then 75). A release recorded as failed or running, or not
/// at all, is waited for: another replica may (re)run it; with `fail_fast`, a release recorded as
/// failed (or left running by a replica that died) while no replica holds the lock ends the wait
/// with [`EXIT_FAILED_RELEASE`].
pub fn wait(
    lock: &Lock,
    env: &Env,
    meta: &Metadata,
    timeout: Option<Duration>,
    fail_fast: bool,
) -> Result<i32> {
    ready(lock, env, meta, true)?;
    let timeout = timeout.unwrap_or(lock.timeout);
    let name = lock_name(lock, meta);
    let release = release_id(meta).unwrap_or_default();
    runtime()?.block_on(async {
        let mut signals = Signals::install()
            .map_err(|e| anyhow::anyhow!("cannot install signal handlers: {e}"))?;
        let db = Source::open(lock, env)?;
        let started = Instant::now();
        let mut pause = Duration::from_millis(500);
        let mut last = String::new();
        loop {
            let (status, holder) = db.look(&mut signals, &name, &release).await?;
            if let Some(Status {
                state,
                holder,
                finished_at,
            }) = &status
            {
                if state == "succeeded" {
                    tracing::info!(
                        lock = %name, release = %release, by = %holder,
                        finished_at = finished_at.as_deref().unwrap_or(""),
                        "the release completed; done waiting"
                    );
                    return Ok(0);
                }
            }
            if fail_fast && holder.is_none() && status.is_some() {
                // The release may have completed between the two reads: read it once more.
                let (again, _) = db.look(&mut signals, &name, &release).await?;
                match again {
                    Some(s) if s.state == "succeeded" => {
                        tracing::info!(lock = %name, release = %release, by = %s.holder, "the release completed; done waiting");
                        return Ok(0);
                    }
                    Some(s) => {
                        let what = if s.state == "failed" {
                            "recorded as failed".to_owned()
                        } else {
                            format!("recorded as {} by a replica that no longer holds the lock", s.state)
                        };
                        tracing::error!(
                            lock = %name, release = %release, ledger = %s.state, by = %s.holder,
                            exit_code = EXIT_FAILED_RELEASE,
                            "the release is {what} and no replica holds the lock; not waiting (--fail-fast). \
                             `release-tasks history --show {release}` says why"
                        );
                        return Ok(EXIT_FAILED_RELEASE);
                    }
                    None => {}
                }
            }
            let recorded = status
                .as_ref()
                .map_or("not recorded yet".to_owned(), |s| format!("recorded as {}", s.state));
            let holder = holder.unwrap_or_else(|| "nobody".to_owned());
            let now = format!("{recorded} {holder}");
            if now != last {
                tracing::info!(
                    lock = %name, release = %release, ledger = %recorded, holder = %holder,
                    timeout = %humantime::format_duration(timeout),
                    "waiting for the release to complete"
                );
                last = now;
            }
            let left = timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Err(Error::LockTimeout(format!(
                    "[lock] release {release} of `{name}` was not completed within {} (it is {recorded}, lock held by {holder}); \
                     raise --timeout, or look at the release's own log",
                    humantime::format_duration(timeout)
                )));
            }
            tokio::select! {
                biased;
                sig = signals.next_stop() => return Err(Error::Interrupted(sig)),
                () = tokio::time::sleep(jittered(pause).min(left)) => {}
            }
            pause = (pause * 3 / 2).min(Duration::from_secs(5));
        }
    })
}

/// The exit status of `wait --fail-fast` when the release is recorded as failed and no replica
/// holds the lock.
pub const EXIT_FAILED_RELEASE: i32 = 1;

/// What `history` asks the ledger.
pub enum Query<'a> {
    /// The last N releases.
    Last(u32),
    /// One release (its version, release id or commit) and its tasks.
    Show(&'a str),
}

/// What the ledger answered, for `history.rs` to print.
pub enum Answer {
    Releases(Vec<ReleaseEntry>),
    /// `None`: no such release is recorded.
    Release(Option<(ReleaseEntry, Vec<TaskEntry>)>),
}

/// Reads the ledger for `history`: no release version needed, only the database and the lock's key.
/// Returns the lock's name and the answer.
pub fn read(
    lock: &Lock,
    env: &Env,
    meta: &Metadata,
    query: &Query<'_>,
) -> Result<(String, Answer)> {
    ready(lock, env, meta, false)?;
    let name = lock_name(lock, meta);
    let answer = runtime()?.block_on(async {
        let mut signals = Signals::install()
            .map_err(|e| anyhow::anyhow!("cannot install signal handlers: {e}"))?;
        #[cfg(feature = "mysql")]
        if lock.backend == crate::config::Backend::Mysql {
            let db = super::mysql::Database::open(lock, env)?;
            let mut conn = db.connect(&mut signals).await?;
            let answer = or_stop(&mut signals, db.read(&mut conn, &name, query)).await?;
            conn.quit().await;
            return Ok(answer);
        }
        let db = Database::open(lock, env)?;
        let (client, _) = db.connect(&mut signals).await?;
        let read = async {
            let answer = match query {
                Query::Last(limit) => {
                    Answer::Releases(records::releases(&client, &name, *limit).await?)
                }
                Query::Show(wanted) => match records::release(&client, &name, wanted).await? {
                    None => Answer::Release(None),
                    Some(entry) => {
                        let tasks = records::tasks(&client, &name, &entry.release).await?;
                        Answer::Release(Some((entry, tasks)))
                    }
                },
            };
            Ok::<_, tokio_postgres::Error>(answer)
        };
        or_stop(&mut signals, async {
            read.await
                .map_err(|e| db.error("cannot read the release ledger", &e))
        })
        .await
    })?;
    Ok((name, answer))
}

/// For `plan`: what each of `tasks` recorded at its last successful run, read without the lock
/// (`run` reads it again under the lock). `Err` says, in a few words, why it cannot be read here.
pub fn last_successes(
    lock: &Lock,
    env: &Env,
    meta: &Metadata,
    tasks: &[String],
) -> std::result::Result<std::collections::HashMap<String, crate::changed::LastSuccess>, String> {
    if let Some(problem) = super::preflight_for(lock, env, meta, false)
        .into_iter()
        .next()
    {
        return Err(problem);
    }
    let name = lock_name(lock, meta);
    let runtime = runtime().map_err(|e| e.to_string())?;
    runtime.block_on(async {
        #[cfg(feature = "mysql")]
        if lock.backend == crate::config::Backend::Mysql {
            let db = super::mysql::Database::open(lock, env).map_err(|e| e.to_string())?;
            let found =
                tokio::time::timeout(Duration::from_secs(15), db.last_successes(&name, tasks))
                    .await
                    .map_err(|_| "the database did not answer within 15s".to_owned())??;
            return Ok(found.into_iter().collect());
        }
        let db = Database::open(lock, env).map_err(|e| e.to_string())?;
        let (client, _) = tokio::time::timeout(Duration::from_secs(15), db.connect_once())
            .await
            .map_err(|_| "the database did not answer within 15s".to_owned())?
            .map_err(|e| db.scrub(&e.describe()))?;
        let found = records::last_successes(&client, &name, tasks)
            .await
            .map_err(|e| db.scrub(&super::describe(&e)))?;
        Ok(found.into_iter().collect())
    })
}

/// Where `wait` reads the ledger and the lock's holder from.
enum Source {
    Postgres(Database),
    #[cfg(feature = "mysql")]
    Mysql(super::mysql::Database),
}

impl Source {
    fn open(lock: &Lock, env: &Env) -> Result<Source, Error> {
        #[cfg(feature = "mysql")]
        if lock.backend == crate::config::Backend::Mysql {
            return super::mysql::Database::open(lock, env).map(Source::Mysql);
        }
        Database::open(lock, env).map(Source::Postgres)
    }

    /// One short connection: the release's row, then who holds the lock.
    async fn look(
        &self,
        signals: &mut Signals,
        name: &str,
        release: &str,
    ) -> Result<(Option<Status>, Option<String>), Error> {
        match self {
            Source::Postgres(db) => {
                let (client, _) = db.connect(signals).await?;
                or_stop(signals, async {
                    let status = status_of(&client, name, release)
                        .await
                        .map_err(|e| db.error("cannot read release_tasks_runs", &e))?;
                    let holder = holder_of(&client, key_for(name))
                        .await
                        .map_err(|e| db.error("cannot read who holds the lock", &e))?;
                    Ok((status, holder))
                })
                .await
            }
            #[cfg(feature = "mysql")]
            Source::Mysql(db) => {
                let mut conn = db.connect(signals).await?;
                let found = or_stop(signals, db.look(&mut conn, name, release)).await?;
                conn.quit().await;
                Ok(found)
            }
        }
    }
}
