"""Running a loaded diffusion pipeline fast on its device: memory layout, torch.compile, batch size.

The edit stage's ``speed:`` settings (``config/edit.py``, ``EditSpeed``) and its
``batch_size: auto`` become calls here, once per worker, after the pipeline (and any
adapter) is loaded. With every setting off the pipeline is left exactly as loaded.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

AUTO_BATCH_MAX = 32
"""The largest ``batch_size: auto``. An SD UNet at 512 px already runs 2 × 32 rows of
4,096 latent tokens per forward with guidance, far past what fills a GPU's tensor cores;
a larger batch adds memory and time per call, not throughput."""

AUTO_BATCH_FALLBACK = 4
"""``batch_size: auto`` off CUDA, or for a pipeline it cannot measure: the default batch."""

AUTO_BATCH_MEMORY_FRACTION = 0.8
"""Share of the free GPU memory ``batch_size: auto`` plans to use (the rest: the caching
allocator's fragmentation, compiled kernels' workspaces, the CUDA context of libraries)."""


def denoiser(pipe: Any) -> torch.nn.Module | None:
    """The pipeline's denoising network: its ``unet``, or its ``transformer`` in families without one."""
    return getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)


ATTENTION_BACKENDS = ("auto", "cudnn", "flash", "efficient")
"""``speed.attention`` values: ``auto`` leaves PyTorch's own choice of fused SDPA kernel."""


def _sdpa_order(attention: str) -> list[Any]:
    """SDPA backends in priority order, ``attention``'s first; the rest are fallbacks for shapes it lacks."""
    from torch.nn.attention import SDPBackend

    first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}[attention]
    rest = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return [first] + [b for b in rest if b != first]


def with_attention(forward: Callable[..., Any], attention: str) -> Callable[..., Any]:
    """``forward`` run with ``attention``'s SDPA kernel preferred (``torch.nn.attention.sdpa_kernel``).

    The preference is active while ``torch.compile`` traces ``forward`` too, so a compiled
    graph bakes in the same kernel. A shape the preferred kernel does not support (a head
    dimension it lacks, say) falls back to flash, memory-efficient, then math attention.
    """
    from torch.nn.attention import sdpa_kernel

    order = _sdpa_order(attention)

    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        with sdpa_kernel(order, set_priority=True):
            return forward(*args, **kwargs)

    return run


def _has_adapters(module: Any) -> bool:
    return bool(getattr(module, "peft_config", None)) or any(
        "lora" in type(m).__name__.lower() for m in module.modules())


def tune_pipeline(pipe: Any, channels_last: bool = False, compile: str = "off", attention: str = "auto",
                  fuse_qkv: bool = False) -> list[str]:
    """Lay out, fuse and compile ``pipe``'s networks in place; returns what was done (for logs and reports).

    Args:
        pipe: a loaded diffusers pipeline.
        channels_last: convert the denoiser's and the VAE's weights to channels-last (NHWC):
            their convolutions then read and write activations in that layout too.
        attention: the fused SDPA kernel the denoiser prefers (``ATTENTION_BACKENDS``;
            ``auto``: PyTorch's choice). Applied before compiling, so compiled code uses it.
        fuse_qkv: fuse each attention's query, key and value projections into one matrix
            product (diffusers' ``fuse_qkv_projections``, the denoiser and the VAE); not
            with LoRA or other adapters loaded into the denoiser (their layers wrap the
            projections it would fuse).
        compile: ``off``, ``unet`` (the denoiser) or ``unet+vae`` (also the VAE's encoder and
            decoder). Each module's ``forward`` goes through ``torch.compile`` with inductor's
            default mode (no CUDA graphs: batch shapes vary and decoding may run on another
            thread); the compile itself happens at the first call of each new input shape.
            ``forward``, not ``Module.compile()``: that compiles the ``_call_impl`` frame
            every module shares, so the second module compiled there (the UNet after the VAE
            encoder, in img2img) would be traced with dynamic shapes; a ``forward`` is its
            class's own. Module hooks stay outside the compiled code.
    """
    done: list[str] = []
    net, vae = denoiser(pipe), getattr(pipe, "vae", None)
    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"attention: {attention!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
    if fuse_qkv:
        if net is None or not hasattr(pipe, "fuse_qkv_projections"):
            raise ValueError(f"fuse_qkv: {type(pipe).__name__} cannot fuse its attention projections")
        if _has_adapters(net):
            raise ValueError("fuse_qkv: the denoiser has adapters (LoRA) loaded; fused projections would drop them "
                             "(set speed.fuse_qkv: false)")
        pipe.fuse_qkv_projections()
        done.append("unet+vae: fused QKV projections")
    if channels_last:
        for name, module in (("unet", net), ("vae", vae)):
            if module is not None:
                module.to(memory_format=torch.channels_last)
                done.append(f"{name}: channels_last")
    if compile not in ("off", "unet", "unet+vae"):
        raise ValueError(f"compile: {compile!r} is not one of off, unet, unet+vae")
    targets = []
    if compile != "off":
        targets.append(("unet", net))
    if compile == "unet+vae" and vae is not None:
        targets += [("vae.encoder", getattr(vae, "encoder", None)), ("vae.decoder", getattr(vae, "decoder", None))]
    for name, module in targets:
        if module is not None:
            module.forward = torch.compile(module.forward)
            done.append(f"{name}: torch.compile")
    if attention != "auto" and net is not None:
        net.forward = with_attention(net.forward, attention)
        done.append(f"unet: {attention} attention preferred")
    return done


