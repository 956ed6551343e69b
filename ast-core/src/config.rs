//! Serde configuration of an AST run, with validation naming the offending field.

use serde::{Deserialize, Serialize};

use crate::error::{invalid, Result};

/// What sub-net `k` converges to.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubnetTarget {
    /// Unstructured sparsity: a final density `d_k` in `(0, 1]` (0.05 = 95 % sparse).
    Density(f64),
    /// `N:M` structured sparsity: `N` of every `M` consecutive input channels kept.
    Nm {
        /// Weights kept per group.
        n: usize,
        /// Group size.
        m: usize,
    },
}

impl SubnetTarget {
    /// The final density (`N/M` for an N:M pattern).
    pub fn density(&self) -> f64 {
        match *self {
            SubnetTarget::Density(d) => d,
            SubnetTarget::Nm { n, m } => n as f64 / m as f64,
        }
    }
}

named_choices! {
    /// The gradient-correction modes by name (see [`CorrectionMode`]).
    pub enum CorrectionKind("correction mode") {
        /// [`CorrectionMode::Off`].
        Off = "off",
        /// [`CorrectionMode::Projection`].
        Projection = "projection",
        /// [`CorrectionMode::Ema`].
        Ema = "ema",
    }
}

/// Gradient correction between consecutive sub-nets (§7).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CorrectionMode {
    /// No correction.
    Off,
    /// Project against the previous iteration's (previous sub-net's) masked gradient.
    #[default]
    Projection,
    /// Project against the previous sub-net's EMA of its gradients.
    Ema {
        /// EMA coefficient `β` in `m ← β·m + (1 − β)·g`, in `[0, 1)`.
        beta: f64,
    },
}

impl CorrectionMode {
    /// The mode's name.
    pub fn kind(self) -> CorrectionKind {
        match self {
            CorrectionMode::Off => CorrectionKind::Off,
            CorrectionMode::Projection => CorrectionKind::Projection,
            CorrectionMode::Ema { .. } => CorrectionKind::Ema,
        }
    }

    /// The mode of `kind`; `ema_beta` is used by [`CorrectionKind::Ema`] only.
    pub fn from_kind(kind: CorrectionKind, ema_beta: f64) -> Self {
        match kind {
            CorrectionKind::Off => CorrectionMode::Off,
            CorrectionKind::Projection => CorrectionMode::Projection,
            CorrectionKind::Ema => CorrectionMode::Ema { beta: ema_beta },
        }
    }
}

/// When and how much to prune (§4, §5). Epochs are counted from 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MaskScheduleConfig {
    /// Density every unstructured sub-net starts from (ERK-allocated); 1 = dense start.
    pub init_density: f64,
    /// Exponent applied to the ERK raw scores.
    pub erk_power_scale: f64,
    /// Mask events every this many *global* iterations of a sub-net's prune counter (the original clock).
    pub update_frequency: usize,
    /// First epoch of the density ramp.
    pub init_prune_epoch: usize,
    /// Epoch at which the ramp reaches the final density.
    pub final_prune_epoch: usize,
    /// Sub-net `k`'s prune counter is delayed by `k·(K·subnet_offset + 1)` global iterations.
    pub subnet_offset: usize,
    /// Initial prune-and-regrow rate, in `[0, 1)`.
    pub prune_rate: f64,
    /// Prune rate reached by the cosine decay at the last iteration, in `[0, prune_rate]`.
    pub final_prune_rate: f64,
}

impl Default for MaskScheduleConfig {
    fn default() -> Self {
        Self {
            init_density: 1.0,
            erk_power_scale: 1.0,
            update_frequency: 999,
            init_prune_epoch: 0,
            final_prune_epoch: 110,
            subnet_offset: 100,
            prune_rate: 0.5,
            final_prune_rate: 0.005,
        }
    }
}

/// Builder-style setters `with_<field>(value)` (burn's `Config` convention), one per listed
/// field, each returning the configuration with that field set.
macro_rules! with_setters {
    ($ty:ty { $($with:ident => $field:ident: $t:ty),* $(,)? }) => {
        impl $ty {
            $(
                #[doc = concat!("This configuration with `", stringify!($field), "` set.")]
                #[must_use]
                pub fn $with(mut self, $field: $t) -> Self {
                    self.$field = $field;
                    self
                }
            )*
        }
    };
}

with_setters!(MaskScheduleConfig {
    with_init_density => init_density: f64,
    with_erk_power_scale => erk_power_scale: f64,
    with_update_frequency => update_frequency: usize,
    with_init_prune_epoch => init_prune_epoch: usize,
    with_final_prune_epoch => final_prune_epoch: usize,
    with_subnet_offset => subnet_offset: usize,
    with_prune_rate => prune_rate: f64,
    with_final_prune_rate => final_prune_rate: f64,
});

