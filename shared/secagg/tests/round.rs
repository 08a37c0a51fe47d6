//! Whole rounds in memory: the unmasked sum is exact under dropouts at every stage, for a
//! sparse graph (SecAgg+) and the complete graph (Bonawitz et al. 2017).

mod common;

use std::collections::BTreeSet;

use common::{Scenario, complete, is_shortage, plain_sum, sparse};
use fedge_secagg::{SecAggError, UnmaskRequest};

fn check_exact(s: &Scenario) {
    let out = s.run();
    let agg = out.result.unwrap_or_else(|e| panic!("seed {}: {e}", s.seed));
    let expect: BTreeSet<u32> = (0..s.config.n_devices)
        .filter(|d| !s.drop_after_advertise.contains(d) && !s.drop_after_share.contains(d))
        .collect();
    assert_eq!(agg.survivors, expect.iter().copied().collect::<Vec<_>>(), "seed {}", s.seed);
    assert_eq!(agg.sum, plain_sum(&s.config, &out.inputs, &agg.survivors), "seed {}", s.seed);
}

#[test]
fn exact_sum_with_dropouts_at_each_stage() {
    for (name, config) in [("sparse", sparse()), ("complete", complete())] {
        for stage in 0..3 {
            for fraction in [0.0, 0.1, 0.3] {
                eprintln!("{name}: {fraction} drop after stage {stage}");
                check_exact(&Scenario::new(config.clone(), 11).dropping(stage, fraction));
            }
        }
    }
}

#[test]
fn exact_sum_with_dropouts_at_all_stages_at_once() {
    for config in [sparse(), complete()] {
        let s = Scenario::new(config, 12).dropping(0, 0.1);
        let s = Scenario { seed: 13, ..s }.dropping(1, 0.1);
        let s = Scenario { seed: 14, ..s }.dropping(2, 0.1);
        check_exact(&s);
    }
}

#[test]
fn below_the_threshold_unmasking_fails() {
    // 60% drop after sharing keys: too few holders of some survivor's shares remain, so the
    // server refuses before sending any unmasking request (hostile.rs checks it asks nothing).
    let s = Scenario::new(complete(), 21).dropping(1, 0.6);
    let out = s.run();
    match out.result {
        Err(SecAggError::NotEnoughShares { got, need, .. }) => assert!(got < need),
        other => panic!("expected NotEnoughShares, got {other:?}"),
    }
    // Drops after the request: the server has asked, but gets too few shares back.
    let s = Scenario::new(complete(), 22).dropping(2, 0.6);
    match s.run().result {
        Err(SecAggError::NotEnoughShares { got, need, .. }) => assert!(got < need),
        other => panic!("expected NotEnoughShares, got {other:?}"),
    }
}

#[test]
fn an_honest_device_never_reveals_both_shares_of_one_neighbour() {
    let s = Scenario::new(sparse(), 31);
    let inputs = s.inputs();
    let mut clients = s.clients();
    let mut server = fedge_secagg::Server::new(&s.config, s.round_seed()).unwrap();
    for c in &mut clients {
        server.receive_advertise(c.advertise().unwrap()).unwrap();
    }
    for (d, keys) in server.finish_advertise().unwrap() {
        server.receive_shares(clients[d as usize].share_keys(&keys).unwrap()).unwrap();
    }
    for (d, fwd) in server.finish_shares().unwrap() {
        clients[d as usize].masked_input_quantised(&fwd, &inputs[d as usize]).unwrap();
    }
    let victim = server.graph().neighbours(0)[0];
    // Both in one request.
    let both = UnmaskRequest { survivors: vec![victim], dropped: vec![victim] };
    assert_eq!(clients[0].unmask(&both), Err(SecAggError::BothSharesRequested(victim)));
    assert_eq!(clients[0].unmask(&both), Err(SecAggError::AlreadyUnmasked), "a refused device stays refused");
    // One, then the other in a second request.
    let first = UnmaskRequest { survivors: vec![victim], dropped: vec![] };
    let helper = server.graph().neighbours(victim).iter().copied().find(|&h| h != 0).unwrap() as usize;
    let r = clients[helper].unmask(&first).unwrap();
    assert_eq!(r.self_mask_shares.len(), 1, "it holds the victim's shares and reveals the self-mask one");
    assert!(r.key_shares.is_empty());
    let second = UnmaskRequest { survivors: vec![], dropped: vec![victim] };
    assert_eq!(clients[helper].unmask(&second), Err(SecAggError::AlreadyUnmasked));
}

