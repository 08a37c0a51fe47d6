//! FedAdam: Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2: the
//! [`Adaptive`] server optimiser with `v <- beta2 v + (1 - beta2) Delta^2` (defaults eta 0.01,
//! beta1 0.9, beta2 0.99, tau 1e-3).

use super::fedopt::{Adaptive, SecondMoment};

/// Adam's second moment: an exponential moving average.
#[derive(Debug, Clone, Copy)]
pub struct AdamMoment;

impl SecondMoment for AdamMoment {
    const NAME: &'static str = "fedadam";

    fn update(v: f32, g2: f32, beta2: f32) -> f32 {
        beta2 * v + (1.0 - beta2) * g2
    }
}

/// Adam on the server.
pub type FedAdam = Adaptive<AdamMoment>;
