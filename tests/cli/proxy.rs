//! A loopback TCP proxy for network faults: it forwards both ways until told to stop forwarding
//! while keeping every socket open (a silent partition: no RST, no FIN), to hold what it gets until
//! told to go on (a slow network), or to cut every connection at once (what a failover or a load
//! balancer's reset does). Threads and blocking sockets only.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The proxy; it stops (closing everything) when dropped.
pub struct Proxy {
    port: u16,
    state: Arc<State>,
}

#[derive(Default)]
struct State {
    /// Nothing is forwarded; what arrives is dropped, as a partitioned network drops it.
    frozen: AtomicBool,
    /// Nothing is forwarded yet; what arrives is kept, and sent on `resume`.
    held: AtomicBool,
    stopped: AtomicBool,
    /// Every socket the proxy holds: (client side, server side) per connection.
    pairs: Mutex<Vec<(TcpStream, Option<TcpStream>)>>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards each connection to `target`.
    pub fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let state = Arc::new(State::default());
        let shared = Arc::clone(&state);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if shared.stopped.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                // While frozen, a new connection is accepted and left unanswered.
                let server = if shared.frozen.load(Ordering::SeqCst) {
                    None
                } else {
                    TcpStream::connect(target).ok()
                };
                let keep = (
                    client.try_clone().expect("clone"),
                    server.as_ref().map(|s| s.try_clone().expect("clone")),
                );
                shared.pairs.lock().expect("lock").push(keep);
                if let Some(server) = server {
                    pump(
                        client.try_clone().expect("clone"),
                        server.try_clone().expect("clone"),
                        &shared,
                    );
                    pump(server, client, &shared);
                }
            }
        });
        Proxy { port, state }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// From now on nothing is forwarded either way, and every socket stays open.
    pub fn freeze(&self) {
        self.state.frozen.store(true, Ordering::SeqCst);
    }

    /// From now on what arrives is kept, not forwarded, until [`Proxy::resume`].
    pub fn hold(&self) {
        self.state.held.store(true, Ordering::SeqCst);
    }

    /// Forwards what was held, and everything after it.
    pub fn resume(&self) {
        self.state.held.store(false, Ordering::SeqCst);
    }

    /// Closes the proxy's connections to the server (the server sees them end, as its own
    /// keepalives would make it see after a partition); the clients' sides stay open and silent.
    pub fn close_server_side(&self) {
        self.freeze();
        for (_, server) in self.state.pairs.lock().expect("lock").iter() {
            if let Some(server) = server {
                let _ = server.shutdown(Shutdown::Both);
            }
        }
    }

    /// Closes every connection, both sides, at once.
    pub fn cut(&self) {
        self.close_server_side();
        for (client, _) in self.state.pairs.lock().expect("lock").iter() {
            let _ = client.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stopped.store(true, Ordering::SeqCst);
        self.cut();
        // Wakes the accept loop so that it sees `stopped`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Copies `from` to `to` on a thread of its own, dropping what arrives while frozen.
fn pump(mut from: TcpStream, mut to: TcpStream, state: &Arc<State>) {
    let state = Arc::clone(state);
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        let mut kept = Vec::new();
        // Wakes up now and then to send what was held once the proxy resumes.
        let _ = from.set_read_timeout(Some(std::time::Duration::from_millis(20)));
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    0
                }
                Err(_) => break,
            };
            if state.frozen.load(Ordering::SeqCst) {
                continue;
            }
            kept.extend_from_slice(&buf[..n]);
            if state.held.load(Ordering::SeqCst) || kept.is_empty() {
                continue;
            }
            if to.write_all(&kept).is_err() {
                break;
            }
            kept.clear();
        }
        // An end or an error is passed on, unless the partition hides it.
        if !state.frozen.load(Ordering::SeqCst) {
            let _ = to.shutdown(Shutdown::Write);
        }
    });
}
