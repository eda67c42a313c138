//! Integration tests: the real `release-tasks` binary, real processes, temp dirs. One test binary,
//! so the crate is linked once.

mod core;
mod faults;
mod harness;
mod init;
#[cfg(feature = "postgres")]
mod lock;
mod notify;
mod platform;
mod shell;
mod webhook;
