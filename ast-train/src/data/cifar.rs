//! The CIFAR-10 and CIFAR-100 binary formats.
//!
//! A CIFAR-10 record is 1 label byte then 3072 pixel bytes (the 32×32 red plane, then green,
//! then blue), so the pixels are already CHW. A CIFAR-100 record has a coarse and a fine
//! label byte before the same 3072 bytes.

use std::path::{Path, PathBuf};

use super::{check_dir, read_file, DataError, ImageDataset};

/// Pixel bytes of one CIFAR image (3 × 32 × 32).
const PIXELS: usize = 3 * 32 * 32;

/// Which CIFAR-100 label to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cifar100Labels {
    /// The 20 superclasses.
    Coarse,
    /// The 100 classes.
    Fine,
}

/// The directory holding `marker`: `dir` itself or `dir/subdir`.
fn locate(dir: &Path, subdir: &str, marker: &str) -> Result<PathBuf, DataError> {
    check_dir(dir)?;
    [dir.to_path_buf(), dir.join(subdir)]
        .into_iter()
        .find(|d| d.join(marker).is_file())
        .ok_or_else(|| DataError::MissingFile {
            dir: dir.to_path_buf(),
            name: format!("{marker} (nor {subdir}/{marker})"),
        })
}

/// Appends the records of one file to `out`; `label_bytes` precede the pixels of each record
/// and the label used is byte `label_at`, checked against `out.classes`.
fn read_records(
    path: &Path,
    format: &'static str,
    label_bytes: usize,
    label_at: usize,
    out: &mut ImageDataset,
) -> Result<(), DataError> {
    let bytes = read_file(path)?;
    let record = label_bytes + PIXELS;
    if bytes.len() % record != 0 {
        return Err(DataError::RecordSize {
            path: path.to_path_buf(),
            size: bytes.len(),
            record,
            format,
        });
    }
    let n = bytes.len() / record;
    out.images.reserve(n * PIXELS);
    out.labels.reserve(n);
    for rec in bytes.chunks_exact(record) {
        let label = rec[label_at] as usize;
        if label >= out.classes {
            return Err(DataError::LabelRange {
                label,
                classes: out.classes,
                path: path.to_path_buf(),
            });
        }
        out.labels.push(label as u16);
        out.images.extend_from_slice(&rec[label_bytes..]);
    }
    Ok(())
}

/// An empty 3×32×32 dataset with `classes` classes.
fn empty(classes: usize) -> ImageDataset {
    ImageDataset {
        channels: 3,
        height: 32,
        width: 32,
        classes,
        images: Vec::new(),
        labels: Vec::new(),
    }
}

/// Reads CIFAR-10 from `dir` (or `dir/cifar-10-batches-bin/`): train = `data_batch_1.bin` …
/// `data_batch_5.bin`, test = `test_batch.bin`. Returns `(train, test)`.
pub fn read_cifar10(dir: impl AsRef<Path>) -> Result<(ImageDataset, ImageDataset), DataError> {
    let dir = locate(dir.as_ref(), "cifar-10-batches-bin", "data_batch_1.bin")?;
    let mut train = empty(10);
    for k in 1..=5 {
        let path = dir.join(format!("data_batch_{k}.bin"));
        if !path.is_file() {
            return Err(DataError::MissingFile {
                dir,
                name: format!("data_batch_{k}.bin"),
            });
        }
        read_records(&path, "CIFAR-10", 1, 0, &mut train)?;
    }
    let mut test = empty(10);
    read_records(&dir.join("test_batch.bin"), "CIFAR-10", 1, 0, &mut test)?;
    Ok((train, test))
}

