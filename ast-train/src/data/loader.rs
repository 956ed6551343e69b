//! A deterministic, seeded, multi-threaded batch loader.
//!
//! The sample order of epoch `e` is `MaskRng::new(seed, e).permutation(len)` when training
//! and the identity otherwise; the sample at position `p` of epoch `e` is augmented with
//! `MaskRng::new(seed ^ 0xA5A5, e << 32 | p)`. A batch is therefore bit-identical whatever
//! the thread count, and batch `(e, i)` can be recomputed on resume.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::thread;

use ast_core::rng::MaskRng;
use burn::prelude::{Backend, Int, Tensor, TensorData};

use super::{CifarTransform, DataError, ImageDataset, ImageFolder, ImagenetTransform};

/// Something that yields transformed samples by index.
pub trait SampleSource: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;

    /// Whether there is no sample.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Shape `[C, H, W]` of every output sample.
    fn sample_shape(&self) -> [usize; 3];

    /// Writes sample `index` into `out` (length `C·H·W`), augmenting with `rng` when `train`,
    /// and returns its label.
    fn load(
        &self,
        index: usize,
        train: bool,
        rng: &mut MaskRng,
        out: &mut [f32],
    ) -> Result<u16, DataError>;
}

/// The error for a sample index past the end.
pub(super) fn sample_out_of_range(index: usize, len: usize) -> DataError {
    DataError::IndexOutOfRange {
        what: "sample",
        index,
        len,
    }
}

/// An in-memory dataset under a [`CifarTransform`]. Augmentation happens when both the
/// loader and the transform are in training mode.
#[derive(Debug, Clone)]
pub struct CifarSource {
    /// The images.
    pub data: Arc<ImageDataset>,
    /// The transform applied to each image.
    pub transform: CifarTransform,
}

impl CifarSource {
    /// A source over `data` with `transform`.
    pub fn new(data: Arc<ImageDataset>, transform: CifarTransform) -> Self {
        CifarSource { data, transform }
    }
}

impl SampleSource for CifarSource {
    fn len(&self) -> usize {
        self.data.len()
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
        let d = &self.data;
        if index >= d.len() {
            return Err(sample_out_of_range(index, d.len()));
        }
        let shape = [d.channels, d.height, d.width];
        self.transform.apply_with(
            train && self.transform.train,
            d.image(index),
            shape,
            rng,
            out,
        );
        Ok(d.labels[index])
    }
}

/// An image folder under an [`ImagenetTransform`], decoding each image when loaded.
/// Augmentation happens when both the loader and the transform are in training mode.
#[derive(Debug, Clone)]
pub struct FolderSource {
    /// The images.
    pub folder: Arc<ImageFolder>,
    /// The transform applied to each image.
    pub transform: ImagenetTransform,
}

impl FolderSource {
    /// A source over `folder` with `transform`.
    pub fn new(folder: Arc<ImageFolder>, transform: ImagenetTransform) -> Self {
        FolderSource { folder, transform }
    }
}

impl SampleSource for FolderSource {
    fn len(&self) -> usize {
        self.folder.len()
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
        let (w, h, rgb, label) = self.folder.load_rgb(index)?;
        let augment = train && self.transform.train;
        self.transform
            .apply_with(augment, &rgb, w as usize, h as usize, rng, out);
        Ok(label)
    }
}

/// One batch on the host, ready to become tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct HostBatch {
    /// Samples, `N·C·H·W`.
    pub images: Vec<f32>,
    /// One label per sample.
    pub labels: Vec<i64>,
    /// `[N, C, H, W]`.
    pub shape: [usize; 4],
}

impl HostBatch {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.shape[0]
    }

    /// Whether the batch holds no sample.
    pub fn is_empty(&self) -> bool {
        self.shape[0] == 0
    }

    /// The samples `[N, C, H, W]` and labels `[N]` on `device`.
    pub fn into_tensors<B: Backend>(self, device: &B::Device) -> (Tensor<B, 4>, Tensor<B, 1, Int>) {
        let n = self.labels.len();
        (
            Tensor::from_data(TensorData::new(self.images, self.shape), device),
            Tensor::from_data(TensorData::new(self.labels, [n]), device),
        )
    }
}