/// SGD hyper-parameters with PyTorch's semantics (`torch.optim.SGD`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SgdSettings {
    /// Momentum `μ` (0 disables the velocity state).
    pub momentum: f64,
    /// Dampening (PyTorch and the paper use 0).
    pub dampening: f64,
    /// L2 weight decay added to the gradient.
    pub weight_decay: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
}

impl Default for SgdSettings {
    fn default() -> Self {
        Self {
            momentum: 0.9,
            dampening: 0.0,
            weight_decay: 5e-4,
            nesterov: false,
        }
    }
}

named_choices! {
    /// The optimizer the AST step hands its masked, corrected gradients to.
    #[derive(Default)]
    pub enum OptimizerKind("optimizer") {
        /// SGD with PyTorch's semantics ([`SgdSettings`]); the original's.
        #[default]
        Sgd = "sgd",
        /// Adam with L2 weight decay added to the gradient ([`AdamSettings`]), as
        /// `torch.optim.Adam`.
        Adam = "adam",
        /// AdamW with decoupled weight decay ([`AdamSettings`]), as `torch.optim.AdamW`.
        AdamW = "adamw",
    }
}

/// Adam and AdamW hyper-parameters (PyTorch's defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamSettings {
    /// Decay of the first moment.
    pub beta_1: f64,
    /// Decay of the second moment.
    pub beta_2: f64,
    /// Added to the root of the second moment.
    pub epsilon: f64,
    /// Adam: L2 penalty added to the gradient; AdamW: decoupled decay rate.
    pub weight_decay: f64,
}

impl Default for AdamSettings {
    fn default() -> Self {
        Self {
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-8,
            weight_decay: 0.0,
        }
    }
}

named_choices! {
    /// Which weights the optimizer moves at each step.
    #[derive(Default)]
    pub enum UpdateScope("update scope") {
        /// The original's: the optimizer acts on the dense shared weights. The gradient is
        /// masked to the active sub-net, but weight decay and momentum move every position,
        /// also those outside the active mask (as `torch.optim.SGD` after `grad.mul_(mask)`).
        #[default]
        Dense = "dense",
        /// Only the active sub-net's positions move: weights and optimizer state outside its
        /// mask stay untouched.
        Active = "active",
    }
}

/// Everything the AST step needs to know.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AstConfig {
    /// One target per sub-net; `K` is its length.
    pub subnets: Vec<SubnetTarget>,
    /// The mask schedule.
    #[serde(default)]
    pub schedule: MaskScheduleConfig,
    /// Gradient correction mode.
    #[serde(default)]
    pub correction: CorrectionMode,
    /// The optimizer.
    #[serde(default)]
    pub optimizer: OptimizerKind,
    /// SGD's hyper-parameters (used when `optimizer` is `sgd`).
    #[serde(default)]
    pub sgd: SgdSettings,
    /// Adam's and AdamW's hyper-parameters (used when `optimizer` is `adam` or `adamw`).
    #[serde(default)]
    pub adam: AdamSettings,
    /// Which weights the optimizer moves.
    #[serde(default)]
    pub update_scope: UpdateScope,
    /// Zero the momentum of weights that a prune-and-regrow just re-activated.
    #[serde(default)]
    pub reset_momentum_on_regrow: bool,
    /// Seed of every random mask decision (ERK draws, random dense N:M groups).
    #[serde(default)]
    pub seed: u64,
}

impl AstConfig {
    /// A configuration with the given targets and every other setting at its default.
    pub fn new(subnets: Vec<SubnetTarget>) -> Self {
        Self {
            subnets,
            schedule: MaskScheduleConfig::default(),
            correction: CorrectionMode::default(),
            optimizer: OptimizerKind::default(),
            sgd: SgdSettings::default(),
            adam: AdamSettings::default(),
            update_scope: UpdateScope::default(),
            reset_momentum_on_regrow: false,
            seed: 0,
        }
    }

    /// Unstructured sub-nets of the given final densities (`[0.1, 0.05, 0.02]`), every other
    /// setting at the original's default (the cifar-unstructured schedule, SGD, dense scope).
    pub fn densities(densities: &[f64]) -> Self {
        Self::new(
            densities
                .iter()
                .map(|&d| SubnetTarget::Density(d))
                .collect(),
        )
    }

