//! Knowledge distillation (Hinton, Vinyals and Dean 2015, "Distilling the Knowledge in a Neural
//! Network"): a small student learns to match a teacher's temperature-softened output
//! distribution on unlabelled proxy images. No label is read: the proxy set's labels are
//! ignored, so any image the coordinator holds (or synthesises) will do.
//!
//! The loss is `T^2 * KL(softmax(teacher / T) || softmax(student / T))`, averaged over the
//! batch; the `T^2` keeps gradient magnitudes comparable across temperatures. The teacher's
//! logits are computed once ([`Trainer::logits`]) and reused every epoch.

use burn::module::Module;
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::{Tensor, TensorData};
use fedge_core::ModelParams;
use fedge_core::dataset::Dataset;
use rand::seq::SliceRandom;

use fedge_core::codec;
use fedge_core::prune::PruneMask;
use fedge_core::quant::QuantizedModel;

use crate::batch;
use crate::convert::{self, ConvertError};
use crate::infer::Predictor;
use crate::train::{TrainOutput, Trainer};

/// How to distil.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistillConfig {
    /// Passes over the proxy set.
    pub epochs: u32,
    /// Minibatch size.
    pub batch_size: u32,
    /// Adam step size.
    pub learning_rate: f32,
    /// Softmax temperature T (Hinton et al. use 2 to 20; 4 is a common choice).
    pub temperature: f32,
    /// Magnitude pruning of the student (0: dense): after distillation this share of each
    /// weight tensor's values, smallest first, is set to zero in three steps, each followed by
    /// a third of `epochs` of masked distillation, and the int8 student is encoded sparse.
    pub sparsity: f64,
}

impl Default for DistillConfig {
    fn default() -> Self {
        Self { epochs: 30, batch_size: 64, learning_rate: 2e-3, temperature: 4.0, sparsity: 0.0 }
    }
}

/// The most a student may be pruned (`sparsity`).
pub const MAX_SPARSITY: f64 = 0.99;

impl DistillConfig {
    /// Refuses what cannot distil, in one line.
    pub fn validate(&self) -> Result<(), String> {
        if self.epochs == 0 || self.batch_size == 0 {
            return Err("distill epochs and batch_size must be at least 1".into());
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(format!("distill temperature must be positive, got {}", self.temperature));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(format!("distill learning_rate must be positive, got {}", self.learning_rate));
        }
        if !(0.0..=MAX_SPARSITY).contains(&self.sparsity) {
            return Err(format!("distill sparsity must be in [0, {MAX_SPARSITY}], got {}", self.sparsity));
        }
        Ok(())
    }
}

/// The data a distillation uses: training images (labels unread) and which of them form the
/// proxy set, and the test split the student is measured on.
#[derive(Debug, Clone, Copy)]
pub struct DistillData<'a> {
    /// Images the proxy indices point into.
    pub train: &'a Dataset,
    /// The unlabelled proxy set.
    pub proxy: &'a [usize],
    /// Where accuracy and latency are measured.
    pub test: &'a Dataset,
}

/// A student distilled, quantised to int8 and measured as devices run it.
#[derive(Debug, Clone)]
pub struct QuantizedStudent {
    /// The student before quantisation (the warm start of the next distillation).
    pub params: ModelParams,
    /// The int8 student, dequantised: what devices compute with.
    pub int8: ModelParams,
    /// The encoded [`QuantizedModel`]: what travels.
    pub blob: Vec<u8>,
    /// Test accuracy of the int8 student.
    pub accuracy: f64,
    /// Test accuracy before quantisation.
    pub f32_accuracy: f64,
    /// Median single-image latency of the int8 student, microseconds.
    pub student_latency_us: f64,
    /// Share of the student's weights pruned to zero (0 when dense).
    pub sparsity: f64,
    /// The same for the teacher.
    pub teacher_latency_us: f64,
}

/// A student distilled again and again, each time warm-started from the last: what the
/// coordinator (every K rounds) and the simulator (`distill_every`) both keep between
/// distillations.
pub struct WarmStudent {
    trainer: Trainer,
    params: ModelParams,
    proxy: Vec<usize>,
    config: DistillConfig,
}