/// Batches of a [`SampleSource`], shuffled and augmented when training; see the module docs
/// for the exact order and augmentation seeds. Cloning is cheap and shares the source.
#[derive(Clone)]
pub struct Loader {
    source: Arc<dyn SampleSource>,
    batch_size: usize,
    seed: u64,
    train: bool,
    drop_last: bool,
    threads: usize,
    /// This loader's part of every batch: shard `.0` of `.1` (see [`Loader::with_shard`]).
    shard: (usize, usize),
    /// The last epoch's order, to avoid recomputing a permutation per batch.
    order_cache: Arc<Mutex<Option<CachedOrder>>>,
}

/// An epoch number and its sample order.
type CachedOrder = (usize, Arc<Vec<usize>>);

impl fmt::Debug for Loader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Loader")
            .field("len", &self.source.len())
            .field("sample_shape", &self.source.sample_shape())
            .field("batch_size", &self.batch_size)
            .field("seed", &self.seed)
            .field("train", &self.train)
            .field("drop_last", &self.drop_last)
            .field("threads", &self.threads)
            .field("shard", &self.shard)
            .finish()
    }
}

impl Loader {
    /// A loader of `batch_size` samples; `train` shuffles and augments. Uses
    /// `available_parallelism()` threads and keeps the last partial batch.
    ///
    /// # Panics
    /// If `batch_size` is 0 or the source's sample shape has a zero dimension.
    pub fn new(source: Arc<dyn SampleSource>, batch_size: usize, seed: u64, train: bool) -> Self {
        assert!(batch_size > 0, "batch size must be positive");
        assert!(
            source.sample_shape().iter().all(|&d| d > 0),
            "sample shape {:?} has a zero dimension",
            source.sample_shape()
        );
        Loader {
            source,
            batch_size,
            seed,
            train,
            drop_last: false,
            threads: thread::available_parallelism().map_or(1, |n| n.get()),
            shard: (0, 1),
            order_cache: Arc::new(Mutex::new(None)),
        }
    }

    /// Uses `n` worker threads per batch (at least 1).
    pub fn with_threads(mut self, n: usize) -> Self {
        self.threads = n.max(1);
        self
    }

    /// Loads only shard `rank` of `count` of every batch (data-parallel workers): of a batch of
    /// `n` samples, positions `n·rank/count .. n·(rank+1)/count`. The samples, their order and
    /// their augmentation are those of the whole batch, so the shards of all ranks together are
    /// exactly the unsharded batch.
    ///
    /// # Panics
    /// If `rank >= count`.
    pub fn with_shard(mut self, rank: usize, count: usize) -> Self {
        assert!(rank < count, "shard {rank} of {count}");
        self.shard = (rank, count);
        self
    }

    /// Samples in batch `index` of an epoch, all shards together.
    pub fn global_batch_len(&self, index: usize) -> usize {
        let first = index * self.batch_size;
        (first + self.batch_size)
            .min(self.source.len())
            .saturating_sub(first)
    }

    /// Whether to drop the last batch of an epoch when it is partial.
    pub fn with_drop_last(mut self, drop_last: bool) -> Self {
        self.drop_last = drop_last;
        self
    }

    /// Number of samples in the source.
    pub fn num_samples(&self) -> usize {
        self.source.len()
    }

    /// Samples per (full) batch.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Whether the loader shuffles and augments.
    pub fn is_train(&self) -> bool {
        self.train
    }

    /// Batches in one epoch.
    pub fn batches_per_epoch(&self) -> usize {
        let n = self.source.len();
        if self.drop_last {
            n / self.batch_size
        } else {
            n.div_ceil(self.batch_size)
        }
    }

    /// The sample indices of epoch `epoch`, in order.
    pub fn order(&self, epoch: usize) -> Arc<Vec<usize>> {
        let mut cache = self
            .order_cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((e, order)) = cache.as_ref() {
            if *e == epoch {
                return Arc::clone(order);
            }
        }
        let n = self.source.len();
        let order = Arc::new(if self.train {
            MaskRng::new(self.seed, epoch as u64).permutation(n)
        } else {
            (0..n).collect()
        });
        *cache = Some((epoch, Arc::clone(&order)));
        order
    }

