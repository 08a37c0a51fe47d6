use std::sync::Arc;

use fedge_core::params::{ParamLayout, TensorSpec};

use super::*;

fn layout(n: usize) -> Arc<ParamLayout> {
    Arc::new(ParamLayout::new(vec![TensorSpec { name: "w".into(), shape: vec![n] }]).unwrap())
}

fn params(values: &[f32]) -> ModelParams {
    ModelParams::new(layout(values.len()), values.to_vec()).unwrap()
}

fn attack(kind: AttackKind, devices: usize, fraction: f64) -> Attack {
    let config = SimConfig { attack: Some(kind), attackers: fraction, devices, seed: 7, ..SimConfig::default() };
    config.validate().unwrap();
    let train = Dataset { rows: 1, cols: 1, images: vec![], labels: vec![], num_classes: 10 };
    Attack::from_config(&config, &train, &BTreeMap::new()).unwrap()
}

/// Applies `a` to `values` as one attacker's delta (device 3, round 2, 10 selected, 1 attacker).
fn apply_one(a: &Attack, values: &[f32]) -> Vec<f32> {
    let mut d = params(values);
    a.apply(2, 10, 1, &mut [(3, &mut d)]);
    d.into_data()
}

#[test]
fn names_parse_and_unknown_ones_are_refused_in_one_line() {
    for (name, kind) in AttackKind::ALL {
        assert_eq!(name.parse::<AttackKind>(), Ok(kind));
        assert_eq!(kind.to_string(), name);
    }
    let err = "sign_flip".parse::<AttackKind>().unwrap_err();
    assert_eq!(err, "unknown attack `sign_flip` (expected sign-flip, scale, noise, label-flip, little-is-enough)");
}

#[test]
fn sign_flip_negates_and_scale_multiplies() {
    let a = attack(AttackKind::SignFlip, 10, 0.2);
    assert_eq!(apply_one(&a, &[1.0, -2.0, 0.5]), vec![-1.0, 2.0, -0.5]);
    let mut a = attack(AttackKind::Scale, 10, 0.2);
    assert_eq!(apply_one(&a, &[1.0, -2.0, 0.5]), vec![10.0, -20.0, 5.0]);
    a.scale = -3.0;
    assert_eq!(apply_one(&a, &[1.0, -2.0, 0.5]), vec![-3.0, 6.0, -1.5]);
    // Label flipping changes the training data, not the update.
    let a = attack(AttackKind::LabelFlip, 10, 0.2);
    assert_eq!(apply_one(&a, &[1.0, -2.0, 0.5]), vec![1.0, -2.0, 0.5]);
}

