//! The on-device student: a one-hidden-layer MLP (784-64-10 with ReLU, 50,890 parameters, a
//! quarter of the 2NN), small enough to answer in well under a millisecond on one core.

use burn::module::Module;
use burn::nn::{Linear, LinearConfig, Relu};
use burn::tensor::{Device, Tensor};

/// Hidden units of the student.
pub const HIDDEN: usize = 64;

/// MLP `inputs`-64-`classes`.
#[derive(Module, Debug)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
    activation: Relu,
}

impl Mlp {
    /// A new student on `device`.
    pub fn init(inputs: usize, classes: usize, device: &Device) -> Self {
        Self {
            fc1: LinearConfig::new(inputs, HIDDEN).init(device),
            fc2: LinearConfig::new(HIDDEN, classes).init(device),
            activation: Relu::new(),
        }
    }

    /// Logits for flattened inputs `[batch, inputs]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.fc2.forward(self.activation.forward(self.fc1.forward(x)))
    }
}
