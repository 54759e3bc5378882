"""Elastic training without Ray: the pipeline keys (``scaling.num_workers: [min, max]``, ``scaling.on_resize``),
what a world size does to the LR and the accumulation (the linear scaling rule, Goyal et al. 2017), gradient
accumulation against one step on the whole batch, the exact sharding of an epoch for any world size, and the run
log's resize record. The resizes themselves (Ray Train on a multi-node cluster) are in ``tests/test_multinode.py``."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from raydet.commands.loaders import shard_records
from raydet.commands.ray_setup import scaling_config
from raydet.commands.sections import parse_sections
from raydet.config import load_config
from raydet.engine.elastic import world_plan
from raydet.engine.hooks import LrSchedulerHook, OptimizerHook
from raydet.engine.optim import LrScheduleConfig
from raydet.registry import ConfigError

QUICKSTART = Path(__file__).resolve().parents[1] / "pipelines" / "quickstart.yaml"


def _sections(*overrides):
    return parse_sections(load_config(QUICKSTART, list(overrides)))


def test_num_workers_min_max_is_ray_trains_elastic_scaling():
    s = _sections("scaling.num_workers=[1, 4]", "scaling.elastic_resize_monitor_interval_s=5")
    assert (s.scaling.elastic, s.scaling.min_workers, s.scaling.max_workers) == (True, 1, 4)
    config = scaling_config(s)
    assert config.num_workers == (1, 4) and config.elasticity_enabled
    assert config.elastic_resize_monitor_interval_s == 5
    fixed = scaling_config(_sections("scaling.num_workers=3"))
    assert fixed.num_workers == 3 and not fixed.elasticity_enabled


@pytest.mark.parametrize("override, key, message", [
    ("scaling.num_workers=[2, 1]", "scaling.num_workers", "[min, max] with 1 <= min <= max"),
    ("scaling.num_workers=[0, 2]", "scaling.num_workers", "[min, max] with 1 <= min <= max"),
    ("scaling.num_workers=[1, 2, 3]", "scaling.num_workers", "[min, max] with 1 <= min <= max"),
    ("scaling.on_resize=keep_global", "scaling.on_resize", "did you mean 'keep_global_batch'"),
    ("scaling.elastic_resize_monitor_interval_s=-1", "scaling.elastic_resize_monitor_interval_s", ">= 0"),
])
def test_bad_scaling_keys_are_named(override, key, message):
    with pytest.raises(ConfigError) as info:
        _sections(override)
    assert key in str(info.value) and message in str(info.value)


def test_keep_global_batch_refuses_world_sizes_that_do_not_divide_the_reference():
    # quickstart: base_batch_size 4, images_per_worker 4: worlds 2 and 3 of [1, 3] cannot keep 4 images per step;
    # a reference of 4 x lcm(1, 2, 3) = 24 images would work for all three
    with pytest.raises(ConfigError) as info:
        _sections("scaling.num_workers=[1, 3]", "scaling.on_resize=keep_global_batch")
    text = str(info.value)
    assert "scaling.on_resize" in text and "optimizer.base_batch_size (4)" in text
    assert "which 2, 3 are not" in text and "a multiple of 24" in text
    s = _sections("scaling.num_workers=[1, 3]", "scaling.on_resize=keep_global_batch",
                  "optimizer.base_batch_size=24")
    assert s.scaling.on_resize == "keep_global_batch"


def test_world_plan_scales_the_lr_linearly_or_keeps_the_global_batch():
    # Faster R-CNN 1x: lr 0.02 for 16 images; 2 images per worker (the paper's 8 GPUs x 2)
    for world, lr in ((8, 0.02), (4, 0.01), (1, 0.0025)):
        plan = world_plan("scale_lr", world, 2, 0.02, 16)
        assert (plan.accumulation, plan.global_batch) == (1, 2 * world) and plan.lr == pytest.approx(lr)
    assert world_plan("scale_lr", 4, 2, 0.02, 16, scale_lr=False).lr == 0.02
    for world, steps in ((8, 1), (4, 2), (2, 4), (1, 8)):
        plan = world_plan("keep_global_batch", world, 2, 0.02, 16)
        assert (plan.accumulation, plan.global_batch) == (steps, 16) and plan.lr == pytest.approx(0.02)
    with pytest.raises(ConfigError, match="which 3 is not"):
        world_plan("keep_global_batch", 3, 2, 0.02, 16)


def _sgd_runner(model, lr=0.1):
    return SimpleNamespace(optimizer=torch.optim.SGD(model.parameters(), lr=lr), epoch=0, iter=0, losses={},
                           loss=None)


def _iterate(hook, runner, model, batch):
    x, y = batch
    runner.loss = ((model(x) - y) ** 2).mean()
    runner.losses = {"loss_mse": runner.loss}
    hook.after_train_iter(runner)


def test_gradient_accumulation_steps_once_on_the_mean_of_its_batches():
    torch.manual_seed(0)
    x, y = torch.randn(6, 3), torch.randn(6, 1)
    batches = [(x[0:2], y[0:2]), (x[2:4], y[2:4]), (x[4:6], y[4:6])]
    model = torch.nn.Linear(3, 1)
    start = [p.detach().clone() for p in model.parameters()]
    reference = torch.nn.Linear(3, 1)
    reference.load_state_dict(model.state_dict())

    hook, runner = OptimizerHook(nonfinite="stop", device="cpu", accumulation=2), _sgd_runner(model)
    _iterate(hook, runner, model, batches[0])
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), start))  # no step after 1 of 2
    _iterate(hook, runner, model, batches[1])
    # one plain SGD step on the mean loss over the 4 images of both batches (equal sizes)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    ((reference(x[:4]) - y[:4]) ** 2).mean().backward()
    ref_opt.step()
    for p, r in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, r)

    # the epoch ends after a third batch: its group of one steps at the end, on that batch's own mean
    _iterate(hook, runner, model, batches[2])
    assert hook.pending == 1
    hook.after_train_epoch(runner)
    ref_opt.zero_grad()
    ((reference(x[4:]) - y[4:]) ** 2).mean().backward()
    ref_opt.step()
    for p, r in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, r)
    assert hook.pending == 0


def _ddp_accumulating_worker(rank: int, world: int, port: int, out: str) -> None:
    """One of two gloo DDP processes: 3 iterations of 2 images each with accumulation 2, then the epoch's end."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(3, 1))
    x, y = torch.randn(12, 3, generator=torch.Generator().manual_seed(1)), torch.randn(12, 1)
    runner = SimpleNamespace(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), epoch=0, iter=0,
                             losses={}, loss=None)
    hook = OptimizerHook(device="cpu", accumulation=2)
    syncs, first_grad = [], None
    for k in range(3):  # iteration k of rank r reads images (2k + r) * 2 .. + 2
        lo = (2 * k + rank) * 2
        hook.before_train_iter(runner)
        syncs.append(model.require_backward_grad_sync)
        runner.loss = ((model(x[lo:lo + 2]) - y[lo:lo + 2]) ** 2).mean()
        runner.losses = {"loss_mse": runner.loss}
        hook.after_train_iter(runner)
        if k == 0:
            first_grad = model.module.weight.grad.clone()
    hook.after_train_epoch(runner)
    torch.save({"syncs": syncs, "first_grad": first_grad, "x": x, "y": y,
                "params": [p.detach().clone() for p in model.module.parameters()]}, f"{out}/{rank}.pt")
    dist.barrier()  # neither rank closes its gloo connections while the other still uses them
    dist.destroy_process_group()


