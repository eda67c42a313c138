//! Writes release-tasks's man page (roff, from the clap definitions) to stdout: `cargo run --example
//! man > release-tasks.1`. `scripts/dist` puts it in the release tarballs. It is an example, not a
//! subcommand, so that `clap_mangen` stays a dev-dependency and out of the shipped binary.

use std::io::Write;

fn main() -> std::io::Result<()> {
    let cli = <release_tasks::cli::Cli as clap::CommandFactory>::command();
    let mut page = Vec::new();
    clap_mangen::Man::new(cli).render(&mut page)?;
    let mut out = std::io::stdout().lock();
    out.write_all(&page)?;
    out.flush()
}
