"""Small bulk-edit inputs and configs shared by the fault tests."""

from __future__ import annotations

from pathlib import Path

import yaml


def sample_dataset(root: Path, n: int, corrupt: int, seed: int, buckets: int) -> tuple[str, list[str]]:
    """``n`` drawn sample images plus ``corrupt`` broken files, imported into ``buckets`` shards.

    Returns the dataset folder and its ids.
    """
    from pixelmill.datasets import Dataset
    from pixelmill.datasets.importer import import_folder
    from pixelmill.samples import draw_sample_images

    draw_sample_images(str(root / "files"), n=n, corrupt=corrupt, seed=seed)
    import_folder(str(root / "files"), str(root / "images"), num_buckets=buckets)
    ids = Dataset.open(str(root / "images")).to_table(["id"])["id"].to_pylist()
    return str(root / "images"), ids


def sdedit_config(path: Path, images: str, model: str, output: str, prompt: str, steps: int = 6) -> Path:
    """A small SDEdit config (64 px, batches of 2) written to ``path``."""
    path.write_text(yaml.safe_dump(dict(
        input=images, output=output, model=model, prompt=prompt,
        strength=0.5, steps=steps, resolution=64, batch_size=2,
    )))
    return path
