//! The fast CPU path: our models trained and evaluated by `fedge-kernels`' fused step instead
//! of burn's autodiff, with parameters mapped exactly between burn's layout and the kernels'.
//!
//! burn stays the definition of each architecture (initialisation, names, shapes, the GPU path,
//! distillation, prediction); [`FastNet`] mirrors an architecture as a kernel [`NetSpec`] and
//! converts [`ModelParams`] in and out:
//! - a convolution's weight `[c_out, c_in, k, k]` becomes `[(ky * k + kx) * c_in + ci, c_out]`;
//! - a dense layer's weight is `[inputs, outputs]` in both, except that the first dense layer
//!   after a convolution reads its input in NHWC order where burn flattens NCHW, so its rows are
//!   permuted;
//! - biases are the same.
//!
//! Training follows [`crate::Trainer::train`] draw for draw (same shuffles, same minibatches), so
//! a seeded run is reproducible and the two paths agree up to float rounding (tested in
//! `tests/fast_path.rs`).

use std::sync::Arc;

use fedge_core::dataset::Dataset;
use fedge_core::wire::TrainConfig;
use fedge_core::{ModelParams, ParamLayout};
use fedge_kernels::{LayerSpec, Net, NetSpec, Threads};

use crate::batch::{MEAN, STD};
use crate::convert::ConvertError;
use crate::model::ModelKind;
use crate::train::{EvalMetrics, TrainOutput, minibatches, proximal_mu};

/// Examples per forward pass when evaluating (bounds the column buffers: 64 CNN images need
/// about 40 MB).
const EVAL_CHUNK: usize = 64;
/// Examples gathered at a time when evaluating: 64 chunks, dealt out over the net's threads.
const EVAL_BLOCK: usize = 64 * EVAL_CHUNK;

/// The kernel architecture of a model kind; `None` for the ones the kernels do not cover (the
/// LSTMs, which train on burn).
pub fn spec(kind: ModelKind, classes: usize) -> Option<NetSpec> {
    let dense = |outputs, relu| LayerSpec::Dense { outputs, relu };
    let layers = match kind {
        ModelKind::TwoNn => vec![dense(200, true), dense(200, true), dense(classes, false)],
        ModelKind::Mlp => vec![dense(crate::model::mlp::HIDDEN, true), dense(classes, false)],
        ModelKind::Cnn => return Some(NetSpec::mnist_cnn(classes)),
        ModelKind::Lstm | ModelKind::LstmSmall => return None,
    };
    Some(NetSpec { height: 28, width: 28, channels: 1, layers })
}

/// How one burn tensor pair maps onto a kernel layer.
#[derive(Debug, Clone)]
enum Mapping {
    /// Dense weight, rows in the same order.
    Same,
    /// Convolution weight `[c_out, c_in, k, k]`.
    Conv { c_out: usize, c_in: usize, k: usize },
    /// Dense weight whose input was an NCHW-flattened `c x hw` map: kernel row `p * c + ch`
    /// is burn row `ch * hw + p`.
    FromConv { c: usize, hw: usize },
}

/// A model of one architecture on the fast CPU path.
pub struct FastNet {
    net: Net,
    /// Input image rows and columns.
    image: (usize, usize),
    layout: Arc<ParamLayout>,
    mappings: Vec<Mapping>,
    /// 256-entry lookup: byte pixel -> standardised input.
    pixel: [f32; 256],
    images: Vec<f32>,
    labels: Vec<u8>,
    buf: Vec<f32>,
}

