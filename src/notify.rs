//! The built-in notify task: the release report `POSTed` to a webhook (JSON, or Slack's `text`), with
//! retries on connection errors and 5xx answers. A delivery runs on a thread the task's `TaskRun`
//! owns and can be cancelled through [`Cancel`] at any point, so a stop signal or the task's deadline
//! ends it within the grace and nothing is sent after its task has ended.
//!
//! The URL and header values are credentials (a Slack hook URL is one), so nothing here logs them:
//! messages show the URL through `redact::url` and scrub the HTTP client's errors.

use std::fmt::Write as _;
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Duration;

use crate::config::{Notify, NotifyFormat};
use crate::gate::Env;
use crate::redact;
use crate::report::Report;

/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(8);
/// The first wait between attempts; it doubles after each.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);

/// A notify task with its `${VAR}`s expanded: ready to send.
#[derive(Clone)]
pub struct Webhook {
    url: String,
    headers: Vec<(String, String)>,
    pub format: NotifyFormat,
    pub timeout: Duration,
    pub retries: u32,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL or the header values, even in a debug print.
        f.debug_struct("Webhook")
            .field("url", &self.shown_url())
            .field(
                "headers",
                &self.headers.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Webhook {
    /// Expands the notify task's URL and headers from `env`. The error names what is missing.
    pub fn resolve(notify: &Notify, env: &Env) -> Result<Webhook, String> {
        let unset = |var: String, place: &str| {
            format!("{place} uses ${{{var}}}, which is not set; set it in the app's config vars")
        };
        let url = notify.url.expand(env).map_err(|v| unset(v, "notify url"))?;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!(
                "notify url {} does not start with http:// or https://",
                redact::url(&url)
            ));
        }
        let mut headers = Vec::with_capacity(notify.headers.len());
        for (name, value) in &notify.headers {
            let value = value
                .expand(env)
                .map_err(|v| unset(v, &format!("notify header {name}")))?;
            headers.push((name.clone(), value));
        }
        Ok(Webhook {
            url,
            headers,
            format: notify.format,
            timeout: notify.timeout,
            retries: notify.retries,
        })
    }

    /// The URL as it may be shown: scheme and host only.
    #[must_use]
    pub fn shown_url(&self) -> String {
        redact::url(&self.url)
    }

    /// The request body for `report`.
    #[must_use]
    pub fn body(&self, report: &Report) -> Vec<u8> {
        match self.format {
            NotifyFormat::Json => report.to_json().to_string().into_bytes(),
            NotifyFormat::Slack => serde_json::json!({ "text": slack_text(report) })
                .to_string()
                .into_bytes(),
        }
    }

