//! A UDP impairment relay on loopback (netem is not available here): devices send to the
//! relay's address, it forwards to the coordinator and back, delaying, dropping, duplicating
//! and holding back packets as each direction's [`Impairment`] says. QUIC runs over UDP, so a
//! device's QUIC connection sees a bad network.
//!
//! Each client address gets its own upstream socket (the coordinator sees one address per
//! client, as through a NAT) and one task per direction. Every direction of every client draws
//! from its own RNG, seeded from the relay's seed, the direction and the order in which client
//! addresses first appeared: given the same packets, a run decides the same drops.

use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// What one direction does to each packet.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Impairment {
    /// Every packet waits this long.
    pub delay: Duration,
    /// ...plus or minus up to this much (uniform); can reorder packets.
    pub jitter: Duration,
    /// Probability that a packet is dropped.
    pub loss: f64,
    /// Probability that a packet is sent twice.
    pub duplicate: f64,
    /// Probability that a packet is held back by `reorder_extra` more.
    pub reorder: f64,
    pub reorder_extra: Duration,
    /// Drop everything while set.
    pub blackout: bool,
}

/// Counts for one direction, over all clients.
#[derive(Debug, Default)]
pub struct Counts {
    pub received: AtomicU64,
    pub dropped: AtomicU64,
    pub sent: AtomicU64,
}

/// One direction's settings, switchable while the relay runs.
#[derive(Default)]
struct Direction {
    settings: Mutex<Impairment>,
    counts: Counts,
}

impl Direction {
    /// How many copies of a packet go out, and after how long (empty: dropped).
    fn decide(&self, rng: &mut ChaCha8Rng) -> Vec<Duration> {
        self.counts.received.fetch_add(1, Ordering::Relaxed);
        let s = *self.settings.lock().unwrap();
        if s.blackout || (s.loss > 0.0 && rng.random_bool(s.loss)) {
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
            return Vec::new();
        }
        let copies = if s.duplicate > 0.0 && rng.random_bool(s.duplicate) { 2 } else { 1 };
        (0..copies)
            .map(|_| {
                let mut wait = s.delay.as_secs_f64();
                if !s.jitter.is_zero() {
                    let j = s.jitter.as_secs_f64();
                    wait += rng.random_range(-j..=j);
                }
                if s.reorder > 0.0 && rng.random_bool(s.reorder) {
                    wait += s.reorder_extra.as_secs_f64();
                }
                Duration::from_secs_f64(wait.max(0.0))
            })
            .collect()
    }
}

/// Which way a packet goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// Device to coordinator.
    Up,
    /// Coordinator to device.
    Down,
}