impl WarmStudent {
    /// A student of `trainer`'s architecture starting from `params`, learning on the images
    /// `proxy` of the training split it is given.
    pub fn new(trainer: Trainer, params: ModelParams, proxy: Vec<usize>, config: DistillConfig) -> Self {
        Self { trainer, params, proxy, config }
    }

    /// The student's current parameters (before quantisation).
    pub fn params(&self) -> &ModelParams {
        &self.params
    }

    /// [`Trainer::distil_to_int8`] of `teacher_params` into the student on its proxy images of
    /// `train`, measured on `test`; the result is the warm start of the next one.
    pub fn distil<R: rand::Rng + ?Sized>(
        &mut self,
        teacher: &mut Trainer,
        teacher_params: &ModelParams,
        train: &Dataset,
        test: &Dataset,
        rng: &mut R,
    ) -> Result<QuantizedStudent, ConvertError> {
        let data = DistillData { train, proxy: &self.proxy, test };
        let q = self.trainer.distil_to_int8(teacher, teacher_params, &self.params, data, &self.config, rng)?;
        self.params = q.params.clone();
        Ok(q)
    }
}

impl Trainer {
    /// The whole pipeline the coordinator and the simulator share: the teacher's logits on the
    /// proxy set, distillation of this (student) trainer's architecture from `start`, int8
    /// quantisation, and accuracy and latency of the quantised student (and the teacher's
    /// latency) on the test split.
    pub fn distil_to_int8<R: rand::Rng + ?Sized>(
        &mut self,
        teacher: &mut Trainer,
        teacher_params: &ModelParams,
        start: &ModelParams,
        data: DistillData<'_>,
        config: &DistillConfig,
        rng: &mut R,
    ) -> Result<QuantizedStudent, ConvertError> {
        let logits = teacher.logits(teacher_params, data.train, data.proxy)?;
        let params = self.distill(start, data.train, data.proxy, &logits, config, rng)?.params;
        // Pruned students keep the dense one as the next warm start; devices get the pruned.
        let (shipped, sparsity) = match config.sparsity {
            s if s > 0.0 => {
                let (pruned, mask) = self.prune_distilled(&params, data.train, data.proxy, &logits, config, s, rng)?;
                (pruned, mask.sparsity())
            }
            _ => (params.clone(), 0.0),
        };
        let f32_accuracy = self.evaluate(&shipped, data.test, 500)?.accuracy;
        let q = QuantizedModel::quantize(&shipped);
        let q = if sparsity > 0.0 { q.into_sparse() } else { q };
        let int8 = q.dequantize().map_err(|e| ConvertError::Layout(e.to_string()))?;
        let accuracy = self.evaluate(&int8, data.test, 500)?.accuracy;
        let latency = |kind, p: &ModelParams, backend| {
            Predictor::new(kind, p, backend)
                .map(|pr| pr.median_latency_us(data.test, 300))
                .map_err(|e| ConvertError::Layout(e.to_string()))
        };
        let student_latency_us = latency(self.kind(), &int8, self.backend())?;
        let teacher_latency_us = latency(teacher.kind(), teacher_params, teacher.backend())?;
        Ok(QuantizedStudent {
            blob: codec::encode_value(&q),
            params,
            int8,
            accuracy,
            f32_accuracy,
            student_latency_us,
            teacher_latency_us,
            sparsity,
        })
    }

    /// Prunes the distilled student `start` to `sparsity` by magnitude in three steps (a third,
    /// two thirds, all of it), each followed by a third of `config.epochs` of distillation with
    /// the pruned weights held at zero after every step (masked fine-tuning): the pruned
    /// student and its mask.
    #[allow(clippy::too_many_arguments, reason = "distill's arguments and the sparsity")]
    pub fn prune_distilled<R: rand::Rng + ?Sized>(
        &mut self,
        start: &ModelParams,
        data: &Dataset,
        indices: &[usize],
        logits: &[f32],
        config: &DistillConfig,
        sparsity: f64,
        rng: &mut R,
    ) -> Result<(ModelParams, PruneMask), ConvertError> {
        let stage = DistillConfig { epochs: config.epochs.div_ceil(3), ..*config };
        let mut params = start.clone();
        let mut mask = None;
        for step in 1..=3 {
            let m = PruneMask::prune(&mut params, sparsity * step as f64 / 3.0)
                .map_err(|e| ConvertError::Layout(e.to_string()))?;
            params = self.distill_pruned(&params, data, indices, logits, &stage, rng, &m)?.params;
            mask = Some(m);
        }
        Ok((params, mask.expect("three steps ran")))
    }

