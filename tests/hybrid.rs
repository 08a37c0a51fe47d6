//! Hybrid inference end to end: a real coordinator answering with a trained teacher over QUIC
//! with mutual TLS, a device running a signed int8 student from its state folder. The policies
//! here; the device's local inference server in `hybrid/server.rs`.

mod routing;
mod server;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use fedge_coordinator::certs::CertDir;
use fedge_coordinator::inference::{InferenceConfig, Teacher};
use fedge_coordinator::listener::Listener;
use fedge_coordinator::server::Coordinator;
use fedge_coordinator::service::BurnTeacher;
use fedge_core::ModelParams;
use fedge_core::codec;
use fedge_core::dataset::{Dataset, embedded};
use fedge_core::escalation::PolicyKind;
use fedge_core::quant::QuantizedModel;
use fedge_core::registry::{BlobFormat, ModelRecord, ModelRole};
use fedge_core::wire::{Capabilities, ErrorCode, InferRequest, Message, SessionPurpose, TrainConfig};
use fedge_edge::cloud::{Cloud, CloudTarget};
use fedge_edge::hybrid::{CalibrationSet, HybridConfig, HybridPredictor, Request, Source};
use fedge_edge::link::{DeviceTls, Link};
use fedge_engine::EngineConfig;
use fedge_learn::{BackendKind, ModelKind, Predictor, Trainer};
use fedge_net::ModelKey;
use fedge_tests::harness;

/// The embedded test split, a 2NN teacher and two weaker MLP students (trained once).
struct Models {
    test: Dataset,
    teacher: ModelParams,
    students: [ModelParams; 2],
}

fn models() -> &'static Models {
    static M: OnceLock<Models> = OnceLock::new();
    M.get_or_init(|| {
        let data = embedded::mnist_subset().unwrap();
        let train = |kind, n: usize, seed| {
            let mut t = Trainer::new(kind, 10, BackendKind::Flex).unwrap();
            t.train_fresh(seed, &data.train, n, &TrainConfig::sgd(1, 20, 0.1)).unwrap().params
        };
        Models {
            teacher: train(ModelKind::TwoNn, 4000, 1),
            students: [train(ModelKind::Mlp, 300, 2), train(ModelKind::Mlp, 600, 3)],
            test: data.test,
        }
    })
}

/// A fleet: CA, one device certificate, the model key.
struct Fleet {
    dir: tempfile::TempDir,
    ca: CertDir,
    key: ModelKey,
}

fn fleet() -> Fleet {
    let (dir, ca) = harness::fleet();
    harness::issue_devices(&ca, &["dev-a"]);
    let key = ModelKey::read(&ca.model_public_key_path()).unwrap();
    Fleet { dir, ca, key }
}

impl Fleet {
    fn tls(&self) -> DeviceTls {
        harness::device_tls(&self.ca, "dev-a")
    }

    /// Signs student `params` as registry `version` and installs it on the device.
    fn deploy(&self, state: &Path, version: u64, params: &ModelParams) {
        let blob = codec::encode_value(&QuantizedModel::quantize(params));
        let mut record = ModelRecord {
            parent: Some(0),
            ..ModelRecord::of_blob(version, ModelRole::Student, "mlp", BlobFormat::Int8, params.numel() as u64, &blob)
        };
        self.ca.model_signer().unwrap().sign(&mut record).unwrap();
        fedge_edge::deploy::install_verified(&state.join("deployed"), &record, &blob, &self.key).unwrap();
    }

    /// A device predictor over `state` under `policy`, escalating to `addr`.
    fn predictor(
        &self,
        state: &Path,
        addr: SocketAddr,
        policy: PolicyKind,
        rate: f64,
        timeout_ms: u64,
    ) -> HybridPredictor {
        let config =
            HybridConfig { policy, target_rate: rate, cloud_timeout_ms: timeout_ms, ..HybridConfig::default() };
        let set = CalibrationSet::sample(&models().test, 1000, 5);
        let target = CloudTarget { addr, server_name: "localhost".into(), tls: self.tls() };
        let cloud = Cloud::connect(target, Duration::from_millis(timeout_ms));
        HybridPredictor::new(config, state.to_path_buf(), self.key.clone(), set, cloud).unwrap()
    }
}

