//! The CNN: two 5x5 convolutions (32 and 64 channels, "same" padding) each followed by 2x2
//! max-pooling, a 512-unit ReLU layer, and a linear output.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d, Relu};
use burn::tensor::{Device, Tensor};

/// The McMahan et al. CNN for 28x28 single-channel images.
#[derive(Module, Debug)]
pub struct Cnn {
    conv1: Conv2d,
    conv2: Conv2d,
    pool: MaxPool2d,
    fc1: Linear,
    fc2: Linear,
    activation: Relu,
}

impl Cnn {
    /// A new CNN on `device`.
    pub fn init(classes: usize, device: &Device) -> Self {
        Self {
            conv1: Conv2dConfig::new([1, 32], [5, 5]).with_padding(PaddingConfig2d::Same).init(device),
            conv2: Conv2dConfig::new([32, 64], [5, 5]).with_padding(PaddingConfig2d::Same).init(device),
            pool: MaxPool2dConfig::new([2, 2]).init(),
            fc1: LinearConfig::new(7 * 7 * 64, 512).init(device),
            fc2: LinearConfig::new(512, classes).init(device),
            activation: Relu::new(),
        }
    }

    /// Logits for images `[batch, 1, 28, 28]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let x = self.pool.forward(self.activation.forward(self.conv1.forward(x)));
        let x = self.pool.forward(self.activation.forward(self.conv2.forward(x)));
        let x = self.activation.forward(self.fc1.forward(x.flatten(1, 3)));
        self.fc2.forward(x)
    }
}
