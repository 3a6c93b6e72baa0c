"""Training inputs shared by the fine-tuning tests."""

from __future__ import annotations

import pyarrow as pa


def ip2p_pairs_table(n: int = 4):
    """``n`` InstructPix2Pix pairs: a blue disk before, the same disk yellow after, "make the disk yellow"."""
    from pixelmill.datasets.images import IMAGE_TYPE, encode_image
    from pixelmill.samples import draw_concept_images

    src = draw_concept_images(n, seed=3, color=(30, 30, 220))
    dst = draw_concept_images(n, seed=3, color=(230, 200, 20))
    return pa.table({
        "id": [f"p{i}" for i in range(n)],
        "input_image": pa.array([encode_image(im) for im in src], IMAGE_TYPE),
        "edited_image": pa.array([encode_image(im) for im in dst], IMAGE_TYPE),
        "edit_prompt": ["make the disk yellow"] * n,
    })
