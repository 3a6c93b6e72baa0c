"""Frozen networks that no training step needs leave the training device's memory (``offload_idle``).

With every latent cached, no step runs the VAE; with every prompt's embedding cached (and the
text encoders frozen), none runs a text encoder. diffusers' example scripts delete them then
(``--cache_latents``, pre-computed text embeddings); a pixelmill job still samples and saves
with them at the end, so it parks them instead: their tensors are written once to a safetensors
file in a temporary folder and their storage is freed (each becomes an empty tensor). A step that
needs one after all (a sample the cache lacks) brings it back first, and it stays; validation
samples, final samples and saving bring every parked network back, with the very same values.
The file goes when the trainer does.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref

import torch


class SpillFile:
    """Tensors written once to a safetensors file in a new temporary folder (under ``$TMPDIR``),
    read back on demand; the folder goes when this object does (also ``precision.FrozenHalf``'s)."""

    def __init__(self, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        folder = tempfile.mkdtemp(prefix=prefix)
        weakref.finalize(self, shutil.rmtree, folder, True)
        self.path = os.path.join(folder, "tensors.safetensors")
        save_file({k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}, self.path)

    def load(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(self.path)


class Parked:
    """One network written aside and emptied; ``restore`` puts it back on ``device``."""

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.module, self.device = module, device
        self.spill: SpillFile | None = None  # written at the first park
        self.parked = False

    @property
    def file(self) -> str | None:
        return self.spill.path if self.spill is not None else None

    def _tensors(self) -> dict[str, torch.Tensor]:
        m = self.module
        out = {f"p:{n}": p for n, p in m.named_parameters()}
        out.update({f"b:{n}": b for n, b in m.named_buffers()})  # non-persistent buffers too (position ids)
        return out

    def park(self) -> None:
        """Write the tensors (once: a frozen network does not change) and free their storage.

        Each parameter and buffer keeps its identity (optimisers, ``precision.FrozenHalf`` and
        pipelines hold them) and becomes an empty tensor of its dtype on its device.
        """
        if self.parked:
            return
        tensors = self._tensors()
        if self.spill is None:
            self.spill = SpillFile("pixelmill-parked-", tensors)
        for t in tensors.values():
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)
        self.parked = True

    def restore(self) -> None:
        """The tensors back on ``device`` from the file (the values, shapes and dtypes they had)."""
        if not self.parked:
            return
        saved = self.spill.load()
        for k, t in self._tensors().items():
            t.data = saved[k].to(self.device)
        self.parked = False
