//! A small MNIST subset compiled into the binary: the first 10,000 training and the first
//! 2,000 test images (about 1.9 MB gzip'd; see `shared/core/data/README.md`).

use super::{Dataset, DatasetError, TrainTest, idx};

static TRAIN_IMAGES: &[u8] = include_bytes!("../../data/train-images-idx3-ubyte.gz");
static TRAIN_LABELS: &[u8] = include_bytes!("../../data/train-labels-idx1-ubyte.gz");
static TEST_IMAGES: &[u8] = include_bytes!("../../data/t10k-images-idx3-ubyte.gz");
static TEST_LABELS: &[u8] = include_bytes!("../../data/t10k-labels-idx1-ubyte.gz");

/// Decodes the embedded MNIST subset.
pub fn mnist_subset() -> Result<TrainTest, DatasetError> {
    let decode = |images: &[u8], labels: &[u8], what: &str| -> Result<Dataset, DatasetError> {
        let err = |reason| DatasetError::Format { path: format!("<embedded {what}>").into(), reason };
        Dataset::from_idx(idx::read_gz_bytes(images).map_err(err)?, idx::read_gz_bytes(labels).map_err(err)?)
    };
    Ok(TrainTest {
        train: decode(TRAIN_IMAGES, TRAIN_LABELS, "train")?,
        test: decode(TEST_IMAGES, TEST_LABELS, "test")?,
        natural: None,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn embedded_subset_is_mnist() {
        let d = super::mnist_subset().unwrap();
        assert_eq!((d.train.len(), d.test.len()), (10_000, 2_000));
        assert_eq!((d.train.rows, d.train.cols, d.train.num_classes), (28, 28, 10));
        assert_eq!(&d.train.labels[..5], &[5, 0, 4, 1, 9]);
        assert_eq!(&d.test.labels[..5], &[7, 2, 1, 0, 4]);
        assert!(d.train.label_counts().iter().all(|&c| c > 800));
    }
}
