//! Many devices per launch: a group of virtual devices' models trained together, each on its
//! own data, in one set of kernel launches per step.
//!
//! On a GPU one small model per launch leaves the device idle: a 2NN step at batch 10 is a few
//! tiny matmuls. [`GroupTrainer`] stacks `G` devices' models: a dense layer's weights become one
//! `[G, in, out]` tensor (a batched matmul), a convolution's become `[G * out, in, k, k]` applied
//! with `groups = G` to the devices' images stacked along the channels. Each step every device
//! takes its next batch from its own schedule (the shuffles [`crate::Trainer::train`] draws with
//! the same rng: the same batches in the same order), padded to the batch size and masked; a
//! device whose schedule has ended takes an all-masked step. The loss is the sum of the
//! devices' mean losses, so each device's gradient is that of its own loss, and plain SGD moves
//! each by its own gradient: the results are one-by-one training's, to float rounding. FedProx's
//! proximal term is per device too.
//!
//! Models: the dense ones (2NN, student MLP) and the CNN; the LSTMs are refused.

use std::sync::Arc;

use burn::tensor::activation::{log_softmax, relu};
use burn::tensor::module::{conv2d, max_pool2d};
use burn::tensor::ops::{ConvOptions, MaxPoolOptions};
use burn::tensor::{Device, Gradients, Int, Tensor, TensorData};
use fedge_core::dataset::Dataset;
use fedge_core::wire::TrainConfig;
use fedge_core::{ModelParams, ParamLayout};

use crate::backend::{BackendError, BackendKind};
use crate::batch::{MEAN, STD};
use crate::convert::ConvertError;
use crate::model::{Model, ModelKind};
use crate::train::{TrainOutput, minibatches, proximal_mu};

/// One device of a group: where it starts, its examples and the rng its batches are drawn with.
pub struct Member<'a, R: rand::Rng + ?Sized> {
    /// Its starting parameters (the global model).
    pub start: &'a ModelParams,
    /// Its examples.
    pub indices: &'a [usize],
    /// The rng [`crate::Trainer::train`] would shuffle its epochs with.
    pub rng: &'a mut R,
}

/// One stacked layer: its weight and bias for every device of the group.
#[derive(Clone)]
enum Layer {
    /// `[G * out, in, k, k]` and `[G * out]`, applied with `groups = G`.
    Conv(Tensor<4>, Tensor<1>),
    /// `[G, in, out]` and `[G, 1, out]`.
    Dense(Tensor<3>, Tensor<3>),
}

/// Trains groups of devices' models of one architecture on one backend.
pub struct GroupTrainer {
    kind: ModelKind,
    device: Device,
    layout: Arc<ParamLayout>,
}

impl GroupTrainer {
    /// A group trainer for `kind` on `backend` (`cpu` trains on burn-flex: the fused kernels
    /// take one device at a time).
    pub fn new(kind: ModelKind, num_classes: usize, backend: BackendKind) -> Result<Self, GroupError> {
        if kind.is_text() {
            return Err(GroupError::Model(kind));
        }
        let device = backend.device()?.autodiff();
        let model = Model::init(kind, num_classes, &Device::flex());
        let layout = crate::convert::layout_of(&model)?;
        // What the stacked form reads: (weight, bias) pairs, convolutions (4-D) before dense
        // layers (2-D), biases 1-D.
        let specs = layout.specs();
        let rank = |i: usize| specs[i].shape.len();
        let pairs = specs.len() % 2 == 0 && (0..specs.len() / 2).all(|l| rank(2 * l + 1) == 1);
        let ranks: Vec<usize> = (0..specs.len() / 2).map(|l| rank(2 * l)).collect();
        let ordered = ranks.iter().all(|&r| r == 2 || r == 4) && ranks.windows(2).all(|w| w[0] >= w[1]);
        if !(pairs && ordered && ranks.last() == Some(&2)) {
            return Err(GroupError::Model(kind));
        }
        Ok(Self { kind, device, layout })
    }

