//! The ledger's per-task records in PostgreSQL, `release_tasks_task_runs`: every query on that table,
//! in one place (a `MySQL` backend mirrors this file). The records are the backend-neutral types of
//! `record.rs`; what to do with them is the caller's.
//!
//! One row per task of a release (key, release, task). A release's rows are deleted when it starts
//! again (a failed release run once more), and written as the release proceeds: `running` when a
//! task starts, its outcome when it ends. They are written by short autocommitted statements on a
//! connection of their own, so that other sessions see them at once while the lock's transaction
//! stays open; every statement is unprepared, which a pooler in transaction mode needs.

use std::time::{Duration, UNIX_EPOCH};

use tokio_postgres::Client;
use tokio_postgres::types::{ToSql, Type};

use crate::changed::LastSuccess;
use crate::record::{KEEP_RELEASES, ReleaseEntry, TaskEntry, TaskRecord};

/// The table's definition; `ensure_table` in `ledger.rs` runs it under the creation lock.
pub(super) const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS release_tasks_task_runs (\
       lock_key text NOT NULL, \
       release text NOT NULL, \
       task text NOT NULL, \
       position integer NOT NULL, \
       outcome text NOT NULL, \
       exit_code integer, \
       started_at timestamptz, \
       duration_ms bigint, \
       attempts integer NOT NULL DEFAULT 0, \
       detail text NOT NULL DEFAULT '', \
       output_tail text NOT NULL DEFAULT '', \
       inputs_hash text, \
       inputs_manifest text, \
       recorded_at timestamptz NOT NULL DEFAULT clock_timestamp(), \
       PRIMARY KEY (lock_key, release, task)); \
     CREATE INDEX IF NOT EXISTS release_tasks_task_runs_success \
       ON release_tasks_task_runs (lock_key, task, recorded_at) WHERE outcome = 'succeeded' AND inputs_hash IS NOT NULL;";

/// A query with typed parameters, unprepared (an unnamed statement), as the pooler needs.
type Params<'a> = Vec<(&'a (dyn ToSql + Sync), Type)>;

/// Forgets the task records of an earlier run of `release` (it is being run again).
pub(super) async fn clear(
    client: &Client,
    name: &str,
    release: &str,
) -> Result<(), tokio_postgres::Error> {
    client
        .query_typed(
            "DELETE FROM release_tasks_task_runs WHERE lock_key = $1 AND release = $2",
            &[(&name, Type::TEXT), (&release, Type::TEXT)],
        )
        .await
        .map(drop)
}

/// Writes (or replaces) one task's record.
pub(super) async fn write(
    client: &Client,
    name: &str,
    release: &str,
    record: &TaskRecord,
) -> Result<(), tokio_postgres::Error> {
    let position = i32::try_from(record.position).unwrap_or(i32::MAX);
    let attempts = i32::try_from(record.attempts).unwrap_or(i32::MAX);
    let duration_ms = i64::try_from(record.duration.as_millis()).unwrap_or(i64::MAX);
    // Seconds since the epoch, as the client's clock has them: the task's start is when release-tasks
    // started it, whatever the transaction's clock says.
    let started = record.started_at.map(|t| {
        t.duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs_f64()
    });
    // Lines as one text, one a line (a tail's lines hold no newline): plain text, as every backend
    // stores it, and no array encoding in the binary.
    let tail = record.output_tail.join("\n");
    let params: Params = vec![
        (&name, Type::TEXT),
        (&release, Type::TEXT),
        (&record.task, Type::TEXT),
        (&position, Type::INT4),
        (&record.outcome, Type::TEXT),
        (&record.exit_code, Type::INT4),
        (&started, Type::FLOAT8),
        (&duration_ms, Type::INT8),
        (&attempts, Type::INT4),
        (&record.detail, Type::TEXT),
        (&tail, Type::TEXT),
        (&record.inputs_hash, Type::TEXT),
        (&record.inputs_manifest, Type::TEXT),
    ];
    client
        .query_typed(
            "INSERT INTO release_tasks_task_runs (lock_key, release, task, position, outcome, exit_code, \
               started_at, duration_ms, attempts, detail, output_tail, inputs_hash, inputs_manifest) \
             VALUES ($1, $2, $3, $4, $5, $6, to_timestamp($7), $8, $9, $10, $11, $12, $13) \
             ON CONFLICT (lock_key, release, task) DO UPDATE SET position = $4, outcome = $5, exit_code = $6, \
               started_at = to_timestamp($7), duration_ms = $8, attempts = $9, detail = $10, output_tail = $11, \
               inputs_hash = $12, inputs_manifest = $13, recorded_at = clock_timestamp()",
            &params,
        )
        .await?;
    // Only the last successful run's file list is ever compared with: older ones are dropped.
    if record.inputs_manifest.is_some() {
        client
            .query_typed(
                "UPDATE release_tasks_task_runs SET inputs_manifest = NULL \
                 WHERE lock_key = $1 AND task = $2 AND release <> $3 AND inputs_manifest IS NOT NULL",
                &[
                    (&name, Type::TEXT),
                    (&record.task, Type::TEXT),
                    (&release, Type::TEXT),
                ],
            )
            .await?;
    }
    Ok(())
}

