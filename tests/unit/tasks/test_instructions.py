"""The instruction-pair text stage: template grammar, answer rules, the LM and API writers."""

from __future__ import annotations

import asyncio
import logging
import re

import pyarrow as pa
import pytest

from pixelmill.tasks.edit import row_seed
from pixelmill.tasks.instructions import (
    EDIT_TYPES,
    OUTPUT_SCHEMA,
    InstructionStage,
    OpenAIInstructionWriter,
    TemplateInstructionWriter,
    TransformersInstructionWriter,
    WriterAuthError,
    WriterFatalError,
    build_writer,
    filter_pair,
    normalize_caption,
    parse_answer,
)
from pixelmill.tasks.stage import RowError
from tests.helpers.llm_server import FakeLLMServer, always, echo_text, fail_then, fixed, slow

KEY = "sk-test-0123456789abcdef-SECRET"

CAPTIONS = [
    "a man riding a horse on a beach",
    "a woman with an umbrella walking down a rainy street",
    "two children playing in a park",
    "portrait of an old woman wearing a red scarf",
    "a chef cooking in a restaurant kitchen",
    "a cat sleeping on a wooden chair",
    "a golden retriever with a ball in its mouth",
    "a flock of birds flying over a lake",
    "an elephant and a giraffe at a watering hole",
    "a red car parked in front of a house",
    "a vintage bus driving through a city at night",
    "a sailboat on the ocean at sunset",
    "a slice of chocolate cake on a white plate",
    "a bowl of soup with bread",
    "a plate of pancakes with maple syrup",
    "a modern living room with a grey sofa",
    "a bedroom with a large window",
    "an oil painting of a ship in a storm",
    "a watercolor painting of a village by a river",
    "a pencil sketch of a horse",
    "snowy mountains under a blue sky",
    "a waterfall in a tropical forest",
    "a lighthouse on a cliff",
    "a glass vase full of tulips",
    "an apple on a table",
    "Photo of the Golden Gate Bridge in fog.",
    "a stone bridge over a river in autumn",
    "abstract shapes",
]

_WORD = re.compile(r"[a-z]+")


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def _mentions_change(caption: str, instruction: str, edited: str) -> bool:
    """The instruction names what changed: a word sharing a stem with an added or removed word."""
    changed = {w for w in (_words(edited) ^ _words(caption)) if len(w) > 2}
    said = {w for w in _words(instruction) if len(w) > 2}
    return any(a[:4] == b[:4] or a.startswith(b) or b.startswith(a) for a in changed for b in said)


def _bad_articles(caption: str, edited: str) -> list[str]:
    """``a``/``an`` mistakes in the edited caption that the input did not already have."""
    bad = []
    for m in re.finditer(r"\b(a|an) ([a-z][\w-]*)", edited, re.IGNORECASE):
        art, word = m.group(1).lower(), m.group(2).lower()
        if word.startswith(("u", "one", "eu", "hour", "hon")):
            continue
        if (art == "a") == (word[0] in "aeiou") and m.group(0).lower() not in caption.lower():
            bad.append(m.group(0))
    return bad


def _table(captions, ids=None, **extra) -> pa.Table:
    ids = ids or [f"row-{i}" for i in range(len(captions))]
    return pa.Table.from_pylist([{"id": i, "caption": c, **extra} for i, c in zip(ids, captions)])


