//! Integration tests: the real `release-tasks` binary, real processes, temp dirs. One test binary,
//! so the crate is linked once.

mod adoption;
mod core;
mod differential;
mod faults;
mod formats;
mod harness;
mod hostile;
mod init;
mod limits;
#[cfg(feature = "postgres")]
mod lock;
#[cfg(feature = "postgres")]
mod lock_servers;
mod notify;
mod platform;
mod secrets;
mod shell;
mod spawn;
mod webhook;