def test_accumulation_under_ddp_all_reduces_once_per_group_and_steps_like_one_process(tmp_path):
    """Two gloo processes, accumulation 2, three iterations: the first backward of a group is not all-reduced (its
    gradient is the rank's own batch's, halved), the group's second is; the epoch's last group of one iteration is
    averaged over the ranks at the step. The weights equal single-process SGD: a step on the mean over the 8
    images of iterations 0-1 of both ranks, then one on the 4 images of iteration 2."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_accumulating_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"{r}.pt") for r in (0, 1)]
    x, y = results[0]["x"], results[0]["y"]
    torch.manual_seed(0)
    reference = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for rank, result in enumerate(results):
        assert result["syncs"] == [False, True, False]  # the third opens a group the epoch ends
        lo = rank * 2
        local = torch.nn.Linear(3, 1)
        local.load_state_dict(reference.state_dict())
        (((local(x[lo:lo + 2]) - y[lo:lo + 2]) ** 2).mean() / 2).backward()
        torch.testing.assert_close(result["first_grad"], local.weight.grad)  # not averaged with the other rank
    ((reference(x[:8]) - y[:8]) ** 2).mean().backward()
    opt.step()
    opt.zero_grad()
    ((reference(x[8:]) - y[8:]) ** 2).mean().backward()
    opt.step()
    for result in results:
        for p, r in zip(result["params"], reference.parameters()):
            torch.testing.assert_close(p, r)


def _ddp_nonfinite_worker(rank: int, world: int, port: int, out: str) -> None:
    """One of two gloo DDP processes, nonfinite_loss skip: 3 iterations of 2 images; rank 1's loss is NaN at the
    second."""
    import datetime

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # a rank waiting for ever fails the test instead
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(3, 1))
    x, y = torch.randn(12, 3, generator=torch.Generator().manual_seed(1)), torch.randn(12, 1)
    runner = SimpleNamespace(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), epoch=0, iter=0,
                             losses={}, loss=None)
    hook = OptimizerHook(device="cpu", nonfinite="skip")
    for k in range(3):
        lo = (2 * k + rank) * 2
        hook.before_train_iter(runner)
        loss = ((model(x[lo:lo + 2]) - y[lo:lo + 2]) ** 2).mean()
        runner.loss = loss * float("nan") if (rank, k) == (1, 1) else loss
        runner.losses = {"loss_mse": runner.loss}
        hook.after_train_iter(runner)
        runner.iter += 1
    torch.save({"skipped": hook.skipped, "params": [p.detach().clone() for p in model.module.parameters()]},
               f"{out}/{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_a_non_finite_loss_on_one_worker_skips_the_step_on_every_worker(tmp_path):
    """nonfinite_loss skip under DDP: rank 1's NaN at iteration 1 makes both ranks skip that step (a rank that
    skipped alone would leave the other waiting in the all-reduce, or pair its all-reduces with the wrong step's);
    the weights equal single-process SGD on iterations 0 and 2 of both ranks."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_nonfinite_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"{r}.pt") for r in (0, 1)]
    torch.manual_seed(0)
    reference = torch.nn.Linear(3, 1)
    x, y = torch.randn(12, 3, generator=torch.Generator().manual_seed(1)), torch.randn(12, 1)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for lo in (0, 8):  # iteration 0: images 0-3 (ranks 0 and 1); iteration 2: images 8-11
        opt.zero_grad()
        ((reference(x[lo:lo + 4]) - y[lo:lo + 4]) ** 2).mean().backward()
        opt.step()
    for result in results:
        assert result["skipped"] == 1
        for p, r in zip(result["params"], reference.parameters()):
            torch.testing.assert_close(p, r)


