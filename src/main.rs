//! The `release-tasks` binary: parse the command line, start logging, run, and exit with the status
//! the library derived.

use std::io::IsTerminal;

use clap::Parser;

use release_tasks::cli::{Cli, Settings};
use release_tasks::error::Error;
use release_tasks::log::LogFormat;

/// dlmalloc, not the C library's allocator: musl's maps and unmaps memory for most allocations (see
/// Cargo.toml).
#[global_allocator]
static ALLOC: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

fn main() {
    // Before anything else (and before any thread exists, since a signal mask is per thread): a
    // parent that blocked or ignored SIGTERM or SIGCHLD must not leave release-tasks deaf or hung.
    release_tasks::signals::reset_inherited();
    // A panic is a bug; it must not leave a task running (the release profile aborts on panic, so no
    // destructor would kill the task's processes): SIGKILL to every running task's process group and
    // what escaped it (first, so that a stalled stderr cannot hold it up), then the message, then exit
    // 70 (EX_SOFTWARE), never 101 or an abort's 134.
    std::panic::set_hook(Box::new(|info| {
        release_tasks::process::kill_every_task();
        // The message may quote a value (`std::env::set_var` quotes the one it refused): it is
        // masked as every other line is, so it is written here rather than by the default hook.
        let thread = std::thread::current();
        let backtrace = std::backtrace::Backtrace::capture();
        let backtrace = match backtrace.status() {
            std::backtrace::BacktraceStatus::Captured => format!("{backtrace}\n"),
            _ => "note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n"
                .to_owned(),
        };
        let message = format!(
            "thread '{}' {info}\n{backtrace}",
            thread.name().unwrap_or("<unnamed>")
        );
        let message = release_tasks::secrets::mask(&message);
        // Straight to the descriptor, as the default hook writes, without waiting for the lock a
        // writer of stderr may hold; a stderr that cannot be written loses the message, never the
        // status.
        let mut rest = message.as_bytes();
        while let Ok(written @ 1..) = nix::unistd::write(std::io::stderr(), rest) {
            rest = &rest[written.min(rest.len())..];
        }
        std::process::exit(70);
    }));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            // --help and --version print to stdout and exit 0; a stdout that cannot take them is
            // exit 74, as for any other command's output. Usage errors are 2 whether or not stderr
            // could be written.
            let printed = err.print();
            if !err.use_stderr() && printed.is_err() {
                std::process::exit(release_tasks::error::EXIT_IOERR);
            }
            std::process::exit(err.exit_code());
        }
    };
    // The one handle on stdout and stderr, passed down to everything that writes to them.
    let stdio = release_tasks::output::Stdio::new();
    let mut env = release_tasks::env_snapshot();
    // The environment's secrets are hidden from the first line written (the `--env-file` ones join
    // them once the files are read).
    release_tasks::secrets::install(release_tasks::secrets::Secrets::from_env(&env));
    // Lossily, so that a NO_COLOR that is not UTF-8 still counts as set.
    let colour =
        release_tasks::log::colour(|name| env.get_lossy(name), std::io::stderr().is_terminal());
    let asked_for_json = cli.log_format == Some(LogFormat::Json)
        || (cli.log_format.is_none()
            && env
                .get("RELEASE_TASKS_LOG_FORMAT")
                .is_some_and(|v| v.eq_ignore_ascii_case("json")));
    let settings = match Settings::resolve(cli, &env)
        .and_then(|settings| release_tasks::load_env_files(&settings, &mut env).map(|()| settings))
    {
        Ok(settings) => settings,
        Err(err) => {
            // Another setting is wrong, but a pipeline that asked for JSON still gets JSON.
            let format = if asked_for_json {
                LogFormat::Json
            } else {
                LogFormat::Text
            };
            release_tasks::log::init(format, colour, &stdio);
            stdio.ending();
            report_error(&stdio, &err, format);
            std::process::exit(err.exit_code());
        }
    };
    release_tasks::log::init(settings.log_format, colour, &stdio);
    stdio.set_output_format(settings.output_format);
    let result = release_tasks::execute(&settings, &env, &stdio);
    // Log lines may still be on their way to a slow reader: let them out first (an error message must
    // come after them), waiting a little, never forever: a stalled stderr costs one wait at the end,
    // shared by these flushes and the error message.
    stdio.ending();
    stdio.flush();
    let code = match result {
        Ok(code) => code,
        Err(err) => {
            report_error(&stdio, &err, settings.log_format);
            err.exit_code()
        }
    };
    stdio.flush();
    std::process::exit(code);
}

/// Errors go to stderr: as plain text a person reads, or as one JSON event for a log pipeline. A
/// stderr that cannot be written loses the message, never the exit status.
fn report_error(stdio: &release_tasks::output::Stdio, err: &Error, format: LogFormat) {
    match format {
        LogFormat::Text => stdio.tell(&format!("release-tasks: error: {err}\n")),
        LogFormat::Json => {
            tracing::error!(error = %err, exit_code = err.exit_code(), "release-tasks stopped");
        }
    }
}