    /// POSTs `body`, retrying connection errors and 5xx answers with backoff. Blocking: call it off
    /// the run loop's thread. Returns the final HTTP status, or why it was not delivered.
    ///
    /// `cancel` ends it from another thread: no attempt starts after that, a backoff wait ends at
    /// once, and a request in flight has its connection shut down. A connect in progress cannot be
    /// interrupted, so it is bounded by `connect_bound` (the task's grace), after which it fails too.
    pub fn deliver(
        &self,
        task: &str,
        body: &[u8],
        cancel: &Cancel,
        connect_bound: Duration,
    ) -> Result<u16, String> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(self.timeout))
            .timeout_connect(Some(self.timeout.min(connect_bound)))
            .http_status_as_error(false)
            .max_redirects(0)
            .user_agent(concat!("release-tasks/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        if !cancel.register(&agent) {
            return Err(CANCELLED.into());
        }
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut request = agent
                .post(&self.url)
                .header("Content-Type", "application/json");
            for (name, value) in &self.headers {
                request = request.header(name.as_str(), value.as_str());
            }
            let (retryable, why) = match request.send(body) {
                Ok(response) => {
                    let status = response.status().as_u16();
                    if (200..300).contains(&status) {
                        return Ok(status);
                    }
                    (status >= 500, format!("the webhook answered HTTP {status}"))
                }
                Err(err) => (
                    true,
                    format!("cannot reach the webhook: {}", self.scrub(&err.to_string())),
                ),
            };
            if cancel.is_cancelled() {
                return Err(CANCELLED.into());
            }
            if !retryable || attempt > self.retries {
                let tries = if attempt == 1 {
                    String::new()
                } else {
                    format!(" after {attempt} attempts")
                };
                return Err(format!("{why}{tries} ({})", self.shown_url()));
            }
            tracing::warn!(
                task, attempt, url = %self.shown_url(), error = %why,
                retry_in_ms = backoff.as_millis() as u64,
                "webhook not reached; retrying"
            );
            if cancel.sleep(backoff) {
                return Err(CANCELLED.into());
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// `text` with the URL and header values hidden (the HTTP client's errors may quote them).
    fn scrub(&self, text: &str) -> String {
        let mut secrets: Vec<String> = self.headers.iter().map(|(_, v)| v.clone()).collect();
        secrets.push(self.url.clone());
        redact::urls_in(&redact::scrub(text, &secrets))
    }
}

/// Why a cancelled delivery ended (the run loop reports the stop or the timeout that caused it).
const CANCELLED: &str = "the delivery was cancelled";

/// Ends a delivery running on another thread: set once, seen by every later check, and it wakes
/// the backoff wait and shuts down the connection of a request in flight.
#[derive(Default)]
pub struct Cancel {
    state: Mutex<CancelState>,
    wake: Condvar,
}

#[derive(Default)]
struct CancelState {
    cancelled: bool,
    /// The delivery's HTTP client, whose shutdown closes its connections.
    agent: Option<ureq::Agent>,
}

impl Cancel {
    fn state(&self) -> std::sync::MutexGuard<'_, CancelState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Cancels the delivery; later calls do nothing more.
    pub fn cancel(&self) {
        let agent = {
            let mut state = self.state();
            state.cancelled = true;
            state.agent.take()
        };
        self.wake.notify_all();
        if let Some(agent) = agent {
            agent.shutdown();
        }
    }

    #[must_use]
    pub fn is_cancelled(&self) -> bool {
        self.state().cancelled
    }

    /// Hands over the client to shut down on cancel; false if already cancelled.
    fn register(&self, agent: &ureq::Agent) -> bool {
        let mut state = self.state();
        if !state.cancelled {
            state.agent = Some(agent.clone());
        }
        !state.cancelled
    }

    /// Waits `duration` unless cancelled first; returns whether it was cancelled.
    fn sleep(&self, duration: Duration) -> bool {
        let state = self.state();
        let (state, _) = self
            .wake
            .wait_timeout_while(state, duration, |s| !s.cancelled)
            .unwrap_or_else(PoisonError::into_inner);
        state.cancelled
    }
}

/// A readable summary for chat: the release, its status, and each task's outcome. Everything taken
/// from the config, the environment or a task is escaped the way Slack asks (`&`, `<`, `>`), so an
/// app name or a message holding `<!channel>` is shown, not acted on.
fn slack_text(report: &Report) -> String {
    let title = slack_escape(&report.meta.title());
    let seconds = report.duration.as_secs_f64();
    let mut text = if report.succeeded() {
        format!(":white_check_mark: {title} released in {seconds:.1}s")
    } else {
        let stopped = match &report.lock_lost {
            Some(lost) => format!(
                "the release lock was lost{}; another replica may run the release again",
                lost.last_task
                    .as_ref()
                    .map_or_else(String::new, |t| format!(
                        " after `{}` started",
                        slack_escape(t)
                    ))
            ),
            None => "the release was stopped".to_owned(),
        };
        let failed = report.failed_task().map_or_else(
            || stopped,
            |t| {
                format!(
                    "task `{}` {}",
                    slack_escape(&t.name),
                    slack_escape(&t.outcome.to_string())
                )
            },
        );
        format!(
            ":x: {title} failed after {seconds:.1}s: {failed} (exit status {})",
            report.exit_code()
        )
    };
    for t in &report.tasks {
        let _ = write!(
            text,
            "\n• {}: {} ({:.1}s)",
            slack_escape(&t.name),
            slack_escape(&t.outcome.to_string()),
            t.duration.as_secs_f64()
        );
    }
    // Where the failure is explained: the failed task's last lines, in a code block (a line of
    // backticks inside would end the block early, so they are shown as look-alikes).
    if let Some(failed) = report.failed_task().filter(|t| !t.output_tail.is_empty()) {
        let lines = failed
            .output_tail
            .join("\n")
            .replace("```", "`\u{200b}`\u{200b}`");
        let _ = write!(
            text,
            "\nLast lines of `{}`:\n```\n{}\n```",
            slack_escape(&failed.name),
            slack_escape(&lines)
        );
    }
    text
}

/// Slack's escaping for message text: `&`, `<` and `>` as entities, and nothing else.
fn slack_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod slack_tests {
    use super::*;
    use crate::metadata::Metadata;
    use crate::report::{Outcome, TaskReport};

    #[test]
    fn slack_text_escapes_what_slack_would_act_on() {
        let mut report = Report::new(Metadata {
            app: Some("<!channel> & co".into()),
            ..Metadata::default()
        });
        report.tasks.push(TaskReport {
            name: "t".into(),
            outcome: Outcome::NotDelivered("<@U123> said a > b".into()),
            duration: std::time::Duration::ZERO,
            allow_failure: false,
            output_tail: vec!["PG::UndefinedColumn <b> ``` & more".into()],
            attempts: 1,
        });
        let text = slack_text(&report);
        assert!(text.contains("Last lines of `t`:\n```\nPG::UndefinedColumn &lt;b&gt; `\u{200b}`\u{200b}` &amp; more\n```"), "{text}");
        assert!(!text.contains('<') && !text.contains('>'), "{text}");
        assert!(text.contains("&lt;!channel&gt; &amp; co"), "{text}");
        assert!(text.contains("&lt;@U123&gt; said a &gt; b"), "{text}");
    }

    #[test]
    fn slack_text_says_the_lock_was_lost() {
        let mut report = Report::new(Metadata {
            app: Some("shop".into()),
            ..Metadata::default()
        });
        for (name, outcome) in [("migrate", Outcome::Succeeded), ("seed", Outcome::LockLost)] {
            report.tasks.push(TaskReport {
                name: name.into(),
                outcome,
                duration: std::time::Duration::ZERO,
                allow_failure: false,
                output_tail: Vec::new(),
                attempts: 1,
            });
        }
        report.lock_lost = Some(crate::report::LockLoss {
            reason: "gone".into(),
            last_task: Some("migrate".into()),
        });
        assert_eq!(
            slack_text(&report),
            ":x: shop failed after 0.0s: the release lock was lost after `migrate` started; another replica \
             may run the release again (exit status 69)\n• migrate: succeeded (0.0s)\n• seed: not run: the \
             release lock was lost before it could start (0.0s)"
        );
    }
}
