"""The SD 1.x / OpenAI CLIP tokenizer, built offline from the BPE file open_clip ships.

Stable Diffusion 1.x, InstructPix2Pix and OpenAI CLIP all use the same 49,408-token
byte-level BPE vocabulary. open_clip_torch carries its merges as
``bpe_simple_vocab_16e6.txt.gz``, so a Hugging Face ``CLIPTokenizer`` that matches
``openai/clip-vit-large-patch14`` token for token can be built with no hub access.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import transformers

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
VOCAB_SIZE = 49408
NUM_MERGES = 49152 - 256 - 2
BOS_TOKEN_ID = VOCAB_SIZE - 2
EOS_TOKEN_ID = VOCAB_SIZE - 1
OFFLINE_NAME = "pixelmill/clip-tokenizer-offline"
BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"


def open_clip_bpe_path() -> Path:
    """Return the path of the gzipped BPE merges file shipped inside open_clip_torch.

    Found without importing open_clip (which pulls in torch, timm and more).
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"open_clip_torch is not installed; it ships {BPE_FILENAME}")
    path = Path(next(iter(spec.submodule_search_locations))) / BPE_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the open_clip_torch installation")
    return path


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Map each of the 256 byte values to a printable unicode symbol (GPT-2/CLIP order).

    Byte-level BPE works on these symbols rather than raw bytes so that no vocabulary
    entry is whitespace or a control character; the order fixes the first 256 ids.
    """
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def clip_vocab_and_merges(bpe_path: str | Path | None = None) -> tuple[dict[str, int], list[str]]:
    """Build the CLIP vocabulary and merge list from open_clip's BPE file.

    Args:
        bpe_path: The gzipped merges file; defaults to the one open_clip ships.

    Returns:
        ``(vocab, merges)``: token → id for all 49,408 tokens, and the 48,894 merges
        as ``"left right"`` strings in rank order.
    """
    path = Path(bpe_path) if bpe_path is not None else open_clip_bpe_path()
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    if len(merges) != NUM_MERGES:
        raise ValueError(f"{path} holds {len(merges)} merges, expected {NUM_MERGES}")
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m.split()) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"built a vocabulary of {len(vocab)} tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def write_clip_tokenizer_files(out_dir: str | Path, bpe_path: str | Path | None = None) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` (the slow-tokenizer file layout) to ``out_dir``.

    Args:
        out_dir: Folder to write into; created if missing.
        bpe_path: The gzipped merges file; defaults to the one open_clip ships.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges(bpe_path)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
    )
    return out


@lru_cache(maxsize=1)
def _cached_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    vocab, merges = clip_vocab_and_merges()
    return vocab, tuple(tuple(m.split(" ")) for m in merges)  # type: ignore[misc]


def build_clip_tokenizer() -> transformers.CLIPTokenizer:
    """Return the SD 1.x / OpenAI CLIP tokenizer, built without any network access.

    The result matches open_clip's ``SimpleTokenizer`` token for token up to the end
    token, and Hugging Face's ``openai/clip-vit-large-patch14`` tokenizer exactly (ids
    49406 = ``<|startoftext|>``, 49407 = ``<|endoftext|>``, also the pad token;
    ``model_max_length=77``). Like every Hugging Face CLIP tokenizer it does not
    apply open_clip's ftfy/HTML-unescape cleaning, so text such as ``"&amp;"`` or
    mojibake tokenizes differently from open_clip.

    The vocabulary and merges are read from open_clip's file once per process; each
    call returns a new tokenizer (about 30 ms), so callers may change it freely.
    """
    import transformers

    vocab, merges = _cached_vocab_and_merges()
    tok = transformers.CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        model_max_length=MODEL_MAX_LENGTH,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        name_or_path=OFFLINE_NAME,
    )
    if len(tok) != VOCAB_SIZE or tok.bos_token_id != BOS_TOKEN_ID or tok.eos_token_id != EOS_TOKEN_ID:
        raise RuntimeError(
            f"offline CLIP tokenizer is inconsistent: {len(tok)} tokens, "
            f"bos={tok.bos_token_id}, eos={tok.eos_token_id}"
        )
    return tok
