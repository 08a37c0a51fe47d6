//! Peers that misbehave: the server refuses or excludes them, or the round fails cleanly.

mod common;

use common::{Scenario, complete, plain_sum, sparse};
use fedge_secagg::{AdvertiseKeys, Client, MaskedInput, SecAggError, Server, UnmaskRequest, UnmaskResponse, shamir::P};

/// The server's unmasking request and its recipients, or why there is none.
type Requested = Result<(UnmaskRequest, Vec<u32>), SecAggError>;

/// Runs `s` by hand up to the unmasking request, with `edit` applied to each masked input.
fn to_unmask(s: &Scenario, mut edit: impl FnMut(&mut MaskedInput)) -> (Vec<Client>, Server, Requested) {
    let inputs = s.inputs();
    let mut clients = s.clients();
    let mut server = Server::new(&s.config, s.round_seed()).unwrap();
    for c in &mut clients {
        server.receive_advertise(c.advertise().unwrap()).unwrap();
    }
    for (d, keys) in server.finish_advertise().unwrap() {
        server.receive_shares(clients[d as usize].share_keys(&keys).unwrap()).unwrap();
    }
    for (d, fwd) in server.finish_shares().unwrap() {
        if s.drop_after_share.contains(&d) {
            continue;
        }
        let mut msg = clients[d as usize].masked_input_quantised(&fwd, &inputs[d as usize]).unwrap();
        edit(&mut msg);
        let _ = server.receive_masked_input(msg);
    }
    let req = server.finish_masked_inputs();
    (clients, server, req)
}

#[test]
fn below_the_threshold_the_server_asks_for_nothing() {
    // 60% of the complete graph's devices drop before sending masked inputs: 8 remain, t = 10.
    let s = Scenario::new(complete(), 61).dropping(1, 0.6);
    let (_, mut server, req) = to_unmask(&s, |_| {});
    assert!(matches!(req, Err(SecAggError::NotEnoughShares { got: 7, need: 10, .. })), "{req:?}");
    // No request went out, and the server takes no shares afterwards.
    let reply = UnmaskResponse { device: 0, self_mask_shares: vec![], key_shares: vec![] };
    assert!(matches!(server.receive_unmask(reply), Err(SecAggError::WrongStage { .. })));
    assert!(matches!(server.finish(), Err(SecAggError::WrongStage { .. })));
}

#[test]
fn masked_inputs_hide_the_inputs() {
    let s = Scenario::new(sparse(), 62);
    let inputs = s.inputs();
    let mut seen = Vec::new();
    let (_, _, req) = to_unmask(&s, |m| seen.push(m.clone()));
    req.unwrap();
    let mut masked_sum = vec![0u64; s.config.vector_len];
    for m in &seen {
        assert_ne!(m.masked, inputs[m.device as usize]);
        for (a, b) in masked_sum.iter_mut().zip(&m.masked) {
            *a = a.wrapping_add(*b) & s.config.ring_mask();
        }
    }
    let all: Vec<u32> = (0..s.config.n_devices).collect();
    assert_ne!(masked_sum, plain_sum(&s.config, &inputs, &all), "self masks stay until unmasked");
}

#[test]
fn a_malformed_masked_input_excludes_its_sender_only() {
    let s = Scenario::new(complete(), 63);
    let inputs = s.inputs();
    let (mut clients, mut server, req) = to_unmask(&s, |m| {
        if m.device == 3 {
            m.masked.pop();
        }
        if m.device == 4 {
            m.masked[0] = 1 << 40; // outside Z_{2^20}
        }
    });
    let (req, to) = req.unwrap();
    assert!(!req.survivors.contains(&3) && !req.survivors.contains(&4));
    assert!(req.dropped.contains(&3) && req.dropped.contains(&4));
    for d in to {
        server.receive_unmask(clients[d as usize].unmask(&req).unwrap()).unwrap();
    }
    let agg = server.finish().unwrap();
    assert_eq!(agg.survivors.len(), 18);
    assert_eq!(agg.sum, plain_sum(&s.config, &inputs, &agg.survivors));
}

