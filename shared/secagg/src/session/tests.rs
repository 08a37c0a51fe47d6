use super::*;
use crate::weighting::{round_config, weighted_input, weighted_mean};

const MS: Duration = Duration::from_millis(1);
const STAGE: Duration = Duration::from_secs(10);

/// `m` devices (peer ids 100, 101, ...) with inputs of `len` values in [-1, 1].
fn setup(m: u32, len: usize) -> (ServerSession, Vec<ClientSession>, Vec<Vec<f32>>) {
    let config = round_config(m, len, 1.0, 4096.0, None, None).unwrap();
    let peers: Vec<u64> = (0..u64::from(m)).map(|i| 100 + i).collect();
    let server = ServerSession::new(&config, [7; 32], peers, Duration::ZERO, STAGE).unwrap();
    let inputs: Vec<Vec<f32>> =
        (0..m).map(|i| (0..len).map(|j| ((i as f32 + 1.0) * (j as f32 + 0.5)).sin()).collect()).collect();
    let clients = inputs.iter().enumerate().map(|(i, v)| ClientSession::new(v.clone(), [i as u8 + 1; 32])).collect();
    (server, clients, inputs)
}

/// Polls every live client once, in order, handing the server what each sends; `gone` says
/// which clients no longer answer.
fn step(server: &mut ServerSession, clients: &mut [ClientSession], now: Duration, gone: &dyn Fn(usize) -> bool) {
    for (i, c) in clients.iter_mut().enumerate() {
        if gone(i) {
            continue;
        }
        let peer = 100 + i as u64;
        let msg = server.poll(peer).unwrap();
        if let Some(out) = c.on(msg).unwrap() {
            let _ = server.handle(now, peer, out);
        }
    }
}

/// Runs the session to its end, devices dropping per `drops[stage]` (indices leaving before
/// that stage's message): the server, the clients and their inputs.
fn run(m: u32, drops: [&[usize]; 4]) -> (ServerSession, Vec<ClientSession>, Vec<Vec<f32>>) {
    let (mut server, mut clients, inputs) = setup(m, 6);
    let mut now = Duration::ZERO;
    for stage in 0..4 {
        let gone = |i: usize| drops[..=stage].iter().any(|d| d.contains(&i));
        step(&mut server, &mut clients, now, &gone);
        if server.outcome().is_some() {
            break;
        }
        // Someone did not answer: the stage closes at its deadline.
        if drops[stage].iter().any(|_| true) {
            now += STAGE;
            server.handle_timeout(now);
        }
        now += MS;
    }
    // Every device learns the end (one gone before unmasking asks once more, summed).
    for (i, c) in clients.iter_mut().enumerate() {
        if let Some(ServerMessage::Finished { summed }) = server.poll(100 + i as u64) {
            c.on(ServerMessage::Finished { summed }).unwrap();
        }
    }
    (server, clients, inputs)
}

fn plain_sum(inputs: &[Vec<f32>], who: &[u32]) -> Vec<f64> {
    let mut sum = vec![0.0; inputs[0].len()];
    for &i in who {
        for (s, &x) in sum.iter_mut().zip(&inputs[i as usize]) {
            *s += f64::from(x);
        }
    }
    sum
}

fn assert_sum(server: &ServerSession, inputs: &[Vec<f32>], survivors: &[u32]) {
    let agg = server.outcome().expect("finished").expect("aggregated");
    assert_eq!(agg.survivors, survivors);
    let got = agg.sum_f32(server.config());
    // Stochastic rounding: each input within one step of 1/scale.
    let tolerance = survivors.len() as f64 / f64::from(server.config().scale);
    for (g, w) in got.iter().zip(plain_sum(inputs, survivors)) {
        assert!((f64::from(*g) - w).abs() <= tolerance + 1e-6, "{g} vs {w}");
    }
}

#[test]
fn everyone_answering_closes_each_stage_at_once() {
    let (server, clients, inputs) = run(10, [&[], &[], &[], &[]]);
    assert_sum(&server, &inputs, &(0..10).collect::<Vec<_>>());
    assert!(clients.iter().all(|c| c.finished() == Some(true)));
}

