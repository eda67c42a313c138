//! Where users are: `.env` files for local runs (`--env-file`), `exec` for container entrypoints.

use crate::harness::Test;

const GATED: &str =
    "[tasks.migrate]\nrun = [\"printenv\", \"FROM_FILE\"]\nwhen = \"RUN_MIGRATIONS\"\n";

#[test]
fn an_env_file_feeds_gates_and_tasks() {
    Test::new()
        .config(GATED)
        .file(
            ".env.local",
            "# local settings\nRUN_MIGRATIONS=true\nFROM_FILE=\"hello from .env\"\n",
        )
        .args(&["--env-file", ".env.local"])
        .run()
        .status(0)
        .stdout_has("migrate | hello from .env\n");
}

#[test]
fn no_env_file_is_read_unless_named() {
    Test::new()
        .config(GATED)
        .file(".env", "RUN_MIGRATIONS=true\n")
        .run()
        .status(0)
        .stdout_lacks("migrate |")
        .stderr_has("RUN_MIGRATIONS is unset");
}

#[test]
fn the_environment_wins_over_files_and_the_first_file_over_later_ones() {
    Test::new()
        .config(GATED)
        .file("a.env", "FROM_FILE=from-a\n")
        .file("b.env", "FROM_FILE=from-b\nRUN_MIGRATIONS=true\n")
        .args(&["--env-file", "a.env", "--env-file", "b.env"])
        .run()
        .status(0)
        .stdout_has("migrate | from-a\n");
    Test::new()
        .config(GATED)
        .file("a.env", "FROM_FILE=from-a\nRUN_MIGRATIONS=true\n")
        .env("FROM_FILE", "from-the-environment")
        .args(&["--env-file", "a.env"])
        .run()
        .status(0)
        .stdout_has("migrate | from-the-environment\n");
    // An empty variable in the environment is still set: the file does not replace it.
    Test::new()
        .config(GATED)
        .file("a.env", "RUN_MIGRATIONS=true\n")
        .env("RUN_MIGRATIONS", "false")
        .args(&["--env-file", "a.env"])
        .run()
        .status(0)
        .stdout_lacks("migrate |");
}

#[test]
fn the_variable_names_one_file() {
    Test::new()
        .config(GATED)
        .file("dev.env", "RUN_MIGRATIONS=yes\nFROM_FILE=via-variable\n")
        .env("RELEASE_TASKS_ENV_FILE", "dev.env")
        .run()
        .status(0)
        .stdout_has("migrate | via-variable\n");
}

#[test]
fn a_missing_file_is_a_usage_error_and_a_bad_one_a_config_error() {
    Test::new()
        .config(GATED)
        .args(&["--env-file", "nope.env"])
        .run()
        .status(2)
        .stderr_has("nope.env");
    Test::new()
        .config(GATED)
        .file(".env", "A=1\n\nB='never closed\nC=3\n")
        .args(&["check", "--env-file", ".env"])
        .run()
        .status(78)
        .stderr_has(".env:3:1");
}

#[test]
fn plan_says_where_a_gate_value_came_from_and_hides_secrets() {
    let out = Test::new()
        .config(
            "[tasks.migrate]\nrun = \"true\"\nwhen = \"RUN_MIGRATIONS_DURING_RELEASE\"\n\
             [tasks.seed]\nrun = \"true\"\nwhen = { env = \"API_TOKEN\", equals = \"x\" }\n",
        )
        .file(
            ".env",
            "RUN_MIGRATIONS_DURING_RELEASE=true\nAPI_TOKEN=s3cr3t-token-value\n",
        )
        .args(&["plan", "--env-file", ".env"])
        .run();
    out.status(0)
        .stdout_has("RUN_MIGRATIONS_DURING_RELEASE=\"true\" (from .env)")
        .stdout_has("API_TOKEN=\"[redacted]\" (from .env)")
        .stdout_lacks("s3cr3t");
}
