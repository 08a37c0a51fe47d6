//! Rényi-DP accounting of the Poisson-subsampled Gaussian mechanism (Mironov, Talwar and Zhang
//! 2019, "Rényi Differential Privacy of the Sampled Gaussian Mechanism"), for integer and
//! fractional orders, in log space; conversion to (epsilon, delta) with the improved bound of
//! Canonne, Kamath and Steinke 2020 (Proposition 12) / Asoodeh et al. 2020.
//!
//! Each step releases a sum over a Poisson sample (rate `q`) of contributions bounded in L2 by
//! `C`, plus N(0, (z C)^2) noise; `z` is the noise multiplier. Steps compose by adding RDP at
//! each order, so rounds with different `q` and `z` compose too. The numbers agree with Google's
//! `dp-accounting` `RdpAccountant` (checked against recorded values in `tests/`).

use super::PrivacyError;
use super::special::{ln_abs_binom, log_add, log_erfc};

/// Fractional-order series give up after this many terms (the order is then skipped).
const MAX_FRAC_TERMS: usize = 1000;

/// The usual order grid: 1.1 to 10.9 in steps of 0.1, 11 to 63, 128, 256, 512, 1024.
pub fn default_orders() -> Vec<f64> {
    let mut v: Vec<f64> = (1..100).map(|x| 1.0 + x as f64 / 10.0).collect();
    v.extend((11..64).map(|x| x as f64));
    v.extend([128.0, 256.0, 512.0, 1024.0]);
    v
}

/// Checks the parameters of a subsampled Gaussian step.
pub fn check_step(sampling_rate: f64, noise_multiplier: f64) -> Result<(), PrivacyError> {
    if !(sampling_rate > 0.0 && sampling_rate <= 1.0) {
        return Err(PrivacyError::SamplingRate(sampling_rate));
    }
    if !(noise_multiplier > 0.0 && noise_multiplier.is_finite()) {
        return Err(PrivacyError::NoiseMultiplier(noise_multiplier));
    }
    Ok(())
}

/// Checks a delta.
pub fn check_delta(delta: f64) -> Result<(), PrivacyError> {
    if !(delta > 0.0 && delta < 1.0) {
        return Err(PrivacyError::Delta(delta));
    }
    Ok(())
}

fn log_a_int(q: f64, sigma: f64, alpha: u64) -> f64 {
    let (lq, l1q) = (q.ln(), (-q).ln_1p());
    let a = alpha as f64;
    let mut log_a = f64::NEG_INFINITY;
    for i in 0..=alpha {
        let i = i as f64;
        let s = ln_abs_binom(a, i) + i * lq + (a - i) * l1q + (i * i - i) / (2.0 * sigma * sigma);
        log_a = log_add(log_a, s);
    }
    log_a
}

fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    // The two halves of A_alpha, integrals over (-inf, z0] and [z0, inf) (Section 3.3 of
    // Mironov et al.), each a series whose terms eventually decrease.
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let (lq, l1q) = (q.ln(), (-q).ln_1p());
    let (mut last0, mut last1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let sqrt2s = std::f64::consts::SQRT_2 * sigma;
    for i in 0..MAX_FRAC_TERMS {
        let i = i as f64;
        let log_coef = ln_abs_binom(alpha, i);
        let j = alpha - i;
        let log_t0 = log_coef + i * lq + j * l1q;
        let log_t1 = log_coef + j * lq + i * l1q;
        let log_e0 = 0.5f64.ln() + log_erfc((i - z0) / sqrt2s);
        let log_e1 = 0.5f64.ln() + log_erfc((z0 - j) / sqrt2s);
        let log_s0 = log_t0 + (i * i - i) / (2.0 * sigma * sigma) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * sigma * sigma) + log_e1;
        log_a0 = log_add(log_a0, log_s0);
        log_a1 = log_add(log_a1, log_s1);
        let total = log_add(log_a0, log_a1);
        if log_s0 < last0 && log_s1 < last1 && log_s0.max(log_s1) < total - 30.0 {
            return total;
        }
        last0 = log_s0;
        last1 = log_s1;
    }
    f64::INFINITY
}

/// RDP at `order` of one step of the Poisson-subsampled Gaussian mechanism with sampling rate
/// `q` and noise multiplier `z`. Infinite when a fractional-order series does not converge (the
/// order is then useless, not wrong).
pub fn rdp_subsampled_gaussian(q: f64, z: f64, order: f64) -> f64 {
    if q == 0.0 {
        return 0.0;
    }
    if order.is_infinite() || z == 0.0 {
        return f64::INFINITY;
    }
    if q == 1.0 {
        return order / (2.0 * z * z);
    }
    let log_a = if order.fract() == 0.0 { log_a_int(q, z, order as u64) } else { log_a_frac(q, z, order) };
    log_a / (order - 1.0)
}

/// The smallest epsilon for `delta` over the orders, and the order that gives it.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct EpsilonAt {
    /// The (epsilon, delta)-DP epsilon.
    pub epsilon: f64,
    /// The Rényi order the bound came from.
    pub order: f64,
}

