"""Choosing the training device and describing it for the record."""
from __future__ import annotations

import platform

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