    /// Checks every field; the error names the first one out of range.
    pub fn validate(&self) -> Result<()> {
        if self.subnets.is_empty() {
            return Err(invalid("subnets", "must list at least one sub-net (K ≥ 1)"));
        }
        let s = &self.schedule;
        unit_interval("schedule.init_density", s.init_density)?;
        for target in &self.subnets {
            match *target {
                SubnetTarget::Density(d) => {
                    unit_interval("subnets.density", d)?;
                    if d > s.init_density {
                        return Err(invalid(
                            "subnets.density",
                            format!("{d} is above schedule.init_density {}", s.init_density),
                        ));
                    }
                }
                SubnetTarget::Nm { n, m } => {
                    if n < 1 || n > m {
                        return Err(invalid(
                            "subnets.nm",
                            format!("needs 1 ≤ N ≤ M, got {n}:{m}"),
                        ));
                    }
                }
            }
        }
        if !(s.erk_power_scale.is_finite() && s.erk_power_scale >= 0.0) {
            return Err(invalid(
                "schedule.erk_power_scale",
                "must be a finite number ≥ 0",
            ));
        }
        if s.update_frequency < 1 {
            return Err(invalid("schedule.update_frequency", "must be ≥ 1"));
        }
        if s.init_prune_epoch > s.final_prune_epoch {
            return Err(invalid(
                "schedule.init_prune_epoch",
                format!(
                    "{} is after schedule.final_prune_epoch {}",
                    s.init_prune_epoch, s.final_prune_epoch
                ),
            ));
        }
        if !(0.0..1.0).contains(&s.prune_rate) {
            return Err(invalid(
                "schedule.prune_rate",
                format!("must lie in [0, 1), got {}", s.prune_rate),
            ));
        }
        if s.final_prune_rate > s.prune_rate {
            return Err(invalid(
                "schedule.prune_rate",
                format!(
                    "{} is below schedule.final_prune_rate {} (the rate decays from prune_rate \
                     down to final_prune_rate)",
                    s.prune_rate, s.final_prune_rate
                ),
            ));
        }
        if !(0.0..=s.prune_rate).contains(&s.final_prune_rate) {
            return Err(invalid(
                "schedule.final_prune_rate",
                format!("must lie in [0, prune_rate], got {}", s.final_prune_rate),
            ));
        }
        if let CorrectionMode::Ema { beta } = self.correction {
            if !(0.0..1.0).contains(&beta) {
                return Err(invalid(
                    "correction.ema.beta",
                    format!("must lie in [0, 1), got {beta}"),
                ));
            }
        }
        let o = &self.sgd;
        for (field, v) in [
            ("sgd.momentum", o.momentum),
            ("sgd.dampening", o.dampening),
            ("sgd.weight_decay", o.weight_decay),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(invalid(
                    field,
                    format!("must be a finite number ≥ 0, got {v}"),
                ));
            }
        }
        if o.momentum >= 1.0 {
            return Err(invalid(
                "sgd.momentum",
                format!("must be below 1, got {}", o.momentum),
            ));
        }
        let a = &self.adam;
        for (field, v) in [("adam.beta_1", a.beta_1), ("adam.beta_2", a.beta_2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(invalid(field, format!("must lie in [0, 1), got {v}")));
            }
        }
        if !(a.epsilon.is_finite() && a.epsilon > 0.0) {
            return Err(invalid(
                "adam.epsilon",
                format!("must be a finite number > 0, got {}", a.epsilon),
            ));
        }
        if !(a.weight_decay.is_finite() && a.weight_decay >= 0.0) {
            return Err(invalid(
                "adam.weight_decay",
                format!("must be a finite number ≥ 0, got {}", a.weight_decay),
            ));
        }
        Ok(())
    }
}

fn unit_interval(field: &'static str, v: f64) -> Result<()> {
    if v > 0.0 && v <= 1.0 {
        Ok(())
    } else {
        Err(invalid(field, format!("must lie in (0, 1], got {v}")))
    }
}

with_setters!(AstConfig {
    with_schedule => schedule: MaskScheduleConfig,
    with_correction => correction: CorrectionMode,
    with_optimizer => optimizer: OptimizerKind,
    with_sgd => sgd: SgdSettings,
    with_adam => adam: AdamSettings,
    with_update_scope => update_scope: UpdateScope,
    with_reset_momentum_on_regrow => reset_momentum_on_regrow: bool,
    with_seed => seed: u64,
});

#[cfg(test)]
mod tests {

