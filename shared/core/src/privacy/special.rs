//! Special functions in log space for the accountant and the analytic Gaussian mechanism:
//! the quantities involved run from 1e-300 to 1e300, so everything is kept as a logarithm.

use libm::erfc;
use statrs::function::gamma::ln_gamma;

/// `ln(e^a + e^b)`.
pub(crate) fn log_add(a: f64, b: f64) -> f64 {
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    (lo - hi).exp().ln_1p() + hi
}

/// `ln |Γ(x)|`, also for negative non-integer `x` (by reflection).
pub(crate) fn ln_abs_gamma(x: f64) -> f64 {
    if x < 0.5 {
        std::f64::consts::PI.ln() - (std::f64::consts::PI * x).sin().abs().ln() - ln_gamma(1.0 - x)
    } else {
        ln_gamma(x)
    }
}

/// `ln |binom(n, k)|` for real `n` (the generalised binomial coefficient).
pub(crate) fn ln_abs_binom(n: f64, k: f64) -> f64 {
    ln_abs_gamma(n + 1.0) - ln_abs_gamma(k + 1.0) - ln_abs_gamma(n - k + 1.0)
}

/// `ln(erfc(x))`, accurate far into the tail where `erfc` underflows.
pub(crate) fn log_erfc(x: f64) -> f64 {
    if x < 25.0 {
        return erfc(x).ln();
    }
    // Asymptotic series: erfc(x) = exp(-x^2) / (x sqrt(pi)) * sum (-1)^n (2n-1)!! / (2x^2)^n.
    let inv = 1.0 / (2.0 * x * x);
    let mut term = 1.0;
    let mut sum = 1.0;
    for n in 1..12 {
        term *= -((2 * n - 1) as f64) * inv;
        sum += term;
    }
    -x * x - x.ln() - 0.5 * std::f64::consts::PI.ln() + sum.ln()
}

/// `ln Φ(x)`, the log of the standard normal CDF.
pub(crate) fn log_ndtr(x: f64) -> f64 {
    log_erfc(-x / std::f64::consts::SQRT_2) - std::f64::consts::LN_2
}

/// Φ(x), the standard normal CDF.
pub(crate) fn ndtr(x: f64) -> f64 {
    0.5 * erfc(-x / std::f64::consts::SQRT_2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(a: f64, b: f64) -> f64 {
        ((a - b) / b).abs()
    }

    #[test]
    fn log_erfc_is_continuous_across_the_switch_and_right_in_the_tail() {
        // Reference values from mpmath (50 digits): log(erfc(x)).
        for (x, want) in [
            (0.5, -0.735_011_129_837_084_4),
            (5.0, -27.200_889_545_537_434),
            (24.999, -628.742_000_237_021),
            (25.0, -628.792_039_174_072),
            (30.0, -903.974_117_110_644),
            (100.0, -10_005.177_585_122_664),
        ] {
            assert!(rel(log_erfc(x), want) < 1e-12, "x={x}: {} vs {want}", log_erfc(x));
        }
        assert!((log_erfc(-3.0) - (2.0f64 - 2.209049699858544e-5).ln()).abs() < 1e-15);
    }

    #[test]
    fn binomials_match_exact_values() {
        assert!((ln_abs_binom(10.0, 3.0) - 120f64.ln()).abs() < 1e-12);
        assert!((ln_abs_binom(1024.0, 512.0) - 706.090_941_497_353).abs() < 1e-9);
        // binom(2.5, 4) = 2.5*1.5*0.5*(-0.5)/24 = -0.0390625
        assert!((ln_abs_binom(2.5, 4.0) - 0.0390625f64.ln()).abs() < 1e-12);
        assert!((log_add(1.0f64.ln(), 2.0f64.ln()) - 3.0f64.ln()).abs() < 1e-15);
        assert_eq!(log_add(f64::NEG_INFINITY, 0.5), 0.5);
        assert!((log_ndtr(0.0) - 0.5f64.ln()).abs() < 1e-15);
        assert!((ndtr(1.0) - 0.8413447460685429).abs() < 1e-15);
    }
}
