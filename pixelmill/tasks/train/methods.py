"""The training methods as small differences on one trainer core.

A method says which parameters train, what text a sample trains with, what the UNet
sees (InstructPix2Pix adds the source image), what has to be restored after a step,
what a checkpoint holds, and what it saves. Everything else (data, noise, loss, the
optimiser, precision, checkpoints, data parallelism) is the core's (``core.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pixelmill.registry import register
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
    prior = False
    trains_text = False
    use_ema_default = False

    def __init__(self, parts: dict[str, Any], settings: dict[str, Any], concepts: list[dict[str, Any]]) -> None:
        self.parts = parts
        self.s = settings
        self.concepts = concepts
        for module in (parts["unet"], parts["text_encoder"], parts["vae"]):
            module.requires_grad_(False)

    # -- what trains -------------------------------------------------------------------
    def setup(self) -> None:
        """Add tokens, adapters or channels and mark the trainable parameters."""

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        """The parameters the optimiser updates, by a stable name."""
        out = {}
        for prefix, module in (("unet", self.parts["unet"]), ("text_encoder", self.parts["text_encoder"])):
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
        return getattr(diffusers, self.pipeline_class)(
            vae=p["vae"], text_encoder=p["text_encoder"], tokenizer=p["tokenizer"], unet=p["unet"],
            scheduler=scheduler or DDIMScheduler.from_config(p["scheduler"].config), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )

    def subject(self, concept: dict[str, Any]) -> str:
        """How a prompt names the concept (``{concept}`` in evaluation prompts)."""
        return f"{concept['token']} {concept['class_word']}".strip()


class _TokenRows:
    """Mixin: new token rows in the text embedding train; every other row is restored after each step."""

    def _train_rows(self, ids: list[int]) -> None:
        te = self.parts["text_encoder"]
        emb = te.get_input_embeddings().weight
        emb.requires_grad_(True)
        self.row_ids = ids
        self.orig_embeddings = emb.detach().clone()
        self.keep = torch.ones(emb.shape[0], dtype=torch.bool)
        self.keep[ids] = False

    def _restore_rows(self) -> None:
        emb = self.parts["text_encoder"].get_input_embeddings().weight
        with torch.no_grad():
            emb[self.keep] = self.orig_embeddings[self.keep].to(emb.device, emb.dtype)

    def _rows(self) -> torch.Tensor:
        return self.parts["text_encoder"].get_input_embeddings().weight.detach()[self.row_ids].cpu().clone()

    def _set_rows(self, rows: torch.Tensor) -> None:
        emb = self.parts["text_encoder"].get_input_embeddings().weight
        with torch.no_grad():
            emb[self.row_ids] = rows.to(emb.device, emb.dtype)


@register("train", "textual_inversion", settings=("num_vectors",), token_only=True, new_tokens=True,
          initializer="class_word")
class TextualInversion(_TokenRows, Method):
    """Learn new token embeddings for one concept; nothing else changes."""

    name = "textual_inversion"
    trains_text = True

    def setup(self) -> None:
        c = self.concepts[0]
        tok, te = self.parts["tokenizer"], self.parts["text_encoder"]
        init_text = c.get("initializer_token") or c["class_word"]
        if not init_text:
            raise TrainingDataError(f"textual_inversion needs `initializer_token` or `class_word` for {c['token']!r}")
        init = single_token_id(tok, init_text, "initializer_token")
        n = self.s["num_vectors"]
        self.tokens = [c["token"]] + [f"{c['token']}_{i}" for i in range(1, n)]
        ids = add_new_tokens(tok, te, self.tokens, [init] * n)
        self._train_rows(ids)
        self.placeholder = " ".join(self.tokens)

    def trainable(self):
        return {"text_encoder.embeddings": self.parts["text_encoder"].get_input_embeddings().weight}

    def after_step(self) -> None:
        self._restore_rows()

    def state(self):
        return {"rows": self._rows()}

    def load_state(self, state):
        self._set_rows(state["rows"])

    def prompt(self, sample, seed, step):
        if sample.kind != "instance":
            return sample.prompt
        k = int(torch.randint(0, 1 << 30, (), generator=generator(seed, step, sample.id, "template")))
        return ti_prompt(k, self.placeholder, self.concepts[0].get("property", "object"))

    def save(self, out_dir):
        from safetensors.torch import save_file

        save_file({self.concepts[0]["token"]: self._rows()}, str(out_dir / LEARNED_EMBEDS))
        return [LEARNED_EMBEDS]

    def subject(self, concept):
        return concept["token"]


@register("train", "dreambooth", prior=True,
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


@register("train", "lora", settings=("rank", "alpha", "target_modules"))
class LoRA(Method):
    """PEFT LoRA adapters on the UNet's attention projections; base weights stay as they are."""

    name = "lora"

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
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.parts["unet"]))
        StableDiffusionPipeline.save_lora_weights(str(out_dir), unet_lora_layers=layers, safe_serialization=True)
        return [LORA_WEIGHTS]


def _attn_hidden_size(unet, name: str) -> int:
    channels = unet.config.block_out_channels
    if name.startswith("mid_block"):
        return channels[-1]
    if name.startswith("up_blocks"):
        return list(reversed(channels))[int(name.split(".")[1])]
    return channels[int(name.split(".")[1])]


@register("train", "custom_diffusion", prior=True, multi_concept=True, new_tokens=True, initializer="rare",
          settings=("train", "with_prior_preservation", "prior_loss_weight", "num_class_images"))
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
        self._train_rows(add_new_tokens(tok, te, self.tokens, init_ids))
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


@register("train", "instruct_pix2pix", data="pairs",
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


@register("train", "text_to_image", settings=("conditioning_dropout_prob",))
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
    """The registered training method ``name``, built on the loaded parts (a ValueError names the known ones)."""
    from pixelmill import registry

    return registry.get("train", name).obj(parts, settings, concepts)
