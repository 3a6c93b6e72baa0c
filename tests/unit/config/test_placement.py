"""GPU counts (``auto`` or a number) resolved against a cluster's nodes, and the run figures every flow publishes."""

from __future__ import annotations

import pytest

from pixelmill.config import CampaignConfig, ConfigError, EditConfig, RetrieveConfig, VideoConfig
from pixelmill.config.placement import NO_GPUS, GpuRequest, PlacementError, check_gpu_requests, resolve_gpus
from pixelmill.flows.summary import RunFigures, combine, reason_counts, reason_key

EDIT = {"input": "in", "output": "out", "method": "sdedit", "model": "m", "prompt": "p"}


def test_gpu_counts_default_to_auto_everywhere():
    assert EditConfig.model_validate(EDIT).placement.gpus == "auto"
    video = VideoConfig.model_validate({"input": "v", "output": "o", "edit": {"method": "sdedit", "model": "m",
                                                                              "prompt": "p"}})
    assert video.placement.gpus == "auto"
    campaign = CampaignConfig.model_validate({
        "output": "o", "model": "m", "concepts": {"dog": {"instance_data": "d", "token": "<d>", "class_word": "dog"}},
        "jobs": [{"name": "lora", "method": "lora", "concepts": ["dog"], "settings": {"num_workers": 2}}]})
    (request,) = campaign.gpu_requests()
    assert (request.field, request.value, request.workers, request.per_job) == ("jobs[lora].num_gpus", "auto", 2, True)
    assert RetrieveConfig.model_validate({"prompts": ["a dog"], "pool": "p", "output": "o"}).gpu_requests() == []


def test_a_gpu_count_is_auto_or_a_non_negative_number():
    assert EditConfig.model_validate({**EDIT, "placement": {"gpus": 0.5}}).placement.gpus == 0.5
    assert EditConfig.model_validate({**EDIT, "num_gpus_per_worker": 2}).placement.gpus == 2  # the old key
    for bad in ("two", -1):
        with pytest.raises(Exception, match="gpus"):
            EditConfig.model_validate({**EDIT, "placement": {"gpus": bad}})


def test_auto_uses_a_gpu_where_the_cluster_has_them_and_says_so_where_not():
    auto = GpuRequest("placement.gpus", "auto", workers=3)
    on_cpu = resolve_gpus(auto, [0, 0, 0])
    assert (on_cpu.gpus, on_cpu.note) == (0.0, NO_GPUS)
    assert resolve_gpus(auto, []).note == NO_GPUS  # not connected: no nodes, no GPUs
    on_gpu = resolve_gpus(auto, [0, 1, 0])
    assert (on_gpu.gpus, on_gpu.note) == (1.0, None)
    assert resolve_gpus(auto, [0.5]).gpus == 0.5  # a fractional GPU node: its share


def test_auto_for_a_data_parallel_job_needs_a_whole_gpu_per_worker():
    job = GpuRequest("jobs[lora].num_gpus", "auto", workers=2, per_job=True, whole=True)
    two = resolve_gpus(job, [0, 1, 1])
    assert (two.gpus, two.total, two.note) == (1.0, 2.0, None)
    one = resolve_gpus(job, [0, 1, 0])
    assert one.total == 0 and "2 workers need one whole GPU each" in one.note and "per node: 0, 1, 0" in one.note


def test_an_explicit_count_the_cluster_cannot_provide_is_refused_naming_the_field():
    with pytest.raises(PlacementError, match=r"placement.gpus: 1 GPU\(s\) asked per worker, but the Ray cluster "
                                             r"has no GPUs.*auto"):
        resolve_gpus(GpuRequest("placement.gpus", 1), [0, 0])
    with pytest.raises(PlacementError, match=r"per node: 1, 1"):
        resolve_gpus(GpuRequest("placement.gpus", 2), [1, 1])  # no node has two
    with pytest.raises(PlacementError, match=r"jobs\[x\].num_gpus: 2 GPU\(s\) asked \(1 for each of 2 workers\)"):
        resolve_gpus(GpuRequest("jobs[x].num_gpus", 2, workers=2, per_job=True), [0, 1, 0])
    assert issubclass(PlacementError, ConfigError)  # the CLI's exit status 2


