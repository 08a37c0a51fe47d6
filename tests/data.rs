//! Dataset loaders against the real files and their published statistics.

use fedge_core::dataset::{DatasetName, Split, load_idx_dir};
use fedge_tests::shared_data_dir;

#[test]
fn mnist_matches_known_statistics() {
    let d = DatasetName::Mnist.load(&shared_data_dir()).unwrap();
    assert_eq!((d.train.len(), d.test.len()), (60_000, 10_000));
    assert_eq!((d.train.rows, d.train.cols), (28, 28));
    assert_eq!(d.train.label_counts(), vec![5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]);
    assert_eq!(&d.train.labels[..5], &[5, 0, 4, 1, 9]);
    assert_eq!(&d.test.labels[..5], &[7, 2, 1, 0, 4]);
    let (mean, std) = d.train.pixel_mean_std();
    assert!((mean - 0.1307).abs() < 5e-5, "mean {mean}");
    assert!((std - 0.3081).abs() < 5e-5, "std {std}");
}

#[test]
fn fashion_mnist_matches_known_statistics() {
    let d = DatasetName::FashionMnist.load(&shared_data_dir()).unwrap();
    assert_eq!(d.train.label_counts(), vec![6000; 10]);
    assert_eq!(d.test.label_counts(), vec![1000; 10]);
    assert_eq!(&d.train.labels[..5], &[9, 0, 0, 3, 0]);
    let (mean, std) = d.train.pixel_mean_std();
    assert!((mean - 0.2860).abs() < 5e-5, "mean {mean}");
    assert!((std - 0.3530).abs() < 5e-5, "std {std}");
}

#[test]
fn embedded_subset_is_the_head_of_mnist() {
    let full = load_idx_dir(&shared_data_dir().join("mnist"), Split::Test).unwrap();
    let emb = DatasetName::Embedded.load(std::path::Path::new("/nonexistent")).unwrap();
    assert_eq!(emb.test.images[..], full.images[..2000 * 784]);
    assert_eq!(emb.test.labels[..], full.labels[..2000]);
}

#[test]
fn missing_and_malformed_files_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = DatasetName::Mnist.load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("train-images-idx3-ubyte") && err.contains("no such file"), "{err}");
    assert!(!err.contains('\n'));
    let mnist = dir.path().join("mnist");
    std::fs::create_dir(&mnist).unwrap();
    std::fs::write(mnist.join("train-images-idx3-ubyte"), b"not an idx file").unwrap();
    let err = DatasetName::Mnist.load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("train-images-idx3-ubyte") && err.contains("not an IDX file"), "{err}");
    // A gzip'd file cut short.
    let gz =
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/core/data/t10k-labels-idx1-ubyte.gz")).unwrap();
    std::fs::write(mnist.join("train-images-idx3-ubyte"), b"").unwrap();
    std::fs::remove_file(mnist.join("train-images-idx3-ubyte")).unwrap();
    std::fs::write(mnist.join("train-images-idx3-ubyte.gz"), &gz[..gz.len() / 2]).unwrap();
    let err = DatasetName::Mnist.load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("train-images-idx3-ubyte.gz"), "{err}");
}
