//! `data.augment` (`--augment standard|none`): with `none` the training images go through the
//! evaluation pipeline, whatever the augmentation draw.

use ast_core::rng::MaskRng;
use ast_tests::write_idx;
use ast_train::{load_data, Augment, TrainConfig};

#[test]
fn augment_none_trains_on_the_evaluation_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    write_idx(dir.path(), "train", 8, 28);
    write_idx(dir.path(), "t10k", 4, 28);
    let mut config: TrainConfig =
        serde_json::from_str(include_str!("../../recipes/quickstart.json")).unwrap();
    config.data.path = dir.path().to_path_buf();
    config.data.train_subset = None;
    config.data.test_subset = None;
    for (augment, varies) in [(Augment::Standard, true), (Augment::None, false)] {
        config.data.augment = augment;
        let model = config.model.parse::<ast_models::ModelKind>().unwrap();
        let train = load_data(&config, &model).unwrap().train;
        let n: usize = train.sample_shape().iter().product();
        let draw = |seed: u64, augmenting: bool| {
            let mut out = vec![0.0f32; n];
            train
                .load(0, augmenting, &mut MaskRng::new(seed, 0), &mut out)
                .unwrap();
            out
        };
        let plain = draw(0, false);
        let differs = (0..16).any(|seed| draw(seed, true) != plain);
        assert_eq!(differs, varies, "{augment:?}");
    }
}
