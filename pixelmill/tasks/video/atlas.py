"""The layered atlas: what every atlas method produces and the renderer consumes.

An atlas represents a video as one or two flat images (the layers) plus, for every frame,
where each frame pixel lands in each layer (a UV map) and how opaque the foreground is
(alpha). Editing paints on a layer image once; rendering samples the edited image through
the UV maps, so the edit follows the motion in every frame. The homography method makes
a single background layer; the neural method makes a background and a foreground layer.

UV convention (both methods): ``uv[t, y, x] = (u, v)`` is the position of frame pixel
``(x, y)`` in the layer image, in atlas pixels, with pixel centres at integer coordinates
(OpenCV ``remap`` convention: ``(0, 0)`` is the centre of the top-left atlas pixel).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

FORMAT_VERSION = 1


class AtlasError(ValueError):
    """An atlas could not be built (e.g. too few feature matches for a frame)."""


@dataclass
class AtlasLayer:
    """One layer of an atlas.

    Attributes:
        name: ``background`` or ``foreground``.
        image: the layer's atlas image, Ha x Wa x 3 uint8 RGB.
        uv: float32 [T, H, W, 2] atlas-pixel coordinates of every frame pixel (see module doc).
    """

    name: str
    image: np.ndarray
    uv: np.ndarray


@dataclass
class Atlas:
    """A video as layered atlases.

    Attributes:
        layers: back to front; ``layers[0]`` is the background.
        alpha: float32 [T, H, W] opacity of ``layers[1]`` over ``layers[0]``; None with one layer.
        method: ``homography`` or ``neural``.
        fps: frame rate of the source video, when known.
        meta: JSON-serialisable extras (homographies, training config, atlas bounds).
    """

    layers: list[AtlasLayer]
    alpha: np.ndarray | None = None
    method: str = "homography"
    fps: Fraction | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 1 <= len(self.layers) <= 2:
            raise AtlasError(f"an atlas has 1 or 2 layers, got {len(self.layers)}")
        shape = self.layers[0].uv.shape
        for layer in self.layers:
            if layer.uv.ndim != 4 or layer.uv.shape[-1] != 2 or layer.uv.shape != shape:
                raise AtlasError(f"layer {layer.name!r}: uv shape {layer.uv.shape}, expected {shape}")
            if layer.image.ndim != 3 or layer.image.shape[2] != 3 or layer.image.dtype != np.uint8:
                raise AtlasError(f"layer {layer.name!r}: image must be HxWx3 uint8")
        if len(self.layers) == 2 and (self.alpha is None or self.alpha.shape != shape[:3]):
            got = None if self.alpha is None else self.alpha.shape
            raise AtlasError(f"two layers need alpha of shape {shape[:3]}, got {got}")
        if len(self.layers) == 1 and self.alpha is not None:
            raise AtlasError("a single-layer atlas has no alpha")

    @property
    def num_frames(self) -> int:
        return int(self.layers[0].uv.shape[0])

    @property
    def frame_size(self) -> tuple[int, int]:
        """(width, height) of the video frames."""
        return int(self.layers[0].uv.shape[2]), int(self.layers[0].uv.shape[1])

    def visibility(self, layer: int) -> np.ndarray:
        """float32 [T, H, W]: how much layer ``layer`` contributes to each frame pixel."""
        if self.alpha is None:
            return np.ones(self.layers[0].uv.shape[:3], dtype=np.float32)
        return self.alpha if layer == 1 else 1.0 - self.alpha

    def save(self, directory: str | Path) -> Path:
        """Write ``atlas.json``, one PNG per layer image and ``.npy`` UV/alpha arrays."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        entries = []
        for i, layer in enumerate(self.layers):
            Image.fromarray(layer.image).save(out / f"layer{i}.png")
            np.save(out / f"layer{i}_uv.npy", np.ascontiguousarray(layer.uv, dtype=np.float32), allow_pickle=False)
            entries.append({"name": layer.name, "image": f"layer{i}.png", "uv": f"layer{i}_uv.npy"})
        if self.alpha is not None:
            np.save(out / "alpha.npy", np.ascontiguousarray(self.alpha, dtype=np.float32), allow_pickle=False)
        doc = {
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "fps": None if self.fps is None else str(Fraction(self.fps)),
            "num_frames": self.num_frames,
            "frame_size": list(self.frame_size),
            "layers": entries,
            "alpha": None if self.alpha is None else "alpha.npy",
            "meta": self.meta,
        }
        (out / "atlas.json").write_text(json.dumps(doc, indent=2))
        return out

    @classmethod
    def load(cls, directory: str | Path) -> Atlas:
        """Read an atlas written by :meth:`save` (no pickle anywhere)."""
        src = Path(directory)
        manifest = src / "atlas.json"
        if not manifest.is_file():
            raise AtlasError(f"{src}: no atlas.json")
        doc = json.loads(manifest.read_text())
        if doc.get("format_version") != FORMAT_VERSION:
            raise AtlasError(f"{src}: unsupported atlas format {doc.get('format_version')}")
        layers = [
            AtlasLayer(
                name=e["name"],
                image=np.asarray(Image.open(src / e["image"]).convert("RGB")),
                uv=np.load(src / e["uv"], allow_pickle=False).astype(np.float32, copy=False),
            )
            for e in doc["layers"]
        ]
        alpha = None
        if doc.get("alpha"):
            alpha = np.load(src / doc["alpha"], allow_pickle=False).astype(np.float32, copy=False)
        fps = Fraction(doc["fps"]) if doc.get("fps") else None
        return cls(layers=layers, alpha=alpha, method=doc["method"], fps=fps, meta=doc.get("meta", {}))
