//! Sharded simulation as processes (issue 17): the same seeded experiment gives the same
//! `rounds.csv` in one process (`fedge-sim run`) and as 4 shard processes against a root over
//! QUIC (`fedge-sim shards`); and the Kubernetes contract: shards started exactly as the Indexed
//! Job starts them (one command line, `JOB_COMPLETION_INDEX` and `FEDGE_SHARDS` in the
//! environment), each in its own network namespace reaching the root over a veth pair, one
//! frozen and killed in the middle of a round and started again with the same index.

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fedge_coordinator::certs::{CertDir, Role};
use fedge_core::wire::{Message, OperatorCommand, Status};

const SIM: &str = env!("CARGO_BIN_EXE_fedge-sim");

/// 40 devices, 10 a round, 10% dropouts, a fifth of them stragglers that miss the 5 s virtual
/// deadline: the shards' replays must take every decision the in-process engine takes.
const CONFIG: &str = "devices = 40\nfraction = 0.25\nrounds = 3\nepochs = 1\nbatch_size = 10\nlr = 0.05\n\
model = \"2nn\"\ndataset = \"embedded\"\npartition = \"iid\"\ndropout = 0.1\nclip_norm = 5.0\nseed = 3\nworkers = 1\n\
round_timeout_s = 5.0\n\n[speed]\nstraggler_fraction = 0.2\n";

fn write_config(dir: &Path) -> PathBuf {
    let path = dir.join("sim.toml");
    std::fs::write(&path, CONFIG).unwrap();
    path
}

/// `fedge-sim run` of the config: the reference rows.
fn in_process(config: &Path, dir: &Path) -> (csv::StringRecord, Vec<csv::StringRecord>) {
    let out = dir.join("in-process");
    let run = Command::new(SIM).args(["run", "--config"]).arg(config).arg("--out").arg(&out).output().unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    rows(&out.join("rounds.csv"))
}

fn rows(path: &Path) -> (csv::StringRecord, Vec<csv::StringRecord>) {
    let mut r = csv::Reader::from_path(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let header = r.headers().unwrap().clone();
    (header, r.records().map(Result::unwrap).collect())
}

/// The rows agree: counts, versions, decisions and virtual times exactly; accuracy, losses to
/// float rounding (the shards' means are rounded to f32 before the root averages them).
fn assert_same_rows(header: &csv::StringRecord, want: &[csv::StringRecord], got: &[csv::StringRecord]) {
    assert_close_rows(header, want, got, (1e-5, 1e-5));
}

/// [`assert_same_rows`] with tolerances (relative, at least 1 apart) on accuracy and on losses.
fn assert_close_rows(
    header: &csv::StringRecord,
    want: &[csv::StringRecord],
    got: &[csv::StringRecord],
    (accuracy, losses): (f64, f64),
) {
    assert_eq!(want.len(), got.len(), "rounds");
    for (w, g) in want.iter().zip(got) {
        for ((name, a), b) in header.iter().zip(w).zip(g) {
            match name {
                "accuracy" | "loss" | "train_loss" => {
                    let (a, b): (f64, f64) = (a.parse().unwrap(), b.parse().unwrap());
                    let tolerance = if name == "accuracy" { accuracy } else { losses };
                    let same = (a.is_nan() && b.is_nan()) || (a - b).abs() <= tolerance * a.abs().max(1.0);
                    assert!(same, "round {}: {name} {a} vs {b}", &w[0]);
                }
                _ => assert_eq!(a, b, "round {}: {name}", &w[0]),
            }
        }
    }
}

/// The experiment did what the config asks: devices dropped out or missed the deadline, and
/// the model learned.
fn assert_learned(header: &csv::StringRecord, rows: &[csv::StringRecord]) {
    let column = |name: &str| header.iter().position(|h| h == name).unwrap();
    assert!(rows.iter().map(|r| r[column("failures")].parse::<u64>().unwrap()).sum::<u64>() > 0);
    assert!(rows.last().unwrap()[column("accuracy")].parse::<f64>().unwrap() > 0.6);
}

/// `fedge-sim shards --shards 4` of `config` into `out`: its stdout.
fn four_shards(config: &Path, out: &Path) -> String {
    let run = Command::new(SIM)
        .args(["shards", "--shards", "4", "--config"])
        .arg(config)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout).to_string();
    assert!(run.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&run.stderr));
    stdout
}