@pytest.mark.parametrize("n", [10, 11, 16])
def test_every_world_size_shards_an_epoch_exactly(n):
    """Any world size covers each image of the epoch once, plus ceil(n / W) x W - n padding copies: a resize
    (which reruns the interrupted epoch from its start, raydet.engine.elastic) keeps every epoch exact."""
    records = list(range(n))
    for world in (1, 2, 3, 4):
        shards = [shard_records(records, r, world, seed=0, epoch=3, pad=True) for r in range(world)]
        assert len({len(s) for s in shards}) == 1  # every rank the same number of iterations
        seen = [i for s in shards for i in s]
        assert set(seen) == set(records)
        assert len(seen) - n == math.ceil(n / world) * world - n


def _fake_runner(base_lr, accumulation, epoch, it):
    hooks = [LrSchedulerHook(base_lr, LrScheduleConfig()), OptimizerHook(device="cpu", accumulation=accumulation)]
    return SimpleNamespace(epoch=epoch, iter=it,
                           get_hook=lambda cls: next(h for h in hooks if isinstance(h, cls)))


def test_a_new_world_size_is_logged_as_a_resize(tmp_path):
    from raydet.train import _log_worker_group

    log = tmp_path / "log.jsonl"
    sections = _sections("scaling.num_workers=[1, 2]", "data.images_per_worker=2")
    _log_worker_group(_fake_runner(0.001, 1, 0, 0), str(log), sections, ["a", "b"], None)
    _log_worker_group(_fake_runner(0.0005, 1, 1, 2), str(log), sections, ["a"], 2)
    _log_worker_group(_fake_runner(0.0005, 1, 1, 2), str(log), sections, ["a"], 1)  # same world: no resize
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["mode"] for r in records] == ["workers", "resize", "workers", "workers"]
    resize = records[1]
    assert (resize["old_world"], resize["new_world"], resize["epoch"], resize["iter"]) == (2, 1, 1, 2)
    assert (resize["lr"], resize["accumulation"], resize["global_batch"]) == (0.0005, 1, 2)
    assert records[0]["nodes"] == ["a", "b"] and records[2]["world"] == 1

    # a run folder without a log of earlier groups (a run resumed from elsewhere): the checkpoint's world size
    other = tmp_path / "other.jsonl"
    _log_worker_group(_fake_runner(0.002, 1, 4, 40), str(other), sections, ["a", "b", "c", "d"], 2)
    assert json.loads(other.read_text().splitlines()[0])["old_world"] == 2
