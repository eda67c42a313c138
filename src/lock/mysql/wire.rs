//! A small MySQL/MariaDB client: just what the lock and the ledger need, over one TCP connection.
//!
//! Protocol v10 handshake, the TLS upgrade (`CLIENT_SSL`, through the rustls already linked for
//! PostgreSQL), `mysql_native_password`, `caching_sha2_password` (fast path; full authentication over
//! TLS, or through the RSA public-key exchange without it: `auth.rs`), an authentication switch, and then
//! text queries (`COM_QUERY`, rows as text). No prepared statements, no binary
//! protocol, no pooling: the lock is the connection's. Values go into SQL through [`quote`].
//!
//! Why not a crate: `mysql_async` brings its own TLS stack choices, a pool, a binary protocol, time and
//! decimal types and about 0.5 MiB more to a static binary whose whole budget is 3 MiB; the few
//! statements here need none of it (README, "Static binary").

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::auth;

const CLIENT_LONG_PASSWORD: u32 = 1;
const CLIENT_LONG_FLAG: u32 = 4;
const CLIENT_CONNECT_WITH_DB: u32 = 8;
const CLIENT_PROTOCOL_41: u32 = 0x200;
const CLIENT_SSL: u32 = 0x800;
const CLIENT_TRANSACTIONS: u32 = 0x2000;
const CLIENT_SECURE_CONNECTION: u32 = 0x8000;
const CLIENT_MULTI_RESULTS: u32 = 0x2_0000;
const CLIENT_PLUGIN_AUTH: u32 = 0x8_0000;
const CLIENT_CONNECT_ATTRS: u32 = 0x10_0000;
const CLIENT_PLUGIN_AUTH_LENENC: u32 = 0x20_0000;
/// `utf8mb4_general_ci`: every server since 5.5.3 has it.
const UTF8MB4: u8 = 45;
const MAX_PACKET: u32 = 16 * 1024 * 1024;

/// What went wrong on a connection.
#[derive(Debug)]
pub enum WireError {
    /// The socket: refused, reset, closed, timed out.
    Io(io::Error),
    /// The server said no (an ERR packet): its error number, SQLSTATE and message.
    Server {
        code: u16,
        state: String,
        message: String,
    },
    /// TLS could not be set up (the server has none and the URL requires it, or the handshake failed).
    Tls(String),
    /// Something this client does not speak, or a packet it cannot read.
    Protocol(String),
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                f.write_str("the server closed the connection")
            }
            WireError::Io(e) => write!(f, "{e}"),
            WireError::Server {
                code,
                state,
                message,
            } => write!(f, "{message} (error {code}, SQLSTATE {state})"),
            WireError::Tls(e) => write!(f, "TLS: {e}"),
            WireError::Protocol(e) => write!(f, "unexpected answer from the server: {e}"),
        }
    }
}

impl From<io::Error> for WireError {
    fn from(e: io::Error) -> Self {
        WireError::Io(e)
    }
}

type Result<T> = std::result::Result<T, WireError>;

/// How to connect and log in.
#[derive(Debug, Clone)]
pub struct Options {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub database: Option<String>,
    /// `None`: no TLS. `Some((config, required))`: TLS when the server offers it, and a refusal when it
    /// does not and `required`.
    pub tls: Option<(Arc<rustls::ClientConfig>, bool)>,
    /// Sent as the `program_name` connection attribute, which `performance_schema` shows other sessions.
    pub program_name: String,
    /// TCP keepalive: idle time before the first probe, the interval, and the count of probes.
    pub keepalive: (Duration, Duration, u32),
}

/// The socket, in clear or in TLS; `Moving` only while the clear one is being wrapped in TLS.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Moving,
}

fn moving() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "the TLS handshake did not finish",
    )
}

impl Stream {
    async fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.read_exact(buf).await.map(drop),
            Stream::Tls(s) => s.read_exact(buf).await.map(drop),
            Stream::Moving => Err(moving()),
        }
    }

    async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Stream::Plain(s) => {
                s.write_all(buf).await?;
                s.flush().await
            }
            Stream::Tls(s) => {
                s.write_all(buf).await?;
                s.flush().await
            }
            Stream::Moving => Err(moving()),
        }
    }
}

/// One logged-in connection.
pub struct Conn {
    stream: Stream,
    seq: u8,
    /// The server's id for this connection (`CONNECTION_ID()`).
    pub id: u32,
    /// The server's version string (`8.0.36`, `10.11.6-MariaDB-...`, `8.0.31-Vitess`).
    pub server_version: String,
    pub tls: bool,
}

/// A result set: rows of text values (`None` is SQL NULL).
pub type Rows = Vec<Vec<Option<String>>>;

