//! The 2NN: a multilayer perceptron with two hidden layers of 200 units and ReLU.

use burn::module::Module;
use burn::nn::{Linear, LinearConfig, Relu};
use burn::tensor::{Device, Tensor};

/// MLP `inputs`-200-200-`classes`.
#[derive(Module, Debug)]
pub struct TwoNn {
    fc1: Linear,
    fc2: Linear,
    fc3: Linear,
    activation: Relu,
}

impl TwoNn {
    /// A new 2NN on `device`.
    pub fn init(inputs: usize, classes: usize, device: &Device) -> Self {
        Self {
            fc1: LinearConfig::new(inputs, 200).init(device),
            fc2: LinearConfig::new(200, 200).init(device),
            fc3: LinearConfig::new(200, classes).init(device),
            activation: Relu::new(),
        }
    }

    /// Logits for flattened inputs `[batch, inputs]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let x = self.activation.forward(self.fc1.forward(x));
        let x = self.activation.forward(self.fc2.forward(x));
        self.fc3.forward(x)
    }
}
