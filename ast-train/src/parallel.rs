//! Data-parallel training: several workers (devices) in one process, one shard of every global
//! batch each, exchanging their dense gradients with burn's collective operations
//! (`burn::collective`, burn-collective 0.21).
//!
//! Every worker holds its own copy of the model (its own sub-net switch and BatchNorm running
//! statistics), its own [`ast_core::AstStep`] (masks, optimizer and correction state) and runs
//! the same iterations on the same sub-net `t mod K`. After the backward pass the dense gradients
//! are averaged over the workers *before* masking, correction and the update
//! ([`Team::mean_gradients`], then `AstStep::step_params`), so growth ranks the global gradient
//! and every worker applies bit-identical updates: masks, weights and optimizer state stay equal
//! by construction, and a checksum of the masks is compared at every mask event
//! ([`Team::check_same`]).
//!
//! **Rank-ordered sums.** burn-collective's `all_reduce` adds the peers' tensors in the
//! iteration order of a `HashMap` with a random seed: at three or more peers the same inputs give
//! different sums from call to call (measured: `docs/burn-collective-0.21.md` §8). The workers
//! therefore exchange their tensors with `broadcast`, one per rank (on a CPU device a broadcast
//! copies a reference, not the data), and every worker adds them in rank order: one sum, the
//! same on every worker and in every run. Each exchange moves one flat tensor of all gradients
//! (one collective operation per rank and iteration, not one per parameter).
//!
//! **Several machines.** With a [`CrossNode`] (MPI: `crate::mpi`, feature `mpi`) each process
//! sums its own workers in rank order, its worker 0 exchanges that sum with the other
//! processes, and every worker adds the processes' sums in process order: deterministic for a
//! given layout of processes and workers.
//!
//! **Failures.** burn-collective has no timeouts: a peer that stops leaves the others blocked.
//! The supervisor ([`crate::train::train_data_parallel`]) resets the collective server when a
//! worker fails, which turns the others' pending operations into errors.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, MutexGuard};

use burn::collective::{self, CollectiveConfig, CollectiveError, PeerId};
use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::TensorPrimitive;

use crate::error::{Result, TrainError};

/// burn-collective keeps one server per backend type and process: one data-parallel run at a
/// time per process.
static SESSION: Mutex<()> = Mutex::new(());

/// Holds the process's data-parallel session (burn-collective keeps one server per backend
/// type and process): take it before starting workers that [`Team::join`].
pub fn session() -> MutexGuard<'static, ()> {
    SESSION
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn collective_error(what: &str, e: CollectiveError) -> TrainError {
    match e {
        CollectiveError::LocalServerMissing | CollectiveError::RegisterNotFirstOperation => {
            TrainError::PeerFailed
        }
        e => TrainError::Workers(format!("{what}: burn-collective error {e:?}")),
    }
}

/// One worker's membership in a data-parallel run on backend `IB` (the inner backend of the
/// autodiff backend that trains, as burn-collective requires).
pub struct Team<IB: Backend> {
    rank: usize,
    size: usize,
    device: IB::Device,
    /// The other processes (machines) of the run, each with `size` workers of its own.
    nodes: Option<Arc<dyn CrossNode>>,
    _backend: PhantomData<IB>,
}

impl<IB: Backend> std::fmt::Debug for Team<IB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Team(worker {} of {}", self.rank, self.size)?;
        match &self.nodes {
            Some(n) => write!(f, ", node {} of {})", n.rank(), n.size()),
            None => write!(f, ")"),
        }
    }
}

/// The exchange between the processes of a run on several machines (one process per machine,
/// each with its own workers); see `crate::mpi::MpiNodes`. Only each process's worker 0 calls
/// it, one call at a time.
pub trait CrossNode: Send + Sync {
    /// This process's index, `0..size`.
    fn rank(&self) -> usize;
    /// The number of processes.
    fn size(&self) -> usize;
    /// Every process's `values`, concatenated in process order; all must pass as many values.
    fn all_gather(&self, values: &[f32]) -> Result<Vec<f32>>;
}

impl<IB: Backend> Team<IB> {
    /// Registers worker `rank` of `size` on `device`; returns once all `size` workers have.
    pub fn join(rank: usize, size: usize, device: &IB::Device) -> Result<Self> {
        Self::join_nodes(rank, size, device, None)
    }

