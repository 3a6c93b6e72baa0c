"""The offline instruction writer: a small grammar of edit types over the words in ``template_words``."""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pixelmill.registry import register
from pixelmill.tasks.instructions.answer import WriterAnswer, format_answer, normalize_caption
from pixelmill.tasks.instructions.writers.base import InstructionWriter
from pixelmill.tasks.instructions.writers.template_words import (
    _COLOUR_RE,
    _COLOURABLE_RE,
    _COLOURS,
    _DETERMINERS,
    _ING_NOUNS,
    _INTERIOR_ADDITIONS,
    _INTERIOR_RE,
    _KNOWN_NOUNS,
    _MATERIAL_RE,
    _MATERIALABLE_RE,
    _MATERIALS,
    _NEW_COLOURS,
    _NEW_MATERIALS,
    _NOT_A_COLOUR_BEFORE,
    _NP_STOP,
    _OUTDOOR_RE,
    _PEOPLE_ANIMAL_RE,
    _POSSESSIVES,
    _SAVOURY_ADDITIONS,
    _SAVOURY_RE,
    _SEASON_PHRASE,
    _SEASONS,
    _SKY_ADDITIONS,
    _STYLE_PREFIX,
    _STYLE_SUFFIXES,
    _STYLES,
    _SWAP_FORMS,
    _SWAP_RE,
    _SWAPS,
    _SWEET_ADDITIONS,
    _SWEET_RE,
    _TIME_PHRASE,
    _TIMES,
    _WEARABLES,
    _WEARER_FORMS,
    _WEARER_RE,
    _WEATHER,
    _WEATHER_PHRASE,
    _clean_caption,
    _insert,
    _matches,
    _plural,
    _replace,
    _the,
    _with_article,
    _words_of,
)

TEMPLATE_VERSION = "template-v1"

EDIT_TYPES: tuple[str, ...] = (
    "replace_object", "change_colour", "change_material", "add_object", "remove_object",
    "change_style", "change_season", "change_weather", "change_time_of_day",
)


@dataclass(frozen=True)
class TemplateEdit:
    """One edit the template grammar made: its type, the instruction and the edited caption."""

    kind: str
    instruction: str
    edited: str


@register("writer", "template")
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
        colours: the new colours ``change_colour`` may pick (default: its own list,
            ``red blue green yellow purple pink orange golden silver turquoise``). Restrict it
            to what the image model can draw: a toy-world run passes ``world.COLORS``
            (the toy SD never saw "turquoise"). Names outside the writer's own colour words
            are allowed; an old colour the caption names is never picked as the new one.
    """

    name = "template"

    def __init__(self, edits: Sequence[str] | None = None, colours: Sequence[str] | None = None) -> None:
        chosen = tuple(edits) if edits is not None else EDIT_TYPES
        unknown = [e for e in chosen if e not in EDIT_TYPES]
        if unknown or not chosen:
            raise ValueError(f"writer_options.edits: unknown or empty {unknown or chosen!r}; "
                             f"choose from {', '.join(EDIT_TYPES)}")
        self.edits = chosen
        if colours is not None:
            colours = tuple(dict.fromkeys(str(c).strip().lower() for c in colours))
            if len(colours) < 2 or not all(re.fullmatch(r"[a-z]+(-[a-z]+)?", c) for c in colours):
                raise ValueError(f"writer_options.colours: need at least 2 single-word colour names, got {colours!r}")
        self.colours = colours if colours is not None else _NEW_COLOURS

    def __repr__(self) -> str:
        extra = "" if self.colours == _NEW_COLOURS else f", colours={list(self.colours)!r}"
        return f"TemplateInstructionWriter(edits={list(self.edits)!r}{extra})"

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
            choices = [c for c in self.colours if c != old and {c, old} != {"gray", "grey"}]
            if not choices:
                continue
            new = rng.choice(choices)
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
        new = rng.choice(self.colours)
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
