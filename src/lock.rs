//! `[lock]`: once per release across replicas, through the database the app already has.
//!
//! Before the first task, release-tasks opens one connection and takes a PostgreSQL *session* advisory
//! lock; it holds it for the whole release and unlocks at the end. If release-tasks dies, its connection
//! drops and PostgreSQL releases the lock by itself. With `once = true` each release (its version, else
//! its commit) is recorded in `release_tasks_runs`, so a replica that gets the lock after another one
//! completed the same release skips every task. TLS goes through rustls and honours `sslmode`.
//!
//! The database URL carries a password: it is never logged, and errors from the driver are scrubbed.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::config::Lock;
use crate::error::Error;
use crate::gate::Env;
use crate::metadata::Metadata;
use crate::redact;
use crate::report::Report;
use crate::signals::Signals;

/// How often a waiting replica tries the lock again.
const RETRY: Duration = Duration::from_millis(500);
/// How long connecting (TCP, TLS, login) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// The held lock and its connection. Dropping it closes the connection, which releases the lock.
pub struct ReleaseLock {
    client: Client,
    key: i64,
    name: String,
    secrets: Vec<String>,
}

/// A completed run of the same release found in the ledger.
pub struct PreviousRun {
    pub holder: String,
    pub finished_at: String,
}

/// The lock key for a name: FNV-1a 64 of `release-tasks:` + name, so that two apps on one database
/// (or an app and its staging) do not share a lock unless they share a key.
#[must_use]
pub fn key_for(name: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in b"release-tasks:".iter().chain(name.as_bytes()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash as i64
}

/// Which release the ledger records: the version, else the commit. `None` when neither is known.
#[must_use]
pub fn release_id(meta: &Metadata) -> Option<String> {
    meta.version.clone().or_else(|| meta.commit.clone())
}

/// Problems with `[lock]` that can be found before connecting: the variable and, for `once`, the
/// release's version.
#[must_use]
pub fn preflight(lock: &Lock, env: &Env, meta: &Metadata) -> Vec<String> {
    let mut problems = Vec::new();
    match env.get(&lock.url_var).map(String::as_str) {
        None | Some("") => problems.push(format!(
            "[lock] postgres names {}, which is not set; set it to the database URL",
            lock.url_var
        )),
        Some(url) => {
            if let Err(err) = connection_config(url) {
                problems.push(format!(
                    "[lock] {} is not a usable database URL: {err}",
                    lock.url_var
                ));
            }
        }
    }
    if lock.key.is_none() && meta.app.is_none() {
        problems.push(
            "[lock] has no key and the app's name is unknown; set `key` in [lock] or RELEASE_TASKS_APP".into(),
        );
    }
    if lock.once && release_id(meta).is_none() {
        problems.push(
            "[lock] once = true needs to know which release this is; set RELEASE_TASKS_VERSION (or enable Heroku's \
             runtime-dyno-metadata)"
                .into(),
        );
    }
    problems
}

/// The lock's name: `key`, else the app's name.
fn lock_name(lock: &Lock, meta: &Metadata) -> String {
    lock.key
        .clone()
        .or_else(|| meta.app.clone())
        .unwrap_or_default()
}

/// TLS as the URL's `sslmode` asks: `disable` none; `allow`, `prefer` (the default) and `require`
/// encrypt without checking the certificate, as libpq does (Heroku's certificates are not signed
/// by a public authority); `verify-ca` and `verify-full` check it against the Mozilla roots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TlsMode {
    Disable,
    Encrypt { required: bool },
    Verify,
}

fn connection_config(url: &str) -> Result<(tokio_postgres::Config, TlsMode), String> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut mode = TlsMode::Encrypt { required: false };
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("sslmode", value)) => {
                mode = match value {
                    "disable" => TlsMode::Disable,
                    "allow" | "prefer" => TlsMode::Encrypt { required: false },
                    "require" => TlsMode::Encrypt { required: true },
                    "verify-ca" | "verify-full" => TlsMode::Verify,
                    other => {
                        return Err(format!(
                            "sslmode={other} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                        ));
                    }
                };
            }
            _ => kept.push(pair),
        }
    }
    let url = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e: tokio_postgres::Error| redact::urls_in(&e.to_string()))?;
    config.ssl_mode(match mode {
        TlsMode::Disable => tokio_postgres::config::SslMode::Disable,
        TlsMode::Encrypt { required: false } => tokio_postgres::config::SslMode::Prefer,
        TlsMode::Encrypt { required: true } | TlsMode::Verify => {
            tokio_postgres::config::SslMode::Require
        }
    });
    config.connect_timeout(CONNECT_TIMEOUT);
    Ok((config, mode))
}

