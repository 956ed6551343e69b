//! burn's `Dataset` for our readers: burn's dataset transforms over our IDX reader give the
//! samples our own loader gives, burn's `DataLoaderBuilder` with our `ImageBatcher` gives our
//! loader's batches, and the training loop trains on any burn dataset of images (here burn's
//! `InMemDataset`) exactly as on our reader.

use std::path::Path;
use std::sync::Arc;

use ast_core::rng::MaskRng;
use ast_models::ModelKind;
use ast_tests::{run_results, tiny_idx_data};
use ast_train::data::{read_mnist_dir, CifarSource, CifarTransform, ImageItem, Loader};
use ast_train::data::{ImageBatch, ImageBatcher, ImageDataset};
use ast_train::{prepare_run_dir, train, train_on, DataSources, RunOptions, TrainConfig};
use burn::backend::{Autodiff, Flex};
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataloader::DataLoaderBuilder;
use burn_dataset::transform::{Mapper, MapperDataset};
use burn_dataset::{Dataset, InMemDataset};

/// An item to a normalised sample and its label, as our evaluation loader makes them.
struct Sample(CifarTransform);

impl Mapper<ImageItem, (Vec<f32>, i64)> for Sample {
    fn map(&self, item: &ImageItem) -> (Vec<f32>, i64) {
        let [c, h, w] = self.0.out_shape();
        let mut out = vec![0.0; c * h * w];
        // Evaluation: no augmentation, the generator is not drawn from.
        let mut rng = MaskRng::new(0, 0);
        (self.0).apply_with(false, &item.image, item.shape, &mut rng, &mut out);
        (out, item.label as i64)
    }
}

/// The 23 test images of tiny IDX data written in `dir`, the evaluation transform, and our
/// loader over them in batches of 5.
fn tiny_test_set(dir: &Path) -> (ImageDataset, CifarTransform, Loader) {
    let (_, test) = read_mnist_dir(tiny_idx_data(dir, 8, 23)).unwrap();
    let transform = CifarTransform::fashion_mnist(false, 3);
    let source = CifarSource::new(Arc::new(test.clone()), transform.clone());
    let ours = Loader::new(Arc::new(source), 5, 0, false);
    (test, transform, ours)
}

#[test]
fn burns_dataset_transforms_over_our_reader_give_our_samples() {
    let tmp = tempfile::tempdir().unwrap();
    let (test, transform, ours) = tiny_test_set(tmp.path());
    let theirs = MapperDataset::new(test.clone(), Sample(transform));
    assert_eq!(theirs.len(), 23);
    let theirs: Vec<(Vec<f32>, i64)> = theirs.iter().collect();
    assert_eq!(ours.batches_per_epoch(), 5, "23 images in batches of 5");
    for (i, chunk) in theirs.chunks(5).enumerate() {
        let batch = ours.batch(0, i).unwrap();
        let labels: Vec<i64> = chunk.iter().map(|(_, l)| *l).collect();
        let images: Vec<f32> = chunk.iter().flat_map(|(x, _)| x.clone()).collect();
        assert_eq!(labels, batch.labels, "batch {i}");
        assert_eq!(images, batch.images, "batch {i}");
    }
    // The dataset itself: as the reader holds it.
    let item = Dataset::get(&test, 7).unwrap();
    assert_eq!(item.image, test.image(7));
    assert_eq!(item.label, usize::from(test.labels[7]));
    assert!(Dataset::get(&test, 23).is_none());
}

#[test]
fn burns_data_loader_with_our_batcher_gives_our_batches() {
    let tmp = tempfile::tempdir().unwrap();
    let (test, transform, ours) = tiny_test_set(tmp.path());
    let batcher = ImageBatcher {
        transform,
        classes: 10,
    };
    // burn's loader in order, on two worker threads and without.
    for workers in [0, 2] {
        let mut builder = DataLoaderBuilder::new(batcher.clone()).batch_size(5);
        if workers > 0 {
            builder = builder.num_workers(workers);
        }
        let theirs: Vec<ImageBatch<Flex>> = builder.build(test.clone()).iter().collect();
        assert_eq!(theirs.len(), 5, "23 images in batches of 5");
        let mut theirs: Vec<(Vec<i64>, Vec<f32>, Vec<usize>)> = theirs
            .into_iter()
            .map(|b| {
                let labels = b.labels.into_data().convert::<i64>().to_vec().unwrap();
                let dims = b.images.dims().to_vec();
                (labels, b.images.into_data().to_vec().unwrap(), dims)
            })
            .collect();
        // Workers hand batches over as they finish them: compare as sets.
        let mut direct: Vec<(Vec<i64>, Vec<f32>, Vec<usize>)> = (0..5)
            .map(|i| {
                let b = ours.batch(0, i).unwrap();
                (b.labels, b.images, b.shape.to_vec())
            })
            .collect();
        if workers > 0 {
            let key = |b: &(Vec<i64>, Vec<f32>, Vec<usize>)| {
                b.1.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            };
            theirs.sort_by_key(key);
            direct.sort_by_key(key);
        }
        assert_eq!(theirs, direct, "{workers} workers");
    }
    // An item that does not fit is named (burn's `Batcher` cannot return an error).
    let bent = ImageItem {
        image: vec![0; 700],
        shape: [1, 28, 28],
        label: 1,
    };
    let device = Default::default();
    let panic = std::panic::catch_unwind(|| {
        Batcher::<Flex, _, ImageBatch<Flex>>::batch(&batcher, vec![bent], &device)
    })
    .unwrap_err();
    let message = panic.downcast_ref::<String>().unwrap();
    assert!(
        message.contains("item 0 of the batch does not fit: 700 pixels for shape [1, 28, 28]"),
        "{message}"
    );
}

