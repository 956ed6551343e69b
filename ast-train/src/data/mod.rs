//! Datasets and the host-side input pipeline.
//!
//! Readers for IDX files (MNIST, Fashion-MNIST), the CIFAR-10/100 binary formats and
//! ImageNet-style image folders; torchvision-style augmentations producing normalised `f32`
//! CHW samples; and a seeded, multi-threaded [`Loader`] whose batches are bit-identical
//! whatever the thread count and can be recomputed on resume.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

pub mod cifar;
pub mod dataset;
pub mod folder;
pub mod idx;
pub mod loader;
pub mod transform;

pub use cifar::{read_cifar10, read_cifar100, Cifar100Labels};
pub use dataset::{DatasetSource, ImageBatch, ImageBatcher, ImageItem};
pub use folder::ImageFolder;
pub use idx::{read_idx_images, read_idx_labels, read_mnist_dir};
pub use loader::{CifarSource, FolderSource, HostBatch, Loader, SampleSource};
pub use transform::{
    CifarTransform, ImagenetTransform, Normalize, CIFAR_MEAN, CIFAR_STD, FASHION_MNIST_MEAN,
    FASHION_MNIST_STD, IMAGENET_MEAN, IMAGENET_STD,
};

/// An in-memory labelled image dataset with `u8` pixels, stored CHW per image.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct ImageDataset {
    /// Channels per image (1 for MNIST, 3 for CIFAR).
    pub channels: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Image width in pixels.
    pub width: usize,
    /// Number of classes; every label is below it.
    pub classes: usize,
    /// All pixels, `N·C·H·W`, image after image, each in CHW order.
    pub images: Vec<u8>,
    /// One label per image.
    pub labels: Vec<u16>,
}

impl ImageDataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the dataset holds no image.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Bytes of one image (`C·H·W`).
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// The CHW pixels of image `i`.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_len();
        &self.images[i * n..(i + 1) * n]
    }

    /// The first `n` images (all of them if there are fewer).
    pub fn subset(&self, n: usize) -> ImageDataset {
        let n = n.min(self.len());
        ImageDataset {
            images: self.images[..n * self.image_len()].to_vec(),
            labels: self.labels[..n].to_vec(),
            ..*self
        }
    }
}

impl fmt::Debug for ImageDataset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageDataset")
            .field("len", &self.len())
            .field("channels", &self.channels)
            .field("height", &self.height)
            .field("width", &self.width)
            .field("classes", &self.classes)
            .finish_non_exhaustive()
    }
}

/// Everything that can go wrong while reading or decoding data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DataError {
    /// A data directory is missing.
    #[error("data directory {} does not exist", path.display())]
    MissingDir {
        /// The directory.
        path: PathBuf,
    },
    /// The data path exists but is not a directory.
    #[error(
        "{} is not a directory (a file, device or pipe): give the dataset's directory",
        path.display()
    )]
    NotADir {
        /// The path.
        path: PathBuf,
    },
    /// A file the format requires is missing from a directory.
    #[error("data directory {} has no {name}", dir.display())]
    MissingFile {
        /// The directory searched.
        dir: PathBuf,
        /// The file name(s) expected.
        name: String,
    },
    /// Reading a file or directory failed.
    #[error("{}: {message}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error's text.
        message: String,
    },
    /// A gzip stream could not be decompressed.
    #[error("{}: cannot decompress gzip data: {message}", path.display())]
    Gzip {
        /// The file.
        path: PathBuf,
        /// The decoder's error text.
        message: String,
    },
    /// A file of fixed-size records has a size that is not a multiple of the record size.
    #[error("{}: size {size} is not a whole number of {record}-byte {format} records", path.display())]
    RecordSize {
        /// The file.
        path: PathBuf,
        /// Its size in bytes.
        size: usize,
        /// The record size in bytes.
        record: usize,
        /// The format's name, e.g. `CIFAR-10`.
        format: &'static str,
    },
    /// An IDX file is shorter than its header.
    #[error("{}: file has {size} bytes, shorter than the {needed}-byte IDX header", path.display())]
    IdxHeader {
        /// The file.
        path: PathBuf,
        /// Its (decompressed) size.
        size: usize,
        /// The header size.
        needed: usize,
    },
    /// An IDX file has the wrong magic number.
    #[error("{}: wrong IDX magic {found:#010x} (expected {expected:#010x} for {kind})", path.display())]
    IdxMagic {
        /// The file.
        path: PathBuf,
        /// The magic number found.
        found: u32,
        /// The magic number expected.
        expected: u32,
        /// `images` or `labels`.
        kind: &'static str,
    },
    /// An IDX file holds fewer data bytes than its header announces.
    #[error("{}: truncated IDX file: header says {items} items of {item_bytes} bytes, file has {data_bytes} bytes of data", path.display())]
    IdxTruncated {
        /// The file.
        path: PathBuf,
        /// Items announced.
        items: u64,
        /// Bytes per item.
        item_bytes: u64,
        /// Data bytes present after the header.
        data_bytes: usize,
    },
    /// An IDX file holds more data bytes than its header announces.
    #[error("{}: IDX file has {extra} bytes after the {items} items its header announces", path.display())]
    IdxTrailing {
        /// The file.
        path: PathBuf,
        /// Items announced.
        items: u64,
        /// Bytes after the last item.
        extra: usize,
    },
    /// An image folder has no class subdirectory.
    #[error("image folder {} has no class directories", path.display())]
    NoClasses {
        /// The folder.
        path: PathBuf,
    },
    /// An image folder has class directories but no image in any of them.
    #[error("image folder {} has no images (.jpeg, .jpg or .png) in its class directories", path.display())]
    NoImages {
        /// The folder.
        path: PathBuf,
    },
    /// An image folder has more classes than a `u16` label can name.
    #[error("image folder {} has {count} class directories, more than 65536", path.display())]
    TooManyClasses {
        /// The folder.
        path: PathBuf,
        /// Its number of class directories.
        count: usize,
    },
    /// An image file could not be decoded.
    #[error("cannot decode image {}: {reason}", path.display())]
    Decode {
        /// The file.
        path: PathBuf,
        /// The decoder's error text.
        reason: String,
    },
    /// An image file and a label file hold different numbers of items.
    #[error("images and labels disagree: {images} images in {}, {labels} labels in {}", images_path.display(), labels_path.display())]
    CountMismatch {
        /// Number of images.
        images: usize,
        /// Number of labels.
        labels: usize,
        /// The image file.
        images_path: PathBuf,
        /// The label file.
        labels_path: PathBuf,
    },
    /// A label is not below the number of classes.
    #[error("label {label} out of range for {classes} classes in {}", path.display())]
    LabelRange {
        /// The label found.
        label: usize,
        /// The number of classes.
        classes: usize,
        /// The file it came from.
        path: PathBuf,
    },
    /// An item of a burn dataset that is not an image this pipeline takes.
    #[error("item {index} of the dataset: {reason}")]
    BadItem {
        /// Its index.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// A sample or batch index past the end.
    #[error("{what} index {index} out of range for {len} {what}s")]
    IndexOutOfRange {
        /// `sample` or `batch`.
        what: &'static str,
        /// The index asked for.
        index: usize,
        /// How many there are.
        len: usize,
    },
}

