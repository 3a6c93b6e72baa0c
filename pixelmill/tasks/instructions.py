"""The text stage of InstructPix2Pix's dataset pipeline: captions → (instruction, edited caption).

For each input caption a writer produces an edit instruction and the caption of the
edited image, in InstructPix2Pix's format: the prompt is ``caption + "\\n##\\n"`` and the
answer is ``instruction + "\\n%%\\n" + edited_caption + "\\nEND"``. Three writers share one
interface (``write(captions, seeds) -> list[WriterAnswer]``):

- ``TemplateInstructionWriter`` (default): offline and deterministic per seed, a small
  grammar of edit types (swap an object, recolour, change material, add, remove,
  restyle, season, weather, time of day) applied to the parsed caption.
- ``TransformersInstructionWriter``: any local causal LM, sampled with the reference
  settings (temperature 0.7, top_p 1.0, OpenAI-style frequency penalty 0.1, 256 tokens,
  stop at ``"\\nEND"``), batched, one seed per row.
- ``OpenAIInstructionWriter``: any OpenAI-compatible endpoint (``/completions`` or
  ``/chat/completions``) with bounded concurrency, retries with exponential backoff, and
  a fail-fast error on bad credentials.

``InstructionStage`` turns answers into rows: ``parse_answer`` and ``filter_pair`` apply
the reference filters (exactly two parts; the edited caption differs from the input
ignoring case and punctuation; length limits), and duplicate captions within a call are
rejected (``duplicate_caption``). Every input row gives exactly one output row.
"""

from __future__ import annotations

import json

import asyncio
import inspect
import logging
import os
import random
import re
import unicodedata
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa

from pixelmill.tasks.edit import row_seed
from pixelmill.tasks.stage import STATUS_OK, STATUS_REJECT, Resources, RowError, Stage

logger = logging.getLogger(__name__)

PROMPT_SEPARATOR = "\n##\n"
ANSWER_SEPARATOR = "\n%%\n"
STOP = "\nEND"
TEMPLATE_VERSION = "template-v1"

OUTPUT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("caption", pa.string()),
        ("edit_prompt", pa.string()),
        ("edited_caption", pa.string()),
        ("raw_answer", pa.string()),
        ("writer", pa.string()),
        ("writer_model", pa.string()),
        ("seed", pa.int64()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("stage", pa.string()),
        ("shard", pa.string()),
    ]
)

CHAT_SYSTEM_PROMPT = """\
You write instructions for editing images. The user sends the caption of an image. \
Invent one plausible, visual edit of that image and reply in exactly this format, \
with no other text:
<a short instruction, e.g. "make it winter", "turn the cat into a dog", "add a rainbow">
%%
<the caption of the edited image, written like the input caption>
END

Example. Caption: a photograph of a girl riding a horse
Reply:
have her ride a dragon
%%
a photograph of a girl riding a dragon
END"""


# --------------------------------------------------------------------------- answers


@dataclass(frozen=True)
class WriterAnswer:
    """What a writer returned for one caption.

    Args:
        raw: the text the model returned (without the stop sequence when the model
            stopped on it), or None when no answer came back.
        error: None, or why there is no usable answer (``http_429_retries_exhausted``,
            ``timeout_retries_exhausted``, ``prompt_too_long``, ...).
        finish_reason: ``stop`` (stop sequence or end token), ``length`` (cut off at
            ``max_tokens``) or None when unknown.
        model: the model that answered, when the server says (an API may resolve an
            alias such as ``gpt-4o`` to a dated snapshot).
    """

    raw: str | None
    error: str | None = None
    finish_reason: str | None = None
    model: str | None = None


def normalize_caption(text: str) -> str:
    """Lower-case, drop punctuation and symbols, collapse whitespace: the key for comparisons.

    Used both for "the edited caption must differ from the input ignoring case and
    punctuation" and for deduplicating captions.
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    return " ".join(text.split())


def parse_answer(raw: str | None) -> tuple[str, str]:
    """Split a writer's answer into ``(instruction, edited_caption)``.

    The answer must split on ``"\\n%%\\n"`` into exactly two non-empty parts. Everything
    from the first ``"\\nEND"`` on is dropped (an API that honours the stop sequence has
    already removed it), as is a bare trailing ``END``; both parts are stripped.

    Raises:
        RowError: with reason ``empty_answer``, ``no_separator``, ``too_many_parts``,
            ``empty_instruction`` or ``empty_edited_caption``.
    """
    if raw is None or not raw.strip():
        raise RowError("empty_answer")
    text = raw.replace("\r\n", "\n")
    cut = text.find(STOP)
    if cut >= 0:
        text = text[:cut]
    trimmed = text.rstrip()
    if trimmed.endswith("END") and (len(trimmed) == 3 or not trimmed[-4].isalnum()):
        text = trimmed[:-3]
    parts = text.split(ANSWER_SEPARATOR)
    if len(parts) == 1:
        if text.rstrip().endswith("\n%%"):
            raise RowError("empty_edited_caption")
        if text.lstrip().startswith("%%\n"):
            raise RowError("empty_instruction")
        raise RowError("no_separator")
    if len(parts) > 2:
        raise RowError("too_many_parts")
    instruction, edited = parts[0].strip(), parts[1].strip()
    if not instruction:
        raise RowError("empty_instruction")
    if not edited:
        raise RowError("empty_edited_caption")
    return instruction, edited


def filter_pair(
    caption: str, instruction: str, edited: str, min_len: int = 2, max_len: int = 256
) -> str | None:
    """Check a parsed pair; return a reject reason, or None when it is kept.

    Reasons: ``multiline_instruction`` / ``multiline_edited_caption`` (a line break inside
    a part: not usable as a one-line prompt), ``instruction_too_short`` /
    ``instruction_too_long`` / ``edited_caption_too_short`` / ``edited_caption_too_long``
    (characters, after stripping, outside ``[min_len, max_len]``), and
    ``unchanged_caption`` (equal to the input ignoring case and punctuation).

    Args:
        caption: the input caption.
        instruction: the parsed instruction.
        edited: the parsed edited caption.
        min_len: fewest characters allowed in each part.
        max_len: most characters allowed in each part.
    """
    for name, text in (("instruction", instruction.strip()), ("edited_caption", edited.strip())):
        if "\n" in text or "\r" in text:
            return f"multiline_{name}"
        if len(text) < min_len:
            return f"{name}_too_short"
        if len(text) > max_len:
            return f"{name}_too_long"
    if normalize_caption(caption) == normalize_caption(edited):
        return "unchanged_caption"
    return None


def format_answer(instruction: str, edited: str) -> str:
    """The completion format InstructPix2Pix's GPT-3 was fine-tuned on."""
    return f"{instruction}{ANSWER_SEPARATOR}{edited}{STOP}"


# --------------------------------------------------------------------------- writers


class WriterFatalError(RuntimeError):
    """A writer problem that every row would hit (bad key, wrong URL): the stage stops."""


class WriterAuthError(WriterFatalError):
    """The endpoint refused the credentials (HTTP 401/403)."""


class InstructionWriter:
    """Base of the instruction writers: ``setup()`` once per worker, then ``write``.

    Subclasses set ``name`` and implement ``write``; ``model_name`` is the provenance
    string recorded in the ``writer_model`` column.
    """

    name: ClassVar[str] = "writer"

    def setup(self) -> None:
        """Load models or other per-worker state (idempotent)."""

    @property
    def model_name(self) -> str:
        return self.name

    def write(self, captions: list[str], seeds: list[int]) -> list[WriterAnswer]:  # pragma: no cover
        """One answer per caption, in order; ``seeds[i]`` seeds caption ``i``."""
        raise NotImplementedError


