//! One file per command (`eval` and `stats` run in `backend`).

pub mod bench;
pub mod check;
pub mod deploy;
pub mod import;
pub mod plot;
pub mod report;
pub mod run;
pub mod schedule;