    /// Batch `index` of epoch `epoch`.
    pub fn batch(&self, epoch: usize, index: usize) -> Result<HostBatch, DataError> {
        let batches = self.batches_per_epoch();
        if index >= batches {
            return Err(DataError::IndexOutOfRange {
                what: "batch",
                index,
                len: batches,
            });
        }
        let order = self.order(epoch);
        let whole = self.global_batch_len(index);
        let (rank, count) = self.shard;
        let first = index * self.batch_size + whole * rank / count;
        let n = whole * (rank + 1) / count - whole * rank / count;
        let [c, h, w] = self.source.sample_shape();
        let per = c * h * w;
        let mut images = vec![0f32; n * per];
        let mut labels = vec![0i64; n];
        // Fills samples at epoch positions `start..` into the given slices.
        let work = |start: usize, imgs: &mut [f32], labs: &mut [i64]| -> Result<(), DataError> {
            for (k, (out, label)) in imgs.chunks_mut(per).zip(labs.iter_mut()).enumerate() {
                let pos = start + k;
                let stream = ((epoch as u64) << 32) | pos as u64;
                let mut rng = MaskRng::new(self.seed ^ 0xA5A5, stream);
                *label = i64::from(self.source.load(order[pos], self.train, &mut rng, out)?);
            }
            Ok(())
        };
        let threads = self.threads.min(n).max(1);
        if threads == 1 {
            work(first, &mut images, &mut labels)?;
        } else {
            let chunk = n.div_ceil(threads);
            let work = &work;
            thread::scope(|s| {
                let handles: Vec<_> = images
                    .chunks_mut(chunk * per)
                    .zip(labels.chunks_mut(chunk))
                    .enumerate()
                    .map(|(t, (imgs, labs))| s.spawn(move || work(first + t * chunk, imgs, labs)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                    })
                    .collect::<Result<Vec<()>, DataError>>()
            })?;
        }
        Ok(HostBatch {
            images,
            labels,
            shape: [n, c, h, w],
        })
    }

    /// Batches `start..` of epoch `epoch`, computing the next batch on a background thread
    /// while the current one is used.
    pub fn epoch(
        &self,
        epoch: usize,
        start: usize,
    ) -> impl Iterator<Item = Result<HostBatch, DataError>> {
        EpochIter {
            loader: self.clone(),
            epoch,
            next: start,
            end: self.batches_per_epoch(),
            pending: None,
        }
    }
}

/// The iterator behind [`Loader::epoch`].
struct EpochIter {
    loader: Loader,
    epoch: usize,
    next: usize,
    end: usize,
    /// The prefetch of batch `next`, if one is running.
    pending: Option<thread::JoinHandle<Result<HostBatch, DataError>>>,
}

impl Iterator for EpochIter {
    type Item = Result<HostBatch, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.end {
            return None;
        }
        let result = match self.pending.take() {
            Some(handle) => handle
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            None => self.loader.batch(self.epoch, self.next),
        };
        self.next += 1;
        if self.next < self.end && result.is_ok() {
            let (loader, epoch, index) = (self.loader.clone(), self.epoch, self.next);
            // If no thread can be started, the next batch is computed on demand instead.
            self.pending = thread::Builder::new()
                .name("ast-loader-prefetch".into())
                .spawn(move || loader.batch(epoch, index))
                .ok();
        }
        Some(result)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.end.saturating_sub(self.next);
        (left, Some(left))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Normalize;

    /// 10 images 1×2×2 whose pixels are 10i+1..10i+4, labelled i.
    fn dataset() -> Arc<ImageDataset> {
        Arc::new(ImageDataset {
            channels: 1,
            height: 2,
            width: 2,
            classes: 10,
            images: (0..10u8)
                .flat_map(|i| (1..=4).map(move |k| 10 * i + k))
                .collect(),
            labels: (0..10).collect(),
        })
    }

    fn transform() -> CifarTransform {
        CifarTransform {
            train: true,
            pad_to: 2,
            crop_padding: 1,
            flip: true,
            out_channels: 1,
            normalize: Normalize::unit(),
        }
    }

