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

/// Largest PNG width or height taken.
pub const MAX_PNG_SIDE: u32 = 4096;

/// Decodes a PNG into the models' input, preprocessed as MNIST was: greyscale (luma); a dark
/// digit on a light background (a bright border) is inverted; an image of another size than
/// 28x28 is cropped to its ink, scaled so its longer side is 20 pixels, and placed on a 28x28
/// canvas with its centre of mass in the middle. A 28x28 image is taken as it is (inverted if
/// need be). Images over [`MAX_PNG_SIDE`] on a side are refused.
pub fn decode_png(bytes: &[u8]) -> Result<Vec<u8>, PredictError> {
    // Bounded: a small file must not decode into hundreds of megabytes.
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_PNG_SIDE);
    limits.max_image_height = Some(MAX_PNG_SIDE);
    limits.max_alloc = Some(64 << 20);
    let mut reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), image::ImageFormat::Png);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| PredictError::Input(format!("not a readable PNG: {e}")))?;
    let mut luma = img.to_luma8();
    let (w, h) = luma.dimensions();
    let border: Vec<u8> = luma
        .enumerate_pixels()
        .filter(|(x, y, _)| *x == 0 || *y == 0 || *x + 1 == w || *y + 1 == h)
        .map(|(_, _, p)| p.0[0])
        .collect();
    if border.iter().map(|&b| b as u64).sum::<u64>() > 127 * border.len() as u64 {
        image::imageops::invert(&mut luma);
    }
    if (w, h) == (COLS as u32, ROWS as u32) {
        return Ok(luma.into_raw());
    }
    Ok(mnist_layout(&luma))
}

