//! Local training and evaluation: the one training step every path uses.
//!
//! A [`Trainer`] owns one model instance on one device and is reused task after task: the
//! simulator gives each worker thread one, never one per virtual device. Training is plain
//! minibatch SGD on cross-entropy, as in McMahan et al. 2017, or with FedProx's proximal term
//! `mu/2 * ||w - w_start||^2` added (Li et al. 2020) when the task sets
//! [`TrainConfig::proximal_mu`]: every step is then `w - lr * (grad + mu * (w - w_start))`.

use std::sync::Arc;

use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::{Device, Tensor, TensorData};
use fedge_core::dataset::Dataset;
use fedge_core::wire::TrainConfig;
use fedge_core::{ModelParams, ParamLayout};
use rand::seq::SliceRandom;

use crate::backend::{BackendError, BackendKind};
use crate::batch;
use crate::convert::{self, ConvertError};
use crate::fast::FastNet;
use crate::model::{Model, ModelKind};

/// What local training produced.
#[derive(Debug, Clone)]
pub struct TrainOutput {
    /// The trained weights.
    pub params: ModelParams,
    /// Mean cross-entropy over the last epoch's minibatches.
    pub mean_loss: f32,
    /// SGD steps taken.
    pub steps: usize,
}

/// Accuracy and loss on a dataset.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct EvalMetrics {
    /// Fraction classified correctly.
    pub accuracy: f64,
    /// Mean cross-entropy.
    pub loss: f64,
    /// Examples evaluated.
    pub examples: usize,
}

/// One model instance on one device, reused across tasks. On [`BackendKind::Cpu`] training and
/// evaluation go through the fused kernels ([`FastNet`]), single-threaded unless
/// [`Trainer::set_threads`] says otherwise; the burn model still initialises and distils.
pub struct Trainer {
    kind: ModelKind,
    device: Device,
    model: Option<Model>,
    layout: Arc<ParamLayout>,
    backend: BackendKind,
    fast: Option<FastNet>,
    /// Pad short batches whatever the backend (`None`: on wgpu only).
    pad_batches: Option<bool>,
}

impl Trainer {
    /// A trainer for `kind` on `backend`.
    pub fn new(kind: ModelKind, num_classes: usize, backend: BackendKind) -> Result<Self, BackendError> {
        let device = backend.device()?.autodiff();
        let model = Model::init(kind, num_classes, &device);
        let layout = convert::layout_of(&model).expect("a fresh model converts");
        let fast = match backend {
            // The LSTMs have no kernel mapping: on `cpu` they train on burn-flex.
            BackendKind::Cpu if kind.is_text() => None,
            BackendKind::Cpu => Some(
                FastNet::new(kind, num_classes, layout.clone(), fedge_kernels::Threads::One)
                    .expect("every model kind has a fast CPU mapping"),
            ),
            BackendKind::Flex | BackendKind::Wgpu => None,
        };
        Ok(Self { kind, device, model: Some(model), layout, backend, fast, pad_batches: None })
    }

    /// How many threads each training and evaluation step may use on the fast CPU path
    /// (`Threads::One` by default: a simulator runs one trainer per core; a device with one
    /// trainer gives it every core). No effect on burn backends.
    pub fn set_threads(&mut self, threads: fedge_kernels::Threads) {
        if let Some(fast) = &mut self.fast {
            fast.set_threads(threads);
        }
    }

    /// How the fast CPU path's convolutions compute (default Winograd where it applies; the
    /// results agree to float rounding): an A/B switch for benchmarks. No effect on burn
    /// backends.
    pub fn set_conv_algorithm(&mut self, algorithm: fedge_kernels::ConvAlgorithm) {
        if let Some(fast) = &mut self.fast {
            fast.set_conv_algorithm(algorithm);
        }
    }

    /// Fresh initial parameters, reproducible for a given `seed` and the same on every backend
    /// (made on the CPU: a GPU's random numbers are its own).
    pub fn initial_params(&mut self, seed: u64) -> ModelParams {
        Model::with_seeded(self.kind, self.num_classes(), &Device::flex(), seed, |m| {
            convert::params_of(m).expect("a fresh model converts")
        })
    }

