"""The local-LM instruction writer, and the generation helpers that make it match the API writer.

The helpers (OpenAI-style frequency penalty, a per-row seeded sampler, a text stop
criterion) subclass transformers classes; they are built on first use, through
``_hf_class`` and this module's ``__getattr__``, so importing this module stays cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pixelmill.registry import register
from pixelmill.tasks.instructions.answer import PROMPT_SEPARATOR, STOP, WriterAnswer
from pixelmill.tasks.instructions.writers.base import InstructionWriter, _read_few_shot


class _FrequencyPenalty:
    """OpenAI's frequency and presence penalties as a transformers ``LogitsProcessor``.

    ``logit[j] -= frequency_penalty * c[j] + presence_penalty * (c[j] > 0)``, where
    ``c[j]`` counts token ``j`` among the tokens generated so far. Only generated tokens
    count, not the prompt: OpenAI defines ``c[j]`` as how often the token was *sampled*
    before the current position, and vLLM (the usual OpenAI-compatible server) counts
    output tokens only. This differs from transformers' ``repetition_penalty``, which
    divides/multiplies logits and counts the prompt too.

    Args:
        frequency_penalty: subtracted once per earlier occurrence (OpenAI range −2..2).
        prompt_length: the (padded) prompt length; ids before it are not counted.
        presence_penalty: subtracted once if the token occurred at all.
    """

    def __init__(self, frequency_penalty: float, prompt_length: int, presence_penalty: float = 0.0) -> None:
        self.frequency_penalty = float(frequency_penalty)
        self.presence_penalty = float(presence_penalty)
        self.prompt_length = int(prompt_length)

    def __call__(self, input_ids, scores):
        import torch

        generated = input_ids[:, self.prompt_length:]
        if generated.shape[1] == 0 or (self.frequency_penalty == 0 and self.presence_penalty == 0):
            return scores
        counts = torch.zeros_like(scores)
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency_penalty * counts - self.presence_penalty * (counts > 0).to(scores.dtype)


class _SeededSampler:
    """Samples the next token per row with that row's own generator (used with greedy ``generate``).

    Applies temperature and top-p, then draws one uniform number per row from the row's
    CPU ``torch.Generator`` and picks the token by inverse CDF; the returned scores are 0
    for the picked token and −inf elsewhere, so ``generate(do_sample=False)`` takes it.
    A row's draws thus depend only on its seed, never on its batch neighbours or on the
    device. ``temperature == 0`` leaves the scores alone (greedy).

    Args:
        generators: one seeded CPU generator per row.
        temperature: softmax temperature.
        top_p: nucleus mass kept (1.0 keeps all).
    """

    def __init__(self, generators: list, temperature: float, top_p: float) -> None:
        self.generators = generators
        self.temperature = float(temperature)
        self.top_p = float(top_p)

    def __call__(self, input_ids, scores):
        import torch

        if self.temperature <= 0:
            return scores
        logits = scores.float() / self.temperature
        probs = torch.softmax(logits, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = torch.sort(probs, dim=-1, descending=True)
            drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= self.top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            probs = probs.masked_fill(drop, 0.0)
        cdf = probs.double().cumsum(-1)
        u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in self.generators])
        u = u.to(cdf.device).unsqueeze(1) * cdf[:, -1:]
        picked = torch.searchsorted(cdf, u, right=True).clamp_(max=scores.shape[-1] - 1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, picked, 0.0)


class _StopOnText:
    """Stops a row once its generated text (decoded, prompt excluded) contains ``stop``.

    Only the last ``tail_tokens`` generated tokens are decoded each step: the stop text
    must end in the newest token, or the row would have stopped earlier.

    Args:
        tokenizer: the model's tokenizer.
        stop: the stop text (``"\\nEND"``).
        prompt_length: the (padded) prompt length.
        tail_tokens: how many trailing tokens to decode each step.
    """

    def __init__(self, tokenizer: Any, stop: str, prompt_length: int, tail_tokens: int = 16) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.prompt_length = prompt_length
        self.tail_tokens = tail_tokens

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        start = max(self.prompt_length, input_ids.shape[1] - self.tail_tokens)
        texts = self.tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
        return torch.tensor([self.stop in t for t in texts], dtype=torch.bool, device=input_ids.device)


_LAZY_HF_CLASSES = {
    "FrequencyPenaltyLogitsProcessor": (_FrequencyPenalty, "LogitsProcessor"),
    "SeededSamplerLogitsProcessor": (_SeededSampler, "LogitsProcessor"),
    "StopOnTextCriteria": (_StopOnText, "StoppingCriteria"),
}
_hf_classes: dict[str, type] = {}


def _hf_class(name: str) -> type:
    """The transformers subclass for one of the generation helpers above, built on first use.

    They subclass ``transformers.LogitsProcessor``/``StoppingCriteria``, but importing
    transformers (and torch) costs seconds, which template and API runs should not pay;
    so the subclasses are made when first asked for (``from ... import
    FrequencyPenaltyLogitsProcessor`` works too, through the module ``__getattr__``).
    """
    if name not in _hf_classes:
        import transformers

        impl, base = _LAZY_HF_CLASSES[name]
        _hf_classes[name] = type(name, (impl, getattr(transformers, base)),
                                 {"__doc__": impl.__doc__, "__module__": __name__, "__qualname__": name})
    return _hf_classes[name]


def __getattr__(name: str) -> Any:
    if name in _LAZY_HF_CLASSES:
        return _hf_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _load_causal_lm(model: str, device: Any, dtype: Any) -> tuple[Any, Any]:
    """Tokenizer and model from a local folder or hub id: safetensors only, no remote code.

    Belongs with the other loaders in ``pixelmill/models/loading.py``; kept here until
    that module grows a causal-LM loader.
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pixelmill.models.loading import ModelNotFound, looks_local

    if looks_local(model) and not Path(model).expanduser().is_dir():
        raise ModelNotFound(f"causal LM folder not found: {Path(model).expanduser()} (writer_options.model)")
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    tok = AutoTokenizer.from_pretrained(model, trust_remote_code=False)
    lm = AutoModelForCausalLM.from_pretrained(model, use_safetensors=True, trust_remote_code=False,
                                              **{dtype_key: dtype})
    return tok, lm.to(device).eval()


