//! The training loop on a burn dataset: Fashion-MNIST read by our reader (a burn `Dataset` of
//! `ImageItem`s), cut with burn's own `PartialDataset` to the quickstart's 22 000 training and
//! 4 000 test images, trained with the quickstart recipe for two epochs (`train_on`).
//! `cargo run -p ast-train --release --example burn_dataset -- [FASHION_MNIST_DIR] [RUN_DIR]`

use ast_models::ModelKind;
use ast_train::data::{read_mnist_dir, CifarTransform};
use ast_train::{prepare_run_dir, train_on, DataSources, RunOptions, TrainConfig};
use burn::backend::{Autodiff, Flex};
use burn_dataset::transform::PartialDataset;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let data = args
        .next()
        .unwrap_or("/usr/share/datasets/fashion-mnist".into());
    let dir = args.next().unwrap_or("runs/burn-dataset".into());
    let (train, test) = read_mnist_dir(&data)?;
    // Any burn dataset of ImageItems would do: here burn's own over ours.
    let sources = DataSources::from_datasets(
        PartialDataset::new(train, 0, 22_000),
        PartialDataset::new(test, 0, 4_000),
        10,
        // The quickstart's: padded to 32×32, 3 channels; training crops and flips.
        CifarTransform::fashion_mnist(true, 3),
        CifarTransform::fashion_mnist(false, 3),
    );
    let mut config: TrainConfig =
        serde_json::from_str(include_str!("../../recipes/quickstart.json"))?;
    config.data.path = data.into();
    config.epochs = 2;
    let opts = RunOptions {
        dir: dir.into(),
        overwrite: true,
        progress: true,
        ..RunOptions::default()
    };
    let (config, _lock) = prepare_run_dir(Some(config), &opts)?;
    let device = Default::default();
    let summary =
        train_on::<Autodiff<Flex>, _>(config, &ModelKind::SmallCnn, &sources, &opts, &device)?;
    for s in &summary.subnets {
        println!("sub-net {}: top-1 {:.2} %", s.subnet, 100.0 * s.top1);
    }
    println!("{:.1} s", summary.seconds);
    Ok(())
}
