//! Integration tests: the real `release-tasks` binary, real processes, temp dirs. One test binary,
//! so the crate is linked once.

mod adoption;
mod core;
mod differential;
mod exact;
mod faults;
mod formats;
mod harness;
mod hostile;
mod init;
#[cfg(feature = "postgres")]
mod ledger;
mod limits;
#[cfg(feature = "postgres")]
mod lock;
#[cfg(feature = "postgres")]
mod lock_hostile;
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
mod output_hostile;
mod platform;
#[cfg(feature = "postgres")]
mod proxy;
mod retries;
mod secrets;
mod shell;
mod spawn;
mod webhook;
