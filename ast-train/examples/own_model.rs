//! A model of your own through ast-train (loop, checkpoints, resume, eval, data-parallel runs):
//! the quickstart recipe (three sub-nets, 50/20/10 % dense, on Debian's `dataset-fashion-mnist`).
//! `cargo run -p ast-train --release --example own_model -- RUN_DIR`

use ast_core::{AstModule, MaskedConv2d, MaskedConv2dConfig, MaskedLinear, MaskedLinearConfig};
use ast_core::{ModelSpec, SubnetSwitch, SwitchableBatchNorm, SwitchableBatchNormConfig};
use ast_train::{RunOptions, TrainConfig};
use burn::prelude::*;
use burn::tensor::activation::relu;

/// Masked layers where you want sparsity, a switchable BatchNorm after each, one switch.
#[derive(Module, Debug)]
pub struct TwoConv<B: Backend> {
    convs: Vec<MaskedConv2d<B>>,
    norms: Vec<SwitchableBatchNorm<B>>,
    head: MaskedLinear<B>,
    switch: SubnetSwitch,
}

impl<B: Backend> AstModule<B> for TwoConv<B> {
    fn forward(&self, mut x: Tensor<B, 4>) -> Tensor<B, 2> {
        for (conv, norm) in self.convs.iter().zip(&self.norms) {
            x = relu(norm.forward(conv.forward(x)));
        }
        let [b, c, h, w] = x.dims();
        self.head
            .forward(x.reshape([b, c, h * w]).mean_dim(2).reshape([b, c]))
    }

    fn switch(&self) -> &SubnetSwitch {
        &self.switch
    }
}

/// How a run builds the model; its run directory records the name.
#[derive(Clone, Debug)]
pub struct TwoConvSpec;

impl ModelSpec for TwoConvSpec {
    type Model<B: Backend> = TwoConv<B>;

    fn name(&self) -> &str {
        "two-conv"
    }

    fn build<B: Backend>(&self, classes: usize, subnets: usize, device: &B::Device) -> TwoConv<B> {
        let switch = SubnetSwitch::new();
        let block = |[c_in, c_out]: [usize; 2]| {
            let conv = MaskedConv2dConfig::new([c_in, c_out], [3, 3]).with_stride([2, 2]);
            let conv = conv.with_padding([1, 1]).with_subnets(subnets);
            let norm = SwitchableBatchNormConfig::new(c_out).with_subnets(subnets);
            (conv.init(&switch, device), norm.init(&switch, device))
        };
        let (convs, norms) = [[3, 16], [16, 32]].map(block).into_iter().unzip();
        let head = MaskedLinearConfig::new(32, classes).with_subnets(subnets);
        let head = head.init(&switch, device);
        TwoConv {
            convs,
            norms,
            head,
            switch,
        }
    }
}

fn main() -> Result<(), ast_train::TrainError> {
    let recipe = include_str!("../../recipes/quickstart.json");
    let mut config: TrainConfig = serde_json::from_str(recipe).expect("the recipe parses");
    config.model = TwoConvSpec.name().into();
    let mut opts = RunOptions::default();
    (opts.dir, opts.progress) = (std::env::args().nth(1).unwrap_or("run".into()).into(), true);
    let (config, _lock) = ast_train::prepare_run_dir(Some(config), &opts)?;
    type B = burn::backend::Autodiff<burn::backend::Flex>;
    let summary = ast_train::train::<B, _>(config, &TwoConvSpec, &opts, &Default::default())?;
    for m in summary.subnets {
        println!("sub-net {}: top-1 {:.4}", m.subnet, m.top1);
    }
    Ok(())
}
