"""Frozen weights kept in the mixed-precision dtype on the training device.

Under ``mixed_precision: bf16`` (or ``fp16``) every forward that trains runs under
``torch.autocast``, which casts each Linear and convolution weight to the half dtype at every
call. A frozen weight (one that does not require grad) is cast again at every call, and the
half copy made in the forward stays alive until the backward has used it: the device holds the
fp32 weight and, at the step's peak, a half copy of every frozen layer (6 bytes a parameter).
diffusers' example scripts store frozen weights in the half dtype instead (their
``weight_dtype``); the trainer does the same, without their rounding elsewhere:

* only the weights autocast casts anyway (``nn.Linear`` and ``nn.Conv1d/2d/3d`` weights and
  biases that do not require grad, in the UNet and the text encoders, whose training forwards
  run under autocast) are cast, to the autocast dtype, with the same rounding autocast applies,
  so every step computes with the same numbers as before, bit for bit (tested); norms,
  embeddings and everything that trains stay fp32, and the VAE (encoded in fp32 by design)
  is left alone;
* the fp32 originals wait on the host (on a GPU the device keeps 2 bytes a frozen parameter
  instead of up to 6), or on the CPU in a safetensors file in a temporary folder (host memory is
  the device's there), and go back for sampling and saving (``exact``), so samples and saved
  pipelines are the base model's weights exactly, never rounded ones.

Each step also skips autocast's casts of those weights. ``frozen_weights: fp32`` turns it off.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

from pixelmill.tasks.train.parking import SpillFile

CAST_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
"""Layers whose weight and bias autocast casts to the half dtype in its lower-precision ops."""


class FrozenHalf:
    """The frozen Linear/conv weights of ``modules`` stored in ``dtype``; the fp32 originals kept aside.

    Args:
        modules: the networks whose training forward runs under autocast (UNet, text encoders).
        dtype: autocast's dtype (``torch.bfloat16`` or ``torch.float16``).
        spill: keep the originals in a safetensors file in a temporary folder instead of host memory
            (for training on the CPU, where host memory is the training device's memory).
    """

    def __init__(self, modules: Iterable[torch.nn.Module], dtype: torch.dtype, spill: bool = False) -> None:
        self.dtype = dtype
        self.params: list[torch.nn.Parameter] = []
        seen: set[int] = set()
        modules_list = list(modules)
        for module in modules_list:
            for layer in module.modules():
                if not isinstance(layer, CAST_LAYERS):
                    continue
                for p in (layer.weight, layer.bias):
                    if p is None or p.requires_grad or id(p) in seen or p.dtype != torch.float32:
                        continue
                    seen.add(id(p))
                    self.params.append(p)
        originals = [p.data.to("cpu") for p in self.params]  # host copies (the same memory on the CPU)
        self._originals: list[torch.Tensor] | None = originals
        self.spill = (SpillFile("pixelmill-frozen-", {f"p{i}": t for i, t in enumerate(originals)})
                      if spill and self.params else None)
        self.spill_file = self.spill.path if self.spill is not None else None
        self.half = False
        self.cast()
        if self.spill is not None:
            self._own_storage(modules_list)

    def _own_storage(self, modules: list[torch.nn.Module]) -> None:
        """Give the tensors left in fp32 (norms, embeddings: small) storage of their own.

        A checkpoint loaded from safetensors is a memory map of the file, and any tensor still
        viewing it keeps the whole map, whose pages the cast has read, resident.
        """
        cast = {id(p) for p in self.params}
        for module in modules:
            for t in list(module.parameters()) + list(module.buffers()):
                if id(t) not in cast and t.device.type == "cpu":
                    t.data = t.data.clone()

    @property
    def count(self) -> int:
        """Parameters (elements) held in the half dtype while training."""
        return sum(p.numel() for p in self.params)

    def _load(self) -> list[torch.Tensor]:
        if self._originals is not None:
            return self._originals
        got = self.spill.load()
        return [got[f"p{i}"] for i in range(len(self.params))]

    def cast(self) -> None:
        """Store the frozen weights in the half dtype on their device (autocast's rounding)."""
        for p, orig in zip(self.params, self._load()):
            p.data = orig.to(p.device, self.dtype)
        if self.spill is not None:
            self._originals = None  # spilled: the fp32 copies leave memory
        self.half = True

    def restore(self) -> None:
        """Put the fp32 originals back on their device."""
        for p, orig in zip(self.params, self._load()):
            p.data = orig if orig.device == p.device else orig.to(p.device)
        self.half = False

    @contextmanager
    def exact(self) -> Iterator[None]:
        """The original fp32 weights inside the block (sampling, saving); half again after it."""
        was = self.half
        if was:
            self.restore()
        try:
            yield
        finally:
            if was:
                self.cast()