    /// A fresh model (`initial_params(seed)`) trained on the first `examples` examples of
    /// `data`, batches drawn with `seed`: a centralised baseline (`fedge-edge train`) and a
    /// fixture for tests.
    pub fn train_fresh(
        &mut self,
        seed: u64,
        data: &Dataset,
        examples: usize,
        config: &TrainConfig,
    ) -> Result<TrainOutput, ConvertError> {
        let start = self.initial_params(seed);
        let indices: Vec<usize> = (0..examples.min(data.len())).collect();
        self.train(&start, data, &indices, config, &mut fedge_core::rng::derive_rng(seed, &[]))
    }

    fn num_classes(&self) -> usize {
        let last = self.layout.specs().last().expect("models have tensors");
        last.shape[0]
    }

    /// The (autodiff) device this trainer computes on.
    pub(crate) fn device(&self) -> &Device {
        &self.device
    }

    pub(crate) fn take_model(&mut self) -> Model {
        self.model.take().expect("trainer holds its model between tasks")
    }

    pub(crate) fn put_model(&mut self, model: Model) {
        self.model = Some(model);
    }

    pub(crate) fn reset_model(&mut self) {
        self.model = Some(Model::init(self.kind, self.num_classes(), &self.device));
    }

    /// The parameter layout of this trainer's model.
    pub fn layout(&self) -> &Arc<ParamLayout> {
        &self.layout
    }

    /// The backend it computes on.
    pub fn backend(&self) -> BackendKind {
        self.backend
    }

    /// The architecture.
    pub fn kind(&self) -> ModelKind {
        self.kind
    }

    /// Trains from `start` on examples `indices` of `data`: `config.epochs` passes of minibatch
    /// SGD, shuffling each epoch with `rng`, with the proximal term towards `start` when
    /// `config.proximal_mu` is set and not 0 (the caller checks it is finite and not negative).
    /// Clipping and noise are the caller's business.
    pub fn train<R: rand::Rng + ?Sized>(
        &mut self,
        start: &ModelParams,
        data: &Dataset,
        indices: &[usize],
        config: &TrainConfig,
        rng: &mut R,
    ) -> Result<TrainOutput, ConvertError> {
        if let Some(fast) = &mut self.fast {
            return fast.train(start, data, indices, config, rng);
        }
        let learning_rate = config.learning_rate as f64;
        let model = self.model.take().expect("trainer holds its model between tasks");
        let model = match convert::load_params(model, start) {
            Ok(m) => m,
            Err(e) => {
                self.model = Some(Model::init(self.kind, self.num_classes(), &self.device));
                return Err(e);
            }
        };
        let mut optim = SgdConfig::new().init();
        let loss_fn = CrossEntropyLossConfig::new().init(&self.device);
        // FedProx: the start's tensors, flat and constant, for the term mu/2 * ||w - start||^2.
        let proximal = proximal_mu(config).map(|mu| {
            let anchor: Vec<Tensor<1>> = start
                .tensors()
                .map(|(_, v)| Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), &self.device))
                .collect();
            (mu, anchor)
        });
        let mut model = Some(model);
        let size = (config.batch_size as usize).max(1);
        let fixed = self.fixed_shapes();
        let (steps, mean_loss) = minibatches(indices, config, rng, |chunk| {
            let m = model.take().expect("the model is put back after every step");
            let idx = if fixed { batch::padded(chunk, size) } else { chunk.to_vec() };
            let logits = batch::forward(&m, data, &idx, &self.device);
            let y = batch::labels(data, &idx, &self.device);
            let mut loss = match idx.len() > chunk.len() {
                true => batch::masked_cross_entropy(logits, y, chunk.len()),
                false => loss_fn.forward(logits, y),
            };
            let value = loss.clone().into_scalar::<f32>();
            if let Some((mu, anchor)) = &proximal {
                let mut term = ProximalTerm { anchor, index: 0, sum: None };
                m.visit(&mut term);
                if let Some(sum) = term.sum {
                    loss = loss + sum.mul_scalar(mu / 2.0);
                }
            }
            let grads = GradientsParams::from_grads(loss.backward(), &m);
            model = Some(optim.step(learning_rate, m, grads));
            Ok::<f32, ConvertError>(value)
        })?;
        let model = model.expect("the model is put back after every step");
        let params = convert::params_of(&model)?;
        self.model = Some(model);
        Ok(TrainOutput { params, mean_loss, steps })
    }

    /// Accuracy and mean loss of `params` on all of `data`, in batches of `batch_size` (the fast
    /// CPU path uses its own chunks of 64, which bound its column buffers).
    pub fn evaluate(
        &mut self,
        params: &ModelParams,
        data: &Dataset,
        batch_size: usize,
    ) -> Result<EvalMetrics, ConvertError> {
        if let Some(fast) = &mut self.fast {
            return fast.evaluate(params, data);
        }
        let model = self.model.take().expect("trainer holds its model between tasks");
        let model = match convert::load_params(model, params) {
            Ok(m) => m,
            Err(e) => {
                self.model = Some(Model::init(self.kind, self.num_classes(), &self.device));
                return Err(e);
            }
        };
        let metrics = evaluate_batches(&model.valid(), data, batch_size, self.fixed_shapes());
        self.model = Some(model);
        Ok(metrics)
    }

    /// Whether every batch is padded to one shape: on wgpu, whose kernels compile per shape
    /// (a device's last, short batch would compile anew, for seconds on a cold GPU).
    fn fixed_shapes(&self) -> bool {
        self.pad_batches.unwrap_or(self.backend == BackendKind::Wgpu)
    }

    /// Pads short batches (`true`) or not, whatever the backend (tests).
    #[cfg(test)]
    pub(crate) fn pad_batches(&mut self, on: bool) {
        self.pad_batches = Some(on);
    }
}