    fn loader(train: bool) -> Loader {
        Loader::new(
            Arc::new(CifarSource::new(dataset(), transform())),
            4,
            42,
            train,
        )
    }

    fn all_labels(l: &Loader, epoch: usize) -> Vec<i64> {
        l.epoch(epoch, 0).flat_map(|b| b.unwrap().labels).collect()
    }

    #[test]
    fn batches_per_epoch_and_partial_batch() {
        let l = loader(true);
        assert_eq!(l.batches_per_epoch(), 3);
        assert_eq!(l.batch(0, 2).unwrap().shape, [2, 1, 2, 2]);
        assert_eq!(l.batch(0, 0).unwrap().shape, [4, 1, 2, 2]);
        assert!(matches!(
            l.batch(0, 3),
            Err(DataError::IndexOutOfRange {
                what: "batch",
                index: 3,
                len: 3
            })
        ));
        let l = l.with_drop_last(true);
        assert_eq!(l.batches_per_epoch(), 2);
        assert_eq!(l.epoch(0, 0).count(), 2);
        assert!(l.batch(0, 2).is_err());
        let exact = Loader::new(
            Arc::new(CifarSource::new(dataset(), transform())),
            5,
            0,
            true,
        );
        assert_eq!(exact.batches_per_epoch(), 2);
        assert_eq!(exact.with_drop_last(true).batches_per_epoch(), 2);
    }

    #[test]
    fn thread_count_does_not_change_batches() {
        let one = loader(true).with_threads(1);
        let three = loader(true).with_threads(3);
        for epoch in 0..3 {
            for i in 0..3 {
                let a = one.batch(epoch, i).unwrap();
                assert_eq!(a, three.batch(epoch, i).unwrap());
            }
            let a: Vec<_> = one.epoch(epoch, 0).map(Result::unwrap).collect();
            let b: Vec<_> = three.epoch(epoch, 0).map(Result::unwrap).collect();
            assert_eq!(a, b);
        }
    }

    #[test]
    fn the_shards_of_a_batch_are_the_batch() {
        // 10 samples in batches of 4: 4, 4, then a partial 2; three shards of 4 are 1, 1, 2.
        let whole = loader(true);
        for epoch in 0..2 {
            for i in 0..3 {
                let all = whole.batch(epoch, i).unwrap();
                assert_eq!(whole.global_batch_len(i), all.len());
                let shards: Vec<HostBatch> = (0..3)
                    .map(|r| whole.clone().with_shard(r, 3).batch(epoch, i).unwrap())
                    .collect();
                let sizes: Vec<usize> = shards.iter().map(HostBatch::len).collect();
                let n = all.len();
                assert_eq!(sizes, [n / 3, 2 * n / 3 - n / 3, n - 2 * n / 3]);
                let labels: Vec<i64> = shards.iter().flat_map(|b| b.labels.clone()).collect();
                let images: Vec<f32> = shards.iter().flat_map(|b| b.images.clone()).collect();
                assert_eq!((labels, images), (all.labels, all.images));
            }
        }
    }