def _read_few_shot(path: str | None) -> str:
    if not path:
        return ""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"few_shot_file not found: {file}")
    text = file.read_text(encoding="utf-8")
    return text if not text or text.endswith("\n") else text + "\n"


# ----------------------------------------------------------------- template writer

_COLOURS = ("red", "blue", "green", "yellow", "purple", "pink", "orange", "black", "white",
            "golden", "silver", "brown", "gray", "grey", "turquoise")
_NEW_COLOURS = ("red", "blue", "green", "yellow", "purple", "pink", "orange", "golden", "silver", "turquoise")
_MATERIALS = {"wooden": "wood", "metal": "metal", "metallic": "metal", "glass": "glass", "stone": "stone",
              "marble": "marble", "plastic": "plastic", "ceramic": "ceramic", "bronze": "bronze",
              "brick": "brick", "steel": "steel", "iron": "iron", "crystal": "crystal",
              "paper": "paper"}
_NEW_MATERIALS = ("wooden", "metal", "glass", "stone", "marble", "bronze", "crystal")

_SWAPS: dict[str, tuple[str, ...]] = {
    "man": ("woman", "robot", "astronaut"), "woman": ("man", "robot", "queen"),
    "boy": ("girl", "robot"), "girl": ("boy", "robot"), "person": ("robot", "astronaut"),
    "cat": ("dog", "tiger", "fox"), "dog": ("cat", "wolf", "fox"), "horse": ("zebra", "unicorn", "camel"),
    "cow": ("horse", "buffalo"), "bird": ("parrot", "owl", "eagle"), "duck": ("swan", "goose"),
    "lion": ("tiger", "bear"), "tiger": ("lion", "leopard"), "bear": ("panda", "lion"),
    "elephant": ("rhinoceros", "mammoth"), "giraffe": ("zebra", "dinosaur"), "rabbit": ("squirrel", "kitten"),
    "fox": ("wolf", "cat"), "owl": ("eagle", "parrot"), "squirrel": ("rabbit", "chipmunk"),
    "wolf": ("fox", "husky"), "puppy": ("kitten",), "kitten": ("puppy",), "monkey": ("gorilla", "panda"),
    "penguin": ("seal", "polar bear"), "parrot": ("owl", "toucan"), "deer": ("moose", "unicorn"),
    "car": ("bicycle", "truck", "horse carriage"), "bicycle": ("motorcycle", "scooter"),
    "bike": ("motorcycle", "scooter"), "motorcycle": ("bicycle", "scooter"), "bus": ("tram", "train"),
    "truck": ("tractor", "bus"), "boat": ("canoe", "sailboat", "gondola"), "ship": ("pirate ship", "sailboat"),
    "train": ("tram", "bus"), "airplane": ("hot air balloon", "helicopter"), "plane": ("helicopter", "dragon"),
    "tractor": ("truck",), "van": ("truck", "bus"),
    "apple": ("orange", "pear", "peach"), "banana": ("cucumber", "carrot"), "pizza": ("cake", "pie"),
    "cake": ("pizza", "pie"), "burger": ("sandwich", "taco"), "sandwich": ("burger", "taco"),
    "donut": ("bagel", "muffin"), "coffee": ("tea", "hot chocolate"), "tea": ("coffee", "lemonade"),
    "strawberry": ("cherry", "raspberry"), "salad": ("pasta", "soup"), "soup": ("salad", "curry"),
    "pasta": ("salad", "rice"), "cupcake": ("muffin", "donut"), "lemon": ("lime", "orange"),
    "pancake": ("waffle",), "cookie": ("cracker", "muffin"),
    "chair": ("armchair", "stool", "throne"), "table": ("desk",), "sofa": ("bench", "bed"),
    "couch": ("bench", "bed"), "lamp": ("candle", "lantern"), "book": ("laptop", "newspaper"),
    "cup": ("mug", "bowl"), "mug": ("cup", "teapot"), "vase": ("bowl", "jar"), "bottle": ("jar", "vase"),
    "clock": ("mirror", "painting"), "hat": ("crown", "helmet"), "umbrella": ("parasol", "kite"),
    "guitar": ("violin", "ukulele"), "piano": ("harp", "organ"), "house": ("castle", "cabin", "lighthouse"),
    "castle": ("palace", "cathedral"), "tree": ("palm tree", "cherry tree"), "flower": ("rose", "sunflower", "tulip"),
    "rose": ("tulip", "sunflower"), "mountain": ("volcano",), "church": ("castle", "mosque"),
    "tower": ("lighthouse", "pagoda"), "window": ("door", "mirror"), "bed": ("hammock", "sofa"),
}

_IRREGULAR_PLURALS = {"man": "men", "woman": "women", "child": "children", "person": "people",
                      "wolf": "wolves", "deer": "deer", "sheep": "sheep", "fish": "fish", "mouse": "mice",
                      "knife": "knives", "leaf": "leaves", "shelf": "shelves", "scarf": "scarves",
                      "moose": "moose", "buffalo": "buffaloes", "tomato": "tomatoes", "potato": "potatoes",
                      "rhinoceros": "rhinoceroses", "volcano": "volcanoes", "hero": "heroes"}

_NOT_A_COLOUR_BEFORE = {"retriever", "hour", "gate", "carpet", "hole", "jeans", "wine", "pepper", "eagle",
                        "bear", "widow", "belt", "dwarf", "giant", "age", "rule", "ratio"}
_COMPOUND_BEFORE = {"teddy", "polar", "sea", "hot", "guinea", "toy"}
_WEARING_ANIMALS = {"cat", "dog", "puppy", "kitten", "horse", "bear", "monkey", "penguin", "rabbit", "fox",
                    "lion", "tiger", "elephant", "giraffe", "cow", "goat", "pig", "panda", "koala", "owl",
                    "parrot", "duck", "frog", "sheep", "zebra", "camel", "wolf", "squirrel", "deer", "turtle"}
_POSSESSIVES = {"its", "his", "her", "their", "my", "our", "your"}
_PEOPLE = {"man", "woman", "boy", "girl", "child", "person", "lady", "gentleman", "chef", "soldier",
           "king", "queen", "baby", "student", "teenager", "farmer", "musician", "dancer", "surfer",
           "skier", "skateboarder", "player", "doctor", "astronaut", "robot"}
_ANIMALS = {"cat", "dog", "horse", "cow", "bird", "duck", "lion", "tiger", "bear", "elephant", "giraffe",
            "rabbit", "fox", "owl", "squirrel", "wolf", "puppy", "kitten", "goat", "monkey", "penguin",
            "parrot", "deer", "zebra", "panda", "pig", "sheep", "frog", "turtle", "camel", "koala"}
_COLOURABLE = {"car", "bicycle", "bike", "motorcycle", "bus", "truck", "boat", "ship", "train", "airplane",
               "plane", "tractor", "van", "chair", "table", "sofa", "couch", "lamp", "cup", "mug", "vase",
               "bottle", "hat", "umbrella", "dress", "shirt", "jacket", "coat", "scarf", "door", "house",
               "bench", "kite", "balloon", "guitar", "teapot", "bowl", "bag", "backpack", "tent", "sweater",
               "flower", "rose", "tulip", "bird", "parrot", "fence", "wall", "roof", "barn", "sky", "bed",
               "pillow", "curtains", "scooter", "helmet", "sneakers", "shoes"}
