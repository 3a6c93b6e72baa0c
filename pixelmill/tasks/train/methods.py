"""The training methods as small differences on one trainer core.

A method says which parameters train, what text a sample trains with, what the UNet
sees (InstructPix2Pix adds the source image), what has to be restored after a step,
what a checkpoint holds, and what it saves. Everything else (data, noise, loss, the
optimiser, precision, checkpoints, data parallelism) is the core's (``core.py``).

Each registration declares the model families it supports (``families=``, see
``models/family.py``); campaign preflight refuses any other combination before a job
starts, naming both. On SDXL the conditioning is the core's (``conditioning.py``), and
LoRA, Textual Inversion (one embedding per text encoder) and InstructPix2Pix train;
full DreamBooth, Custom Diffusion and text-to-image are SD 1.x/2.x only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pixelmill.models.family import ALL_FAMILIES, SD_FAMILIES
from pixelmill.registry import register
from pixelmill.tasks.train.conditioning import is_sdxl, text_encoders
from pixelmill.tasks.train.data import Sample, TrainingDataError, generator, ti_prompt

LEARNED_EMBEDS = "learned_embeds.safetensors"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
CUSTOM_DIFFUSION_WEIGHTS = "pytorch_custom_diffusion_weights.safetensors"
# Rare single tokens to initialise modifier tokens from. The Custom Diffusion reference uses
# "ktn", "pll", "ucd", but "ktn" is two tokens in the SD tokenizer ("k", "tn</w>").
RARE_TOKENS = ("pll", "ucd", "olis", "bnha")


def single_token_id(tokenizer, text: str, what: str) -> int:
    """The id of ``text`` if it is exactly one token; a clear error otherwise."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise TrainingDataError(
            f"{what} {text!r} is {len(ids)} tokens {pieces}; it must be exactly one token "
            "(pick a single word the tokenizer knows, e.g. the class word)"
        )
    return ids[0]


def add_new_tokens(tokenizer, text_encoder, tokens: list[str], init_ids: list[int]) -> list[int]:
    """Add ``tokens`` to the tokenizer, grow the embedding and copy each init row into its new row."""
    added = tokenizer.add_tokens(tokens)
    if added != len(tokens):
        taken = [t for t in tokens if len(tokenizer.encode(t, add_special_tokens=False)) == 1]
        raise TrainingDataError(f"token(s) {taken} already exist in the tokenizer; choose new placeholder tokens")
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    emb = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for new, init in zip(ids, init_ids):
            emb[new] = emb[init].clone()
    return ids


