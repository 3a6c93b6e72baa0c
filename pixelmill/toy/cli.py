"""``pixelmill dataset toy``: the toy world as a dataset (its parser arguments and its command)."""

from __future__ import annotations

import argparse


def add_dataset_toy_parser(dsub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``toy`` to the ``pixelmill dataset`` subcommands."""
    from pixelmill.toy.world import HELD_OUT_SHAPE, IMAGE_SIZE, SHAPES

    q = dsub.add_parser(
        "toy", help="write toy-world images with captions and attribute labels",
        description=f"Write N seeded toy-world rows ({IMAGE_SIZE}x{IMAGE_SIZE} PNG images of one shape: "
                    f"{', '.join(SHAPES)}; six colours; plain or two-tone backgrounds) with grammar "
                    "captions and their labels (shape, color, size, position, background) as a dataset. "
                    f"Use --exclude-shape {HELD_OUT_SHAPE} for data the toy Stable Diffusion trains on.")
    q.add_argument("--out", required=True, help="dataset folder or URL to write")
    q.add_argument("--rows", type=int, required=True, metavar="N", help="number of rows")
    q.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    q.add_argument("--exclude-shape", action="append", default=[], choices=SHAPES, metavar="SHAPE",
                   help=f"never draw this shape (repeatable; one of {', '.join(SHAPES)})")
    q.add_argument("--overwrite", action="store_true", help="replace a dataset written with other arguments")
    q.set_defaults(func=cmd_dataset_toy)
    return q


def prepare_dataset_toy(args: argparse.Namespace) -> None:
    """Check the arguments before anything is written (``UsageError``: exit status 2)."""
    from pixelmill.cli import UsageError
    from pixelmill.toy.world import SHAPES

    if args.rows < 1:
        raise UsageError(f"--rows must be at least 1, got {args.rows}")
    if set(args.exclude_shape) >= set(SHAPES):
        raise UsageError("--exclude-shape excludes every shape; keep at least one")


def cmd_dataset_toy(args: argparse.Namespace) -> int:
    """Write the toy dataset and print a one-line summary."""
    from pixelmill.cli import UsageError
    from pixelmill.datasets import ConfigMismatch
    from pixelmill.toy.dataset import write_toy_dataset

    prepare_dataset_toy(args)
    try:
        summary = write_toy_dataset(args.out, args.rows, seed=args.seed, exclude_shapes=args.exclude_shape,
                                    overwrite=args.overwrite)
    except (ValueError, ConfigMismatch, FileExistsError) as e:
        raise UsageError(str(e)) from None
    print(f"wrote {summary['rows']} toy rows (seed {summary['seed']}, shapes {', '.join(summary['shapes'])}) "
          f"into {args.out} ({summary['shards']} shard(s))")
    return 0