    #[test]
    fn builders_set_exactly_their_field() {
        let built = AstConfig::densities(&[0.1, 0.05])
            .with_schedule(
                MaskScheduleConfig::default()
                    .with_update_frequency(5)
                    .with_final_prune_epoch(3)
                    .with_subnet_offset(2),
            )
            .with_update_scope(UpdateScope::Active)
            .with_seed(7);
        let mut literal = AstConfig::new(vec![
            SubnetTarget::Density(0.1),
            SubnetTarget::Density(0.05),
        ]);
        literal.schedule = MaskScheduleConfig {
            update_frequency: 5,
            final_prune_epoch: 3,
            subnet_offset: 2,
            ..MaskScheduleConfig::default()
        };
        literal.update_scope = UpdateScope::Active;
        literal.seed = 7;
        assert_eq!(built, literal);
    }
    use super::*;
    use crate::AstError;

    fn field_of(config: &AstConfig) -> &'static str {
        match config.validate() {
            Err(AstError::InvalidConfig { field, .. }) => field,
            other => panic!("expected an invalid-config error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_valid_and_round_trip_through_json() {
        let config = AstConfig::new(vec![
            SubnetTarget::Density(0.1),
            SubnetTarget::Nm { n: 2, m: 4 },
        ]);
        config.validate().unwrap();
        let json = serde_json::to_string(&config).unwrap();
        assert!(json.contains(r#""nm":{"n":2,"m":4}"#), "{json}");
        let back: AstConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, config);
    }

    #[test]
    fn named_choices_read_and_write_their_names_and_list_the_valid_ones() {
        let mut config = AstConfig::new(vec![SubnetTarget::Density(0.1)]);
        config.optimizer = OptimizerKind::AdamW;
        config.update_scope = UpdateScope::Active;
        let json = serde_json::to_string(&config).unwrap();
        assert!(json.contains(r#""optimizer":"adamw""#), "{json}");
        assert!(json.contains(r#""update_scope":"active""#), "{json}");
        let bad = json.replace(r#""adamw""#, r#""lamb""#);
        let err = serde_json::from_str::<AstConfig>(&bad)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown optimizer `lamb` (valid: sgd, adam, adamw)"),
            "{err}"
        );
        for &kind in CorrectionKind::ALL {
            let mode = CorrectionMode::from_kind(kind, 0.5);
            assert_eq!(mode.kind(), kind);
        }
    }

    #[test]
    fn each_invalid_value_names_its_field() {
        let base = AstConfig::new(vec![SubnetTarget::Density(0.1)]);
        type Mutation = Box<dyn Fn(&mut AstConfig)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("subnets", Box::new(|c| c.subnets.clear())),
            (
                "subnets.density",
                Box::new(|c| c.subnets[0] = SubnetTarget::Density(0.0)),
            ),
            (
                "subnets.density",
                Box::new(|c| c.subnets[0] = SubnetTarget::Density(1.5)),
            ),
            (
                "subnets.nm",
                Box::new(|c| c.subnets[0] = SubnetTarget::Nm { n: 5, m: 4 }),
            ),
            (
                "subnets.nm",
                Box::new(|c| c.subnets[0] = SubnetTarget::Nm { n: 0, m: 4 }),
            ),
            (
                "schedule.init_density",
                Box::new(|c| c.schedule.init_density = 0.0),
            ),
            (
                "schedule.update_frequency",
                Box::new(|c| c.schedule.update_frequency = 0),
            ),
            (
                "schedule.init_prune_epoch",
                Box::new(|c| c.schedule.init_prune_epoch = 200),
            ),
            (
                "schedule.prune_rate",
                Box::new(|c| c.schedule.prune_rate = 1.0),
            ),
            (
                "schedule.prune_rate",
                Box::new(|c| c.schedule.prune_rate = -0.1),
            ),
            (
                "correction.ema.beta",
                Box::new(|c| c.correction = CorrectionMode::Ema { beta: 1.0 }),
            ),
            ("sgd.momentum", Box::new(|c| c.sgd.momentum = 1.0)),
            (
                "sgd.weight_decay",
                Box::new(|c| c.sgd.weight_decay = f64::NAN),
            ),
            ("adam.beta_1", Box::new(|c| c.adam.beta_1 = 1.0)),
            ("adam.beta_2", Box::new(|c| c.adam.beta_2 = -0.1)),
            ("adam.epsilon", Box::new(|c| c.adam.epsilon = 0.0)),
            (
                "adam.weight_decay",
                Box::new(|c| c.adam.weight_decay = f64::INFINITY),
            ),
        ];
        for (field, mutate) in cases {
            let mut config = base.clone();
            mutate(&mut config);
            assert_eq!(field_of(&config), field);
        }
    }

    #[test]
    fn unknown_json_fields_are_rejected() {
        let err =
            serde_json::from_str::<AstConfig>(r#"{"subnets": [{"density": 0.1}], "sedd": 1}"#)
                .unwrap_err();
        assert!(err.to_string().contains("unknown field `sedd`"), "{err}");
    }
}
