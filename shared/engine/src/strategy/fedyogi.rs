//! FedYogi: Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2, after Zaheer et
//! al. 2018's Yogi: the [`Adaptive`] server optimiser with
//! `v <- v - (1 - beta2) Delta^2 sign(v - Delta^2)` (defaults eta 0.01, beta1 0.9, beta2 0.99,
//! tau 1e-3). Unlike Adam's, `v` grows or shrinks additively, so one large round does not
//! swamp it.

use super::fedopt::{Adaptive, SecondMoment};

/// Yogi's second moment: additive steps towards Delta^2.
#[derive(Debug, Clone, Copy)]
pub struct YogiMoment;

impl SecondMoment for YogiMoment {
    const NAME: &'static str = "fedyogi";

    fn update(v: f32, g2: f32, beta2: f32) -> f32 {
        // sign(0) = 0: v stays when it equals Delta^2.
        let sign = if v > g2 {
            1.0
        } else if v < g2 {
            -1.0
        } else {
            0.0
        };
        v - (1.0 - beta2) * g2 * sign
    }
}

/// Yogi on the server.
pub type FedYogi = Adaptive<YogiMoment>;