/// FedProx's mu of `config` when the proximal term is on (set and not 0).
pub(crate) fn proximal_mu(config: &TrainConfig) -> Option<f32> {
    config.proximal_mu.filter(|&mu| mu != 0.0)
}

/// Sums `||w - anchor||^2` over a model's float parameters as a burn tensor, so that autodiff
/// adds `mu * (w - anchor)` to each gradient when `mu/2` times it joins the loss. `anchor`
/// holds the flattened tensors in the order burn visits them (the [`ModelParams`] order).
struct ProximalTerm<'a> {
    anchor: &'a [Tensor<1>],
    index: usize,
    sum: Option<Tensor<1>>,
}

impl ModuleVisitor for ProximalTerm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let Some(anchor) = self.anchor.get(self.index) else { return };
        self.index += 1;
        let w: Tensor<1> = param.val().reshape(anchor.dims());
        let sq = (w - anchor.clone()).square().sum();
        self.sum = Some(match self.sum.take() {
            Some(sum) => sum + sq,
            None => sq,
        });
    }
}

/// The minibatch schedule every training path follows: `config.epochs` passes over `indices`,
/// shuffled with `rng` at the start of each, in chunks of `config.batch_size`; `step` trains on
/// one chunk and returns its mean loss. Returns the steps taken and the mean of the last epoch's
/// chunk losses.
pub(crate) fn minibatches<R: rand::Rng + ?Sized, E>(
    indices: &[usize],
    config: &TrainConfig,
    rng: &mut R,
    mut step: impl FnMut(&[usize]) -> Result<f32, E>,
) -> Result<(usize, f32), E> {
    let mut order = indices.to_vec();
    let (mut steps, mut last_epoch_loss, mut last_epoch_batches) = (0, 0.0f64, 0usize);
    for _ in 0..config.epochs {
        order.shuffle(rng);
        last_epoch_loss = 0.0;
        last_epoch_batches = 0;
        for chunk in order.chunks((config.batch_size as usize).max(1)) {
            last_epoch_loss += step(chunk)? as f64;
            last_epoch_batches += 1;
            steps += 1;
        }
    }
    let mean = if last_epoch_batches == 0 { 0.0 } else { (last_epoch_loss / last_epoch_batches as f64) as f32 };
    Ok((steps, mean))
}

