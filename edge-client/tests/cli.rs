//! `fedge-edge predict` as a user runs it: a signed student installed in a state folder,
//! images as raw bytes and PNG, alone or under a policy whose coordinator is unreachable.

use std::path::Path;
use std::process::Command;

use fedge_core::codec;
use fedge_core::dataset::embedded;
use fedge_core::quant::QuantizedModel;
use fedge_core::registry::{BlobFormat, ModelRecord, ModelRole};
use fedge_learn::{BackendKind, ModelKind, Trainer};
use fedge_net::ModelKey;
use ring::signature::KeyPair;

fn edge(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fedge-edge")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// Installs a signed, lightly trained MLP student as version 9 under `dir/state`; writes the
/// public key to `dir/model-signing.pub`.
fn install_student(dir: &Path) {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    let hex: String = pair.public_key().as_ref().iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(dir.join("model-signing.pub"), hex).unwrap();
    let data = embedded::mnist_subset().unwrap();
    let mut t = Trainer::new(ModelKind::Mlp, 10, BackendKind::Flex).unwrap();
    let params = t.train_fresh(1, &data.train, 2000, &fedge_core::wire::TrainConfig::sgd(1, 20, 0.1)).unwrap().params;
    let blob = codec::encode_value(&QuantizedModel::quantize(&params));
    let mut record = ModelRecord {
        parent: Some(8),
        round: 8,
        ..ModelRecord::of_blob(9, ModelRole::Student, "mlp", BlobFormat::Int8, params.numel() as u64, &blob)
    };
    record.signature = pair.sign(&record.signing_payload()).as_ref().to_vec();
    let key = ModelKey::read(&dir.join("model-signing.pub")).unwrap();
    fedge_edge::deploy::install_verified(&dir.join("state/deployed"), &record, &blob, &key).unwrap();
}

#[test]
fn predict_answers_raw_and_png_and_stays_local_when_the_coordinator_is_away() {
    let dir = tempfile::tempdir().unwrap();
    install_student(dir.path());
    let test = embedded::mnist_subset().unwrap().test;
    let raw = dir.path().join("digit.raw");
    std::fs::write(&raw, test.image(0)).unwrap();
    let (state, key) = (dir.path().join("state"), dir.path().join("model-signing.pub"));
    let (state, key) = (state.to_str().unwrap(), key.to_str().unwrap());

    let (ok, out, err) =
        edge(&["predict", "--state-dir", state, "--model-key", key, "--raw", raw.to_str().unwrap(), "--json"]);
    assert!(ok, "{err}");
    let a: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((a["model_version"].as_u64(), a["answered_by"].as_str()), (Some(9), Some("local")), "{out}");
    let class = a["class"].clone();

    // The same image as a PNG of another size, dark on light: laid out as MNIST, same answer.
    let digit = image::GrayImage::from_raw(28, 28, test.image(0).to_vec()).unwrap();
    let mut page = image::imageops::resize(&digit, 84, 84, image::imageops::FilterType::Triangle);
    image::imageops::invert(&mut page);
    let png = dir.path().join("digit.png");
    page.save(&png).unwrap();
    let (ok, out, err) =
        edge(&["predict", "--state-dir", state, "--model-key", key, "--png", png.to_str().unwrap(), "--json"]);
    assert!(ok, "{err}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["class"], class);

    // Under cloud-first with nobody listening: the local answer, flagged unverified, exit 0.
    let free = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let toml = dir.path().join("edge.toml");
    std::fs::write(
        &toml,
        format!(
            "coordinator = \"{free}\"\nstate_dir = {state:?}\nmodel_key = {key:?}\n[inference]\npolicy = \"cloud-first\"\ncalibration_examples = 200\n"
        ),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let (ok, out, err) =
        edge(&["predict", "--config", toml.to_str().unwrap(), "--raw", raw.to_str().unwrap(), "--json"]);
    assert!(ok, "{err}");
    let a: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((a["answered_by"].as_str(), a["verified"].as_bool()), (Some("local"), Some(false)), "{out}");
    assert_eq!((a["fallback"].as_str(), &a["class"]), (Some("offline"), &class));
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    let (ok, out, _) = edge(&["predict", "--config", toml.to_str().unwrap(), "--raw", raw.to_str().unwrap()]);
    assert!(ok && out.contains("unverified: offline"), "{out}");

    // Bad input: one clear line, exit 1.
    std::fs::write(&raw, [0u8; 100]).unwrap();
    let (ok, _, err) = edge(&["predict", "--state-dir", state, "--model-key", key, "--raw", raw.to_str().unwrap()]);
    assert!(!ok && err.contains("100 bytes; a 28x28 image is 784"), "{err}");
    let (ok, _, err) = edge(&["predict", "--state-dir", state, "--model-key", key]);
    assert!(!ok && err.contains("give an image"), "{err}");
}

/// The variables `gpu_cache` sets.
const GPU_CACHE_VARS: [&str; 4] = [
    "MESA_SHADER_CACHE_DIR",
    "__GL_SHADER_DISK_CACHE",
    "__GL_SHADER_DISK_CACHE_PATH",
    "__GL_SHADER_DISK_CACHE_SKIP_CLEANUP",
];

/// `fedge-edge gpu-cache` for a state folder under `dir`, started with none of the drivers'
/// cache variables but `set`: success, stdout, stderr.
fn gpu_cache(dir: &Path, set: &[(&str, &Path)]) -> (bool, String, String) {
    let config = dir.join("edge.toml");
    std::fs::write(&config, format!("state_dir = {:?}\n", dir.join("state").display().to_string())).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fedge-edge"));
    cmd.args(["gpu-cache", "--config"]).arg(&config);
    for var in GPU_CACHE_VARS {
        cmd.env_remove(var);
    }
    cmd.env_remove(fedge_edge::gpu_cache::RESTARTED);
    cmd.envs(set.iter().copied());
    let out = cmd.output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn the_gpu_shader_caches_move_into_the_state_folder_by_one_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("state/gpu-cache");
    let c = cache.display();
    // The line comes from the process after exec: the one started had none of the variables.
    let (ok, out, err) = gpu_cache(dir.path(), &[]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), format!("GPU shader caches: Mesa's in {c}, NVIDIA's in {c}"), "{err}");
    assert_eq!(err.matches("starting again with the GPU drivers' shader caches").count(), 1, "{err}");
    assert!(cache.is_dir());
    // A folder the operator chose is kept; the variables still missing cost one restart.
    let mesa = dir.path().join("operators-cache");
    let (ok, out, err) = gpu_cache(dir.path(), &[("MESA_SHADER_CACHE_DIR", &mesa)]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), format!("GPU shader caches: Mesa's in {}, NVIDIA's in {c}", mesa.display()), "{err}");
    assert_eq!(err.matches("starting again").count(), 1, "{err}");
    // All set: no restart.
    let set: Vec<(&str, &Path)> = GPU_CACHE_VARS.iter().map(|v| (*v, mesa.as_path())).collect();
    let (ok, out, err) = gpu_cache(dir.path(), &set);
    assert!(ok, "{err}");
    assert!(out.contains(&format!("Mesa's in {}", mesa.display())), "{out}");
    assert!(!err.contains("starting again"), "{err}");
    // Restarted already and the variables still missing (something strips them): an error,
    // not a loop of restarts.
    let (ok, _, err) = gpu_cache(dir.path(), &[(fedge_edge::gpu_cache::RESTARTED, Path::new("1"))]);
    assert!(!ok);
    assert!(err.contains("still unset after a restart") && !err.contains("starting again"), "{err}");
    // A state folder that cannot be made is a one-line error.
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, b"").unwrap();
    std::fs::write(dir.path().join("edge.toml"), format!("state_dir = {:?}\n", blocker.display().to_string())).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fedge-edge"))
        .args(["gpu-cache", "--config"])
        .arg(dir.path().join("edge.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot keep the GPU shader caches"));
}