#[test]
fn noise_is_seeded_per_round_and_device_and_has_the_configured_std() {
    let mut a = attack(AttackKind::Noise, 10, 0.2);
    a.noise_std = 2.0;
    let honest = vec![0.25f32; 20_000];
    let one = apply_one(&a, &honest);
    assert_eq!(one, apply_one(&a, &honest), "same round and device, same noise");
    let mut other = params(&honest);
    a.apply(2, 10, 1, &mut [(4, &mut other)]);
    assert_ne!(one, other.into_data(), "another device draws other noise");
    let mut later = params(&honest);
    a.apply(3, 10, 1, &mut [(3, &mut later)]);
    assert_ne!(one, later.into_data(), "another round draws other noise");
    let n = one.len() as f64;
    let mean = one.iter().map(|&x| x as f64).sum::<f64>() / n;
    let std = (one.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
    assert!(mean.abs() < 0.05, "mean {mean}: the honest delta must not leak through");
    assert!((std - 2.0).abs() < 0.05, "std {std}");
}

#[test]
fn little_is_enough_z_follows_the_paper() {
    // n = 10, f = 3: s = floor(10/2 + 1) - 3 = 3, z = Phi^-1(7/10) = 0.524400512708041.
    assert!((little_is_enough_z(10, 3) - 0.524_400_512_708_041).abs() < 1e-7, "{}", little_is_enough_z(10, 3));
    // n = 50, f = 12 (a paper setting): s = 26 - 12 = 14, z = Phi^-1(36/50) = 0.582841507271216.
    assert!((little_is_enough_z(50, 12) - 0.582_841_507_271_216).abs() < 1e-7);
    // A majority of attackers: s is taken as 1, z = Phi^-1(9/10).
    assert!((little_is_enough_z(10, 8) - 1.281_551_565_544_601).abs() < 1e-7);
    assert_eq!(little_is_enough_z(1, 1), 0.0);
    assert_eq!(little_is_enough_z(2, 2), 0.0);
}

#[test]
fn little_is_enough_sends_mean_minus_z_std_to_every_attacker() {
    let a = attack(AttackKind::LittleIsEnough, 10, 0.3);
    let (mut d1, mut d2, mut d3) = (params(&[1.0, 0.0, -1.0]), params(&[2.0, 0.0, 1.0]), params(&[3.0, 0.0, 3.0]));
    // 10 selected, 3 attackers: z = Phi^-1(0.7). Coordinate 0: mu 2, sample std 1;
    // coordinate 1: mu 0, std 0; coordinate 2: mu 1, std 2.
    a.apply(1, 10, 3, &mut [(0, &mut d1), (1, &mut d2), (2, &mut d3)]);
    let z = 0.524_400_512_708_041_f64;
    let want = [(2.0 - z) as f32, 0.0, (1.0 - 2.0 * z) as f32];
    for d in [d1, d2, d3] {
        for (got, want) in d.data().iter().zip(want) {
            assert!((got - want).abs() < 1e-6, "{:?} vs {want:?}", d.data());
        }
    }
    // attack_z overrides z.
    let mut a = a;
    a.z = Some(2.0);
    let (mut d1, mut d2) = (params(&[0.0]), params(&[2.0]));
    a.apply(1, 10, 2, &mut [(0, &mut d1), (1, &mut d2)]);
    // mu 1, sample std sqrt(2).
    let want = (1.0 - 2.0 * 2f64.sqrt()) as f32;
    assert!((d1.data()[0] - want).abs() < 1e-6 && d2.data() == d1.data(), "{:?}", d1.data());
}

#[test]
fn a_lone_little_is_enough_attacker_sends_its_own_mean() {
    let a = attack(AttackKind::LittleIsEnough, 10, 0.3);
    let mut d = params(&[0.5, -0.25]);
    a.apply(1, 10, 1, &mut [(0, &mut d)]);
    assert_eq!(d.data(), &[0.5, -0.25]);
}

#[test]
fn attackers_are_seeded_counted_and_stable() {
    let a = choose_attackers(7, 20, 0.3);
    assert_eq!(a.len(), 6);
    assert!(a.iter().all(|&d| d < 20));
    assert_eq!(a, choose_attackers(7, 20, 0.3), "same seed, same attackers");
    assert_ne!(a, choose_attackers(8, 20, 0.3), "another seed, other attackers");
    // Pinned: the choice must not move between releases (runs would not be comparable).
    assert_eq!(a.iter().copied().collect::<Vec<_>>(), PINNED_SEED7_20_03);
    assert_eq!(choose_attackers(7, 20, 0.25).len(), 5);
    assert_eq!(choose_attackers(7, 10, 0.25).len(), 3, "round(2.5) = 3");
    assert_eq!(choose_attackers(7, 10, 0.0).len(), 0);
    assert_eq!(attack(AttackKind::Noise, 20, 0.3).attackers(), &a);
}

const PINNED_SEED7_20_03: [DeviceId; 6] = [0, 1, 2, 7, 10, 12];

#[test]
fn label_flip_copies_only_the_attackers_examples_with_flipped_labels() {
    let train =
        Dataset { rows: 1, cols: 2, images: (0..12).collect(), labels: vec![0, 1, 2, 9, 4, 7], num_classes: 10 };
    let devices: BTreeMap<DeviceId, Arc<Vec<usize>>> =
        [(0, vec![0, 1]), (1, vec![5, 3]), (2, vec![2, 4])].into_iter().map(|(d, i)| (d, Arc::new(i))).collect();
    let attackers: BTreeSet<DeviceId> = [1, 2].into_iter().collect();
    let Flipped { data, indices } = flip_labels(&train, &devices, &attackers);
    assert_eq!(data.len(), 4, "device 0's examples are not copied");
    assert_eq!(data.labels, vec![2, 0, 7, 5]);
    assert_eq!(data.images, vec![10, 11, 6, 7, 4, 5, 8, 9]);
    assert_eq!(*indices[&1], vec![0, 1]);
    assert_eq!(*indices[&2], vec![2, 3]);
    assert!(!indices.contains_key(&0));
}
