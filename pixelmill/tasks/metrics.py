"""Per-row metrics of an edit: faithfulness (RGB RMSE) and CLIP similarities."""

from __future__ import annotations

import numpy as np
from PIL import Image


def rgb_rmse(a: Image.Image, b: Image.Image) -> float:
    """RMSE between two same-size RGB images with values in [0, 1] (SDEdit's L2 faithfulness)."""
    if a.size != b.size:
        b = b.resize(a.size, Image.Resampling.BICUBIC)
    x = np.asarray(a.convert("RGB"), dtype=np.float32) / 255.0
    y = np.asarray(b.convert("RGB"), dtype=np.float32) / 255.0
    return float(np.sqrt(np.mean((x - y) ** 2)))


class ClipScorer:
    """CLIP image–text and directional similarity with an open_clip model.

    Args:
        model: local folder or open_clip name of the CLIP model.
        device: torch device string.
    """

    def __init__(self, model: str, device: str = "cpu") -> None:
        from pixelmill.models.loading import load_clip

        self.model, self.preprocess, self.tokenizer = load_clip(model, device=device)
        self.device = next(self.model.parameters()).device

    def _norm(self, x):
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def images(self, images: list[Image.Image]):
        import torch

        with torch.no_grad():
            px = torch.stack([self.preprocess(im) for im in images]).to(self.device)
            return self._norm(self.model.encode_image(px).float())

    def texts(self, texts: list[str]):
        import torch

        with torch.no_grad():
            tok = self.tokenizer(texts).to(self.device)
            return self._norm(self.model.encode_text(tok).float())

    def score(
        self,
        inputs: list[Image.Image],
        outputs: list[Image.Image],
        targets: list[str],
        sources: list[str | None],
    ) -> tuple[list[float], list[float | None]]:
        """Image–text similarity of each output to its target text, and directional similarity.

        Directional similarity is cos(E(out) − E(in), E(target) − E(source)), defined only
        where a source caption exists and differs from the target text.
        """
        e_in, e_out = self.images(inputs), self.images(outputs)
        e_t = self.texts(targets)
        img_text = (e_out * e_t).sum(-1).tolist()
        direction: list[float | None] = [None] * len(inputs)
        have = [i for i, s in enumerate(sources) if s]
        if have:
            e_s = self.texts([sources[i] for i in have])
            d_img = self._norm(e_out[have] - e_in[have])
            raw = e_t[have] - e_s
            d_txt = self._norm(raw)
            for j, i in enumerate(have):
                if float(raw[j].norm()) > 1e-6:  # no direction when target and source text agree
                    direction[i] = float((d_img[j] * d_txt[j]).sum())
        return img_text, direction