/// Who this replica is, as other replicas see it in `pg_stat_activity.application_name`.
fn application_name() -> String {
    let host = std::env::var("DYNO")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown-host".to_owned());
    let name = format!("release-tasks {host} pid {}", std::process::id());
    // PostgreSQL keeps at most 63 bytes of it.
    name.chars().take(63).collect()
}

/// Connects and takes the lock, waiting up to `lock.timeout` while another replica holds it and
/// saying who that is. A stopping signal ends the wait.
pub async fn acquire(
    lock: &Lock,
    env: &Env,
    meta: &Metadata,
    signals: &mut Signals,
) -> Result<ReleaseLock, Error> {
    let url = env.get(&lock.url_var).cloned().unwrap_or_default();
    let secrets = secrets_of(&url);
    let scrub = |text: String| redact::urls_in(&redact::scrub(&text, &secrets));
    let (mut config, mode) =
        connection_config(&url).map_err(|e| Error::Database(format!("[lock] {e}")))?;
    let me = application_name();
    config.application_name(&me);
    let shown = redact::url(&url);
    let unavailable = |err: tokio_postgres::Error| {
        Error::Database(scrub(format!(
            "[lock] cannot use the database at {shown} (from {}): {}",
            lock.url_var,
            describe(&err)
        )))
    };
    let client = tokio::select! {
        biased;
        sig = signals.next_stop() => return Err(Error::Interrupted(sig)),
        client = connect(&config, mode) => client.map_err(unavailable)?,
    };
    let name = lock_name(lock, meta);
    let key = key_for(&name);
    let started = Instant::now();
    let mut last_holder: Option<String> = None;
    loop {
        let row = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
            .await
            .map_err(unavailable)?;
        if row.get::<_, bool>(0) {
            if last_holder.is_some() {
                tracing::info!(lock = %name, waited_s = started.elapsed().as_secs(), "took the release lock");
            } else {
                tracing::info!(lock = %name, "took the release lock");
            }
            return Ok(ReleaseLock {
                client,
                key,
                name,
                secrets,
            });
        }
        let holder = holder_of(&client, key)
            .await
            .unwrap_or_else(|| "another session".to_owned());
        if last_holder.as_deref() != Some(holder.as_str()) {
            tracing::warn!(
                lock = %name, holder = %holder, timeout = %humantime::format_duration(lock.timeout),
                "another replica holds the release lock; waiting"
            );
            last_holder = Some(holder.clone());
        }
        let deadline = started + lock.timeout;
        if Instant::now() >= deadline {
            return Err(Error::LockTimeout(format!(
                "[lock] {holder} still held the release lock `{name}` after {}; raise [lock] timeout if its releases take longer",
                humantime::format_duration(lock.timeout)
            )));
        }
        tokio::select! {
            biased;
            sig = signals.next_stop() => return Err(Error::Interrupted(sig)),
            () = tokio::time::sleep(RETRY.min(deadline.saturating_duration_since(Instant::now()))) => {}
        }
    }
}

/// The `application_name` of the session holding the advisory lock `key`, if it can be seen.
async fn holder_of(client: &Client, key: i64) -> Option<String> {
    // An advisory lock on a bigint shows in pg_locks as its high and low halves.
    let (high, low) = ((key >> 32) as u32, key as u32);
    let row = client
        .query_opt(
            "SELECT coalesce(nullif(a.application_name, ''), 'a session') || ' (pid ' || a.pid || ')' \
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
               AND l.classid::bigint = $1 AND l.objid::bigint = $2 LIMIT 1",
            &[&i64::from(high), &i64::from(low)],
        )
        .await
        .ok()??;
    row.try_get(0).ok()
}

