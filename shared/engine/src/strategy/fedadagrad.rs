//! FedAdagrad: Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2: the
//! [`Adaptive`] server optimiser with `v <- v + Delta^2` (defaults eta 0.1, beta1 0.9, tau 1e-3;
//! beta2 unused).

use super::fedopt::{Adaptive, SecondMoment};

/// Adagrad's second moment: the sum of squares.
#[derive(Debug, Clone, Copy)]
pub struct AdagradMoment;

impl SecondMoment for AdagradMoment {
    const NAME: &'static str = "fedadagrad";

    fn update(v: f32, g2: f32, _beta2: f32) -> f32 {
        v + g2
    }
}

/// Adagrad on the server.
pub type FedAdagrad = Adaptive<AdagradMoment>;