class SleepRecorder:
    """An injectable async sleep that records the delays instead of waiting."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


# ------------------------------------------------------------------ template writer


def test_template_writer_gives_valid_pairs_for_varied_captions():
    writer = TemplateInstructionWriter()
    kinds = set()
    for caption in CAPTIONS:
        for k in range(6):
            seed = row_seed(k, caption)
            [answer] = writer.write([caption], [seed])
            assert answer.error is None, caption
            instruction, edited = parse_answer(answer.raw)
            assert answer.raw == f"{instruction}\n%%\n{edited}\nEND"
            assert filter_pair(caption, instruction, edited) is None, (caption, instruction, edited)
            assert normalize_caption(edited) != normalize_caption(caption)
            assert _mentions_change(caption, instruction, edited), (caption, instruction, edited)
            assert not _bad_articles(caption, edited), (caption, edited)
            assert "  " not in edited and edited == edited.strip()
            kinds.add(writer.write_one(caption, seed).kind)
    assert kinds == set(EDIT_TYPES)


def test_template_writer_is_deterministic_per_seed_and_varies_across_seeds():
    writer = TemplateInstructionWriter()
    caption = "a man riding a horse on a beach"
    first = [writer.write([caption], [s])[0].raw for s in range(30)]
    assert first == [writer.write([caption], [s])[0].raw for s in range(30)]
    assert len({writer.write_one(caption, s).kind for s in range(30)}) >= 6
    assert len(set(first)) >= 15


@pytest.mark.parametrize(
    "kind, caption, check",
    [
        ("replace_object", "an apple on a plate",
         lambda i, e: e in {"an orange on a plate", "a pear on a plate", "a peach on a plate"}),
        ("replace_object", "two cats on the grass",
         lambda i, e: e in {"two dogs on the grass", "two tigers on the grass", "two foxes on the grass"}),
        ("change_colour", "a red car parked on a street",
         lambda i, e: "red" not in e and e.endswith("car parked on a street") and e.split()[1] in i),
        ("change_colour", "a cat sleeping on a wooden chair",
         lambda i, e: re.fullmatch(r"a cat sleeping on an? \w+ wooden chair", e) is not None),
        ("change_material", "a wooden chair in a garden",
         lambda i, e: "wooden" not in e and e.endswith("chair in a garden")),
        ("add_object", "a happy dog sitting",
         lambda i, e: e.startswith("a happy dog wearing ") and e.endswith(" sitting")),
        ("add_object", "a bedroom with a large window",
         lambda i, e: e.startswith("a bedroom with a large window and ") and e.split(" and ")[1] in i),
        ("remove_object", "a cat with a red collar",
         lambda i, e: e == "a cat" and "collar" in i),
        ("remove_object", "a golden retriever with a ball in its mouth",
         lambda i, e: e == "a golden retriever" and "ball" in i),
        ("remove_object", "a cat and a dog are sleeping on a couch",
         lambda i, e: e == "a cat is sleeping on a couch" and "dog" in i),
        ("change_style", "a ship at sea",
         lambda i, e: e.startswith("a ship at sea in ") or e.endswith(" of a ship at sea")),
        ("change_season", "a stone bridge over a river in autumn",
         lambda i, e: e.startswith("a stone bridge over a river in ") and "autumn" not in e and e.split()[-1] in i),
        ("change_weather", "a lighthouse on a cliff",
         lambda i, e: e.startswith("a lighthouse on a cliff ") and len(e) > len("a lighthouse on a cliff ")),
        ("change_time_of_day", "a sailboat on the ocean at sunset",
         lambda i, e: e.startswith("a sailboat on the ocean ") and "sunset" not in e),
    ],
)
def test_template_edit_types(kind, caption, check):
    writer = TemplateInstructionWriter(edits=[kind])
    for seed in range(8):
        edit = writer.write_one(caption, seed)
        assert edit is not None and edit.kind == kind
        assert check(edit.instruction, edit.edited), (edit.instruction, edit.edited)


def test_template_style_does_not_stack_artwork_prefixes():
    writer = TemplateInstructionWriter(edits=["change_style"])
    for seed in range(20):
        edited = writer.write_one("an oil painting of a ship at sea", seed).edited
        assert edited.endswith(" of a ship at sea") and edited.count(" of ") == 1
        assert not edited.startswith("an oil painting")


def test_template_leaves_names_alone_and_reports_inapplicable_edits():
    writer = TemplateInstructionWriter(edits=["change_colour"])
    for seed in range(10):
        edit = writer.write_one("the Golden Gate Bridge", seed)
        assert edit is None or "Golden Gate" in edit.edited
    [answer] = TemplateInstructionWriter(edits=["remove_object"]).write(["a cat"], [1])
    assert answer.raw is None and answer.error == "no_applicable_edit"
    with pytest.raises(ValueError, match="edits"):
        TemplateInstructionWriter(edits=["explode"])


# ------------------------------------------------------------------- parse / filter


def test_parse_answer_accepts_exactly_two_parts():
    assert parse_answer("make it red\n%%\na red car\nEND") == ("make it red", "a red car")
    assert parse_answer("make it red\n%%\na red car") == ("make it red", "a red car")
    assert parse_answer(" make it red \n%%\n a red car \n END \n") == ("make it red", "a red car")
    assert parse_answer("make it red\n%%\na red car\nEND\nsomething more\n%%\n") == ("make it red", "a red car")
    assert parse_answer("go out\n%%\na quiet WEEKEND") == ("go out", "a quiet WEEKEND")
    assert parse_answer("a\r\n%%\r\nb\r\nEND") == ("a", "b")


@pytest.mark.parametrize(
    "raw, reason",
    [
        (None, "empty_answer"),
        ("   \n", "empty_answer"),
        ("make it red, a red car", "no_separator"),
        ("make it red\n%% a red car", "no_separator"),
        ("a\n%%\nb\n%%\nc\nEND", "too_many_parts"),
        ("\n%%\na red car\nEND", "empty_instruction"),
        ("%%\na red car", "empty_instruction"),
        ("make it red\n%%\n   \nEND", "empty_edited_caption"),
        ("make it red\n%%", "empty_edited_caption"),
    ],
)
def test_parse_answer_rejects(raw, reason):
    with pytest.raises(RowError) as info:
        parse_answer(raw)
    assert info.value.reason == reason


def test_filter_pair_rules():
    assert filter_pair("a red car", "make it blue", "a blue car") is None
    assert filter_pair("a red car", "do nothing", "A Red Car.") == "unchanged_caption"
    assert filter_pair("a red car!", "do nothing", "a red, car") == "unchanged_caption"
    assert filter_pair("a red car", "x", "a blue car", min_len=2) == "instruction_too_short"
    assert filter_pair("a red car", "make it blue " * 30, "a blue car", max_len=100) == "instruction_too_long"
    assert filter_pair("a red car", "make it blue", "a", min_len=2) == "edited_caption_too_short"
    assert filter_pair("a red car", "make it blue", "a blue car " * 30, max_len=100) == "edited_caption_too_long"
    assert filter_pair("a red car", "make it\nblue", "a blue car") == "multiline_instruction"
    assert filter_pair("a red car", "make it blue", "a blue\ncar") == "multiline_edited_caption"
    assert normalize_caption("  A  cat—on a MAT!! ") == "a cat on a mat"


# ------------------------------------------------------------------------- stage


def test_stage_rows_dedup_and_provenance():
    captions = ["a red car", "a cat on a mat", "A cat on a mat!", None, "   ", "a lighthouse on a cliff"]
    stage = InstructionStage({"seed": 5, "batch_size": 2})
    stage.setup()
    out = stage(_table(captions, shard="00003"))
    assert out.schema == OUTPUT_SCHEMA
    rows = out.to_pylist()
    assert [r["id"] for r in rows] == [f"row-{i}" for i in range(6)]
    assert [r["status"] for r in rows] == ["ok", "ok", "reject", "reject", "reject", "ok"]
    assert rows[2]["error"] == "duplicate_caption" and rows[2]["raw_answer"] is None
    assert rows[3]["error"].startswith("missing_caption") and rows[4]["error"].startswith("missing_caption")
    for i, r in enumerate(rows):
        assert r["seed"] == row_seed(5, f"row-{i}")
        assert r["stage"] == "instructions" and r["writer"] == "template" and r["writer_model"] == "template-v1"
        assert r["shard"] == "00003"
        assert r["caption"] == captions[i]
        if r["status"] == "ok":
            assert r["error"] is None
            assert (r["edit_prompt"], r["edited_caption"]) == parse_answer(r["raw_answer"])


def test_stage_output_does_not_depend_on_batching():
    table = _table(CAPTIONS)
    a = InstructionStage({"seed": 1, "batch_size": 1})(table)
    b = InstructionStage({"seed": 1, "batch_size": 64})(table)
    assert a.equals(b)
    c = InstructionStage({"seed": 2, "batch_size": 64})(table)
    assert c.column("raw_answer").to_pylist() != a.column("raw_answer").to_pylist()


def test_stage_config_errors_name_the_field():
    with pytest.raises(ValueError, match="writer must be one of"):
        InstructionStage({"writer": "gpt5"})
    with pytest.raises(ValueError, match="'temprature'"):
        InstructionStage({"writer": "openai", "writer_options": {"base_url": "http://127.0.0.1:1/v1",
                                                               "model": "m", "temprature": 0.7}})
    with pytest.raises(ValueError, match="'base_url'"):
        InstructionStage({"writer": "openai", "writer_options": {"model": "m"}})
    with pytest.raises(ValueError, match="'model'"):
        InstructionStage({"writer": "transformers"})
    with pytest.raises(ValueError, match="api"):
        build_writer("openai", {"base_url": "http://127.0.0.1:1/v1", "model": "m", "api": "responses"})
    with pytest.raises(ValueError, match="unknown instructions config keys"):
        InstructionStage({"batchsize": 3})


class _ExplodingWriter(TemplateInstructionWriter):
    def write(self, captions, seeds):
        if any("boom" in c for c in captions):
            raise RuntimeError("kaput")
        return super().write(captions, seeds)


def test_stage_isolates_a_writer_crash_to_its_row():
    out = InstructionStage({"batch_size": 8}, writer=_ExplodingWriter())(_table(["a red car", "boom", "a cat"]))
    rows = out.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "reject", "ok"]
    assert rows[1]["error"] == "writer_failed: RuntimeError: kaput"


# ------------------------------------------------------------- generation helpers


def test_frequency_penalty_matches_openai_definition():
    import torch
    from transformers import LogitsProcessor

    from pixelmill.tasks.instructions import FrequencyPenaltyLogitsProcessor

    proc = FrequencyPenaltyLogitsProcessor(0.1, prompt_length=3)
    assert isinstance(proc, LogitsProcessor)
    ids = torch.tensor([[5, 5, 7, 3, 3, 9], [0, 5, 5, 5, 2, 8]])
    scores = torch.arange(20, dtype=torch.float32).reshape(2, 10)
    out = proc(ids, scores)
    expected = scores.clone()
    expected[0, 3] -= 0.2
    expected[0, 9] -= 0.1
    expected[1, 5] -= 0.1
    expected[1, 2] -= 0.1
    expected[1, 8] -= 0.1
    assert torch.allclose(out, expected)
    assert out[0, 5] == scores[0, 5] and out[0, 7] == scores[0, 7]

    both = FrequencyPenaltyLogitsProcessor(0.1, prompt_length=3, presence_penalty=0.5)(ids, scores)
    assert torch.isclose(both[0, 3], scores[0, 3] - 0.7) and torch.isclose(both[0, 9], scores[0, 9] - 0.6)
    assert torch.equal(FrequencyPenaltyLogitsProcessor(0.1, prompt_length=6)(ids, scores), scores)


def test_seeded_sampler_is_per_row_and_respects_top_p():
    import torch

    from pixelmill.tasks.instructions import SeededSamplerLogitsProcessor

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))

    def pick(seeds, rows, top_p=1.0, temperature=1.0):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        out = SeededSamplerLogitsProcessor(gens, temperature, top_p)(None, rows)
        assert torch.all((out == 0).sum(-1) == 1)
        return out.argmax(-1).tolist()

    alone = pick([11], logits)
    together = pick([11, 12, 13], logits.repeat(3, 1))
    assert together[0] == alone[0]
    assert pick([11, 12, 13], logits.repeat(3, 1)) == together
    picks = [pick([s], logits, top_p=0.6)[0] for s in range(200)]
    assert set(picks) == {0, 1}
    picks = [pick([s], logits)[0] for s in range(400)]
    assert set(picks) == {0, 1, 2, 3} and 150 < picks.count(0) < 250
    greedy = SeededSamplerLogitsProcessor([torch.Generator()], 0.0, 1.0)(None, logits)
    assert torch.equal(greedy, logits)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> str:
    """A tiny GPT-2 folder; torch runs single-threaded meanwhile (a 32-wide model gains
    nothing from threads, and on a busy 2-core machine they slow each step several-fold)."""
    import torch

    from pixelmill.models.tiny_gpt2 import save_tiny_gpt2

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield save_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), seed=0)
    finally:
        torch.set_num_threads(threads)


def test_tiny_gpt2_tokenizer_round_trips_and_stop_criterion(tiny_gpt2):
    import torch
    from transformers import AutoTokenizer, StoppingCriteria

    from pixelmill.tasks.instructions import StopOnTextCriteria

    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    text = "a café on a street\n##\nmake it night\n%%\na café at night\nEND"
    assert tok.decode(tok(text)["input_ids"]) == text
    prompt = tok("x\nEND\n##\n")["input_ids"]
    crit = StopOnTextCriteria(tok, "\nEND", prompt_length=len(prompt))
    assert isinstance(crit, StoppingCriteria)
    done = tok(text.split("\n##\n")[1])["input_ids"]
    half = tok("make it night\n%%\na café at night\nEN")["input_ids"]
    batch = torch.tensor([prompt + done, prompt + half[: len(done)] + [0] * (len(done) - len(half))])
    assert crit(batch, None).tolist() == [True, False]
    assert crit(torch.tensor([prompt]), None).tolist() == [False]


def test_transformers_writer_nonsense_becomes_rejects_deterministically(tiny_gpt2):
    captions = ["a red car", "a cat on a mat", "a dog in the snow", "a cat on a mat.", "x" * 1000]
    config = {"writer": "transformers", "writer_options": {"model": tiny_gpt2, "device": "cpu"},
              "batch_size": 3, "seed": 3}
    stage = InstructionStage(config)
    stage.setup()
    rows = stage(_table(captions)).to_pylist()
    assert all(r["status"] == "reject" for r in rows)
    assert rows[3]["error"] == "duplicate_caption"
    assert rows[4]["error"] == "prompt_too_long"
    allowed = {"truncated", "no_separator", "too_many_parts", "empty_answer", "empty_instruction",
               "empty_edited_caption", "multiline_instruction", "multiline_edited_caption", "unchanged_caption",
               "instruction_too_long", "edited_caption_too_long", "instruction_too_short",
               "edited_caption_too_short"}
    for r in rows[:3]:
        assert r["error"] in allowed and r["raw_answer"]
        assert r["writer"] == "transformers" and r["writer_model"].startswith(tiny_gpt2 + "@")

    one_by_one = InstructionStage({**config, "batch_size": 1})(_table(captions)).to_pylist()
    assert [r["raw_answer"] for r in one_by_one] == [r["raw_answer"] for r in rows]
    other_seed = InstructionStage({**config, "seed": 4})(_table(captions)).to_pylist()
    assert [r["raw_answer"] for r in other_seed][:3] != [r["raw_answer"] for r in rows][:3]


def test_transformers_writer_honours_max_tokens_and_missing_model(tiny_gpt2, tmp_path):
    writer = TransformersInstructionWriter(tiny_gpt2, device="cpu", max_tokens=5, frequency_penalty=0.0)
    answers = writer.write(["a red car", "a blue bus"], [1, 2])
    for a in answers:
        assert a.error is None and a.finish_reason == "length" and 0 < len(a.raw) <= 5 * 4
    assert writer.write(["a red car"], [1])[0] == answers[0]
    missing = TransformersInstructionWriter(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="nope"):
        missing.setup()


# --------------------------------------------------------------- openai writer


def _openai_stage(server: FakeLLMServer, sleep: SleepRecorder | None = None, **options) -> InstructionStage:
    opts = {"base_url": server.base_url, "model": "fake-llm", **options}
    writer = OpenAIInstructionWriter(**opts, sleep=sleep or SleepRecorder())
    return InstructionStage({"writer": "openai", "writer_options": opts, "batch_size": 8}, writer=writer)


def test_openai_completions_normal_answers_and_request_bodies(monkeypatch, tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    few_shot = tmp_path / "few_shot.txt"
    few_shot.write_text("a house\n##\nmake it a castle\n%%\na castle\nEND\n\n")
    captions = ["a red car", "a cat on a mat", "a lighthouse on a cliff"]
    with FakeLLMServer(api_key=KEY) as server:
        stage = _openai_stage(server, few_shot_file=str(few_shot))
        rows = stage(_table(captions)).to_pylist()
    assert [r["status"] for r in rows] == ["ok"] * 3
    for caption, r in zip(captions, rows):
        assert r["edit_prompt"] == "make it snowy" and r["edited_caption"] == f"{caption} in the snow"
        assert r["raw_answer"] == echo_text(caption)[: -len("\nEND")]
        assert r["writer"] == "openai" and r["writer_model"] == "fake-llm-0001"
    assert stage.writer.requests_made == 3 and len(server.requests) == 3
    by_caption = {req.caption: req for req in server.requests}
    for caption in captions:
        req = by_caption[caption]
        assert req.path == "/v1/completions"
        assert req.headers["authorization"] == f"Bearer {KEY}"
        assert req.body == {
            "model": "fake-llm", "prompt": few_shot.read_text() + caption + "\n##\n", "max_tokens": 256,
            "temperature": 0.7, "top_p": 1.0, "frequency_penalty": 0.1, "stop": ["\nEND"],
        }
    assert KEY not in str(rows)


def test_openai_chat_api(monkeypatch):
    monkeypatch.setenv("MY_LLM_KEY", KEY)
    with FakeLLMServer(api_key=KEY) as server:
        stage = _openai_stage(server, api="chat", api_key_env="MY_LLM_KEY", send_seed=True)
        rows = stage(_table(["a red car"])).to_pylist()
    assert rows[0]["status"] == "ok" and rows[0]["edited_caption"] == "a red car in the snow"
    [req] = server.requests
    assert req.path == "/v1/chat/completions"
    body = req.body
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert body["messages"][1]["content"] == "a red car"
    assert "%%" in body["messages"][0]["content"] and "END" in body["messages"][0]["content"]
    assert {k: body[k] for k in ("max_tokens", "temperature", "top_p", "frequency_penalty", "stop")} == {
        "max_tokens": 256, "temperature": 0.7, "top_p": 1.0, "frequency_penalty": 0.1, "stop": ["\nEND"]}
    assert body["seed"] == row_seed(0, "row-0") % 2**31


def test_openai_malformed_and_truncated_answers_become_rejects(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    answers = {
        "a red car": "make it blue, a blue car",
        "a cat on a mat": "a\n%%\nb\n%%\nc\nEND",
        "a dog": "do nothing\n%%\nA DOG.\nEND",
        "a bus": "make it red\n%%\na red bus\nEND",
    }
    with FakeLLMServer(api_key=KEY, handler=fixed(lambda c: answers[c])) as server:
        rows = _openai_stage(server)(_table(list(answers))).to_pylist()
        assert [r["error"] for r in rows] == ["no_separator", "too_many_parts", "unchanged_caption", None]
        assert rows[0]["raw_answer"] == "make it blue, a blue car"
        server.handler = fixed("make it red\n%%\na red car in the", finish_reason="length")
        rows = _openai_stage(server)(_table(["a car"])).to_pylist()
        assert rows[0]["error"] == "truncated"


def test_openai_retries_429_with_backoff_then_succeeds(monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    sleep = SleepRecorder()
    with FakeLLMServer(api_key=KEY, handler=fail_then(429, times=2)) as server:
        stage = _openai_stage(server, sleep, concurrency=1, retries=3, backoff=0.5)
        rows = stage(_table(["a red car", "a cat"])).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert sleep.calls == [0.5, 1.0, 0.5, 1.0]
    assert stage.writer.requests_made == 6 == len(server.requests)
    assert KEY not in caplog.text


def test_openai_honours_retry_after_and_caps_backoff(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    sleep = SleepRecorder()
    with FakeLLMServer(api_key=KEY, handler=fail_then(503, times=1, retry_after=7)) as server:
        rows = _openai_stage(server, sleep)(_table(["a red car"])).to_pylist()
    assert rows[0]["status"] == "ok" and sleep.calls == [7.0]
    sleep = SleepRecorder()
    with FakeLLMServer(api_key=KEY, handler=fail_then(500, times=4)) as server:
        rows = _openai_stage(server, sleep, backoff=10, max_backoff=25)(_table(["a red car"])).to_pylist()
    assert rows[0]["error"] == "http_500_retries_exhausted" and sleep.calls == [10, 20, 25]


def test_openai_500s_exhaust_retries_into_rejects(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    sleep = SleepRecorder()
    with FakeLLMServer(api_key=KEY, handler=always(500)) as server:
        stage = _openai_stage(server, sleep, retries=2, concurrency=4)
        rows = stage(_table(["a red car", "a cat", "a dog"])).to_pylist()
    assert [r["error"] for r in rows] == ["http_500_retries_exhausted"] * 3
    assert all(r["raw_answer"] is None and r["writer_model"] == "fake-llm" for r in rows)
    assert sorted(sleep.calls) == [1.0] * 3 + [2.0] * 3
    assert stage.writer.requests_made == 9 == len(server.requests)


def test_openai_other_4xx_is_a_row_error_without_retry(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    sleep = SleepRecorder()
    with FakeLLMServer(api_key=KEY, handler=always(400, f"prompt too long (key {KEY})")) as server:
        rows = _openai_stage(server, sleep)(_table(["a red car"])).to_pylist()
    assert rows[0]["error"].startswith("http_400: prompt too long")
    assert KEY not in rows[0]["error"] and sleep.calls == [] and len(server.requests) == 1


def test_openai_timeouts_and_connection_errors(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    sleep = SleepRecorder()
    with FakeLLMServer(api_key=KEY, handler=slow(2.0)) as server:
        rows = _openai_stage(server, sleep, timeout=0.2, retries=1)(_table(["a red car"])).to_pylist()
    assert rows[0]["error"] == "timeout_retries_exhausted" and sleep.calls == [1.0]
    with FakeLLMServer(api_key=KEY) as server:
        stage = _openai_stage(server, SleepRecorder(), retries=1)
    rows = stage(_table(["a red car"])).to_pylist()
    assert rows[0]["error"] == "connection_error_retries_exhausted"


def test_openai_concurrency_limit(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with FakeLLMServer(api_key=KEY, handler=slow(0.1)) as server:
        rows = _openai_stage(server, concurrency=2)(_table([f"a car number {i}" for i in range(6)])).to_pylist()
    assert all(r["status"] == "ok" for r in rows)
    assert server.max_in_flight == 2


def test_openai_401_fails_fast_without_leaking_the_key(monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with FakeLLMServer(api_key="sk-the-right-one") as server:
        stage = _openai_stage(server, concurrency=1)
        with pytest.raises(WriterAuthError) as info:
            stage(_table([f"caption {i}" for i in range(5)]))
    message = str(info.value)
    assert message.startswith("unauthorized: check the API key in $OPENAI_API_KEY")
    assert len(server.requests) == 1 and server.requests[0].headers["authorization"] == f"Bearer {KEY}"
    for text in (message, repr(info.value), repr(stage.writer), str(vars(stage.writer)), caplog.text):
        assert KEY not in text and KEY[:12] not in text


def test_openai_missing_key_and_wrong_url(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with FakeLLMServer(api_key="sk-x") as server:
        with pytest.raises(WriterAuthError, match=r"\$OPENAI_API_KEY \(it is not set\)"):
            _openai_stage(server)(_table(["a red car"]))
        assert "authorization" not in server.requests[0].headers
    with FakeLLMServer(api_key=None) as server:
        stage = _openai_stage(server)
        stage.writer.base_url = server.base_url + "/wrong"
        with pytest.raises(WriterFatalError, match="HTTP 404"):
            stage(_table(["a red car"]))


def test_openai_write_works_inside_a_running_event_loop(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with FakeLLMServer(api_key=KEY) as server:
        writer = OpenAIInstructionWriter(server.base_url, "fake-llm")

        async def main():
            return writer.write(["a red car"], [1])

        [answer] = asyncio.run(main())
    assert parse_answer(answer.raw) == ("make it snowy", "a red car in the snow")


def test_duplicate_captions_are_found_across_shards_and_rejected(tmp_path):
    import json as _json

    import pyarrow as pa

    from pixelmill.datasets import DatasetWriter
    from pixelmill.tasks.instructions import InstructionStage, find_duplicate_captions

    w = DatasetWriter(str(tmp_path / "caps"), "captions", 1, {"t": 1}).open()
    for name, ids, caps in (("00000", ["a", "b"], ["A red car.", "a cat"]),
                            ("00001", ["c", "d"], ["a red car", "a dog"])):
        sw = w.shard(name)
        sw.write(pa.table({"id": ids, "caption": caps}))
        sw.commit()
    w.finish()
    out = str(tmp_path / "dups.json")
    assert find_duplicate_captions(str(tmp_path / "caps"), "caption", None, out) == 1
    assert _json.loads(open(out).read()) == {"c": "a"}
    stage = InstructionStage({"writer": "template", "duplicates_url": out})
    rows = stage(pa.table({"id": ["c", "d"], "caption": ["a red car", "a dog"]})).to_pylist()
    assert rows[0]["status"] == "reject" and rows[0]["error"] == "duplicate_caption of a"
    assert rows[1]["status"] == "ok"
    # with a limit, later shards are not read, so nothing is a duplicate
    assert find_duplicate_captions(str(tmp_path / "caps"), "caption", 2, out) == 0


def test_template_colours_option_restricts_the_new_colour_and_leaves_the_default_alone():
    """``colours``: change_colour picks only from the given names (never the caption's own colour);
    without it, the writer's own list and the same draws as before."""
    toy = ["red", "green", "blue", "yellow", "purple", "orange"]
    restricted = TemplateInstructionWriter(edits=["change_colour"], colours=toy)
    default = TemplateInstructionWriter(edits=["change_colour"])
    seen = set()
    for seed in range(60):
        edit = restricted.write_one("a small purple star on a white background", seed)
        new = edit.edited.split()[2]
        assert new in toy and new != "purple", edit
        assert edit.instruction.split()[-1] == new or f"to {new}" in edit.instruction
        seen.add(new)
        plain = restricted.write_one("a picture of a car", seed)  # a colourable noun: a colour is inserted
        assert plain.edited.split()[-2] in toy, plain
    assert seen == set(toy) - {"purple"}
    assert default.colours == TemplateInstructionWriter().colours
    assert default.write_one("a purple star", 3) == TemplateInstructionWriter(edits=["change_colour"]).write_one(
        "a purple star", 3)
    with pytest.raises(ValueError, match="colours"):
        TemplateInstructionWriter(colours=["red"])
    with pytest.raises(ValueError, match="colours"):
        TemplateInstructionWriter(colours=["red", "sky blue"])


def test_pairs_config_thresholds_default_per_clip_model():
    """Left out, the CLIP filter's thresholds are the paper's (set for ViT-L/14) for every CLIP but
    the toy one, which gets the values calibrated for it; a value given is kept."""
    from pixelmill.config import PairsConfig
    from pixelmill.config.pairs import MODEL_THRESHOLDS, PAPER_THRESHOLDS

    def thresholds(clip, **given):
        images = PairsConfig(input="in", output="out", images={"model": "m", "clip_model": clip, **given}).images
        return {k: getattr(images, k) for k in PAPER_THRESHOLDS}

    assert PAPER_THRESHOLDS == {"min_image_similarity": 0.7, "min_direction": 0.2, "min_image_caption": 0.2}
    assert thresholds("ViT-L-14/openai") == thresholds("some/folder") == PAPER_THRESHOLDS
    assert thresholds("toy:clip") == MODEL_THRESHOLDS["toy:clip"] != PAPER_THRESHOLDS
    assert thresholds("toy:clip", min_direction=0.1)["min_direction"] == 0.1
    assert thresholds("ViT-L-14/openai", min_image_similarity=0.5)["min_image_similarity"] == 0.5