def _peak_bytes(run: Callable[[], Any], device: torch.device) -> int:
    """Memory ``run`` allocates at its peak beyond what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def dummy_unet_inputs(unet: Any, rows: int, side: int, tokens: int, device: Any) -> dict[str, Any]:
    """Zero inputs of a UNet forward of ``rows`` latents ``side`` × ``side`` (SDXL's added conditioning too)."""
    dtype = unet.dtype
    config = unet.config
    out: dict[str, Any] = {
        "sample": torch.zeros(rows, config.in_channels, side, side, device=device, dtype=dtype),
        "timestep": torch.tensor(999, device=device),
        "encoder_hidden_states": torch.zeros(rows, tokens, config.cross_attention_dim, device=device, dtype=dtype),
    }
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        out["added_cond_kwargs"] = {"text_embeds": torch.zeros(rows, pooled, device=device, dtype=dtype),
                                    "time_ids": torch.zeros(rows, 6, device=device, dtype=dtype)}
    return out


def auto_batch_size(pipe: Any, resolution: int, rows_per_image: int, device: torch.device,
                    overlap_decode: bool = False) -> int:
    """The largest batch (at most ``AUTO_BATCH_MAX``) whose memory fits the free GPU memory.

    Measured on the loaded model, once: the peak memory of one denoiser forward and one VAE
    encode and decode (eager, so at least what compiled code takes) at 1 and 2 images of
    ``resolution`` × ``resolution`` give each part's memory per image and its fixed part;
    the batch is the largest whose worst part (with ``overlap_decode``, the denoiser and the
    decoder together: they run at once) fits in ``AUTO_BATCH_MEMORY_FRACTION`` of the free
    memory. Off CUDA, or for a pipeline of no supported family (``models/family.py``),
    ``AUTO_BATCH_FALLBACK``.

    Args:
        pipe: the loaded pipeline, on ``device``.
        resolution: the long side images are edited at (measured as a square: the largest).
        rows_per_image: denoiser rows per image (2 with classifier-free guidance, 3 for
            InstructPix2Pix's text and image guidance).
        device: the pipeline's device.
        overlap_decode: whether decoding runs beside the next batch's denoising.
    """
    from pixelmill.models.family import UnsupportedFamily, family_of_pipeline

    if device.type != "cuda":
        return AUTO_BATCH_FALLBACK
    try:
        family_of_pipeline(pipe)
    except UnsupportedFamily:
        return AUTO_BATCH_FALLBACK
    unet, vae = pipe.unet, pipe.vae
    scale = getattr(pipe, "vae_scale_factor", 8)
    side = max(1, resolution // scale)
    tokens = getattr(getattr(pipe, "tokenizer", None), "model_max_length", 77)

    def unet_run(b: int) -> Callable[[], Any]:
        kwargs = dummy_unet_inputs(unet, b * rows_per_image, side, tokens, device)
        return lambda: unet.forward(**kwargs, return_dict=False)

    def decode_run(b: int) -> Callable[[], Any]:
        z = torch.zeros(b, vae.config.latent_channels, side, side, device=device, dtype=vae.dtype)
        return lambda: vae.decode(z, return_dict=False)

    def encode_run(b: int) -> Callable[[], Any]:
        x = torch.zeros(b, 3, side * scale, side * scale, device=device, dtype=vae.dtype)
        return lambda: vae.encode(x, return_dict=False)

    parts = {}
    with torch.inference_mode():
        for name, make in (("unet", unet_run), ("decode", decode_run), ("encode", encode_run)):
            one, two = _peak_bytes(make(1), device), _peak_bytes(make(2), device)
            per_image = max(two - one, 1)
            parts[name] = (max(one - per_image, 0), per_image)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    budget = AUTO_BATCH_MEMORY_FRACTION * free

    def need(b: int) -> float:
        each = {name: fixed + b * per for name, (fixed, per) in parts.items()}
        return max(each.values()) if not overlap_decode else max(each["unet"] + each["decode"], each["encode"])

    best = 1
    for b in range(1, AUTO_BATCH_MAX + 1):
        if need(b) <= budget:
            best = b
    return best
