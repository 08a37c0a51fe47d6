//! LEAF's next-character model for Shakespeare (Caldas et al. 2018; the same shape as McMahan et
//! al. 2017's): an 8-dimensional character embedding, two stacked LSTM layers, and a dense layer
//! from the last step's hidden state to the 80 character classes.

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig, Lstm, LstmConfig};
use burn::tensor::{Device, Int, Tensor};

/// Embedding width (LEAF's 8).
pub const EMBEDDING: usize = 8;

/// Embedding, LSTM `hidden`, LSTM `hidden`, dense to `classes`.
#[derive(Module, Debug)]
pub struct CharLstm {
    embedding: Embedding,
    lstm1: Lstm,
    lstm2: Lstm,
    output: Linear,
}

impl CharLstm {
    /// A new model over `classes` characters with `hidden` units per LSTM layer.
    pub fn init(classes: usize, hidden: usize, device: &Device) -> Self {
        Self {
            embedding: EmbeddingConfig::new(classes, EMBEDDING).init(device),
            lstm1: LstmConfig::new(EMBEDDING, hidden, true).init(device),
            lstm2: LstmConfig::new(hidden, hidden, true).init(device),
            output: LinearConfig::new(hidden, classes).init(device),
        }
    }

    /// Hidden units per LSTM layer.
    pub fn hidden(&self) -> usize {
        self.lstm1.d_hidden
    }

    /// Logits of the next character for sequences of character classes `[batch, steps]`.
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<2> {
        let [batch, steps] = tokens.dims();
        let x = self.embedding.forward(tokens);
        let (x, _) = self.lstm1.forward(x, None);
        let (x, _) = self.lstm2.forward(x, None);
        let hidden = x.dims()[2];
        let last: Tensor<2> = x.slice([0..batch, steps - 1..steps, 0..hidden]).reshape([batch, hidden]);
        self.output.forward(last)
    }
}
