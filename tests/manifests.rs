//! The Kubernetes manifests in `deploy/k8s` and the image in `deploy/Dockerfile`, checked for
//! what would break a deployment without a cluster to run them on: every configuration they
//! carry is one `fedge-coordinator serve` accepts, and the names, ports and paths agree (the
//! Service's UDP port is the one the coordinator listens on, the state volume holds `state_dir`,
//! the Secrets are mounted where the configuration reads certificates, a region's `[upstream]`
//! names the root's Service and port).

use std::path::{Path, PathBuf};

use fedge_coordinator::config::ServeConfig;
use yaml_rust2::{Yaml, YamlLoader};

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(file)
}

/// The documents of a manifest file.
fn documents(file: &str) -> Vec<Yaml> {
    let text = std::fs::read_to_string(deploy(file)).unwrap();
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// The one document of `kind` in `docs`.
fn of_kind<'a>(docs: &'a [Yaml], kind: &str) -> &'a Yaml {
    let mut found = docs.iter().filter(|d| d["kind"].as_str() == Some(kind));
    let doc = found.next().unwrap_or_else(|| panic!("no {kind}"));
    assert!(found.next().is_none(), "more than one {kind}");
    doc
}

fn name(doc: &Yaml) -> &str {
    doc["metadata"]["name"].as_str().unwrap()
}

/// The `coordinator.toml` a ConfigMap carries, as `serve` reads it (checked as `serve` checks).
fn serve_config(config_map: &Yaml) -> ServeConfig {
    let text = config_map["data"]["coordinator.toml"].as_str().expect("coordinator.toml in the ConfigMap");
    let c: ServeConfig = fedge_core::config_file::parse_toml(text).unwrap_or_else(|e| panic!("{e:?}"));
    c.engine().unwrap();
    c.upstream().unwrap();
    c
}

/// The UDP port of a Service.
fn udp_port(service: &Yaml) -> i64 {
    let ports = service["spec"]["ports"].as_vec().unwrap();
    let udp: Vec<_> = ports.iter().filter(|p| p["protocol"].as_str() == Some("UDP")).collect();
    assert_eq!(udp.len(), 1, "one UDP port");
    assert_eq!(udp[0]["port"], udp[0]["targetPort"]);
    udp[0]["port"].as_i64().unwrap()
}

/// The pod template's one container, and the mount path of each volume by name.
fn container(workload: &Yaml) -> (&Yaml, Vec<(String, String)>) {
    let containers = workload["spec"]["template"]["spec"]["containers"].as_vec().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let mounts = c["volumeMounts"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|m| (m["name"].as_str().unwrap().to_string(), m["mountPath"].as_str().unwrap().to_string()))
        .collect();
    (c, mounts)
}

fn mount<'a>(mounts: &'a [(String, String)], volume: &str) -> &'a str {
    &mounts.iter().find(|(n, _)| n == volume).unwrap_or_else(|| panic!("no mount of {volume}")).1
}

/// The pod's volume `volume`.
fn volume<'a>(workload: &'a Yaml, volume: &str) -> &'a Yaml {
    let volumes = workload["spec"]["template"]["spec"]["volumes"].as_vec().unwrap();
    volumes.iter().find(|v| v["name"].as_str() == Some(volume)).unwrap_or_else(|| panic!("no volume {volume}"))
}

