"""A tiny random-weight GPT-2 with an offline byte-level BPE tokenizer, for tests.

The instruction writer loads any local causal LM folder; tests need one that exists
without a download. This builds a 2-layer GPT-2 (32-wide, 2 heads) and a real
byte-level BPE tokenizer whose vocabulary is the 256 byte symbols, a handful of merges
and ``<|endoftext|>``, so every string round-trips through it. The weights are random:
its text is nonsense, which is exactly what exercises the answer filters.
"""

from __future__ import annotations

from pathlib import Path

from pixelmill.models.tokenizer import bytes_to_unicode

END_OF_TEXT = "<|endoftext|>"

TINY_GPT2_MERGES: tuple[str, ...] = (
    "Ġ t", "h e", "Ġt he", "Ġ a", "i n", "Ġ o", "e r", "a n", "o n", "r e",
    "Ġ s", "Ġ c", "Ġ w", "a t", "Ġ m", "Ġa n", "Ġ i", "E N", "EN D", "% %", "# #",
    "Ċ Ċ", "Ġ p", "Ġ b", "Ġ d", "in g", "Ġ f", "Ġo f",
)

_README = """\
Random-weight GPT-2 written by pixelmill.models.tiny_gpt2 (save_tiny_gpt2).

2 layers, 2 heads, 32-wide embeddings; byte-level BPE tokenizer with 256 byte symbols,
{merges} merges and <|endoftext|> ({vocab} tokens). Its outputs are NONSENSE: use it
only for tests of loading, batching, sampling and answer filtering.
"""


def tiny_gpt2_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """The tiny tokenizer's vocabulary (byte symbols, merge results, end token) and merges."""
    tokens = list(bytes_to_unicode().values())
    merges = list(TINY_GPT2_MERGES)
    for merge in merges:
        left, right = merge.split(" ")
        if left not in tokens or right not in tokens:
            raise ValueError(f"merge {merge!r} uses a symbol that is not in the vocabulary yet")
        tokens.append(left + right)
    tokens.append(END_OF_TEXT)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("tiny GPT-2 vocabulary has duplicate tokens")
    return vocab, merges


def build_tiny_gpt2_tokenizer():
    """A byte-level BPE ``GPT2TokenizerFast`` built offline (no hub access).

    ``<|endoftext|>`` is the bos, eos, unk and pad token, as in GPT-2 checkpoints used
    for batched generation; padding is on the left so prompts end where generation
    starts.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2TokenizerFast

    vocab, merges = tiny_gpt2_vocab_and_merges()
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = GPT2TokenizerFast(
        tokenizer_object=backend,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        model_max_length=1024,
        padding_side="left",
    )
    if tok.convert_tokens_to_ids(END_OF_TEXT) != len(vocab) - 1:
        raise RuntimeError("tiny GPT-2 tokenizer: <|endoftext|> did not get the last id")
    return tok


def save_tiny_gpt2(out_dir: str | Path, seed: int = 0) -> str:
    """Write a random-weight GPT-2 and its offline tokenizer as a Hugging Face folder.

    The folder loads with ``AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)``
    and ``AutoTokenizer.from_pretrained(path)``, like a downloaded checkpoint. Building
    takes well under a second and leaves the global torch RNG untouched.

    Args:
        out_dir: Folder to write (created if missing).
        seed: Seeds the weight initialisation; the same seed gives the same weights.

    Returns:
        The folder's path as a string.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_gpt2_tokenizer()
    eot = tok.eos_token_id
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=1024,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    if not (out / "model.safetensors").is_file():
        raise RuntimeError(f"tiny GPT-2 was not written as safetensors in {out}")
    (out / "README.txt").write_text(_README.format(merges=len(TINY_GPT2_MERGES), vocab=len(tok)))
    return str(out)
