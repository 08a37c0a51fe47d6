//! Load: many concurrent mutually authenticated device sessions against one
//! `fedge-coordinator serve` process on loopback, then one round in which every device downloads
//! the 2NN, uploads an update and is acknowledged (issue 14's load figure).
//!
//! `cargo bench --profile dev -p fedge-coordinator --bench load [-- DEVICES]` (default 1000). The coordinator
//! is the release binary of this build with its real store (redb, every update made durable
//! before its `Ack`); the devices are one load process (this one), each with its own
//! certificate, QUIC endpoint and connection. Both share the machine's cores.
//!
//! Prints, per phase, the wall time and rate, and the coordinator's resident memory (from
//! `/proc/PID/status`): before any device, with every session open (per session), and its peak
//! over the round. docs/benchmarks.md records the figures.

#![allow(missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use fedge_core::wire::{Capabilities, Message};
use fedge_edge::link::Link;

/// A field of `/proc/PID/status`, in bytes.
fn status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Connects and says Hello, retrying a refused or slow attempt (the listener answers a burst of
/// handshakes with stateless retries and caps the ones in flight); the link and the attempts made.
async fn connect(addr: std::net::SocketAddr, tls: fedge_edge::link::DeviceTls) -> (Link, u32) {
    let caps =
        Capabilities { backend: "flex".into(), memory_mb: 256, charging: true, unmetered: true, num_samples: 600 };
    let mut attempts = 0;
    loop {
        attempts += 1;
        let attempt = async {
            let link = Link::connect(addr, "localhost", &tls).await?;
            link.hello(caps.clone()).await?;
            Ok::<_, fedge_edge::link::ConnectError>(link)
        };
        match tokio::time::timeout(Duration::from_secs(30), attempt).await {
            Ok(Ok(link)) => return (link, attempts),
            _ if attempts < 10 => tokio::time::sleep(Duration::from_millis(200)).await,
            other => panic!("cannot join after {attempts} attempts: {:?}", other.map(|r| r.err())),
        }
    }
}

/// One device's round: its task, the model it names (hash-checked), its update, the `Ack`; or
/// why the update was not acknowledged, and when.
async fn round(link: &Link, i: usize, t0: Instant) -> Result<(Duration, Duration), String> {
    let task = common::task_of(link).await;
    let started = Instant::now();
    let model = common::model(link, task.model_version).await;
    assert_eq!(model.content_hash(), task.model_hash);
    let downloaded = started.elapsed();
    let started = Instant::now();
    match link.request(&Message::TrainResult(common::update(&task, &model, i % 100))).await {
        Ok(Message::Ack { round }) if round == task.round => Ok((downloaded, started.elapsed())),
        other => Err(format!(
            "load-{i:05}: update not acknowledged after {:.1} s (at {:.1} s into the round): {other:?}",
            started.elapsed().as_secs_f64(),
            t0.elapsed().as_secs_f64()
        )),
    }
}

fn percentile(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let n: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(1000);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let t = Instant::now();
        let names: Vec<String> = (0..n).map(|i| format!("load-{i:05}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let fleet = common::Fleet::new(&refs, n);
        // Evaluation on the embedded test split, as a default coordinator does.
        fleet.configure("max_samples_per_device = 1000\n");
        let issue_s = t.elapsed().as_secs_f64();
        let coordinator = fleet.start();
        let pid = coordinator.child.id();
        // Started once it answers one device (which also takes its model, so the baseline
        // includes the encoded v0).
        let first = common::join(fleet.addr, &fleet.ca, &names[0], &coordinator).await;
        let _ = common::model(&first, 0).await;
        first.close().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_base = status_bytes(pid, "VmRSS:");

        // Every session at once.
        let t = Instant::now();
        let mut joins = tokio::task::JoinSet::new();
        for (i, name) in names.iter().enumerate() {
            let tls = common::tls(&fleet.ca, name);
            let addr = fleet.addr;
            joins.spawn(async move { (i, connect(addr, tls).await) });
        }
        let mut links: Vec<Option<Link>> = (0..n).map(|_| None).collect();
        let mut retried = 0;
        while let Some(joined) = joins.join_next().await {
            let (i, (link, attempts)) = joined.unwrap();
            retried += u32::from(attempts > 1);
            links[i] = Some(link);
        }
        let links: Vec<Arc<Link>> = links.into_iter().map(|l| Arc::new(l.unwrap())).collect();
        let handshake_s = t.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_sessions = status_bytes(pid, "VmRSS:");

        // One round of every device's update.
        let t = Instant::now();
        fleet.operator(&["round", "start", "--rounds", "1"]);
        let mut rounds = tokio::task::JoinSet::new();
        for (i, link) in links.iter().enumerate() {
            let link = link.clone();
            rounds.spawn(async move { round(&link, i, t).await });
        }
        let (mut downloads, mut uploads, mut failed) = (Vec::new(), Vec::new(), Vec::new());
        while let Some(done) = rounds.join_next().await {
            match done.unwrap() {
                Ok((d, u)) => {
                    downloads.push(d);
                    uploads.push(u);
                }
                Err(e) => failed.push(e),
            }
        }
        if !failed.is_empty() {
            for e in failed.iter().take(5) {
                eprintln!("{e}");
            }
            let log = coordinator.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("coordinator log, last lines:\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            panic!("{} of {n} updates not acknowledged", failed.len());
        }
        let acked_s = t.elapsed().as_secs_f64();
        common::wait_for_version(&links[0], 1, Duration::from_secs(600), &coordinator).await;
        let round_s = t.elapsed().as_secs_f64();
        let rss_peak = status_bytes(pid, "VmHWM:");
        let rss_after = status_bytes(pid, "VmRSS:");

        println!("{n} devices, one coordinator process (pid {pid}) and this load process on loopback");
        println!("| phase | wall s | rate | note |");
        println!("|---|---|---|---|");
        println!("| issue {n} device certificates | {issue_s:.1} | {:.0}/s | CA files, as `certs issue-device` |", n as f64 / issue_s);
        println!(
            "| {n} sessions open (mTLS handshake + Hello) | {handshake_s:.2} | {:.0} handshakes/s | {retried} devices needed a second attempt |",
            n as f64 / handshake_s
        );
        println!(
            "| round: task, model download, update, Ack for all | {acked_s:.2} | {:.0} updates/s | download p50 {:.0} ms p99 {:.0} ms; upload->Ack p50 {:.0} ms p99 {:.0} ms |",
            n as f64 / acked_s,
            percentile(downloads.clone(), 0.5).as_secs_f64() * 1e3,
            percentile(downloads, 0.99).as_secs_f64() * 1e3,
            percentile(uploads.clone(), 0.5).as_secs_f64() * 1e3,
            percentile(uploads, 0.99).as_secs_f64() * 1e3,
        );
        println!("| round closed (v1 published, evaluated) | {round_s:.2} | | from `round start` |");
        println!(
            "coordinator RSS: {:.1} MiB idle, {:.1} MiB with {n} sessions ({:.1} KiB per session), peak {:.1} MiB, {:.1} MiB after the round",
            mib(rss_base),
            mib(rss_sessions),
            (rss_sessions.saturating_sub(rss_base)) as f64 / 1024.0 / n as f64,
            mib(rss_peak),
            mib(rss_after)
        );
        drop(links);
        coordinator.kill();
    });
}
