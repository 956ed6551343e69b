//! IDX files, the format of MNIST and Fashion-MNIST, plain or gzip-compressed.
//!
//! Compression is detected by the gzip magic bytes `1f 8b`, not by the file name.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::{check_dir, read_file, DataError, ImageDataset};

/// Magic number of an IDX file of `u8` images (3 dimensions).
pub const IDX_IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of `u8` labels (1 dimension).
pub const IDX_LABELS_MAGIC: u32 = 0x0000_0801;

/// Reads a file, decompressing it if it starts with the gzip magic bytes.
fn read_maybe_gzip(path: &Path) -> Result<Vec<u8>, DataError> {
    let raw = read_file(path)?;
    if !raw.starts_with(&[0x1f, 0x8b]) {
        return Ok(raw);
    }
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(raw.as_slice())
        .read_to_end(&mut out)
        .map_err(|e| DataError::Gzip {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    Ok(out)
}

/// Checks an IDX header with `dims` dimensions; returns the dimensions and strips the
/// header from `bytes`, leaving exactly the data.
fn parse_idx(
    path: &Path,
    bytes: &mut Vec<u8>,
    magic: u32,
    kind: &'static str,
    dims: usize,
) -> Result<Vec<usize>, DataError> {
    let header = 4 + 4 * dims;
    if bytes.len() < header {
        return Err(DataError::IdxHeader {
            path: path.to_path_buf(),
            size: bytes.len(),
            needed: header,
        });
    }
    let be = |k: usize| u32::from_be_bytes([bytes[k], bytes[k + 1], bytes[k + 2], bytes[k + 3]]);
    let found = be(0);
    if found != magic {
        return Err(DataError::IdxMagic {
            path: path.to_path_buf(),
            found,
            expected: magic,
            kind,
        });
    }
    let shape: Vec<u64> = (0..dims).map(|d| be(4 + 4 * d) as u64).collect();
    let items = shape[0];
    let item_bytes: u64 = shape[1..].iter().product();
    let data_bytes = bytes.len() - header;
    let need = items
        .checked_mul(item_bytes)
        .filter(|&n| n <= data_bytes as u64)
        .ok_or_else(|| DataError::IdxTruncated {
            path: path.to_path_buf(),
            items,
            item_bytes,
            data_bytes,
        })? as usize;
    if data_bytes > need {
        return Err(DataError::IdxTrailing {
            path: path.to_path_buf(),
            items,
            extra: data_bytes - need,
        });
    }
    bytes.drain(..header);
    Ok(shape.into_iter().map(|d| d as usize).collect())
}

/// Reads an IDX image file (magic `0x00000803`, gzipped or not).
///
/// Returns `(n, rows, cols, pixels)` with `pixels.len() == n * rows * cols`.
pub fn read_idx_images(
    path: impl AsRef<Path>,
) -> Result<(usize, usize, usize, Vec<u8>), DataError> {
    let path = path.as_ref();
    let mut bytes = read_maybe_gzip(path)?;
    let shape = parse_idx(path, &mut bytes, IDX_IMAGES_MAGIC, "images", 3)?;
    Ok((shape[0], shape[1], shape[2], bytes))
}

/// Reads an IDX label file (magic `0x00000801`, gzipped or not).
pub fn read_idx_labels(path: impl AsRef<Path>) -> Result<Vec<u8>, DataError> {
    let path = path.as_ref();
    let mut bytes = read_maybe_gzip(path)?;
    parse_idx(path, &mut bytes, IDX_LABELS_MAGIC, "labels", 1)?;
    Ok(bytes)
}

/// `dir/name` if it is a file, else `dir/name.gz`.
fn find_idx(dir: &Path, name: &str) -> Result<PathBuf, DataError> {
    [name.to_string(), format!("{name}.gz")]
        .into_iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| DataError::MissingFile {
            dir: dir.to_path_buf(),
            name: format!("{name} (or {name}.gz)"),
        })
}

/// Reads one split (images + labels) of an MNIST-style directory: 10 classes, 1 channel.
fn read_split(dir: &Path, images: &str, labels: &str) -> Result<ImageDataset, DataError> {
    let images_path = find_idx(dir, images)?;
    let labels_path = find_idx(dir, labels)?;
    let (n, rows, cols, pixels) = read_idx_images(&images_path)?;
    let raw_labels = read_idx_labels(&labels_path)?;
    if raw_labels.len() != n {
        return Err(DataError::CountMismatch {
            images: n,
            labels: raw_labels.len(),
            images_path,
            labels_path,
        });
    }
    const CLASSES: usize = 10;
    if let Some(&bad) = raw_labels.iter().find(|&&l| l as usize >= CLASSES) {
        return Err(DataError::LabelRange {
            label: bad as usize,
            classes: CLASSES,
            path: labels_path,
        });
    }
    Ok(ImageDataset {
        channels: 1,
        height: rows,
        width: cols,
        classes: CLASSES,
        images: pixels,
        labels: raw_labels.into_iter().map(u16::from).collect(),
    })
}

/// Reads an MNIST or Fashion-MNIST directory holding `train-images-idx3-ubyte`,
/// `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte` and `t10k-labels-idx1-ubyte`, each
/// with or without a `.gz` suffix. Returns `(train, test)`, 10 classes, 1 channel.
pub fn read_mnist_dir(dir: impl AsRef<Path>) -> Result<(ImageDataset, ImageDataset), DataError> {
    let dir = dir.as_ref();
    check_dir(dir)?;
    let train = read_split(dir, "train-images-idx3-ubyte", "train-labels-idx1-ubyte")?;
    let test = read_split(dir, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")?;
    Ok((train, test))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use std::io::Write;

    fn idx_images(n: u32, rows: u32, cols: u32, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        for x in [IDX_IMAGES_MAGIC, n, rows, cols] {
            v.extend_from_slice(&x.to_be_bytes());
        }
        v.extend_from_slice(data);
        v
    }

    fn idx_labels(labels: &[u8]) -> Vec<u8> {
        let mut v = IDX_LABELS_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&(labels.len() as u32).to_be_bytes());
        v.extend_from_slice(labels);
        v
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn reads_plain_and_gzipped_idx() {
        let dir = tempfile::tempdir().unwrap();
        let pixels: Vec<u8> = (0..12).collect();
        let raw = idx_images(2, 2, 3, &pixels);
        let plain = dir.path().join("imgs");
        // A gzipped file without a .gz name: detection is by magic bytes.
        let gz = dir.path().join("imgs-compressed");
        std::fs::write(&plain, &raw).unwrap();
        std::fs::write(&gz, gzip(&raw)).unwrap();
        for p in [&plain, &gz] {
            let (n, r, c, data) = read_idx_images(p).unwrap();
            assert_eq!((n, r, c), (2, 2, 3));
            assert_eq!(data, pixels);
        }
        let lp = dir.path().join("labels.gz");
        std::fs::write(&lp, gzip(&idx_labels(&[7, 0, 3]))).unwrap();
        assert_eq!(read_idx_labels(&lp).unwrap(), vec![7, 0, 3]);
    }

    #[test]
    fn bad_idx_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("train-images-idx3-ubyte");
        std::fs::write(&p, [0u8; 16]).unwrap();
        let msg = read_idx_images(&p).unwrap_err().to_string();
        assert_eq!(
            msg,
            format!(
                "{}: wrong IDX magic 0x00000000 (expected 0x00000803 for images)",
                p.display()
            )
        );
        // Labels read as images: wrong magic too.
        std::fs::write(&p, idx_labels(&[1, 2, 3, 4, 5, 6, 7, 8])).unwrap();
        assert!(matches!(
            read_idx_images(&p),
            Err(DataError::IdxMagic { found: 0x801, .. })
        ));
        std::fs::write(&p, idx_images(60000, 28, 28, &[0; 1000])).unwrap();
        let msg = read_idx_images(&p).unwrap_err().to_string();
        assert_eq!(
            msg,
            format!(
                "{}: truncated IDX file: header says 60000 items of 784 bytes, file has 1000 bytes of data",
                p.display()
            )
        );
        // Huge dimensions must not overflow.
        std::fs::write(&p, idx_images(u32::MAX, u32::MAX, u32::MAX, &[])).unwrap();
        assert!(matches!(
            read_idx_images(&p),
            Err(DataError::IdxTruncated { .. })
        ));
        std::fs::write(&p, idx_images(1, 1, 2, &[1, 2, 3])).unwrap();
        assert!(matches!(
            read_idx_images(&p),
            Err(DataError::IdxTrailing { extra: 1, .. })
        ));
        std::fs::write(&p, [0, 0, 8]).unwrap();
        assert!(matches!(
            read_idx_images(&p),
            Err(DataError::IdxHeader {
                size: 3,
                needed: 16,
                ..
            })
        ));
        // Gzip magic followed by garbage.
        std::fs::write(&p, [0x1f, 0x8b, 1, 2, 3]).unwrap();
        assert!(matches!(read_idx_images(&p), Err(DataError::Gzip { .. })));
        assert!(matches!(
            read_idx_labels(dir.path().join("absent")),
            Err(DataError::Io { .. })
        ));
    }

    #[test]
    fn reads_mnist_directory_with_mixed_compression() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let train_px: Vec<u8> = (0..3 * 4).collect();
        std::fs::write(
            d.join("train-images-idx3-ubyte.gz"),
            gzip(&idx_images(3, 2, 2, &train_px)),
        )
        .unwrap();
        std::fs::write(d.join("train-labels-idx1-ubyte"), idx_labels(&[9, 0, 5])).unwrap();
        std::fs::write(
            d.join("t10k-images-idx3-ubyte"),
            idx_images(1, 2, 2, &[4, 3, 2, 1]),
        )
        .unwrap();
        std::fs::write(d.join("t10k-labels-idx1-ubyte.gz"), gzip(&idx_labels(&[2]))).unwrap();
        let (train, test) = read_mnist_dir(d).unwrap();
        assert_eq!((train.channels, train.height, train.width), (1, 2, 2));
        assert_eq!(train.classes, 10);
        assert_eq!(train.labels, vec![9, 0, 5]);
        assert_eq!(train.image(2), &[8, 9, 10, 11]);
        assert_eq!(test.labels, vec![2]);
        assert_eq!(test.images, vec![4, 3, 2, 1]);

        // Out-of-range label.
        std::fs::write(d.join("train-labels-idx1-ubyte"), idx_labels(&[9, 12, 5])).unwrap();
        let msg = read_mnist_dir(d).unwrap_err().to_string();
        assert_eq!(
            msg,
            format!(
                "label 12 out of range for 10 classes in {}",
                d.join("train-labels-idx1-ubyte").display()
            )
        );
        // Count mismatch.
        std::fs::write(d.join("train-labels-idx1-ubyte"), idx_labels(&[9, 1])).unwrap();
        let msg = read_mnist_dir(d).unwrap_err().to_string();
        assert!(
            msg.starts_with("images and labels disagree: 3 images in "),
            "{msg}"
        );
        // Missing file.
        std::fs::remove_file(d.join("t10k-labels-idx1-ubyte.gz")).unwrap();
        std::fs::write(d.join("train-labels-idx1-ubyte"), idx_labels(&[9, 1, 1])).unwrap();
        let msg = read_mnist_dir(d).unwrap_err().to_string();
        assert!(
            msg.ends_with("has no t10k-labels-idx1-ubyte (or t10k-labels-idx1-ubyte.gz)"),
            "{msg}"
        );
        assert!(matches!(
            read_mnist_dir(d.join("nope")),
            Err(DataError::MissingDir { .. })
        ));
    }

    #[test]
    fn reads_debian_fashion_mnist_if_installed() {
        let dir = Path::new("/usr/share/datasets/fashion-mnist");
        if !dir.is_dir() {
            eprintln!("skipping: {} not present", dir.display());
            return;
        }
        let (train, test) = read_mnist_dir(dir).unwrap();
        assert_eq!((train.len(), test.len()), (60_000, 10_000));
        assert_eq!((train.channels, train.height, train.width), (1, 28, 28));
        let mut counts = [0usize; 10];
        for &l in &train.labels {
            counts[l as usize] += 1;
        }
        assert_eq!(counts, [6000; 10]);
        let mean =
            train.images.iter().map(|&p| p as f64).sum::<f64>() / train.images.len() as f64 / 255.0;
        assert!((mean - 0.2860).abs() < 1e-3, "mean {mean}");
    }
}