#[test]
fn four_shard_processes_give_the_rounds_of_one() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let (header, want) = in_process(&config, dir.path());
    assert_learned(&header, &want);
    let out = dir.path().join("sharded");
    let stdout = four_shards(&config, &out);
    assert!(stdout.contains("4 shards connected"), "{stdout}");
    let (got_header, got) = rows(&out.join("rounds.csv"));
    assert_eq!(header, got_header);
    assert_same_rows(&header, &want, &got);
    // Every shard trained its own devices and nobody else's.
    for i in 0..4 {
        let log = std::fs::read_to_string(out.join(format!("shard-{i}.log"))).unwrap();
        assert!(log.contains(&format!("shard {i} of 4: 10 of 40 devices")), "{log}");
        assert!(log.contains(&format!("shard {i} of 4 done: 3 rounds trained")), "{log}");
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("shards.json")).unwrap()).unwrap();
    assert_eq!(report["shard_peak_rss_mib"].as_array().unwrap().len(), 4);
    assert_eq!(report["round_seconds"].as_array().unwrap().len(), 3);
}

/// Secure aggregation across shards: every device the one-process run sums enters the root's
/// SecAgg+ session itself, as a member of its shard's relay session (the root learns only the
/// sum); devices that drop between stages in one process (10% dropouts) do not enter. The
/// rows are the one-process rows, but for SecAgg's stochastic rounding, which both runs draw
/// independently (steps of `clip / 2^20`: the first round's loss agrees to 1e-6, later rounds
/// train from models that differ that much, measured within 0.3 points of accuracy and 4e-4 of
/// loss over repeated runs).
#[test]
fn secure_shards_enter_each_device_into_the_roots_sum() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sim.toml");
    std::fs::write(&config, CONFIG.replace("[speed]", "secure_aggregation = true\n\n[speed]")).unwrap();
    let (header, want) = in_process(&config, dir.path());
    assert_learned(&header, &want);
    let out = dir.path().join("sharded");
    four_shards(&config, &out);
    let (got_header, got) = rows(&out.join("rounds.csv"));
    assert_eq!(header, got_header);
    assert_close_rows(&header, &want, &got, (0.01, 3e-3));
    let results = header.iter().position(|h| h == "results").unwrap();
    let mut summed = 0;
    for i in 0..4 {
        let log = std::fs::read_to_string(out.join(format!("shard-{i}.log"))).unwrap();
        for line in log.lines().filter(|l| l.contains("members in the root's secure sum")) {
            let words: Vec<&str> = line.split_whitespace().collect();
            // "round R: S of this shard's M members in the root's secure sum": all of them.
            assert_eq!(words[2], words[6], "{line}");
            summed += words[2].parse::<u64>().unwrap();
        }
    }
    let want_results: u64 = want.iter().map(|r| r[results].parse::<u64>().unwrap()).sum();
    assert_eq!(summed, want_results, "every summed device entered the root's sum itself");
    let root = std::fs::read_to_string(out.join("root.log")).unwrap();
    assert!(root.contains("secure session of"), "{root}");
}

/// Local DP shards: every device clips and noises its update (seeded, as in one process)
/// before its shard sums it.
#[test]
fn local_dp_shards_give_the_rounds_of_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("local-dp.toml");
    std::fs::write(&config, CONFIG.replace("clip_norm = 5.0\n", "clip_norm = 1.0\nlocal_epsilon = 30.0\n")).unwrap();
    let (header, want) = in_process(&config, dir.path());
    let out = dir.path().join("sharded");
    four_shards(&config, &out);
    let (_, got) = rows(&out.join("rounds.csv"));
    assert_same_rows(&header, &want, &got);
    // The noise is there: the noised run is not the clean one.
    let clean = dir.path().join("clean.toml");
    std::fs::write(&clean, CONFIG.replace("clip_norm = 5.0\n", "clip_norm = 1.0\n")).unwrap();
    let (_, without) = in_process(&clean, &dir.path().join("clean"));
    let loss = header.iter().position(|h| h == "loss").unwrap();
    assert_ne!(want.last().unwrap()[loss], without.last().unwrap()[loss]);
}

#[test]
fn a_sharded_run_refuses_what_needs_every_update() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("krum.toml");
    std::fs::write(
        &path,
        format!("{CONFIG}\nstrategy = \"krum\"\n").replace("\n[speed]\nstraggler_fraction = 0.2\n", ""),
    )
    .unwrap();
    let run = Command::new(SIM).args(["shard-root", "--shards", "4", "--config"]).arg(&path).output().unwrap();
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("a sharded run: strategy `krum` needs every device's update"), "{err}");
    // Data every process would need and none has: said once, before anything starts.
    let mnist = dir.path().join("mnist.toml");
    std::fs::write(&mnist, CONFIG.replace("dataset = \"embedded\"", "dataset = \"mnist\"")).unwrap();
    let run = Command::new(SIM)
        .args(["shards", "--shards", "2", "--data-dir", "/nonexistent", "--out"])
        .arg(dir.path().join("out"))
        .arg("--config")
        .arg(&mnist)
        .output()
        .unwrap();
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("mnist not found") && err.contains("fedge-sim fetch-data"), "{err}");
    assert!(!dir.path().join("out/root.log").exists(), "nothing was started");
    // Without an index anywhere, a shard says where it looks for one.
    let run = Command::new(SIM)
        .args(["shard", "--root", "127.0.0.1:1", "--ca", "x", "--cert", "x", "--key", "x", "--config"])
        .arg(write_config(dir.path()))
        .env_remove("JOB_COMPLETION_INDEX")
        .output()
        .unwrap();
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("JOB_COMPLETION_INDEX is not set"), "{err}");
}