/// Checks a coordinator's container: it runs `serve` on the mounted configuration, listens on
/// the Service's UDP port, keeps its state on `state` and reads its certificates from the fleet
/// Secret. Returns the mounts.
fn check_serving(
    workload: &Yaml,
    config_map: &Yaml,
    service: &Yaml,
    config: &ServeConfig,
    fleet_secret: &str,
) -> Vec<(String, String)> {
    let (c, mounts) = container(workload);
    assert_eq!(c["command"][0].as_str(), Some("fedge-coordinator"));
    let args: Vec<&str> = c["args"].as_vec().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert_eq!(args[..2], ["serve", "--config"]);
    assert_eq!(mount(&mounts, "config"), args[2], "the configuration is mounted where serve reads it");
    assert_eq!(volume(workload, "config")["configMap"]["name"].as_str(), Some(name(config_map)));
    let port = udp_port(service);
    assert_eq!(i64::from(config.listen.port()), port, "the Service reaches the QUIC listener");
    assert!(config.listen.ip().is_unspecified(), "listens on every interface of the pod");
    let container_udp = c["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .any(|p| p["containerPort"].as_i64() == Some(port) && p["protocol"].as_str() == Some("UDP"));
    assert!(container_udp, "the container declares its UDP port");
    assert_eq!(service["spec"]["selector"], workload["spec"]["template"]["metadata"]["labels"]);
    assert!(config.state_dir.starts_with(mount(&mounts, "state")), "state_dir is on the state volume");
    assert_eq!(Path::new(mount(&mounts, "certs")), config.certs_dir, "certs_dir is the fleet Secret");
    assert_eq!(volume(workload, "certs")["secret"]["secretName"].as_str(), Some(fleet_secret));
    assert_eq!(workload["spec"]["replicas"].as_i64(), Some(1), "one writer of the state");
    mounts
}

#[test]
fn the_coordinator_runs_as_a_statefulset_with_its_state_on_a_volume_behind_a_udp_service() {
    let docs = documents("k8s/coordinator.yaml");
    let (config_map, service, set) =
        (of_kind(&docs, "ConfigMap"), of_kind(&docs, "Service"), of_kind(&docs, "StatefulSet"));
    let config = serve_config(config_map);
    assert!(config.upstream.is_none());
    check_serving(set, config_map, service, &config, "fedge-fleet");
    assert_eq!(set["spec"]["serviceName"].as_str(), Some(name(service)));
    let claims = set["spec"]["volumeClaimTemplates"].as_vec().unwrap();
    assert_eq!(claims.iter().map(name).collect::<Vec<_>>(), ["state"]);
    assert_eq!(claims[0]["spec"]["accessModes"][0].as_str(), Some("ReadWriteOnce"));
    // The operator page off loopback needs its token: serve refuses to start without one.
    if let Some(addr) = config.metrics_listen {
        fedge_coordinator::web::check_listen(addr, config.page_token.as_deref()).unwrap();
    }
}

#[test]
fn a_region_runs_as_a_deployment_that_reaches_the_root_by_its_service_name() {
    let root_docs = documents("k8s/coordinator.yaml");
    let root_service = of_kind(&root_docs, "Service");
    let docs = documents("k8s/region.yaml");
    let (config_map, service, deployment, claim) = (
        of_kind(&docs, "ConfigMap"),
        of_kind(&docs, "Service"),
        of_kind(&docs, "Deployment"),
        of_kind(&docs, "PersistentVolumeClaim"),
    );
    let config = serve_config(config_map);
    let upstream = config.upstream.clone().expect("a region has an [upstream] table");
    let mounts = check_serving(deployment, config_map, service, &config, "fedge-fleet");
    // The root by its Service's name and UDP port, its certificate naming that Service.
    let (host, port) = upstream.address.rsplit_once(':').unwrap();
    assert_eq!((host, port.parse::<i64>().unwrap()), (name(root_service), udp_port(root_service)));
    assert_eq!(upstream.server_name, name(root_service));
    // The aggregator's certificate from its own Secret, the CA from the fleet's.
    let aggregator = Path::new(mount(&mounts, "aggregator"));
    assert!(upstream.cert.starts_with(aggregator) && upstream.key.starts_with(aggregator));
    assert_eq!(volume(deployment, "aggregator")["secret"]["secretName"].as_str(), Some(name(deployment)));
    assert_eq!(upstream.ca, config.certs_dir.join("ca.pem"));
    // Its state on the claim; Recreate, so two pods never hold the ReadWriteOnce volume.
    assert_eq!(volume(deployment, "state")["persistentVolumeClaim"]["claimName"].as_str(), Some(name(claim)));
    assert_eq!(deployment["spec"]["strategy"]["type"].as_str(), Some("Recreate"));
}

#[test]
fn the_image_builds_and_carries_every_binary_the_manifests_run() {
    let dockerfile = std::fs::read_to_string(deploy("Dockerfile")).unwrap();
    for binary in ["fedge-coordinator", "fedge-edge", "fedge-sim"] {
        assert!(dockerfile.contains(&format!("-p {binary}")), "{binary} is built");
        assert!(dockerfile.contains(&format!("/usr/local/bin/{binary}")), "{binary} is copied");
    }
    assert!(dockerfile.contains("EXPOSE 4433/udp"));
    for file in ["k8s/coordinator.yaml", "k8s/region.yaml", "k8s/shards.yaml"] {
        for doc in documents(file) {
            if let Some(containers) = doc["spec"]["template"]["spec"]["containers"].as_vec() {
                assert!(containers.iter().all(|c| c["image"].as_str() == Some("fedge:latest")), "{file}");
            }
        }
    }
}

/// The container's arguments.
fn args(workload: &Yaml) -> Vec<&str> {
    container(workload).0["args"].as_vec().unwrap().iter().map(|a| a.as_str().unwrap()).collect()
}

/// The value after `flag` in `args`.
fn flag<'a>(args: &[&'a str], flag: &str) -> &'a str {
    let i = args.iter().position(|a| *a == flag).unwrap_or_else(|| panic!("no {flag}"));
    args[i + 1]
}