#[test]
fn devices_dropping_at_each_stage_are_left_out_at_its_deadline() {
    // 10% and 30% of 20 devices drop at each stage in turn.
    for drops in [[&[3usize][..], &[], &[], &[]], [&[], &[5], &[], &[]], [&[], &[], &[7], &[]], [&[], &[], &[], &[9]]] {
        let (server, clients, inputs) = run(20, drops);
        // Dropped before its masked input: not summed; at unmasking: summed all the same.
        let out: Vec<usize> = drops[..3].iter().flat_map(|d| d.iter().copied()).collect();
        let survivors: Vec<u32> = (0..20).filter(|i| !out.contains(&(*i as usize))).collect();
        assert_sum(&server, &inputs, &survivors);
        let summed = clients.iter().filter(|c| c.finished() == Some(true)).count();
        assert_eq!(summed, survivors.len());
    }
    let thirty: [&[usize]; 4] = [&[0, 1], &[2, 3], &[4, 5], &[]];
    let (server, _, inputs) = run(20, thirty);
    assert_sum(&server, &inputs, &(6..20).collect::<Vec<_>>());
}

#[test]
fn below_the_threshold_the_round_fails_asking_for_nothing() {
    // 10 devices of degree 6 (threshold 4): 7 leave before their masked input.
    let (server, clients, _) = run(10, [&[], &[], &[0, 1, 2, 3, 4, 5, 6], &[]]);
    assert!(matches!(server.outcome(), Some(Err(SecAggError::NotEnoughShares { .. }))), "{server:?}");
    assert!(clients.iter().all(|c| c.finished() != Some(true)));
}

#[test]
fn a_peer_speaks_only_for_itself_and_once_a_stage() {
    let (mut server, mut clients, _) = setup(4, 3);
    let msg = clients[1].on(server.poll(101).unwrap()).unwrap().unwrap();
    // Peer 102 sending peer 101's message: refused, nothing counted.
    assert!(matches!(server.handle(MS, 102, msg.clone()), Err(SecAggError::Malformed { device: 2, .. })));
    assert!(server.handle(MS, 999, msg.clone()).is_err());
    server.handle(MS, 101, msg.clone()).unwrap();
    assert!(matches!(server.handle(MS, 101, msg), Err(SecAggError::Duplicate(1))));
    assert_eq!(server.poll(101), Some(ServerMessage::Wait));
    assert!(server.poll(999).is_none());
    // A stage's message out of its stage is refused.
    let other = clients[0].on(server.poll(100).unwrap()).unwrap().unwrap();
    let ClientMessage::Advertise(keys) = other else { panic!() };
    let wrong = ClientMessage::Shares(ShareKeys { device: 0, shares: Vec::new() });
    assert!(matches!(server.handle(MS, 100, wrong), Err(SecAggError::WrongStage { .. })));
    server.handle(MS, 100, ClientMessage::Advertise(keys)).unwrap();
    assert_eq!(server.stage_name(), "advertise");
    assert_eq!(server.poll_timeout(), Some(STAGE));
}

#[test]
fn weighted_inputs_sum_to_the_fedavg_mean() {
    let deltas = [vec![0.2f32, -0.1, 0.05], vec![-0.3, 0.4, 0.0], vec![3.0, 4.0, 0.0]];
    let samples = [10u64, 30, 500];
    let (cap, clip) = (100u64, 1.0f32);
    let inputs: Vec<Vec<f32>> = deltas.iter().zip(samples).map(|(d, n)| weighted_input(d, n, cap, clip)).collect();
    // The third is clipped to norm 1 and weighs the cap.
    assert!((inputs[2][0] - 0.6).abs() < 1e-6 && (inputs[2][3] - 1.0).abs() < 1e-6);
    let config = round_config(3, 4, clip, 1_048_576.0, Some(2), Some(2)).unwrap();
    let peers = vec![1, 2, 3];
    let mut server = ServerSession::new(&config, [1; 32], peers, Duration::ZERO, STAGE).unwrap();
    let mut clients: Vec<ClientSession> =
        inputs.iter().enumerate().map(|(i, v)| ClientSession::new(v.clone(), [i as u8 + 9; 32])).collect();
    for _ in 0..4 {
        for (i, c) in clients.iter_mut().enumerate() {
            if let Some(out) = c.on(server.poll(i as u64 + 1).unwrap()).unwrap() {
                server.handle(MS, i as u64 + 1, out).unwrap();
            }
        }
    }
    let agg = server.outcome().unwrap().unwrap();
    let (mean, n) = weighted_mean(&config, agg, cap).unwrap();
    assert_eq!(n, 10 + 30 + 100);
    let clipped = [0.6f32, 0.8, 0.0];
    for j in 0..3 {
        let want = (10.0 * deltas[0][j] + 30.0 * deltas[1][j] + 100.0 * clipped[j]) / 140.0;
        assert!((mean[j] - want).abs() < 1e-4, "{j}: {} vs {want}", mean[j]);
    }
}
