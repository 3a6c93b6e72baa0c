"""Training data: samples from pixelmill datasets, a deterministic batch schedule, augmentations.

Every random choice a training step makes about a sample (crop offset, flip, rescale,
VAE posterior sample, noise, timestep, conditioning dropout) is drawn from a generator
seeded by ``(seed, step, sample id, purpose)``. So a step computes the same thing
whether it runs on one worker or is split over several, and whether the job ran
straight through or resumed from a checkpoint: nothing depends on a global RNG state.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

OBJECT_TEMPLATES = [
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a bright photo of the {}", "a close-up photo of a {}", "a good photo of the {}", "a photo of one {}",
]
STYLE_TEMPLATES = [
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dark painting in the style of {}",
    "a picture in the style of {}", "a cool painting in the style of {}", "a bright painting in the style of {}",
    "a good painting in the style of {}", "a close-up painting in the style of {}",
    "a small painting in the style of {}",
]


class TrainingDataError(ValueError):
    """Training data that cannot be used; raised before training starts, naming the dataset."""


def prompt_key(prompt: str) -> str:
    """The key of a prompt's cached text embedding."""
    return hashlib.sha1(prompt.encode()).hexdigest()


def derived_seed(*parts: Any) -> int:
    """A 63-bit seed from any values (stable across processes and machines)."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(*parts: Any, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` (the CPU by default) seeded from ``parts`` (see ``derived_seed``)."""
    return torch.Generator(device).manual_seed(derived_seed(*parts))


def per_sample(ids: list[str], seed: int, step: int, what: str, device: torch.device, shape: tuple[int, ...] = (),
               high: int | None = None) -> torch.Tensor:
    """One draw per sample, stacked: ``randn(shape)``, or ``randint(0, high, shape)`` when ``high`` is given.

    Each sample's draw comes from its own ``(seed, step, id, what)`` generator, made on
    ``device`` so the numbers are drawn where they are used (no host-to-device copy). On
    the CPU they are the numbers a CPU generator gives; on an accelerator they are that
    device's generator's (different, but as deterministic). A sample's draw never depends
    on which other samples share its batch.
    """
    out = []
    for i in ids:
        g = generator(seed, step, i, what, device=device)
        out.append(torch.randn(shape, generator=g, device=device) if high is None
                   else torch.randint(0, high, shape, generator=g, device=device))
    return torch.stack(out) if out else torch.empty((0, *shape), device=device)


@dataclass
class Sample:
    """One training example.

    Args:
        id: stable id; noise and augmentation derive from it.
        kind: ``instance``, ``class`` (prior preservation) or ``pair`` (InstructPix2Pix).
        prompt: the text the example trains with (a template with ``{}`` for Textual Inversion).
        image: encoded image bytes (the target image of a pair).
        source: encoded input image of a pair.
        concept: index of the concept in the job.
    """

    id: str
    kind: str
    prompt: str
    image: bytes
    source: bytes | None = None
    concept: int = 0
    size: tuple[int, int] = (0, 0)


@dataclass
class TrainingData:
    """The samples of a job and the rows that could not be used (with reasons)."""

    instance: list[Sample] = field(default_factory=list)
    klass: list[Sample] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    # per prior-preservation concept: {"concept", "wanted", "used"} class images
    prior: list[dict[str, Any]] = field(default_factory=list)
    # what the job must say about its data (a prior shortfall), recorded on the job
    warnings: list[str] = field(default_factory=list)


def _image_bytes(value: Any) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("bytes")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return None


def _open(data: bytes) -> Image.Image:
    import io

    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def read_image_rows(url: str, image_column: str, what: str, extra: tuple[str, ...] = (),
                    shard: str | None = None, allow_empty: bool = False) -> tuple[list[dict], list[dict]]:
    """Read ``id``, images and ``extra`` columns from a dataset; bad images become skipped rows.

    Args:
        allow_empty: a dataset (or shard) with no row or no readable image gives no rows
            instead of an error (class images: the caller decides what a shortfall means).

    Raises:
        TrainingDataError: the dataset is missing, lacks a needed column, or has no usable image.
    """
    from pixelmill.datasets import Dataset

    try:
        ds = Dataset.open(url)
    except (FileNotFoundError, ValueError) as e:
        raise TrainingDataError(f"{what}: cannot open dataset {url!r}: {e}") from None
    if shard is not None and shard not in ds.shard_names():
        raise TrainingDataError(f"{what}: dataset {url!r} has no shard {shard!r}")
    names = ds.schema.names if ds.shard_names() else []
    missing = [c for c in (image_column, *extra) if c not in names]
    if not ds.shard_names():
        if allow_empty:
            return [], []
        raise TrainingDataError(f"{what}: dataset {url!r} has no rows")
    if missing:
        raise TrainingDataError(f"{what}: dataset {url!r} has no column(s) {missing}; it has {names}")
    cols = [c for c in ("id", image_column, *extra) if c in names]
    rows, skipped = [], []
    table = ds.read_shard(shard, columns=cols) if shard is not None else ds.to_table(columns=cols)
    if table.num_rows == 0:
        if allow_empty:
            return [], []
        where = f"shard {shard!r} of " if shard is not None else ""
        raise TrainingDataError(f"{what}: {where}dataset {url!r} has no rows")
    for i, row in enumerate(table.to_pylist()):
        rid = str(row.get("id") if row.get("id") is not None else i)
        data = _image_bytes(row.get(image_column))
        try:
            if data is None:
                raise ValueError("no image bytes")
            size = _open(data).size
        except Exception as e:  # noqa: BLE001 - any undecodable image is a skipped row
            skipped.append({"id": rid, "dataset": url, "reason": f"unreadable image: {type(e).__name__}: {e}"})
            continue
        rows.append({**row, "id": rid, "_bytes": data, "_size": size})
    if not rows and not allow_empty:
        raise TrainingDataError(f"{what}: dataset {url!r} has no readable images ({len(skipped)} unreadable)")
    return rows, skipped


