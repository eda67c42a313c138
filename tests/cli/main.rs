//! Integration tests: the real `release-tasks` binary, real processes, temp dirs. One test binary,
//! so the crate is linked once.

mod adoption;
mod core;
mod exact;
mod faults;
mod formats;
mod harness;
mod hostile;
mod init;
#[cfg(feature = "postgres")]
mod ledger;
#[cfg(feature = "postgres")]
mod lock;
#[cfg(feature = "postgres")]
mod lock_ledger;
#[cfg(feature = "postgres")]
mod lock_loss;
#[cfg(feature = "mysql")]
mod lock_mysql;
#[cfg(feature = "postgres")]
mod lock_servers;
#[cfg(feature = "postgres")]
mod lock_sockets;
mod notify;
mod platform;
#[cfg(feature = "postgres")]
mod proxy;
mod retries;
mod shell;
mod spawn;
mod webhook;
