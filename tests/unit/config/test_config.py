"""Config loading: clear errors naming the field; overrides typed like YAML."""

from __future__ import annotations

import pytest

from pixelmill.config import ConfigError, EditConfig, load_config


def _write(tmp_path, text: str):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


BASE = "input: in\noutput: out\nmodel: m\nprompt: a painting\n"


def test_valid_config_and_overrides(tmp_path):
    cfg = load_config(EditConfig, _write(tmp_path, BASE), ["steps=12", "strength=0.3", "runtime.num_cpus=2"])
    assert cfg.steps == 12 and cfg.strength == 0.3 and cfg.runtime.num_cpus == 2


@pytest.mark.parametrize(
    "text,overrides,needle",
    [
        (BASE + "stepz: 3\n", [], "stepz: unknown key"),
        (BASE + "steps: many\n", [], "steps:"),
        ("output: out\nmodel: m\nprompt: p\n", [], "input: required key is missing"),
        (BASE, ["strength=1.5"], "strength"),
        (BASE, ["strength=auto"], "target_l2"),
        (BASE, ["strength=0.3", "steps=3"], "= 0 denoising steps; raise `steps` to at least 4"),
        ("input: in\noutput: out\nmodel: m\n", [], "sdedit needs `prompt`"),
        (BASE + "method: instruct_pix2pix\n", [], "needs `instruction`"),
        (BASE + "method: magic\n", [], "method:"),
        (BASE, ["runtime.bogus=1"], "runtime.bogus: unknown key"),
    ],
)
def test_bad_configs_name_the_field(tmp_path, text, overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(EditConfig, _write(tmp_path, text), overrides)
    assert needle in str(e.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(EditConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(EditConfig, _write(tmp_path, "a: [1,"))
    with pytest.raises(ConfigError, match="key=value"):
        load_config(EditConfig, _write(tmp_path, BASE), ["steps"])


def test_hashed_keys_exclude_placement_but_include_method_params():
    cfg = EditConfig(input="i", output="o", model="m", prompt="p")
    hashed = cfg.output_affecting()
    assert "output" not in hashed and "workers" not in hashed and "runtime" not in hashed
    assert hashed["strength"] == 0.6 and hashed["seed"] == 0 and hashed["input"] == "i"
