"""Deployments without a server: cluster/prefect.yaml through Prefect's own loader and models,
the `schedule:` / `deployment:` config keys (validated, never hashed), and what
`pixelmill deploy` would send as a deployment's parameters."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pixelmill.config import CampaignConfig, ConfigError, EditConfig, PairsConfig, RetrieveConfig, VideoConfig
from pixelmill.config import load_config as load

ROOT = Path(__file__).resolve().parents[2]
PREFECT_YAML = ROOT / "cluster" / "prefect.yaml"
MODELS = {"edit": EditConfig, "retrieve": RetrieveConfig, "pairs": PairsConfig, "finetune": CampaignConfig,
          "video": VideoConfig}


def _prefect_yaml_deployments() -> list[dict]:
    from prefect.cli.deploy._models import PrefectYamlModel

    raw = yaml.safe_load(PREFECT_YAML.read_text())
    model = PrefectYamlModel.model_validate(raw)  # what `prefect deploy` validates the file with
    assert model.deployments and model.pull, "deployments and a pull step (the working folder) expected"
    return [d.model_dump(exclude_unset=True, mode="json") for d in model.deployments]


def test_prefect_yaml_is_valid_for_prefect_and_every_flow():
    from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy
    from prefect.flows import load_flow_from_entrypoint

    from pixelmill.cli.deploy import KINDS
    from pixelmill.config.base import DeploymentSettings
    from pixelmill.config.pipeline import PipelineConfig
    from pixelmill.flows.deployed import FLOWS

    assert set(KINDS) == set(FLOWS), "the CLI's deployable kinds are the deployment entrypoints"

    deployments = _prefect_yaml_deployments()
    kinds = set()
    for d in deployments:
        where = d["name"]
        # a module path, imported as a worker imports it (no file path, no code pulled)
        assert ":" not in d["entrypoint"] and d["entrypoint"].startswith("pixelmill.flows.deployed."), where
        flow = load_flow_from_entrypoint(d["entrypoint"], use_placeholder_flow=False)
        kind = d["entrypoint"].rsplit(".", 1)[1]
        assert flow is FLOWS[kind], where
        kinds.add(kind)
        flow.validate_parameters(d["parameters"])  # raises on parameters the flow does not take
        # the parameter names a config of the right kind (the work folder is the repository's layout)
        config = ROOT / d["parameters"]["config"]
        assert config.is_file(), f"{where}: {config} missing"
        if kind == "run":
            cfg = load(PipelineConfig, config)
            assert all(s.config is None or (config.parent / s.config).is_file() for s in cfg.steps)
        else:
            load(MODELS[kind], config)
        assert d["work_pool"]["name"] == DeploymentSettings().work_pool, where
        limit = d["concurrency_limit"]
        assert limit["limit"] == 1, where
        ConcurrencyLimitStrategy(limit["collision_strategy"])
        for s in d.get("schedules") or []:
            _schedule_config_to_deployment_schedule(s)
    assert kinds == set(KINDS), f"one deployment per flow expected; missing {set(KINDS) - kinds}"
    nightly = [d for d in deployments if d.get("schedules")]
    assert [(d["entrypoint"], d["schedules"][0]["cron"]) for d in nightly] == [
        ("pixelmill.flows.deployed.edit", "0 2 * * *")]
    assert len({d["name"] for d in deployments}) == len(deployments)


def test_broken_prefect_yaml_copies_fail_the_same_checks(tmp_path):
    """The checks above can fail: an unknown entrypoint, a wrong parameter, a bad cron."""
    from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule
    from prefect.exceptions import MissingFlowError, ParameterTypeError, SignatureMismatchError
    from prefect.flows import load_flow_from_entrypoint

    d = _prefect_yaml_deployments()[0]
    with pytest.raises((MissingFlowError, AttributeError, ImportError)):
        load_flow_from_entrypoint("pixelmill.flows.deployed.nope", use_placeholder_flow=False)
    flow = load_flow_from_entrypoint(d["entrypoint"], use_placeholder_flow=False)
    with pytest.raises((ParameterTypeError, SignatureMismatchError)):
        flow.validate_parameters({"cfg": "configs/edit-sdedit.yaml"})
    with pytest.raises(ParameterTypeError):
        flow.validate_parameters({"config": 3})
    with pytest.raises(ValueError):
        _schedule_config_to_deployment_schedule({"cron": "0 2 * *x", "timezone": "UTC"})


@pytest.mark.parametrize("config, kind", [
    ("edit-sdedit.yaml", "edit"), ("edit-ip2p.yaml", "edit"), ("retrieve.yaml", "retrieve"),
    ("pairs.yaml", "pairs"), ("finetune.yaml", "finetune"), ("video-homography.yaml", "video"),
    ("video-neural.yaml", "video"), ("pipeline-ip2p.yaml", "run"), ("pipeline-dreambooth.yaml", "run"),
])
def test_deploy_tells_which_flow_a_config_is_for(config, kind):
    from pixelmill.cli.deploy import guess_kind

    assert guess_kind(yaml.safe_load((ROOT / "configs" / config).read_text())) == kind


def test_schedule_keys_are_validated_and_never_hashed(tmp_path):
    edit = load(EditConfig, ROOT / "configs" / "edit-sdedit.yaml")
    scheduled = load(EditConfig, ROOT / "configs" / "edit-sdedit.yaml", [
        "schedule.cron=0 2 * * *", "schedule.timezone=Europe/Berlin", "deployment.name=nightly",
        "deployment.concurrency_limit=2", "deployment.collision_strategy=cancel_new"])
    assert scheduled.schedule.cron == "0 2 * * *" and scheduled.deployment.concurrency_limit == 2
    assert edit.output_affecting() == scheduled.output_affecting()
    for model, name, fn in [(RetrieveConfig, "retrieve.yaml", "output_affecting"),
                            (PairsConfig, "pairs.yaml", "pairs_affecting"),
                            (VideoConfig, "video-homography.yaml", "output_affecting")]:
        a = load(model, ROOT / "configs" / name)
        b = load(model, ROOT / "configs" / name, ["schedule.interval=3600", "deployment.work_pool=gpu"])
        assert getattr(a, fn)() == getattr(b, fn)(), name
    # every flow config and the pipeline config take the keys
    load(CampaignConfig, ROOT / "configs" / "finetune.yaml", ["schedule.interval=60"])
    from pixelmill.config.pipeline import PipelineConfig

    assert load(PipelineConfig, ROOT / "configs" / "pipeline-ip2p.yaml",
                ["schedule.cron=0 3 * * 1"]).schedule.cron == "0 3 * * 1"
    bad = [(["schedule.cron=every night"], "not a valid cron line"),
           (["schedule.interval=0"], "greater than or equal to 1"),
           (["schedule.cron=0 2 * * *", "schedule.interval=60"], "exactly one of"),
           (["schedule.cron=0 2 * * *", "schedule.timezone=Mars/Base"], "not an IANA time zone"),
           (["deployment.concurrency_limit=0"], "deployment.concurrency_limit"),
           (["deployment.collision_strategy=drop"], "deployment.collision_strategy"),
           (["deployment.name=a/b"], "deployment.name")]
    for overrides, message in bad:
        with pytest.raises(ConfigError, match=message):
            load(EditConfig, ROOT / "configs" / "edit-sdedit.yaml", overrides)


def test_deploy_parameters_are_the_checked_config_with_absolute_paths(tmp_path, tiny_models, monkeypatch):
    """What a worker gets: the config's contents (paths absolute, step files inlined), valid for the flow."""
    from pixelmill.cli.deploy import prepare
    from pixelmill.config.pipeline import PipelineConfig
    from pixelmill.flows.deployed import edit, run
    from tests.helpers.edit_inputs import sample_dataset

    images, _ = sample_dataset(tmp_path, n=2, corrupt=0, seed=1, buckets=1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "edit.yaml").write_text(yaml.safe_dump({
        "input": "images", "output": "out/edited", "model": tiny_models["img2img"], "prompt": "a cat",
        "steps": 2, "resolution": 32, "schedule": {"cron": "0 2 * * *"}, "deployment": {"name": "nightly"}}))
    item = prepare(str(tmp_path / "edit.yaml"), [])
    assert (item["kind"], item["name"]) == ("edit", "nightly")
    config = item["parameters"]["config"]
    assert config["input"] == images and config["output"] == str(tmp_path / "out" / "edited")
    assert "schedule" not in config and "deployment" not in config
    edit.validate_parameters(item["parameters"])
    assert EditConfig.model_validate(config).output_affecting() == item["cfg"].preflight().output_affecting()

    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump({"steps": [
        {"name": "one", "uses": "edit", "config": "edit.yaml", "with": {"output": "out/one"}},
        {"name": "two", "uses": "edit", "config": "edit.yaml",
         "with": {"input": "${steps.one.output}", "output": "out/two"}}]}))
    item = prepare(str(tmp_path / "pipe.yaml"), ["schedule.interval=3600"])
    assert item["kind"] == "run" and item["cfg"].schedule.interval == 3600
    run.validate_parameters(item["parameters"])
    pipe = PipelineConfig.model_validate(item["parameters"]["config"])
    one, two = (s.with_ for s in pipe.steps)
    assert all(s.config is None for s in pipe.steps)  # the base file is inlined: a worker has no copy
    assert one["input"] == images and one["output"] == str(tmp_path / "out" / "one") and one["prompt"] == "a cat"
    assert two["input"] == "${steps.one.output}" and two["prompt"] == "a cat"


