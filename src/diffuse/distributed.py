"""Many processes, one run: PyTorch DDP under `torchrun` or `accelerate launch`.

Both launchers start one process per device and set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; `start` reads them and joins the process group (NCCL on GPUs, gloo on CPU). Nothing
here launches processes or moves bytes by hand: gradients go through DistributedDataParallel,
everything else through torch.distributed's collectives.

How a run stays independent of the number of ranks:
- training and distillation: every rank draws the whole global batch and its noise from
  (seed, step) and trains on its own contiguous block of it; DDP averages the blocks' gradients,
  which is the gradient of the global batch's mean loss (`block`, `wrap`);
- sampling: image i's noise comes from its own seed, rank r samples a contiguous block of the
  images and the blocks are gathered in order (`gather`);
- FD: each rank adds up the float64 feature sums of its block and the sums are added across
  ranks (`all_sum`);
- rank 0 alone writes to the run directory (config, metrics, grids, checkpoints, report); every
  rank reads a checkpoint to resume.
Without a launcher (or with one process) every function here is the single-process identity.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from diffuse.errors import UserError


def start() -> None:
    """Join the launcher's process group, if this process was started by one (WORLD_SIZE > 1).

    gloo carries CPU tensors and NCCL CUDA ones, so each collective takes the backend of its tensors.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")


def rank_device(device: torch.device) -> torch.device:
    """This rank's device: under a launcher, "cuda" means the GPU numbered by LOCAL_RANK."""
    if device.type == "cuda" and device.index is None and size() > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def wrap(module: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
    """`module` in DistributedDataParallel under a launcher, so that a backward through its output
    averages its parameters' gradients over the ranks; the module itself in one process.
    find_unused_parameters: some parameters get no gradient in some steps (DDP must not wait for them)."""
    if size() == 1:
        return module
    device = next(module.parameters()).device
    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None,
                                   find_unused_parameters=find_unused_parameters)


def stop() -> None:
    """Leave the process group (at the end of a command)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes the run directory and prints: rank 0."""
    return rank() == 0


def block(n: int, r: int | None = None) -> slice:
    """Rank r's (this rank's by default) contiguous block of n items: the first n % size ranks get one more."""
    r = rank() if r is None else r
    per, extra = divmod(n, size())
    start = r * per + min(r, extra)
    return slice(start, start + per + (r < extra))


def check_batch(batch: int) -> None:
    """A global batch must split evenly, so that the ranks' mean gradients average to the batch's."""
    if batch % size():
        raise UserError(f"train.batch = {batch} does not split over {size()} processes; "
                        f"choose a global batch divisible by {size()}.")


def gather(x: torch.Tensor, n: int) -> torch.Tensor:
    """Every rank's block (from `block(n)`) of an (n, ...) tensor, concatenated in rank order, on every rank."""
    if size() == 1:
        return x
    sizes = [len(range(n)[block(n, r)]) for r in range(size())]
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[:len(x)] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:k] for part, k in zip(parts, sizes)])


def all_sum(x: np.ndarray | float, device: torch.device) -> np.ndarray:
    """The float64 sum over ranks of an array (or number) that each rank holds."""
    if size() == 1:
        return np.asarray(x, dtype=np.float64)
    t = torch.as_tensor(np.asarray(x, dtype=np.float64), device=device).clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().numpy()


def mean(value, device: torch.device):
    """The mean over ranks of a number (a loss, say), or of each number of a dict of them."""
    if size() == 1:
        return value
    if isinstance(value, dict):
        sums = all_sum([value[key] for key in value], device)
        return {key: float(total) / size() for key, total in zip(value, sums)}
    return float(all_sum(value, device)) / size()


def agree(signal_name: str | None, device: torch.device) -> str | None:
    """A stop request that every rank sees at the same step: any rank's signal stops all of them."""
    if size() == 1:
        return signal_name
    names = ("SIGINT", "SIGTERM")
    code = torch.tensor([0 if signal_name is None else 1 + names.index(signal_name)], device=device)
    dist.all_reduce(code, op=dist.ReduceOp.MAX)
    return None if code.item() == 0 else names[code.item() - 1]


def barrier() -> None:
    if size() > 1:
        dist.barrier()