impl FastNet {
    /// A fast net for `kind` whose parameters use `layout` (burn's, from
    /// [`crate::convert::layout_of`]). Fails when the layout is not that architecture's.
    pub fn new(
        kind: ModelKind,
        classes: usize,
        layout: Arc<ParamLayout>,
        threads: Threads,
    ) -> Result<Self, ConvertError> {
        let spec = spec(kind, classes)
            .ok_or_else(|| ConvertError::Layout(format!("the fast CPU path has no `{kind}` model")))?;
        let net = Net::new(&spec, threads).map_err(|e| ConvertError::Layout(e.to_string()))?;
        let specs = layout.specs();
        if specs.len() != 2 * net.num_layers() {
            return Err(ConvertError::Layout(format!(
                "{} tensors for {} layers of weight and bias",
                specs.len(),
                net.num_layers()
            )));
        }
        let (mut h, mut w, mut c) = (spec.height, spec.width, spec.channels);
        let mut after_conv = false;
        let mut mappings = Vec::new();
        for (i, l) in spec.layers.iter().enumerate() {
            let (rows, cols) = net.weight_shape(i);
            let (weight, bias) = (&specs[2 * i], &specs[2 * i + 1]);
            let (mapping, want) = match *l {
                LayerSpec::ConvReluPool { out_channels, kernel } => {
                    let m = Mapping::Conv { c_out: out_channels, c_in: c, k: kernel };
                    (h, w, c) = (h / 2, w / 2, out_channels);
                    after_conv = true;
                    (m, vec![out_channels, rows / (kernel * kernel), kernel, kernel])
                }
                LayerSpec::Dense { .. } => {
                    let m = if after_conv { Mapping::FromConv { c, hw: h * w } } else { Mapping::Same };
                    after_conv = false;
                    (m, vec![rows, cols])
                }
            };
            if weight.shape != want || bias.shape != [cols] {
                return Err(ConvertError::Layout(format!(
                    "layer {i}: `{}` {:?} and `{}` {:?} where {kind} has {want:?} and [{cols}]",
                    weight.name, weight.shape, bias.name, bias.shape
                )));
            }
            mappings.push(mapping);
        }
        let mut pixel = [0.0; 256];
        for (v, p) in pixel.iter_mut().enumerate() {
            *p = (v as f32 / 255.0 - MEAN) / STD;
        }
        Ok(Self {
            net,
            image: (spec.height, spec.width),
            layout,
            mappings,
            pixel,
            images: Vec::new(),
            labels: Vec::new(),
            buf: Vec::new(),
        })
    }

    /// How many threads each GEMM may use.
    pub fn set_threads(&mut self, threads: Threads) {
        self.net.set_threads(threads);
    }

    /// How the convolutions compute (see `fedge_kernels::Net::set_conv_algorithm`).
    pub fn set_conv_algorithm(&mut self, algorithm: fedge_kernels::ConvAlgorithm) {
        self.net.set_conv_algorithm(algorithm);
    }

    /// How many bytes of im2col columns a convolution builds at a time (see
    /// `fedge_kernels::Net::set_chunk_bytes`).
    pub fn set_chunk_bytes(&mut self, bytes: usize) {
        self.net.set_chunk_bytes(bytes);
    }

    /// Loads `params` (burn's layout) into the kernels' layout.
    pub fn load(&mut self, params: &ModelParams) -> Result<(), ConvertError> {
        if **params.layout() != *self.layout {
            return Err(ConvertError::Layout("parameters are for another architecture or layout".into()));
        }
        for (i, mapping) in self.mappings.iter().enumerate() {
            let (burn_w, bias) =
                (&params.data()[self.layout.range(2 * i)], &params.data()[self.layout.range(2 * i + 1)]);
            self.buf.clear();
            self.buf.resize(burn_w.len(), 0.0);
            map_weight(mapping, burn_w, &mut self.buf, true);
            self.net.set_layer(i, &self.buf, bias).map_err(|e| ConvertError::Layout(e.to_string()))?;
        }
        Ok(())
    }

    /// The current parameters in burn's layout.
    pub fn store(&self) -> ModelParams {
        let mut data = Vec::with_capacity(self.layout.numel());
        for (i, mapping) in self.mappings.iter().enumerate() {
            let (w, b) = self.net.layer(i);
            let start = data.len();
            data.resize(start + w.len(), 0.0);
            map_weight(mapping, w, &mut data[start..], false);
            data.extend_from_slice(b);
        }
        ModelParams::new(self.layout.clone(), data).expect("the layout was checked against the net")
    }

