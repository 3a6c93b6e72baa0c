"""Device and dtype resolution shared by every model loader.

Stages name devices and dtypes as strings in their configs (``"auto"``, ``"cuda:1"``,
``"bfloat16"``); these helpers turn them into torch objects with one set of rules, so a
worker with a GPU and a laptop without one run the same config.
"""

from __future__ import annotations

import torch

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def auto_dtype_name(device_kind: str, bf16_supported: bool) -> str:
    """What ``dtype: auto`` means on a device: a pure function of the device's kind and capability.

    ============================  ==========
    device                        dtype
    ============================  ==========
    CUDA GPU with bf16 support    bfloat16
    any other GPU (older CUDA,    float16
    MPS, XPU, ...)
    CPU                           float32
    ============================  ==========

    Args:
        device_kind: ``torch.device.type`` (``"cuda"``, ``"cpu"``, ``"mps"``, ...).
        bf16_supported: whether the device runs bfloat16 natively (``torch.cuda.is_bf16_supported()``
            on CUDA; ignored elsewhere).
    """
    if device_kind == "cpu":
        return "float32"
    if device_kind == "cuda" and bf16_supported:
        return "bfloat16"
    return "float16"


def vae_dtype_name(dtype_name: str, vae_force_upcast: bool) -> str:
    """The VAE's dtype when the rest of a pipeline runs in ``dtype_name``: float32 when the family's
    VAE overflows in half precision (SDXL's: ``ModelInfo.vae_force_upcast``), else the same."""
    return "float32" if vae_force_upcast else dtype_name


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn a device name into a ``torch.device``.

    Args:
        device: ``"auto"`` (CUDA when available, else CPU), or any name torch accepts
            (``"cpu"``, ``"cuda"``, ``"cuda:1"``).

    Raises:
        ValueError: A CUDA device is named but CUDA is not available.
    """
    if isinstance(device, torch.device):
        resolved = device
    elif device in ("auto", "", None):
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    else:
        try:
            resolved = torch.device(device)
        except RuntimeError as exc:
            raise ValueError(f"unknown device {device!r}: {exc}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(resolved)!r} was requested but CUDA is not available here")
    return resolved


def resolve_dtype(
    dtype: str | torch.dtype = "auto", device: str | torch.device = "auto"
) -> torch.dtype:
    """Pick the weight/compute dtype for a device.

    ``"auto"`` gives bfloat16 on a CUDA device that supports it, float16 on other GPUs
    and float32 on CPU (``auto_dtype_name``). Explicit names are honoured, except float16 on CPU,
    which many CPU kernels lack or run very slowly, so it is refused.

    Args:
        dtype: ``"auto"``, ``"float32"``, ``"float16"``, ``"bfloat16"`` (or a short
            alias such as ``"fp16"``/``"bf16"``), or a ``torch.dtype``.
        device: The device the model will run on (resolved with ``resolve_device``).

    Raises:
        ValueError: Unknown dtype name, or float16 requested for a CPU device.
    """
    dev = resolve_device(device)
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype in ("auto", "", None):
        bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
        return _DTYPES[auto_dtype_name(dev.type, bf16)]
    else:
        key = str(dtype).lower().removeprefix("torch.")
        if key not in _DTYPES:
            raise ValueError(
                f"unknown dtype {dtype!r}; use 'auto', 'float32', 'float16' or 'bfloat16'"
            )
        resolved = _DTYPES[key]
    if resolved not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype {resolved} is not supported; use float32, float16 or bfloat16")
    if resolved == torch.float16 and dev.type == "cpu":
        raise ValueError(
            "float16 is not supported on CPU (kernels are missing or very slow); "
            "use 'float32' or 'bfloat16', or 'auto'"
        )
    return resolved