impl DataError {
    /// An [`DataError::Io`] for `path`, keeping the error's text.
    pub(crate) fn io(path: &Path, err: io::Error) -> Self {
        DataError::Io {
            path: path.to_path_buf(),
            message: err.to_string(),
        }
    }
}

/// Fails with [`DataError::MissingDir`] unless `dir` is a directory.
pub(crate) fn check_dir(dir: &Path) -> Result<(), DataError> {
    let path = dir.to_path_buf();
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(DataError::NotADir { path }),
        Err(_) => Err(DataError::MissingDir { path }),
    }
}

/// Reads a whole file, turning I/O errors into [`DataError::Io`].
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, DataError> {
    std::fs::read(path).map_err(|e| DataError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ImageDataset {
        ImageDataset {
            channels: 1,
            height: 1,
            width: 2,
            classes: 3,
            images: vec![1, 2, 3, 4, 5, 6],
            labels: vec![0, 2, 1],
        }
    }

    #[test]
    fn dataset_accessors_and_subset() {
        let d = tiny();
        assert_eq!(d.len(), 3);
        assert!(!d.is_empty());
        assert_eq!(d.image(1), &[3, 4]);
        let s = d.subset(2);
        assert_eq!(s.images, vec![1, 2, 3, 4]);
        assert_eq!(s.labels, vec![0, 2]);
        assert_eq!((s.channels, s.height, s.width, s.classes), (1, 1, 2, 3));
        assert_eq!(d.subset(10), d);
        assert!(d.subset(0).is_empty());
    }

    #[test]
    fn error_messages_are_one_line_and_name_the_file() {
        let e = DataError::IdxMagic {
            path: "/x/train-images-idx3-ubyte".into(),
            found: 0,
            expected: 0x803,
            kind: "images",
        };
        assert_eq!(
            e.to_string(),
            "/x/train-images-idx3-ubyte: wrong IDX magic 0x00000000 (expected 0x00000803 for images)"
        );
        let e = DataError::RecordSize {
            path: "/x/data_batch_1.bin".into(),
            size: 30000,
            record: 3073,
            format: "CIFAR-10",
        };
        assert_eq!(
            e.to_string(),
            "/x/data_batch_1.bin: size 30000 is not a whole number of 3073-byte CIFAR-10 records"
        );
        let e = check_dir(Path::new("/definitely/not/here")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "data directory /definitely/not/here does not exist"
        );
        let e = read_file(Path::new("/definitely/not/here.bin")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("/definitely/not/here.bin: "), "{msg}");
        assert!(!msg.contains('\n'));
    }
}
