//! ImageNet-style image folders: one subdirectory per class, images decoded on demand.

use std::path::{Path, PathBuf};

use super::{check_dir, DataError};

/// Whether `path` has an image extension this reader accepts (jpeg, jpg, png; any case).
fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| {
            let e = e.to_ascii_lowercase();
            e == "jpeg" || e == "jpg" || e == "png"
        })
        .unwrap_or(false)
}

/// The entries of `dir`, sorted by path.
fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        out.push(entry.map_err(|e| DataError::io(dir, e))?.path());
    }
    out.sort();
    Ok(out)
}

/// Pushes the images under `dir` (recursively, sorted by path) with `label` onto `items`.
fn collect_images(
    dir: &Path,
    label: u16,
    items: &mut Vec<(PathBuf, u16)>,
) -> Result<(), DataError> {
    for path in sorted_entries(dir)? {
        if path.is_dir() {
            collect_images(&path, label, items)?;
        } else if is_image(&path) && path.is_file() {
            items.push((path, label));
        }
    }
    Ok(())
}

/// An image folder: each subdirectory of the root is a class (sorted by name, label = index);
/// its items are the `.jpeg`/`.jpg`/`.png` files below it, sorted by path.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    root: PathBuf,
    classes: Vec<String>,
    items: Vec<(PathBuf, u16)>,
}

impl ImageFolder {
    /// Scans `dir`. Fails if it is missing, has no class directory, or has no image at all
    /// (a class directory without images is fine).
    pub fn open(dir: impl AsRef<Path>) -> Result<ImageFolder, DataError> {
        let root = dir.as_ref().to_path_buf();
        check_dir(&root)?;
        let class_dirs: Vec<PathBuf> = sorted_entries(&root)?
            .into_iter()
            .filter(|p| p.is_dir())
            .collect();
        if class_dirs.is_empty() {
            return Err(DataError::NoClasses { path: root });
        }
        if class_dirs.len() > usize::from(u16::MAX) + 1 {
            return Err(DataError::TooManyClasses {
                count: class_dirs.len(),
                path: root,
            });
        }
        let mut items = Vec::new();
        let mut classes = Vec::with_capacity(class_dirs.len());
        for (label, dir) in class_dirs.iter().enumerate() {
            classes.push(
                dir.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            );
            collect_images(dir, label as u16, &mut items)?;
        }
        if items.is_empty() {
            return Err(DataError::NoImages { path: root });
        }
        Ok(ImageFolder {
            root,
            classes,
            items,
        })
    }

    /// The folder scanned.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether there is no image (never true for an opened folder).
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Class names (directory names), in label order.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// Path and label of image `i`, if `i < len()`.
    pub fn item(&self, i: usize) -> Option<(&Path, u16)> {
        self.items.get(i).map(|(p, l)| (p.as_path(), *l))
    }

    /// Decodes image `i` to RGB: `(width, height, HWC RGB bytes, label)`.
    pub fn load_rgb(&self, i: usize) -> Result<(u32, u32, Vec<u8>, u16), DataError> {
        let (path, label) = self.item(i).ok_or(DataError::IndexOutOfRange {
            what: "sample",
            index: i,
            len: self.len(),
        })?;
        let decoded = image::ImageReader::open(path)
            .map_err(|e| DataError::io(path, e))?
            .with_guessed_format()
            .map_err(|e| DataError::io(path, e))?
            .decode()
            .map_err(|e| DataError::Decode {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        let rgb = decoded.to_rgb8();
        let (w, h) = rgb.dimensions();
        Ok((w, h, rgb.into_raw(), label))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a `w`×`h` PNG whose pixel (x, y) is (x, y, base).
    fn png(path: &Path, w: u32, h: u32, base: u8) {
        image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, base]))
            .save(path)
            .unwrap();
    }

    #[test]
    fn scans_classes_and_decodes() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        for c in ["zebra", "ant", "empty"] {
            std::fs::create_dir(r.join(c)).unwrap();
        }
        png(&r.join("zebra/b.PNG"), 3, 2, 200);
        png(&r.join("ant/a.png"), 2, 1, 100);
        std::fs::write(r.join("ant/notes.txt"), "not an image").unwrap();
        std::fs::write(r.join("ant/z.JPEG"), b"garbage, not a jpeg").unwrap();
        std::fs::write(r.join("stray.png"), b"files at the root are not classes").unwrap();

        let f = ImageFolder::open(r).unwrap();
        assert_eq!(f.classes(), &["ant", "empty", "zebra"]);
        assert_eq!(f.len(), 3);
        assert_eq!(f.item(0).unwrap(), (r.join("ant/a.png").as_path(), 0));
        assert_eq!(f.item(1).unwrap(), (r.join("ant/z.JPEG").as_path(), 0));
        assert_eq!(f.item(2).unwrap(), (r.join("zebra/b.PNG").as_path(), 2));

        let (w, h, px, label) = f.load_rgb(0).unwrap();
        assert_eq!((w, h, label), (2, 1, 0));
        assert_eq!(px, vec![0, 0, 100, 1, 0, 100]);
        let (w, h, px, label) = f.load_rgb(2).unwrap();
        assert_eq!((w, h, label), (3, 2, 2));
        // Pixel (x=2, y=1) is HWC offset (1*3 + 2)*3.
        assert_eq!(&px[15..18], &[2, 1, 200]);

        let msg = f.load_rgb(1).unwrap_err().to_string();
        assert!(
            msg.starts_with(&format!(
                "cannot decode image {}: ",
                r.join("ant/z.JPEG").display()
            )),
            "{msg}"
        );
        assert!(matches!(
            f.load_rgb(3),
            Err(DataError::IndexOutOfRange {
                index: 3,
                len: 3,
                ..
            })
        ));
    }

    #[test]
    fn empty_folders_are_errors() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let msg = ImageFolder::open(r).unwrap_err().to_string();
        assert_eq!(
            msg,
            format!("image folder {} has no class directories", r.display())
        );
        std::fs::create_dir(r.join("a")).unwrap();
        std::fs::write(r.join("a/readme.txt"), "x").unwrap();
        assert!(matches!(
            ImageFolder::open(r),
            Err(DataError::NoImages { .. })
        ));
        assert!(matches!(
            ImageFolder::open(r.join("missing")),
            Err(DataError::MissingDir { .. })
        ));
    }
}