/// A running relay; its tasks stop when it is dropped.
pub struct Relay {
    /// Where devices send: the relay's own loopback address.
    pub addr: SocketAddr,
    up: Arc<Direction>,
    down: Arc<Direction>,
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Relay {
    /// A relay to `upstream` on a free loopback port, passing everything unimpaired until
    /// [`Relay::set`] says otherwise.
    pub async fn start(upstream: SocketAddr, seed: u64) -> Self {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = front.local_addr().unwrap();
        let up = Arc::new(Direction::default());
        let down = Arc::new(Direction::default());
        let tasks = Arc::new(Mutex::new(Vec::new()));
        let accept = tokio::spawn(accept(front, upstream, seed, up.clone(), down.clone(), tasks.clone()));
        tasks.lock().unwrap().push(accept);
        Self { addr, up, down, tasks }
    }

    fn direction(&self, way: Way) -> &Direction {
        match way {
            Way::Up => &self.up,
            Way::Down => &self.down,
        }
    }

    /// Sets one direction's impairment.
    pub fn set(&self, way: Way, impairment: Impairment) {
        *self.direction(way).settings.lock().unwrap() = impairment;
    }

    /// Sets both directions' impairment.
    pub fn set_both(&self, impairment: Impairment) {
        self.set(Way::Up, impairment);
        self.set(Way::Down, impairment);
    }

    /// Starts or ends a blackout in both directions, keeping the other settings.
    pub fn blackout(&self, on: bool) {
        for way in [Way::Up, Way::Down] {
            self.direction(way).settings.lock().unwrap().blackout = on;
        }
    }

    /// (received, dropped, sent) packets in one direction so far.
    pub fn counts(&self, way: Way) -> (u64, u64, u64) {
        let c = &self.direction(way).counts;
        (c.received.load(Ordering::Relaxed), c.dropped.load(Ordering::Relaxed), c.sent.load(Ordering::Relaxed))
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

fn rng(seed: u64, client: u64, way: Way) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed ^ (client << 1 | (way == Way::Down) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Receives from devices; the first packet from a new address starts its two tasks.
async fn accept(
    front: Arc<UdpSocket>,
    upstream: SocketAddr,
    seed: u64,
    up: Arc<Direction>,
    down: Arc<Direction>,
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
) {
    let mut clients: HashMap<SocketAddr, mpsc::UnboundedSender<Vec<u8>>> = HashMap::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok((n, from)) = front.recv_from(&mut buf).await else { continue };
        let index = clients.len() as u64;
        let sender = clients.entry(from).or_insert_with(|| {
            let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            socket.set_nonblocking(true).unwrap();
            socket.connect(upstream).unwrap();
            let socket = Arc::new(UdpSocket::from_std(socket).unwrap());
            let (tx, rx) = mpsc::unbounded_channel();
            let to_coordinator = forward(rx, socket.clone(), None, up.clone(), rng(seed, index, Way::Up));
            let (back_tx, back_rx) = mpsc::unbounded_channel();
            let reader = read_into(socket, back_tx);
            let to_device = forward(back_rx, front.clone(), Some(from), down.clone(), rng(seed, index, Way::Down));
            let mut tasks = tasks.lock().unwrap();
            tasks.push(tokio::spawn(to_coordinator));
            tasks.push(tokio::spawn(async move {
                tokio::join!(reader, to_device);
            }));
            tx
        });
        let _ = sender.send(buf[..n].to_vec());
    }
}

/// Reads what the coordinator sends to one client's upstream socket.
async fn read_into(socket: Arc<UdpSocket>, tx: mpsc::UnboundedSender<Vec<u8>>) {
    let mut buf = vec![0u8; 65536];
    while let Ok(n) = socket.recv(&mut buf).await {
        if tx.send(buf[..n].to_vec()).is_err() {
            return;
        }
    }
}

/// A packet waiting for its time; the heap pops the earliest (then the first queued).
struct Pending(Instant, u64, Vec<u8>);

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        (self.0, self.1) == (other.0, other.1)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.0, other.1).cmp(&(self.0, self.1))
    }
}

/// One direction of one client: decides each packet's fate and sends it when its time comes
/// (`to`: the device's address on the front socket; `None`: the connected upstream socket).
async fn forward(
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    socket: Arc<UdpSocket>,
    to: Option<SocketAddr>,
    direction: Arc<Direction>,
    mut rng: ChaCha8Rng,
) {
    let mut queue = BinaryHeap::new();
    let mut seq = 0u64;
    let mut open = true;
    while open || !queue.is_empty() {
        let next = queue.peek().map(|p: &Pending| p.0);
        tokio::select! {
            packet = rx.recv(), if open => match packet {
                Some(packet) => {
                    let now = Instant::now();
                    for wait in direction.decide(&mut rng) {
                        seq += 1;
                        queue.push(Pending(now + wait, seq, packet.clone()));
                    }
                }
                None => open = false,
            },
            _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                let Pending(_, _, packet) = queue.pop().unwrap();
                let sent = match to {
                    Some(to) => socket.send_to(&packet, to).await,
                    None => socket.send(&packet).await,
                };
                if sent.is_ok() {
                    direction.counts.sent.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}
