//! The release ledger on MySQL: the table `release_tasks_runs`, with the columns and meanings of the
//! PostgreSQL one (`../ledger.rs`), and the queries `wait` and `history` read it with.
//!
//! DDL is not transactional in MySQL (each statement commits), so the ledger does not rely on it:
//! - The table is made by one `CREATE TABLE IF NOT EXISTS`, which MySQL serialises under its metadata
//!   lock: when many replicas (or apps) start at once, one creates it and the others find it (a note,
//!   not an error). Nothing else is done in that statement, so there is nothing to roll back.
//! - Every write is one statement that commits by itself, made by the replica that holds the lock:
//!   "running" when the release starts (an earlier failed or abandoned run of the same release is
//!   replaced in the same statement), the outcome just before `RELEASE_LOCK`. A replica that dies
//!   between tasks leaves a "running" row and its lock dies with its connection; the next replica
//!   takes the lock, finds no "succeeded" row, and replaces the row with its own run.
//! - Times come from the server's clock at the moment of each write (`UTC_TIMESTAMP(6)`, evaluated
//!   per statement, outside any transaction), so durations are the release's real length.

use super::wire::{Conn, WireError, quote};
use crate::lock::PreviousRun;
use crate::lock::ledger::Status;
use crate::metadata::Metadata;

/// Creates the ledger's tables if they are missing (the releases, and the tasks' records).
pub(in crate::lock) async fn ensure_table(conn: &mut Conn) -> Result<(), WireError> {
    conn.execute(super::records::CREATE_TABLE).await?;
    conn.execute(
        "CREATE TABLE IF NOT EXISTS release_tasks_runs (\
           lock_key VARCHAR(255) NOT NULL, \
           `release` VARCHAR(255) NOT NULL, \
           status VARCHAR(16) NOT NULL, \
           holder VARCHAR(255) NOT NULL, \
           started_at DATETIME(6) NOT NULL, \
           finished_at DATETIME(6) NULL, \
           exit_code INT NULL, \
           version VARCHAR(255) NULL, \
           `commit` VARCHAR(255) NULL, \
           PRIMARY KEY (lock_key, `release`)\
         ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin",
    )
    .await
    .map(drop)
}

/// Whether an error is "no such table" (1146): the ledger is empty.
fn is_missing_table(err: &WireError) -> bool {
    matches!(err, WireError::Server { code: 1146, .. })
}

pub(in crate::lock) async fn status_of(
    conn: &mut Conn,
    name: &str,
    release: &str,
) -> Result<Option<Status>, WireError> {
    let rows = match conn
        .query(&format!(
            "SELECT status, holder, DATE_FORMAT(finished_at, '%Y-%m-%dT%H:%i:%sZ') \
             FROM release_tasks_runs WHERE lock_key = {} AND `release` = {}",
            quote(name),
            quote(release)
        ))
        .await
    {
        Ok(rows) => rows,
        Err(err) if is_missing_table(&err) => return Ok(None),
        Err(err) => return Err(err),
    };
    Ok(rows.into_iter().next().map(|mut r| {
        r.resize(3, None);
        Status {
            state: r[0].take().unwrap_or_default(),
            holder: r[1].take().unwrap_or_default(),
            finished_at: r[2].take(),
        }
    }))
}

/// The completed run of `release`, if there is one.
pub(in crate::lock) async fn completed(
    conn: &mut Conn,
    name: &str,
    release: &str,
) -> Result<Option<PreviousRun>, WireError> {
    Ok(status_of(conn, name, release)
        .await?
        .filter(|s| s.state == "succeeded")
        .map(|s| PreviousRun {
            holder: s.holder,
            finished_at: s.finished_at.unwrap_or_default(),
        }))
}

fn or_null(value: Option<&String>) -> String {
    value.map_or_else(|| "NULL".to_owned(), |v| quote(v))
}

/// Records `release` as running by `holder`, replacing an earlier run of it.
pub(in crate::lock) async fn begin(
    conn: &mut Conn,
    name: &str,
    release: &str,
    holder: &str,
    meta: &Metadata,
) -> Result<(), WireError> {
    let (version, commit) = (
        or_null(meta.version.as_ref()),
        or_null(meta.commit.as_ref()),
    );
    conn.query(&format!(
        "INSERT INTO release_tasks_runs (lock_key, `release`, status, holder, started_at, version, `commit`) \
         VALUES ({}, {}, 'running', {}, UTC_TIMESTAMP(6), {version}, {commit}) \
         ON DUPLICATE KEY UPDATE status = 'running', holder = VALUES(holder), started_at = UTC_TIMESTAMP(6), \
           finished_at = NULL, exit_code = NULL, version = VALUES(version), `commit` = VALUES(`commit`)",
        quote(name),
        quote(release),
        quote(holder),
    ))
    .await
    .map(drop)
}

/// Records how `release` ended, only if this session still holds `lock` (checked in the same
/// statement, so no other replica can have taken the lock between the check and the write): `false`
/// when it no longer does and nothing was written.
pub(in crate::lock) async fn finish(
    conn: &mut Conn,
    name: &str,
    release: &str,
    lock: &str,
    status: &str,
    exit_code: i32,
) -> Result<bool, WireError> {
    let changed = conn
        .execute(&format!(
            "UPDATE release_tasks_runs SET status = {}, finished_at = UTC_TIMESTAMP(6), exit_code = {exit_code} \
             WHERE lock_key = {} AND `release` = {} AND IS_USED_LOCK({}) = CONNECTION_ID()",
            quote(status),
            quote(name),
            quote(release),
            quote(lock)
        ))
        .await?;
    Ok(changed > 0)
}