class Method:
    """Base: train nothing, text from the sample, noise-prediction loss on 4-channel latents.

    Args:
        parts: the loaded components (``tokenizer``, ``text_encoder``, ``vae``, ``unet``, ``scheduler``).
        settings: the job's ``TrainSettings`` as a dict.
        concepts: the job's concepts as dicts.
    """

    name = ""
    pipeline_class = "StableDiffusionPipeline"
    sdxl_pipeline_class = "StableDiffusionXLPipeline"
    prior: bool | str = False
    trains_text = False
    use_ema_default = False

    def __init__(self, parts: dict[str, Any], settings: dict[str, Any], concepts: list[dict[str, Any]]) -> None:
        self.parts = parts
        self.s = settings
        self.concepts = concepts
        self.sdxl = is_sdxl(parts)
        for module in (parts["unet"], parts["text_encoder"], parts.get("text_encoder_2"), parts["vae"]):
            if module is not None:
                module.requires_grad_(False)

    # -- what trains -------------------------------------------------------------------
    def setup(self) -> None:
        """Add tokens, adapters or channels and mark the trainable parameters."""

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        """The parameters the optimiser updates, by a stable name."""
        out = {}
        modules = [("unet", self.parts["unet"])] + [(name, te) for name, _, te in text_encoders(self.parts)]
        for prefix, module in modules:
            for name, p in module.named_parameters():
                if p.requires_grad:
                    out[f"{prefix}.{name}"] = p
        return out

    def after_step(self) -> None:
        """Undo what the optimiser must not change (e.g. embedding rows of other tokens)."""

    def state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds of the model (default: every trainable tensor)."""
        return {k: p.detach().cpu().clone() for k, p in self.trainable().items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        params = self.trainable()
        missing = set(params) - set(state)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[:3]}")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(state[k].to(p.device, p.dtype))

    # -- what a sample trains with ----------------------------------------------------------
    def prompt(self, sample: Sample, seed: int, step: int) -> str:
        return sample.prompt

    def text_is_fixed(self) -> bool:
        """Whether text embeddings are fixed (frozen encoder, fixed prompts): they can be cached."""
        return not self.trains_text

    def unet_input(self, noisy: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return noisy

    # -- what it saves ----------------------------------------------------------------------
    def save(self, out_dir: Path) -> list[str]:
        """Write the artifacts diffusers loads; returns their file names."""
        raise NotImplementedError

    def pipeline(self, scheduler=None):
        """A diffusers pipeline (``pipeline_class``) with the trained weights in memory."""
        import diffusers
        from diffusers import DDIMScheduler

        p = self.parts
        if self.sdxl:
            return getattr(diffusers, self.sdxl_pipeline_class)(
                vae=p["vae"], text_encoder=p["text_encoder"], text_encoder_2=p["text_encoder_2"],
                tokenizer=p["tokenizer"], tokenizer_2=p["tokenizer_2"], unet=p["unet"],
                scheduler=scheduler or DDIMScheduler.from_config(p["scheduler"].config),
                force_zeros_for_empty_prompt=p.get("force_zeros_for_empty_prompt", True), add_watermarker=False,
            )
        return getattr(diffusers, self.pipeline_class)(
            vae=p["vae"], text_encoder=p["text_encoder"], tokenizer=p["tokenizer"], unet=p["unet"],
            scheduler=scheduler or DDIMScheduler.from_config(p["scheduler"].config), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )

    def subject(self, concept: dict[str, Any]) -> str:
        """How a prompt names the concept (``{concept}`` in evaluation prompts)."""
        return f"{concept['token']} {concept['class_word']}".strip()


class _TokenRows:
    """Mixin: new token rows in text embeddings train; every other row is restored after each step.

    ``_train_rows`` takes the new rows of each text encoder (``text_encoder``, and
    ``text_encoder_2`` on SDXL); the other helpers name the encoder (default the first).
    """

    def _train_rows(self, ids: dict[str, list[int]]) -> None:
        self.row_ids, self.orig_embeddings, self.keep = {}, {}, {}
        for name, rows in ids.items():
            emb = self.parts[name].get_input_embeddings().weight
            emb.requires_grad_(True)
            self.row_ids[name] = rows
            self.orig_embeddings[name] = emb.detach().clone()
            self.keep[name] = torch.ones(emb.shape[0], dtype=torch.bool)
            self.keep[name][rows] = False

    def _restore_rows(self) -> None:
        for name, keep in self.keep.items():
            emb = self.parts[name].get_input_embeddings().weight
            with torch.no_grad():
                emb[keep] = self.orig_embeddings[name][keep].to(emb.device, emb.dtype)

    def _rows(self, name: str = "text_encoder") -> torch.Tensor:
        return self.parts[name].get_input_embeddings().weight.detach()[self.row_ids[name]].cpu().clone()

    def _set_rows(self, rows: torch.Tensor, name: str = "text_encoder") -> None:
        emb = self.parts[name].get_input_embeddings().weight
        with torch.no_grad():
            emb[self.row_ids[name]] = rows.to(emb.device, emb.dtype)


# SDXL Textual Inversion file keys, diffusers' documented pattern: one embedding per text encoder
SDXL_TI_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}


@register("train", "textual_inversion", settings=("num_vectors",), token_only=True, new_tokens=True,
          initializer="class_word", families=ALL_FAMILIES)
class TextualInversion(_TokenRows, Method):
    """Learn new token embeddings for one concept; nothing else changes.

    On SDXL both tokenizers get the tokens and both text encoders' rows train; the file
    holds ``clip_l`` (``text_encoder``) and ``clip_g`` (``text_encoder_2``), loaded with
    ``load_textual_inversion(file["clip_l"], token=…, text_encoder=pipe.text_encoder,
    tokenizer=pipe.tokenizer)`` and again with ``clip_g`` and the second pair.
    """

    name = "textual_inversion"
    trains_text = True

    def setup(self) -> None:
        c = self.concepts[0]
        init_text = c.get("initializer_token") or c["class_word"]
        if not init_text:
            raise TrainingDataError(f"textual_inversion needs `initializer_token` or `class_word` for {c['token']!r}")
        n = self.s["num_vectors"]
        self.tokens = [c["token"]] + [f"{c['token']}_{i}" for i in range(1, n)]
        ids = {}
        for name, tok, te in text_encoders(self.parts):
            init = single_token_id(tok, init_text, "initializer_token")
            ids[name] = add_new_tokens(tok, te, self.tokens, [init] * n)
        self._train_rows(ids)
        self.placeholder = " ".join(self.tokens)

    def trainable(self):
        return {f"{name}.embeddings": te.get_input_embeddings().weight for name, _, te in text_encoders(self.parts)}

    def after_step(self) -> None:
        self._restore_rows()

    def state(self):
        return {"rows" if name == "text_encoder" else f"rows:{name}": self._rows(name) for name in self.row_ids}

    def load_state(self, state):
        for name in self.row_ids:
            self._set_rows(state["rows" if name == "text_encoder" else f"rows:{name}"], name)

    def prompt(self, sample, seed, step):
        if sample.kind != "instance":
            return sample.prompt
        k = int(torch.randint(0, 1 << 30, (), generator=generator(seed, step, sample.id, "template")))
        return ti_prompt(k, self.placeholder, self.concepts[0].get("property", "object"))

    def save(self, out_dir):
        from safetensors.torch import save_file

        if self.sdxl:
            save_file({SDXL_TI_KEYS[name]: self._rows(name).contiguous() for name in self.row_ids},
                      str(out_dir / LEARNED_EMBEDS))
            (out_dir / "tokens.json").write_text(json.dumps([self.concepts[0]["token"]]))
        else:
            save_file({self.concepts[0]["token"]: self._rows()}, str(out_dir / LEARNED_EMBEDS))
        return [LEARNED_EMBEDS]

    def subject(self, concept):
        return concept["token"]


@register("train", "dreambooth", prior=True, families=SD_FAMILIES,
          settings=("with_prior_preservation", "prior_loss_weight", "num_class_images", "train_text_encoder"))
class DreamBooth(Method):
    """Fine-tune the whole UNet (and optionally the text encoder) on a few instance images."""

    name = "dreambooth"
    prior = True

    def setup(self) -> None:
        self.parts["unet"].requires_grad_(True)
        if self.s["train_text_encoder"]:
            self.parts["text_encoder"].requires_grad_(True)
            self.trains_text = True

    def save(self, out_dir):
        self.pipeline().save_pretrained(str(out_dir), safe_serialization=True)
        return ["model_index.json"]


@register("train", "lora", prior="opt_in", families=ALL_FAMILIES,
          settings=("rank", "alpha", "target_modules", "with_prior_preservation", "prior_loss_weight",
                    "num_class_images"))
class LoRA(Method):
    """PEFT LoRA adapters on the UNet's attention projections; base weights stay as they are.

    Prior preservation only when asked (``with_prior_preservation: true``), as diffusers'
    DreamBooth-LoRA (SD and SDXL) scripts do. On SDXL the file is what
    ``StableDiffusionXLPipeline.load_lora_weights`` reads.
    """

    name = "lora"
    prior = "opt_in"

    def setup(self) -> None:
        from peft import LoraConfig

        s = self.s
        config = LoraConfig(r=s["rank"], lora_alpha=s["alpha"] or s["rank"], init_lora_weights="gaussian",
                            target_modules=list(s["target_modules"]))
        try:
            self.parts["unet"].add_adapter(config)
        except ValueError as e:
            raise TrainingDataError(f"lora target_modules {s['target_modules']}: {e}") from None

    def save(self, out_dir):
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.parts["unet"]))
        cls = StableDiffusionXLPipeline if self.sdxl else StableDiffusionPipeline
        cls.save_lora_weights(str(out_dir), unet_lora_layers=layers, safe_serialization=True)
        return [LORA_WEIGHTS]


def _attn_hidden_size(unet, name: str) -> int:
    channels = unet.config.block_out_channels
    if name.startswith("mid_block"):
        return channels[-1]
    if name.startswith("up_blocks"):
        return list(reversed(channels))[int(name.split(".")[1])]
    return channels[int(name.split(".")[1])]


@register("train", "custom_diffusion", prior=True, multi_concept=True, new_tokens=True, initializer="rare",
          families=SD_FAMILIES, settings=("train", "with_prior_preservation", "prior_loss_weight", "num_class_images"))
class CustomDiffusion(_TokenRows, Method):
    """Cross-attention K/V (or K/V/Q/out) plus modifier-token rows, one or several concepts jointly."""

    name = "custom_diffusion"
    prior = True
    trains_text = True

    def setup(self) -> None:
        from diffusers.models.attention_processor import CustomDiffusionAttnProcessor

        tok, te, unet = self.parts["tokenizer"], self.parts["text_encoder"], self.parts["unet"]
        self.tokens = [c["token"] for c in self.concepts]
        init_ids = []
        for i, c in enumerate(self.concepts):
            text = c.get("initializer_token") or RARE_TOKENS[i % len(RARE_TOKENS)]
            init_ids.append(single_token_id(tok, text, "initializer_token"))
        self._train_rows({"text_encoder": add_new_tokens(tok, te, self.tokens, init_ids)})
        train_q_out = self.s["train"] == "crossattn"
        state = unet.state_dict()
        procs = {}
        for name in unet.attn_processors:
            layer = name[: -len(".processor")]
            if name.endswith("attn2.processor"):
                proc = CustomDiffusionAttnProcessor(
                    train_kv=True, train_q_out=train_q_out, hidden_size=_attn_hidden_size(unet, name),
                    cross_attention_dim=unet.config.cross_attention_dim,
                )
                weights = {"to_k_custom_diffusion.weight": state[f"{layer}.to_k.weight"],
                           "to_v_custom_diffusion.weight": state[f"{layer}.to_v.weight"]}
                if train_q_out:
                    weights.update({
                        "to_q_custom_diffusion.weight": state[f"{layer}.to_q.weight"],
                        "to_out_custom_diffusion.0.weight": state[f"{layer}.to_out.0.weight"],
                        "to_out_custom_diffusion.0.bias": state[f"{layer}.to_out.0.bias"],
                    })
                proc.load_state_dict(weights)
            else:
                proc = CustomDiffusionAttnProcessor(train_kv=False, train_q_out=False, hidden_size=None,
                                                    cross_attention_dim=None)
            procs[name] = proc
        unet.set_attn_processor(procs)
        unet.to(next(unet.parameters()).device)
        self.procs = {k: v for k, v in unet.attn_processors.items() if k.endswith("attn2.processor")}
        for proc in self.procs.values():
            proc.requires_grad_(True)

    def trainable(self):
        out = {"text_encoder.embeddings": self.parts["text_encoder"].get_input_embeddings().weight}
        for name, proc in sorted(self.procs.items()):
            for k, p in proc.named_parameters():
                out[f"unet.{name}.{k}"] = p
        return out

    def after_step(self) -> None:
        self._restore_rows()

    def state(self):
        out = {k: p.detach().cpu().clone() for k, p in self.trainable().items() if k != "text_encoder.embeddings"}
        out["rows"] = self._rows()
        return out

    def load_state(self, state):
        self._set_rows(state["rows"])
        with torch.no_grad():
            for k, p in self.trainable().items():
                if k != "text_encoder.embeddings":
                    p.copy_(state[k].to(p.device, p.dtype))

    def attn_state(self) -> dict[str, torch.Tensor]:
        """The weights file: trained processors' tensors, plus a zero-size marker per other layer.

        diffusers' ``load_attn_procs`` needs an entry for every attention layer; safetensors
        drops the empty dicts ``save_attn_procs`` writes for untrained layers, so its own
        files cannot be loaded back (diffusers 0.42). A zero-size tensor is the marker its
        loader reads as "not trained".
        """
        out: dict[str, torch.Tensor] = {}
        for name in self.parts["unet"].attn_processors:
            if name in self.procs:
                for k, v in self.procs[name].state_dict().items():
                    out[f"{name}.{k}"] = v.detach().cpu().contiguous()
            else:
                out[name] = torch.zeros(0)
        return out

    def save(self, out_dir):
        from safetensors.torch import save_file

        save_file(self.attn_state(), str(out_dir / CUSTOM_DIFFUSION_WEIGHTS))
        rows = self._rows()
        names = [CUSTOM_DIFFUSION_WEIGHTS]
        for token, row in zip(self.tokens, rows):
            save_file({token: row.contiguous()}, str(out_dir / f"{token}.safetensors"))
            names.append(f"{token}.safetensors")
        (out_dir / "tokens.json").write_text(json.dumps(self.tokens))
        return names


@register("train", "instruct_pix2pix", data="pairs", families=ALL_FAMILIES,
          settings=("conditioning_dropout_prob", "input_column", "edited_column", "instruction_column"))
class InstructPix2Pix(Method):
    """Edit training from (input, instruction, edited) pairs: UNet widened to 8 channels.

    The extra input channels start at zero, so the widened UNet begins as the base
    model. Conditioning dropout follows the paper (text only, both, image only, each
    with probability ``conditioning_dropout_prob``), so classifier-free guidance over
    text and image works at inference.
    """

    name = "instruct_pix2pix"
    pipeline_class = "StableDiffusionInstructPix2PixPipeline"
    sdxl_pipeline_class = "StableDiffusionXLInstructPix2PixPipeline"
    use_ema_default = True

    def setup(self) -> None:
        unet = self.parts["unet"]
        if unet.config.in_channels == 4:
            old = unet.conv_in
            new = torch.nn.Conv2d(8, old.out_channels, old.kernel_size, old.stride, old.padding)
            with torch.no_grad():
                new.weight.zero_()
                new.weight[:, :4] = old.weight
                new.bias.copy_(old.bias)
            unet.conv_in = new
            unet.register_to_config(in_channels=8)
        elif unet.config.in_channels != 8:
            raise TrainingDataError(f"instruct_pix2pix needs a 4- or 8-channel UNet, got {unet.config.in_channels}")
        unet.requires_grad_(True)

    def unet_input(self, noisy, batch):
        return torch.cat([noisy, batch["source_latents"]], dim=1)

    def save(self, out_dir):
        self.pipeline().save_pretrained(str(out_dir), safe_serialization=True)
        return ["model_index.json"]


@register("train", "text_to_image", settings=("conditioning_dropout_prob",), families=SD_FAMILIES)
class TextToImage(Method):
    """Train the whole UNet from (image, caption) rows: text-to-image training from scratch or fine-tuning.

    The text encoder stays frozen (its embeddings can be cached). Each sample's caption is
    replaced by the empty prompt with probability ``conditioning_dropout_prob``, drawn from
    ``(seed, step, sample id)``, so the model also learns the unconditional prediction that
    classifier-free guidance needs.
    """

    name = "text_to_image"

    def setup(self) -> None:
        self.parts["unet"].requires_grad_(True)

    def prompt(self, sample, seed, step):
        prob = self.s.get("conditioning_dropout_prob", 0.0)
        if prob and torch.rand((), generator=generator(seed, step, sample.id, "caption_dropout")).item() < prob:
            return ""
        return sample.prompt

    def save(self, out_dir):
        self.pipeline().save_pretrained(str(out_dir), safe_serialization=True)
        return ["model_index.json"]


def make_method(name: str, parts, settings, concepts) -> Method:
    """The registered training method ``name``, built on the loaded parts (a ValueError names the known ones).

    Raises:
        UnsupportedFamily: the model's family is not one the method declares (preflight refuses it
            first; this guards a job spec run directly).
    """
    from pixelmill import registry
    from pixelmill.config.campaign import method_families
    from pixelmill.models.family import require_family

    entry = registry.get("train", name)
    if parts.get("info") is not None:
        require_family(parts["info"], method_families(name), f"training method {name!r}")
    return entry.obj(parts, settings, concepts)
