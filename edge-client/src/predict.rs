//! On-device predictions with the deployed model: the library API behind `fedge-edge predict`
//! (and, later, the local inference server and the hybrid policies).

use std::path::Path;
use std::time::Instant;

use fedge_learn::{BackendKind, ModelKind, Predictor};
use fedge_net::ModelKey;
use thiserror::Error;

/// Why a prediction could not be made.
#[derive(Debug, Error)]
pub enum PredictError {
    /// No verified deployed model in the state folder.
    #[error("no verified deployed model in {0} (has the device run a promoted model yet?)")]
    NoModel(String),
    /// The model's architecture is unknown to this build.
    #[error("deployed model: {0}")]
    Model(String),
    /// The input is not one image of the model's size.
    #[error("input: {0}")]
    Input(String),
}

/// An answer with where it came from.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Answer {
    /// The predicted class.
    pub class: usize,
    /// Its probability under the model.
    pub confidence: f32,
    /// Which model answered (`local`).
    pub answered_by: &'static str,
    /// Registry version of that model.
    pub model_version: u64,
    /// Its architecture.
    pub architecture: String,
    /// Time to answer, milliseconds.
    pub latency_ms: f64,
}

/// The deployed model, loaded and verified, ready to answer.
pub struct LocalModel {
    predictor: Predictor,
    version: u64,
    architecture: String,
}

impl LocalModel {
    /// Loads `state_dir/deployed/current`, checking its signature with `key` and its hash.
    pub fn load(state_dir: &Path, key: &ModelKey) -> Result<Self, PredictError> {
        let dir = state_dir.join("deployed");
        let d =
            crate::deploy::load_current(&dir, key).ok_or_else(|| PredictError::NoModel(dir.display().to_string()))?;
        let kind: ModelKind = d.record.architecture.parse().map_err(PredictError::Model)?;
        let predictor =
            Predictor::new(kind, &d.params, BackendKind::Flex).map_err(|e| PredictError::Model(e.to_string()))?;
        Ok(Self { predictor, version: d.record.version, architecture: d.record.architecture })
    }

    /// Classifies one 28x28 greyscale image (784 bytes, row-major, 0-255).
    pub fn predict(&self, pixels: &[u8]) -> Result<Answer, PredictError> {
        if pixels.len() != 28 * 28 {
            return Err(PredictError::Input(format!("{} bytes; a 28x28 image is 784", pixels.len())));
        }
        let started = Instant::now();
        let p = self.predictor.predict(pixels, 28, 28);
        Ok(Answer {
            class: p.class,
            confidence: p.confidence,
            answered_by: "local",
            model_version: self.version,
            architecture: self.architecture.clone(),
            latency_ms: started.elapsed().as_secs_f64() * 1e3,
        })
    }
}
