//! A crash loop (issue 14): three devices train eight rounds while the `fedge-coordinator
//! serve` process is killed with SIGKILL six times at seeded points, each time right after an
//! update is acknowledged (and a seeded 0-40 ms later), at least two of them 0-2 ms after the
//! last update of a round, so that the kill lands in the round's close (the restart then says
//! "resumed round r with 3 of 3 updates") or just after it. After each kill it is
//! started again on the same state folder and the devices reconnect.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::{Fleet, model, update};
use fedge_core::params::ContentHash;
use fedge_core::wire::Message;
use fedge_edge::transport::Link;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

const ROUNDS: u64 = 8;
const KILLS: usize = 6;
/// The kill points' seed; `FEDGE_CRASH_SEED` picks another (to look for a bad interleaving).
const SEED: u64 = 14;

async fn join_all(fleet: &Fleet, names: &[&str], coordinator: &common::Coordinator) -> Vec<Link> {
    let mut links = Vec::new();
    for name in names {
        links.push(fleet.join(name, coordinator).await);
    }
    links
}

/// What the devices were told, compared with what the coordinator recorded. Fails if:
/// an acknowledged update is lost by a kill (its round then either never closes, or the
/// device is given the task again and acknowledged twice, or `round list` reports fewer
/// devices than were acknowledged, or the final model misses its step); an update is counted
/// twice (the final model moves too far); a version is published twice under different models
/// (a task names a version with another hash than before, or than the store keeps); versions
/// do not strictly increase with the rounds; or a kill point is never reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_sigkills_over_eight_rounds_lose_no_acknowledged_update() {
    let names = ["dev-0", "dev-1", "dev-2"];
    let fleet = Fleet::new(&names, 3);
    let mut config = std::fs::read_to_string(&fleet.config).unwrap();
    config.push_str("model = \"mlp\"\n");
    std::fs::write(&fleet.config, config).unwrap();

    // Kill after the k-th acknowledged update overall (1..=24): two at the end of a round,
    // the rest anywhere.
    let seed = std::env::var("FEDGE_CRASH_SEED").map_or(SEED, |s| s.parse().unwrap());
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let total = ROUNDS as usize * names.len();
    let mut kill_at = BTreeSet::new();
    while kill_at.len() < 2 {
        kill_at.insert(names.len() * rng.random_range(1..=ROUNDS as usize));
    }
    while kill_at.len() < KILLS {
        kill_at.insert(rng.random_range(1..=total));
    }

    let started = Instant::now();
    let mut coordinator = fleet.start();
    let mut links = join_all(&fleet, &names, &coordinator).await;
    fleet.operator(&["round", "start", "--rounds", &ROUNDS.to_string()]);
    let v0 = model(&links[0], 0).await;

    let mut acked: BTreeMap<u64, BTreeSet<usize>> = BTreeMap::new();
    let mut told: BTreeMap<u64, ContentHash> = BTreeMap::new();
    let mut acks = 0;
    let mut kills = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    'train: loop {
        assert!(Instant::now() < deadline, "v{ROUNDS} never came; acked {acked:?}\n{}", coordinator.log());
        for i in 0..names.len() {
            let task = match links[i].request(&Message::TaskRequest { running: None }).await.unwrap() {
                Message::TrainTask(task) => task,
                Message::NoTask { model_version, .. } if model_version == ROUNDS => break 'train,
                Message::NoTask { .. } => continue,
                other => panic!("unexpected {other:?}"),
            };
            if let Some(hash) = told.insert(task.model_version, task.model_hash) {
                assert_eq!(hash, task.model_hash, "v{} named two models", task.model_version);
            }
            assert_eq!(task.model_version + 1, task.round, "round {} trains v{}", task.round, task.model_version);
            match links[i].request(&Message::TrainResult(update(&task, &v0, i))).await.unwrap() {
                Message::Ack { round } => {
                    assert_eq!(round, task.round);
                    assert!(acked.entry(round).or_default().insert(i), "dev-{i} acknowledged twice in round {round}");
                    acks += 1;
                }
                other => panic!("dev-{i}'s update for round {}: {other:?}\n{}", task.round, coordinator.log()),
            }
            if kill_at.contains(&acks) {
                // After a round's last update, at once (0-2 ms): its close is under way.
                let most = if acks % names.len() == 0 { 2 } else { 40 };
                let wait = Duration::from_millis(rng.random_range(0..=most));
                tokio::time::sleep(wait).await;
                coordinator.kill();
                kills.push((acks, task.round, wait));
                drop(links);
                coordinator = fleet.start();
                links = join_all(&fleet, &names, &coordinator).await;
                kill_at.remove(&acks);
                continue 'train;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    assert_eq!(kills.len(), KILLS, "kill points never reached: {kill_at:?}");

    // Every round closed with the three acknowledged updates, versions one per round.
    let rounds: serde_json::Value = serde_json::from_str(&fleet.operator(&["round", "list", "--json"])).unwrap();
    let recorded: BTreeMap<u64, (u64, u64)> = rounds
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let n = |k: &str| r[k].as_u64().unwrap();
            (n("round"), (n("model_version"), n("devices_reporting")))
        })
        .collect();
    assert_eq!(recorded.keys().copied().collect::<Vec<_>>(), (1..=ROUNDS).collect::<Vec<_>>(), "{rounds}");
    let mut last_version = 0;
    for (round, (version, reporting)) in &recorded {
        assert!(*version > last_version, "round {round}: v{version} after v{last_version}");
        last_version = *version;
        assert_eq!(
            *reporting,
            acked[round].len() as u64,
            "round {round}: {reporting} reporting, devices saw {:?}",
            acked[round]
        );
        assert_eq!(acked[round].len(), names.len(), "round {round}");
    }
    // Each round moved every weight by the same weighted mean: eight of them, no more, no less.
    let last = model(&links[0], ROUNDS).await;
    let step = (10.0 * 0.001 + 20.0 * 0.002 + 30.0 * 0.003) / 60.0;
    for (a, b) in last.data().iter().zip(v0.data()) {
        assert!((*a as f64 - (*b as f64 + ROUNDS as f64 * step)).abs() < 1e-5, "{a} vs {b} + {ROUNDS} x {step}");
    }
    // Every life appends to the same log.
    let log = coordinator.log();
    let resumed: Vec<&str> = log.lines().filter_map(|l| l.find("resumed round").map(|at| &l[at..])).collect();
    drop(links);
    coordinator.kill();

    // The store: versions strictly increase and each names the model the devices were told.
    let store = fedge_coordinator::store::Store::open(&fleet.state).unwrap();
    let models = store.models().unwrap();
    assert!(models.windows(2).all(|w| w[0].0 < w[1].0), "{models:?}");
    let stored: BTreeMap<u64, ContentHash> = models.into_iter().collect();
    assert_eq!(stored.len(), ROUNDS as usize + 1, "v0..v{ROUNDS}");
    for (version, hash) in &told {
        assert_eq!(stored.get(version), Some(hash), "v{version}");
    }
    assert_eq!(stored.get(&ROUNDS), Some(&last.content_hash()));
    eprintln!(
        "FIGURE crash loop (seed {seed}): {ROUNDS} rounds, kills after acks (ack #, round, wait) {kills:?}; \
         restarts: {resumed:?}; took {took:.2?}"
    );
}