    /// [`Team::join`] for a run on several machines: `nodes` connects this process with the
    /// others (each with `size` workers); worker `r` of process `p` is global worker
    /// `p·size + r`.
    pub fn join_nodes(
        rank: usize,
        size: usize,
        device: &IB::Device,
        nodes: Option<Arc<dyn CrossNode>>,
    ) -> Result<Self> {
        let config = CollectiveConfig::default().with_num_devices(size);
        collective::register::<IB>(PeerId::from(rank), device.clone(), config)
            .map_err(|e| collective_error("registering the workers", e))?;
        Ok(Team {
            rank,
            size,
            device: device.clone(),
            nodes,
            _backend: PhantomData,
        })
    }

    /// This worker's index among all workers of all processes.
    pub fn global_rank(&self) -> usize {
        self.nodes.as_ref().map_or(0, |n| n.rank()) * self.size + self.rank
    }

    /// The number of workers of all processes.
    pub fn global_size(&self) -> usize {
        self.nodes.as_ref().map_or(1, |n| n.size()) * self.size
    }

    /// Leaves the run once this worker is done. A worker that fails must not call it: the
    /// others would then go on without it. Its membership stays until the supervisor resets
    /// the session, which fails the others' next exchange instead.
    pub fn finish(self) -> Result<()> {
        collective::finish_collective::<IB>(PeerId::from(self.rank))
            .map_err(|e| collective_error("leaving the run", e))
    }

    /// This worker's index, `0..size`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of workers.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Whether this worker writes the run's files (rank 0).
    pub fn is_leader(&self) -> bool {
        self.rank == 0
    }

    /// Every worker's `t` in this process, in rank order (one broadcast per rank).
    fn local_gather(&self, t: Tensor<IB, 1>) -> Result<Vec<Tensor<IB, 1>>> {
        let mut own = Some(t.into_primitive().tensor());
        let parts: Vec<Tensor<IB, 1>> = (0..self.size)
            .map(|root| {
                let input = if root == self.rank { own.take() } else { None };
                self.share(input)
            })
            .collect::<Result<_>>()?;
        let len = parts[0].dims()[0];
        if let Some(r) = parts.iter().position(|p| p.dims()[0] != len) {
            return Err(TrainError::Workers(format!(
                "worker {r} sent {} values where worker 0 sent {len}: the workers' models differ",
                parts[r].dims()[0]
            )));
        }
        Ok(parts)
    }

    /// One local broadcast: the worker passing `Some` hands its tensor to every worker of
    /// this process.
    fn share(&self, input: Option<burn::tensor::ops::FloatTensor<IB>>) -> Result<Tensor<IB, 1>> {
        let out = collective::broadcast::<IB>(PeerId::from(self.rank), input)
            .map_err(|e| collective_error("exchanging tensors", e))?;
        // The broadcast places the result on its first caller's device.
        Ok(Tensor::from_primitive(TensorPrimitive::Float(out)).to_device(&self.device))
    }

    /// Across processes: worker 0 passes `local` (this process's part, the same length in
    /// every process) to [`CrossNode::all_gather`] and shares the result with the other
    /// workers of this process.
    fn across(&self, nodes: &dyn CrossNode, local: Tensor<IB, 1>) -> Result<Tensor<IB, 1>> {
        let all = if self.rank == 0 {
            let host: Vec<f32> = local
                .into_data()
                .convert::<f32>()
                .to_vec()
                .map_err(|e| TrainError::Workers(format!("reading a tensor: {e:?}")))?;
            let all = nodes.all_gather(&host)?;
            let t = Tensor::<IB, 1>::from_data(
                TensorData::new(all, [host.len() * nodes.size()]),
                &self.device,
            );
            Some(t.into_primitive().tensor())
        } else {
            None
        };
        self.share(all)
    }

    /// Every worker's `t`, of every process, in global rank order.
    pub fn gather(&self, t: Tensor<IB, 1>) -> Result<Vec<Tensor<IB, 1>>> {
        let local = self.local_gather(t)?;
        let Some(nodes) = &self.nodes else {
            return Ok(local);
        };
        let len = local[0].dims()[0];
        let all = self.across(nodes.as_ref(), Tensor::cat(local, 0))?;
        Ok((0..self.global_size())
            .map(|g| all.clone().slice(g * len..(g + 1) * len))
            .collect())
    }