impl Conn {
    /// Connects, upgrades to TLS as asked, and logs in.
    pub async fn connect(options: &Options) -> Result<Conn> {
        let tcp = TcpStream::connect((options.host.as_str(), options.port)).await?;
        tcp.set_nodelay(true)?;
        let (idle, interval, count) = options.keepalive;
        socket2::SockRef::from(&tcp).set_tcp_keepalive(
            &socket2::TcpKeepalive::new()
                .with_time(idle)
                .with_interval(interval)
                .with_retries(count),
        )?;
        let mut conn = Conn {
            stream: Stream::Plain(tcp),
            seq: 0,
            id: 0,
            server_version: String::new(),
            tls: false,
        };
        let greeting = conn.read_packet().await?;
        if greeting.first() == Some(&0xff) {
            // Refused before the handshake: too many connections, host blocked.
            return Err(server_error(&greeting));
        }
        let hello = Greeting::parse(&greeting)?;
        conn.id = hello.connection_id;
        conn.server_version.clone_from(&hello.server_version);
        let mut caps = CLIENT_LONG_PASSWORD
            | CLIENT_LONG_FLAG
            | CLIENT_PROTOCOL_41
            | CLIENT_TRANSACTIONS
            | CLIENT_SECURE_CONNECTION
            | CLIENT_MULTI_RESULTS
            | CLIENT_PLUGIN_AUTH
            | CLIENT_PLUGIN_AUTH_LENENC
            | CLIENT_CONNECT_ATTRS;
        if options.database.is_some() {
            caps |= CLIENT_CONNECT_WITH_DB;
        }
        caps &= hello.capabilities | CLIENT_SSL;
        if hello.capabilities & CLIENT_PROTOCOL_41 == 0 {
            return Err(WireError::Protocol(
                "the server does not speak protocol 4.1 (MySQL 4.1 or later is needed)".into(),
            ));
        }
        if let Some((config, required)) = &options.tls {
            if hello.capabilities & CLIENT_SSL != 0 {
                caps |= CLIENT_SSL;
                let mut request = Vec::with_capacity(32);
                request.extend_from_slice(&caps.to_le_bytes());
                request.extend_from_slice(&MAX_PACKET.to_le_bytes());
                request.push(UTF8MB4);
                request.extend_from_slice(&[0; 23]);
                conn.write_packet(&request).await?;
                conn.upgrade(Arc::clone(config), &options.host).await?;
            } else if *required {
                return Err(WireError::Tls(
                    "the server does not offer TLS, and the URL's ssl-mode requires it; turn TLS on in the \
                     server, or use ssl-mode=PREFERRED"
                        .into(),
                ));
            } else {
                caps &= !CLIENT_SSL;
            }
        } else {
            caps &= !CLIENT_SSL;
        }
        conn.login(options, caps, &hello).await?;
        Ok(conn)
    }

