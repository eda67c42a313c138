//! The check that a held `[lock]` is still held, asked by the run loop immediately before each task
//! starts (command or notify).
//!
//! A lock held through a database connection can be lost without the holder doing anything: the
//! server restarts or fails over, an idle-connection reaper or `pg_terminate_backend` ends the
//! backend, the network is cut. The database then releases the lock, and another replica may take it
//! and run the release. So a holder must prove, at the moment it is about to act, that it still
//! holds the lock (the "fencing" rule of etcd leases and Consul sessions), and act on nothing it
//! cannot prove. This module is only the seam between the run loop and the lock: each lock
//! (PostgreSQL in `lock/`, others beside it) implements [`LockCheck`] with one round trip on the
//! connection that holds it; the run loop decides what a lost lock means for the tasks.
//!
//! It is compiled with or without a database feature, so that the run loop has one shape.

use std::cell::RefCell;
use std::fmt;
use std::future::Future;
use std::pin::Pin;

/// The future a [`LockCheck`] returns: not `Send`, because the run loop is single-threaded.
pub type CheckFuture<'a> = Pin<Box<dyn Future<Output = Result<(), LockLost>> + 'a>>;

/// A held lock that can prove it is still held.
pub trait LockCheck {
    /// One round trip on the lock's own connection (and transaction) that proves the lock is still
    /// held, bounded in time. An error, a closed connection or no answer in time means the lock is
    /// gone; once a check has failed, every later one fails at once with the same reason.
    fn check(&self) -> CheckFuture<'_>;
}

/// The lock is gone: why, already free of secrets, fit to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockLost {
    /// The lock's name (its key).
    pub lock: String,
    /// What showed the loss: the driver's error, a closed connection, no answer in time.
    pub reason: String,
}

impl fmt::Display for LockLost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "lost the release lock `{}`: {}", self.lock, self.reason)
    }
}

/// One check of a lock whose first loss is remembered in `lost`: once a check has failed, every
/// later one fails at once with the same reason, without a round trip. `probe` is the backend's
/// round trip on the lock's connection.
pub async fn remembered(
    name: &str,
    lost: &RefCell<Option<String>>,
    probe: impl Future<Output = Result<(), String>>,
) -> Result<(), LockLost> {
    let known = lost.borrow().clone();
    let result = match known {
        Some(reason) => Err(reason),
        None => probe.await,
    };
    result.map_err(|reason| {
        lost.replace(Some(reason.clone()));
        LockLost {
            lock: name.to_owned(),
            reason,
        }
    })
}