@register("writer", "transformers")
class TransformersInstructionWriter(InstructionWriter):
    """Writes instructions with a local causal LM, prompted in InstructPix2Pix's format.

    The prompt is an optional few-shot prefix (the text of ``few_shot_file``, verbatim)
    followed by ``caption + "\\n##\\n"``. Generation is batched with left padding and
    samples up to ``max_tokens`` tokens with ``temperature`` and ``top_p`` after an
    OpenAI-style frequency penalty (``FrequencyPenaltyLogitsProcessor``; not
    ``repetition_penalty``), stopping a row at ``"\\nEND"`` (``StopOnTextCriteria``) or at
    the end token. An answer cut off at ``max_tokens`` has ``finish_reason="length"``.

    Seeding: per row, inside the batch. Each row gets its own CPU ``torch.Generator``
    seeded with its seed, and the next token of every row is drawn from that generator
    (``SeededSamplerLogitsProcessor``), so a row's answer does not depend on which rows
    share its batch (up to floating-point differences that padding can cause in some
    attention kernels) and no global RNG is touched.

    Args:
        model: local folder (or hub id) of a causal LM with safetensors weights.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``...
        dtype: ``auto`` (bf16/fp16 on CUDA, fp32 on CPU) or a dtype name.
        max_tokens: most new tokens per answer.
        temperature: sampling temperature (0 = greedy).
        top_p: nucleus sampling mass.
        frequency_penalty: OpenAI-style frequency penalty.
        presence_penalty: OpenAI-style presence penalty.
        few_shot_file: text file prepended to every prompt.
    """

    name = "transformers"

    def __init__(
        self,
        model: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_tokens: int = 256,
        temperature: float = 0.7,
        top_p: float = 1.0,
        frequency_penalty: float = 0.1,
        presence_penalty: float = 0.0,
        few_shot_file: str | None = None,
    ) -> None:
        if not model:
            raise ValueError("writer_options.model is required for writer 'transformers'")
        if max_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
            raise ValueError("writer_options: need max_tokens >= 1, temperature >= 0 and 0 < top_p <= 1")
        self.model = model
        self.device_name = device
        self.dtype_name = dtype
        self.max_tokens = int(max_tokens)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.frequency_penalty = float(frequency_penalty)
        self.presence_penalty = float(presence_penalty)
        self.few_shot_file = few_shot_file
        self.prefix = ""
        self.tokenizer: Any = None
        self.lm: Any = None
        self._fingerprint: str | None = None

    def __repr__(self) -> str:
        return f"TransformersInstructionWriter(model={self.model!r}, device={self.device_name!r})"

    @property
    def model_name(self) -> str:
        if self._fingerprint is None:
            return self.model
        return self._fingerprint if "@" in self._fingerprint else f"{self.model}@{self._fingerprint}"

    def setup(self) -> None:
        if self.lm is not None:
            return
        from pixelmill.models.device import resolve_device, resolve_dtype
        from pixelmill.models.loading import model_fingerprint

        self.prefix = _read_few_shot(self.few_shot_file)
        self.device = resolve_device(self.device_name)
        self.tokenizer, self.lm = _load_causal_lm(self.model, self.device, resolve_dtype(self.dtype_name, self.device))
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            if self.tokenizer.eos_token is None:
                raise ValueError(f"{self.model}: the tokenizer has neither a pad nor an end token to pad batches with")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._fingerprint = model_fingerprint(self.model)
        cfg = self.lm.config
        self.context_length = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)

    def prompt(self, caption: str) -> str:
        """The full prompt for one caption (few-shot prefix + caption + ``"\\n##\\n"``)."""
        return self.prefix + caption + PROMPT_SEPARATOR

    def write(self, captions: list[str], seeds: list[int]) -> list[WriterAnswer]:
        self.setup()
        answers: list[WriterAnswer | None] = [None] * len(captions)
        encoded = [self.tokenizer(self.prompt(c))["input_ids"] for c in captions]
        todo = []
        for i, ids in enumerate(encoded):
            if self.context_length and len(ids) + self.max_tokens > self.context_length:
                answers[i] = WriterAnswer(raw=None, error="prompt_too_long")
            else:
                todo.append(i)
        if todo:
            for i, answer in zip(todo, self._generate([captions[i] for i in todo], [seeds[i] for i in todo])):
                answers[i] = answer
        return answers  # type: ignore[return-value]

    def _generate(self, captions: list[str], seeds: list[int]) -> list[WriterAnswer]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        tok = self.tokenizer
        batch = tok([self.prompt(c) for c in captions], return_tensors="pt", padding=True).to(self.device)
        prompt_len = batch["input_ids"].shape[1]
        eos = tok.eos_token_id if tok.eos_token_id is not None else self.lm.generation_config.eos_token_id
        gen_config = GenerationConfig(max_new_tokens=self.max_tokens, do_sample=False, num_beams=1,
                                      eos_token_id=eos, pad_token_id=tok.pad_token_id)
        processors = LogitsProcessorList([
            _hf_class("FrequencyPenaltyLogitsProcessor")(self.frequency_penalty, prompt_len, self.presence_penalty),
            _hf_class("SeededSamplerLogitsProcessor")(
                [torch.Generator("cpu").manual_seed(int(s)) for s in seeds], self.temperature, self.top_p),
        ])
        criteria = StoppingCriteriaList([_hf_class("StopOnTextCriteria")(tok, STOP, prompt_len)])
        with torch.inference_mode():
            out = self.lm.generate(**batch, generation_config=gen_config, logits_processor=processors,
                                   stopping_criteria=criteria)
        eos_ids = {e for e in (eos if isinstance(eos, list) else [eos]) if e is not None}
        answers = []
        for row in out[:, prompt_len:].tolist():
            ended = next((k for k, t in enumerate(row) if t in eos_ids), None)
            ids = row if ended is None else row[:ended]
            text = tok.decode(ids, skip_special_tokens=True)
            cut = text.find(STOP)
            if cut >= 0:
                answers.append(WriterAnswer(raw=text[:cut], finish_reason="stop"))
            elif ended is not None or len(ids) < self.max_tokens:
                answers.append(WriterAnswer(raw=text, finish_reason="stop"))
            else:
                answers.append(WriterAnswer(raw=text, finish_reason="length"))
        return answers