/// Held while a test trains: burn seeds and draws the initial weights from one process-wide
/// generator, so two trainings at once would draw each other's numbers.
static TRAINING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The quickstart recipe, tiny: small-cnn on `data`, 2 epochs.
fn tiny_config(data: &Path) -> TrainConfig {
    let mut config: TrainConfig =
        serde_json::from_str(include_str!("../../recipes/quickstart.json")).unwrap();
    config.data.path = data.to_path_buf();
    (config.data.train_subset, config.data.test_subset) = (None, None);
    (config.epochs, config.batch_size, config.eval_batch_size) = (2, 16, 16);
    config.bn_recalibration_batches = 1;
    config.ast.schedule.update_frequency = 3;
    config.ast.schedule.subnet_offset = 0;
    config
}

#[test]
fn training_on_a_burn_dataset_equals_training_on_our_reader() {
    type B = Autodiff<Flex>;
    let _alone = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let data = tiny_idx_data(tmp.path(), 96, 32);
    let device = Default::default();
    let options = |name: &str| RunOptions {
        dir: tmp.path().join(name),
        ..RunOptions::default()
    };

    let direct = options("direct");
    let (config, _lock) = prepare_run_dir(Some(tiny_config(&data)), &direct).unwrap();
    train::<B, _>(config, &ModelKind::SmallCnn, &direct, &device).unwrap();

    // The same images as burn's in-memory dataset, through the same transforms.
    let (train_set, test_set) = read_mnist_dir(&data).unwrap();
    let items = |d: &ast_train::data::ImageDataset| InMemDataset::from_dataset(d);
    let augment = tiny_config(&data).data.augment == ast_train::Augment::Standard;
    let sources = DataSources::from_datasets(
        items(&train_set),
        items(&test_set),
        10,
        CifarTransform::fashion_mnist(augment, 3),
        CifarTransform::fashion_mnist(false, 3),
    );
    let through_burn = options("through-burn");
    let (config, _lock) = prepare_run_dir(Some(tiny_config(&data)), &through_burn).unwrap();
    train_on::<B, _>(
        config,
        &ModelKind::SmallCnn,
        &sources,
        &through_burn,
        &device,
    )
    .unwrap();

    let (a, b) = (run_results(&direct.dir), run_results(&through_burn.dir));
    assert_eq!(a.1.len(), 2, "two epochs of metrics");
    assert_eq!(a, b, "the runs differ");
}

#[test]
fn items_that_do_not_fit_are_named() {
    type B = Autodiff<Flex>;
    let _alone = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let data = tiny_idx_data(tmp.path(), 96, 32);
    // The error of a run on `sources`.
    let refusal = |sources: &DataSources| {
        let opts = RunOptions {
            dir: tmp.path().join("run"),
            overwrite: true,
            ..RunOptions::default()
        };
        let (config, _lock) = prepare_run_dir(Some(tiny_config(&data)), &opts).unwrap();
        let device = Default::default();
        let refused = train_on::<B, _>(config, &ModelKind::SmallCnn, sources, &opts, &device);
        refused.unwrap_err().to_string()
    };
    let bent = |shape: [usize; 3], label: usize, len: usize| {
        InMemDataset::new(vec![
            ImageItem {
                image: vec![0; len],
                shape,
                label,
            };
            96
        ])
    };
    for (train_items, expected) in [
        (
            bent([1, 28, 28], 10, 784),
            "of the dataset: label 10 of 10 classes",
        ),
        (bent([2, 28, 28], 1, 1568), "of the dataset: 2 channels"),
        (
            bent([1, 28, 28], 1, 700),
            "of the dataset: 700 pixels for shape [1, 28, 28]",
        ),
    ] {
        let (_, test_set) = read_mnist_dir(&data).unwrap();
        let test_items = InMemDataset::from_dataset(&test_set);
        let sources = DataSources::from_datasets(
            train_items,
            test_items,
            10,
            CifarTransform::fashion_mnist(false, 3),
            CifarTransform::fashion_mnist(false, 3),
        );
        let err = refusal(&sources);
        assert!(err.contains(expected), "{err}");
    }
    // A transform whose output the model does not take.
    let (train_set, test_set) = read_mnist_dir(&data).unwrap();
    let one_channel = CifarTransform::fashion_mnist(false, 1);
    let sources =
        DataSources::from_datasets(train_set, test_set, 10, one_channel.clone(), one_channel);
    let err = refusal(&sources);
    assert!(
        err.contains("the training samples are [1, 32, 32]; small-cnn takes [3, 32, 32]"),
        "{err}"
    );
}
