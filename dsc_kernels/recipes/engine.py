"""The training engine the recipes share: process group (DDP under torchrun), loaders, the epoch loop with tqdm,
and the output folder (metrics.json, model.pt) that ``recipes.load`` reads back.

Distributed runs: ``torchrun --nproc_per_node=N -m dsc_kernels train ... --distributed``. Every rank builds the same
model from the same seed, wraps it in ``DistributedDataParallel`` (gloo on CPU, nccl on GPU; gradients are
all-reduced during the backward, fused ops included) and reads its shard of the training set through a
``DistributedSampler``; rank 0 evaluates and writes the outputs while the others wait.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import pickle
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from .. import _validate as check
from ..data import _seed as torch_seed

MODEL_FILE, METRICS_FILE = "model.pt", "metrics.json"


@dataclass
class Run:
    """Where a recipe runs: device, rank and world size (1 and rank 0 without --distributed)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, value: float) -> float:
        """The mean of a float over the ranks."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t) / self.world_size


def default_device() -> str:
    """The device a run without --device uses: cuda when torch sees one, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def torchrun_missing() -> str | None:
    """Why a --distributed run cannot join a process group here (no torchrun environment), or None when it can."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return (
            "--distributed needs the environment torchrun sets: run "
            "`torchrun --nproc_per_node=2 -m dsc_kernels train ... --distributed`"
        )
    return None


def start(distributed: bool, device: str | torch.device | None = None) -> Run:
    """Join the torchrun process group when ``distributed`` (gloo on CPU, nccl on CUDA), else a single process."""
    check.flag("distributed", distributed)
    device = check.device("device", default_device() if device is None else device)
    if not distributed:
        return Run(device)
    missing = torchrun_missing()
    if missing is not None:
        raise SystemExit(missing)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":  # "cuda:0" too: a string comparison sent it to the CPU and gloo
        torch.cuda.set_device(local_rank)
        run_device = torch.device("cuda", local_rank)
    else:
        run_device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Run(run_device, dist.get_rank(), dist.get_world_size(), True)


def finish(run: Run) -> None:
    """Leave the process group. Callers drop their DDP models first: a DDP module sits in reference cycles, and one
    collected only at interpreter shutdown has gloo destroy its pending work with no interpreter left, which aborts
    the process ("terminate called without an active exception"). The collection here frees those cycles while
    the interpreter is alive. No barrier: this also runs when a rank fails, and must not wait for the others then."""
    if run.distributed and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode inside the block, and back in the caller's mode after it, also when the block raises
    (a training model left in eval mode would go on training without its dropout or its tracked step)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _cuda_generators(run: Run) -> list[torch.device]:
    """The CUDA devices whose generators a recipe draws from besides the CPU's: the run's own, if it is one."""
    return [run.device] if run.device.type == "cuda" else []


def seed_rng(run: Run, seed: int) -> None:
    """Seed the generators a recipe draws from, the CPU's and the run's CUDA device's, and no other:
    ``torch.manual_seed`` also reseeds every other GPU's (or queues that until CUDA starts), which ``forked_rng``,
    restoring only these two, would leave changed behind the caller."""
    torch.random.default_generator.manual_seed(seed)
    for device in _cuda_generators(run):
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


def forked_rng(run: Run):
    """A context in which a recipe may seed torch's global generators (its initialisation and its training noise):
    the CPU's and the run's CUDA device's are restored on exit, so ``train()`` called from Python leaves the caller's
    global stream where it was instead of reseeded from the recipe's seed."""
    return torch.random.fork_rng(devices=_cuda_generators(run))


def wrap(model: nn.Module, run: Run) -> nn.Module:
    """DistributedDataParallel around ``model`` in a distributed run (the model itself otherwise)."""
    if not run.distributed:
        return model
    device_ids = [run.device.index] if run.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def train_loader(x: Tensor, y: Tensor, batch_size: int, seed: int, run: Run) -> DataLoader:
    """Shuffled batches of (x, y), one shard per rank in a distributed run (``loader.sampler.set_epoch`` is called
    by ``fit``). x and y: tensors with the same number >= 1 of samples."""
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() == 0 or len(x) == 0:
        raise ValueError(f"x must hold at least one sample, got shape {tuple(x.shape)}")  # no batch to train on
    if y.dim() == 0 or len(y) != len(x):
        raise ValueError(f"x and y must hold the same number of samples, got {tuple(x.shape)} and {tuple(y.shape)}")
    batch_size, seed = check.count("batch_size", batch_size, 1), torch_seed(seed)
    dataset = TensorDataset(x, y)
    generator = torch.Generator().manual_seed(seed)
    if run.distributed:
        sampler = DistributedSampler(dataset, num_replicas=run.world_size, rank=run.rank, shuffle=True, seed=seed)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)