/// Runs `ip` with `args`; panics with its message if it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("the `ip` command (iproute2)");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// Network namespaces with a veth pair each to this one, removed however the test ends.
struct Namespaces(Vec<String>);

impl Namespaces {
    /// Namespace `i`: `10.231.i.2/24`, reaching this namespace at `10.231.i.1`. `None` where this
    /// machine lets nobody make namespaces (no root, or a container without the capability): the
    /// shards then run in this one and reach the root on loopback, the rest of the contract
    /// (environment, kill, restart) unchanged.
    fn add(&mut self, i: usize) -> Option<String> {
        let tag = format!("{}{i}", std::process::id() % 100_000);
        let (ns, host, peer) = (format!("fedge-shard-{tag}"), format!("fsh{tag}"), format!("fsn{tag}"));
        let made = Command::new("ip").args(["netns", "add", &ns]).output().expect("the `ip` command (iproute2)");
        if !made.status.success() {
            eprintln!(
                "no network namespaces here ({}): the shards run on loopback",
                String::from_utf8_lossy(&made.stderr).trim()
            );
            return None;
        }
        self.0.push(ns.clone());
        ip(&["link", "add", &host, "type", "veth", "peer", "name", &peer]);
        ip(&["link", "set", &peer, "netns", &ns]);
        ip(&["addr", "add", &format!("10.231.{i}.1/24"), "dev", &host]);
        ip(&["link", "set", &host, "up"]);
        ip(&["-n", &ns, "addr", "add", &format!("10.231.{i}.2/24"), "dev", &peer]);
        ip(&["-n", &ns, "link", "set", &peer, "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        Some(ns)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the pair, and with it ours.
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Kills the processes however the test ends.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Shard `i` as the Indexed Job's pod runs it: the same command line for every index, the
/// index and count from the environment, in namespace `ns` (reaching the root at `root`), or
/// in this one on loopback.
fn start_shard(ns: Option<&str>, i: usize, root: &str, config: &Path, fleet: &Path, out: &Path, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let mut command = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, SIM]);
            c
        }
        None => Command::new(SIM),
    };
    command
        .args(["shard", "--root", root, "--server-name", "localhost", "--config"])
        .arg(config)
        .arg("--ca")
        .arg(fleet.join("ca.pem"))
        .arg("--cert")
        .arg(fleet.join("aggregators/shard-{index}.pem"))
        .arg("--key")
        .arg(fleet.join("aggregators/shard-{index}.key"))
        .arg("--out")
        .arg(out)
        .env("JOB_COMPLETION_INDEX", i.to_string())
        .env("FEDGE_SHARDS", "4")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn signal(child: &Child, sig: &str) {
    assert!(Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap().success());
}

#[test]
fn shards_in_their_own_network_namespaces_survive_a_killed_shard() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let (header, want) = in_process(&config, dir.path());
    assert_learned(&header, &want);
    // The fleet: the root's certificate names `localhost` (the name the shards dial with);
    // an aggregator certificate per shard, named by index as the Job's Secret holds them.
    let fleet = dir.path().join("fleet");
    let ca = CertDir::init(&fleet, &["localhost".into()]).unwrap();
    let op = ca.issue(Role::Operator, "test", 1).unwrap();
    for i in 0..4 {
        ca.issue(Role::Aggregator, &format!("shard-{i}"), 1).unwrap();
    }
    let port = UdpSocket::bind("0.0.0.0:0").unwrap().local_addr().unwrap().port();
    let root_toml = Command::new(SIM)
        .args(["shard-root", "--shards", "4", "--listen", &format!("0.0.0.0:{port}"), "--round-timeout-secs", "120"])
        .arg("--config")
        .arg(&config)
        .arg("--certs-dir")
        .arg(&fleet)
        .arg("--state-dir")
        .arg(dir.path().join("root-state"))
        .output()
        .unwrap();
    assert!(root_toml.status.success(), "{}", String::from_utf8_lossy(&root_toml.stderr));
    std::fs::write(dir.path().join("root.toml"), &root_toml.stdout).unwrap();