    /// Trains every member as [`crate::Trainer::train`] would train it alone, all in one set
    /// of launches per step: their outputs, in order.
    pub fn train<R: rand::Rng + ?Sized>(
        &mut self,
        data: &Dataset,
        members: &mut [Member<'_, R>],
        config: &TrainConfig,
    ) -> Result<Vec<TrainOutput>, ConvertError> {
        let g = members.len();
        if g == 0 {
            return Ok(Vec::new());
        }
        for m in members.iter() {
            if m.start.layout() != &self.layout {
                return Err(ConvertError::Layout(format!("a member's parameters are not a {} model", self.kind)));
            }
        }
        let size = (config.batch_size as usize).max(1);
        // Each member's batches, drawn as the single trainer draws them.
        let schedules: Vec<Vec<Vec<usize>>> = members
            .iter_mut()
            .map(|m| {
                let mut chunks = Vec::new();
                let _ = minibatches::<R, ()>(m.indices, config, m.rng, |chunk| {
                    chunks.push(chunk.to_vec());
                    Ok(0.0)
                });
                chunks
            })
            .collect();
        let steps = schedules.iter().map(Vec::len).max().unwrap_or(0);
        let mut layers = self.stack(members.iter().map(|m| m.start));
        // FedProx's anchors: the starting layers, kept (a tensor's clone shares its data).
        let anchors = proximal_mu(config).map(|mu| (mu, layers.clone()));
        let lr = f64::from(config.learning_rate);
        let mut losses: Vec<Vec<f32>> = vec![Vec::new(); g];
        for s in 0..steps {
            // Every member's batch of this step, padded; a member done already is all padding.
            let mut idx = Vec::with_capacity(g * size);
            let mut real = Vec::with_capacity(g);
            for (schedule, m) in schedules.iter().zip(members.iter()) {
                let chunk = schedule.get(s).map_or(&[][..], Vec::as_slice);
                let fill = chunk.first().or(m.indices.first()).copied().unwrap_or(0);
                idx.extend_from_slice(chunk);
                idx.extend(std::iter::repeat_n(fill, size - chunk.len()));
                real.push(chunk.len());
            }
            let leaves: Vec<Layer> = layers.iter().map(Layer::leaf).collect();
            let logits = self.forward(&leaves, data, &idx, g, size);
            let per_device = self.losses(logits, data, &idx, &real, g, size);
            let mut total = per_device.clone().sum();
            if let Some((mu, anchors)) = &anchors {
                // Only the members that train this step: one whose schedule has ended is done.
                let active: Vec<f32> = real.iter().map(|&r| if r > 0 { 1.0 } else { 0.0 }).collect();
                let active = Tensor::from_data(TensorData::new(active, [g]), &self.device);
                total = total + proximal(&leaves, anchors, active, g).mul_scalar(mu / 2.0);
            }
            let values: Vec<f32> =
                per_device.into_data().try_to_vec::<f32>().map_err(|e| ConvertError::Layout(format!("{e:?}")))?;
            let grads = total.backward();
            layers = leaves.iter().map(|l| l.sgd(&grads, lr)).collect();
            for (d, v) in values.into_iter().enumerate() {
                if real[d] > 0 {
                    losses[d].push(v);
                }
            }
        }
        self.unstack(&layers, g)?
            .into_iter()
            .zip(members.iter())
            .zip(losses)
            .map(|((params, m), losses)| {
                // The mean of the last epoch's batch losses, as the single trainer reports it.
                let per_epoch = m.indices.len().div_ceil(size);
                let last = &losses[losses.len().saturating_sub(per_epoch)..];
                let mean = if last.is_empty() { 0.0 } else { last.iter().sum::<f32>() / last.len() as f32 };
                Ok(TrainOutput { params, mean_loss: mean, steps: losses.len() })
            })
            .collect()
    }

    /// The members' parameters stacked, layer by layer, on the training device.
    fn stack<'p>(&self, params: impl Iterator<Item = &'p ModelParams> + Clone) -> Vec<Layer> {
        let specs = self.layout.specs();
        let g = params.clone().count();
        let gather = |i: usize| -> Vec<f32> {
            params.clone().flat_map(|p| p.tensors().nth(i).map_or(&[][..], |(_, v)| v)).copied().collect()
        };
        (0..specs.len() / 2)
            .map(|l| {
                let (w, b) = (&specs[2 * l], &specs[2 * l + 1]);
                let (wd, bd) = (gather(2 * l), gather(2 * l + 1));
                match w.shape.as_slice() {
                    [out, inp, kh, kw] => Layer::Conv(
                        Tensor::from_data(TensorData::new(wd, [g * out, *inp, *kh, *kw]), &self.device),
                        Tensor::from_data(TensorData::new(bd, [g * out]), &self.device),
                    ),
                    [inp, out] => Layer::Dense(
                        Tensor::from_data(TensorData::new(wd, [g, *inp, *out]), &self.device),
                        Tensor::from_data(TensorData::new(bd, [g, 1, b.numel()]), &self.device),
                    ),
                    other => unreachable!("checked in new: a weight of shape {other:?}"),
                }
            })
            .collect()
    }