def row_prompts(rows: list[dict], column: str, fields: dict[str, str], what: str,
                token: str | None = "instance") -> list[str]:
    """Each row's training prompt: its ``column`` text with the placeholders of ``fields`` filled
    (``{token}``, ``{class}``, ``{subject}``: a concept's ``instance_prompt_column``; ``{class}``
    alone for its ``class_prompt_column``, with ``token=None``).

    Raises:
        TrainingDataError: a row whose value is not a string, is empty, does not format, or (an
            instance row) does not name the concept (its ``token``); the message names the row.
    """
    from pixelmill.config.campaign import format_prompt

    out = []
    for r in rows:
        value, where = r.get(column), f"{what}: row {r['id']!r}, {token or 'class'}_prompt_column {column!r}"
        if not isinstance(value, str):
            raise TrainingDataError(f"{where}: expected text, got {type(value).__name__}"
                                    + (" (a missing prompt)" if value is None else ""))
        if not value.strip():
            raise TrainingDataError(f"{where}: empty prompt")
        try:
            prompt = format_prompt(value, fields, where)
        except ValueError as e:
            raise TrainingDataError(str(e)) from None
        if token and fields["token"] not in prompt:
            raise TrainingDataError(f"{where}: {prompt!r} does not name the concept; put {{subject}} or {{token}} "
                                    f"({fields['token']!r}) in it")
        out.append(prompt)
    return out


def pixel_tensor(img: Image.Image) -> torch.Tensor:
    """HWC uint8 image → CHW float tensor in [-1, 1]."""
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


@dataclass
class Augment:
    """Per-sample augmentation settings (crop, flip, Custom Diffusion's rescale)."""

    center_crop: bool = False
    random_flip: bool = True
    rescale: bool = False


@dataclass
class Prepared:
    """A sample made ready for a step: pixels at the bucket size, its prompt, and a loss mask."""

    pixels: torch.Tensor | None
    prompt: str
    mask: torch.Tensor | None
    flip: bool
    source: torch.Tensor | None = None
    crop: tuple[int, int] = (0, 0)  # (top, left) of the crop in the resized image (SDXL's time ids)


def prepare(sample: Sample, size: tuple[int, int], aug: Augment, seed: int, step: int, prompt: str) -> Prepared:
    """Resize to cover ``size`` (w, h), crop, maybe flip or rescale, as drawn for ``step``.

    Custom Diffusion's rescale shrinks the image onto a black canvas ("far away") or
    zooms into it ("close up"), says so in the prompt, and masks the loss to the image
    (at latent resolution the caller downsamples the mask).
    """
    g = generator(seed, step, sample.id, "augment")
    w, h = size
    img = _open(sample.image)
    src = _open(sample.source) if sample.source is not None else None
    mask = None
    scale = 1.0
    if aug.rescale and sample.kind == "instance":
        scale = 0.4 + 1.0 * torch.rand((), generator=g).item()
    img, src, crop = _cover_crop(img, src, (w, h), aug.center_crop, g)
    if scale < 0.95:
        sw, sh = max(1, int(w * scale)), max(1, int(h * scale))
        ox = int(torch.randint(0, w - sw + 1, (), generator=g))
        oy = int(torch.randint(0, h - sh + 1, (), generator=g))
        canvas = Image.new("RGB", (w, h))
        canvas.paste(img.resize((sw, sh), Image.BICUBIC), (ox, oy))
        img = canvas
        mask = torch.zeros(h, w)
        mask[oy:oy + sh, ox:ox + sw] = 1.0
        prompt = ("a far away " if torch.rand((), generator=g).item() < 0.5 else "very small ") + prompt
    elif scale > 1.05:
        zw, zh = int(w * scale), int(h * scale)
        ox = int(torch.randint(0, zw - w + 1, (), generator=g))
        oy = int(torch.randint(0, zh - h + 1, (), generator=g))
        img = img.resize((zw, zh), Image.BICUBIC).crop((ox, oy, ox + w, oy + h))
        prompt = ("zoomed in " if torch.rand((), generator=g).item() < 0.5 else "close up ") + prompt
    flip = bool(aug.random_flip and torch.rand((), generator=g).item() < 0.5)
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
        src = src.transpose(Image.FLIP_LEFT_RIGHT) if src is not None else None
        mask = mask.flip(-1) if mask is not None else None
    return Prepared(pixel_tensor(img), prompt, mask, flip, pixel_tensor(src) if src is not None else None, crop)


