//! The `release-tasks` binary: parse the command line, start logging, run, and exit with the status
//! the library derived.

use clap::Parser;

use release_tasks::cli::{Cli, Settings};
use release_tasks::error::Error;
use release_tasks::log::LogFormat;

fn main() {
    // Before anything else (and before any thread exists, since a signal mask is per thread): a
    // parent that blocked or ignored SIGTERM or SIGCHLD must not leave release-tasks deaf or hung.
    release_tasks::signals::reset_inherited();
    // A panic is a bug; it must not leave a task running (the release profile aborts on panic, so no
    // destructor would kill the task's processes): SIGKILL to every running task's process group and
    // what escaped it (first, so that a stalled stderr cannot hold it up), then the message, then exit
    // 70 (EX_SOFTWARE), never 101 or an abort's 134.
    let report_panic = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        release_tasks::process::kill_every_task();
        report_panic(info);
        std::process::exit(70);
    }));
    let cli = Cli::parse();
    let env = release_tasks::env_snapshot();
    let settings = match Settings::resolve(cli, &env) {
        Ok(settings) => settings,
        Err(err) => {
            release_tasks::tell(&format!("release-tasks: error: {err}\n"));
            std::process::exit(err.exit_code());
        }
    };
    release_tasks::log::init(settings.log_format, env.contains_key("NO_COLOR"));
    let result = release_tasks::execute(&settings, &env);
    // Log lines may still be on their way to a slow reader: let them out first (an error message must
    // come after them), waiting a little, never forever.
    release_tasks::log::flush(std::time::Duration::from_secs(5));
    let code = match result {
        Ok(code) => code,
        Err(err) => {
            report_error(&err, settings.log_format);
            err.exit_code()
        }
    };
    release_tasks::log::flush(std::time::Duration::from_secs(5));
    std::process::exit(code);
}

/// Errors go to stderr: as plain text a person reads, or as one JSON event for a log pipeline. A
/// stderr that cannot be written loses the message, never the exit status.
fn report_error(err: &Error, format: LogFormat) {
    match format {
        LogFormat::Text => release_tasks::tell(&format!("release-tasks: error: {err}\n")),
        LogFormat::Json => {
            tracing::error!(error = %err, exit_code = err.exit_code(), "release-tasks stopped");
        }
    }
}