    /// Logits of `params` (this trainer's architecture: the teacher) on examples `indices` of
    /// `data`, row-major `[indices.len(), classes]`.
    pub fn logits(
        &mut self,
        params: &ModelParams,
        data: &Dataset,
        indices: &[usize],
    ) -> Result<Vec<f32>, ConvertError> {
        let model = self.take_model();
        let model = match convert::load_params(model, params) {
            Ok(m) => m,
            Err(e) => {
                self.reset_model();
                return Err(e);
            }
        };
        let inference = model.valid();
        let device = self.device().clone();
        let mut out = Vec::new();
        for chunk in indices.chunks(256) {
            let logits: Tensor<2> = inference.forward(batch::images(data, chunk, &device.clone().inner()));
            out.extend(logits.into_data().try_into_vec::<f32>().expect("f32 logits"));
        }
        self.put_model(model);
        Ok(out)
    }

    /// Trains this trainer's (student) architecture from `start` to match `logits` (the
    /// teacher's, from [`Trainer::logits`] on the same `indices`) on `data`'s images.
    pub fn distill<R: rand::Rng + ?Sized>(
        &mut self,
        start: &ModelParams,
        data: &Dataset,
        indices: &[usize],
        logits: &[f32],
        config: &DistillConfig,
        rng: &mut R,
    ) -> Result<TrainOutput, ConvertError> {
        self.distill_with(start, data, indices, logits, config, rng, None)
    }

    /// [`Trainer::distill`] of a pruned student: `mask` is applied to `start` and again after
    /// every step, so the weights it pruned stay exactly zero and the others adapt to their
    /// absence (masked fine-tuning).
    #[allow(clippy::too_many_arguments, reason = "distill's arguments and the mask")]
    pub fn distill_pruned<R: rand::Rng + ?Sized>(
        &mut self,
        start: &ModelParams,
        data: &Dataset,
        indices: &[usize],
        logits: &[f32],
        config: &DistillConfig,
        rng: &mut R,
        mask: &PruneMask,
    ) -> Result<TrainOutput, ConvertError> {
        self.distill_with(start, data, indices, logits, config, rng, Some(mask))
    }

    #[allow(clippy::too_many_arguments, reason = "distill's arguments and the mask")]
    fn distill_with<R: rand::Rng + ?Sized>(
        &mut self,
        start: &ModelParams,
        data: &Dataset,
        indices: &[usize],
        logits: &[f32],
        config: &DistillConfig,
        rng: &mut R,
        mask: Option<&PruneMask>,
    ) -> Result<TrainOutput, ConvertError> {
        let masked = |mut p: ModelParams| -> Result<ModelParams, ConvertError> {
            if let Some(m) = mask {
                m.apply(&mut p).map_err(|e| ConvertError::Layout(e.to_string()))?;
            }
            Ok(p)
        };
        let start = &masked(start.clone())?;
        let classes = logits.len() / indices.len().max(1);
        if classes * indices.len() != logits.len() || classes == 0 {
            return Err(ConvertError::Layout(format!(
                "{} teacher logits for {} proxy images",
                logits.len(),
                indices.len()
            )));
        }
        let device = self.device().clone();
        let model = self.take_model();
        let mut model = match convert::load_params(model, start) {
            Ok(m) => m,
            Err(e) => {
                self.reset_model();
                return Err(e);
            }
        };
        let t = config.temperature.max(1e-3);
        let mut optim = AdamConfig::new().init();
        let mut order: Vec<usize> = (0..indices.len()).collect();
        let (mut steps, mut last_loss, mut batches) = (0usize, 0.0f64, 0usize);
        for _ in 0..config.epochs {
            order.shuffle(rng);
            last_loss = 0.0;
            batches = 0;
            for chunk in order.chunks(config.batch_size.max(1) as usize) {
                let images: Vec<usize> = chunk.iter().map(|&k| indices[k]).collect();
                let mut soft = Vec::with_capacity(chunk.len() * classes);
                for &k in chunk {
                    soft.extend_from_slice(&logits[k * classes..(k + 1) * classes]);
                }
                let teacher = Tensor::<2>::from_data(TensorData::new(soft, [chunk.len(), classes]), &device) / t;
                let p = softmax(teacher.clone(), 1);
                let log_p = log_softmax(teacher, 1);
                let log_q = log_softmax(model.forward(batch::images(data, &images, &device)) / t, 1);
                let kl = (p * (log_p - log_q)).sum_dim(1).mean() * (t * t);
                last_loss += kl.clone().into_scalar::<f32>() as f64;
                batches += 1;
                let grads = GradientsParams::from_grads(kl.backward(), &model);
                model = optim.step(config.learning_rate as f64, model, grads);
                if mask.is_some() {
                    let params = masked(convert::params_of(&model)?)?;
                    model = convert::load_params(model, &params)?;
                }
                steps += 1;
            }
        }
        let params = convert::params_of(&model.valid())?;
        self.put_model(model);
        let mean_loss = if batches == 0 { 0.0 } else { (last_loss / batches as f64) as f32 };
        Ok(TrainOutput { params, mean_loss, steps })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BackendKind, ModelKind};
    use fedge_core::dataset::embedded;
    use fedge_core::rng::derive_rng;
    use fedge_core::wire::TrainConfig;

