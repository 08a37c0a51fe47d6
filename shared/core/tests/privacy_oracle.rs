//! fedge-core's accountant and analytic Gaussian against Google's dp-accounting 0.6.0.
//!
//! `data/privacy_oracle.json` was recorded by `make_privacy_oracle.py` (next to this file; the
//! command is in its docstring). Every value must agree to 1e-6 relative; orders where
//! dp-accounting's fractional-order series does not converge are null there and must be
//! infinite (skipped) here.

use fedge_core::privacy::analytic_gaussian::calibrate_analytic_gaussian;
use fedge_core::privacy::rdp::{
    RdpAccountant, calibrate_noise_multiplier, default_orders, epsilon, rdp_subsampled_gaussian,
};
use serde_json::Value;

const REL: f64 = 1e-6;

fn oracle() -> Value {
    let text = include_str!("data/privacy_oracle.json");
    serde_json::from_str(text).expect("oracle JSON")
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::INFINITY)
}

fn close(got: f64, want: f64) -> bool {
    if want.is_infinite() || got.is_infinite() {
        return got == want;
    }
    if want == 0.0 {
        return got.abs() < 1e-12;
    }
    ((got - want) / want).abs() <= REL
}

/// RDP values of order 1e-9 come out of a sum of terms near 1 in both implementations, so
/// both carry an absolute rounding error near 1e-15 (and both sit ~4e-4 relative from the
/// exact integral at q = 1e-4, order 1.1, as mpmath shows). Such values never decide epsilon;
/// they get an absolute floor of 1e-13.
fn close_rdp(got: f64, want: f64) -> bool {
    close(got, want) || (got.is_finite() && want.is_finite() && (got - want).abs() < 1e-13)
}

#[test]
fn default_orders_are_dp_accountings() {
    let o = oracle();
    let want: Vec<f64> = o["default_orders"].as_array().unwrap().iter().map(f).collect();
    assert_eq!(default_orders(), want);
}

#[test]
fn rdp_per_order_matches() {
    let o = oracle();
    let orders = default_orders();
    let mut checked = 0;
    for case in o["rdp"].as_array().unwrap() {
        let (q, z) = (f(&case["q"]), f(&case["z"]));
        for (a, want) in orders.iter().zip(case["rdp"].as_array().unwrap()) {
            let got = rdp_subsampled_gaussian(q, z, *a);
            assert!(close_rdp(got, f(want)), "q={q} z={z} order={a}: {got} vs {want}");
            checked += 1;
        }
    }
    assert_eq!(checked, 9 * 8 * 156);
}

#[test]
fn epsilon_matches_over_the_grid() {
    let o = oracle();
    let cases = o["epsilon"].as_array().unwrap();
    assert_eq!(cases.len(), 9 * 8 * 5 * 3);
    let mut worst = 0.0f64;
    for c in cases {
        let (q, z, steps, delta) = (f(&c["q"]), f(&c["z"]), c["steps"].as_u64().unwrap(), f(&c["delta"]));
        let got = epsilon(q, z, steps, delta).unwrap();
        let want = f(&c["epsilon"]);
        assert!(close(got.epsilon, want), "q={q} z={z} T={steps} delta={delta}: {} vs {want}", got.epsilon);
        if want > 0.0 && want.is_finite() {
            worst = worst.max(((got.epsilon - want) / want).abs());
        }
        if want > 0.0 && want.is_finite() {
            assert_eq!(got.order, f(&c["order"]), "q={q} z={z} T={steps} delta={delta}: order");
        }
    }
    eprintln!("largest relative epsilon difference over the grid: {worst:e}");
}

#[test]
fn heterogeneous_compositions_match() {
    let o = oracle();
    for c in o["heterogeneous"].as_array().unwrap() {
        let mut acc = RdpAccountant::new();
        for e in c["events"].as_array().unwrap() {
            let e = e.as_array().unwrap();
            acc.compose_subsampled_gaussian(f(&e[0]), f(&e[1]), e[2].as_u64().unwrap()).unwrap();
        }
        let got = acc.epsilon(f(&c["delta"])).unwrap();
        assert!(close(got.epsilon, f(&c["epsilon"])), "{c}: {}", got.epsilon);
        assert_eq!(got.order, f(&c["order"]), "{c}");
    }
}

#[test]
fn user_supplied_fractional_orders_match() {
    let o = oracle();
    for c in o["custom_orders"].as_array().unwrap() {
        let orders: Vec<f64> = c["orders"].as_array().unwrap().iter().map(f).collect();
        let (q, z) = (f(&c["q"]), f(&c["z"]));
        for (a, want) in orders.iter().zip(c["rdp"].as_array().unwrap()) {
            let got = rdp_subsampled_gaussian(q, z, *a);
            assert!(close_rdp(got, f(want)), "q={q} z={z} order={a}: {got} vs {want}");
        }
        let mut acc = RdpAccountant::with_orders(orders).unwrap();
        acc.compose_subsampled_gaussian(q, z, c["steps"].as_u64().unwrap()).unwrap();
        let got = acc.epsilon(f(&c["delta"])).unwrap();
        assert!(close(got.epsilon, f(&c["epsilon"])), "{c}: {}", got.epsilon);
        assert_eq!(got.order, f(&c["order"]));
    }
}

#[test]
fn calibration_matches() {
    let o = oracle();
    for c in o["calibrate"].as_array().unwrap() {
        let got = calibrate_noise_multiplier(
            f(&c["target_epsilon"]),
            f(&c["delta"]),
            f(&c["q"]),
            c["steps"].as_u64().unwrap(),
        )
        .unwrap();
        assert!(close(got, f(&c["noise_multiplier"])), "{c}: {got}");
    }
}

#[test]
fn analytic_gaussian_matches() {
    let o = oracle();
    for c in o["analytic_gaussian"].as_array().unwrap() {
        let got = calibrate_analytic_gaussian(f(&c["epsilon"]), f(&c["delta"]), 1.0).unwrap();
        assert!(close(got, f(&c["sigma"])), "{c}: {got}");
    }
}
