"""Decoding one batch while the next denoises (the edit stage's ``speed.overlap_decode``).

An edit that is one diffusers call ends with the same tail in SD-shaped pipelines: VAE
decode, safety checker, conversion to PIL. ``LatentDecoder`` runs that tail (and whatever
the stage does with the images afterwards: metrics, PNG encoding) on one worker thread,
so the stage's own thread can start the next batch's denoising at once. On CUDA the
decode runs on a second stream that waits for the denoising's event, so the GPU can take
the decoder's kernels between the UNet's instead of after them.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

OVERLAP_PIPELINES = ("StableDiffusionImg2ImgPipeline", "StableDiffusionInstructPix2PixPipeline")
"""Pipelines whose call ends exactly as :func:`decode_latents` does (read in diffusers 0.42), so
stopping them at ``output_type="latent"`` and decoding here gives the same images."""


def supports_overlap(pipe: Any) -> bool:
    """Whether ``pipe``'s decoding can be split from its call (see ``OVERLAP_PIPELINES``)."""
    return type(pipe).__name__ in OVERLAP_PIPELINES


def decode_latents(pipe: Any, latents: torch.Tensor) -> Any:
    """The end of an SD pipeline call from its final latents: decode, safety check, PIL images.

    Returns:
        a ``StableDiffusionPipelineOutput`` (``images``, ``nsfw_content_detected``), as the
        pipeline itself would have returned.
    """
    from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

    with torch.no_grad():
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        image, nsfw = pipe.run_safety_checker(image, latents.device, pipe.text_encoder.dtype)
        denormalize = [True] * image.shape[0] if nsfw is None else [not flagged for flagged in nsfw]
        images = pipe.image_processor.postprocess(image, output_type="pil", do_denormalize=denormalize)
    return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=nsfw)


class LatentDecoder:
    """One worker thread (and on CUDA one stream) that finishes batches from their latents.

    Args:
        device: the device the latents are on.
    """

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="pixelmill-decode")

    def submit(self, latents: torch.Tensor, finish: Callable[[torch.Tensor], Any]) -> Future:
        """Run ``finish(latents)`` on the worker thread, after the work that made ``latents``."""
        ready = None
        if self.stream is not None:
            ready = torch.cuda.Event()
            ready.record()
        return self.pool.submit(self._run, latents, ready, finish)

    def _run(self, latents: torch.Tensor, ready: Any, finish: Callable[[torch.Tensor], Any]) -> Any:
        if self.stream is None:
            return finish(latents)
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            # the latents were made on the other stream: keep their memory until this one is done
            latents.record_stream(self.stream)
            return finish(latents)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
