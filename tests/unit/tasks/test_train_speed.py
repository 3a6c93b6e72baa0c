"""The trainer's speed levers keep its numbers: per-sample draws made on the device, batched
VAE encodes, the AdamW kernel choice, and the bucketed gradient all-reduce (a real 2-process
gloo group on 127.0.0.1)."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

from pixelmill.tasks.train.data import generator, per_sample
from pixelmill.tasks.train.optim import adamw_kernel, all_reduce_bucketed, make_adamw, set_adamw_kernel


def _param(device: str, dtype=torch.float32):
    # only .device and .dtype are read: a CUDA "parameter" without a GPU
    return SimpleNamespace(device=torch.device(device), dtype=dtype)


def test_adamw_kernel_is_fused_only_when_every_parameter_is_a_floating_cuda_tensor():
    assert adamw_kernel([_param("cuda"), _param("cuda:1", torch.bfloat16)]) == {"fused": True}
    assert adamw_kernel([_param("cpu"), _param("cpu")]) == {"foreach": True}
    assert adamw_kernel([_param("cuda"), _param("cpu")]) == {"foreach": True}
    assert adamw_kernel([_param("cuda"), _param("cuda", torch.int64)]) == {"foreach": True}
    assert adamw_kernel([]) == {"foreach": True}
    assert adamw_kernel([torch.zeros(2)]) == {"foreach": True}


def test_foreach_adamw_on_the_cpu_gives_the_per_tensor_loops_numbers():
    torch.manual_seed(0)
    ref = [torch.randn(n, requires_grad=True) for n in (3, 17, 64)]
    mine = [p.detach().clone().requires_grad_(True) for p in ref]
    a = torch.optim.AdamW(ref, lr=1e-2, weight_decay=1e-2, foreach=False)
    b = make_adamw(mine, lr=1e-2, weight_decay=1e-2)
    assert b.param_groups[0]["foreach"] is True
    for step in range(5):
        g = [torch.randn(p.shape, generator=generator(0, step, i, "g")) for i, p in enumerate(ref)]
        for ps, opt in ((ref, a), (mine, b)):
            for p, gi in zip(ps, g):
                p.grad = gi.clone()
            opt.step()
    for p, q in zip(ref, mine):
        assert torch.equal(p, q)
    # a checkpoint's flags are replaced by this machine's choice on load
    sd = b.state_dict()
    sd["param_groups"][0]["fused"], sd["param_groups"][0]["foreach"] = True, None
    b.load_state_dict(sd)
    set_adamw_kernel(b)
    assert b.param_groups[0]["fused"] is False and b.param_groups[0]["foreach"] is True


def test_per_sample_draws_on_the_cpu_are_the_cpu_generators_numbers():
    ids = ["a", "b", "c"]
    noise = per_sample(ids, 7, 3, "noise", torch.device("cpu"), (4, 8, 8))
    t = per_sample(ids, 7, 3, "t", torch.device("cpu"), high=1000)
    for k, i in enumerate(ids):
        assert torch.equal(noise[k], torch.randn((4, 8, 8), generator=generator(7, 3, i, "noise")))
        assert int(t[k]) == int(torch.randint(0, 1000, (), generator=generator(7, 3, i, "t")))
    assert t.dtype == torch.int64 and t.shape == (3,)
    # a sample's draw does not depend on the batch it is in
    assert torch.equal(per_sample(["c", "a"], 7, 3, "noise", torch.device("cpu"), (4, 8, 8))[1], noise[0])


def test_batched_vae_encode_matches_one_image_at_a_time():
    from diffusers import AutoencoderKL

    from pixelmill.tasks.train.core import Trainer

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, latent_channels=4).eval()
    holder = SimpleNamespace(vae=vae, device=torch.device("cpu"), _need=lambda *names: None)
    pixels = [torch.rand(3, 32, 32) * 2 - 1 for _ in range(3)] + [torch.rand(3, 32, 48) * 2 - 1]
    batched = Trainer.posteriors(holder, pixels)
    chunked = Trainer.posteriors(holder, pixels, chunk=2)
    with torch.no_grad():
        for px, (mean, std), (mean2, _) in zip(pixels, batched, chunked):
            one = vae.encode(px[None]).latent_dist
            torch.testing.assert_close(mean, one.mean[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(std, one.std[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(mean2, mean, rtol=1e-5, atol=1e-6)
    assert batched[3][0].shape == (4, 16, 24)


# -- the bucketed all-reduce, on a real 2-process gloo group ------------------------------

def _tensors(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    shapes = [(3,), (5, 7), (1000,), (2, 3, 4), (300, 300), (1,), (64, 64)]
    out = [torch.randn(s, generator=g) for s in shapes]
    out.insert(2, torch.randn(11, generator=g).double())  # another dtype: its own bucket
    return out


def _worker(rank: int, port: int, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        ref = _tensors(rank)
        for t in ref:
            dist.all_reduce(t)
        results = {}
        for bucket_bytes in (1, 4096, 100_000, 1 << 30):
            mine = _tensors(rank)
            calls = all_reduce_bucketed(mine, bucket_bytes=bucket_bytes)
            results[bucket_bytes] = (calls, all(torch.equal(a, b) for a, b in zip(ref, mine)))
        queue.put((rank, results))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_bucketed_all_reduce_equals_one_all_reduce_per_tensor_on_two_gloo_processes():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = dict(queue.get(timeout=100) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
    assert all(p.exitcode == 0 for p in procs)
    for rank in (0, 1):
        res = got[rank]
        assert all(same for _, same in res.values()), res
        # 8 tensors: one call each at 1 byte; 2+2 float32 buckets and the float64 at 100 kB; 1+1 at 1 GiB
        assert res[1][0] == 8 and res[1 << 30][0] == 2 and res[100_000][0] == 3, res


# -- the compiled UNet step ----------------------------------------------------------------

# `make sweep`, not `make test`: torch.compile's first compile of the tiny UNet's forward and backward
# is most of its 40-110 s (113 s of the suite's 63 minutes on the slow 2-core machine of 2026-12-05)
@pytest.mark.sweep
def test_a_compiled_lora_job_trains_as_the_eager_one_and_keeps_its_job_id(tiny_models, tmp_path, one_torch_thread):
    """``compile: true`` runs the UNet step through torch.compile: the same losses and LoRA weights
    within float rounding, the adapter saved from the UNet itself, and the same job id (a speed setting)."""
    from pixelmill.config import CampaignConfig
    from pixelmill.samples import draw_concept_images, write_image_dataset
    from pixelmill.tasks.train.job import _setup
    from pixelmill.tasks.train.plan import plan_campaign

    dog = write_image_dataset(str(tmp_path / "dog"), draw_concept_images(4, seed=0))

    def spec(compiled: bool) -> dict:
        return plan_campaign(CampaignConfig.model_validate({
            "output": str(tmp_path / f"out-{compiled}"), "model": tiny_models["img2img"],
            "concepts": {"dog": {"instance_data": dog, "token": "sks", "class_word": "dog"}},
            "defaults": dict(resolution=64, max_steps=3, train_batch_size=2, learning_rate=1e-2, center_crop=True,
                             random_flip=False, compile=compiled),
            "jobs": [{"method": "lora", "concepts": ["dog"]}]})).jobs[0].spec

    specs = {c: spec(c) for c in (False, True)}
    assert specs[True]["id"] == specs[False]["id"]
    runs = {}
    for c, spec in specs.items():
        _, _, trainer = _setup(spec, torch.device("cpu"))
        assert (trainer.unet_call is not trainer.unet) == c
        start = {k: p.detach().clone() for k, p in trainer.params.items()}
        losses = [trainer.step(step).loss for step in range(3)]
        runs[c] = (losses, {k: p.detach() - start[k] for k, p in trainer.params.items()})
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-4, atol=1e-6)
    moved = max(d.abs().max().item() for d in runs[False][1].values())
    assert moved > 1e-2  # three AdamW steps at lr 1e-2 moved the LoRA weights
    for k, d in runs[False][1].items():  # the same updates, within float rounding amplified by AdamW
        torch.testing.assert_close(runs[True][1][k], d, rtol=0, atol=moved * 1e-2)