#[test]
fn bad_revealed_shares_are_ignored_while_enough_good_ones_remain() {
    let s = Scenario::new(complete(), 64);
    let inputs = s.inputs();
    let (mut clients, mut server, req) = to_unmask(&s, |_| {});
    let (req, to) = req.unwrap();
    for d in to {
        let mut r = clients[d as usize].unmask(&req).unwrap();
        match d {
            0 => r.self_mask_shares.iter_mut().for_each(|s| s.share.x = 77), // not its point
            1 => r.self_mask_shares.iter_mut().for_each(|s| s.share.y[0] = P), // not a field value
            2 => r.self_mask_shares.iter_mut().for_each(|s| s.share.x = 0),
            _ => {}
        }
        server.receive_unmask(r).unwrap();
    }
    let agg = server.finish().unwrap();
    assert_eq!(agg.sum, plain_sum(&s.config, &inputs, &agg.survivors));
}

#[test]
fn a_lying_revealed_share_is_caught_not_summed() {
    let s = Scenario::new(complete(), 65);
    let (mut clients, mut server, req) = to_unmask(&s, |_| {});
    let (req, to) = req.unwrap();
    for d in to {
        let mut r = clients[d as usize].unmask(&req).unwrap();
        if d == 0 {
            r.self_mask_shares.iter_mut().for_each(|s| s.share.y[1] = (s.share.y[1] + 1) % P);
        }
        server.receive_unmask(r).unwrap();
    }
    // With more than t shares, the extra ones must lie on the first t's polynomial.
    assert!(matches!(server.finish(), Err(SecAggError::Shamir(_))));
}

#[test]
fn the_server_refuses_out_of_turn_and_foreign_messages() {
    let s = Scenario::new(sparse(), 66);
    let mut clients = s.clients();
    let mut server = Server::new(&s.config, s.round_seed()).unwrap();
    let first = clients[0].advertise().unwrap();
    server.receive_advertise(first.clone()).unwrap();
    assert_eq!(server.receive_advertise(first), Err(SecAggError::Duplicate(0)));
    let stranger = AdvertiseKeys { device: 40, mask_pk: [9; 32], enc_pk: [9; 32] };
    assert_eq!(server.receive_advertise(stranger), Err(SecAggError::UnknownDevice(40)));
    let low_order = AdvertiseKeys { device: 1, mask_pk: [0; 32], enc_pk: [9; 32] };
    assert!(matches!(server.receive_advertise(low_order), Err(SecAggError::Malformed { device: 1, .. })));
    assert!(matches!(server.finish_shares(), Err(SecAggError::WrongStage { .. })));
    assert!(matches!(clients[0].advertise(), Err(SecAggError::WrongStage { .. })));
    assert!(matches!(
        clients[1].unmask(&UnmaskRequest { survivors: vec![], dropped: vec![] }),
        Err(SecAggError::WrongStage { .. })
    ));
}

#[test]
fn a_client_refuses_a_server_naming_strangers() {
    let s = Scenario::new(sparse(), 67);
    let mut clients = s.clients();
    let mut server = Server::new(&s.config, s.round_seed()).unwrap();
    let adverts: Vec<AdvertiseKeys> = clients.iter_mut().map(|c| c.advertise().unwrap()).collect();
    let graph = server.graph().clone();
    let stranger = (1..40).find(|&v| !graph.adjacent(0, v)).unwrap();
    let mut keys = fedge_secagg::NeighbourKeys { neighbours: vec![adverts[stranger as usize].clone()] };
    assert_eq!(clients[0].share_keys(&keys), Err(SecAggError::UnknownDevice(stranger)));
    // Too few neighbours to share among: refused rather than sharing below the threshold.
    let mut c = s.clients().remove(0);
    c.advertise().unwrap();
    keys.neighbours = graph.neighbours(0)[..5].iter().map(|&v| adverts[v as usize].clone()).collect();
    assert!(matches!(c.share_keys(&keys), Err(SecAggError::NotEnoughNeighbours { got: 5, need: 11, .. })));
    let _ = server.finish_advertise();
}

#[test]
fn oversized_answers_are_refused() {
    let s = Scenario::new(complete(), 68);
    let (mut clients, mut server, req) = to_unmask(&s, |_| {});
    let (req, to) = req.unwrap();
    let mut r = clients[to[0] as usize].unmask(&req).unwrap();
    let extra = r.self_mask_shares[0].clone();
    r.self_mask_shares.extend(std::iter::repeat_n(extra, 50));
    assert!(matches!(server.receive_unmask(r), Err(SecAggError::Malformed { .. })));
}