/// Per task of `tasks`, what its last successful run (under this key) recorded of its files.
pub(super) async fn last_successes(
    client: &Client,
    name: &str,
    tasks: &[String],
) -> Result<Vec<(String, LastSuccess)>, tokio_postgres::Error> {
    // Task names hold no newline (config validation): one text, split by the server.
    let names = tasks.join("\n");
    let rows = client
        .query_typed(
            "SELECT DISTINCT ON (task) task, release, inputs_hash, inputs_manifest \
             FROM release_tasks_task_runs \
             WHERE lock_key = $1 AND task = ANY(string_to_array($2, E'\\n')) AND outcome = 'succeeded' \
               AND inputs_hash IS NOT NULL \
             ORDER BY task, recorded_at DESC",
            &[(&name, Type::TEXT), (&names, Type::TEXT)],
        )
        .await;
    let rows = match rows {
        Ok(rows) => rows,
        Err(err) if super::ledger::is_undefined_table(&err) => return Ok(Vec::new()),
        Err(err) => return Err(err),
    };
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get(0)?,
                LastSuccess {
                    release: r.try_get(1)?,
                    hash: r.try_get(2)?,
                    manifest: r.try_get(3)?,
                },
            ))
        })
        .collect()
}

/// Deletes the task records of all but the last [`KEEP_RELEASES`] releases of this key, keeping each
/// task's last successful run with a file hash (which a `changed` gate compares with).
pub(super) async fn prune(client: &Client, name: &str) -> Result<(), tokio_postgres::Error> {
    let keep = KEEP_RELEASES;
    client
        .query_typed(
            "DELETE FROM release_tasks_task_runs t \
             WHERE t.lock_key = $1 \
               AND t.release NOT IN (SELECT r.release FROM release_tasks_runs r WHERE r.lock_key = $1 \
                                     ORDER BY r.started_at DESC LIMIT $2) \
               AND (t.release, t.task) NOT IN (SELECT DISTINCT ON (s.task) s.release, s.task \
                                              FROM release_tasks_task_runs s \
                                              WHERE s.lock_key = $1 AND s.outcome = 'succeeded' \
                                                AND s.inputs_hash IS NOT NULL \
                                              ORDER BY s.task, s.recorded_at DESC)",
            &[(&name, Type::TEXT), (&keep, Type::INT8)],
        )
        .await
        .map(drop)
}

/// The release row that `wanted` names (its release id, version or commit), newest first.
pub(super) async fn release(
    client: &Client,
    name: &str,
    wanted: &str,
) -> Result<Option<ReleaseEntry>, tokio_postgres::Error> {
    let row = client
        .query_typed_opt(
            &format!(
                "SELECT {RELEASE_COLUMNS} FROM release_tasks_runs \
                 WHERE lock_key = $1 AND (release = $2 OR version = $2 OR commit = $2) \
                 ORDER BY (release = $2) DESC, started_at DESC LIMIT 1"
            ),
            &[(&name, Type::TEXT), (&wanted, Type::TEXT)],
        )
        .await;
    match row {
        Ok(row) => row.as_ref().map(release_entry).transpose(),
        Err(err) if super::ledger::is_undefined_table(&err) => Ok(None),
        Err(err) => Err(err),
    }
}

/// The last `limit` releases of this key, newest first.
pub(super) async fn releases(
    client: &Client,
    name: &str,
    limit: u32,
) -> Result<Vec<ReleaseEntry>, tokio_postgres::Error> {
    let limit = i64::from(limit);
    let rows = client
        .query_typed(
            &format!(
                "SELECT {RELEASE_COLUMNS} FROM release_tasks_runs WHERE lock_key = $1 \
                 ORDER BY started_at DESC LIMIT $2"
            ),
            &[(&name, Type::TEXT), (&limit, Type::INT8)],
        )
        .await;
    match rows {
        Ok(rows) => rows.iter().map(release_entry).collect(),
        Err(err) if super::ledger::is_undefined_table(&err) => Ok(Vec::new()),
        Err(err) => Err(err),
    }
}

const RELEASE_COLUMNS: &str = "release, version, commit, status, holder, \
    to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), \
    extract(epoch FROM finished_at - started_at)::float8, exit_code";

fn release_entry(r: &tokio_postgres::Row) -> Result<ReleaseEntry, tokio_postgres::Error> {
    Ok(ReleaseEntry {
        release: r.try_get(0)?,
        version: r.try_get(1)?,
        commit: r.try_get(2)?,
        status: r.try_get(3)?,
        holder: r.try_get(4)?,
        started_at: r.try_get(5)?,
        duration_s: r.try_get(6)?,
        exit_code: r.try_get(7)?,
    })
}

/// The task records of one release, in the release's order.
pub(super) async fn tasks(
    client: &Client,
    name: &str,
    release: &str,
) -> Result<Vec<TaskEntry>, tokio_postgres::Error> {
    let rows = client
        .query_typed(
            "SELECT task, position, outcome, exit_code, \
               to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), \
               duration_ms, attempts, detail, output_tail, inputs_hash \
             FROM release_tasks_task_runs WHERE lock_key = $1 AND release = $2 ORDER BY position, task",
            &[(&name, Type::TEXT), (&release, Type::TEXT)],
        )
        .await;
    let rows = match rows {
        Ok(rows) => rows,
        Err(err) if super::ledger::is_undefined_table(&err) => return Ok(Vec::new()),
        Err(err) => return Err(err),
    };
    rows.iter()
        .map(|r| {
            Ok(TaskEntry {
                task: r.try_get(0)?,
                position: u32::try_from(r.try_get::<_, i32>(1)?).unwrap_or(0),
                outcome: r.try_get(2)?,
                exit_code: r.try_get(3)?,
                started_at: r.try_get(4)?,
                duration_ms: r.try_get(5)?,
                attempts: u32::try_from(r.try_get::<_, i32>(6)?).unwrap_or(0),
                detail: r.try_get(7)?,
                output_tail: r
                    .try_get::<_, String>(8)?
                    .lines()
                    .map(str::to_owned)
                    .collect(),
                inputs_hash: r.try_get(9)?,
            })
        })
        .collect()
}
