//! Commands that live in a file of their own.

pub mod deploy;