    #[test]
    fn epochs_shuffle_with_the_documented_order() {
        let l = loader(true).with_threads(2);
        let e0 = all_labels(&l, 0);
        let e1 = all_labels(&l, 1);
        let expected: Vec<i64> = MaskRng::new(42, 0)
            .permutation(10)
            .into_iter()
            .map(|i| i as i64)
            .collect();
        assert_eq!(e0, expected);
        assert_ne!(e0, e1);
        let mut sorted = e1.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..10).collect::<Vec<i64>>());
        // Same seed, new loader: same order; another seed: another order.
        assert_eq!(all_labels(&loader(true), 0), e0);
        let other = Loader::new(
            Arc::new(CifarSource::new(dataset(), transform())),
            4,
            43,
            true,
        );
        assert_ne!(all_labels(&other, 0), e0);
    }

    #[test]
    fn samples_use_the_documented_augmentation_seed() {
        let l = loader(true).with_threads(3);
        let (epoch, index) = (2, 1);
        let batch = l.batch(epoch, index).unwrap();
        let order = MaskRng::new(42, epoch as u64).permutation(10);
        let data = dataset();
        let t = transform();
        for k in 0..4 {
            let pos = index * 4 + k;
            let mut rng = MaskRng::new(42 ^ 0xA5A5, (epoch as u64) << 32 | pos as u64);
            let mut out = vec![0.0; 4];
            t.apply(data.image(order[pos]), [1, 2, 2], &mut rng, &mut out);
            assert_eq!(&batch.images[k * 4..(k + 1) * 4], &out[..]);
            assert_eq!(batch.labels[k], order[pos] as i64);
        }
    }

    #[test]
    fn eval_keeps_order_and_does_not_augment() {
        let l = loader(false).with_threads(3);
        assert_eq!(all_labels(&l, 0), (0..10).collect::<Vec<i64>>());
        assert_eq!(all_labels(&l, 5), (0..10).collect::<Vec<i64>>());
        let b = l.batch(7, 2).unwrap();
        let raw: Vec<f32> = b.images.iter().map(|v| (v * 255.0).round()).collect();
        assert_eq!(raw, vec![81., 82., 83., 84., 91., 92., 93., 94.]);
        assert_eq!(b.labels, vec![8, 9]);
    }

    #[test]
    fn epoch_resumes_mid_way() {
        let l = loader(true);
        let rest: Vec<_> = l.epoch(4, 1).map(Result::unwrap).collect();
        assert_eq!(rest.len(), 2);
        assert_eq!(rest[0], l.batch(4, 1).unwrap());
        assert_eq!(rest[1], l.batch(4, 2).unwrap());
        assert_eq!(l.epoch(4, 3).count(), 0);
        assert_eq!(l.epoch(4, 9).count(), 0);
    }

    #[test]
    fn folder_source_loads_and_reports_errors() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        for (class, v) in [("a", 10u8), ("b", 200u8)] {
            std::fs::create_dir(r.join(class)).unwrap();
            image::RgbImage::from_pixel(3, 2, image::Rgb([v, v / 2, 0]))
                .save(r.join(class).join("x.png"))
                .unwrap();
        }
        let folder = Arc::new(ImageFolder::open(r).unwrap());
        let t = ImagenetTransform {
            size: 2,
            resize: 2,
            normalize: Normalize::unit(),
            ..ImagenetTransform::new(false)
        };
        let source = Arc::new(FolderSource::new(folder, t));
        let l = Loader::new(source.clone(), 2, 0, false);
        let b = l.batch(0, 0).unwrap();
        assert_eq!(b.shape, [2, 3, 2, 2]);
        assert_eq!(b.labels, vec![0, 1]);
        // A constant image stays constant under resampling.
        for (k, v) in [(0usize, 10f32), (1, 200.)] {
            let red = &b.images[k * 12..k * 12 + 4];
            assert!(red.iter().all(|x| (x * 255.0 - v).abs() < 1e-3), "{red:?}");
        }
        let mut out = vec![0.0; 12];
        assert!(matches!(
            source.load(2, false, &mut MaskRng::new(0, 0), &mut out),
            Err(DataError::IndexOutOfRange { .. })
        ));

        std::fs::write(r.join("b").join("y.jpg"), b"not a jpeg").unwrap();
        let folder = Arc::new(ImageFolder::open(r).unwrap());
        let t = ImagenetTransform {
            size: 2,
            resize: 2,
            ..ImagenetTransform::new(true)
        };
        let l = Loader::new(Arc::new(FolderSource::new(folder, t)), 3, 0, true).with_threads(2);
        assert!(matches!(l.batch(0, 0), Err(DataError::Decode { .. })));
        assert!(l.epoch(0, 0).next().unwrap().is_err());
    }

    #[test]
    fn cifar_source_checks_index() {
        let s = CifarSource::new(dataset(), transform());
        assert_eq!(s.len(), 10);
        assert_eq!(s.sample_shape(), [1, 2, 2]);
        let mut out = vec![0.0; 4];
        assert!(s.load(10, true, &mut MaskRng::new(0, 0), &mut out).is_err());
        assert_eq!(
            s.load(3, false, &mut MaskRng::new(0, 0), &mut out).unwrap(),
            3
        );
        assert_eq!(
            out.iter().map(|v| (v * 255.0).round()).collect::<Vec<_>>(),
            vec![31., 32., 33., 34.]
        );
    }
}
