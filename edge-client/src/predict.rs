//! On-device predictions with the deployed model: the library API behind `fedge-edge predict`
//! (and, later, the local inference server and the hybrid policies).

use std::path::Path;
use std::time::Instant;

use fedge_learn::{BackendKind, ModelKind, Prediction, Predictor};
use fedge_net::ModelKey;
use thiserror::Error;

/// Image height the models take.
pub const ROWS: usize = 28;
/// Image width the models take.
pub const COLS: usize = 28;

/// Checks that `pixels` is one image of the models' size.
pub fn check_input(pixels: &[u8]) -> Result<(), PredictError> {
    if pixels.len() != ROWS * COLS {
        return Err(PredictError::Input(format!("{} bytes; a {ROWS}x{COLS} image is {}", pixels.len(), ROWS * COLS)));
    }
    Ok(())
}

/// Decodes a PNG into the models' input: greyscale (luma), resized to 28x28 when it is
/// another size. Digits are expected light on dark, as in MNIST.
pub fn decode_png(bytes: &[u8]) -> Result<Vec<u8>, PredictError> {
    let img = image::load_from_memory_with_format(bytes, image::ImageFormat::Png)
        .map_err(|e| PredictError::Input(format!("not a readable PNG: {e}")))?;
    let luma = img.to_luma8();
    let luma = if luma.dimensions() == (COLS as u32, ROWS as u32) {
        luma
    } else {
        image::imageops::resize(&luma, COLS as u32, ROWS as u32, image::imageops::FilterType::Triangle)
    };
    Ok(luma.into_raw())
}

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

    /// Its registry version.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Its architecture.
    pub fn architecture(&self) -> &str {
        &self.architecture
    }

    /// Every class's probability for one 28x28 greyscale image (784 bytes, row-major, 0-255).
    pub fn classify(&self, pixels: &[u8]) -> Result<Prediction, PredictError> {
        check_input(pixels)?;
        Ok(self.predictor.predict(pixels, ROWS, COLS))
    }

    /// Classifies one 28x28 greyscale image (784 bytes, row-major, 0-255).
    pub fn predict(&self, pixels: &[u8]) -> Result<Answer, PredictError> {
        let started = Instant::now();
        let p = self.classify(pixels)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pngs_decode_to_28x28_greyscale_and_garbage_is_refused() {
        let mut img = image::GrayImage::new(56, 56);
        img.put_pixel(10, 20, image::Luma([255]));
        let mut png = Vec::new();
        image::DynamicImage::ImageLuma8(img.clone())
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let px = decode_png(&png).unwrap();
        assert_eq!(px.len(), 784);
        assert!(px[10 * 28 + 5] > 0, "the bright pixel lands at half its coordinates");
        let small = image::imageops::resize(&img, 28, 28, image::imageops::FilterType::Nearest);
        let mut png = Vec::new();
        image::DynamicImage::ImageLuma8(small.clone())
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        assert_eq!(decode_png(&png).unwrap(), small.into_raw(), "28x28 is taken as it is");
        assert!(matches!(decode_png(b"not a png"), Err(PredictError::Input(_))));
        assert!(check_input(&[0; 783]).is_err() && check_input(&[0; 784]).is_ok());
    }
}
