//! burn's [`Dataset`] for our readers, and any burn dataset of images as a source of the
//! training loop.
//!
//! [`ImageDataset`] (IDX, CIFAR) and [`ImageFolder`] are datasets of [`ImageItem`]s: the pixels
//! as the files hold them (`u8`, CHW) and the label, so that burn's `DataLoaderBuilder` and
//! `Batcher`s take them. [`DatasetSource`] goes the other way: a burn dataset of
//! [`ImageItem`]s (burn's `InMemDataset`, a `MapperDataset`, one of your own, or ours) under a
//! [`CifarTransform`] becomes a [`SampleSource`] of the seeded, multi-threaded [`Loader`]
//! that training uses (`DataSources::from_datasets`, `train::train_on`).
//!
//! [`Loader`]: super::Loader

use burn_dataset::Dataset;
use serde::{Deserialize, Serialize};

use super::loader::{sample_out_of_range, SampleSource};
use super::{CifarTransform, DataError, ImageDataset, ImageFolder};
use ast_core::rng::MaskRng;

/// One labelled image: `u8` pixels in CHW order with their shape, and the class. Serde, so that
/// burn's `InMemDataset` (which asks for it) holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageItem {
    /// `C·H·W` pixels, channel after channel.
    pub image: Vec<u8>,
    /// `[C, H, W]`.
    pub shape: [usize; 3],
    /// The class.
    pub label: usize,
}

impl Dataset<ImageItem> for ImageDataset {
    fn get(&self, index: usize) -> Option<ImageItem> {
        (index < self.len()).then(|| ImageItem {
            image: self.image(index).to_vec(),
            shape: [self.channels, self.height, self.width],
            label: usize::from(self.labels[index]),
        })
    }

    fn len(&self) -> usize {
        ImageDataset::len(self)
    }
}

/// Images are decoded when asked for; one that cannot be read is `None` (burn's `Dataset` has
/// no error): [`ImageFolder::load_rgb`] says why.
impl Dataset<ImageItem> for ImageFolder {
    fn get(&self, index: usize) -> Option<ImageItem> {
        let (w, h, rgb, label) = self.load_rgb(index).ok()?;
        let (w, h) = (w as usize, h as usize);
        // HWC to CHW.
        let image = (0..3)
            .flat_map(|c| rgb.iter().skip(c).step_by(3).copied())
            .collect();
        Some(ImageItem {
            image,
            shape: [3, h, w],
            label: usize::from(label),
        })
    }

    fn len(&self) -> usize {
        ImageFolder::len(self)
    }
}

/// A burn dataset of [`ImageItem`]s as a [`SampleSource`]: each item through `transform`
/// (augmented when both the loader and the transform train).
#[derive(Debug, Clone)]
pub struct DatasetSource<D> {
    /// The items.
    pub dataset: D,
    /// What makes each item a sample.
    pub transform: CifarTransform,
    /// Labels must be below it.
    pub classes: usize,
}

impl<D: Dataset<ImageItem>> DatasetSource<D> {
    /// A source over `dataset` with `transform`, of `classes` classes.
    pub fn new(dataset: D, transform: CifarTransform, classes: usize) -> Self {
        DatasetSource {
            dataset,
            transform,
            classes,
        }
    }
}

impl<D: Dataset<ImageItem>> SampleSource for DatasetSource<D> {
    fn len(&self) -> usize {
        self.dataset.len()
    }

    fn sample_shape(&self) -> [usize; 3] {
        self.transform.out_shape()
    }

    fn load(
        &self,
        index: usize,
        train: bool,
        rng: &mut MaskRng,
        out: &mut [f32],
    ) -> Result<u16, DataError> {
        let len = self.dataset.len();
        let bad = |reason: String| DataError::BadItem { index, reason };
        let item = match self.dataset.get(index) {
            Some(item) => item,
            None if index >= len => return Err(sample_out_of_range(index, len)),
            None => return Err(bad("the dataset gave none".into())),
        };
        let [c, h, w] = item.shape;
        if c != 1 && c != 3 {
            return Err(bad(format!("{c} channels: give 1 (grey) or 3 (RGB)")));
        }
        if item.image.len() != c * h * w {
            return Err(bad(format!(
                "{} pixels for shape {:?}",
                item.image.len(),
                item.shape
            )));
        }
        let label = u16::try_from(item.label)
            .ok()
            .filter(|&l| usize::from(l) < self.classes)
            .ok_or_else(|| bad(format!("label {} of {} classes", item.label, self.classes)))?;
        self.transform.apply_with(
            train && self.transform.train,
            &item.image,
            item.shape,
            rng,
            out,
        );
        Ok(label)
    }
}
