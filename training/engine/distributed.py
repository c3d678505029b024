"""Training on several processes started by torchrun, one per device (DistributedDataParallel).

    torchrun --nproc-per-node 8 -m training.train --model resnet18 ...

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE and LOCAL_WORLD_SIZE; `join` reads them and joins the
process group (NCCL on GPUs, gloo on the CPU). Without them every function here does nothing
and a run is what it always was. Rank 0 alone writes to MLflow and the checkpoint; the others
train their share of each batch and take part in every sum.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from training.engine.device import DeviceError


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one training."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    local_size: int = 1
    backend: str = "none"  # none: not started by torchrun

    @property
    def launched(self) -> bool:
        return self.backend != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def nodes(self) -> int:
        return max(1, self.size // self.local_size)


_world = World()
_control: dist.ProcessGroup | None = None  # gloo: stop flags never wait on the GPU's stream


def world() -> World:
    return _world


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def wants_cuda(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def join(device: str, timeout_minutes: float = 30) -> World:
    """Join torchrun's process group, once per process; outside torchrun, a world of one."""
    global _world, _control
    if _world.launched or not launched_by_torchrun():
        return _world
    env = {k: int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    cuda = wants_cuda(device)
    if cuda:
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device} under torchrun, but no GPU is visible; use "
                              "--device cpu (gloo) or run on a machine with GPUs")
        if env["LOCAL_WORLD_SIZE"] > torch.cuda.device_count():
            raise DeviceError(f"torchrun started {env['LOCAL_WORLD_SIZE']} processes on this "
                              f"machine, which has {torch.cuda.device_count()} GPU(s): one GPU "
                              "per process, so pass --nproc-per-node "
                              f"{torch.cuda.device_count()} or fewer")
        torch.cuda.set_device(env["LOCAL_RANK"])
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes),
                            device_id=torch.device("cuda", env["LOCAL_RANK"]) if cuda else None)
    _control = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD
    _world = World(env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"],
                   backend)
    return _world


def leave() -> None:
    global _world, _control
    if _world.launched and dist.is_initialized():
        dist.destroy_process_group()
    _world, _control = World(), None


def place(device: torch.device) -> torch.device:
    """Under torchrun each process trains on the GPU of its local rank."""
    if _world.launched and device.type == "cuda":
        return torch.device("cuda", _world.local_rank)
    return device


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The network that trains: DistributedDataParallel over `model` when there are several
    processes (sharing its parameters, so `model` is what gets evaluated and saved), else
    `model` itself: with one process there is nothing to average.

    Buffers are not broadcast at every forward: BatchNorm statistics are made rank 0's before
    each evaluation (`sync_buffers`), which is all the saved model needs."""
    if _world.size == 1:
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        broadcast_buffers=False, gradient_as_bucket_view=True)


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over every process, in place (one process: unchanged)."""
    if _world.size > 1:
        dist.all_reduce(tensor)
    return tensor


def any_rank(flag: bool) -> bool:
    """True on every process when it is true on any: a stop asked of one stops all together."""
    if _world.size == 1:
        return flag
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_control)
    return bool(value.item())


def from_main(obj):
    """Rank 0's `obj` on every process (the decisions rank 0 alone can make: a resumed run)."""
    if _world.size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_control)
    return box[0]


@contextlib.contextmanager
def machine_first() -> Iterator[None]:
    """The first process of each machine goes first (say, downloads and decodes the dataset into
    the cache), the others then (read the cache)."""
    if _world.size > 1 and _world.local_rank != 0:
        dist.barrier(group=_control)
    yield
    if _world.size > 1 and _world.local_rank == 0:
        dist.barrier(group=_control)


def sync_buffers(model: nn.Module) -> None:
    """Rank 0's BatchNorm statistics everywhere, so every process evaluates the same network."""
    if _world.size > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def gather(obj) -> list:
    """Every process's `obj`, in rank order, on every process."""
    if _world.size == 1:
        return [obj]
    out = [None] * _world.size
    dist.all_gather_object(out, obj, group=_control)
    return out


def describe(device_name: str, batch_size: int) -> dict[str, str | int]:
    """The run params of a distributed training of global batch `batch_size` (none outside
    torchrun)."""
    if not _world.launched:
        return {}
    node = f"node {os.environ.get('GROUP_RANK', '0')} ({os.uname().nodename})"
    nodes: dict[str, list[str]] = {}
    for name, device in gather((node, device_name)):
        nodes.setdefault(name, []).append(device)
    return {"world_size": _world.size, "nodes": _world.nodes, "backend": _world.backend,
            "processes_per_node": _world.local_size,
            "batch_size_per_process": batch_size // _world.size,
            "node_devices": "; ".join(f"{name}: {len(v)} x {v[0]}" if len(set(v)) == 1
                                      else f"{name}: {', '.join(v)}" for name, v in nodes.items())}


def agreed(ask: Callable[[], bool]) -> Callable[[], bool]:
    """A stop request every process sees at the same step (torchrun signals each process, but
    not at the same instant): one small sum per step, on the CPU."""
    if _world.size == 1:
        return ask
    return lambda: any_rank(ask())


def lost_peer(exc: BaseException) -> bool:
    """Whether `exc` is a collective that failed because another process is gone (gloo reports a
    closed connection as a plain RuntimeError)."""
    return _world.size > 1 and (isinstance(exc, dist.DistError) or (
        isinstance(exc, RuntimeError) and any(word in str(exc) for word in ("gloo", "NCCL"))))


def resume_command(run_id: str) -> str:
    if not _world.launched:
        return f"python -m training.train --resume {run_id}"
    if _world.nodes == 1:
        return (f"torchrun --standalone --nproc-per-node {_world.local_size} -m training.train "
                f"--resume {run_id}")
    return (f"torchrun --nproc-per-node {_world.local_size} -m training.train --resume {run_id} "
            "(with the same --nnodes/--rdzv options on every machine)")