    fn gather(&mut self, data: &Dataset, indices: &[usize]) -> Result<(), ConvertError> {
        if (data.rows, data.cols) != self.image {
            return Err(ConvertError::Data(format!(
                "{}x{} images for a model of {}x{} inputs",
                data.rows, data.cols, self.image.0, self.image.1
            )));
        }
        self.images.clear();
        self.labels.clear();
        for &i in indices {
            self.images.extend(data.image(i).iter().map(|&p| self.pixel[p as usize]));
            self.labels.push(data.labels[i]);
        }
        Ok(())
    }

    /// Trains from `start` as [`crate::Trainer::train`] does (same shuffles and batches, the same
    /// proximal term towards `start` when `config.proximal_mu` is set and not 0).
    pub fn train<R: rand::Rng + ?Sized>(
        &mut self,
        start: &ModelParams,
        data: &Dataset,
        indices: &[usize],
        config: &TrainConfig,
        rng: &mut R,
    ) -> Result<TrainOutput, ConvertError> {
        self.load(start)?;
        let mu = proximal_mu(config).unwrap_or(0.0);
        if mu != 0.0 {
            self.net.set_anchor();
        }
        let (steps, mean_loss) = minibatches(indices, config, rng, |chunk| {
            self.gather(data, chunk)?;
            self.net.train_step_proximal(&self.images, &self.labels, config.learning_rate, mu).map_err(data_error)
        })?;
        Ok(TrainOutput { params: self.store(), mean_loss, steps })
    }

    /// Accuracy and mean loss of `params` on all of `data`.
    pub fn evaluate(&mut self, params: &ModelParams, data: &Dataset) -> Result<EvalMetrics, ConvertError> {
        self.load(params)?;
        let (mut correct, mut loss_sum) = (0usize, 0.0f64);
        let all: Vec<usize> = (0..data.len()).collect();
        for block in all.chunks(EVAL_BLOCK) {
            self.gather(data, block)?;
            let s = self.net.score(&self.images, &self.labels, EVAL_CHUNK).map_err(data_error)?;
            correct += s.correct;
            loss_sum += s.loss_sum;
        }
        let n = data.len().max(1) as f64;
        Ok(EvalMetrics { accuracy: correct as f64 / n, loss: loss_sum / n, examples: data.len() })
    }
}

/// A batch the kernels refused: its images or labels do not fit the model (the shapes of the
/// parameters were checked when they were loaded).
fn data_error(e: fedge_kernels::NetError) -> ConvertError {
    ConvertError::Data(e.to_string())
}

/// Copies a weight between burn's layout and the kernels' (`to_kernel` picks the direction).
fn map_weight(mapping: &Mapping, from: &[f32], to: &mut [f32], to_kernel: bool) {
    match *mapping {
        Mapping::Same => to.copy_from_slice(from),
        Mapping::Conv { c_out, c_in, k } => {
            for co in 0..c_out {
                for ci in 0..c_in {
                    for ky in 0..k {
                        for kx in 0..k {
                            let burn = ((co * c_in + ci) * k + ky) * k + kx;
                            let kern = ((ky * k + kx) * c_in + ci) * c_out + co;
                            if to_kernel { to[kern] = from[burn] } else { to[burn] = from[kern] }
                        }
                    }
                }
            }
        }
        Mapping::FromConv { c, hw } => {
            let cols = from.len() / (c * hw);
            for ch in 0..c {
                for p in 0..hw {
                    let (burn, kern) = ((ch * hw + p) * cols, (p * c + ch) * cols);
                    let (src, dst) = if to_kernel { (burn, kern) } else { (kern, burn) };
                    to[dst..dst + cols].copy_from_slice(&from[src..src + cols]);
                }
            }
        }
    }
}