def test_deploy_refuses_without_a_reachable_server(tmp_path, tiny_models, monkeypatch, capsys):
    """No embedded server for deploy: exit 2 naming PREFECT_API_URL, before anything is registered."""
    from pixelmill.cli import main
    from tests.helpers.edit_inputs import sample_dataset

    images, _ = sample_dataset(tmp_path / "in", n=1, corrupt=0, seed=5, buckets=1)
    cfg = tmp_path / "e.yaml"
    cfg.write_text(yaml.safe_dump({"input": images, "output": str(tmp_path / "out"), "model": tiny_models["img2img"],
                                   "prompt": "a cat", "steps": 2, "resolution": 32}))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(["deploy", str(cfg)]) == 2
    assert "PREFECT_API_URL is not set" in capsys.readouterr().err
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert main(["deploy", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "does not answer" in err and "127.0.0.1:9" in err and "Traceback" not in err, err


def test_the_notify_url_comes_from_the_environment_and_is_never_shown_whole(monkeypatch):
    from pixelmill.cli.commands import UsageError
    from pixelmill.cli.deploy import notify_url, redacted_url

    secret = "https://hooks.example.com/services/T000/B000/XXXXsecretXXXX"
    monkeypatch.setenv("PIXELMILL_NOTIFY_URL", secret)
    assert notify_url("") == secret and notify_url(None) is None
    assert notify_url("http://127.0.0.1:9/hook") == "http://127.0.0.1:9/hook"
    assert redacted_url(secret) == "https://hooks.example.com/…"
    assert redacted_url("http://127.0.0.1:9/hook?token=abc") == "http://127.0.0.1:9/…"
    monkeypatch.delenv("PIXELMILL_NOTIFY_URL")
    with pytest.raises(UsageError, match=r"\$PIXELMILL_NOTIFY_URL, which is not set"):
        notify_url("")
    with pytest.raises(UsageError, match="not an http"):
        notify_url("file:///etc/passwd")
