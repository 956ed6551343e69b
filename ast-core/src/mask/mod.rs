//! Mask calculation on the host: deterministic top-k / thresholds and N:M groups.
//!
//! Masks change rarely (every `update_frequency` iterations), so they are computed on flat
//! host vectors in a fixed order: the result does not depend on the backend or device.

pub mod nm;
pub mod topk;
pub mod update;