    async fn upgrade(&mut self, config: Arc<rustls::ClientConfig>, host: &str) -> Result<()> {
        let name = rustls::pki_types::ServerName::try_from(host.to_owned())
            .map_err(|e| WireError::Tls(format!("{host} is not a host name TLS can check: {e}")))?;
        let Stream::Plain(tcp) = std::mem::replace(&mut self.stream, Stream::Moving) else {
            return Err(WireError::Protocol("TLS was started twice".into()));
        };
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| WireError::Tls(e.to_string()))?;
        self.stream = Stream::Tls(Box::new(tls));
        self.tls = true;
        Ok(())
    }

    async fn login(&mut self, options: &Options, caps: u32, hello: &Greeting) -> Result<()> {
        let mut plugin = hello.plugin.clone();
        let mut scramble = hello.scramble.clone();
        let first =
            auth::respond(&plugin, options.password.as_bytes(), &scramble).unwrap_or_default();
        let mut packet = Vec::with_capacity(128);
        packet.extend_from_slice(&caps.to_le_bytes());
        packet.extend_from_slice(&MAX_PACKET.to_le_bytes());
        packet.push(UTF8MB4);
        packet.extend_from_slice(&[0; 23]);
        packet.extend_from_slice(options.user.as_bytes());
        packet.push(0);
        put_lenenc_bytes(&mut packet, &first);
        if let Some(db) = &options.database {
            packet.extend_from_slice(db.as_bytes());
            packet.push(0);
        }
        packet.extend_from_slice(plugin.as_bytes());
        packet.push(0);
        if caps & CLIENT_CONNECT_ATTRS != 0 {
            let mut attrs = Vec::new();
            for (k, v) in [
                ("_client_name", "release-tasks"),
                ("program_name", options.program_name.as_str()),
            ] {
                put_lenenc_bytes(&mut attrs, k.as_bytes());
                put_lenenc_bytes(&mut attrs, v.as_bytes());
            }
            put_lenenc_bytes(&mut packet, &attrs);
        }
        self.write_packet(&packet).await?;
        loop {
            let answer = self.read_packet().await?;
            match answer.first() {
                Some(0x00) => return Ok(()),
                Some(0xff) => return Err(server_error(&answer)),
                // Authentication switch: another plugin, a new scramble.
                Some(0xfe) => {
                    let rest = &answer[1..];
                    let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
                    plugin = String::from_utf8_lossy(&rest[..end]).into_owned();
                    scramble = rest.get(end + 1..).unwrap_or_default().to_vec();
                    if scramble.last() == Some(&0) {
                        scramble.pop();
                    }
                    let Some(response) =
                        auth::respond(&plugin, options.password.as_bytes(), &scramble)
                    else {
                        return Err(unsupported_plugin(&plugin));
                    };
                    self.write_packet(&response).await?;
                }
                // More data for caching_sha2_password.
                Some(0x01) if plugin == auth::CACHING_SHA2 => match answer.get(1) {
                    // Fast authentication succeeded: the OK follows.
                    Some(3) => {}
                    // Full authentication: the password in clear over TLS, else encrypted with the
                    // server's public key, which is asked for (2).
                    Some(4) if self.tls => {
                        let mut clear = options.password.as_bytes().to_vec();
                        clear.push(0);
                        self.write_packet(&clear).await?;
                    }
                    Some(4) => self.write_packet(&[2]).await?,
                    // The public key (PEM).
                    _ => {
                        let pem = &answer[1..];
                        let encrypted =
                            auth::encrypt_password(options.password.as_bytes(), &scramble, pem)
                                .map_err(WireError::Protocol)?;
                        self.write_packet(&encrypted).await?;
                    }
                },
                _ if plugin != auth::NATIVE && plugin != auth::CACHING_SHA2 => {
                    return Err(unsupported_plugin(&plugin));
                }
                _ => {
                    return Err(WireError::Protocol(
                        "an authentication packet it cannot read".into(),
                    ));
                }
            }
        }
    }

    /// Runs `sql` (one statement without a result set) and returns how many rows it changed.
    pub async fn execute(&mut self, sql: &str) -> Result<u64> {
        self.seq = 0;
        let mut packet = Vec::with_capacity(sql.len() + 1);
        packet.push(0x03);
        packet.extend_from_slice(sql.as_bytes());
        self.write_packet(&packet).await?;
        let answer = self.read_packet().await?;
        match answer.first() {
            Some(0x00) => {
                let mut at = 1;
                lenenc_int(&answer, &mut at)
                    .ok_or_else(|| WireError::Protocol("an OK packet cut short".into()))
            }
            Some(0xff) => Err(server_error(&answer)),
            _ => Err(WireError::Protocol(
                "rows for a statement that returns none".into(),
            )),
        }
    }

    /// Runs `sql` (one statement) and returns its rows (none for a statement without a result).
    pub async fn query(&mut self, sql: &str) -> Result<Rows> {
        self.seq = 0;
        let mut packet = Vec::with_capacity(sql.len() + 1);
        packet.push(0x03);
        packet.extend_from_slice(sql.as_bytes());
        self.write_packet(&packet).await?;
        let first = self.read_packet().await?;
        match first.first() {
            Some(0x00) => return Ok(Vec::new()),
            Some(0xff) => return Err(server_error(&first)),
            _ => {}
        }
        let mut at = 0;
        let columns = lenenc_int(&first, &mut at)
            .ok_or_else(|| WireError::Protocol("a result set without a column count".into()))?;
        for _ in 0..columns {
            self.read_packet().await?;
        }
        let eof = self.read_packet().await?;
        if !is_eof(&eof) {
            return Err(WireError::Protocol("no end of the column list".into()));
        }
        let mut rows = Vec::new();
        loop {
            let packet = self.read_packet().await?;
            if is_eof(&packet) {
                return Ok(rows);
            }
            if packet.first() == Some(&0xff) {
                return Err(server_error(&packet));
            }
            let mut at = 0;
            let mut row = Vec::with_capacity(columns as usize);
            for _ in 0..columns {
                if packet.get(at) == Some(&0xfb) {
                    at += 1;
                    row.push(None);
                    continue;
                }
                let len = lenenc_int(&packet, &mut at)
                    .ok_or_else(|| WireError::Protocol("a row cut short".into()))?;
                let end = at.saturating_add(len as usize);
                let value = packet
                    .get(at..end)
                    .ok_or_else(|| WireError::Protocol("a row cut short".into()))?;
                row.push(Some(String::from_utf8_lossy(value).into_owned()));
                at = end;
            }
            rows.push(row);
        }
    }

    /// The first column of the first row, if any.
    pub async fn value(&mut self, sql: &str) -> Result<Option<String>> {
        Ok(self
            .query(sql)
            .await?
            .into_iter()
            .next()
            .and_then(|row| row.into_iter().next().flatten()))
    }

    /// Says goodbye (`COM_QUIT`); the server then ends the session, releasing what it held.
    pub async fn quit(mut self) {
        self.seq = 0;
        let _ = self.write_packet(&[0x01]).await;
    }

    async fn read_packet(&mut self) -> Result<Vec<u8>> {
        let mut payload = Vec::new();
        loop {
            let mut header = [0u8; 4];
            self.stream.read_exact(&mut header).await?;
            let len = usize::from(header[0])
                | (usize::from(header[1]) << 8)
                | (usize::from(header[2]) << 16);
            self.seq = header[3].wrapping_add(1);
            let start = payload.len();
            payload.resize(start + len, 0);
            self.stream.read_exact(&mut payload[start..]).await?;
            if len < 0xff_ffff {
                return Ok(payload);
            }
        }
    }

    async fn write_packet(&mut self, payload: &[u8]) -> Result<()> {
        let mut out = Vec::with_capacity(payload.len() + 8);
        let mut chunks = payload.chunks(0xff_ffff).peekable();
        if payload.is_empty() {
            out.extend_from_slice(&[0, 0, 0, self.seq]);
            self.seq = self.seq.wrapping_add(1);
        }
        while let Some(chunk) = chunks.next() {
            let len = chunk.len() as u32;
            out.extend_from_slice(&len.to_le_bytes()[..3]);
            out.push(self.seq);
            self.seq = self.seq.wrapping_add(1);
            out.extend_from_slice(chunk);
            if chunks.peek().is_none() && chunk.len() == 0xff_ffff {
                out.extend_from_slice(&[0, 0, 0, self.seq]);
                self.seq = self.seq.wrapping_add(1);
            }
        }
        self.stream.write_all(&out).await?;
        Ok(())
    }
}