    #[test]
    fn a_student_learns_from_a_teacher_without_labels() {
        let data = embedded::mnist_subset().unwrap();
        // A teacher: the 2NN trained on 2000 labelled images.
        let mut teacher = Trainer::new(ModelKind::TwoNn, 10, BackendKind::Flex).unwrap();
        let t = teacher.train_fresh(1, &data.train, 2000, &TrainConfig::sgd(3, 20, 0.05)).unwrap().params;
        let teacher_acc = teacher.evaluate(&t, &data.test, 500).unwrap().accuracy;
        let proxy: Vec<usize> = (2000..5000).collect();
        let reference = teacher.logits(&t, &data.train, &proxy).unwrap();
        let mut students = Vec::new();
        for backend in crate::test_backends() {
            // The teacher's logits on this backend: the CPU's to float rounding.
            let mut teacher = Trainer::new(ModelKind::TwoNn, 10, backend).unwrap();
            let logits = teacher.logits(&t, &data.train, &proxy).unwrap();
            let diff = logits.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(diff < 1e-4, "{backend}: logits differ by {diff}");

            // The student sees 3000 other images and the teacher's logits, never a label.
            let mut student = Trainer::new(ModelKind::Mlp, 10, backend).unwrap();
            let s0 = student.initial_params(2);
            let before = student.evaluate(&s0, &data.test, 500).unwrap().accuracy;
            let config = DistillConfig { epochs: 5, ..DistillConfig::default() };
            let out = student.distill(&s0, &data.train, &proxy, &logits, &config, &mut derive_rng(3, &[])).unwrap();
            let after = student.evaluate(&out.params, &data.test, 500).unwrap().accuracy;
            assert!(before < 0.3, "{backend}: untrained student {before}");
            assert!(after > teacher_acc - 0.03, "{backend}: student {after} vs teacher {teacher_acc}");
            assert_eq!(out.params.numel(), 101_770);

            // Logits that do not match the proxy set are refused, and the trainer stays usable.
            let short = &logits[..10];
            assert!(student.distill(&s0, &data.train, &proxy, short, &config, &mut derive_rng(3, &[])).is_err());
            assert!(student.evaluate(&out.params, &data.test, 500).is_ok());
            students.push((backend, out.params, after));
        }
        // The same student on every backend: 750 distillation steps agree to float rounding.
        let (_, reference, accuracy) = &students[0];
        for (backend, params, after) in &students[1..] {
            let diff = reference.data().iter().zip(params.data()).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(diff < 1e-3, "{backend}: students differ by {diff}");
            assert!((after - accuracy).abs() <= 0.002, "{backend}: {after} vs {accuracy}");
        }
    }