/// A coordinator whose global model is the teacher, answering inference with `teacher`.
fn coordinator(fleet: &Fleet, config: InferenceConfig, teacher: Box<dyn Teacher>) -> (Arc<Coordinator>, SocketAddr) {
    let c = Coordinator::new(EngineConfig::default(), models().teacher.clone()).unwrap();
    assert!(c.set_inference(config, teacher));
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap(), &fleet.ca).unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(c.clone().serve(listener));
    (c, addr)
}

fn burn_teacher() -> Box<dyn Teacher> {
    Box::new(BurnTeacher::new(ModelKind::TwoNn, 10, (28, 28)))
}

fn answered(c: &Coordinator) -> u64 {
    c.inference_counts().unwrap().answered.load(std::sync::atomic::Ordering::Relaxed)
}

fn request(i: usize, private: bool) -> Request {
    Request { pixels: models().test.image(i).to_vec(), private, max_cost: None }
}

async fn online(p: &HybridPredictor) {
    assert!(p.cloud().wait_online(Duration::from_secs(20)).await, "the inference session opens");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cascade_escalates_the_unsure_beats_local_and_never_sends_private_inputs() {
    let f = fleet();
    let (c, addr) =
        coordinator(&f, InferenceConfig { rate_per_sec: 1e4, burst: 1e4, ..Default::default() }, burn_teacher());
    let state = f.dir.path().join("edge");
    f.deploy(&state, 1, &models().students[0]);
    let p = f.predictor(&state, addr, PolicyKind::Cascade, 0.2, 5000);
    online(&p).await;
    let n = 300;
    let (mut local_ok, mut cascade_ok, mut escalated) = (0, 0, 0);
    for i in 0..n {
        let a = p.predict(request(i, false)).await.unwrap();
        let label = models().test.labels[i] as usize;
        assert!(a.verified && a.fallback.is_none(), "{a:?}");
        assert_eq!(a.escalated, a.answered_by == Source::Cloud);
        local_ok += usize::from(a.local.unwrap().class == label);
        cascade_ok += usize::from(a.class == label);
        escalated += usize::from(a.escalated);
    }
    let rate = escalated as f64 / n as f64;
    assert!((0.12..=0.28).contains(&rate), "escalation rate {rate} for a 20% target");
    assert!(cascade_ok >= local_ok, "cascade {cascade_ok} < local {local_ok} of {n}");
    assert!(cascade_ok > local_ok, "a much better teacher fixes some of the unsure answers");
    assert_eq!(answered(&c), escalated as u64, "the coordinator answered every escalation");
    let prom = c.metrics().encode();
    assert!(prom.contains(&format!("fedge_inference_answered_total {escalated}")), "{prom}");
    assert!(prom.contains("fedge_inference_batch_size_count") && prom.contains("fedge_inference_latency_seconds_sum"));
    let m = p.metrics().snapshot();
    assert_eq!((m["escalations"].as_u64(), m["compared"].as_u64()), (Some(escalated as u64), Some(escalated as u64)));
    assert!(m["local_ms"]["p50"].as_f64().unwrap() > 0.0 && m["cloud_ms"]["n"].as_u64() == Some(escalated as u64));
    assert!(p.metrics().encode().contains("fedge_edge_inference_escalations_total"));

    // Private inputs never leave the device, even under cloud-first.
    let cloud_first = f.predictor(&state, addr, PolicyKind::CloudFirst, 0.2, 5000);
    online(&cloud_first).await;
    let before = answered(&c);
    for i in 0..20 {
        let a = cloud_first.predict(request(i, true)).await.unwrap();
        assert_eq!(
            (a.answered_by, a.escalated, a.verified, a.fallback),
            (Source::Local, false, false, Some("private"))
        );
    }
    assert_eq!(answered(&c), before, "no private input reached the coordinator");
    let a = cloud_first.predict(request(0, false)).await.unwrap();
    assert_eq!((a.answered_by, a.verified), (Source::Cloud, true));
    assert_eq!(answered(&c), before + 1);
}

/// A real teacher that answers only once the gate opens.
struct Gated {
    inner: BurnTeacher,
    gate: Arc<(Mutex<bool>, Condvar)>,
}

impl Teacher for Gated {
    fn input_shape(&self) -> (usize, usize) {
        self.inner.input_shape()
    }
    fn answer(&mut self, version: u64, params: &ModelParams, images: &[&[u8]]) -> Result<Vec<Vec<f32>>, String> {
        let (open, cv) = &*self.gate;
        let mut o = open.lock().unwrap();
        while !*o {
            o = cv.wait(o).unwrap();
        }
        drop(o);
        self.inner.answer(version, params, images)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speculative_answers_at_once_and_delivers_the_correction_when_the_cloud_answers() {
    let f = fleet();
    let gate = Arc::new((Mutex::new(false), Condvar::new()));
    let teacher = Box::new(Gated { inner: BurnTeacher::new(ModelKind::TwoNn, 10, (28, 28)), gate: gate.clone() });
    let (c, addr) = coordinator(&f, InferenceConfig::default(), teacher);
    let state = f.dir.path().join("edge");
    let m = models();
    f.deploy(&state, 1, &m.students[0]);
    // An image the two models disagree on.
    let t = Predictor::new(ModelKind::TwoNn, &m.teacher, BackendKind::Flex).unwrap();
    let s = fedge_edge::predict::LocalModel::load(&state, &f.key).unwrap();
    let i = (0..m.test.len())
        .find(|&i| t.predict(m.test.image(i), 28, 28).class != s.classify(m.test.image(i)).unwrap().class)
        .expect("a weak student disagrees with the teacher somewhere");
    let teacher_class = t.predict(m.test.image(i), 28, 28).class;

    // Target 100%: every request is unsure, so every one is also sent.
    let p = f.predictor(&state, addr, PolicyKind::Speculative, 1.0, 30_000);
    online(&p).await;
    // Were the answer to wait for the (gated) teacher, this would time out rather than hang.
    let mut a = tokio::time::timeout(Duration::from_secs(20), p.predict(request(i, false)))
        .await
        .expect("the speculative answer does not wait for the cloud")
        .unwrap();
    assert_eq!((a.answered_by, a.escalated, a.verified, a.correction_pending), (Source::Local, true, false, true));
    let mut rx = a.correction.take().unwrap();
    assert!(rx.try_recv().is_err(), "the answer came back while the teacher had not answered");
    assert_eq!(answered(&c), 0);

    // Meanwhile a cloud-first request with a short timeout gets the local answer, unverified.
    let impatient = f.predictor(&state, addr, PolicyKind::CloudFirst, 0.1, 300);
    online(&impatient).await;
    let b = tokio::time::timeout(Duration::from_secs(20), impatient.predict(request(i, false))).await.unwrap().unwrap();
    assert_eq!((b.answered_by, b.verified, b.fallback), (Source::Local, false, Some("timeout")));

    *gate.0.lock().unwrap() = true;
    gate.1.notify_all();
    let correction = tokio::time::timeout(Duration::from_secs(30), rx).await.unwrap().unwrap().unwrap();
    assert_eq!((correction.id, correction.class, correction.differs), (a.id, teacher_class, true));
    assert!(correction.latency_ms >= a.latency_ms);
    assert_eq!(p.metrics().snapshot()["agreement_rate"].as_f64(), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_rate_limited_or_refused_the_device_still_answers_flagged_unverified() {
    let f = fleet();
    let state = f.dir.path().join("edge");
    // No model yet and nobody to ask: a clear error, not a hang.
    let free = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let nobody = f.predictor(&state, free, PolicyKind::CloudFirst, 0.1, 500);
    let e = nobody.predict(request(0, false)).await.unwrap_err();
    assert!(e.to_string().contains("no verified deployed model"), "{e}");

    f.deploy(&state, 1, &models().students[0]);
    for policy in [PolicyKind::CloudFirst, PolicyKind::Cascade, PolicyKind::Speculative] {
        let p = f.predictor(&state, free, policy, 1.0, 500);
        let started = std::time::Instant::now();
        for i in 0..5 {
            let a = p.predict(request(i, false)).await.unwrap();
            assert_eq!((a.answered_by, a.verified, a.fallback), (Source::Local, false, Some("offline")), "{policy}");
            assert!(a.correction.is_none());
        }
        assert!(started.elapsed() < Duration::from_secs(5), "offline answers do not wait for the network");
        assert_eq!(p.metrics().snapshot()["fallbacks"]["offline"].as_u64(), Some(5));
    }

    let slow = InferenceConfig { rate_per_sec: 0.1, burst: 3.0, ..Default::default() };
    let (c, addr) = coordinator(&f, slow, burn_teacher());
    // On the wire: wrong sizes and training requests on an inference session are refused;
    // inference sessions are not devices available for rounds.
    let link = Link::connect(addr, "localhost", &f.tls()).await.unwrap();
    let caps = Capabilities { backend: "flex".into(), memory_mb: 0, charging: false, unmetered: false, num_samples: 0 };
    link.hello_for(caps, SessionPurpose::Inference).await.unwrap();
    let bad = Message::InferRequest(InferRequest { rows: 28, cols: 28, pixels: vec![0; 783] });
    match link.request(&bad).await.unwrap() {
        Message::Error { code, message } => assert_eq!(code, ErrorCode::InvalidInput, "{message}"),
        other => panic!("{other:?}"),
    }
    match link.request(&Message::TaskRequest { running: None }).await.unwrap() {
        Message::Error { code, .. } => assert_eq!(code, ErrorCode::Unauthorized),
        other => panic!("{other:?}"),
    }
    assert!(matches!(link.request(&Message::Ping { nonce: 3 }).await.unwrap(), Message::Pong { nonce: 3 }));
    // Over its rate (the bad request took a token): the device is told so and answers locally.
    let p = f.predictor(&state, addr, PolicyKind::CloudFirst, 0.1, 5000);
    online(&p).await;
    let got: Vec<_> = [0, 1, 2].iter().map(|&i| request(i, false)).collect();
    let mut fallbacks = Vec::new();
    for r in got {
        fallbacks.push(p.predict(r).await.unwrap().fallback);
    }
    assert_eq!(fallbacks, vec![None, None, Some("rate-limited")]);

    assert_eq!(c.connected(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_threshold_is_recalibrated_per_version_and_hits_its_rate_on_held_out_images() {
    let f = fleet();
    let state = f.dir.path().join("edge");
    let m = models();
    f.deploy(&state, 1, &m.students[0]);
    let config = HybridConfig { target_rate: 0.1, ..HybridConfig::default() };
    // Calibrate on the first half of the test split, measure on the second.
    let half = m.test.len() / 2;
    let set = CalibrationSet::from_images((0..half).map(|i| m.test.image(i).to_vec()).collect());
    let p = HybridPredictor::new(config.clone(), state.clone(), f.key.clone(), set, Cloud::offline()).unwrap();
    let rate_on_rest = |p: &HybridPredictor| {
        let model = fedge_edge::predict::LocalModel::load(&state, &f.key).unwrap();
        let t = p.calibration().unwrap().threshold;
        let n = (half..m.test.len())
            .filter(|&i| config.confidence.score(&model.classify(m.test.image(i)).unwrap().probabilities) < t)
            .count();
        n as f64 / (m.test.len() - half) as f64
    };
    let first = p.calibration().unwrap();
    assert_eq!(first.model_version, 1);
    assert!((rate_on_rest(&p) - 0.1).abs() < 0.04, "{}", rate_on_rest(&p));
    assert_eq!(p.refresh().unwrap(), None, "nothing changed");

    f.deploy(&state, 2, &m.students[1]);
    let second = p.refresh().unwrap().expect("a new version is calibrated");
    assert_eq!((second.model_version, p.calibration().unwrap().model_version), (2, 2));
    assert_ne!(second.threshold, first.threshold);
    assert!((rate_on_rest(&p) - 0.1).abs() < 0.04, "{}", rate_on_rest(&p));
}