/// Converts RDP values to epsilon at `delta` with the improved conversion
/// `eps = rdp + ln(1 - 1/a) - ln(delta * a) / (a - 1)`, and `eps = 0` where the KL bound
/// `delta >= sqrt(1 - exp(-rdp))` already holds.
pub fn epsilon_from_rdp(orders: &[f64], rdp: &[f64], delta: f64) -> Result<EpsilonAt, PrivacyError> {
    check_delta(delta)?;
    let mut best = EpsilonAt { epsilon: f64::INFINITY, order: orders.first().copied().unwrap_or(f64::NAN) };
    for (&a, &r) in orders.iter().zip(rdp) {
        let eps = if r < 0.0 || delta * delta + (-r).exp_m1() > 0.0 {
            0.0
        } else if a > 1.01 {
            r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
        } else {
            f64::INFINITY
        };
        // NaN (an infinite rdp at a huge order) never wins.
        if eps < best.epsilon {
            best = EpsilonAt { epsilon: eps, order: a };
        }
    }
    best.epsilon = best.epsilon.max(0.0);
    Ok(best)
}

/// Accumulated RDP of a sequence of subsampled Gaussian steps.
#[derive(Debug, Clone, PartialEq)]
pub struct RdpAccountant {
    orders: Vec<f64>,
    rdp: Vec<f64>,
}

impl Default for RdpAccountant {
    fn default() -> Self {
        Self::with_orders(default_orders()).expect("the default orders are valid")
    }
}

impl RdpAccountant {
    /// An accountant over the default orders ([`default_orders`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// An accountant over user-supplied orders (each finite and above 1).
    pub fn with_orders(orders: Vec<f64>) -> Result<Self, PrivacyError> {
        if orders.is_empty() {
            return Err(PrivacyError::Orders("no orders given".into()));
        }
        if let Some(&a) = orders.iter().find(|&&a| !(a > 1.0 && a.is_finite())) {
            return Err(PrivacyError::Orders(format!("order {a} is not a finite number above 1")));
        }
        let rdp = vec![0.0; orders.len()];
        Ok(Self { orders, rdp })
    }

    /// The orders tracked.
    pub fn orders(&self) -> &[f64] {
        &self.orders
    }

    /// RDP so far at each order.
    pub fn rdp(&self) -> &[f64] {
        &self.rdp
    }

    /// Composes `steps` steps of the Poisson-subsampled Gaussian mechanism.
    pub fn compose_subsampled_gaussian(&mut self, q: f64, z: f64, steps: u64) -> Result<(), PrivacyError> {
        check_step(q, z)?;
        if steps == 0 {
            return Err(PrivacyError::Steps);
        }
        for (r, &a) in self.rdp.iter_mut().zip(&self.orders) {
            *r += steps as f64 * rdp_subsampled_gaussian(q, z, a);
        }
        Ok(())
    }

    /// Epsilon at `delta` of everything composed so far.
    pub fn epsilon(&self, delta: f64) -> Result<EpsilonAt, PrivacyError> {
        epsilon_from_rdp(&self.orders, &self.rdp, delta)
    }
}

/// Epsilon at `delta` after `steps` steps with sampling rate `q` and noise multiplier `z`,
/// over the default orders.
pub fn epsilon(q: f64, z: f64, steps: u64, delta: f64) -> Result<EpsilonAt, PrivacyError> {
    check_delta(delta)?;
    let mut acc = RdpAccountant::new();
    acc.compose_subsampled_gaussian(q, z, steps)?;
    acc.epsilon(delta)
}