def test_an_explicit_count_the_cluster_can_provide_is_used_as_given():
    assert resolve_gpus(GpuRequest("placement.gpus", 1, workers=4), [0, 1]).gpus == 1  # the pool grows to what fits
    assert resolve_gpus(GpuRequest("j", 2, workers=2, per_job=True), [1, 1]).gpus == 1
    assert resolve_gpus(GpuRequest("placement.gpus", 0.25), [1]).gpus == 0.25
    zero = resolve_gpus(GpuRequest("placement.gpus", 0), [0])
    assert (zero.gpus, zero.note) == (0.0, None)  # CPU on purpose: nothing to say
    assert [c.gpus for c in check_gpu_requests([GpuRequest("a", "auto"), GpuRequest("b", 0)], [2])] == [1.0, 0.0]


def test_run_figures_table_and_chained_runs():
    f = RunFigures(flow="bulk-edit", output="s3://b/out", rows_in=10, rows_out=7,
                   rejected=reason_counts(["nsfw", "cannot decode image: bad header", "nsfw"]),
                   seconds=2.0, gpu_hours=0.5, notes=[NO_GPUS])
    assert f.key == "pixelmill-bulk-edit-summary" and f.throughput == 3.5
    table = {r["figure"]: r["value"] for r in f.table()}
    assert table["rows in"] == 10 and table["rows out"] == 7 and table["rejected"] == 3
    assert table["rejected: nsfw"] == 2 and table["rejected: cannot decode image"] == 1
    assert table["throughput (rows/s)"] == 3.5 and table["GPU-hours"] == 0.5 and table["output"] == "s3://b/out"
    assert table["note"] == NO_GPUS and NO_GPUS in f.line()
    assert reason_key("") == "unknown"

    g = RunFigures(flow="finetune", output="o2", unit_in="jobs", unit_out="jobs", rows_in=2, rows_out=1,
                   rejected={"failed: RuntimeError": 1}, seconds=3.0, gpu_hours=1.0)
    chain = combine("pipeline", "o2", [f, g])
    assert (chain.rows_in, chain.unit_in, chain.rows_out, chain.unit_out) == (10, "rows", 1, "jobs")
    assert chain.rejected == {"bulk-edit: nsfw": 2, "bulk-edit: cannot decode image": 1,
                              "finetune: failed: RuntimeError": 1}
    assert chain.gpu_hours == 1.5 and chain.seconds == 5.0 and chain.notes == [f"bulk-edit: {NO_GPUS}"]


def test_every_command_refuses_gpus_the_cluster_lacks_the_same_way():
    """edit, pairs, video, fine-tuning and pipeline steps all list their GPU counts; one rule checks them."""
    from pixelmill.config import PairsConfig
    from pixelmill.config.pipeline import pipeline_gpu_requests

    configs = {
        "edit": EditConfig.model_validate({**EDIT, "placement": {"gpus": 1}}),
        "pairs": PairsConfig.model_validate({"input": "i", "output": "o", "images": {"model": "m", "clip_model": "c"},
                                             "num_gpus_per_worker": 1}),
        "video": VideoConfig.model_validate({"input": "v", "output": "o", "num_gpus": 1,
                                             "edit": {"method": "sdedit", "model": "m", "prompt": "p"}}),
        "finetune": CampaignConfig.model_validate({
            "output": "o", "model": "m", "concepts": {"d": {"instance_data": "d", "token": "<d>", "class_word": "d"}},
            "defaults": {"num_gpus": 1}, "jobs": [{"name": "j", "method": "lora", "concepts": ["d"]}]}),
    }
    for name, cfg in configs.items():
        requests = cfg.gpu_requests()
        assert requests, name
        assert [c.gpus for c in check_gpu_requests(requests, [0, 1])] == [1.0], name
        with pytest.raises(PlacementError, match="has no GPUs"):
            check_gpu_requests(requests, [0, 0])
        auto = cfg.model_copy(update={"placement": cfg.placement.model_copy(update={"gpus": "auto"})})
        if name != "finetune":  # a job's num_gpus (set in defaults) wins over placement
            assert check_gpu_requests(auto.gpu_requests(), [0])[0].note == NO_GPUS, name

    steps = [{"name": "a", "uses": "edit", "data": {**EDIT, "placement": {"gpus": 2}}},
             {"name": "b", "uses": "edit", "data": {**EDIT, "input": "${steps.a.output}"}}]
    requests = pipeline_gpu_requests(steps)
    assert [(r.field, r.value) for r in requests] == [("steps.a: placement.gpus", 2),
                                                      ("steps.b: placement.gpus", "auto")]
    with pytest.raises(PlacementError, match=r"steps.a: placement.gpus: 2 GPU\(s\) asked per worker"):
        check_gpu_requests(requests, [1])
