//! SecAgg+ cost per device and for the server at the 2NN's vector length (199,210), against
//! the plain cost (a device sends its f32 delta, the server sums the vectors). Every party runs
//! on this thread one after the other, so each figure is that party's own time (wall time of
//! its calls; rough on a busy machine); bytes are the bincode-encoded messages, exact.
//!
//! `cargo bench --profile dev -p fedge-secagg --bench secagg` (optionally followed by `-- N K`
//! to run one configuration).

use std::time::{Duration, Instant};

use bincode::{Decode, Encode};
use fedge_secagg::{Client, SecAggConfig, Server};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha20Rng;

const LEN: usize = 199_210;
const CLIP: f32 = 1.0;
/// The simulator's default: steps of clip / 2^20.
const SCALE: f32 = 1_048_576.0;

/// The simulator's default degree: `2 ceil(1.5 log2 n)`, at most `n - 1`.
fn default_degree(n: u32) -> u32 {
    (2 * (1.5 * f64::from(n).log2()).ceil() as u32).min(n - 1)
}

fn config(n: u32, degree: u32) -> SecAggConfig {
    let mut c = SecAggConfig {
        n_devices: n,
        threshold: degree / 2 + 1,
        degree,
        vector_len: LEN,
        clip: CLIP,
        scale: SCALE,
        modulus_bits: 64,
    };
    c.modulus_bits = 128 - (u128::from(n) * u128::from(c.max_level())).leading_zeros();
    c
}

fn bytes<T: Encode>(msg: &T) -> u64 {
    bincode::encode_to_vec(msg, bincode::config::standard()).map(|b| b.len() as u64).unwrap_or(0)
}

/// Encodes and decodes, as the network would, counting the bytes.
fn wire<T: Encode + Decode<()>>(msg: &T, count: &mut u64) -> T {
    let b = bincode::encode_to_vec(msg, bincode::config::standard()).expect("encodes");
    *count += b.len() as u64;
    bincode::decode_from_slice(&b, bincode::config::standard()).expect("decodes").0
}

#[derive(Default)]
struct Device {
    time: [Duration; 4],
    sent: u64,
    received: u64,
}

fn timed<T>(acc: &mut Duration, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let out = f();
    *acc += t.elapsed();
    out
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn run(n: u32, degree: u32) {
    let cfg = config(n, degree);
    cfg.validate().expect("a valid configuration");
    let seed = [7u8; 32];
    let mut rng = ChaCha20Rng::seed_from_u64(u64::from(n) * 1000 + u64::from(degree));
    let mut devices: Vec<Device> = (0..n).map(|_| Device::default()).collect();
    let mut clients: Vec<Client> = (0..n)
        .map(|d| {
            let mut entropy = [0u8; 32];
            entropy[..4].copy_from_slice(&d.to_le_bytes());
            Client::new(&cfg, seed, d, entropy).expect("client")
        })
        .collect();
    let mut server_time = [Duration::ZERO; 4];
    let mut server = timed(&mut server_time[0], || Server::new(&cfg, seed).expect("server"));
    for (c, dev) in clients.iter_mut().zip(&mut devices) {
        let msg = timed(&mut dev.time[0], || c.advertise().expect("advertise"));
        let msg = wire(&msg, &mut dev.sent);
        timed(&mut server_time[0], || server.receive_advertise(msg).expect("accepted"));
    }
    let keys = timed(&mut server_time[0], || server.finish_advertise().expect("stage 0"));
    for (d, msg) in keys {
        let dev = &mut devices[d as usize];
        let msg = wire(&msg, &mut dev.received);
        let out = timed(&mut dev.time[1], || clients[d as usize].share_keys(&msg).expect("share"));
        let out = wire(&out, &mut dev.sent);
        timed(&mut server_time[1], || server.receive_shares(out).expect("accepted"));
    }
    let fwd = timed(&mut server_time[1], || server.finish_shares().expect("stage 1"));
    for (d, msg) in fwd {
        let dev = &mut devices[d as usize];
        let input: Vec<f32> = (0..LEN).map(|_| rng.random_range(-0.01f32..0.01)).collect();
        let msg = wire(&msg, &mut dev.received);
        let out = timed(&mut dev.time[2], || clients[d as usize].masked_input(&msg, &input).expect("mask"));
        let out = wire(&out, &mut dev.sent);
        timed(&mut server_time[2], || server.receive_masked_input(out).expect("accepted"));
    }
    let (request, recipients) = timed(&mut server_time[2], || server.finish_masked_inputs().expect("stage 2"));
    for d in recipients {
        let dev = &mut devices[d as usize];
        let msg = wire(&request, &mut dev.received);
        let out = timed(&mut dev.time[3], || clients[d as usize].unmask(&msg).expect("unmask"));
        let out = wire(&out, &mut dev.sent);
        timed(&mut server_time[3], || server.receive_unmask(out).expect("accepted"));
    }
    let agg = timed(&mut server_time[3], || server.finish().expect("sum"));
    assert_eq!(agg.survivors.len(), n as usize);

    let mean = |f: &dyn Fn(&Device) -> f64| devices.iter().map(f).sum::<f64>() / f64::from(n);
    let per_stage: Vec<String> = (0..4).map(|s| format!("{:.2}", mean(&|d| ms(d.time[s])))).collect();
    let total_ms = mean(&|d| ms(d.time.iter().sum()));
    let (sent, received) = (mean(&|d| d.sent as f64), mean(&|d| d.received as f64));

    // Plain: each device sends its f32 delta; the server sums n of them.
    let delta: Vec<f32> = (0..LEN).map(|_| rng.random_range(-0.01f32..0.01)).collect();
    let plain_bytes = bytes(&delta);
    let t = Instant::now();
    let mut sum = vec![0f32; LEN];
    for i in 0..n {
        let w = 1.0 + i as f32 * 1e-6;
        for (s, x) in sum.iter_mut().zip(&delta) {
            *s += w * x;
        }
    }
    std::hint::black_box(&sum);
    let plain_server = t.elapsed();

    println!(
        "| {n} | {degree} | {} | {} | {} | {total_ms:.1} | {sent:.0} | {received:.0} | {plain_bytes} | {:.1} ({}) | {:.1} |",
        cfg.threshold,
        cfg.modulus_bits,
        per_stage.join(" / "),
        ms(server_time.iter().sum()),
        server_time.iter().map(|d| format!("{:.1}", ms(*d))).collect::<Vec<_>>().join(" / "),
        ms(plain_server),
    );
}

fn main() {
    let args: Vec<u32> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    println!(
        "vector length {LEN}, clip {CLIP}, scale {SCALE}: times in ms (wall time of each party's calls, one thread), bytes per device"
    );
    println!(
        "| devices | degree | threshold | ring bits | device ms per stage (0 / 1 / 2 / 3) | device ms total | device sent B | device received B | plain device sent B | server ms total (per stage) | plain server sum ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    match args[..] {
        [n, k] => run(n, k),
        _ => {
            run(100, default_degree(100));
            run(100, 99);
            run(1000, default_degree(1000));
        }
    }
}
