//! Load an exported file once, pick the most accurate sub-net that runs within a latency
//! budget on this machine, and classify an image with it.
//!
//! ```sh
//! ast-cli export --run runs/quickstart --out model.safetensors
//! cargo run --release -p ast-infer --example classify -- model.safetensors 0.5 [image.f32]
//! ```
//! `image.f32`: one image `[C, H, W]` as little-endian f32, preprocessed as in training
//! (without it, a blank image).

use ast_infer::InferenceModel;

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (path, budget_ms) = match &args[..] {
        [_, path, budget, ..] => (path, budget.parse::<f64>()?),
        _ => return Err("usage: classify MODEL.safetensors BUDGET_MS [IMAGE.f32]".into()),
    };
    let mut model = InferenceModel::load(path.as_ref())?;
    let (k, latencies) = model.pick_within_budget(budget_ms, 1, 20)?;
    model.set_subnet(k)?;
    let [c, h, w] = model.input_shape();
    let image: Vec<f32> = match args.get(3) {
        Some(file) => std::fs::read(file)?
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        None => vec![0.0; c * h * w],
    };
    let class = model.classify(&image, 1)?[0];
    let subnet = &model.header().subnets[k];
    println!(
        "sub-net {k} (density {:.3}, {:.3} ms here): class {class}",
        subnet.density, latencies[k].median_ms
    );
    Ok(())
}
