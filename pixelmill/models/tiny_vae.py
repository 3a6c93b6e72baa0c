"""The tiny VAE shipped with pixelmill: trained to reconstruct, so tiny pipelines keep the image.

A random-weight VAE turns every image into noise, which makes SDEdit's faithfulness
(and its t0 search) meaningless on test models. This module trains the tiny VAE's
architecture for a minute on CPU to reconstruct smooth synthetic images (RMSE about
0.05 on [0, 1]) and saves the weights (fp16 safetensors, ~1.3 MB) into the package.
The UNet and text encoder stay random. Regenerate with::

    python -m pixelmill.models.tiny_vae --out pixelmill/models/weights/tiny-vae.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

SHIPPED_TINY_VAE = Path(__file__).with_name("weights") / "tiny-vae.safetensors"


def _synthetic_batch(gen: torch.Generator, n: int, size: int) -> torch.Tensor:
    """Smooth colour fields with flat rectangles, in [-1, 1] (what drawn samples look like)."""
    x = torch.rand(n, 3, 4, 4, generator=gen)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    for i in range(n):
        for _ in range(3):
            a, b, w, h = torch.randint(0, size, (4,), generator=gen).tolist()
            x[i, :, b : b + 4 + h // 2, a : a + 4 + w // 2] = torch.rand(3, 1, 1, generator=gen)
    return x.clamp(0, 1) * 2 - 1


def train_tiny_vae(vae: torch.nn.Module, steps: int = 1500, seed: int = 0, size: int = 32) -> float:
    """Train ``vae`` in place to reconstruct synthetic images; returns RMSE on [0, 1] at 64 px."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    vae.train()
    for _ in range(steps):
        x = _synthetic_batch(gen, 8, size)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
        loss = torch.nn.functional.mse_loss(rec, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    vae.eval()
    with torch.no_grad():
        x = _synthetic_batch(gen, 16, 64)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
        return float(((rec - x) / 2).pow(2).mean().sqrt())


def load_shipped_tiny_vae(vae: torch.nn.Module) -> bool:
    """Load the shipped weights into a tiny VAE; False when they are not in the package."""
    if not SHIPPED_TINY_VAE.is_file():
        return False
    from safetensors.torch import load_file

    state = {k: v.float() for k, v in load_file(str(SHIPPED_TINY_VAE)).items()}
    vae.load_state_dict(state)
    return True


def main() -> None:
    from safetensors.torch import save_file

    from pixelmill.models.tiny import build_tiny_sd_components

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(SHIPPED_TINY_VAE))
    p.add_argument("--steps", type=int, default=1500)
    args = p.parse_args()
    torch.manual_seed(0)
    vae = build_tiny_sd_components(pretrained_vae=False)["vae"]
    rmse = train_tiny_vae(vae, steps=args.steps)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in vae.state_dict().items()}, args.out)
    print(f"saved {args.out}: reconstruction RMSE {rmse:.4f} on [0, 1]")


if __name__ == "__main__":
    main()
