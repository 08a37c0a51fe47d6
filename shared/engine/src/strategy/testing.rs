//! Table-driven checks shared by the strategies' tests.

use std::sync::Arc;

use fedge_core::aggregate::AggregateError;
use fedge_core::{ModelParams, ParamLayout, TensorSpec};

use super::{Contribution, Strategy};

/// One table row: what it checks, the updates, the next model (from zero) or the error.
pub type Case<'a> = (&'a str, &'a [&'a [f32]], Result<&'a [f32], AggregateError>);

/// Parameters of one flat tensor holding `v`.
pub fn params(v: &[f32]) -> ModelParams {
    let layout = Arc::new(ParamLayout::new(vec![TensorSpec { name: "w".into(), shape: vec![v.len()] }]).unwrap());
    ModelParams::new(layout, v.to_vec()).unwrap()
}

/// A contribution of `delta` counting `num_samples`, unclipped.
pub fn contribution(delta: &ModelParams, num_samples: u64) -> Contribution<'_> {
    Contribution { delta, num_samples, clipped: false, clip_scale: 1.0 }
}

/// Runs each case `(what, updates, expected next model)` on a fresh strategy from `make`,
/// from a zero global model, every update counting one sample; values must match to 1e-5.
/// Each case also offers a NaN update first, which must be refused by `check` and
/// `accumulate` without changing the outcome (upstream refuses it too; this is the
/// strategy's own guard).
pub fn check<S: Strategy>(make: impl Fn() -> S, cases: &[Case]) {
    for (what, updates, want) in cases {
        let d = updates.first().map_or_else(|| want.as_ref().map_or(1, |w| w.len()), |u| u.len());
        let global = params(&vec![0.0; d]);
        let mut s = make();
        s.begin_round(1, &global, updates.len());
        let mut nan = vec![0.0; d];
        nan[0] = f32::NAN;
        let nan = params(&nan);
        assert!(matches!(s.check(contribution(&nan, 1)), Err(AggregateError::NonFinite(0))), "{what}: NaN checked");
        assert!(s.accumulate(contribution(&nan, 1)).is_err(), "{what}: NaN accumulated");
        for u in updates.iter() {
            let u = params(u);
            s.check(contribution(&u, 1)).unwrap();
            s.accumulate(contribution(&u, 1)).unwrap();
        }
        let got = s.aggregate_train(1, &global, 0);
        match (got, want) {
            (Ok(got), Ok(want)) => {
                let close = got.data().iter().zip(want.iter()).all(|(g, w)| (g - w).abs() <= 1e-5 * w.abs().max(1.0));
                assert!(close && got.numel() == want.len(), "{} {what}: got {:?}, want {want:?}", s.name(), got.data());
            }
            (got, want) => assert_eq!(
                got.map(|g| g.data().to_vec()),
                want.as_ref().map(|w| w.to_vec()).map_err(Clone::clone),
                "{what}"
            ),
        }
    }
}