_MATERIALABLE = {"chair", "table", "bench", "vase", "bowl", "cup", "mug", "statue", "sculpture", "bridge",
                 "door", "house", "box", "spoon", "clock", "bottle", "plate", "boat", "teapot", "lamp",
                 "tower", "fence", "desk", "bed", "shelf", "stool", "throne", "cabin", "guitar", "horse"}
_SWEET = {"cake", "cupcake", "donut", "doughnut", "ice cream", "pancakes", "pancake", "dessert", "pie",
          "cookies", "cookie", "waffles", "waffle", "muffin", "cheesecake", "brownie", "pudding"}
_SAVOURY = {"pizza", "salad", "soup", "burger", "sandwich", "pasta", "noodles", "steak", "sushi",
            "breakfast", "eggs", "bread", "toast", "tacos", "taco", "curry", "rice", "omelette", "spaghetti"}
_OUTDOOR = {"street", "road", "beach", "mountain", "mountains", "field", "fields", "park", "forest", "woods",
            "lake", "river", "city", "garden", "sky", "sea", "ocean", "landscape", "village", "meadow",
            "hill", "hills", "valley", "desert", "bridge", "harbor", "harbour", "countryside", "farm",
            "trail", "path", "waterfall", "island", "coast", "shore", "outside", "outdoors", "yard",
            "square", "town", "skyline", "canyon", "cliff", "cliffs", "castle", "lighthouse", "highway",
            "pier", "dock", "campsite", "grass", "snow", "lawn", "backyard", "alley", "avenue", "sidewalk",
            "stadium", "runway", "bay", "pond", "glacier", "volcano", "jungle", "savanna", "prairie",
            "vineyard", "orchard", "temple", "ruins", "cathedral", "church", "tower", "windmill", "barn"}
_INTERIOR = {"room", "kitchen", "bedroom", "living room", "bathroom", "office", "library", "restaurant",
             "cafe", "café", "hallway", "interior", "studio", "classroom", "fireplace", "bed", "desk",
             "sofa", "couch", "shelf", "bookshelf", "counter", "lobby", "attic", "cellar"}

_STYLE_PREFIX = re.compile(
    r"^(?:(?:a|an|the)\s+)?(?:[\w'-]+\s+){0,3}?"
    r"(?:painting|drawing|sketch|illustration|photo|photograph|picture|image|render|rendering|poster|"
    r"print|portrait|mosaic|engraving|artwork|shot|snapshot|still)\s+of\s+",
    re.IGNORECASE,
)
_STYLES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("a watercolor painting", ("make it a watercolor painting", "turn it into a watercolor painting")),
    ("an oil painting", ("make it an oil painting", "turn it into an oil painting")),
    ("a pencil sketch", ("make it a pencil sketch", "turn it into a pencil sketch")),
    ("a charcoal drawing", ("make it a charcoal drawing",)),
    ("a mosaic", ("make it a mosaic", "turn it into a mosaic")),
    ("a stained glass window", ("make it a stained glass window",)),
    ("a ukiyo-e woodblock print", ("make it a ukiyo-e print", "turn it into a ukiyo-e woodblock print")),
    ("a pixel art image", ("make it pixel art", "turn it into pixel art")),
    ("a claymation still", ("make it claymation", "turn it into claymation")),
)
_STYLE_SUFFIXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("in the style of Van Gogh", ("make it look like a Van Gogh painting", "paint it in the style of Van Gogh")),
    ("in anime style", ("make it anime", "make it look like an anime")),
    ("in the style of a Pixar movie", ("make it look like a Pixar movie",)),
)
_SEASONS = ("winter", "autumn", "spring", "summer")
_SEASON_PHRASE = re.compile(r"\b(in|during)\s+(?:the\s+)?(winter|summer|spring|autumn|fall)\b", re.IGNORECASE)
_WEATHER: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("rain", "in the rain", ("make it rain", "make it rainy", "add rain")),
    ("snow", "in the snow", ("make it snow", "add snow", "make it snowy")),
    ("fog", "in thick fog", ("make it foggy", "add fog")),
    ("storm", "during a storm", ("make it stormy", "add a storm")),
)
_WEATHER_PHRASE = re.compile(
    r"\b(in the (?:rain|snow|fog|mist)|in thick fog|on a (?:rainy|snowy|foggy|sunny|cloudy) day|"
    r"during a (?:thunderstorm|storm|snowstorm|blizzard))\b",
    re.IGNORECASE,
)
_TIMES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("night", "at night", ("make it night", "make it nighttime", "make it night time")),
    ("sunset", "at sunset", ("make it sunset", "make it golden hour at sunset")),
    ("dawn", "at dawn", ("make it dawn", "make it early morning at dawn")),
    ("day", "during the day", ("make it daytime", "make it day")),
)
_TIME_PHRASE = re.compile(
    r"\b(at (?:night|sunset|sunrise|dawn|dusk|noon|twilight)|during the day|in the (?:morning|evening)|"
    r"at night time|by night)\b",
    re.IGNORECASE,
)
_WEARABLES: tuple[tuple[str, str], ...] = (
    ("a hat", "hats"), ("sunglasses", "sunglasses"), ("a crown", "crowns"), ("a red scarf", "red scarves"),
    ("a bow tie", "bow ties"), ("a cowboy hat", "cowboy hats"),
)
_SKY_ADDITIONS: tuple[tuple[str, str], ...] = (
    ("a rainbow", "a rainbow in the sky"), ("a hot air balloon", "a hot air balloon in the sky"),
    ("fireworks", "fireworks in the sky"), ("a flock of birds", "a flock of birds in the sky"),
)
_SWEET_ADDITIONS: tuple[tuple[str, str], ...] = (
    ("strawberries", "topped with strawberries"), ("sprinkles", "covered in sprinkles"),
    ("chocolate sauce", "drizzled with chocolate sauce"), ("a candle", "with a lit candle on top"),
)
_SAVOURY_ADDITIONS: tuple[tuple[str, str], ...] = (
    ("basil", "garnished with fresh basil"), ("a fried egg", "topped with a fried egg"),
    ("chili peppers", "with red chili peppers"), ("a slice of lemon", "with a slice of lemon"),
)
_INTERIOR_ADDITIONS: tuple[tuple[str, str], ...] = (
    ("a potted plant", "a potted plant"), ("a sleeping cat", "a sleeping cat"),
    ("a vase of flowers", "a vase of flowers"), ("fairy lights", "fairy lights"),
)
_NP_STOP = {"in", "on", "at", "under", "near", "next", "by", "behind", "beside", "above", "below", "over",
            "from", "of", "for", "to", "while", "who", "that", "which", "is", "are", "was", "were", "and",
            "with", "as", "into", "onto", "through", "across", "along", "against", "during", "the", "a", "an"}
_DETERMINERS = {"a", "an", "the", "some", "two", "three", "four", "five", "several", "many", "his", "her",
                "its", "their", "lots"}
_ING_NOUNS = {"ring", "king", "wing", "thing", "building", "painting", "ceiling", "string", "swing",
              "spring", "pudding", "wedding", "clothing", "earring", "icing", "frosting", "stuffing"}

EDIT_TYPES: tuple[str, ...] = (
    "replace_object", "change_colour", "change_material", "add_object", "remove_object",
    "change_style", "change_season", "change_weather", "change_time_of_day",
)


