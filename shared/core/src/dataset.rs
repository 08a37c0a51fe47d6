//! Datasets: image classification sets as flat `u8` pixels plus labels.
//!
//! [`idx`] reads the IDX format (optionally gzip'd) that MNIST and Fashion-MNIST ship in;
//! [`embedded`] is a small MNIST subset compiled into the binary so the first README command
//! needs no download.

pub mod embedded;
pub mod idx;
pub mod text;

use std::path::{Path, PathBuf};

use thiserror::Error;

/// Which split of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Training images.
    Train,
    /// Test images.
    Test,
}

/// An image classification dataset held in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    /// Height of each image.
    pub rows: usize,
    /// Width of each image.
    pub cols: usize,
    /// `len() * rows * cols` pixels, row-major, 0..=255.
    pub images: Vec<u8>,
    /// One label per image, `0..num_classes`.
    pub labels: Vec<u8>,
    /// Number of classes.
    pub num_classes: usize,
}

impl Dataset {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Pixels per image.
    pub fn pixels(&self) -> usize {
        self.rows * self.cols
    }

    /// The pixels of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        let p = self.pixels();
        &self.images[i * p..(i + 1) * p]
    }

    /// Count of each label.
    pub fn label_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.num_classes];
        for &l in &self.labels {
            counts[l as usize] += 1;
        }
        counts
    }

    /// Mean and standard deviation of all pixels scaled to [0, 1].
    pub fn pixel_mean_std(&self) -> (f64, f64) {
        let n = self.images.len() as f64;
        let (s, s2) = self.images.iter().fold((0.0f64, 0.0f64), |(s, s2), &p| {
            let x = p as f64 / 255.0;
            (s + x, s2 + x * x)
        });
        let mean = s / n;
        (mean, (s2 / n - mean * mean).max(0.0).sqrt())
    }

    /// Builds a dataset from IDX image and label arrays, checking that they agree.
    pub fn from_idx(images: idx::IdxArray, labels: idx::IdxArray) -> Result<Self, DatasetError> {
        if images.dims.len() != 3 {
            return Err(DatasetError::Shape(format!("images must have 3 dimensions, found {:?}", images.dims)));
        }
        if labels.dims.len() != 1 {
            return Err(DatasetError::Shape(format!("labels must have 1 dimension, found {:?}", labels.dims)));
        }
        if images.dims[0] != labels.dims[0] {
            return Err(DatasetError::Shape(format!("{} images but {} labels", images.dims[0], labels.dims[0])));
        }
        let num_classes = labels.data.iter().copied().max().map_or(0, |m| m as usize + 1);
        Ok(Self {
            rows: images.dims[1],
            cols: images.dims[2],
            images: images.data,
            labels: labels.data,
            num_classes: num_classes.max(10),
        })
    }
}

/// A dataset's train and test splits.
#[derive(Debug, Clone)]
pub struct TrainTest {
    /// Training split, partitioned over devices.
    pub train: Dataset,
    /// Test split, for server-side evaluation.
    pub test: Dataset,
    /// For a naturally partitioned dataset (Shakespeare: one client per speaking role), the
    /// client of each training example, numbered from 0 (`Partition::Natural` deals them).
    pub natural: Option<Vec<u32>>,
}

/// Errors reading a dataset.
#[derive(Debug, Error)]
pub enum DatasetError {
    /// A file could not be opened or read.
    #[error("cannot read {path}: {cause}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        cause: std::io::Error,
    },
    /// A file is not valid IDX.
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Images and labels disagree.
    #[error("{0}")]
    Shape(String),
}

/// The datasets Fedge knows by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetName {
    /// The MNIST subset compiled into the binary (10,000 train, 2,000 test).
    #[default]
    Embedded,
    /// MNIST, from `DATA_DIR/mnist/`.
    Mnist,
    /// Fashion-MNIST, from `DATA_DIR/fashion-mnist/`.
    FashionMnist,
    /// Shakespeare next-character prediction by speaking role (LEAF), from
    /// `DATA_DIR/shakespeare/speeches.tsv.gz`.
    Shakespeare,
    /// The two plays of Shakespeare compiled into the binary.
    ShakespeareSample,
}