#[test]
fn a_sharded_simulation_runs_as_an_indexed_job_against_its_own_root() {
    let docs = documents("k8s/shards.yaml");
    let (config_map, service, root, job) =
        (of_kind(&docs, "ConfigMap"), of_kind(&docs, "Service"), of_kind(&docs, "StatefulSet"), of_kind(&docs, "Job"));
    let config = serve_config(config_map);
    let root_mounts = check_serving(root, config_map, service, &config, "fedge-sim-fleet");
    // The simulation, and the root's configuration exactly as `fedge-sim shard-root` makes it
    // from it: the root's model version 0 is the simulation's initial model, its training
    // settings and strategy are the simulation's.
    let sim_text = config_map["data"]["sim.toml"].as_str().expect("sim.toml in the ConfigMap");
    let sim: fedge_sim::config::SimConfig = fedge_core::config_file::parse_toml(sim_text).unwrap();
    sim.validate().unwrap();
    let shards = job["spec"]["completions"].as_i64().unwrap();
    let place = fedge_sim::shard::RootPlace {
        listen: &config.listen.to_string(),
        certs_dir: &config.certs_dir,
        state_dir: &config.state_dir,
        round_timeout_secs: config.round_timeout_secs,
    };
    let expected = fedge_sim::shard::root_config(&sim, shards as u32, &place).unwrap();
    assert_eq!(config_map["data"]["coordinator.toml"].as_str().unwrap(), expected);
    // Every shard runs at once, one per index; a failed one is started again with its index.
    assert_eq!(job["spec"]["completionMode"].as_str(), Some("Indexed"));
    assert_eq!(job["spec"]["parallelism"].as_i64(), Some(shards));
    assert_eq!(job["spec"]["template"]["spec"]["restartPolicy"].as_str(), Some("OnFailure"));
    let (shard, mounts) = container(job);
    assert_eq!(shard["command"][0].as_str(), Some("fedge-sim"));
    let env = shard["env"].as_vec().unwrap();
    let count = env.iter().find(|e| e["name"].as_str() == Some("FEDGE_SHARDS")).expect("FEDGE_SHARDS");
    assert_eq!(count["value"].as_str(), Some(shards.to_string().as_str()), "FEDGE_SHARDS is the completions");
    let a = args(job);
    assert_eq!(a[0], "shard");
    assert!(!a.contains(&"--shard") && !a.contains(&"--shards"), "the index and count come from the environment");
    assert_eq!(mount(&mounts, "config"), flag(&a, "--config"));
    assert_eq!(volume(job, "config")["configMap"]["name"].as_str(), Some(name(config_map)));
    // The root by its Service's name and UDP port, its certificate naming that Service.
    let (host, port) = flag(&a, "--root").rsplit_once(':').unwrap();
    assert_eq!((host, port.parse::<i64>().unwrap()), (name(service), udp_port(service)));
    assert_eq!(flag(&a, "--server-name"), name(service));
    assert_eq!(config.min_train_clients as i64, shards, "the root waits for every shard");
    // Each pod's own aggregator certificate from the shards' Secret, by index.
    let certs = Path::new(mount(&mounts, "shard-certs"));
    for f in ["--ca", "--cert", "--key"] {
        assert!(Path::new(flag(&a, f)).starts_with(certs), "{f}");
    }
    assert!(flag(&a, "--cert").contains("{index}") && flag(&a, "--key").contains("{index}"));
    assert_eq!(volume(job, "shard-certs")["secret"]["secretName"].as_str(), Some("fedge-shards"));
    // Shard 0's record on a volume every pod may mount; the data where both read it.
    assert_eq!(mount(&mounts, "record"), flag(&a, "--out"));
    let record = volume(job, "record")["persistentVolumeClaim"]["claimName"].as_str().unwrap();
    let claim = docs.iter().find(|d| d["kind"].as_str() == Some("PersistentVolumeClaim") && name(d) == record).unwrap();
    assert_eq!(claim["spec"]["accessModes"][0].as_str(), Some("ReadWriteMany"));
    assert_eq!(Path::new(mount(&mounts, "data")), sim.data_dir);
    assert_eq!(Path::new(mount(&root_mounts, "data")), config.data_dir);
}
