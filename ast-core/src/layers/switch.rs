//! The handle that selects the active sub-net in every layer of a model at once.

use core::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Which sub-net a model computes with. One handle is shared (cloned) by every masked layer and
/// switchable BatchNorm of a model: [`SubnetSwitch::set`] switches them all (the paper's
/// `switch(k)`).
///
/// The handle is not part of the module's record (it holds no learned state). Cloning a module
/// clones the handle, so a clone (e.g. `model.valid()` for evaluation) follows the same switch.
#[derive(Clone, Default)]
pub struct SubnetSwitch {
    active: Arc<AtomicUsize>,
}

impl SubnetSwitch {
    /// A new switch, set to sub-net 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// Selects sub-net `k` in every layer sharing this handle.
    pub fn set(&self, k: usize) {
        self.active.store(k, Ordering::Relaxed);
    }

    /// The active sub-net.
    pub fn get(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Whether two handles switch the same layers.
    pub fn same_as(&self, other: &SubnetSwitch) -> bool {
        Arc::ptr_eq(&self.active, &other.active)
    }
}

impl fmt::Debug for SubnetSwitch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SubnetSwitch({})", self.get())
    }
}
