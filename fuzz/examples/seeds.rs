//! Writes the seed corpora (`corpus/<target>/`): one real instance of each message kind and
//! record, small IDX files, and strategy tables. `cargo run --manifest-path fuzz/Cargo.toml
//! --example seeds` from the repository root.

use std::path::Path;
use std::sync::Arc;

use fedge_core::codec;
use fedge_core::dataset::idx::{self, IdxArray};
use fedge_core::quant::QuantizedModel;
use fedge_core::registry::{BlobFormat, ModelRecord, ModelRole, Promotion};
use fedge_core::wire::{
    ErrorCode, InferRequest, Message, OperatorCommand, TrainConfig, TrainResult, TrainTask,
};
use fedge_core::{ModelParams, ParamLayout, TensorSpec};

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let layout = Arc::new(
        ParamLayout::new(vec![
            TensorSpec { name: "fc.weight".into(), shape: vec![3, 2] },
            TensorSpec { name: "fc.bias".into(), shape: vec![2] },
        ])
        .unwrap(),
    );
    let params = ModelParams::new(layout, vec![0.5, -1.0, 2.0, 0.0, 1e-3, -7.5, 0.25, 1.0]).unwrap();
    let hash = params.content_hash();
    let task = TrainTask { round: 3, model_version: 2, model_hash: hash, config: TrainConfig::sgd(1, 10, 0.05), secure: None };
    let result =
        TrainResult { round: 3, model_version: 2, num_samples: 600, train_loss: 0.3, delta: params.clone(), clipped: false };
    let messages = [
        ("train_task", Message::TrainTask(task)),
        ("train_result", Message::TrainResult(result)),
        ("error", Message::Error { code: ErrorCode::Unavailable, message: "busy".into() }),
        ("model", Message::Model { version: 2, hash, params: params.clone() }),
        ("chunk", Message::ModelChunk { version: 2, hash, total_len: 10, offset: 4, bytes: vec![1, 2, 3] }),
        ("infer", Message::InferRequest(InferRequest { rows: 2, cols: 2, pixels: vec![0, 255, 7, 9] })),
        ("task_request", Message::TaskRequest { running: Some(4) }),
        ("model_request", Message::ModelRequest { version: Some(2) }),
        ("no_task", Message::NoTask { retry_after_ms: 50, model_version: 2, deployed: None }),
        ("status", Message::Operator(OperatorCommand::Status)),
        ("ping", Message::Ping { nonce: 7 }),
        ("ack", Message::Ack { round: 3 }),
    ];
    for (name, m) in &messages {
        write(&root.join("message"), name, &codec::encode(m));
    }
    let blob = codec::encode_value(&QuantizedModel::quantize(&params));
    let record = ModelRecord {
        parent: Some(2),
        round: 3,
        accuracy: Some(0.9),
        ..ModelRecord::of_blob(5, ModelRole::Student, "mlp", BlobFormat::Int8, 8, &blob)
    };
    write(&root.join("record"), "record", &codec::encode_value(&record));
    write(&root.join("record"), "quantized", &blob);
    let promotion = Promotion { sequence: 1_764_000_000_000, version: 5, signature: vec![7; 64] };
    write(&root.join("record"), "promotion", &codec::encode_value(&promotion));

    let mut plain = Vec::new();
    idx::write(&mut plain, &IdxArray { dims: vec![2, 3, 3], data: (0..18).collect() }).unwrap();
    write(&root.join("idx"), "images", &plain);
    let mut labels = Vec::new();
    idx::write(&mut labels, &IdxArray { dims: vec![4], data: vec![1, 7, 0, 9] }).unwrap();
    write(&root.join("idx"), "labels", &labels);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &plain).unwrap();
    write(&root.join("idx"), "images_gz", &gz.finish().unwrap());

    for (name, text) in [
        ("fedavg", "strategy = \"fedavg\"\n"),
        ("trimmed", "strategy = \"trimmed-mean\"\n[strategy_options]\ntrim_fraction = 0.2\n"),
        ("krum", "strategy = \"multi-krum\"\n[strategy_options]\nbyzantine = 2\nkrum_select = 5\n"),
        ("fedadam", "strategy = \"fedadam\"\n[strategy_options]\nserver_lr = 0.1\nbeta1 = 0.9\nbeta2 = 0.99\ntau = 1e-3\n"),
        ("clip", "strategy = \"centered-clip\"\n[strategy_options]\nclip_radius = nan\nclip_iters = 4294967295\n"),
    ] {
        write(&root.join("config"), name, text.as_bytes());
    }

    // PNG: a 28x28 digit-like image, a larger dark-on-light one (cropped and centred), a blank.
    for (name, w, h, ink) in [("mnist", 28u32, 28u32, true), ("photo", 60, 45, false), ("blank", 8, 8, true)] {
        let img = image::GrayImage::from_fn(w, h, |x, y| {
            let stroke = name != "blank" && x.abs_diff(w / 2) < 3 && y > h / 5 && y < 4 * h / 5;
            image::Luma([if stroke == ink { 255 } else { 0 }])
        });
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
        write(&root.join("png"), name, &png);
    }

    // Certificates: a real fleet's CA, device and operator certificates (DER) and its CRL (PEM,
    // one revoked serial).
    let dir = tempfile::tempdir().unwrap();
    let ca = fedge_coordinator::certs::CertDir::init(dir.path(), &["localhost".into()]).unwrap();
    let device = ca.issue(fedge_coordinator::certs::Role::Device, "phone-1", 1).unwrap();
    let operator = ca.issue(fedge_coordinator::certs::Role::Operator, "admin", 1).unwrap();
    ca.revoke(fedge_coordinator::certs::Role::Device, "phone-1").unwrap();
    for (name, path) in [("device", &device.cert), ("operator", &operator.cert), ("ca", &ca.ca_pem())] {
        let pem = std::fs::read(path).unwrap();
        let (_, der) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        write(&root.join("certs"), name, &der.contents);
    }
    write(&root.join("certs"), "crl", &std::fs::read(ca.crl_pem()).unwrap());

    // Whole configuration files: the shipped simulator configs and a full coordinator.toml.
    let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../simulations/configs");
    for entry in std::fs::read_dir(configs).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        write(&root.join("config_file"), &name, &std::fs::read(&path).unwrap());
    }
    let serve = toml::to_string(&fedge_coordinator::config::ServeConfig::default()).unwrap();
    write(&root.join("config_file"), "coordinator", serve.as_bytes());
    let edge = toml::to_string(&fedge_edge::config::EdgeConfig::default()).unwrap();
    write(&root.join("config_file"), "edge", edge.as_bytes());
}
