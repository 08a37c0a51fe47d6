//! The on-device student: a one-hidden-layer MLP (784-128-10 with ReLU, 101,770 parameters,
//! half of the 2NN; int8 on the wire, an eighth of its bytes), small enough to answer in tens of
//! microseconds on one core.

use burn::module::Module;
use burn::nn::{Linear, LinearConfig, Relu};
use burn::tensor::{Device, Tensor};

/// Hidden units of the student.
pub const HIDDEN: usize = 128;

/// MLP `inputs`-128-`classes`.
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