fn unsupported_plugin(plugin: &str) -> WireError {
    WireError::Protocol(format!(
        "the account uses the authentication plugin {plugin:?}, which release-tasks does not speak \
         (it speaks mysql_native_password and caching_sha2_password); give the account one of those"
    ))
}

/// The server's greeting (protocol v10).
struct Greeting {
    server_version: String,
    connection_id: u32,
    capabilities: u32,
    scramble: Vec<u8>,
    plugin: String,
}

impl Greeting {
    fn parse(p: &[u8]) -> Result<Greeting> {
        let bad = || WireError::Protocol("a server greeting it cannot read".into());
        if p.first() != Some(&10) {
            return Err(WireError::Protocol(format!(
                "protocol version {} (10 is MySQL's and MariaDB's)",
                p.first().copied().unwrap_or_default()
            )));
        }
        let end = p[1..].iter().position(|b| *b == 0).ok_or_else(bad)? + 1;
        let server_version = String::from_utf8_lossy(&p[1..end]).into_owned();
        let mut at = end + 1;
        let take = |at: &mut usize, n: usize| -> Result<&[u8]> {
            let s = p.get(*at..*at + n).ok_or_else(bad)?;
            *at += n;
            Ok(s)
        };
        let id = take(&mut at, 4)?;
        let connection_id = u32::from_le_bytes([id[0], id[1], id[2], id[3]]);
        let mut scramble = take(&mut at, 8)?.to_vec();
        take(&mut at, 1)?;
        let low = take(&mut at, 2)?;
        let mut capabilities = u32::from(low[0]) | (u32::from(low[1]) << 8);
        let mut plugin = auth::NATIVE.to_owned();
        if at < p.len() {
            take(&mut at, 1)?; // character set
            take(&mut at, 2)?; // status
            let high = take(&mut at, 2)?;
            capabilities |= (u32::from(high[0]) << 16) | (u32::from(high[1]) << 24);
            let data_len = usize::from(take(&mut at, 1)?[0]);
            take(&mut at, 10)?;
            if capabilities & CLIENT_SECURE_CONNECTION != 0 {
                let n = data_len.saturating_sub(8).max(13);
                let n = n.min(p.len().saturating_sub(at));
                let part = take(&mut at, n)?;
                scramble.extend_from_slice(part);
                if scramble.last() == Some(&0) {
                    scramble.pop();
                }
            }
            if capabilities & CLIENT_PLUGIN_AUTH != 0 && at < p.len() {
                let rest = &p[at..];
                let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
                plugin = String::from_utf8_lossy(&rest[..end]).into_owned();
            }
        }
        Ok(Greeting {
            server_version,
            connection_id,
            capabilities,
            scramble,
            plugin,
        })
    }
}

