"""One learner trained by several processes (``torchrun`` / ``accelerate launch``).

Avalanche 0.6 gives the training loaders a ``DistributedSampler`` as soon as a process group
exists (:func:`~avalanche_d2l.dreaming.accel.init_process_group` starts it through Avalanche's
``DistributedHelper``), but leaves the model alone: without more, every process trains its own
learner on its shard. :class:`DataParallel` turns them into one learner, as
``DistributedDataParallel`` would:

* the global mini-batch keeps the size of a one-process run: each of ``W`` processes trains on
  ``train_mb_size / W`` samples of its shard (Avalanche's sampler), and after every ``backward``
  the gradients are averaged over the processes, so every process takes the same optimiser step;
* at the start of every experience and before every evaluation the learner's parameters and
  buffers are copied from process 0 (as DDP does when it wraps a model), so that the learner is
  the same everywhere even where a GPU kernel is not deterministic; batch-norm running statistics
  are averaged over the processes after each epoch;
* random numbers differ per process during the training epochs (each draws its own replay and
  dream samples, as one process draws a whole batch of them) and are re-aligned, from process 0,
  before the plugins' end-of-experience work: buffer updates, dreaming, the GAN phase and D2L's
  sleep run in every process from the same seeds on the same learner, so their results (the
  buffer, the dream set, the generator) are the same in every process (on a GPU, only as far as
  its kernels are deterministic: these are not copied from process 0);
* evaluation reads the whole test set in every process (Avalanche's metrics are not summed over
  processes), so every process computes the same figures; only process 0 writes them.

The gradients are averaged by this plugin after ``backward`` instead of wrapping the model in
``DistributedDataParallel``: the methods' plugins read the strategy's model as it is (D2L's
``DreamHeads``, Genifer's feature layer by name, frozen copies of it), and strategies such as
ER-ACE or D2L's dream loss run the model more than once per step, which DDP's reducer does not
follow. The averaged gradient is the one DDP computes; what differs is that communication is not
overlapped with the backward pass.

Results differ from a one-process run's by what the shards change: the order and composition of
mini-batches (Avalanche's sampler shards with its own seed and deals the same permutation every
epoch), batch-norm statistics computed over ``train_mb_size / W`` samples per process, and the
random draws of replay and dreams.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from avalanche_d2l.dreaming import accel

__all__ = ["RANK_LOG_ENV", "DataParallel", "add_data_parallel", "check_processes", "state_digest"]

#: A folder: after each experience every process appends to ``rank<r>.jsonl`` there its rank, the
#: world size, the number and the sum of the inputs it trained on, a digest of the learner's
#: parameters right after training (``trained``) and digests of the learner and of every module
#: the plugins hold after their end-of-experience work, before the learner is copied from process
#: 0 (``after_plugins``; this hashes a Stable Diffusion dreamer too: a diagnostic, slow there).
RANK_LOG_ENV = "AVALANCHE_D2L_RANK_LOG"


def _world() -> int:
    return accel.num_processes()


def _on_comm_device(t: torch.Tensor) -> torch.Tensor:
    """NCCL moves CUDA tensors only."""
    if torch.distributed.get_backend() == "nccl" and not t.is_cuda:
        return t.cuda()
    return t


def _all_reduce_mean(tensors: list[torch.Tensor]) -> None:
    """Replace every tensor (same dtype) by its mean over the processes, in one call."""
    if not tensors:
        return
    flat = _on_comm_device(torch.cat([t.reshape(-1) for t in tensors]))
    torch.distributed.all_reduce(flat)
    flat /= _world()
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def _broadcast(tensors: list[torch.Tensor]) -> None:
    """Replace every tensor by process 0's."""
    for t in tensors:
        sent = _on_comm_device(t.data)
        torch.distributed.broadcast(sent, src=0)
        if sent is not t.data:
            t.data.copy_(sent)


def state_digest(module: nn.Module) -> str:
    """SHA-1 of a module's parameters (names and values, float32 on the CPU)."""
    h = hashlib.sha1()
    for name, p in module.named_parameters():
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _plugin_modules(strategy) -> list[nn.Module]:
    """Every module the plugins hold, directly or one object down (Genifer's GAN holds G, D and
    the EMA generator), in plugin order; the learner itself left out."""
    seen, out = {id(strategy.model)}, []

    def visit(obj, depth: int) -> None:
        for value in vars(obj).values():
            if isinstance(value, nn.Module):
                if id(value) not in seen:
                    seen.add(id(value))
                    out.append(value)
            elif depth and hasattr(value, "__dict__") and not isinstance(value, type):
                visit(value, depth - 1)

    for plugin in strategy.plugins:
        visit(plugin, 1)
    return out


