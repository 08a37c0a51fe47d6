//! Per-update L2 clipping: bounds each device's contribution, the sensitivity every DP
//! guarantee here rests on.

/// Euclidean norm, accumulated in f64.
pub fn l2_norm(values: &[f32]) -> f64 {
    values.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>().sqrt()
}

/// What clipping did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClipOutcome {
    /// Norm before clipping.
    pub norm_before: f64,
    /// Factor applied (1.0 when the norm was already within the bound).
    pub scale: f64,
}

impl ClipOutcome {
    /// Whether the values were scaled down.
    pub fn clipped(&self) -> bool {
        self.scale < 1.0
    }
}

/// Scales `values` so that their L2 norm is at most `max_norm`; values already within the bound
/// are left untouched, bit for bit. `max_norm` must be positive and finite.
pub fn clip_l2(values: &mut [f32], max_norm: f64) -> ClipOutcome {
    assert!(max_norm.is_finite() && max_norm > 0.0, "clip norm must be positive and finite");
    let norm = l2_norm(values);
    if norm <= max_norm {
        return ClipOutcome { norm_before: norm, scale: 1.0 };
    }
    let scale = max_norm / norm;
    for v in values.iter_mut() {
        *v = (*v as f64 * scale) as f32;
    }
    ClipOutcome { norm_before: norm, scale }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::derive_rng;
    use rand::RngExt;

    #[test]
    fn clipping_bounds_norm_and_keeps_direction() {
        let mut rng = derive_rng(1, &[]);
        for &c in &[0.01, 0.5, 1.0, 10.0] {
            let orig: Vec<f32> = (0..10_000).map(|_| rng.random_range(-1.0..1.0)).collect();
            let mut v = orig.clone();
            let out = clip_l2(&mut v, c);
            assert!(out.clipped());
            // Norm is at most C (up to f32 rounding).
            assert!(l2_norm(&v) <= c * (1.0 + 1e-6), "norm {} > {c}", l2_norm(&v));
            assert!(l2_norm(&v) >= c * (1.0 - 1e-5));
            // Same direction: every value scaled by the same factor.
            for (a, b) in v.iter().zip(&orig) {
                assert!((*a as f64 - *b as f64 * out.scale).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn below_bound_is_untouched() {
        let orig = vec![0.3f32, -0.4, 0.0];
        let mut v = orig.clone();
        let out = clip_l2(&mut v, 0.5 + 1e-6);
        assert!(!out.clipped());
        assert_eq!(v, orig);
        assert!((out.norm_before - 0.5).abs() < 1e-7);
    }
}