impl std::str::FromStr for DatasetName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "embedded" => Ok(Self::Embedded),
            "mnist" => Ok(Self::Mnist),
            "fashion-mnist" => Ok(Self::FashionMnist),
            "shakespeare" => Ok(Self::Shakespeare),
            "shakespeare-sample" => Ok(Self::ShakespeareSample),
            other => Err(format!(
                "unknown dataset `{other}` (expected embedded, mnist, fashion-mnist, shakespeare or shakespeare-sample)"
            )),
        }
    }
}

impl std::fmt::Display for DatasetName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Embedded => "embedded",
            Self::Mnist => "mnist",
            Self::FashionMnist => "fashion-mnist",
            Self::Shakespeare => "shakespeare",
            Self::ShakespeareSample => "shakespeare-sample",
        })
    }
}

impl DatasetName {
    /// Loads both splits; `data_dir` holds one folder per dataset (`mnist/`, `fashion-mnist/`,
    /// `shakespeare/`) and is not read for the embedded sets.
    pub fn load(self, data_dir: &Path) -> Result<TrainTest, DatasetError> {
        let text = |d: text::TextData| d.data;
        match self {
            Self::Embedded => embedded::mnist_subset(),
            Self::Mnist => load_idx_dir_pair(&data_dir.join("mnist")),
            Self::FashionMnist => load_idx_dir_pair(&data_dir.join("fashion-mnist")),
            Self::Shakespeare => {
                let dir = data_dir.join("shakespeare");
                let path = ["speeches.tsv.gz", "speeches.tsv"].iter().map(|n| dir.join(n)).find(|p| p.is_file());
                let path = path.ok_or_else(|| DatasetError::Io {
                    path: dir.join("speeches.tsv[.gz]"),
                    cause: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
                })?;
                text::read_speeches_file(&path).map(text)
            }
            Self::ShakespeareSample => text::embedded_sample().map(text),
        }
    }

    /// Whether the dataset is text (next-character prediction) rather than images.
    pub fn is_text(self) -> bool {
        matches!(self, Self::Shakespeare | Self::ShakespeareSample)
    }

    /// This dataset where only images will do (the coordinator, devices, hybrid inference):
    /// a text dataset is refused with a one-line reason.
    pub fn images_only(self) -> Result<Self, String> {
        if self.is_text() {
            return Err(format!(
                "dataset `{self}` is text: only the simulator (`fedge-sim run`) trains on text for now; the coordinator and devices take embedded, mnist or fashion-mnist"
            ));
        }
        Ok(self)
    }
}

/// Loads the standard MNIST-style file pair for `split` from `dir`: `train-images-idx3-ubyte`
/// and `train-labels-idx1-ubyte` (or `t10k-*` for the test split), each optionally `.gz`.
pub fn load_idx_dir(dir: &Path, split: Split) -> Result<Dataset, DatasetError> {
    let prefix = match split {
        Split::Train => "train",
        Split::Test => "t10k",
    };
    let images = idx::read_file(&find(dir, &format!("{prefix}-images-idx3-ubyte"))?)?;
    let labels = idx::read_file(&find(dir, &format!("{prefix}-labels-idx1-ubyte"))?)?;
    Dataset::from_idx(images, labels)
}

/// Loads both splits from `dir`.
pub fn load_idx_dir_pair(dir: &Path) -> Result<TrainTest, DatasetError> {
    Ok(TrainTest { train: load_idx_dir(dir, Split::Train)?, test: load_idx_dir(dir, Split::Test)?, natural: None })
}

fn find(dir: &Path, stem: &str) -> Result<PathBuf, DatasetError> {
    for name in [format!("{stem}.gz"), stem.to_string()] {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(DatasetError::Io {
        path: dir.join(format!("{stem}[.gz]")),
        cause: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
    })
}