class DataParallel:
    """Avalanche plugin: the processes of a ``torchrun`` / ``accelerate launch`` run train one
    learner (see the module's description). It must be the strategy's first plugin; with one
    process it does nothing.

    Args:
        rank_log: folder for the per-process record (default: ``$AVALANCHE_D2L_RANK_LOG``).
    """

    supports_distributed = True

    def __init__(self, rank_log: str | os.PathLike | None = None):
        self.rank_log = rank_log
        self._global_mb: int | None = None
        self._samples, self._checksum = 0, 0.0
        self._pending: dict | None = None

    # ---- the learner is process 0's at the start of an experience ------------------------------

    def before_train_dataset_adaptation(self, strategy, **kwargs):
        world = _world()
        if world == 1:
            return
        self._sync_from_main(strategy)
        # before Avalanche builds the loaders: each process's share of the global mini-batch
        global_mb = int(strategy.train_mb_size)
        if global_mb % world:
            raise ValueError(
                f"the training batch size {global_mb} does not split over {world} processes: "
                f"use a multiple of {world} (each process trains on its share)"
            )
        self._global_mb = global_mb
        strategy.train_mb_size = global_mb // world
        self._samples, self._checksum = 0, 0.0

    def before_training_epoch(self, strategy, **kwargs):
        if _world() == 1:
            return
        # every process draws its own replay / dream samples, as one process draws a whole batch
        seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)
        _broadcast([seed])
        self._seed_all(int(seed) + accel.process_index())

    # ---- one step: the gradient of the global mini-batch ----------------------------------------

    def after_backward(self, strategy, **kwargs):
        if _world() == 1:
            return
        self._samples += int(strategy.mb_x.shape[0])
        if self._log_folder():  # a host sync per step: only when asked for
            self._checksum += float(strategy.mb_x.detach().double().sum())
        params = [p for p in strategy.model.parameters() if p.requires_grad]
        # a parameter that got no gradient here but did elsewhere counts as zero here
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
        has = _on_comm_device(has)
        torch.distributed.all_reduce(has)
        grads: dict[torch.dtype, list[torch.Tensor]] = {}
        for p, n in zip(params, has.tolist()):
            if n == 0:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.setdefault(p.grad.dtype, []).append(p.grad)
        for group in grads.values():
            _all_reduce_mean(group)

    def after_training_epoch(self, strategy, **kwargs):
        if _world() > 1:
            self._average_statistics(strategy.model)

    # ---- the end of an experience: the same random numbers everywhere --------------------------

    def after_training_exp(self, strategy, **kwargs):
        if _world() == 1:
            return
        self._average_statistics(strategy.model)
        if self._global_mb is not None:
            strategy.train_mb_size = self._global_mb
        seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)
        _broadcast([seed])
        self._seed_all(int(seed))
        self._pending = self._record(strategy) if self._log_folder() else None

    # ---- evaluation: every process scores the whole test set ------------------------------------

    def before_eval(self, strategy, **kwargs):
        if _world() == 1:
            return
        if self._pending is not None:  # after the plugins' end-of-experience work, before the copy
            mods = [strategy.model, *_plugin_modules(strategy)]
            self._pending["after_plugins"] = [state_digest(m) for m in mods]
            self._write(self._pending)
            self._pending = None
        self._sync_from_main(strategy)

    def before_eval_exp(self, strategy, **kwargs):
        if _world() > 1:
            strategy.dataloader = _unsharded(strategy.dataloader)

    # ---- helpers --------------------------------------------------------------------------------

    @staticmethod
    def _seed_all(seed: int) -> None:
        from avalanche_d2l.utils import seed_everything

        seed_everything(seed)

    @staticmethod
    def _sync_from_main(strategy) -> None:
        """The learner of process 0, as DDP copies it when it wraps a model."""
        _broadcast([*strategy.model.parameters(), *strategy.model.buffers()])

    @staticmethod
    def _average_statistics(model: nn.Module) -> None:
        floats: dict[torch.dtype, list[torch.Tensor]] = {}
        for b in model.buffers():  # running means and variances; counters agree already
            if b.is_floating_point():
                floats.setdefault(b.dtype, []).append(b)
        for group in floats.values():
            _all_reduce_mean(group)

    def _log_folder(self) -> str | None:
        return str(self.rank_log or os.environ.get(RANK_LOG_ENV) or "") or None

    def _record(self, strategy) -> dict:
        return {
            "rank": accel.process_index(),
            "world_size": _world(),
            "experience": int(strategy.experience.current_experience),
            "samples": self._samples,
            "input_sum": self._checksum,
            "trained": state_digest(strategy.model),
        }

    def _write(self, record: dict) -> None:
        folder = Path(self._log_folder())
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"rank{record['rank']}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def _unsharded(loader):
    """An Avalanche loader like ``loader`` that reads its whole dataset in every process."""
    from avalanche.benchmarks.utils.data_loader import MultiDatasetDataLoader

    if not isinstance(loader, MultiDatasetDataLoader) or not loader.distributed_sampling:
        return loader
    return MultiDatasetDataLoader(
        loader.datasets,
        loader.batch_sizes,
        oversample_small_datasets=loader.oversample_small_datasets,
        distributed_sampling=False,
        never_ending=loader.never_ending,
        **loader.loader_kwargs,
    )


def check_processes(device: str) -> int:
    """Start the process group of a ``torchrun`` / ``accelerate launch`` run on ``device``'s
    kind (NCCL for GPUs, gloo for CPU); returns the number of processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and torch.device(device).index is not None:
        raise ValueError(
            f"device {device!r} under {world} processes would put every process on one GPU; "
            "pass --device cuda (each process takes the GPU of its LOCAL_RANK)"
        )
    accel.init_process_group(device)
    return accel.num_processes()


def add_data_parallel(strategy) -> None:
    """Put a :class:`DataParallel` first among ``strategy``'s plugins when several processes run
    (a strategy restored from a checkpoint may already hold one)."""
    if _world() == 1 or any(isinstance(p, DataParallel) for p in strategy.plugins):
        return
    strategy.plugins.insert(0, DataParallel())
