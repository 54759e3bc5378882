"""LoggerHook's data_wait_fraction: summed data_time / summed iteration time over an epoch, from a fed clock."""
from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import torch

import raydet.engine.hooks as hooks
from raydet.engine.hooks import LoggerHook


def test_data_wait_fraction_is_the_epochs_summed_data_time_over_its_summed_iteration_time(tmp_path, monkeypatch,
                                                                                            caplog):
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(hooks, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    hook = LoggerHook(interval=2, tensorboard=False)
    runner = SimpleNamespace(rank=0, work_dir=str(tmp_path), iter=0, epoch=0, data_time=0.0, batch={},
                             losses={"loss_cls": torch.tensor(0.5)}, loss=torch.tensor(0.5), epoch_log={},
                             optimizer=SimpleNamespace(param_groups=[{"lr": 0.01}]), device=torch.device("cpu"),
                             iters_per_epoch=0, max_epochs=2)
    hook.before_run(runner)

    def iteration(data_s, start, end):
        """One iteration that waited data_s seconds for its batch, then ran from start to end (clock seconds)."""
        runner.data_time = data_s
        clock.now = start
        hook.before_train_iter(runner)
        clock.now = end
        hook.after_train_iter(runner)
        runner.iter += 1

    caplog.set_level(logging.INFO, logger="raydet")
    hook.before_train_epoch(runner)
    iteration(0.5, 10.0, 11.5)   # iteration 2.0 s, of which 0.5 s data
    iteration(0.25, 12.0, 12.75)  # 1.0 s, 0.25 s data; the interval's record: (0.5 + 0.25) / (2.0 + 1.0)
    iteration(0.0, 13.0, 14.0)   # 1.0 s, no wait
    assert runner.epoch_log["train/data_wait_fraction"] == 0.75 / 4.0 == 0.1875
    hook.after_train_epoch(runner)
    assert "epoch 1/2: waited for data 18.8% of the training time (0.8s of 4.0s, data_wait_fraction 0.1875)" \
        in caplog.text

    runner.epoch = 1
    hook.before_train_epoch(runner)  # the sums start again
    iteration(1.0, 20.0, 21.0)    # 2.0 s, 1.0 s data; its record's window also holds epoch 1's last iteration
    assert runner.epoch_log["train/data_wait_fraction"] == 0.5
    hook.after_train_epoch(runner)

    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["iter"], r["time"], r["data_time"], r["data_wait_fraction"]) for r in records] == [
        (1, 2, 1.5, 0.375, 0.25), (2, 4, 1.5, 0.5, 0.5)]
    hook.jsonl.close()