/// MNIST's layout of a light-on-dark image of any size (see [`decode_png`]).
fn mnist_layout(luma: &image::GrayImage) -> Vec<u8> {
    use image::imageops::{FilterType, resize};
    let ink = luma.pixels().map(|p| p.0[0]).max().unwrap_or(0) / 4;
    let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
    for (x, y, p) in luma.enumerate_pixels() {
        if p.0[0] > ink {
            (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
        }
    }
    if x0 > x1 {
        // No ink: a blank image stays blank.
        return resize(luma, COLS as u32, ROWS as u32, FilterType::Triangle).into_raw();
    }
    let crop = image::imageops::crop_imm(luma, x0, y0, x1 - x0 + 1, y1 - y0 + 1).to_image();
    let (cw, ch) = crop.dimensions();
    let scale = 20.0 / cw.max(ch) as f64;
    let (sw, sh) = (((cw as f64 * scale).round() as u32).max(1), ((ch as f64 * scale).round() as u32).max(1));
    let digit = resize(&crop, sw, sh, FilterType::Triangle);
    // Centre of mass of the scaled digit, placed at the canvas centre (kept on the canvas).
    let (mut mass, mut mx, mut my) = (0.0f64, 0.0f64, 0.0f64);
    for (x, y, p) in digit.enumerate_pixels() {
        let v = p.0[0] as f64;
        mass += v;
        mx += v * x as f64;
        my += v * y as f64;
    }
    let (cx, cy) = if mass > 0.0 { (mx / mass, my / mass) } else { (sw as f64 / 2.0, sh as f64 / 2.0) };
    let place =
        |c: f64, size: u32, full: usize| ((full as f64 / 2.0 - c).round() as i64).clamp(0, (full as u32 - size) as i64);
    let (ox, oy) = (place(cx, sw, COLS), place(cy, sh, ROWS));
    let mut canvas = image::GrayImage::new(COLS as u32, ROWS as u32);
    image::imageops::overlay(&mut canvas, &digit, ox, oy);
    canvas.into_raw()
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
    fallback: Option<String>,
}

impl LocalModel {
    /// Loads `state_dir/deployed/current`, checking its signature with `key` and its hash; if
    /// that version fails verification, the previous verified version kept beside it (see
    /// [`Self::fallback`]).
    pub fn load(state_dir: &Path, key: &ModelKey) -> Result<Self, PredictError> {
        let dir = state_dir.join("deployed");
        let current =
            crate::deploy::load_current(&dir, key).ok_or_else(|| PredictError::NoModel(dir.display().to_string()))?;
        let (d, fallback) = (current.deployed, current.fallback);
        let kind: ModelKind = d.record.architecture.parse().map_err(PredictError::Model)?;
        let predictor =
            Predictor::new(kind, &d.params, BackendKind::Flex).map_err(|e| PredictError::Model(e.to_string()))?;
        Ok(Self { predictor, version: d.record.version, architecture: d.record.architecture, fallback })
    }

    /// Its registry version.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Set when the version promoted last failed verification on disk and this model is the
    /// previous verified version: what failed, in words.
    pub fn fallback(&self) -> Option<&str> {
        self.fallback.as_deref()
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

    fn png(img: &image::GrayImage) -> Vec<u8> {
        let mut out = Vec::new();
        image::DynamicImage::ImageLuma8(img.clone())
            .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn pngs_decode_to_28x28_greyscale_and_garbage_is_refused() {
        let mut small = image::GrayImage::new(28, 28);
        small.put_pixel(10, 20, image::Luma([255]));
        assert_eq!(decode_png(&png(&small)).unwrap(), small.clone().into_raw(), "28x28 is taken as it is");
        let mut dark_on_light = small.clone();
        image::imageops::invert(&mut dark_on_light);
        assert_eq!(decode_png(&png(&dark_on_light)).unwrap(), small.into_raw(), "a light background is inverted");
        assert_eq!(decode_png(&png(&image::GrayImage::new(50, 40))).unwrap(), vec![0; 784], "blank stays blank");
        assert!(matches!(decode_png(b"not a png"), Err(PredictError::Input(_))));
        let huge = png(&image::GrayImage::new(MAX_PNG_SIDE + 1, 1));
        assert!(matches!(decode_png(&huge), Err(PredictError::Input(_))), "over the size limit");
        assert!(check_input(&[0; 783]).is_err() && check_input(&[0; 784]).is_ok());
    }

    #[test]
    fn a_photo_like_png_is_laid_out_as_mnist_was() {
        // MNIST digits drawn dark on a large light page, off centre, four times the size.
        let data = fedge_core::dataset::embedded::mnist_subset().unwrap().test;
        let mut t = fedge_learn::Trainer::new(ModelKind::Mlp, 10, BackendKind::Flex).unwrap();
        let train = fedge_core::dataset::embedded::mnist_subset().unwrap().train;
        let cfg = fedge_core::wire::TrainConfig::sgd(2, 20, 0.1);
        let params = t.train_fresh(1, &train, 3000, &cfg).unwrap().params;
        let model = Predictor::new(ModelKind::Mlp, &params, BackendKind::Flex).unwrap();
        let n = 100;
        let (mut same, mut naive_same) = (0, 0);
        for i in 0..n {
            let digit = image::GrayImage::from_raw(28, 28, data.image(i).to_vec()).unwrap();
            let big = image::imageops::resize(&digit, 112, 112, image::imageops::FilterType::Triangle);
            let mut page = image::GrayImage::new(240, 180);
            image::imageops::overlay(&mut page, &big, 20 + (i as i64 % 7) * 13, 5 + (i as i64 % 5) * 11);
            image::imageops::invert(&mut page);
            let want = model.predict(data.image(i), 28, 28).class;
            same += usize::from(model.predict(&decode_png(&png(&page)).unwrap(), 28, 28).class == want);
            let mut naive = image::imageops::resize(&page, 28, 28, image::imageops::FilterType::Triangle);
            image::imageops::invert(&mut naive);
            naive_same += usize::from(model.predict(&naive.into_raw(), 28, 28).class == want);
        }
        assert!(same >= 90, "{same} of {n} agree with the original image");
        assert!(same > naive_same + 20, "plain resizing: {naive_same} of {n}");
    }
}