def fit(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: Callable[[nn.Module, Tensor, Tensor], Tensor],
    optimizer: torch.optim.Optimizer,
    epochs: int,
    run: Run,
    *,
    desc: str,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    after_step: Callable[[], None] | None = None,
    after_epoch: Callable[[int, float], dict | None] | None = None,
) -> list[dict]:
    """Train for ``epochs`` with a tqdm bar on rank 0; returns one record per epoch: mean training loss (over ranks),
    seconds, and whatever ``after_epoch(epoch, loss)`` returns. ``after_step()`` runs after every optimiser step
    (e.g. renormalising a dictionary; identical on every rank, so replicas stay equal)."""
    from tqdm import tqdm

    epochs = check.count("epochs", epochs, 1)
    if len(loader) == 0:  # every epoch would record a loss of 0 without a single step
        raise ValueError("loader must yield at least one batch, got an empty one")

    history = []
    # rank 0 only, and (None) only on a terminal: in a redirected log each \r-redrawn update would pile up
    with tqdm(
        total=epochs * len(loader),
        desc=desc,
        disable=None if run.is_main else True,
        file=sys.stderr,
        dynamic_ncols=True,
    ) as bar:  # closed however the loop ends (a raised error left the bar drawn)
        for epoch in range(epochs):
            if isinstance(loader.sampler, DistributedSampler):
                loader.sampler.set_epoch(epoch)
            model.train()
            start_time, total, count = time.perf_counter(), 0.0, 0
            for x, y in loader:
                x, y = x.to(run.device), y.to(run.device)
                loss = loss_fn(model, x, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if after_step is not None:
                    after_step()
                total, count = total + float(loss.detach()) * len(x), count + len(x)
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{total / count:.4g}")
            if scheduler is not None:
                scheduler.step()
            record = {
                "epoch": epoch + 1,
                "loss": run.mean(total / max(count, 1)),
                "seconds": time.perf_counter() - start_time,
            }
            # The mean over ranks, so every rank stops together (a rank stopping alone would leave the others waiting in
            # DDP's all-reduce); training on from NaN weights only wrote NaN metrics and a NaN model.
            if not math.isfinite(record["loss"]):
                raise FloatingPointError(
                    f"{desc}: the training loss of epoch {epoch + 1} is {record['loss']}: training diverged "
                    "(lower the learning rate)"
                )
            if after_epoch is not None:
                record.update(after_epoch(epoch, record["loss"]) or {})
            history.append(record)
    return history


def backend_that_ran(model: nn.Module) -> str | None:
    """The conv-ISTA backend the model's sparse-coding layers ran on, ``auto`` resolved to the table row it picks
    for their device and dtype (``DSC_KERNELS_BACKEND`` included); None for a model without such layers (the
    digits strategies other than dsc run plain convolutions, which no backend serves). Several names are joined
    with "+". The CPU cost model can still send a single call to the reference: the recipes' small convolutions
    stay far below its intensity limit (ops.cpu_cost), so every call takes the row named here."""
    from .. import ops
    from ..nn import ConvSparseCoding1d, ConvSparseCoding2d

    layers = [m for m in model.modules() if isinstance(m, (ConvSparseCoding1d, ConvSparseCoding2d))]
    names = {ops.select("conv_ista", m.backend, m.weight.device, m.weight.dtype).name for m in layers}
    return "+".join(sorted(names)) or None


def save(out: str | Path, recipe: str, spec: dict, model: nn.Module, metrics: dict) -> None:
    """Write ``out/model.pt`` ({recipe, spec, state_dict}: the recipe rebuilds the module from spec) and
    ``out/metrics.json``. metrics["backend"], when present, becomes the backend that ran (``backend_that_ran``;
    updated in place, so the metrics a recipe returns agree with the file); the spec keeps the one asked for, so a
    model trained with ``auto`` picks its own backend on the machine that loads it (one trained with an explicit
    backend asks for that one again, and a machine without it refuses at the first forward)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    if "backend" in metrics:
        metrics["backend"] = backend_that_ran(module)
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    # Each file is written beside and renamed into place, so an interrupted save never leaves half of one; the
    # metrics go last, and an earlier run's go first: interrupted between the two renames, a save into an earlier
    # run's folder left this model beside the metrics of that run (which the report reads as this one's).
    (out / METRICS_FILE).unlink(missing_ok=True)
    for name, write in (
        (MODEL_FILE, lambda path: torch.save({"recipe": recipe, "spec": spec, "state_dict": state}, path)),
        (METRICS_FILE, lambda path: path.write_text(json.dumps(metrics, indent=2) + "\n")),
    ):
        partial = out / (name + ".partial")
        write(partial)
        os.replace(partial, out / name)


def read_checkpoint(out: str | Path) -> dict:
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be a str or a path, got {out!r}")
    path = Path(out) / MODEL_FILE
    if not path.is_file():
        # `--strategy all` writes one run per strategy into subfolders of --out, and its own folder holds only
        # summary.json: name them rather than send the user back to the folder they passed
        runs = sorted(p.parent.name for p in Path(out).glob(f"*/{MODEL_FILE}") if p.is_file())
        if runs:
            raise FileNotFoundError(
                f"no {MODEL_FILE} in {out}: it holds one run per strategy (`--strategy all`); load one of "
                + ", ".join(str(Path(out) / name) for name in runs)
            )
        raise FileNotFoundError(f"no {MODEL_FILE} in {out}: pass the --out folder of `python -m dsc_kernels train`")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    # a file cut short (an interrupted copy) raised a bare OSError, a text file a KeyError
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, OSError) as err:
        raise ValueError(f"{path} is not a checkpoint written by `python -m dsc_kernels train`: {err}") from err
    if not isinstance(checkpoint, dict) or not {"recipe", "spec", "state_dict"} <= set(checkpoint):
        raise ValueError(
            f"{path} is not a checkpoint written by `python -m dsc_kernels train`: it lacks recipe, spec or state_dict"
        )
    return checkpoint
