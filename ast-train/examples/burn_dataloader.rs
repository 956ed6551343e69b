//! A run's sub-nets evaluated on batches from burn's own `DataLoaderBuilder`: our Fashion-MNIST
//! reader is a burn `Dataset`, `ImageBatcher` is burn's `Batcher` for it. The top-1 printed is
//! `ast-cli eval --run RUN_DIR`'s (the quickstart's run: `ast-cli run --recipe quickstart`).
//! `cargo run -p ast-train --release --example burn_dataloader -- RUN_DIR [FASHION_MNIST_DIR]`

use ast_models::ModelKind;
use ast_train::data::{read_mnist_dir, CifarTransform, ImageBatch, ImageBatcher};
use burn::backend::{Autodiff, Flex};
use burn::data::dataloader::DataLoaderBuilder;
use burn::data::dataset::transform::PartialDataset;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let run = args.next().ok_or("give the run directory")?;
    let data = args
        .next()
        .unwrap_or("/usr/share/datasets/fashion-mnist".into());
    let device = Default::default();
    let (config, model, _) = ast_train::train::load_run_model::<Autodiff<Flex>, _>(
        &ModelKind::SmallCnn,
        run.as_ref(),
        &device,
    )?;
    let model = burn::module::AutodiffModule::valid(&model);
    let (_, test) = read_mnist_dir(data)?;
    let test = PartialDataset::new(test, 0, config.data.test_subset.unwrap_or(usize::MAX));
    let batcher = ImageBatcher {
        transform: CifarTransform::fashion_mnist(false, 3),
        classes: 10,
    };
    let loader = DataLoaderBuilder::new(batcher)
        .batch_size(config.eval_batch_size)
        .num_workers(2)
        .build(test);
    let subnets = config.ast.subnets.len();
    let (mut correct, mut seen) = (vec![0; subnets], 0);
    for ImageBatch { images, labels } in loader.iter() {
        seen += labels.dims()[0];
        for (k, correct) in correct.iter_mut().enumerate() {
            model.switch().set(k);
            let predicted = model.forward(images.clone()).argmax(1).flatten::<1>(0, 1);
            *correct += predicted.equal(labels.clone()).int().sum().into_scalar() as usize;
        }
    }
    for (k, c) in correct.iter().enumerate() {
        println!(
            "sub-net {k}: top-1 {:.2} % of {seen}",
            100.0 * *c as f64 / seen as f64
        );
    }
    Ok(())
}