/// Accuracy and mean loss of an inference model on all of `data`.
pub fn evaluate_model(model: &Model, data: &Dataset, batch_size: usize) -> EvalMetrics {
    evaluate_batches(model, data, batch_size, false)
}

/// [`evaluate_model`], the last batch padded to `batch_size` (masked out) when `fixed`.
fn evaluate_batches(model: &Model, data: &Dataset, batch_size: usize, fixed: bool) -> EvalMetrics {
    let device = model.devices().into_iter().next().unwrap_or_else(Device::flex);
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let all: Vec<usize> = (0..data.len()).collect();
    let size = batch_size.max(1);
    let (mut correct, mut loss_sum) = (0i64, 0.0f64);
    for chunk in all.chunks(size) {
        let idx = if fixed { batch::padded(chunk, size) } else { chunk.to_vec() };
        let y = batch::labels(data, &idx, &device);
        let logits: Tensor<2> = batch::forward(model, data, &idx, &device);
        let right = logits.clone().argmax(1).flatten::<1>(0, 1).equal(y.clone()).float();
        let (loss, right) = match idx.len() > chunk.len() {
            true => {
                let mask = batch::mask(idx.len(), chunk.len(), &device);
                (batch::masked_cross_entropy(logits, y, chunk.len()), right * mask)
            }
            false => (loss_fn.forward(logits, y), right),
        };
        loss_sum += loss.into_scalar::<f32>() as f64 * chunk.len() as f64;
        correct += right.sum().into_scalar::<f32>().round() as i64;
    }
    let n = data.len().max(1) as f64;
    EvalMetrics { accuracy: correct as f64 / n, loss: loss_sum / n, examples: data.len() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedge_core::dataset::embedded;
    use fedge_core::rng::derive_rng;

    fn cfg(epochs: u32, batch_size: u32, learning_rate: f32) -> TrainConfig {
        TrainConfig::sgd(epochs, batch_size, learning_rate)
    }

    #[test]
    fn local_training_learns_real_digits() {
        let data = embedded::mnist_subset().unwrap();
        let mut trained = Vec::new();
        for backend in crate::test_backends() {
            let mut t = Trainer::new(ModelKind::TwoNn, 10, backend).unwrap();
            let start = t.initial_params(1);
            let before = t.evaluate(&start, &data.test, 500).unwrap();
            let idx: Vec<usize> = (0..5000).collect();
            let out = t.train(&start, &data.train, &idx, &cfg(1, 10, 0.05), &mut derive_rng(1, &[])).unwrap();
            assert_eq!(out.steps, 500);
            let after = t.evaluate(&out.params, &data.test, 500).unwrap();
            assert!(before.accuracy < 0.3, "{backend}: untrained accuracy {}", before.accuracy);
            assert!(after.accuracy > 0.8, "{backend}: trained accuracy {}", after.accuracy);
            assert!(after.loss < before.loss);
            assert_eq!(after.examples, 2000);
            trained.push((backend, out, after));
        }
        // Every backend trains the same model: 500 steps from the same start and batches.
        let (_, reference, scored) = &trained[0];
        for (backend, out, after) in &trained[1..] {
            let diff = max_diff(&reference.params, &out.params);
            assert!(diff < 1e-4, "{backend}: parameters differ by {diff} after 500 steps");
            assert!((after.accuracy - scored.accuracy).abs() <= 0.002, "{backend}: {after:?} vs {scored:?}");
            assert!((after.loss - scored.loss).abs() < 1e-4, "{backend}: {after:?} vs {scored:?}");
        }
    }

    /// The largest difference between two parameter vectors.
    fn max_diff(a: &ModelParams, b: &ModelParams) -> f32 {
        a.data().iter().zip(b.data()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    #[test]
    fn same_seed_same_training() {
        let data = embedded::mnist_subset().unwrap();
        let mut trained = Vec::new();
        for backend in crate::test_backends() {
            let mut t = Trainer::new(ModelKind::Cnn, 10, backend).unwrap();
            let a0 = t.initial_params(5);
            assert_eq!(a0.content_hash(), t.initial_params(5).content_hash());
            assert_ne!(a0.content_hash(), t.initial_params(6).content_hash());
            let idx: Vec<usize> = (0..40).collect();
            let run =
                |t: &mut Trainer| t.train(&a0, &data.train, &idx, &cfg(1, 10, 0.05), &mut derive_rng(2, &[])).unwrap();
            let (a, b) = (run(&mut t), run(&mut t));
            assert_eq!(a.params.content_hash(), b.params.content_hash(), "{backend}");
            assert_eq!(a.mean_loss.to_bits(), b.mean_loss.to_bits(), "{backend}");
            trained.push((backend, a0, a));
        }
        // The initial model is the same on every backend (made on the CPU), and 4 CNN steps
        // from it agree to float rounding (the GPU's convolutions sum in another order).
        let (_, start, reference) = &trained[0];
        for (backend, a0, a) in &trained[1..] {
            assert_eq!(a0.content_hash(), start.content_hash(), "{backend}");
            let diff = max_diff(&reference.params, &a.params);
            assert!(diff < 1e-4, "{backend}: CNN parameters differ by {diff} after 4 steps");
            assert!((a.mean_loss - reference.mean_loss).abs() < 1e-4, "{backend}");
        }
    }

    /// A short last batch padded to the batch size and masked out trains and scores as the
    /// short batch itself (wgpu pads, to compile one kernel shape per batch size).
    #[test]
    fn padded_batches_train_and_score_as_short_ones() {
        let data = embedded::mnist_subset().unwrap();
        let idx: Vec<usize> = (0..25).collect();
        let mut flex = Trainer::new(ModelKind::Cnn, 10, BackendKind::Flex).unwrap();
        let start = flex.initial_params(3);
        let train = |t: &mut Trainer| t.train(&start, &data.train, &idx, &cfg(2, 10, 0.05), &mut derive_rng(4, &[]));
        let plain = train(&mut flex).unwrap();
        let plain_eval = flex.evaluate(&plain.params, &data.test, 300).unwrap();
        for backend in crate::test_backends() {
            let mut t = Trainer::new(ModelKind::Cnn, 10, backend).unwrap();
            t.pad_batches(true);
            let padded = train(&mut t).unwrap();
            assert_eq!(padded.steps, 6);
            let diff = max_diff(&plain.params, &padded.params);
            assert!(diff < 1e-5, "{backend}: padded training differs by {diff}");
            assert!((padded.mean_loss - plain.mean_loss).abs() < 1e-5, "{backend}");
            // 2000 test images in batches of 300: the last, of 200, padded.
            let eval = t.evaluate(&plain.params, &data.test, 300).unwrap();
            assert!((eval.accuracy - plain_eval.accuracy).abs() < 1e-9, "{backend}: {eval:?} vs {plain_eval:?}");
            assert!((eval.loss - plain_eval.loss).abs() < 1e-5, "{backend}: {eval:?} vs {plain_eval:?}");
        }
    }

    #[test]
    fn wrong_params_leave_the_trainer_usable() {
        let data = embedded::mnist_subset().unwrap();
        for backend in crate::test_backends() {
            let mut t = Trainer::new(ModelKind::TwoNn, 10, backend).unwrap();
            let cnn = Trainer::new(ModelKind::Cnn, 10, BackendKind::Flex).unwrap().initial_params(1);
            assert!(t.train(&cnn, &data.train, &[0, 1], &cfg(1, 2, 0.1), &mut derive_rng(0, &[])).is_err());
            let ok = t.initial_params(1);
            assert!(t.evaluate(&ok, &data.test, 100).is_ok(), "{backend}");
        }
    }
}
