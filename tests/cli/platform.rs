//! Where release-tasks is installed and run: shell completions, and the warning on Fly when Fly's
//! release command timeout would cut the release short.

use crate::harness::Test;

const HELLO: &str = "[tasks.hello]\nrun = \"echo hi\"\n";
const FLY_WARNING: &str = "longer than Fly's limit on a release command";

#[test]
fn completions_are_printed_for_each_shell() {
    let t = Test::new();
    for (shell, marker) in [
        ("bash", "complete -F _release__tasks"),
        ("zsh", "#compdef release-tasks"),
        ("fish", "complete -c release-tasks"),
    ] {
        let out = t.run_with(&["completions", shell]);
        out.status(0).stdout_has(marker).stdout_has("plan");
        assert!(out.stderr.is_empty(), "{shell}: {}", out.stderr);
    }
    t.run_with(&["completions", "tcsh"])
        .status(2)
        .stderr_has("invalid value 'tcsh'");
}

#[test]
fn fly_release_command_warns_when_its_timeout_is_shorter_than_the_release_timeout() {
    let fly = |config: &str| {
        Test::new()
            .config(config)
            .env("FLY_APP_NAME", "shop")
            .env("RELEASE_COMMAND", "1")
    };
    fly(HELLO)
        .run()
        .status(0)
        .stdout_has("hello | hi")
        .stderr_has(FLY_WARNING)
        .stderr_has("release_timeout=55m");
    fly(&format!("[defaults]\nrelease_timeout = \"4m\"\n{HELLO}"))
        .run()
        .status(0)
        .stderr_lacks(FLY_WARNING);
    // The app's own Machines (no release command marker) and other platforms are not warned.
    Test::new()
        .config(HELLO)
        .env("FLY_APP_NAME", "shop")
        .run()
        .status(0)
        .stderr_lacks(FLY_WARNING);
    Test::new()
        .config(HELLO)
        .env("RELEASE_COMMAND", "1")
        .run()
        .status(0)
        .stderr_lacks(FLY_WARNING);
}