fn is_eof(p: &[u8]) -> bool {
    p.first() == Some(&0xfe) && p.len() < 9
}

fn server_error(p: &[u8]) -> WireError {
    let code = p.get(1..3).map_or(0, |c| u16::from_le_bytes([c[0], c[1]]));
    let (state, message) = match p.get(3) {
        Some(b'#') => (
            String::from_utf8_lossy(p.get(4..9).unwrap_or_default()).into_owned(),
            p.get(9..).unwrap_or_default(),
        ),
        _ => ("HY000".to_owned(), p.get(3..).unwrap_or_default()),
    };
    WireError::Server {
        code,
        state,
        message: String::from_utf8_lossy(message).into_owned(),
    }
}

fn lenenc_int(p: &[u8], at: &mut usize) -> Option<u64> {
    let first = *p.get(*at)?;
    *at += 1;
    let n = match first {
        0..=0xfa => return Some(u64::from(first)),
        0xfc => 2,
        0xfd => 3,
        0xfe => 8,
        _ => return None,
    };
    let bytes = p.get(*at..*at + n)?;
    *at += n;
    Some(
        bytes
            .iter()
            .rev()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)),
    )
}

fn put_lenenc_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = bytes.len() as u64;
    if len < 0xfb {
        out.push(len as u8);
    } else if len <= 0xffff {
        out.push(0xfc);
        out.extend_from_slice(&(len as u16).to_le_bytes());
    } else if len <= 0xff_ffff {
        out.push(0xfd);
        out.extend_from_slice(&(len as u32).to_le_bytes()[..3]);
    } else {
        out.push(0xfe);
        out.extend_from_slice(&len.to_le_bytes());
    }
    out.extend_from_slice(bytes);
}

/// `text` as a SQL string literal that means the same under every `sql_mode` (with or without
/// `NO_BACKSLASH_ESCAPES`) and cannot end early: its UTF-8 bytes in hex, introduced as utf8mb4.
#[must_use]
pub fn quote(text: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(text.len() * 2 + 12);
    out.push_str("_utf8mb4 X'");
    for b in text.as_bytes() {
        let _ = write!(out, "{b:02x}");
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_round_trip() {
        for n in [0usize, 250, 251, 65_535, 65_536, 16_777_216] {
            let mut out = Vec::new();
            put_lenenc_bytes(&mut out, &vec![7; n]);
            let mut at = 0;
            assert_eq!(lenenc_int(&out, &mut at), Some(n as u64));
            assert_eq!(out.len() - at, n);
        }
    }

    #[test]
    fn errors_keep_code_state_and_message() {
        let mut p = vec![0xff, 0x15, 0x04, b'#'];
        p.extend_from_slice(b"28000Access denied");
        let WireError::Server {
            code,
            state,
            message,
        } = server_error(&p)
        else {
            panic!("not a server error")
        };
        assert_eq!(
            (code, state.as_str(), message.as_str()),
            (1045, "28000", "Access denied")
        );
    }

    #[test]
    fn quoting_is_hex() {
        assert_eq!(quote("a'\\"), "_utf8mb4 X'61275c'");
    }

    #[test]
    fn a_greeting_gives_the_scramble_and_plugin() {
        let mut p = vec![10];
        p.extend_from_slice(b"8.0.36\0");
        p.extend_from_slice(&7u32.to_le_bytes());
        p.extend_from_slice(b"abcdefgh\0");
        let caps = CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION | CLIENT_PLUGIN_AUTH | CLIENT_SSL;
        p.extend_from_slice(&(caps as u16).to_le_bytes());
        p.extend_from_slice(&[45, 2, 0]);
        p.extend_from_slice(&((caps >> 16) as u16).to_le_bytes());
        p.push(21);
        p.extend_from_slice(&[0; 10]);
        p.extend_from_slice(b"ijklmnopqrst\0");
        p.extend_from_slice(b"caching_sha2_password\0");
        let g = Greeting::parse(&p).unwrap();
        assert_eq!(g.server_version, "8.0.36");
        assert_eq!(g.connection_id, 7);
        assert_eq!(g.scramble, b"abcdefghijklmnopqrst");
        assert_eq!(g.plugin, "caching_sha2_password");
        assert_eq!(g.capabilities, caps);
    }
}
