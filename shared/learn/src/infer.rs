//! Inference on one example at a time: what a device does to answer a prediction.
//!
//! A [`Predictor`] holds an inference-only model (no autodiff) built from flat parameters and
//! answers with the class, its softmax probability (the confidence) and every class's
//! probability.

use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor, TensorData};
use fedge_core::ModelParams;
use fedge_core::dataset::Dataset;

use crate::backend::{BackendError, BackendKind};
use crate::convert::{self, ConvertError};
use crate::model::{Model, ModelKind};

use crate::batch::{MEAN, STD};

/// Why a predictor could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PredictorError {
    /// No such backend here.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The parameters do not fit the architecture.
    #[error(transparent)]
    Convert(#[from] ConvertError),
    /// A text model: single-image prediction is for image models.
    #[error("{0}")]
    Text(String),
}

/// One answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// The most likely class.
    pub class: usize,
    /// Its probability.
    pub confidence: f32,
    /// Every class's probability.
    pub probabilities: Vec<f32>,
}

/// An inference model.
pub struct Predictor {
    model: Model,
    device: Device,
    kind: ModelKind,
}

impl Predictor {
    /// A predictor of architecture `kind` with `params`, on `backend`.
    pub fn new(kind: ModelKind, params: &ModelParams, backend: BackendKind) -> Result<Self, PredictorError> {
        kind.images_only().map_err(PredictorError::Text)?;
        let device = backend.device()?;
        let classes = params.layout().specs().last().map_or(0, |s| s.shape[0]);
        let model = convert::load_params(Model::init(kind, classes, &device), params)?;
        Ok(Self { model, device, kind })
    }

    /// The architecture.
    pub fn kind(&self) -> ModelKind {
        self.kind
    }

    /// Median time of one single-image prediction over the first `n` images of `data` (after
    /// 20 unmeasured warm-up predictions), microseconds.
    pub fn median_latency_us(&self, data: &Dataset, n: usize) -> f64 {
        let n = data.len().min(n);
        for i in 0..n.min(20) {
            self.predict(data.image(i), data.rows, data.cols);
        }
        let mut t: Vec<f64> = (0..n)
            .map(|i| {
                let start = std::time::Instant::now();
                std::hint::black_box(self.predict(data.image(i), data.rows, data.cols));
                start.elapsed().as_secs_f64() * 1e6
            })
            .collect();
        t.sort_by(f64::total_cmp);
        t.get(t.len() / 2).copied().unwrap_or(0.0)
    }

    /// Predicts the classes of `images` (each `rows * cols` greyscale bytes) in one forward
    /// pass: what a server batching requests from many devices does.
    pub fn predict_batch(&self, images: &[&[u8]], rows: usize, cols: usize) -> Vec<Prediction> {
        if images.is_empty() {
            return Vec::new();
        }
        let x: Vec<f32> = images.iter().flat_map(|im| im.iter().map(|&p| (p as f32 / 255.0 - MEAN) / STD)).collect();
        let input = Tensor::<4>::from_data(TensorData::new(x, [images.len(), 1, rows, cols]), &self.device);
        let probs: Vec<f32> =
            softmax(self.model.forward(input), 1).into_data().try_into_vec::<f32>().expect("f32 probabilities");
        let k = probs.len() / images.len();
        probs.chunks(k).map(prediction_of).collect()
    }

    /// Predicts the class of one `rows` x `cols` greyscale image (bytes 0-255, row-major).
    /// `pixels` must hold exactly `rows * cols` bytes (callers with untrusted input check it,
    /// as `fedge_edge::predict::LocalModel` does).
    pub fn predict(&self, pixels: &[u8], rows: usize, cols: usize) -> Prediction {
        let x: Vec<f32> = pixels.iter().map(|&p| (p as f32 / 255.0 - MEAN) / STD).collect();
        let input = Tensor::<4>::from_data(TensorData::new(x, [1, 1, rows, cols]), &self.device);
        let probs: Vec<f32> =
            softmax(self.model.forward(input), 1).into_data().try_into_vec::<f32>().expect("f32 probabilities");
        prediction_of(&probs)
    }
}

fn prediction_of(probs: &[f32]) -> Prediction {
    let (class, &confidence) = probs.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).expect("at least one class");
    Prediction { class, confidence, probabilities: probs.to_vec() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Trainer;
    use fedge_core::dataset::embedded;
    use fedge_core::wire::TrainConfig;

    #[test]
    fn predictions_agree_with_batch_evaluation() {
        let data = embedded::mnist_subset().unwrap();
        let mut t = Trainer::new(ModelKind::Mlp, 10, BackendKind::Flex).unwrap();
        let p = t.train_fresh(1, &data.train, 2000, &TrainConfig::sgd(2, 20, 0.1)).unwrap().params;
        let want = t.evaluate(&p, &data.test, 500).unwrap().accuracy;
        let test = &data.test;
        let cpu = Predictor::new(ModelKind::Mlp, &p, BackendKind::Flex).unwrap();
        for backend in crate::test_backends() {
            let pred = Predictor::new(ModelKind::Mlp, &p, backend).unwrap();
            // One image at a time: a launch each on a GPU, so a GPU answers the first 400.
            let n = if backend == BackendKind::Flex { test.len() } else { 400 };
            let right = |p: &Predictor, i: usize| {
                p.predict(test.image(i), test.rows, test.cols).class == test.labels[i] as usize
            };
            let correct = (0..n).filter(|&i| right(&pred, i)).count();
            if n == test.len() {
                assert!((correct as f64 / n as f64 - want).abs() < 1e-9, "{backend}");
            } else {
                assert_eq!(correct, (0..n).filter(|&i| right(&cpu, i)).count(), "{backend}");
            }
            let one = pred.predict(test.image(0), test.rows, test.cols);
            assert!((one.probabilities.iter().sum::<f32>() - 1.0).abs() < 1e-4);
            assert_eq!(one.confidence, one.probabilities[one.class]);
            let on_cpu = cpu.predict(test.image(0), test.rows, test.cols);
            for (a, b) in one.probabilities.iter().zip(&on_cpu.probabilities) {
                assert!((a - b).abs() < 1e-5, "{backend}: {:?} vs {:?}", one.probabilities, on_cpu.probabilities);
            }
            // A batch answers as the single images do.
            let batch: Vec<&[u8]> = (0..7).map(|i| test.image(i)).collect();
            for (i, b) in pred.predict_batch(&batch, test.rows, test.cols).iter().enumerate() {
                let one = pred.predict(test.image(i), test.rows, test.cols);
                assert_eq!(b.class, one.class);
                assert!((b.confidence - one.confidence).abs() < 1e-5);
            }
            // Parameters of another architecture are refused.
            assert!(Predictor::new(ModelKind::TwoNn, &p, backend).is_err());
            // A text model is refused, whatever its parameters (a signed record could name one).
            let lstm = Trainer::new(ModelKind::LstmSmall, 80, BackendKind::Flex).unwrap().initial_params(1);
            let err = Predictor::new(ModelKind::LstmSmall, &lstm, backend).err().unwrap().to_string();
            assert!(err.contains("reads text"), "{err}");
        }
    }
}
