"""The golden module's records per machine: exact on a recorded machine, less the machine-dependent paths elsewhere."""

from __future__ import annotations

from tests.golden.test_golden import load_expected

AMD, INTEL, ARM = "x86_64 AMD / AVX2", "x86_64 Intel / AVX512", "aarch64 / NEON"
REC = {"config_hash": "h", "rows": {"digest": "d1", "columns": {"id": "i", "l2": "f1"}}}
DOC = {
    "machines": {AMD: {"edit-sdedit": REC, "pairs": {"n": 1}},
                 INTEL: {"edit-sdedit": {**REC, "rows": {"digest": "d2", "columns": {"id": "i", "l2": "f2"}}}}},
    "machine_dependent": {"edit-sdedit": ["rows.digest", "rows.columns.l2"]},
}


def test_a_recorded_machine_compares_every_value():
    expected = load_expected(DOC, AMD)
    other_floats = {**REC, "rows": {"digest": "d2", "columns": {"id": "i", "l2": "f2"}}}
    assert expected.differences("edit-sdedit", REC) == [] and "edit-sdedit" not in expected.notes
    assert [d.split(":")[0] for d in expected.differences("edit-sdedit", other_floats)] == [
        "rows.columns.l2", "rows.digest"]


def test_another_machine_compares_all_but_the_machine_dependent_paths_and_says_so():
    expected = load_expected(DOC, ARM)
    assert expected["edit-sdedit"] == REC  # the first known machine's record
    drifted = {**REC, "rows": {"digest": "d3", "columns": {"id": "i", "l2": "f3"}}}
    assert expected.differences("edit-sdedit", drifted) == []
    assert "machine-dependent" in expected.notes["edit-sdedit"] and ARM in expected.notes["edit-sdedit"]
    wrong_ids = {**drifted, "rows": {"digest": "d3", "columns": {"id": "j", "l2": "f3"}}}
    assert [d.split(":")[0] for d in expected.differences("edit-sdedit", wrong_ids)] == ["rows.columns.id"]
    assert [d.split(":")[0] for d in expected.differences("edit-sdedit", {**REC, "config_hash": "x"})] == [
        "config_hash"]


def test_a_case_recorded_on_one_machine_only_is_compared_exactly_with_a_note():
    expected = load_expected(DOC, INTEL)
    assert expected["pairs"] == {"n": 1} and "pairs" not in expected.ignored
    assert "never on two machines" in expected.notes["pairs"]
    assert expected.differences("pairs", {"n": 2})