    let mut namespaces = Namespaces(Vec::new());
    let ns: Vec<Option<String>> = (0..4).map(|i| namespaces.add(i)).collect();
    let root_of = |i: usize| match ns[i] {
        Some(_) => format!("10.231.{i}.1:{port}"),
        None => format!("127.0.0.1:{port}"),
    };
    let mut children = Children(Vec::new());
    let root_log = std::fs::File::create(dir.path().join("root.log")).unwrap();
    children.0.push(
        Command::new(SIM)
            .args(["coordinator", "--config"])
            .arg(dir.path().join("root.toml"))
            .stdout(root_log.try_clone().unwrap())
            .stderr(root_log)
            .spawn()
            .unwrap(),
    );
    let out = dir.path().join("record");
    let log = |i: usize| dir.path().join(format!("shard-{i}.log"));
    // Shard i is `shards.0[i]`.
    let mut shards = Children(Vec::new());
    for (i, ns) in ns.iter().enumerate() {
        shards.0.push(start_shard(ns.as_deref(), i, &root_of(i), &config, &fleet, &out, &log(i)));
    }
    // Kills shard `i` and starts it again as the Job restarts a failed pod: the same index, the
    // same command.
    let restart = |shards: &mut Children, i: usize| {
        let _ = shards.0[i].kill();
        let _ = shards.0[i].wait();
        shards.0[i] = start_shard(ns[i].as_deref(), i, &root_of(i), &config, &fleet, &out, &log(i));
    };

    let rt = tokio::runtime::Runtime::new().unwrap();
    let tls = fedge_net::client_config(&ca.ca_pem(), &op.cert, &op.key).unwrap();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let client = rt.block_on(async {
        let started = Instant::now();
        loop {
            match fedge_net::RequestClient::connect(addr, "localhost", tls.clone()).await {
                Ok(c) => break c,
                Err(e) if started.elapsed() > Duration::from_secs(60) => panic!("the root did not come up: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    let ask = |cmd: OperatorCommand| -> Status {
        match rt.block_on(client.request(&Message::Operator(cmd))).unwrap() {
            Message::Status(s) => s,
            other => panic!("{other:?}"),
        }
    };
    let until = |what: &str, done: &dyn Fn(&Status) -> bool| -> Status {
        let started = Instant::now();
        loop {
            let s = ask(OperatorCommand::Status);
            if done(&s) {
                return s;
            }
            assert!(started.elapsed() < Duration::from_secs(120), "{what}: {s:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let start =
        |rounds| OperatorCommand::StartRounds { rounds, fraction: None, min_train_clients: None, deadline_secs: None };
    until("four shards connect from their namespaces", &|s| s.devices_connected.len() == 4);
    // Round 1 with every shard.
    ask(start(1));
    until("round 1 closes", &|s| s.rounds.len() == 1);
    // Shard 1 freezes, round 2 opens: the other three answer, the root waits for shard 1,
    // which is killed there, mid-round.
    signal(&shards.0[1], "-STOP");
    ask(start(1));
    let s = until("three shards answer round 2", &|s| s.open_round.is_some_and(|o| o.round == 2 && o.reporting == 3));
    assert_eq!(s.rounds.len(), 1);
    restart(&mut shards, 1);
    until("round 2 closes", &|s| s.rounds.len() == 2);
    // The last round: shard 2 freezes, the recorder (shard 0) and shard 3 upload and are killed
    // before it closes. Started again, they get no task: they learn from the root's history
    // that the experiment is over (the recorder writes its last row) and exit.
    signal(&shards.0[2], "-STOP");
    ask(start(1));
    until("three shards answer round 3", &|s| s.open_round.is_some_and(|o| o.round == 3 && o.reporting == 3));
    restart(&mut shards, 0);
    restart(&mut shards, 3);
    std::thread::sleep(Duration::from_millis(500));
    signal(&shards.0[2], "-CONT");
    until("round 3 closes", &|s| s.rounds.len() == 3);
    // Every shard exits 0 once its last round is in (the recorder once it is recorded).
    let started = Instant::now();
    for c in &mut shards.0 {
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                assert!(status.success(), "a shard failed: {status}");
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "a shard did not finish");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let restarted = std::fs::read_to_string(log(1)).unwrap();
    assert!(restarted.contains("shard 1 of 4 done: 2 rounds trained"), "{restarted}");
    assert!(restarted.contains("1 replayed"), "{restarted}");
    // The recorder had uploaded round 3 and was waiting for it to close when it was killed:
    // only its second life finished (shard 3 may have finished before its kill, as a shard does
    // after its last upload, and finished again after its restart).
    let recorder = std::fs::read_to_string(log(0)).unwrap();
    assert_eq!(recorder.matches("shard 0 of 4 done:").count(), 1, "{recorder}");
    let (got_header, got) = rows(&out.join("rounds.csv"));
    assert_eq!(header, got_header);
    assert_same_rows(&header, &want, &got);
}