#[test]
fn a_device_with_corrupted_shares_is_excluded_and_the_rest_sum_exactly() {
    for config in [sparse(), complete()] {
        let mut s = Scenario::new(config, 41);
        let graph = fedge_secagg::Graph::harary(s.config.n_devices, s.config.degree, &s.round_seed());
        let bad = 5;
        let victim = graph.neighbours(bad)[0];
        s.corrupt = Some((bad, victim));
        let out = s.run();
        let agg = out.result.expect("the round survives one bad sharer");
        assert!(!agg.survivors.contains(&bad), "the sharer is excluded");
        assert_eq!(agg.survivors.len(), s.config.n_devices as usize - 1);
        assert_eq!(agg.sum, plain_sum(&s.config, &out.inputs, &agg.survivors));
    }
}

#[test]
fn a_device_with_truncated_shares_is_excluded_by_the_server() {
    let mut s = Scenario::new(sparse(), 42);
    s.truncate = Some(7);
    let out = s.run();
    assert!(!out.u2.contains(&7));
    let agg = out.result.unwrap();
    assert!(!agg.survivors.contains(&7));
    assert_eq!(agg.sum, plain_sum(&s.config, &out.inputs, &agg.survivors));
}

#[test]
fn property_exact_or_a_shortage_over_seeds() {
    // Random stages and fractions: the round either sums its survivors exactly or fails for a
    // shortage of shares, never anything else.
    let (mut ok, mut short) = (0, 0);
    for seed in 100..108u64 {
        let config = if seed % 2 == 0 { sparse() } else { complete() };
        let f = [0.05, 0.15, 0.25, 0.35][(seed % 4) as usize];
        let s = Scenario::new(config, seed).dropping((seed % 3) as usize, f);
        let s = Scenario { seed: seed + 1000, ..s }.dropping(((seed + 1) % 3) as usize, f / 2.0);
        let out = s.run();
        match out.result {
            Ok(agg) => {
                ok += 1;
                assert_eq!(agg.survivors, out.u3.iter().copied().collect::<Vec<_>>(), "seed {seed}");
                assert_eq!(agg.sum, plain_sum(&s.config, &out.inputs, &agg.survivors), "seed {seed}");
            }
            Err(e) => {
                assert!(is_shortage(&e), "seed {seed}: {e}");
                short += 1;
            }
        }
    }
    eprintln!("{ok} exact rounds, {short} shortages");
    assert!(ok >= 4, "{ok} exact rounds, {short} shortages");
}

#[test]
fn float_inputs_round_trip_through_the_mean() {
    let config = complete();
    let s = Scenario::new(config.clone(), 51).dropping(1, 0.1);
    let mut clients = s.clients();
    let mut server = fedge_secagg::Server::new(&config, s.round_seed()).unwrap();
    let input =
        |d: u32| -> Vec<f32> { (0..config.vector_len).map(|i| ((d as f32) * 0.37 + i as f32 * 0.11).sin()).collect() };
    for c in &mut clients {
        server.receive_advertise(c.advertise().unwrap()).unwrap();
    }
    for (d, keys) in server.finish_advertise().unwrap() {
        server.receive_shares(clients[d as usize].share_keys(&keys).unwrap()).unwrap();
    }
    for (d, fwd) in server.finish_shares().unwrap() {
        if !s.drop_after_share.contains(&d) {
            server.receive_masked_input(clients[d as usize].masked_input(&fwd, &input(d)).unwrap()).unwrap();
        }
    }
    let (req, to) = server.finish_masked_inputs().unwrap();
    for d in to {
        server.receive_unmask(clients[d as usize].unmask(&req).unwrap()).unwrap();
    }
    let agg = server.finish().unwrap();
    let mean = agg.mean_f32(&config);
    for (i, got) in mean.iter().enumerate() {
        let want: f32 = agg.survivors.iter().map(|&d| input(d)[i]).sum::<f32>() / agg.survivors.len() as f32;
        assert!((got - want).abs() < 2e-3, "coordinate {i}: {got} vs {want}");
    }
}