    /// The stacked layers back as each member's parameters.
    fn unstack(&self, layers: &[Layer], g: usize) -> Result<Vec<ModelParams>, ConvertError> {
        let mut per: Vec<Vec<f32>> = vec![Vec::with_capacity(self.layout.numel()); g];
        let bad = |e| ConvertError::Layout(format!("{e:?}"));
        for layer in layers {
            let (w, b) = match layer {
                Layer::Conv(w, b) => (w.clone().into_data(), b.clone().into_data()),
                Layer::Dense(w, b) => (w.clone().into_data(), b.clone().into_data()),
            };
            let (w, b): (Vec<f32>, Vec<f32>) =
                (w.try_to_vec::<f32>().map_err(bad)?, b.try_to_vec::<f32>().map_err(bad)?);
            let (wn, bn) = (w.len() / g, b.len() / g);
            for (d, p) in per.iter_mut().enumerate() {
                p.extend_from_slice(&w[d * wn..(d + 1) * wn]);
                p.extend_from_slice(&b[d * bn..(d + 1) * bn]);
            }
        }
        per.into_iter()
            .map(|v| ModelParams::new(self.layout.clone(), v).map_err(|e| ConvertError::Layout(e.to_string())))
            .collect()
    }

    /// The members' logits `[G, size, classes]` for examples `idx` (member-major).
    fn forward(&self, layers: &[Layer], data: &Dataset, idx: &[usize], g: usize, size: usize) -> Tensor<3> {
        let p = data.pixels();
        let pixel = |x: u8| (x as f32 / 255.0 - MEAN) / STD;
        let mut x: Option<Tensor<3>> = None;
        let mut images: Option<Tensor<4>> = None;
        if matches!(layers.first(), Some(Layer::Conv(..))) {
            // `[size, G, rows, cols]`: member d's images are channel d.
            let mut v = vec![0.0f32; size * g * p];
            for d in 0..g {
                for b in 0..size {
                    let src = data.image(idx[d * size + b]);
                    let at = (b * g + d) * p;
                    v[at..at + p].iter_mut().zip(src).for_each(|(o, &s)| *o = pixel(s));
                }
            }
            images = Some(Tensor::from_data(TensorData::new(v, [size, g, data.rows, data.cols]), &self.device));
        } else {
            let v: Vec<f32> = idx.iter().flat_map(|&i| data.image(i).iter().map(|&s| pixel(s))).collect();
            x = Some(Tensor::from_data(TensorData::new(v, [g, size, p]), &self.device));
        }
        let dense = layers.iter().filter(|l| matches!(l, Layer::Dense(..))).count();
        let mut seen_dense = 0;
        for layer in layers {
            match layer {
                Layer::Conv(w, b) => {
                    let input = images.take().expect("convolutions come first");
                    let [_, _, k, _] = w.dims();
                    let options = ConvOptions::new([1, 1], [k / 2, k / 2], [1, 1], g);
                    let y = relu(conv2d(input, w.clone(), Some(b.clone()), options));
                    images = Some(max_pool2d(y, MaxPoolOptions::new([2, 2])));
                }
                Layer::Dense(w, b) => {
                    let input = match (x.take(), images.take()) {
                        (Some(x), _) => x,
                        (None, Some(maps)) => {
                            // `[size, G * c, h, w]` -> `[G, size, c * h * w]`, each member's
                            // features in the single model's (c, h, w) order.
                            let [n, gc, h, wd] = maps.dims();
                            maps.reshape([n, g, gc / g * h * wd]).swap_dims(0, 1)
                        }
                        (None, None) => unreachable!("a model has an input"),
                    };
                    seen_dense += 1;
                    let y = input.matmul(w.clone()) + b.clone();
                    x = Some(if seen_dense < dense { relu(y) } else { y });
                }
            }
        }
        x.expect("a model ends with a dense layer")
    }

