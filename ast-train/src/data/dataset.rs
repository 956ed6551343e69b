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
//! [`ImageBatcher`] is burn's `Batcher` of [`ImageItem`]s, for burn's own `DataLoaderBuilder`.
//!
//! [`Loader`]: super::Loader

use burn::data::dataloader::batcher::Batcher;
use burn::prelude::{Backend, Int, Tensor};
use burn_dataset::Dataset;
use serde::{Deserialize, Serialize};

use super::loader::{sample_out_of_range, HostBatch, SampleSource};
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
        let label = check_item(&item, self.classes).map_err(bad)?;
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

/// The item's label, once its channels, pixel count and label fit; else why not.
fn check_item(item: &ImageItem, classes: usize) -> Result<u16, String> {
    let [c, h, w] = item.shape;
    if c != 1 && c != 3 {
        return Err(format!("{c} channels: give 1 (grey) or 3 (RGB)"));
    }
    if item.image.len() != c * h * w {
        return Err(format!(
            "{} pixels for shape {:?}",
            item.image.len(),
            item.shape
        ));
    }
    u16::try_from(item.label)
        .ok()
        .filter(|&l| usize::from(l) < classes)
        .ok_or_else(|| format!("label {} of {classes} classes", item.label))
}

/// burn's [`Batcher`] of [`ImageItem`]s, for burn's `DataLoaderBuilder`: each item through
/// `transform` without augmentation (evaluation, inference; the crops and flips of training
/// come from the seeded [`Loader`](super::Loader), whose order and draws do not depend on
/// threads), as the tensors our own loader gives for the same items.
#[derive(Debug, Clone)]
pub struct ImageBatcher {
    /// What makes each item a sample (its `train` flag is not looked at).
    pub transform: CifarTransform,
    /// Labels must be below it.
    pub classes: usize,
}

/// A batch of [`ImageBatcher`]: samples `[N, C, H, W]` and their labels `[N]`.
#[derive(Debug, Clone)]
pub struct ImageBatch<B: Backend> {
    /// The samples.
    pub images: Tensor<B, 4>,
    /// One class per sample.
    pub labels: Tensor<B, 1, Int>,
}

impl<B: Backend> Batcher<B, ImageItem, ImageBatch<B>> for ImageBatcher {
    /// # Panics
    /// On an item with other than 1 or 3 channels, pixels that do not fill its shape or a label
    /// not below `classes` (burn's `Batcher` cannot return an error; a [`DatasetSource`] in our
    /// loader reports these as errors instead).
    fn batch(&self, items: Vec<ImageItem>, device: &B::Device) -> ImageBatch<B> {
        let [c, h, w] = self.transform.out_shape();
        let mut images = vec![0.0; items.len() * c * h * w];
        let mut labels = Vec::with_capacity(items.len());
        // Not drawn from: no augmentation.
        let mut rng = MaskRng::new(0, 0);
        for (i, (item, out)) in items
            .iter()
            .zip(images.chunks_exact_mut(c * h * w))
            .enumerate()
        {
            let label = check_item(item, self.classes).unwrap_or_else(|reason| {
                panic!("ImageBatcher: item {i} of the batch does not fit: {reason}")
            });
            self.transform
                .apply_with(false, &item.image, item.shape, &mut rng, out);
            labels.push(i64::from(label));
        }
        let shape = [labels.len(), c, h, w];
        let (images, labels) = HostBatch {
            images,
            labels,
            shape,
        }
        .into_tensors(device);
        ImageBatch { images, labels }
    }
}
