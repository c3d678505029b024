"""Choosing the training device and describing it for the record."""
from __future__ import annotations

import platform
from pathlib import Path

import torch

from shared.messages import BadInput


class DeviceError(BadInput):
    """A device was asked for that this machine does not have."""


def resolve_device(name: str) -> torch.device:
    """"auto" picks cuda, then mps, then cpu; a named device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            reason = ("this PyTorch build has no CUDA support" if torch.version.cuda is None
                      else "no NVIDIA GPU or driver is visible")
            raise DeviceError(f"--device {name} was asked for, but {reason}. "
                              "Use --device cpu (or auto).")
        return torch.device(name)
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError("--device mps was asked for, but Apple's Metal backend is not "
                              "available here. Use --device cpu (or auto).")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise DeviceError(f"unknown --device {name!r}; choose auto, cpu, cuda, cuda:N or mps")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_device(device: torch.device) -> dict[str, str | int]:
    """The facts a run records about where it trained."""
    info: dict[str, str | int] = {"device": device.type, "cpu_threads": torch.get_num_threads(),
                                  "cpu_name": cpu_name()}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    elif device.type == "mps":
        info["device_name"] = "Apple MPS"
    else:
        info["device_name"] = f"{info['cpu_name']} ({info['cpu_threads']} threads)"
    return info


def _read_number(path: Path, key: str | None = None) -> int | None:
    """An integer from a /proc or cgroup file: the whole file, or the line `key value`."""
    try:
        text = path.read_text()
    except OSError:
        return None
    if key is None:
        text = text.strip()
        return int(text) if text.isdigit() else None
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name.rstrip(":") == key:
            return int(value.split()[0]) * (1024 if line.endswith("kB") else 1)
    return None


def cgroup_room() -> int | None:
    """Bytes this process's memory cgroup (v1 or v2) lets it allocate beyond what its group
    holds now, page cache not counted (the kernel reclaims it); None with no limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, group = line.split(":", 2)
        if controllers == "":  # v2
            base = Path("/sys/fs/cgroup") / group.lstrip("/")
            limit, used = _read_number(base / "memory.max"), _read_number(base / "memory.stat", "anon")
        elif "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / group.lstrip("/")
            limit = _read_number(base / "memory.limit_in_bytes")
            used = _read_number(base / "memory.stat", "total_rss")
        else:
            continue
        if limit is not None and limit < 1 << 60:
            return max(0, limit - (used or 0))
    return None


def free_memory(device: torch.device) -> tuple[int, str]:
    """Bytes free on `device` for data, and whose figure it is."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"{device}'s free memory"
    available = _read_number(Path("/proc/meminfo"), "MemAvailable") or 0
    room = cgroup_room()
    if room is not None and room < available:
        return room, "this process's memory limit (its cgroup)"
    return available, "the machine's available memory"


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def data_placement(choice: str, nbytes: int, device: torch.device,
                   copies: int = 1) -> tuple[bool, str]:
    """Whether to hold a dataset of `nbytes` on `device` (`copies` times, one per process
    sharing its memory), and why: auto says yes when it takes at most half the free memory,
    leaving the rest to the model, its activations and the optimizer."""
    if choice != "auto":
        return choice == "yes", f"--data-on-device {choice}"
    need = nbytes * copies
    free, whose = free_memory(device)
    takes = f"{gib(nbytes)} x {copies} processes" if copies > 1 else gib(nbytes)
    if need <= free / 2:
        return True, f"auto: the images take {takes}, within half of {whose} ({gib(free)})"
    return False, (f"auto: the images take {takes}, more than half of {whose} "
                   f"({gib(free)}): batches are read from the memory-mapped cache")
