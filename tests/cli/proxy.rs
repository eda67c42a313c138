//! A loopback TCP proxy for network faults: it forwards both ways until told to stop forwarding
//! while keeping every socket open (a silent partition: no RST, no FIN), or to cut every connection
//! at once (what a failover or a load balancer's reset does). Threads and blocking sockets only.

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
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if state.frozen.load(Ordering::SeqCst) {
                continue;
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        // An end or an error is passed on, unless the partition hides it.
        if !state.frozen.load(Ordering::SeqCst) {
            let _ = to.shutdown(Shutdown::Write);
        }
    });
}