    /// Each member's mean cross-entropy over its real examples (0 for a member with none), `[G]`.
    fn losses(
        &self,
        logits: Tensor<3>,
        data: &Dataset,
        idx: &[usize],
        real: &[usize],
        g: usize,
        size: usize,
    ) -> Tensor<1> {
        let labels: Vec<i64> = idx.iter().map(|&i| data.labels[i] as i64).collect();
        let labels: Tensor<3, Int> = Tensor::from_data(TensorData::new(labels, [g, size, 1]), &self.device);
        let picked: Tensor<2> = log_softmax(logits, 2).gather(2, labels).reshape([g, size]);
        let weights: Vec<f32> =
            real.iter().flat_map(|&r| (0..size).map(move |b| if b < r { 1.0 / r as f32 } else { 0.0 })).collect();
        let weights: Tensor<2> = Tensor::from_data(TensorData::new(weights, [g, size]), &self.device);
        (picked * weights).sum_dim(1).reshape([g]).neg()
    }
}

impl Layer {
    /// This layer's tensors as leaves of a new step's graph.
    fn leaf(&self) -> Layer {
        match self {
            Layer::Conv(w, b) => Layer::Conv(w.clone().detach().require_grad(), b.clone().detach().require_grad()),
            Layer::Dense(w, b) => Layer::Dense(w.clone().detach().require_grad(), b.clone().detach().require_grad()),
        }
    }

    /// One SGD step of this layer's leaves: `w - lr * grad` (a tensor without a gradient, as
    /// a member that had no real example this step, keeps its value).
    fn sgd(&self, grads: &Gradients, lr: f64) -> Layer {
        fn step<const D: usize>(t: &Tensor<D>, grads: &Gradients, lr: f64) -> Tensor<D> {
            let value = t.clone().inner();
            match t.grad(grads) {
                Some(g) => (value - g.mul_scalar(lr)).autodiff(),
                None => value.autodiff(),
            }
        }
        match self {
            Layer::Conv(w, b) => Layer::Conv(step(w, grads, lr), step(b, grads, lr)),
            Layer::Dense(w, b) => Layer::Dense(step(w, grads, lr), step(b, grads, lr)),
        }
    }
}

/// FedProx's `sum over layers of ||w - anchor||^2`, of the `active` members only (`[G]`, 1 or 0).
fn proximal(leaves: &[Layer], anchors: &[Layer], active: Tensor<1>, g: usize) -> Tensor<1> {
    // Each tensor as `[G, rest]`: a member's rows (a convolution's `G * out` rows are member-major).
    fn member_sums<const D: usize>(w: &Tensor<D>, a: &Tensor<D>, g: usize) -> Tensor<1> {
        let diff = (w.clone() - a.clone().inner().autodiff()).square();
        let n = diff.dims().iter().product::<usize>();
        diff.reshape([g, n / g]).sum_dim(1).reshape([g])
    }
    let mut sum: Option<Tensor<1>> = None;
    for (l, a) in leaves.iter().zip(anchors) {
        let part = match (l, a) {
            (Layer::Conv(w, b), Layer::Conv(aw, ab)) => member_sums(w, aw, g) + member_sums(b, ab, g),
            (Layer::Dense(w, b), Layer::Dense(aw, ab)) => member_sums(w, aw, g) + member_sums(b, ab, g),
            _ => unreachable!("the anchors are the same model's layers"),
        };
        sum = Some(match sum.take() {
            Some(s) => s + part,
            None => part,
        });
    }
    (sum.expect("a model has layers") * active).sum()
}

