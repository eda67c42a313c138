//! The ledger's per-task records on MySQL, `release_tasks_task_runs`: the MySQL side of
//! `../records.rs`, with the same columns and meanings, and the reads `history` makes.
//!
//! Differences from PostgreSQL, all in the storage: text columns are `LONGTEXT` (the output tail, one
//! line a line, as there); "the last success per task" and pruning are computed here in two steps,
//! because MySQL has no `DISTINCT ON` and no `LIMIT` in an `IN` subquery. The records are written on
//! the lock's own connection, where every statement commits by itself, so other sessions see each
//! one at once.

use std::time::SystemTime;

use super::wire::{Conn, Rows, WireError, quote};
use crate::changed::LastSuccess;
use crate::record::{KEEP_RELEASES, ReleaseEntry, TaskEntry, TaskRecord};

/// Created beside `release_tasks_runs` (see `ledger.rs` for why `CREATE TABLE IF NOT EXISTS` is safe).
pub(super) const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS release_tasks_task_runs (\
       lock_key VARCHAR(255) NOT NULL, \
       `release` VARCHAR(255) NOT NULL, \
       task VARCHAR(255) NOT NULL, \
       position INT NOT NULL, \
       outcome VARCHAR(32) NOT NULL, \
       exit_code INT NULL, \
       started_at DATETIME(6) NULL, \
       duration_ms BIGINT NULL, \
       attempts INT NOT NULL DEFAULT 0, \
       detail TEXT NOT NULL, \
       output_tail LONGTEXT NOT NULL, \
       inputs_hash VARCHAR(128) NULL, \
       inputs_manifest LONGTEXT NULL, \
       recorded_at DATETIME(6) NOT NULL, \
       PRIMARY KEY (lock_key, `release`, task), \
       KEY release_tasks_task_runs_success (lock_key, task, recorded_at)\
     ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin";

fn is_missing_table(err: &WireError) -> bool {
    matches!(err, WireError::Server { code: 1146, .. })
}

fn or_null(value: Option<&str>) -> String {
    value.map_or_else(|| "NULL".to_owned(), quote)
}

/// A time as MySQL's `DATETIME(6)` literal, in UTC.
fn datetime(time: SystemTime) -> String {
    let text = humantime::format_rfc3339_micros(time).to_string();
    quote(&text.replace('T', " ").replace('Z', ""))
}

/// Forgets the task records of an earlier run of `release` (it is being run again).
pub(super) async fn clear(conn: &mut Conn, name: &str, release: &str) -> Result<(), WireError> {
    conn.execute(&format!(
        "DELETE FROM release_tasks_task_runs WHERE lock_key = {} AND `release` = {}",
        quote(name),
        quote(release)
    ))
    .await
    .map(drop)
}

/// Writes (or replaces) one task's record.
pub(super) async fn write(
    conn: &mut Conn,
    name: &str,
    release: &str,
    record: &TaskRecord,
) -> Result<(), WireError> {
    // Lines as one text, one a line (a tail's lines hold no newline), as every backend stores it.
    let tail = record.output_tail.join("\n");
    let values = [
        quote(&record.outcome),
        record
            .exit_code
            .map_or_else(|| "NULL".to_owned(), |c| c.to_string()),
        record
            .started_at
            .map_or_else(|| "NULL".to_owned(), datetime),
        u64::try_from(record.duration.as_millis())
            .unwrap_or(u64::MAX)
            .to_string(),
        record.attempts.to_string(),
        quote(&record.detail),
        quote(&tail),
        or_null(record.inputs_hash.as_deref()),
        or_null(record.inputs_manifest.as_deref()),
    ];
    let columns = [
        "outcome",
        "exit_code",
        "started_at",
        "duration_ms",
        "attempts",
        "detail",
        "output_tail",
        "inputs_hash",
        "inputs_manifest",
    ];
    let update: Vec<String> = columns
        .iter()
        .zip(&values)
        .map(|(c, v)| format!("{c} = {v}"))
        .collect();
    conn.execute(&format!(
        "INSERT INTO release_tasks_task_runs (lock_key, `release`, task, position, {}, recorded_at) \
         VALUES ({}, {}, {}, {}, {}, UTC_TIMESTAMP(6)) \
         ON DUPLICATE KEY UPDATE position = {}, {}, recorded_at = UTC_TIMESTAMP(6)",
        columns.join(", "),
        quote(name),
        quote(release),
        quote(&record.task),
        record.position,
        values.join(", "),
        record.position,
        update.join(", "),
    ))
    .await?;
    // Only the last successful run's file list is ever compared with: older ones are dropped.
    if record.inputs_manifest.is_some() {
        conn.execute(&format!(
            "UPDATE release_tasks_task_runs SET inputs_manifest = NULL \
             WHERE lock_key = {} AND task = {} AND `release` <> {} AND inputs_manifest IS NOT NULL",
            quote(name),
            quote(&record.task),
            quote(release)
        ))
        .await?;
    }
    Ok(())
}

/// Per task of `tasks`, what its last successful run (under this key) recorded of its files.
pub(super) async fn last_successes(
    conn: &mut Conn,
    name: &str,
    tasks: &[String],
) -> Result<Vec<(String, LastSuccess)>, WireError> {
    if tasks.is_empty() {
        return Ok(Vec::new());
    }
    let list: Vec<String> = tasks.iter().map(|t| quote(t)).collect();
    let rows = match conn
        .query(&format!(
            "SELECT task, `release`, inputs_hash, inputs_manifest FROM release_tasks_task_runs \
             WHERE lock_key = {} AND task IN ({}) AND outcome = 'succeeded' AND inputs_hash IS NOT NULL \
             ORDER BY task, recorded_at DESC",
            quote(name),
            list.join(", ")
        ))
        .await
    {
        Ok(rows) => rows,
        Err(err) if is_missing_table(&err) => return Ok(Vec::new()),
        Err(err) => return Err(err),
    };
    let mut found: Vec<(String, LastSuccess)> = Vec::new();
    for mut row in rows {
        row.resize(4, None);
        let task = row[0].take().unwrap_or_default();
        if found.last().is_some_and(|(t, _)| *t == task) {
            continue;
        }
        found.push((
            task,
            LastSuccess {
                release: row[1].take().unwrap_or_default(),
                hash: row[2].take().unwrap_or_default(),
                manifest: row[3].take(),
            },
        ));
    }
    Ok(found)
}

/// Deletes the task records of all but the last [`KEEP_RELEASES`] releases of this key, keeping each
/// task's last successful run with a file hash (which a `changed` gate compares with).
pub(super) async fn prune(conn: &mut Conn, name: &str) -> Result<(), WireError> {
    let old = conn
        .query(&format!(
            "SELECT `release` FROM release_tasks_runs WHERE lock_key = {} ORDER BY started_at DESC \
             LIMIT 18446744073709551615 OFFSET {KEEP_RELEASES}",
            quote(name)
        ))
        .await?;
    let old: Vec<String> = old
        .into_iter()
        .filter_map(|r| r.into_iter().next().flatten())
        .map(|r| quote(&r))
        .collect();
    if old.is_empty() {
        return Ok(());
    }
    let keep = conn
        .query(&format!(
            "SELECT task, `release` FROM release_tasks_task_runs WHERE lock_key = {} \
             AND outcome = 'succeeded' AND inputs_hash IS NOT NULL ORDER BY task, recorded_at DESC",
            quote(name)
        ))
        .await?;
    let mut kept: Vec<String> = Vec::new();
    let mut last_task: Option<String> = None;
    for mut row in keep {
        row.resize(2, None);
        let task = row[0].take().unwrap_or_default();
        if last_task.as_deref() == Some(task.as_str()) {
            continue;
        }
        kept.push(format!(
            "({}, {})",
            quote(&row[1].take().unwrap_or_default()),
            quote(&task)
        ));
        last_task = Some(task);
    }
    let except = if kept.is_empty() {
        String::new()
    } else {
        format!(" AND (`release`, task) NOT IN ({})", kept.join(", "))
    };
    conn.execute(&format!(
        "DELETE FROM release_tasks_task_runs WHERE lock_key = {} AND `release` IN ({}){except}",
        quote(name),
        old.join(", ")
    ))
    .await
    .map(drop)
}

const RELEASE_COLUMNS: &str = "`release`, version, `commit`, status, holder, \
    DATE_FORMAT(started_at, '%Y-%m-%dT%H:%i:%sZ'), \
    TIMESTAMPDIFF(MICROSECOND, started_at, finished_at) / 1000000, exit_code";

fn release_entry(mut row: Vec<Option<String>>) -> ReleaseEntry {
    row.resize(8, None);
    let mut take = |i: usize| row.get_mut(i).and_then(Option::take);
    ReleaseEntry {
        release: take(0).unwrap_or_default(),
        version: take(1),
        commit: take(2),
        status: take(3).unwrap_or_default(),
        holder: take(4).unwrap_or_default(),
        started_at: take(5).unwrap_or_default(),
        duration_s: take(6).and_then(|d| d.parse().ok()),
        exit_code: take(7).and_then(|c| c.parse().ok()),
    }
}

fn entries(result: Result<Rows, WireError>) -> Result<Vec<ReleaseEntry>, WireError> {
    match result {
        Ok(rows) => Ok(rows.into_iter().map(release_entry).collect()),
        Err(err) if is_missing_table(&err) => Ok(Vec::new()),
        Err(err) => Err(err),
    }
}

/// The release row that `wanted` names (its release id, version or commit), newest first.
pub(super) async fn release(
    conn: &mut Conn,
    name: &str,
    wanted: &str,
) -> Result<Option<ReleaseEntry>, WireError> {
    let wanted = quote(wanted);
    let rows = conn
        .query(&format!(
            "SELECT {RELEASE_COLUMNS} FROM release_tasks_runs \
             WHERE lock_key = {} AND (`release` = {wanted} OR version = {wanted} OR `commit` = {wanted}) \
             ORDER BY (`release` = {wanted}) DESC, started_at DESC LIMIT 1",
            quote(name)
        ))
        .await;
    Ok(entries(rows)?.into_iter().next())
}

/// The last `limit` releases of this key, newest first.
pub(super) async fn releases(
    conn: &mut Conn,
    name: &str,
    limit: u32,
) -> Result<Vec<ReleaseEntry>, WireError> {
    let rows = conn
        .query(&format!(
            "SELECT {RELEASE_COLUMNS} FROM release_tasks_runs WHERE lock_key = {} \
             ORDER BY started_at DESC LIMIT {limit}",
            quote(name)
        ))
        .await;
    entries(rows)
}

/// The task records of one release, in the release's order.
pub(super) async fn tasks(
    conn: &mut Conn,
    name: &str,
    release: &str,
) -> Result<Vec<TaskEntry>, WireError> {
    let rows = match conn
        .query(&format!(
            "SELECT task, position, outcome, exit_code, DATE_FORMAT(started_at, '%Y-%m-%dT%H:%i:%sZ'), \
               duration_ms, attempts, detail, output_tail, inputs_hash \
             FROM release_tasks_task_runs WHERE lock_key = {} AND `release` = {} ORDER BY position, task",
            quote(name),
            quote(release)
        ))
        .await
    {
        Ok(rows) => rows,
        Err(err) if is_missing_table(&err) => return Ok(Vec::new()),
        Err(err) => return Err(err),
    };
    Ok(rows
        .into_iter()
        .map(|mut row| {
            row.resize(10, None);
            let mut take = |i: usize| row.get_mut(i).and_then(Option::take);
            TaskEntry {
                task: take(0).unwrap_or_default(),
                position: take(1).and_then(|p| p.parse().ok()).unwrap_or(0),
                outcome: take(2).unwrap_or_default(),
                exit_code: take(3).and_then(|c| c.parse().ok()),
                started_at: take(4),
                duration_ms: take(5).and_then(|d| d.parse().ok()),
                attempts: take(6).and_then(|a| a.parse().ok()).unwrap_or(0),
                detail: take(7).unwrap_or_default(),
                output_tail: take(8)
                    .map(|t| t.lines().map(str::to_owned).collect())
                    .unwrap_or_default(),
                inputs_hash: take(9),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc_datetime_literals() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_micros(1_765_112_400_123_456);
        assert_eq!(datetime(t), quote("2025-12-07 13:00:00.123456"));
    }
}