    /// The mean of every worker's `t`: summed in rank order within each process, those sums
    /// in process order, then divided by the worker count; every worker gets the same bits, in
    /// every run of the same layout.
    pub fn mean(&self, t: Tensor<IB, 1>) -> Result<Tensor<IB, 1>> {
        let sum = fold_sum(self.local_gather(t)?);
        let sum = match &self.nodes {
            None => sum,
            Some(nodes) => {
                let len = sum.dims()[0];
                let all = self.across(nodes.as_ref(), sum)?;
                fold_sum(
                    (0..nodes.size())
                        .map(|p| all.clone().slice(p * len..(p + 1) * len))
                        .collect(),
                )
            }
        };
        Ok(sum.div_scalar(self.global_size() as f32))
    }

    /// Every worker's `values` (the same length on every worker), in rank order.
    pub fn gather_host(&self, values: &[f32]) -> Result<Vec<Vec<f32>>> {
        let t = Tensor::from_data(
            TensorData::new(values.to_vec(), [values.len()]),
            &self.device,
        );
        self.gather(t)?
            .into_iter()
            .map(|t| {
                t.into_data()
                    .convert::<f32>()
                    .to_vec()
                    .map_err(|e| TrainError::Workers(format!("reading exchanged values: {e:?}")))
            })
            .collect()
    }

    /// Whether `flag` is set on any worker.
    pub fn any(&self, flag: bool) -> Result<bool> {
        Ok(self.any_of([flag])?[0])
    }

    /// For each flag, whether it is set on any worker (one exchange for all).
    pub fn any_of<const N: usize>(&self, flags: [bool; N]) -> Result<[bool; N]> {
        let all = self.gather_host(&flags.map(|f| if f { 1.0 } else { 0.0 }))?;
        Ok(core::array::from_fn(|i| all.iter().any(|v| v[i] != 0.0)))
    }

    /// Errors unless every worker passed the same `checksum` of `what`.
    pub fn check_same(&self, what: &str, checksum: u64) -> Result<()> {
        // One byte per value: exact in any float type.
        let bytes: Vec<f32> = checksum.to_le_bytes().iter().map(|&b| b as f32).collect();
        let all = self.gather_host(&bytes)?;
        match all.iter().position(|v| *v != all[0]) {
            None => Ok(()),
            Some(r) => Err(TrainError::Workers(format!(
                "{what} of worker {r} differ from worker 0's: the workers diverged (report this \
                 as a bug; resume from the last checkpoint)"
            ))),
        }
    }

    /// Replaces `grads` by their mean over the workers (every float parameter of `model` that
    /// has a gradient; every worker must hold the same set, which the same model and sub-net
    /// give).
    pub fn mean_gradients<B, M>(
        &self,
        model: &M,
        mut grads: GradientsParams,
    ) -> Result<GradientsParams>
    where
        B: AutodiffBackend<InnerBackend = IB>,
        M: AutodiffModule<B>,
    {
        let mut flatten = Flatten::<B> {
            grads: &mut grads,
            parts: Vec::new(),
            at: HashMap::new(),
            len: 0,
        };
        model.visit(&mut flatten);
        let Flatten { parts, at, .. } = flatten;
        let flat = if parts.is_empty() {
            Tensor::zeros([0], &self.device)
        } else {
            Tensor::cat(parts, 0)
        };
        let mean = self.mean(flat)?;
        model.visit(&mut Restore::<B> {
            grads: &mut grads,
            flat: mean,
            at,
        });
        Ok(grads)
    }

    /// Replaces every float tensor of `model` that takes no gradient (the BatchNorm running
    /// statistics) by its mean over the workers, all of them in one exchange. Called after
    /// every iteration, so the workers hold the same statistics at all times and a checkpoint
    /// taken at any iteration resumes exactly (the running statistics are linear in the batch
    /// statistics: averaging every iteration is the average of the workers' own statistics).
    pub fn mean_buffers<B, M>(&self, model: M) -> Result<M>
    where
        B: AutodiffBackend<InnerBackend = IB>,
        M: AutodiffModule<B>,
    {
        // burn's running statistics keep each thread's last update aside until they are read
        // through a record; without this the average would miss the last training update.
        ast_core::subnet::sync_running_stats(&model);
        let mut buffers = Buffers::<B> {
            parts: Vec::new(),
            at: HashMap::new(),
            len: 0,
        };
        model.visit(&mut buffers);
        if buffers.parts.is_empty() {
            return Ok(model);
        }
        let mean = self.mean(Tensor::cat(buffers.parts, 0))?;
        Ok(model.map(&mut PutBuffers::<B> {
            flat: mean,
            at: buffers.at,
        }))
    }
}

