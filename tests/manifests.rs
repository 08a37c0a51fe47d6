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
fn check_serving(workload: &Yaml, config_map: &Yaml, service: &Yaml, config: &ServeConfig) -> Vec<(String, String)> {
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
    assert_eq!(volume(workload, "certs")["secret"]["secretName"].as_str(), Some("fedge-fleet"));
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
    check_serving(set, config_map, service, &config);
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
    let mounts = check_serving(deployment, config_map, service, &config);
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
    for file in ["k8s/coordinator.yaml", "k8s/region.yaml"] {
        for doc in documents(file) {
            if let Some(containers) = doc["spec"]["template"]["spec"]["containers"].as_vec() {
                assert!(containers.iter().all(|c| c["image"].as_str() == Some("fedge:latest")), "{file}");
            }
        }
    }
}