/// A group trainer that cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// The backend is not usable.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The model has no stacked form.
    #[error("{0} has no stacked form for many devices per launch (the dense models and the CNN do)")]
    Model(ModelKind),
    /// The model's layout.
    #[error(transparent)]
    Convert(#[from] ConvertError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Trainer;
    use fedge_core::dataset::embedded;
    use fedge_core::rng::derive_rng;

    fn max_diff(a: &ModelParams, b: &ModelParams) -> f32 {
        a.data().iter().zip(b.data()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    /// Three devices with 25, 40 and 13 examples (short last batches, schedules of different
    /// lengths) trained together equal each trained alone on the same backend, on every
    /// backend; with FedProx too.
    #[test]
    fn a_group_trains_each_member_as_it_would_train_alone() {
        let data = embedded::mnist_subset().unwrap();
        let shards: Vec<Vec<usize>> = vec![(0..25).collect(), (100..140).collect(), (300..313).collect()];
        let plain = TrainConfig::sgd(2, 10, 0.05);
        let prox = TrainConfig { proximal_mu: Some(0.5), ..plain };
        for backend in crate::test_backends() {
            for (kind, config) in [(ModelKind::TwoNn, plain), (ModelKind::Cnn, plain), (ModelKind::Mlp, prox)] {
                let mut single = Trainer::new(kind, 10, backend).unwrap();
                let starts: Vec<ModelParams> = (0..3).map(|d| single.initial_params(10 + d)).collect();
                let alone: Vec<TrainOutput> = (0..3)
                    .map(|d| {
                        let mut rng = derive_rng(7, &[d as u64]);
                        single.train(&starts[d], &data.train, &shards[d], &config, &mut rng).unwrap()
                    })
                    .collect();
                let mut group = GroupTrainer::new(kind, 10, backend).unwrap();
                let mut rngs: Vec<_> = (0..3).map(|d| derive_rng(7, &[d as u64])).collect();
                let mut members: Vec<Member<'_, _>> = rngs
                    .iter_mut()
                    .enumerate()
                    .map(|(d, rng)| Member { start: &starts[d], indices: &shards[d], rng })
                    .collect();
                let together = group.train(&data.train, &mut members, &config).unwrap();
                for (d, (a, t)) in alone.iter().zip(&together).enumerate() {
                    let diff = max_diff(&a.params, &t.params);
                    assert!(diff < 1e-5, "{backend} {kind} member {d}: parameters differ by {diff}");
                    assert_eq!(a.steps, t.steps, "{backend} {kind} member {d}");
                    assert!((a.mean_loss - t.mean_loss).abs() < 1e-5, "{backend} {kind} member {d}");
                    assert!(max_diff(&a.params, &starts[d]) > 1e-3, "member {d} trained");
                }
            }
        }
    }

    #[test]
    fn text_models_and_foreign_parameters_are_refused() {
        assert!(matches!(GroupTrainer::new(ModelKind::Lstm, 80, BackendKind::Flex), Err(GroupError::Model(_))));
        let data = embedded::mnist_subset().unwrap();
        let cnn = Trainer::new(ModelKind::Cnn, 10, BackendKind::Flex).unwrap().initial_params(1);
        let mut group = GroupTrainer::new(ModelKind::TwoNn, 10, BackendKind::Flex).unwrap();
        let mut rng = derive_rng(1, &[]);
        let idx = [0usize, 1, 2];
        let mut members = vec![Member { start: &cnn, indices: &idx, rng: &mut rng }];
        assert!(group.train(&data.train, &mut members, &TrainConfig::sgd(1, 2, 0.1)).is_err());
        let none: &mut [Member<'_, fedge_core::rng::SeededRng>] = &mut [];
        assert!(group.train(&data.train, none, &TrainConfig::sgd(1, 2, 0.1)).unwrap().is_empty());
    }
}