def _plural(noun: str) -> str:
    *head, last = noun.split(" ")
    if last in _IRREGULAR_PLURALS:
        out = _IRREGULAR_PLURALS[last]
    elif last.endswith(("s", "x", "z", "ch", "sh")):
        out = last + "es"
    elif last.endswith("y") and len(last) > 1 and last[-2] not in "aeiou":
        out = last[:-1] + "ies"
    else:
        out = last + "s"
    return " ".join([*head, out])


def _article(word: str) -> str:
    w = word.lower()
    if w.startswith(("uni", "use", "usu", "eu", "one", "ukulele", "ufo")):
        return "a"
    if w.startswith(("hour", "honest", "honou", "heir")):
        return "an"
    return "an" if w[:1] in "aeiou" else "a"


def _the(noun_phrase: str) -> str:
    return f"the {noun_phrase}"


def _with_article(noun: str, plural: bool) -> str:
    return noun if plural else f"{_article(noun)} {noun}"


def _match_case(template: str, word: str) -> str:
    if template.isupper() and len(template) > 1:
        return word.upper()
    if template[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def _word_regex(words: Sequence[str]) -> re.Pattern[str]:
    alts = sorted(set(words), key=len, reverse=True)
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in alts) + r")\b", re.IGNORECASE)


def _nouns_with_plurals(words: set[str]) -> dict[str, tuple[str, bool]]:
    """Surface form → (singular, is_plural) for a set of singular nouns."""
    out: dict[str, tuple[str, bool]] = {}
    for w in words:
        out[w] = (w, False)
        p = _plural(w)
        if p != w:
            out[p] = (w, True)
    return out


_SWAP_FORMS = _nouns_with_plurals(set(_SWAPS))
_SWAP_RE = _word_regex(list(_SWAP_FORMS))
_PEOPLE_ANIMAL_FORMS = _nouns_with_plurals(_PEOPLE | _ANIMALS)
_PEOPLE_ANIMAL_RE = _word_regex(list(_PEOPLE_ANIMAL_FORMS))
_WEARER_FORMS = _nouns_with_plurals(_PEOPLE | _WEARING_ANIMALS)
_WEARER_RE = _word_regex(list(_WEARER_FORMS))
_COLOURABLE_FORMS = _nouns_with_plurals(_COLOURABLE)
_COLOURABLE_RE = _word_regex(list(_COLOURABLE_FORMS))
_MATERIALABLE_FORMS = _nouns_with_plurals(_MATERIALABLE)
_MATERIALABLE_RE = _word_regex(list(_MATERIALABLE_FORMS))
_COLOUR_RE = _word_regex(_COLOURS)
_MATERIAL_RE = _word_regex(list(_MATERIALS))
_SWEET_RE = _word_regex(list(_SWEET))
_SAVOURY_RE = _word_regex(list(_SAVOURY))
_OUTDOOR_RE = _word_regex(list(_OUTDOOR))
_INTERIOR_RE = _word_regex(list(_INTERIOR))
_KNOWN_NOUNS = (set(_SWAP_FORMS) | set(_PEOPLE_ANIMAL_FORMS) | set(_COLOURABLE_FORMS) | set(_MATERIALABLE_FORMS)
                | _SWEET | _SAVOURY | {"collar", "leash", "flowers", "trees", "candles", "fruit", "hat",
                                       "ball", "toy", "dog", "tie", "glasses", "balloons", "clouds"})
_ARTICLE_BEFORE = re.compile(r"\b(a|an)\s+$", re.IGNORECASE)


def _usable(text: str, m: re.Match[str]) -> bool:
    """A word match the grammar may edit: not a capitalised word inside the caption (a name
    such as "Golden Gate" or "Apple"), and not the tail of a compound ("teddy bear")."""
    start = m.start(1)
    if start > 0 and text[start].isupper():
        return False
    before = text[:start].split()
    return not (before and before[-1].lower() in _COMPOUND_BEFORE)


def _matches(pattern: re.Pattern[str], text: str) -> list[re.Match[str]]:
    return [m for m in pattern.finditer(text) if _usable(text, m)]


def _insert(text: str, pos: int, new: str) -> str:
    """Insert ``new`` at ``pos`` and fix an ``a``/``an`` right before it."""
    head, tail = text[:pos], text[pos:]
    m = _ARTICLE_BEFORE.search(head)
    if m:
        head = head[: m.start(1)] + _match_case(m.group(1), _article(new)) + head[m.end(1):]
    return head + new + tail


def _replace(text: str, start: int, end: int, new: str) -> str:
    """Replace ``text[start:end]`` with ``new`` (case matched) and fix the article before it."""
    return _insert(text[:start] + text[end:], start, _match_case(text[start:end], new))