    #[test]
    fn a_pruned_student_keeps_its_zeros_through_distillation() {
        let data = embedded::mnist_subset().unwrap();
        let mut teacher = Trainer::new(ModelKind::TwoNn, 10, BackendKind::Flex).unwrap();
        let t = teacher.train_fresh(1, &data.train, 1000, &TrainConfig::sgd(1, 20, 0.05)).unwrap().params;
        let proxy: Vec<usize> = (1000..2000).collect();
        let logits = teacher.logits(&t, &data.train, &proxy).unwrap();
        let mut student = Trainer::new(ModelKind::Mlp, 10, BackendKind::Flex).unwrap();
        let mut start = student.initial_params(5);
        let mask = PruneMask::prune(&mut start, 0.7).unwrap();
        let config = DistillConfig { epochs: 2, ..DistillConfig::default() };
        let out = student
            .distill_pruned(&start, &data.train, &proxy, &logits, &config, &mut derive_rng(6, &[]), &mask)
            .unwrap();
        // Exactly the pruned weights are zero; the kept ones trained.
        let (mut zero, mut moved) = (0usize, 0usize);
        for (a, b) in start.data().iter().zip(out.params.data()) {
            if *a == 0.0 {
                assert_eq!(*b, 0.0);
                zero += 1;
            } else if a != b {
                moved += 1;
            }
        }
        assert!(zero as f64 >= 0.69 * out.params.numel() as f64, "{zero} zeros");
        assert!(moved > 1000, "{moved} kept weights changed");
        // Unmasked distillation from the same start moves the zeros.
        let free = student.distill(&start, &data.train, &proxy, &logits, &config, &mut derive_rng(6, &[])).unwrap();
        assert!(start.data().iter().zip(free.params.data()).any(|(a, b)| *a == 0.0 && *b != 0.0));
    }

    #[test]
    fn a_warm_student_with_sparsity_ships_pruned_sparse_and_warm_starts_dense() {
        let data = embedded::mnist_subset().unwrap();
        let mut teacher = Trainer::new(ModelKind::TwoNn, 10, BackendKind::Flex).unwrap();
        let t = teacher.train_fresh(1, &data.train, 1000, &TrainConfig::sgd(1, 20, 0.05)).unwrap().params;
        let proxy: Vec<usize> = (1000..2000).collect();
        let make = |sparsity| {
            let mut student = Trainer::new(ModelKind::Mlp, 10, BackendKind::Flex).unwrap();
            let start = student.initial_params(5);
            WarmStudent::new(
                student,
                start,
                proxy.clone(),
                DistillConfig { epochs: 3, sparsity, ..DistillConfig::default() },
            )
        };
        let (mut dense, mut pruned) = (make(0.0), make(0.8));
        let d = dense.distil(&mut teacher, &t, &data.train, &data.test, &mut derive_rng(7, &[])).unwrap();
        let p = pruned.distil(&mut teacher, &t, &data.train, &data.test, &mut derive_rng(7, &[])).unwrap();
        assert_eq!(d.sparsity, 0.0);
        assert!(p.sparsity >= 0.79, "{}", p.sparsity);
        // What devices get is the pruned int8 student, encoded sparse: under half the bytes.
        let zeros = p.int8.data().iter().filter(|v| **v == 0.0).count() as f64 / p.int8.numel() as f64;
        assert!(zeros >= 0.78, "{zeros} of the shipped student is zero");
        assert!(p.blob.len() * 2 < d.blob.len(), "{} vs {} bytes", p.blob.len(), d.blob.len());
        let decoded: QuantizedModel = codec::decode_value(&p.blob).unwrap();
        assert_eq!(decoded.dequantize().unwrap(), p.int8);
        assert!(p.accuracy > d.accuracy - 0.05, "pruned {} vs dense {}", p.accuracy, d.accuracy);
        // The warm start stays dense, so the next distillation can use every weight again.
        assert!(pruned.params().data().iter().filter(|v| **v == 0.0).count() < pruned.params().numel() / 10);
        // Impossible settings are refused in one line.
        assert!(
            DistillConfig { sparsity: 1.0, ..DistillConfig::default() }.validate().unwrap_err().contains("sparsity")
        );
        assert!(DistillConfig { epochs: 0, ..DistillConfig::default() }.validate().is_err());
        assert!(DistillConfig { temperature: f32::NAN, ..DistillConfig::default() }.validate().is_err());
        DistillConfig::default().validate().unwrap();
    }
}
