"""CLIP embedding for retrieval: prompt embeddings and the :class:`PoolEmbedder` stage."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from pixelmill.datasets import storage
from pixelmill.datasets.pool import embedding_array
from pixelmill.tasks.stage import STATUS_OK, STATUS_REJECT, Resources, Stage


def _encode_texts(model: Any, tokenizer: Any, texts: list[str], batch_size: int) -> np.ndarray:
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for s in range(0, len(texts), batch_size):
            tokens = tokenizer(texts[s:s + batch_size]).to(device)
            emb = model.encode_text(tokens).float()
            out.append((emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)).cpu().numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)


def embed_prompts(prompts: list[str], clip_model: str, device: str = "cpu", batch_size: int = 256) -> np.ndarray:
    """CLIP text embeddings of prompts, L2-normalised fp32, one row per prompt.

    Uses the same tokenizer, model and normalisation as :class:`PoolEmbedder`, so a
    prompt equal to a pool caption scores 1.0 against it (up to the pool's fp16 storage).

    Args:
        prompts: the class prompts.
        clip_model: local folder or open_clip name (see ``models.loading.load_clip``).
        device: torch device (``cpu``, ``cuda``, ``auto``).
        batch_size: prompts encoded at a time.

    Raises:
        ValueError: no prompts, or an empty prompt.
    """
    from pixelmill.models.loading import load_clip

    if not prompts:
        raise ValueError("no prompts to embed")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompt {i} is empty")
    model, _, tokenizer = load_clip(clip_model, device=device)
    return _encode_texts(model, tokenizer, list(prompts), batch_size)


class PoolEmbedder(Stage):
    """Adds CLIP embeddings of captions and/or images to rows, building a Parquet-layout pool.

    Config keys:

    - ``clip_model``: local folder or open_clip name.
    - ``caption_column`` / ``image_column``: what to embed (either may be None, not
      both); they become ``text_emb`` / ``img_emb``, L2-normalised float16 packed into one
      ``fixed_size_binary`` value a row (``embedding_array(packed=True)``: Parquet reads
      it 25x faster than a list column, which the exact scan pays on every row).
    - ``device`` (``auto``), ``batch_size`` (64), ``resolution`` (512: long side after
      safe decoding, before CLIP's own resize and crop), ``max_pixels`` (50 M).

    Every row comes back with ``status``; a missing caption or an image that cannot be
    decoded (or is too large) makes the row a reject with ``error`` and ``stage``, never
    a failed batch.

    Args:
        config: the keys above.
        resources: CPUs/GPUs per worker.
    """

    name = "pool_embed"
    dataset = ("pool", 1)

    @classmethod
    def input_columns(cls, config: dict[str, Any]) -> list[str]:
        wanted = ["id", config.get("caption_column"), config.get("image_column"), *config.get("keep_columns", ())]
        return list(dict.fromkeys(c for c in wanted if c))

    @classmethod
    def dropped_columns(cls, config: dict[str, Any]) -> tuple[str, ...]:
        return (config["image_column"],) if config.get("image_column") else ()


    def __init__(self, config: dict[str, Any], resources: Resources | None = None) -> None:
        super().__init__(config, resources)
        if not config.get("caption_column") and not config.get("image_column"):
            raise ValueError("PoolEmbedder needs a caption_column or an image_column (or both)")
        if not config.get("clip_model"):
            raise ValueError("PoolEmbedder needs clip_model")
        self.model: Any = None

    def setup(self) -> None:
        from pixelmill.models.loading import load_clip

        self.model, self.preprocess, self.tokenizer = load_clip(
            self.config["clip_model"], device=self.config.get("device", "auto"),
            dtype=self.config.get("dtype", "float32"),
        )
        self.device = next(self.model.parameters()).device
        self.dim = int(_encode_texts(self.model, self.tokenizer, ["a"], 1).shape[1])  # for all-null columns

    def _images(self, images: list[Any]) -> np.ndarray:
        import torch

        with torch.no_grad():
            px = torch.stack([self.preprocess(im) for im in images]).to(self.device)
            px = px.to(next(self.model.parameters()).dtype)
            emb = self.model.encode_image(px).float()
            return (emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)).cpu().numpy()

    def _embed_isolating_failures(self, fn: Any, items: list[Any]) -> list[np.ndarray | str]:
        """Embed a batch; if it fails, retry row by row so one bad row cannot sink the batch."""
        try:
            return list(fn(items))
        except Exception as exc:  # noqa: BLE001 - isolate, then report per row
            if len(items) == 1:
                return [f"embed_failed: {type(exc).__name__}: {exc}"[:500]]
        return [self._embed_isolating_failures(fn, [x])[0] for x in items]

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pixelmill.datasets.images import ImageError, normalize_image

        if self.model is None:
            self.setup()
        c = self.config
        cap_col, img_col = c.get("caption_column"), c.get("image_column")
        bs = int(c.get("batch_size", 64))
        n = batch.num_rows
        errors: list[str | None] = [None] * n
        texts: dict[int, str] = {}
        images: dict[int, Any] = {}
        cap_values = batch.column(cap_col).to_pylist() if cap_col else [None] * n
        img_values = batch.column(img_col).to_pylist() if img_col else [None] * n
        for i in range(n):
            if cap_col:
                text = cap_values[i]
                if not isinstance(text, str) or not text.strip():
                    errors[i] = f"missing caption in column {cap_col!r}"
                    continue
                texts[i] = text
            if img_col:
                raw = img_values[i]
                data = raw.get("bytes") if isinstance(raw, dict) else raw
                if raw is not None and isinstance(raw, dict) and data is None and raw.get("path"):
                    try:
                        data = storage.read_bytes(raw["path"])
                    except (OSError, ValueError) as exc:
                        errors[i] = f"unreadable: {exc}"
                        continue
                try:
                    images[i] = normalize_image(data or b"", int(c.get("resolution", 512)),
                                                int(c.get("max_pixels", 50_000_000)))
                except ImageError as exc:
                    errors[i] = str(exc)
        text_emb: dict[int, np.ndarray] = {}
        img_emb: dict[int, np.ndarray] = {}
        for wanted, store, fn in (
            (texts, text_emb, lambda xs: _encode_texts(self.model, self.tokenizer, xs, len(xs))),
            (images, img_emb, self._images),
        ):
            keys = [i for i in wanted if errors[i] is None]
            for s in range(0, len(keys), bs):
                chunk = keys[s:s + bs]
                for i, res in zip(chunk, self._embed_isolating_failures(fn, [wanted[i] for i in chunk])):
                    if isinstance(res, str):
                        errors[i] = res
                    else:
                        store[i] = res
                self.beat(f"{s + len(chunk)} of {len(keys)} rows embedded")
        ok = [e is None for e in errors]
        out = batch.drop_columns([x for x in ("text_emb", "img_emb", "status", "error", "stage")
                                  if x in batch.column_names])
        for column, store, wanted in (("text_emb", text_emb, cap_col), ("img_emb", img_emb, img_col)):
            if wanted:
                out = out.append_column(column, _emb_column(store, ok, n, self.dim))
        out = out.append_column("status", pa.array([STATUS_OK if k else STATUS_REJECT for k in ok], pa.string()))
        out = out.append_column("error", pa.array(errors, pa.string()))
        return out.append_column("stage", pa.array([None if k else self.name for k in ok], pa.string()))


def _emb_column(store: dict[int, np.ndarray], ok: list[bool], n: int, dim: int) -> pa.Array:
    """A packed float16 column (``fixed_size_binary(2 * dim)``) with the embeddings of ok rows, nulls elsewhere."""
    rows = [i for i in range(n) if ok[i] and i in store]
    if not rows:
        return pa.nulls(n, pa.binary(2 * dim))
    dense = embedding_array(np.stack([store[i] for i in rows]), packed=True)
    if len(rows) == n:
        return dense
    index = np.full(n, -1, np.int64)
    index[rows] = np.arange(len(rows))
    return dense.take(pa.array(index, mask=index < 0))
