//! The handle that selects the active sub-net in every layer of a model at once.

use core::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// Which sub-net a model computes with. One handle is shared (cloned) by every masked layer and
/// switchable BatchNorm of a model: [`SubnetSwitch::set`] switches them all (the paper's
/// `switch(k)`).
///
/// The handle is not part of the module's record (it holds no learned state). Cloning a module
/// clones the handle, so a clone (e.g. `model.valid()` for evaluation) follows the same switch.
///
/// The handle also says whether the coming backward pass must give masked weights their
/// gradient at *every* position (growth ranks inactive positions by it) or only at the active
/// ones (enough for an update inside the mask, and cheaper for a sparse kernel). It starts at
/// "every position"; [`crate::AstStep::begin`] asks for it only on mask-event iterations.
///
/// Masked layers count their forward passes on the handle, so that [`crate::AstStep::step`]
/// can tell that the model it steps computed through the step's own switch since
/// [`crate::AstStep::begin`].
#[derive(Clone)]
pub struct SubnetSwitch {
    active: Arc<AtomicUsize>,
    dense_weight_grad: Arc<AtomicBool>,
    forwards: Arc<AtomicUsize>,
}

impl Default for SubnetSwitch {
    fn default() -> Self {
        Self {
            active: Arc::default(),
            dense_weight_grad: Arc::new(AtomicBool::new(true)),
            forwards: Arc::default(),
        }
    }
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

    /// Whether the next backward pass needs the masked weights' gradient at every position.
    pub fn dense_weight_grad(&self) -> bool {
        self.dense_weight_grad.load(Ordering::Relaxed)
    }

    /// Sets [`SubnetSwitch::dense_weight_grad`] for every layer sharing this handle.
    pub fn set_dense_weight_grad(&self, dense: bool) {
        self.dense_weight_grad.store(dense, Ordering::Relaxed);
    }

    /// Counts one forward pass of a masked layer switched by this handle.
    pub(crate) fn note_forward(&self) {
        self.forwards.fetch_add(1, Ordering::Relaxed);
    }

    /// Forward passes of masked layers since the last [`Self::reset_forwards`].
    pub(crate) fn forwards(&self) -> usize {
        self.forwards.load(Ordering::Relaxed)
    }

    pub(crate) fn reset_forwards(&self) {
        self.forwards.store(0, Ordering::Relaxed);
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