/// Reads CIFAR-100 from `dir` (or `dir/cifar-100-binary/`): `train.bin` and `test.bin`,
/// labelled with the coarse (20) or fine (100) labels. Returns `(train, test)`.
pub fn read_cifar100(
    dir: impl AsRef<Path>,
    labels: Cifar100Labels,
) -> Result<(ImageDataset, ImageDataset), DataError> {
    let dir = locate(dir.as_ref(), "cifar-100-binary", "train.bin")?;
    let (classes, label_at) = match labels {
        Cifar100Labels::Coarse => (20, 0),
        Cifar100Labels::Fine => (100, 1),
    };
    let mut train = empty(classes);
    read_records(&dir.join("train.bin"), "CIFAR-100", 2, label_at, &mut train)?;
    let mut test = empty(classes);
    read_records(&dir.join("test.bin"), "CIFAR-100", 2, label_at, &mut test)?;
    Ok((train, test))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record whose pixel `p` is `(seed + p) % 251`.
    fn record(labels: &[u8], seed: usize) -> Vec<u8> {
        let mut r = labels.to_vec();
        r.extend((0..PIXELS).map(|p| ((seed + p) % 251) as u8));
        r
    }

    #[test]
    fn reads_cifar10_from_subdirectory() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("cifar-10-batches-bin");
        std::fs::create_dir(&dir).unwrap();
        for k in 1..=5u8 {
            let mut bytes = record(&[k], k as usize);
            bytes.extend(record(&[9], 100 + k as usize));
            std::fs::write(dir.join(format!("data_batch_{k}.bin")), bytes).unwrap();
        }
        std::fs::write(dir.join("test_batch.bin"), record(&[0], 7)).unwrap();
        for d in [root.path(), dir.as_path()] {
            let (train, test) = read_cifar10(d).unwrap();
            assert_eq!(train.len(), 10);
            assert_eq!(train.labels, vec![1, 9, 2, 9, 3, 9, 4, 9, 5, 9]);
            assert_eq!((train.channels, train.height, train.width), (3, 32, 32));
            assert_eq!(train.classes, 10);
            // Image 3 = second record of batch 2: pixel p = (102 + p) % 251.
            assert_eq!(train.image(3)[0], 102);
            assert_eq!(train.image(3)[1024], ((102 + 1024) % 251) as u8);
            assert_eq!(test.labels, vec![0]);
            assert_eq!(test.image(0)[3071], ((7 + 3071) % 251) as u8);
        }
    }

    #[test]
    fn cifar10_bad_files_are_errors() {
        let root = tempfile::tempdir().unwrap();
        let d = root.path();
        for k in 1..=5 {
            std::fs::write(d.join(format!("data_batch_{k}.bin")), record(&[1], 0)).unwrap();
        }
        // No test batch.
        assert!(matches!(read_cifar10(d), Err(DataError::Io { .. })));
        std::fs::write(d.join("test_batch.bin"), record(&[10], 0)).unwrap();
        let msg = read_cifar10(d).unwrap_err().to_string();
        assert_eq!(
            msg,
            format!(
                "label 10 out of range for 10 classes in {}",
                d.join("test_batch.bin").display()
            )
        );
        std::fs::write(d.join("data_batch_1.bin"), vec![0u8; 30000]).unwrap();
        let msg = read_cifar10(d).unwrap_err().to_string();
        assert_eq!(
            msg,
            format!(
                "{}: size 30000 is not a whole number of 3073-byte CIFAR-10 records",
                d.join("data_batch_1.bin").display()
            )
        );
        std::fs::write(d.join("data_batch_1.bin"), record(&[1], 0)).unwrap();
        std::fs::remove_file(d.join("data_batch_3.bin")).unwrap();
        assert!(matches!(
            read_cifar10(d),
            Err(DataError::MissingFile { .. })
        ));
        let empty_dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            read_cifar10(empty_dir.path()),
            Err(DataError::MissingFile { .. })
        ));
        assert!(matches!(
            read_cifar10(d.join("absent")),
            Err(DataError::MissingDir { .. })
        ));
    }

    #[test]
    fn reads_cifar100_coarse_and_fine() {
        let root = tempfile::tempdir().unwrap();
        let d = root.path();
        let mut train = record(&[19, 99], 1);
        train.extend(record(&[3, 42], 2));
        std::fs::write(d.join("train.bin"), train).unwrap();
        std::fs::write(d.join("test.bin"), record(&[0, 7], 3)).unwrap();
        let (tr, te) = read_cifar100(d, Cifar100Labels::Coarse).unwrap();
        assert_eq!((tr.labels.clone(), tr.classes), (vec![19, 3], 20));
        assert_eq!(te.labels, vec![0]);
        assert_eq!(tr.image(1)[0], 2);
        let (tr, te) = read_cifar100(d, Cifar100Labels::Fine).unwrap();
        assert_eq!((tr.labels.clone(), tr.classes), (vec![99, 42], 100));
        assert_eq!(te.labels, vec![7]);
        assert_eq!(te.image(0), &record(&[], 3)[..]);

        std::fs::write(d.join("test.bin"), record(&[20, 7], 3)).unwrap();
        assert!(matches!(
            read_cifar100(d, Cifar100Labels::Coarse),
            Err(DataError::LabelRange {
                label: 20,
                classes: 20,
                ..
            })
        ));
        std::fs::write(d.join("test.bin"), vec![0u8; 3073]).unwrap();
        let msg = read_cifar100(d, Cifar100Labels::Fine)
            .unwrap_err()
            .to_string();
        assert!(
            msg.ends_with("size 3073 is not a whole number of 3074-byte CIFAR-100 records"),
            "{msg}"
        );
    }
}
