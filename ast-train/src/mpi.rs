//! Runs on several machines through MPI (Open MPI or MPICH, via the `mpi` crate; cargo feature
//! `mpi`): one process per machine, started by `mpirun`, each with its own data-parallel workers
//! ([`crate::parallel`]). burn-collective 0.21's own multi-node path stops after one all-reduce
//! (measured: `docs/burn-collective-0.21.md` §9), so the exchange between processes is MPI's
//! `MPI_Allgather`; the sums stay ours, in a fixed order ([`crate::parallel::Team::mean`]).

use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

use crate::error::{Result, TrainError};
use crate::parallel::CrossNode;

/// The processes of `MPI_COMM_WORLD`. The program initialises MPI with at least
/// `mpi::Threading::Serialized` (each process's worker 0 calls MPI from a thread of its own)
/// and keeps the `Universe` alive while it trains.
#[derive(Debug, Clone, Copy)]
pub struct MpiNodes {
    rank: usize,
    size: usize,
}

impl MpiNodes {
    /// This process's place in `MPI_COMM_WORLD`.
    pub fn world() -> Self {
        let world = SimpleCommunicator::world();
        MpiNodes {
            rank: world.rank() as usize,
            size: world.size() as usize,
        }
    }
}

impl CrossNode for MpiNodes {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_gather(&self, values: &[f32]) -> Result<Vec<f32>> {
        let world = SimpleCommunicator::world();
        let len = values.len() as u64;
        let mut lens = vec![0u64; self.size];
        world.all_gather_into(&len, &mut lens[..]);
        if let Some(p) = lens.iter().position(|&l| l != len) {
            return Err(TrainError::Workers(format!(
                "process {p} exchanges {} values where process {} exchanges {len}: the \
                 processes' models or configurations differ",
                lens[p], self.rank
            )));
        }
        let mut all = vec![0f32; values.len() * self.size];
        world.all_gather_into(values, &mut all[..]);
        Ok(all)
    }
}
