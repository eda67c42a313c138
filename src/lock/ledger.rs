//! The release ledger, `release_tasks_runs`: which release ran, when, by whom, and how it ended; and
//! the two subcommands that read it, `wait` (block until this release completed) and `history`.
//!
//! Every query is unprepared (the simple protocol, or an unnamed statement with typed parameters), so
//! that it works through a pooler in transaction mode, where a named prepared statement may land on
//! another server connection.

use std::fmt::Write as _;
use std::io::Write;
use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tokio_postgres::types::Type;

use super::{Database, PreviousRun, holder_of, jittered, key_for, lock_name, or_stop, release_id};
use crate::cli::LogFormat;
use crate::config::Config;
use crate::error::{Diagnostic, Error, Result};
use crate::gate::Env;
use crate::metadata::Metadata;
use crate::plan::Plan;
use crate::signals::Signals;

/// Serialises the creation of the ledger table across every app on the database: `CREATE TABLE IF
/// NOT EXISTS` run by two sessions at once fails in one of them (`pg_type_typname_nsp_index`).
const CREATE_KEY: i64 = 0x7274_6c65_6467_6572; // "rtledger"

/// Creates the ledger table (or adds the columns a table from an earlier release-tasks lacks), under a
/// lock that every release-tasks takes for it. Costs one query when the table is already there.
pub(super) async fn ensure_table(client: &Client) -> Result<(), tokio_postgres::Error> {
    let ready = client
        .simple_query(
            "SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('release_tasks_runs') \
             AND attname = 'commit' AND NOT attisdropped",
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
struct Status {
    state: String,
    holder: String,
    finished_at: Option<String>,
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

fn is_undefined_table(err: &tokio_postgres::Error) -> bool {
    err.as_db_error()
        .is_some_and(|db| db.code().code() == "42P01")
}

/// Records `release` as running by `holder`.
pub(super) async fn begin(
    client: &Client,
    name: &str,
    release: &str,
    holder: &str,
    meta: &Metadata,
) -> Result<(), tokio_postgres::Error> {
    client
        .query_typed(
            "INSERT INTO release_tasks_runs (lock_key, release, status, holder, version, commit) \
             VALUES ($1, $2, 'running', $3, $4, $5) \
             ON CONFLICT (lock_key, release) DO UPDATE \
             SET status = 'running', holder = $3, started_at = now(), finished_at = NULL, exit_code = NULL, \
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

/// Records how `release` ended.
pub(super) async fn finish(
    client: &Client,
    name: &str,
    release: &str,
    status: &str,
    exit_code: i32,
) -> Result<(), tokio_postgres::Error> {
    client
        .query_typed(
            "UPDATE release_tasks_runs SET status = $3, finished_at = now(), exit_code = $4 \
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

/// What `wait` and `history` start from: the `[lock]` table, ready to connect.
fn prepare<'a>(config: &'a Config, plan: &Plan, command: &str) -> Result<&'a crate::config::Lock> {
    let Some(lock) = &config.lock else {
        return Err(Error::ConfigInvalid {
            path: config.path.clone(),
            problems: vec![Diagnostic {
                location: None,
                message: format!(
                    "`release-tasks {command}` reads the release ledger of [lock], and this config has no [lock] table; \
                     add [lock] with postgres = \"DATABASE_URL\" and once = true"
                ),
            }],
        });
    };
    if !plan.preflight.is_empty() {
        return Err(Error::Environment {
            problems: plan.preflight.clone(),
        });
    }
    Ok(lock)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the runtime: {e}"))?)
}

/// `release-tasks wait`: blocks until the ledger records this release as completed (0), for up to
/// `timeout` (default the lock's `timeout`; then 75). A release recorded as failed or running, or not
/// at all, is waited for: another replica may (re)run it.
pub fn wait(config: &Config, plan: &Plan, env: &Env, timeout: Option<Duration>) -> Result<i32> {
    let lock = prepare(config, plan, "wait")?;
    if !lock.once {
        return Err(Error::ConfigInvalid {
            path: config.path.clone(),
            problems: vec![Diagnostic {
                location: None,
                message: "`release-tasks wait` waits for the ledger to record the release, which [lock] keeps only \
                          with once = true; add once = true to [lock]"
                    .into(),
            }],
        });
    }
    let timeout = timeout.unwrap_or(lock.timeout);
    let meta = &plan.meta;
    let name = lock_name(lock, meta);
    let release = release_id(meta).unwrap_or_default();
    crate::log::write_in_background();
    runtime()?.block_on(async {
        let mut signals = Signals::install()
            .map_err(|e| anyhow::anyhow!("cannot install signal handlers: {e}"))?;
        let db = Database::open(lock, env)?;
        let started = Instant::now();
        let mut pause = Duration::from_millis(500);
        let mut last = String::new();
        loop {
            let client = db.connect(&mut signals).await?;
            let status = or_stop(&mut signals, async {
                status_of(&client, &name, &release)
                    .await
                    .map_err(|e| db.error("cannot read release_tasks_runs", &e))
            })
            .await?;
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
            let holder = or_stop(&mut signals, async {
                holder_of(&client, key_for(&name))
                    .await
                    .map_err(|e| db.error("cannot read who holds the lock", &e))
            })
            .await?;
            drop(client);
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

/// One release in `history`.
struct Entry {
    release: String,
    version: Option<String>,
    commit: Option<String>,
    status: String,
    holder: String,
    started_at: String,
    duration_s: Option<f64>,
    exit_code: Option<i32>,
}

/// `release-tasks history`: the last `limit` releases of this lock, newest first.
pub fn history(
    config: &Config,
    plan: &Plan,
    env: &Env,
    limit: u32,
    format: LogFormat,
) -> Result<i32> {
    let lock = prepare(config, plan, "history")?;
    let name = lock_name(lock, &plan.meta);
    let entries = runtime()?.block_on(async {
        let mut signals = Signals::install()
            .map_err(|e| anyhow::anyhow!("cannot install signal handlers: {e}"))?;
        let db = Database::open(lock, env)?;
        let client = db.connect(&mut signals).await?;
        let limit = i64::from(limit);
        let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 2] =
            [(&name, Type::TEXT), (&limit, Type::INT8)];
        let query = client.query_typed(
            "SELECT release, version, commit, status, holder, \
                   to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), \
                   extract(epoch FROM finished_at - started_at)::float8, exit_code \
                 FROM release_tasks_runs WHERE lock_key = $1 ORDER BY started_at DESC LIMIT $2",
            &params,
        );
        let result = or_stop(&mut signals, async { Ok(query.await) }).await?;
        let rows = match result {
            Ok(rows) => rows,
            Err(err) if is_undefined_table(&err) => Vec::new(),
            Err(err) => return Err(db.error("cannot read release_tasks_runs", &err)),
        };
        rows.iter()
            .map(|r| {
                Ok(Entry {
                    release: r.try_get(0)?,
                    version: r.try_get(1)?,
                    commit: r.try_get(2)?,
                    status: r.try_get(3)?,
                    holder: r.try_get(4)?,
                    started_at: r.try_get(5)?,
                    duration_s: r.try_get(6)?,
                    exit_code: r.try_get(7)?,
                })
            })
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(|e| db.error("cannot read release_tasks_runs", &e))
    })?;
    print_history(&name, &entries, format)
        .map_err(|e| anyhow::anyhow!("cannot write the history: {e}"))?;
    Ok(0)
}

fn print_history(name: &str, entries: &[Entry], format: LogFormat) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    let duration = |e: &Entry| {
        e.duration_s.map_or_else(
            || "-".to_owned(),
            |s| {
                humantime::format_duration(Duration::from_secs(s.max(0.0).round() as u64))
                    .to_string()
            },
        )
    };
    match format {
        LogFormat::Json => {
            for e in entries {
                let line = serde_json::json!({
                    "lock": name,
                    "release": e.release,
                    "version": e.version,
                    "commit": e.commit,
                    "status": e.status,
                    "started_at": e.started_at,
                    "duration_s": e.duration_s,
                    "exit_code": e.exit_code,
                    "holder": e.holder,
                });
                writeln!(out, "{}", crate::secrets::mask(&line.to_string()))?;
            }
        }
        LogFormat::Text if entries.is_empty() => {
            writeln!(out, "no releases recorded for `{name}`")?;
        }
        LogFormat::Text => {
            let rows: Vec<[String; 6]> = entries
                .iter()
                .map(|e| {
                    [
                        e.version.clone().unwrap_or_else(|| e.release.clone()),
                        e.commit.clone().unwrap_or_else(|| "-".to_owned()),
                        e.status.clone(),
                        e.started_at.clone(),
                        duration(e),
                        e.holder.clone(),
                    ]
                })
                .collect();
            let header = [
                "VERSION", "COMMIT", "STATUS", "STARTED", "DURATION", "HOLDER",
            ];
            let mut widths = header.map(str::len);
            for row in &rows {
                for (w, cell) in widths.iter_mut().zip(row) {
                    *w = (*w).max(cell.len());
                }
            }
            for row in std::iter::once(header.map(str::to_owned)).chain(rows) {
                let mut line = String::new();
                for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
                    if i + 1 == row.len() {
                        line.push_str(cell);
                    } else {
                        let _ = write!(line, "{cell:<w$}  ");
                    }
                }
                writeln!(out, "{}", crate::secrets::mask(&line))?;
            }
        }
    }
    out.flush()
}