/// Connects over TLS as `mode` says; with `sslmode=disable` the config never asks for TLS, so the
/// connector goes unused.
async fn connect(
    config: &tokio_postgres::Config,
    mode: TlsMode,
) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = config
        .connect(tls::MakeRustls::new(mode == TlsMode::Verify))
        .await?;
    tokio::spawn(watch(connection));
    Ok(client)
}

/// Drives the connection; if it drops mid-release the lock is gone, and that must be said loudly.
async fn watch<F: std::future::Future<Output = Result<(), tokio_postgres::Error>>>(connection: F) {
    if let Err(err) = connection.await {
        tracing::error!(
            error = %describe(&err),
            "lost the [lock] database connection; PostgreSQL released the lock, so another replica may start the release"
        );
    }
}

/// The driver's message with its cause, which is where "password authentication failed" lives.
fn describe(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => match std::error::Error::source(err) {
            Some(cause) => format!("{err}: {cause}"),
            None => err.to_string(),
        },
    }
}

/// The URL and its password, to scrub from anything the driver says.
fn secrets_of(url: &str) -> Vec<String> {
    let mut secrets = vec![url.to_owned()];
    if let Some(auth) = url
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .map(|(auth, _)| auth)
    {
        if let Some((_, password)) = auth.split_once(':') {
            secrets.push(password.to_owned());
        }
    }
    secrets
}

impl ReleaseLock {
    /// The lock's name, for messages.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Creates the ledger if needed and returns the completed run of `release`, if there is one.
    pub async fn previous(&self, release: &str) -> Result<Option<PreviousRun>, Error> {
        self.client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS release_tasks_runs (\
                   lock_key text NOT NULL, \
                   release text NOT NULL, \
                   status text NOT NULL, \
                   holder text NOT NULL, \
                   started_at timestamptz NOT NULL DEFAULT now(), \
                   finished_at timestamptz, \
                   exit_code integer, \
                   PRIMARY KEY (lock_key, release))",
            )
            .await
            .map_err(|e| self.error("cannot create the release_tasks_runs table", &e))?;
        let row = self
            .client
            .query_opt(
                "SELECT holder, to_char(finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') \
                 FROM release_tasks_runs WHERE lock_key = $1 AND release = $2 AND status = 'succeeded'",
                &[&self.name, &release],
            )
            .await
            .map_err(|e| self.error("cannot read release_tasks_runs", &e))?;
        Ok(row.map(|r| PreviousRun {
            holder: r.get(0),
            finished_at: r.get::<_, Option<String>>(1).unwrap_or_default(),
        }))
    }

    /// Records that this replica is running `release` (a failed or abandoned earlier run is replaced).
    pub async fn begin(&self, release: &str) -> Result<(), Error> {
        self.client
            .execute(
                "INSERT INTO release_tasks_runs (lock_key, release, status, holder) VALUES ($1, $2, 'running', $3) \
                 ON CONFLICT (lock_key, release) DO UPDATE \
                 SET status = 'running', holder = $3, started_at = now(), finished_at = NULL, exit_code = NULL",
                &[&self.name, &release, &application_name()],
            )
            .await
            .map_err(|e| self.error("cannot record the release in release_tasks_runs", &e))?;
        Ok(())
    }

    /// Records how `release` ended. A failure to record is logged: the release itself is over.
    pub async fn finish(&self, release: &str, report: &Report) {
        let status = if report.succeeded() {
            "succeeded"
        } else {
            "failed"
        };
        let result = self
            .client
            .execute(
                "UPDATE release_tasks_runs SET status = $3, finished_at = now(), exit_code = $4 \
                 WHERE lock_key = $1 AND release = $2",
                &[&self.name, &release, &status, &report.exit_code()],
            )
            .await;
        if let Err(err) = result {
            tracing::error!(error = %self.error("cannot record the outcome in release_tasks_runs", &err), "ledger not updated");
        }
    }

    /// Unlocks and closes the connection.
    pub async fn release(self) {
        let result = self
            .client
            .query_one("SELECT pg_advisory_unlock($1)", &[&self.key])
            .await;
        match result {
            Ok(_) => tracing::info!(lock = %self.name, "released the release lock"),
            // Closing the connection (below, on drop) releases it anyway.
            Err(err) => {
                tracing::warn!(error = %self.error("cannot unlock", &err), "closing the connection instead");
            }
        }
    }

    fn error(&self, what: &str, err: &tokio_postgres::Error) -> Error {
        Error::Database(redact::urls_in(&redact::scrub(
            &format!("[lock] {what}: {}", describe(err)),
            &self.secrets,
        )))
    }
}