def _words_of(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def _clean_caption(caption: str) -> str:
    return " ".join(caption.split()).rstrip(" .!;:,")


@dataclass(frozen=True)
class TemplateEdit:
    """One edit the template grammar made: its type, the instruction and the edited caption."""

    kind: str
    instruction: str
    edited: str


class TemplateInstructionWriter(InstructionWriter):
    """Offline instruction writer: a small grammar of edit types, deterministic per seed.

    The caption is scanned for words the grammar knows (nouns it can swap, colours,
    materials, people and animals, food, outdoor and indoor scenes, ``with X``/``and X``
    phrases, artwork prefixes such as "an oil painting of"). Of the edit types that apply,
    one is picked by the row's seed (``random.Random(seed)``, stable across platforms and
    Python versions), as are its wording and its new value. Restyling applies to every
    caption, so every non-empty caption gets an edit. Answers use the LLM format
    (``instruction\\n%%\\nedited caption\\nEND``).

    Args:
        edits: the edit types to choose from (default: all of ``EDIT_TYPES``). A caption
            none of them applies to gets the error ``no_applicable_edit``.
    """

    name = "template"

    def __init__(self, edits: Sequence[str] | None = None) -> None:
        chosen = tuple(edits) if edits is not None else EDIT_TYPES
        unknown = [e for e in chosen if e not in EDIT_TYPES]
        if unknown or not chosen:
            raise ValueError(f"writer_options.edits: unknown or empty {unknown or chosen!r}; "
                             f"choose from {', '.join(EDIT_TYPES)}")
        self.edits = chosen

    def __repr__(self) -> str:
        return f"TemplateInstructionWriter(edits={list(self.edits)!r})"

    @property
    def model_name(self) -> str:
        return TEMPLATE_VERSION

    def write(self, captions: list[str], seeds: list[int]) -> list[WriterAnswer]:
        out = []
        for caption, seed in zip(captions, seeds, strict=True):
            edit = self.write_one(caption, seed)
            if edit is None:
                out.append(WriterAnswer(raw=None, error="no_applicable_edit"))
            else:
                out.append(WriterAnswer(raw=format_answer(edit.instruction, edit.edited), finish_reason="stop"))
        return out

    def write_one(self, caption: str, seed: int) -> TemplateEdit | None:
        """The edit for one caption and seed, or None when no allowed edit type applies."""
        text = _clean_caption(caption)
        if not text:
            return None
        rng = random.Random(seed)
        kinds = list(self.edits)
        rng.shuffle(kinds)
        for kind in kinds:
            result = getattr(self, f"_{kind}")(text, random.Random(rng.getrandbits(64)))
            if result is not None and normalize_caption(result[1]) != normalize_caption(text):
                return TemplateEdit(kind, result[0], result[1])
        return None

    # Each edit returns (instruction, edited caption) or None when it does not apply.

    def _replace_object(self, text: str, rng: random.Random) -> tuple[str, str] | None:
        matches = _matches(_SWAP_RE, text)
        if not matches:
            return None
        m = rng.choice(matches)
        singular, plural = _SWAP_FORMS[m.group(1).lower()]
        new = rng.choice(_SWAPS[singular])
        old_np, new_np = (m.group(1).lower(), _plural(new)) if plural else (singular, new)
        edited = _replace(text, m.start(1), m.end(1), new_np)
        target = _with_article(new_np, plural)
        instruction = rng.choice((
            f"turn {_the(old_np)} into {target}", f"replace {_the(old_np)} with {target}",
            f"make {_the(old_np)} {target}", f"swap {_the(old_np)} for {target}",
        ))
        return instruction, edited

    def _change_colour(self, text: str, rng: random.Random) -> tuple[str, str] | None:
        for m in _matches(_COLOUR_RE, text):
            after = text[m.end(1):].split()
            before = text[: m.start(1)].split()
            if (after and after[0].lower() == "and") or (before and before[-1].lower() == "and"):
                continue
            if after and after[0].lower().strip(",.;:") in _NOT_A_COLOUR_BEFORE:
                continue
            if m.group(1).lower() == "orange" and (not after or after[0].lower() in _NP_STOP):
                continue
            old = m.group(1).lower()
            new = rng.choice([c for c in _NEW_COLOURS if c != old and {c, old} != {"gray", "grey"}])
            noun = re.sub(r"[^\w-]", "", after[0]).lower() if after and after[0].lower() not in _NP_STOP else ""
            if noun.isalpha():
                wordings = (f"make {_the(noun)} {new}", f"change the color of {_the(noun)} to {new}",
                            f"paint {_the(noun)} {new}")
            else:
                wordings = (f"make it {new}", f"change the color to {new}", f"paint it {new}")
            return rng.choice(wordings), _replace(text, m.start(1), m.end(1), new)
        matches = _matches(_COLOURABLE_RE, text)
        if not matches:
            return None
        m = rng.choice(matches)
        noun = m.group(1).lower()
        new = rng.choice(_NEW_COLOURS)
        instruction = rng.choice((f"make {_the(noun)} {new}", f"paint {_the(noun)} {new}",
                                  f"change the color of {_the(noun)} to {new}"))
        pos = m.start(1)
        material = re.search(r"\b(" + "|".join(_MATERIALS) + r")\s+$", text[:pos], re.IGNORECASE)
        if material:
            pos = material.start(1)
        return instruction, _insert(text, pos, new + " ")

    def _change_material(self, text: str, rng: random.Random) -> tuple[str, str] | None:
        for m in _matches(_MATERIAL_RE, text):
            after = text[m.end(1):].split()
            if not after or after[0].lower() in _NP_STOP or not after[0].isalpha():
                continue
            old = m.group(1).lower()
            new = rng.choice([x for x in _NEW_MATERIALS if _MATERIALS[x] != _MATERIALS[old]])
            noun = after[0].lower()
            instruction = rng.choice((f"make {_the(noun)} out of {_MATERIALS[new]}",
                                      f"make {_the(noun)} {new} instead", f"turn {_the(noun)} into {_MATERIALS[new]}"))
            return instruction, _replace(text, m.start(1), m.end(1), new)
        matches = _matches(_MATERIALABLE_RE, text)
        if not matches:
            return None
        m = rng.choice(matches)
        noun = m.group(1).lower()
        new = rng.choice(_NEW_MATERIALS)
        instruction = rng.choice((f"make {_the(noun)} out of {_MATERIALS[new]}", f"make {_the(noun)} {new}",
                                  f"turn {_the(noun)} into {_MATERIALS[new]}"))
        return instruction, _insert(text, m.start(1), new + " ")

    def _add_object(self, text: str, rng: random.Random) -> tuple[str, str] | None:
        present = _words_of(text)

        def fresh(items: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
            return [it for it in items if it[0].split()[-1] not in present]

        options: list[Callable[[], tuple[str, str]]] = []
        beings = _matches(_WEARER_RE, text)
        wearables = fresh(_WEARABLES)
        if beings and wearables and not re.search(r"\b(wearing|flock|herd|swarm|school)\b", text, re.IGNORECASE):
            being = beings[0]

            def wear() -> tuple[str, str]:
                noun = being.group(1).lower()
                single, many = rng.choice(wearables)
                item = many if _WEARER_FORMS[noun][1] else single
                instruction = rng.choice((f"put {item} on {_the(noun)}", f"give {_the(noun)} {item}",
                                          f"have {_the(noun)} wear {item}", f"add {item}"))
                return instruction, text[: being.end(1)] + f" wearing {item}" + text[being.end(1):]
            options.append(wear)
        joiner = " and " if "with" in present else " with "
        garnishes = fresh(_SWEET_ADDITIONS if _SWEET_RE.search(text) else _SAVOURY_ADDITIONS)
        if (_SWEET_RE.search(text) or _SAVOURY_RE.search(text)) and garnishes:
            def garnish() -> tuple[str, str]:
                item, phrase = rng.choice(garnishes)
                instruction = rng.choice((f"add {item}", f"put {item} on it", f"add {item} on top"))
                edited = text + joiner + phrase[5:] if phrase.startswith("with ") else f"{text} {phrase}"
                return instruction, edited
            options.append(garnish)
        sky_items = fresh(_SKY_ADDITIONS)
        if _OUTDOOR_RE.search(text) and sky_items:
            def sky() -> tuple[str, str]:
                item, phrase = rng.choice(sky_items)
                instruction = rng.choice((f"add {item}", f"put {item} in the sky", f"add {item} to the sky"))
                return instruction, text + joiner + (item if "sky" in present else phrase)
            options.append(sky)
        room_items = fresh(_INTERIOR_ADDITIONS)
        if _INTERIOR_RE.search(text) and room_items:
            def room() -> tuple[str, str]:
                item, phrase = rng.choice(room_items)
                instruction = rng.choice((f"add {item}", f"put {item} in the room", f"include {item}"))
                return instruction, text + joiner + phrase
            options.append(room)
        return rng.choice(options)() if options else None

    def _remove_object(self, text: str, rng: random.Random) -> tuple[str, str] | None:
        candidates = []
        for m in re.finditer(r"\s+(with|and)\s+", text, re.IGNORECASE):
            conj = m.group(1).lower()
            before = text[: m.start()].split()
            if not before or (conj == "and" and before[-1].lower() in set(_COLOURS) | {"black", "white"}):
                continue
            rest = text[m.end():]
            words: list[str] = []
            for raw_word in rest.split(" "):
                w = raw_word.lower()
                bare = w.rstrip(",.;:!")
                if words and (bare in _NP_STOP or (bare.endswith("ing") and bare not in _ING_NOUNS)):
                    break
                if not words and bare in _NP_STOP - _DETERMINERS:
                    break
                words.append(raw_word.rstrip(",.;:!"))
                if raw_word != raw_word.rstrip(",.;:!") or len(words) > 5:
                    break
            if not words or len(words) > 5:
                continue
            head = words[-1].lower()
            if not head.isalpha() or head in _DETERMINERS:
                continue
            if words[0].lower() not in _DETERMINERS and head not in _KNOWN_NOUNS:
                continue
            if conj == "and" and words[0].lower() not in _DETERMINERS and head not in _KNOWN_NOUNS:
                continue
            np_text = " ".join(words)
            end = m.end() + len(np_text)
            tail = text[end:].split()
            if len(tail) >= 3 and tail[0].lower() in _NP_STOP and tail[1].lower() in _POSSESSIVES:
                pp = re.match(r"\s+\S+\s+\S+\s+[\w-]+", text[end:])
                if pp:
                    end += pp.end()
            candidates.append((m.start(), end, head))
        if not candidates:
            return None
        start, end, head = rng.choice(candidates)
        edited = (text[:start] + text[end:]).strip()
        if head in _words_of(edited):
            return None
        subject = edited.split()
        if (subject and subject[0].lower() in ("a", "an")
                and re.match(r"^\s+are\b", text[end:], re.IGNORECASE)):
            edited = re.sub(r"\bare\b", "is", edited, count=1)
        if len(normalize_caption(edited)) < 3:
            return None
        instruction = rng.choice((f"remove the {head}", f"take away the {head}", f"get rid of the {head}",
                                  f"without the {head}"))
        return instruction, edited

    def _change_style(self, text: str, rng: random.Random) -> tuple[str, str] | None:
        m = _STYLE_PREFIX.match(text)
        subject = text[m.end():] if m else text
        if not subject.strip():
            return None
        if not m and rng.random() < 0.25 and not re.search(r"\bstyle\b", text, re.IGNORECASE):
            phrase, instructions = rng.choice(_STYLE_SUFFIXES)
            return rng.choice(instructions), f"{text} {phrase}"
        prefix = m.group(0).lower() if m else ""
        styles = [s for s in _STYLES if s[0].split()[-1] not in prefix or s[0].split()[1] not in prefix]
        noun_phrase, instructions = rng.choice(styles)
        if subject[:1].isupper() and not subject[:2].isupper() and subject.split()[0].lower() in _DETERMINERS:
            subject = subject[:1].lower() + subject[1:]
        return rng.choice(instructions), f"{noun_phrase} of {subject}"

    def _change_season(self, text: str, rng: random.Random) -> tuple[str, str] | None:
        m = _SEASON_PHRASE.search(text)
        if m:
            old = "autumn" if m.group(2).lower() == "fall" else m.group(2).lower()
            new = rng.choice([s for s in _SEASONS if s != old])
            return (rng.choice((f"make it {new}", f"change the season to {new}", f"make it {new} instead")),
                    text[: m.start(2)] + new + text[m.end(2):])
        if not _OUTDOOR_RE.search(text) or _INTERIOR_RE.search(text) or re.search(r"\bsnow", text, re.IGNORECASE):
            return None
        new = rng.choice(_SEASONS[:3])
        return (rng.choice((f"make it {new}", f"change the season to {new}", f"have it be {new}")),
                f"{text} in {new}")

    def _change_weather(self, text: str, rng: random.Random) -> tuple[str, str] | None:
        m = _WEATHER_PHRASE.search(text)
        if m:
            choices = [w for w in _WEATHER if w[0] not in m.group(1).lower()]
            _, phrase, instructions = rng.choice(choices)
            return rng.choice(instructions), text[: m.start(1)] + phrase + text[m.end(1):]
        if not _OUTDOOR_RE.search(text) or _INTERIOR_RE.search(text):
            return None
        if re.search(r"\b(rain|rainy|snow|snowy|fog|foggy|storm|stormy|mist|misty)\b", text, re.IGNORECASE):
            return None
        _, phrase, instructions = rng.choice(_WEATHER)
        return rng.choice(instructions), f"{text} {phrase}"

    def _change_time_of_day(self, text: str, rng: random.Random) -> tuple[str, str] | None:
        m = _TIME_PHRASE.search(text)
        if m:
            choices = [t for t in _TIMES if t[0] not in m.group(1).lower()]
            _, phrase, instructions = rng.choice(choices)
            return rng.choice(instructions), text[: m.start(1)] + phrase + text[m.end(1):]
        scene = _OUTDOOR_RE.search(text) or _PEOPLE_ANIMAL_RE.search(text) or _INTERIOR_RE.search(text)
        vehicle = re.search(r"\b(car|cars|bus|train|boat|ship|truck|bicycle|motorcycle)\b", text, re.IGNORECASE)
        if not (scene or vehicle):
            return None
        _, phrase, instructions = rng.choice(_TIMES[:3])
        return rng.choice(instructions), f"{text} {phrase}"


# ------------------------------------------------------------- transformers writer


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


# ------------------------------------------------------------------- openai writer

SleepFn = Callable[[float], Awaitable[None]]


def _safe_url(url: str) -> str:
    """The URL without user:password, for messages and reprs."""
    return re.sub(r"//[^/@]*@", "//", url)


class OpenAIInstructionWriter(InstructionWriter):
    """Writes instructions through any OpenAI-compatible HTTP API (OpenAI, vLLM, TGI, llama.cpp...).

    ``api="completions"`` POSTs ``{base_url}/completions`` with the InstructPix2Pix prompt
    (few-shot prefix + caption + ``"\\n##\\n"``) and the reference sampling settings;
    ``api="chat"`` POSTs ``{base_url}/chat/completions`` with a system message that
    explains the answer format (plus the few-shot text, if any) and the caption as the
    user message. Requests run concurrently (at most ``concurrency`` at a time) on an
    ``httpx.AsyncClient``; 429, 5xx, timeouts and connection errors are retried up to
    ``retries`` times, waiting ``backoff * 2**k`` seconds (capped at ``max_backoff``; a
    ``Retry-After`` header in seconds wins when present). Exhausted retries give the row
    the error ``<cause>_retries_exhausted`` (``http_429``, ``http_503``, ``timeout``,
    ``connection_error``). Other 4xx answers are row errors ``http_<code>``.
    401/403 raise ``WriterAuthError`` and 404 raises ``WriterFatalError`` at once (every
    row would fail), cancelling the other requests.

    The API key is read from the environment variable ``api_key_env`` when each batch
    starts and is sent only as ``Authorization: Bearer``; it is never stored on the
    writer, logged, or put into errors or reprs. Without the variable, requests go out
    without authorization (fine for a local server).

    Args:
        base_url: API root, e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``.
        model: model name sent with each request.
        api: ``completions`` or ``chat``.
        api_key_env: name of the environment variable holding the key.
        max_tokens, temperature, top_p, frequency_penalty: sampling settings (the
            InstructPix2Pix reference values by default).
        concurrency: most requests in flight at once.
        timeout: seconds per request.
        retries: retries after the first attempt.
        backoff: first retry delay in seconds; doubles each retry.
        max_backoff: longest wait between attempts.
        few_shot_file: text prepended to completion prompts / added to the chat system message.
        system_prompt: replaces the built-in chat system message.
        send_seed: send the row seed as ``seed`` (for servers that honour it, e.g. vLLM).
        sleep: async sleep used between retries (tests inject a recorder).
    """

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api: str = "completions",
        api_key_env: str = "OPENAI_API_KEY",
        max_tokens: int = 256,
        temperature: float = 0.7,
        top_p: float = 1.0,
        frequency_penalty: float = 0.1,
        concurrency: int = 8,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        few_shot_file: str | None = None,
        system_prompt: str | None = None,
        send_seed: bool = False,
        sleep: SleepFn | None = None,
    ) -> None:
        if not base_url or not model:
            raise ValueError("writer_options.base_url and writer_options.model are required for writer 'openai'")
        if api not in ("completions", "chat"):
            raise ValueError(f"writer_options.api must be 'completions' or 'chat', not {api!r}")
        if concurrency < 1 or retries < 0 or timeout <= 0 or backoff < 0:
            raise ValueError("writer_options: need concurrency >= 1, retries >= 0, timeout > 0, backoff >= 0")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api = api
        self.api_key_env = api_key_env
        self.max_tokens = int(max_tokens)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.frequency_penalty = float(frequency_penalty)
        self.concurrency = int(concurrency)
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.few_shot_file = few_shot_file
        self.system_prompt = system_prompt
        self.send_seed = bool(send_seed)
        self._sleep: SleepFn = sleep or asyncio.sleep
        self._prefix: str | None = None
        self.requests_made = 0

    def __repr__(self) -> str:
        return (f"OpenAIInstructionWriter(base_url={_safe_url(self.base_url)!r}, model={self.model!r}, "
                f"api={self.api!r}, api_key_env={self.api_key_env!r})")

    @property
    def model_name(self) -> str:
        return self.model

    def setup(self) -> None:
        if self._prefix is None:
            self._prefix = _read_few_shot(self.few_shot_file)

    @property
    def url(self) -> str:
        return f"{self.base_url}/{'chat/completions' if self.api == 'chat' else 'completions'}"

    def request_body(self, caption: str, seed: int | None = None) -> dict[str, Any]:
        """The JSON body sent for one caption."""
        self.setup()
        body: dict[str, Any] = {"model": self.model}
        if self.api == "chat":
            system = self.system_prompt or CHAT_SYSTEM_PROMPT
            if self._prefix:
                system += ("\n\nMore examples, each written as caption, ##, instruction, %%, "
                           "edited caption, END:\n\n" + self._prefix)
            body["messages"] = [{"role": "system", "content": system}, {"role": "user", "content": caption}]
        else:
            body["prompt"] = (self._prefix or "") + caption + PROMPT_SEPARATOR
        body.update(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                    frequency_penalty=self.frequency_penalty, stop=[STOP])
        if self.send_seed and seed is not None:
            body["seed"] = int(seed) % 2**31
        return body

    def write(self, captions: list[str], seeds: list[int]) -> list[WriterAnswer]:
        """Run ``awrite`` to completion (on a helper thread if this thread already runs an event loop)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.awrite(captions, seeds))
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(asyncio.run, self.awrite(captions, seeds)).result()

    async def awrite(self, captions: list[str], seeds: list[int]) -> list[WriterAnswer]:
        """One answer per caption; raises ``WriterFatalError`` when the endpoint refuses all work."""
        import httpx

        self.setup()
        if len(captions) != len(seeds):
            raise ValueError("captions and seeds differ in length")
        key = os.environ.get(self.api_key_env) or None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        semaphore = asyncio.Semaphore(self.concurrency)
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(self.timeout), limits=limits) as client:
            tasks = [asyncio.create_task(self._one(client, semaphore, c, s, key is not None))
                     for c, s in zip(captions, seeds)]
            try:
                return list(await asyncio.gather(*tasks))
            except BaseException:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise

    async def _one(self, client: Any, semaphore: asyncio.Semaphore, caption: str, seed: int,
                   has_key: bool) -> WriterAnswer:
        import httpx

        body = self.request_body(caption, seed)
        async with semaphore:
            cause = "unknown"
            for attempt in range(self.retries + 1):
                retry_after: float | None = None
                self.requests_made += 1
                try:
                    response = await client.post(self.url, json=body)
                except httpx.TimeoutException:
                    cause = "timeout"
                except httpx.TransportError:
                    cause = "connection_error"
                else:
                    status = response.status_code
                    if status in (401, 403):
                        raise self._auth_error(status, has_key)
                    if status == 404:
                        raise WriterFatalError(
                            f"not found (HTTP 404) at {_safe_url(self.url)}: check writer_options.base_url "
                            f"and writer_options.model ({self.model!r})")
                    if status == 429 or status >= 500:
                        cause = f"http_{status}"
                        retry_after = _retry_after(response.headers.get("retry-after"))
                    elif status >= 400:
                        message = _redact(_error_message(response), os.environ.get(self.api_key_env))
                        return WriterAnswer(raw=None, error=f"http_{status}: {message}"[:300])
                    else:
                        return self._answer(response)
                if attempt < self.retries:
                    delay = min(self.max_backoff, self.backoff * 2**attempt)
                    if retry_after is not None:
                        delay = min(self.max_backoff, retry_after)
                    logger.debug("openai writer: %s, retry %d of %d in %.2f s", cause, attempt + 1,
                                 self.retries, delay)
                    await self._sleep(delay)
            return WriterAnswer(raw=None, error=f"{cause}_retries_exhausted")

    def _auth_error(self, status: int, has_key: bool) -> WriterAuthError:
        what = "unauthorized" if status == 401 else "forbidden"
        hint = "" if has_key else " (it is not set)"
        return WriterAuthError(f"{what}: check the API key in ${self.api_key_env}{hint} "
                               f"(HTTP {status} from {_safe_url(self.url)}, model {self.model!r})")

    def _answer(self, response: Any) -> WriterAnswer:
        try:
            data = response.json()
            choice = data["choices"][0]
            text = choice["message"]["content"] if self.api == "chat" else choice["text"]
        except (ValueError, KeyError, IndexError, TypeError):
            return WriterAnswer(raw=None, error="bad_response")
        if not isinstance(text, str):
            return WriterAnswer(raw=None, error="bad_response")
        model = data.get("model") if isinstance(data.get("model"), str) else None
        return WriterAnswer(raw=text, finish_reason=choice.get("finish_reason"), model=model)


def _redact(text: str, secret: str | None) -> str:
    """``text`` with any occurrence of ``secret`` (and of its first 8 characters) masked."""
    if secret:
        text = text.replace(secret, "***")
        if len(secret) >= 8:
            text = text.replace(secret[:8], "***")
    return text


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _error_message(response: Any) -> str:
    try:
        err = response.json().get("error")
        msg = err.get("message") if isinstance(err, dict) else err
        return str(msg) if msg else response.reason_phrase
    except (ValueError, AttributeError):
        return response.reason_phrase or "error"


# ----------------------------------------------------------------------- registry

WRITERS: dict[str, type[InstructionWriter]] = {
    "template": TemplateInstructionWriter,
    "transformers": TransformersInstructionWriter,
    "openai": OpenAIInstructionWriter,
}
_NOT_CONFIGURABLE = {"self", "sleep"}


def _check_writer_options(kind: str, options: dict[str, Any]) -> type[InstructionWriter]:
    if kind not in WRITERS:
        raise ValueError(f"writer must be one of {', '.join(WRITERS)}, not {kind!r}")
    cls = WRITERS[kind]
    params = inspect.signature(cls.__init__).parameters
    known = [p for p in params if p not in _NOT_CONFIGURABLE]
    unknown = [k for k in options if k not in known]
    if unknown:
        raise ValueError(f"unknown writer_options {', '.join(map(repr, unknown))} for writer {kind!r} "
                         f"(known: {', '.join(known)})")
    missing = [p.name for p in params.values() if p.name not in _NOT_CONFIGURABLE
               and p.default is inspect.Parameter.empty and p.name not in options]
    if missing:
        raise ValueError(f"writer {kind!r} needs writer_options {', '.join(map(repr, missing))}")
    return cls


def build_writer(kind: str, options: dict[str, Any] | None = None) -> InstructionWriter:
    """Build a writer from its config name and options (cheap: models load in ``setup()``).

    Raises:
        ValueError: unknown writer, unknown or missing option, or an invalid value.
    """
    options = dict(options or {})
    cls = _check_writer_options(kind, options)
    return cls(**options)


# -------------------------------------------------------------------------- stage

DEFAULT_CONFIG: dict[str, Any] = {
    "writer": "template",
    "writer_options": {},
    "caption_column": "caption",
    "seed": 0,
    "batch_size": 16,
    "min_length": 2,
    "max_length": 256,
    "duplicates_url": None,
}


def find_duplicate_captions(dataset_url: str, caption_column: str, limit: int | None, out_url: str) -> int:
    """Map every row whose normalised caption appeared earlier in the input to that first row.

    Order is shard name, then row (the flow's plan order), within the first ``limit``
    rows. Writes ``{id: first_id}`` as JSON to ``out_url``; returns how many duplicates.
    """
    from pixelmill.datasets import Dataset
    from pixelmill.datasets.storage import write_text_atomic

    ds = Dataset.open(dataset_url)
    first: dict[str, str] = {}
    duplicates: dict[str, str] = {}
    remaining = limit
    for name in ds.shard_names():
        if remaining is not None and remaining <= 0:
            break
        t = ds.read_shard(name, ["id", caption_column])
        if remaining is not None:
            t = t.slice(0, remaining)
            remaining -= t.num_rows
        for row_id, caption in zip(t["id"].to_pylist(), t[caption_column].to_pylist()):
            key = normalize_caption(caption) if isinstance(caption, str) else ""
            if not key:
                continue
            if key in first:
                duplicates[str(row_id)] = first[key]
            else:
                first[key] = str(row_id)
    write_text_atomic(out_url, json.dumps(duplicates))
    return len(duplicates)


class InstructionStage(Stage):
    """Captions → (instruction, edited caption), one output row per input row.

    Rows need ``id`` and the caption column. A missing or blank caption is rejected
    (``missing_caption``), and so is a caption equal (ignoring case and punctuation) to
    an earlier one in the same call (``duplicate_caption``); neither is sent to the
    writer. The rest go to the writer in chunks of ``batch_size``, each with its seed
    ``row_seed(seed, id)``. An answer is kept when it parses (``parse_answer``) and
    passes ``filter_pair``; otherwise the row is a reject with the reason (a writer
    error, ``truncated`` when the answer hit ``max_tokens``, or a parse/filter reason).
    Rejects keep the raw answer and whatever parsed, for inspection.

    Deduplication is per call, plus global when ``duplicates_url`` names a JSON map of
    row id → the id of the first row with the same normalised caption (what
    :func:`find_duplicate_captions` writes for the whole input, across shards).

    A writer error that every row would hit (bad API key, wrong URL) raises
    ``WriterFatalError`` out of ``__call__`` instead of rejecting the whole dataset.

    Args:
        config: ``writer`` (template | transformers | openai), ``writer_options`` (dict
            passed to the writer), ``caption_column``, ``seed``, ``batch_size``,
            ``min_length`` and ``max_length`` (characters, for both parts).
        resources: CPUs/GPUs per worker.
        writer: an already built writer to use instead of building one from the config
            (tests inject one with a recording ``sleep``).
    """

    name = "instructions"

    def __init__(self, config: dict[str, Any], resources: Resources | None = None,
                 writer: InstructionWriter | None = None) -> None:
        unknown = [k for k in config if k not in DEFAULT_CONFIG]
        if unknown:
            raise ValueError(f"unknown instructions config keys {unknown!r} (known: {', '.join(DEFAULT_CONFIG)})")
        merged = {**DEFAULT_CONFIG, **config}
        merged["writer_options"] = dict(merged.get("writer_options") or {})
        if int(merged["batch_size"]) < 1:
            raise ValueError("batch_size must be at least 1")
        if not 0 <= int(merged["min_length"]) <= int(merged["max_length"]):
            raise ValueError("need 0 <= min_length <= max_length")
        if not isinstance(merged["caption_column"], str) or not merged["caption_column"]:
            raise ValueError("caption_column must be a column name")
        super().__init__(merged, resources)
        self.writer = writer or build_writer(merged["writer"], merged["writer_options"])
        self._ready = False

    def setup(self) -> None:
        self.writer.setup()
        self.duplicates: dict[str, str] = {}
        if self.config.get("duplicates_url"):
            from pixelmill.datasets.storage import read_text

            self.duplicates = json.loads(read_text(self.config["duplicates_url"]))
        self._ready = True

    def __call__(self, batch: pa.Table) -> pa.Table:
        if not self._ready:
            self.setup()
        c = self.config
        rows = batch.to_pylist()
        out: list[dict[str, Any] | None] = [None] * len(rows)
        seen: set[str] = set()
        pending: list[tuple[int, str, int]] = []
        for i, row in enumerate(rows):
            seed = row_seed(int(c["seed"]), str(row.get("id")))
            caption = row.get(c["caption_column"])
            if not isinstance(caption, str) or not normalize_caption(caption):
                out[i] = self._row(row, seed, None, error=f"missing_caption in column {c['caption_column']!r}")
                continue
            key = normalize_caption(caption)
            if str(row.get("id")) in self.duplicates:
                out[i] = self._row(row, seed, None,
                                   error=f"duplicate_caption of {self.duplicates[str(row.get('id'))]}")
                continue
            if key in seen:
                out[i] = self._row(row, seed, None, error="duplicate_caption")
                continue
            seen.add(key)
            pending.append((i, " ".join(caption.split()), seed))
        size = int(c["batch_size"])
        for start in range(0, len(pending), size):
            chunk = pending[start:start + size]
            for (i, caption, seed), answer in zip(chunk, self._write(chunk)):
                out[i] = self._judge(rows[i], seed, caption, answer)
        return pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA)

    def _write(self, chunk: list[tuple[int, str, int]]) -> list[WriterAnswer]:
        """Write a chunk; if it fails, retry row by row so one bad row cannot sink the batch."""
        try:
            answers = self.writer.write([x[1] for x in chunk], [x[2] for x in chunk])
        except WriterFatalError:
            raise
        except Exception as exc:  # noqa: BLE001 - isolate, then report per row
            if len(chunk) == 1:
                return [WriterAnswer(raw=None, error=f"writer_failed: {type(exc).__name__}: {exc}"[:300])]
            return [self._write([x])[0] for x in chunk]
        if len(answers) != len(chunk):
            raise RuntimeError(
                f"{type(self.writer).__name__} returned {len(answers)} answers for {len(chunk)} captions")
        return answers

    def _judge(self, row: dict, seed: int, caption: str, answer: WriterAnswer) -> dict[str, Any]:
        if answer.error:
            return self._row(row, seed, answer, error=answer.error)
        if answer.finish_reason == "length":
            return self._row(row, seed, answer, error="truncated")
        try:
            instruction, edited = parse_answer(answer.raw)
        except RowError as e:
            return self._row(row, seed, answer, error=e.reason)
        reason = filter_pair(caption, instruction, edited, int(self.config["min_length"]),
                             int(self.config["max_length"]))
        return self._row(row, seed, answer, instruction, edited, error=reason)

    def _row(self, row: dict, seed: int, answer: WriterAnswer | None, instruction: str | None = None,
             edited: str | None = None, error: str | None = None) -> dict[str, Any]:
        shard = row.get("shard")
        return {
            "id": str(row.get("id")),
            "caption": row.get(self.config["caption_column"]),
            "edit_prompt": instruction,
            "edited_caption": edited,
            "raw_answer": answer.raw if answer else None,
            "writer": self.writer.name,
            "writer_model": (answer.model if answer and answer.model else None) or self.writer.model_name,
            "seed": seed,
            "status": STATUS_REJECT if error else STATUS_OK,
            "error": error,
            "stage": self.name,
            "shard": None if shard is None else str(shard),
        }