/// The smallest noise multiplier whose epsilon after `steps` steps at rate `q` is at most
/// `target_epsilon` at `delta` (to a relative precision of 1e-9 in `z`).
pub fn calibrate_noise_multiplier(target_epsilon: f64, delta: f64, q: f64, steps: u64) -> Result<f64, PrivacyError> {
    if !(target_epsilon > 0.0 && target_epsilon.is_finite()) {
        return Err(PrivacyError::Epsilon(target_epsilon));
    }
    check_delta(delta)?;
    check_step(q, 1.0)?;
    if steps == 0 {
        return Err(PrivacyError::Steps);
    }
    let eps = |z: f64| epsilon(q, z, steps, delta).map(|e| e.epsilon);
    // Bracket: eps(lo) > target >= eps(hi); epsilon falls as z grows.
    let mut hi = 1.0;
    while eps(hi)? > target_epsilon {
        hi *= 2.0;
        if hi > 1e6 {
            return Err(PrivacyError::Unreachable(target_epsilon));
        }
    }
    let mut lo = hi / 2.0;
    while eps(lo)? <= target_epsilon {
        hi = lo;
        lo /= 2.0;
        if lo < 1e-6 {
            return Ok(hi);
        }
    }
    while (hi - lo) / hi > 1e-9 {
        let mid = 0.5 * (lo + hi);
        if eps(mid)? <= target_epsilon {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_grid_has_the_usual_orders() {
        let o = default_orders();
        assert_eq!(o.len(), 99 + 53 + 4);
        assert_eq!((o[0], o[98], o[99], o[151], o[155]), (1.1, 10.9, 11.0, 63.0, 1024.0));
    }

    #[test]
    fn full_batch_is_the_plain_gaussian() {
        // q = 1: RDP of the Gaussian mechanism is a / (2 z^2) exactly.
        for a in [1.5, 2.0, 32.0] {
            assert_eq!(rdp_subsampled_gaussian(1.0, 2.0, a), a / 8.0);
        }
    }

    #[test]
    fn integer_order_two_matches_the_closed_form() {
        // For a = 2: A_2 = (1-q)^2 + 2q(1-q) + q^2 e^{1/z^2} = 1 + q^2 (e^{1/z^2} - 1).
        for (q, z) in [(0.01f64, 1.0f64), (0.3, 0.7), (0.9, 5.0)] {
            let want = (q * q * ((1.0 / (z * z)).exp() - 1.0)).ln_1p();
            let got = rdp_subsampled_gaussian(q, z, 2.0);
            assert!(((got - want) / want).abs() < 1e-9, "q={q} z={z}: {got} vs {want}");
        }
    }

    #[test]
    fn fractional_orders_sit_between_their_integer_neighbours() {
        // RDP is non-decreasing in the order.
        for (q, z) in [(0.01, 1.1), (0.1, 0.8), (0.5, 3.0)] {
            let r: Vec<f64> = [2.0, 2.5, 3.0, 3.5, 4.0].iter().map(|&a| rdp_subsampled_gaussian(q, z, a)).collect();
            assert!(r.windows(2).all(|w| w[0] <= w[1] * (1.0 + 1e-12)), "{r:?}");
        }
    }

    #[test]
    fn more_noise_or_fewer_steps_spend_less() {
        let e = |z, t| epsilon(0.01, z, t, 1e-5).unwrap().epsilon;
        assert!(e(1.0, 1000) > e(2.0, 1000));
        assert!(e(1.0, 1000) > e(1.0, 100));
        assert!(e(1.0, 100) > 0.0);
    }

    #[test]
    fn heterogeneous_steps_compose_by_adding_rdp() {
        let mut a = RdpAccountant::new();
        a.compose_subsampled_gaussian(0.1, 1.0, 3).unwrap();
        a.compose_subsampled_gaussian(0.02, 2.0, 5).unwrap();
        let mut b = RdpAccountant::new();
        b.compose_subsampled_gaussian(0.02, 2.0, 5).unwrap();
        for _ in 0..3 {
            b.compose_subsampled_gaussian(0.1, 1.0, 1).unwrap();
        }
        for (x, y) in a.rdp().iter().zip(b.rdp()) {
            assert!(x == y || (x - y).abs() <= 1e-12 * x.abs(), "{x} vs {y}");
        }
    }

    #[test]
    fn calibration_meets_the_target_and_is_tight() {
        let (target, delta, q, steps) = (2.0, 1e-5, 0.01, 500);
        let z = calibrate_noise_multiplier(target, delta, q, steps).unwrap();
        let at = epsilon(q, z, steps, delta).unwrap().epsilon;
        assert!(at <= target, "{at}");
        let below = epsilon(q, z * (1.0 - 1e-6), steps, delta).unwrap().epsilon;
        assert!(below > target, "z={z} is not the smallest: {below}");
    }

    #[test]
    fn bad_input_is_an_error_not_nan() {
        assert_eq!(epsilon(0.01, 0.0, 10, 1e-5), Err(PrivacyError::NoiseMultiplier(0.0)));
        assert_eq!(epsilon(0.01, -1.0, 10, 1e-5), Err(PrivacyError::NoiseMultiplier(-1.0)));
        assert!(matches!(epsilon(0.01, f64::NAN, 10, 1e-5), Err(PrivacyError::NoiseMultiplier(_))));
        assert_eq!(epsilon(0.0, 1.0, 10, 1e-5), Err(PrivacyError::SamplingRate(0.0)));
        assert_eq!(epsilon(1.5, 1.0, 10, 1e-5), Err(PrivacyError::SamplingRate(1.5)));
        assert_eq!(epsilon(0.1, 1.0, 10, 0.0), Err(PrivacyError::Delta(0.0)));
        assert_eq!(epsilon(0.1, 1.0, 10, 1.0), Err(PrivacyError::Delta(1.0)));
        assert_eq!(epsilon(0.1, 1.0, 0, 1e-5), Err(PrivacyError::Steps));
        assert!(RdpAccountant::with_orders(vec![0.5]).is_err());
        assert!(RdpAccountant::with_orders(vec![]).is_err());
        assert_eq!(calibrate_noise_multiplier(-1.0, 1e-5, 0.1, 10), Err(PrivacyError::Epsilon(-1.0)));
    }
}
