//! Model broadcast over the real transport beside raw quinn bulk throughput of the same bytes.
//!
//! `cargo bench -p fedge-coordinator --bench broadcast [-- CLIENTS]` (default 100). One
//! coordinator endpoint on 127.0.0.1; CLIENTS mutually authenticated clients, all at once:
//! - `fedge`: each sends `ModelRequest` and reads the `Model` message (the coordinator's real
//!   request path: the model encoded once per version, framed, sent; the client decodes and
//!   hash-checks);
//! - `fedge chunks`: the path edge clients use: `ModelChunkRequest`s of 1 MiB, reassembled,
//!   decoded and hash-checked (in memory here; the device also appends to a `.part` file);
//! - `raw quinn`: each opens a stream and the server writes the same number of bytes from one
//!   prepared buffer, the client reads them to the end; no codec, no hashing.
//!
//! Prints a table; docs/benchmarks.md records the ratio.

#![allow(missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use fedge_coordinator::certs::{CertDir, Role};
use fedge_coordinator::listener::Listener;
use fedge_coordinator::server::Coordinator;
use fedge_core::wire::{Capabilities, Hello, Message, PROTOCOL_VERSION};
use fedge_core::{ModelParams, ParamLayout, TensorSpec};
use fedge_engine::EngineConfig;

const CNN_PARAMS: usize = 1_663_370;

async fn clients(ca: &CertDir, addr: std::net::SocketAddr, n: usize, prefix: &str) -> Vec<fedge_net::RequestClient> {
    let mut out = Vec::new();
    for i in 0..n {
        let issued = ca.issue(Role::Device, &format!("{prefix}-{i}"), 1).unwrap();
        let config = fedge_net::client_config(&ca.ca_pem(), &issued.cert, &issued.key).unwrap();
        out.push(fedge_net::RequestClient::connect(addr, "localhost", config).await.unwrap());
    }
    out
}

fn main() {
    let n: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(100);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertDir::init(dir.path(), &["localhost".into()]).unwrap();
        let layout =
            Arc::new(ParamLayout::new(vec![TensorSpec { name: "w".into(), shape: vec![CNN_PARAMS] }]).unwrap());
        let model = ModelParams::new(layout, (0..CNN_PARAMS).map(|i| (i % 977) as f32 * 1e-3).collect()).unwrap();
        let bytes_per_client = fedge_core::codec::encode(&Message::Model {
            version: 0,
            hash: model.content_hash(),
            params: model.clone(),
        })
        .len();

        // fedge: the coordinator's real model-request path.
        let coordinator = Coordinator::new(EngineConfig::default(), model.clone()).unwrap();
        let listener = Listener::bind("127.0.0.1:0".parse().unwrap(), &ca).unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(coordinator.serve(listener));
        let fleet = clients(&ca, addr, n, "f").await;
        let caps =
            Capabilities { backend: "flex".into(), memory_mb: 1, charging: true, unmetered: true, num_samples: 1 };
        for c in &fleet {
            c.request(&Message::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                capabilities: caps.clone(),
                purpose: Default::default(),
            }))
            .await
            .unwrap();
        }
        let fleet = Arc::new(fleet);
        let t = Instant::now();
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let fleet = fleet.clone();
                tokio::spawn(async move {
                    match fleet[i].request(&Message::ModelRequest { version: None }).await.unwrap() {
                        Message::Model { hash, params, .. } => assert_eq!(params.content_hash(), hash),
                        other => panic!("{other:?}"),
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let fedge_secs = t.elapsed().as_secs_f64();

        // The same clients again, fetching in resumable 1 MiB chunks as edge clients do.
        let t = Instant::now();
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let fleet = fleet.clone();
                tokio::spawn(async move {
                    let mut bytes = Vec::new();
                    loop {
                        let ask =
                            Message::ModelChunkRequest { version: 0, offset: bytes.len() as u64, max_len: 1 << 20 };
                        match fleet[i].request(&ask).await.unwrap() {
                            Message::ModelChunk { total_len, bytes: chunk, .. } => {
                                bytes.extend_from_slice(&chunk);
                                if bytes.len() as u64 == total_len {
                                    break;
                                }
                            }
                            other => panic!("{other:?}"),
                        }
                    }
                    match fedge_core::codec::decode(&bytes).unwrap() {
                        Message::Model { hash, params, .. } => assert_eq!(params.content_hash(), hash),
                        other => panic!("{other:?}"),
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let chunked_secs = t.elapsed().as_secs_f64();
        server.abort();

        // Raw quinn: same TLS, same number of bytes, one prepared buffer, no codec.
        let certs = ca.server();
        let config = fedge_net::server_config(&ca.ca_pem(), &certs.cert, &certs.key, None).unwrap();
        let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
        let raw_addr = endpoint.local_addr().unwrap();
        let payload = Arc::new(vec![7u8; bytes_per_client]);
        let server = tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let payload = payload.clone();
                tokio::spawn(async move {
                    let conn = incoming.await.unwrap();
                    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        let _ = recv.read_to_end(16).await;
                        send.write_all(&payload).await.unwrap();
                        let _ = send.finish();
                    }
                });
            }
        });
        let raw = Arc::new(clients(&ca, raw_addr, n, "r").await);
        let t = Instant::now();
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let raw = raw.clone();
                tokio::spawn(async move {
                    let (mut send, mut recv) = raw[i].connection.open_bi().await.unwrap();
                    send.write_all(b"go").await.unwrap();
                    let _ = send.finish();
                    recv.read_to_end(usize::MAX).await.unwrap().len()
                })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap(), bytes_per_client);
        }
        let raw_secs = t.elapsed().as_secs_f64();
        server.abort();
        tokio::time::sleep(Duration::from_millis(10)).await;

        let total = (bytes_per_client * n) as f64;
        println!("broadcast of a CNN-sized model ({bytes_per_client} bytes) to {n} clients on loopback");
        println!("{:<12} {:>10} {:>12} {:>8}", "path", "seconds", "MB/s", "ratio");
        println!("{:<12} {:>10.3} {:>12.1} {:>8.2}", "raw quinn", raw_secs, total / raw_secs / 1e6, 1.0);
        println!(
            "{:<12} {:>10.3} {:>12.1} {:>8.2}",
            "fedge",
            fedge_secs,
            total / fedge_secs / 1e6,
            raw_secs / fedge_secs
        );
        println!(
            "{:<12} {:>10.3} {:>12.1} {:>8.2}",
            "fedge chunks",
            chunked_secs,
            total / chunked_secs / 1e6,
            raw_secs / chunked_secs
        );
    });
}