/// `parts[0] + parts[1] + …`, in that order.
fn fold_sum<IB: Backend>(parts: Vec<Tensor<IB, 1>>) -> Tensor<IB, 1> {
    let mut parts = parts.into_iter();
    let first = parts.next().expect("at least one worker");
    parts.fold(first, |sum, p| sum + p)
}

/// Takes the gradients out of a [`GradientsParams`] in the model's visiting order, flattened.
struct Flatten<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    parts: Vec<Tensor<B::InnerBackend, 1>>,
    /// Where each parameter's gradient sits in the flat tensor, and its shape.
    at: HashMap<ParamId, (usize, Vec<usize>)>,
    len: usize,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Flatten<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            let dims = g.dims().to_vec();
            let n: usize = dims.iter().product();
            self.at.insert(param.id, (self.len, dims));
            self.len += n;
            self.parts.push(g.reshape([n]));
        }
    }
}

/// Puts the averaged gradients back, each in its parameter's shape.
struct Restore<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    flat: Tensor<B::InnerBackend, 1>,
    at: HashMap<ParamId, (usize, Vec<usize>)>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Restore<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some((start, dims)) = self.at.remove(&param.id) {
            let n: usize = dims.iter().product();
            let shape: [usize; D] = dims
                .try_into()
                .expect("the gradient has its parameter's rank");
            let g = self.flat.clone().slice(start..start + n).reshape(shape);
            self.grads.register::<B::InnerBackend, D>(param.id, g);
        }
    }
}

/// Collects the float tensors without gradient, flattened, in visiting order.
struct Buffers<B: AutodiffBackend> {
    parts: Vec<Tensor<B::InnerBackend, 1>>,
    at: HashMap<ParamId, (usize, usize)>,
    len: usize,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Buffers<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let tensor = param.val();
        if tensor.is_require_grad() || self.at.contains_key(&param.id) {
            return;
        }
        let n = tensor.shape().num_elements();
        self.at.insert(param.id, (self.len, n));
        self.len += n;
        self.parts.push(tensor.inner().reshape([n]));
    }
}

/// Puts the averaged tensors of [`Buffers`] back.
struct PutBuffers<B: AutodiffBackend> {
    flat: Tensor<B::InnerBackend, 1>,
    at: HashMap<ParamId, (usize, usize)>,
}

impl<B: AutodiffBackend> ModuleMapper<B> for PutBuffers<B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let tensor = match self.at.get(&id) {
            Some(&(start, n)) => {
                let shape = tensor.shape();
                Tensor::from_inner(self.flat.clone().slice(start..start + n).reshape(shape))
            }
            None => tensor,
        };
        Param::from_mapped_value(id, tensor, mapper)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use std::time::Duration;

    #[test]
    fn a_reset_fails_the_exchange_of_a_worker_whose_peer_left() {
        let _session = session();
        let device = Default::default();
        let (tx, rx) = std::sync::mpsc::channel();
        let workers: Vec<_> = (0..2)
            .map(|rank| {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let team = Team::<Flex>::join(rank, 2, &device).unwrap();
                    let sum = team.mean(Tensor::from_floats([rank as f32 + 1.0], &device));
                    assert_eq!(sum.unwrap().into_scalar(), 1.5);
                    if rank == 1 {
                        // Fails without finishing, as a worker returning an error does.
                        return;
                    }
                    let second = team.any(true);
                    tx.send(second.map(|_| ())).unwrap();
                })
            })
            .collect();
        workers.into_iter().nth(1).unwrap().join().unwrap();
        // Worker 0 waits for its peer; nothing comes until the supervisor's reset.
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
        collective::reset_collective::<Flex>();
        let got = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("worker 0 stopped");
        assert!(matches!(got, Err(TrainError::PeerFailed)), "{got:?}");
    }
}