def cover_size(image_size: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """``(w, h)`` an image of ``image_size`` is resized to so that it covers ``size`` (both ``(w, h)``)."""
    w, h = size
    s = max(w / image_size[0], h / image_size[1])
    return max(w, math.ceil(image_size[0] * s)), max(h, math.ceil(image_size[1] * s))


def center_crop_offset(image_size: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """``(top, left)`` of a center crop of ``size`` from the covering resize of ``image_size``."""
    rw, rh = cover_size(image_size, size)
    return (rh - size[1]) // 2, (rw - size[0]) // 2


def _cover_crop(img, src, size, center: bool, g):
    """Resize to cover ``size`` and crop it; returns the image, the source and the crop's (top, left)."""
    w, h = size
    rw, rh = cover_size(img.size, size)
    if (rw, rh) != img.size:
        img = img.resize((rw, rh), Image.BICUBIC)
        src = src.resize((rw, rh), Image.BICUBIC) if src is not None else None
    if center:
        ox, oy = (rw - w) // 2, (rh - h) // 2
    else:
        ox = int(torch.randint(0, rw - w + 1, (), generator=g))
        oy = int(torch.randint(0, rh - h + 1, (), generator=g))
    box = (ox, oy, ox + w, oy + h)
    if src is not None and src.size != img.size:
        src = src.resize(img.size, Image.BICUBIC)
    return img.crop(box), (src.crop(box) if src is not None else None), (oy, ox)


def bucket_sizes(resolution: int, multiple: int) -> list[tuple[int, int]]:
    """Aspect-ratio buckets (w, h) with about ``resolution``² pixels, sides multiples of ``multiple``."""
    out = []
    for ar in (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9, 9 / 16):
        w = max(multiple, round(resolution * math.sqrt(ar) / multiple) * multiple)
        h = max(multiple, round(resolution / math.sqrt(ar) / multiple) * multiple)
        if (w, h) not in out:
            out.append((w, h))
    return out


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> int:
    """The bucket whose aspect ratio is closest (in log space) to the image's."""
    ar = math.log(size[0] / size[1])
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - ar))


class BatchSchedule:
    """Which samples form global micro-batch ``b``, for any ``b``, without state.

    Each epoch shuffles the samples of each bucket (seeded by the epoch), pads a bucket
    to a whole number of batches by repeating its own samples, cuts it into batches and
    shuffles the batch order. Micro-batch ``b`` of the run is found by arithmetic, so a
    resumed job continues with exactly the batches it would have seen.

    Args:
        buckets: bucket index of each sample (all zeros without buckets).
        batch_size: samples per global micro-batch (over all workers).
        seed: the job seed.
        name: separates the instance and class schedules.
    """

    def __init__(self, buckets: list[int], batch_size: int, seed: int, name: str = "instance") -> None:
        self.batch_size = batch_size
        self.seed = seed
        self.name = name
        self.groups: dict[int, list[int]] = {}
        for i, b in enumerate(buckets):
            self.groups.setdefault(b, []).append(i)
        self.per_epoch = sum(math.ceil(len(v) / batch_size) for v in self.groups.values())

    def epoch_batches(self, epoch: int) -> list[tuple[int, list[int]]]:
        g = generator(self.seed, self.name, "epoch", epoch)
        batches: list[tuple[int, list[int]]] = []
        for bucket in sorted(self.groups):
            idx = self.groups[bucket]
            perm = [idx[int(i)] for i in torch.randperm(len(idx), generator=g)]
            n = math.ceil(len(perm) / self.batch_size) * self.batch_size
            padded = [perm[i % len(perm)] for i in range(n)]
            batches += [(bucket, padded[i:i + self.batch_size]) for i in range(0, n, self.batch_size)]
        order = torch.randperm(len(batches), generator=g).tolist()
        return [batches[i] for i in order]

    def batch(self, b: int) -> tuple[int, list[int]]:
        """(bucket, sample indices) of global micro-batch ``b``."""
        epoch, k = divmod(b, self.per_epoch)
        return self.epoch_batches(epoch)[k]


def shard(items: list, rank: int, world: int) -> list:
    """This worker's part of a global micro-batch (every ``world``-th item from ``rank``)."""
    return items[rank::world]


def ti_prompt(template_index: int, token: str, prop: str) -> str:
    templates = STYLE_TEMPLATES if prop == "style" else OBJECT_TEMPLATES
    return templates[template_index % len(templates)].format(token)