/// tokio-postgres's TLS hooks, implemented with tokio-rustls.
mod tls {
    use std::future::Future;
    use std::io;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll};

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, SignatureScheme};
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

    /// Makes a TLS connector per connection.
    #[derive(Clone)]
    pub struct MakeRustls {
        config: Arc<rustls::ClientConfig>,
    }

    impl MakeRustls {
        /// `verify`: check the server's certificate against the Mozilla roots (verify-full).
        pub fn new(verify: bool) -> MakeRustls {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
                .with_safe_default_protocol_versions()
                .expect("the ring provider supports TLS 1.2 and 1.3");
            let config = if verify {
                let roots = rustls::RootCertStore {
                    roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
                };
                builder.with_root_certificates(roots).with_no_client_auth()
            } else {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
                    .with_no_client_auth()
            };
            MakeRustls {
                config: Arc::new(config),
            }
        }
    }

    impl<S> MakeTlsConnect<S> for MakeRustls
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        type Stream = Stream<S>;
        type TlsConnect = Connector;
        type Error = rustls::pki_types::InvalidDnsNameError;

        fn make_tls_connect(&mut self, domain: &str) -> Result<Connector, Self::Error> {
            Ok(Connector {
                config: Arc::clone(&self.config),
                name: ServerName::try_from(domain.to_owned())?,
            })
        }
    }

    /// Connects one stream.
    pub struct Connector {
        config: Arc<rustls::ClientConfig>,
        name: ServerName<'static>,
    }

    impl<S> TlsConnect<S> for Connector
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        type Stream = Stream<S>;
        type Error = io::Error;
        type Future = Pin<Box<dyn Future<Output = io::Result<Stream<S>>> + Send>>;

        fn connect(self, stream: S) -> Self::Future {
            Box::pin(async move {
                let tls = tokio_rustls::TlsConnector::from(self.config)
                    .connect(self.name, stream)
                    .await?;
                Ok(Stream(tls))
            })
        }
    }

    /// A TLS stream as tokio-postgres wants it.
    pub struct Stream<S>(tokio_rustls::client::TlsStream<S>);

    impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<S> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<S> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, buf)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for Stream<S> {
        fn channel_binding(&self) -> ChannelBinding {
            ChannelBinding::none()
        }
    }

    /// `sslmode=require`: encrypt, and check the handshake's signatures, but not who signed the
    /// certificate (what libpq does; Heroku Postgres's certificates are self-signed).
    #[derive(Debug)]
    struct EncryptOnly(Arc<rustls::crypto::CryptoProvider>);

    impl ServerCertVerifier for EncryptOnly {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_and_distinct() {
        assert_eq!(key_for("shop"), key_for("shop"));
        assert_ne!(key_for("shop"), key_for("shop-staging"));
    }

    #[test]
    fn sslmode_is_read_and_removed() {
        let (_, mode) =
            connection_config("postgres://u:p@h/db?sslmode=require&connect_timeout=5").unwrap();
        assert_eq!(mode, TlsMode::Encrypt { required: true });
        let (_, mode) = connection_config("postgres://u:p@h/db").unwrap();
        assert_eq!(mode, TlsMode::Encrypt { required: false });
        let (_, mode) = connection_config("postgresql://h/db?sslmode=verify-full").unwrap();
        assert_eq!(mode, TlsMode::Verify);
        assert!(connection_config("postgres://h/db?sslmode=sometimes").is_err());
    }

    #[test]
    fn passwords_are_scrubbed() {
        let secrets = secrets_of("postgres://app:hunter2@db:5432/app");
        assert_eq!(secrets[1], "hunter2");
        assert_eq!(
            redact::scrub("login for app with hunter2 failed", &secrets),
            "login for app with [redacted] failed"
        );
    }
}
