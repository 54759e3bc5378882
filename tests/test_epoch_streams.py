"""One actor pool for a run of epochs: EpochStreams and iter_detection_batches' epoch boundaries (no Ray)."""
from __future__ import annotations

import numpy as np

import pytest

from raydet.commands.loaders import EpochStreams
from raydet.data.image_io import CorruptImageError
from raydet.data.ray_data import epoch_order, iter_detection_batches
from raydet.data.transforms import CollateConfig


class FakeStreams:
    """``open_stream``: epoch e yields ``per_epoch[e]`` batches, each the string ``"e.k"``; records what opened."""

    def __init__(self, per_epoch: dict[int, int]):
        self.per_epoch, self.opened, self.closed = per_epoch, [], 0

    def __call__(self, first: int, count: int):
        self.opened.append((first, count))

        def gen():
            try:
                for e in range(first, first + count):
                    for k in range(self.per_epoch[e]):
                        yield e, f"{e}.{k}"
            finally:
                self.closed += 1
        return gen()


def test_one_dataset_serves_every_epoch_up_to_the_next_evaluation():
    """Six epochs, evaluation every 3: datasets for epochs 0-2 and 3-5 only; each epoch exactly 2 batches, its own
    (epoch 1 made 3: the third is skipped, as ``take`` drops it); each dataset closed after its last epoch."""
    fake = FakeStreams({e: 3 if e == 1 else 2 for e in range(6)})
    loader = EpochStreams(fake, iters_per_epoch=2, last_epoch=lambda first: first + (2 - first % 3))
    seen = [list(loader(e)) for e in range(6)]
    assert seen == [[f"{e}.0", f"{e}.1"] for e in range(6)]
    assert fake.opened == [(0, 3), (3, 3)] and fake.closed == 2 and loader.datasets_opened == 2


def test_a_resumed_or_out_of_order_epoch_opens_a_new_dataset():
    fake = FakeStreams({e: 2 for e in range(10)})
    loader = EpochStreams(fake, iters_per_epoch=2, last_epoch=lambda first: 9)
    assert list(loader(4)) == ["4.0", "4.1"]
    assert list(loader(7)) == ["7.0", "7.1"]  # not the next epoch (5): a dataset from 7 on
    assert fake.opened == [(4, 6), (7, 3)] and fake.closed == 1  # the first one stopped when the second opened
    loader.close()
    assert fake.closed == 2


def test_a_short_epoch_ends_at_the_next_epochs_first_batch():
    fake = FakeStreams({0: 1, 1: 2})
    loader = EpochStreams(fake, iters_per_epoch=2, last_epoch=lambda first: 1)
    assert list(loader(0)) == ["0.0"]
    assert list(loader(1)) == ["1.0", "1.1"]  # the batch read ahead is not lost
    assert fake.opened == [(0, 2)]


def test_a_generator_kept_by_a_caller_does_not_close_the_stream_that_replaced_it():
    fake = FakeStreams({0: 3, 1: 3})
    loader = EpochStreams(fake, iters_per_epoch=2, last_epoch=lambda first: 1)
    old = loader(0)
    assert next(old) == "0.0"
    assert list(loader(0)) == ["0.0", "0.1"]  # epoch 0 again: a new dataset
    assert list(old) == [] and fake.closed == 1  # the replaced one stops; only the first dataset was closed
    assert list(loader(1)) == ["1.0", "1.1"] and fake.closed == 2


class Rows:
    """Stands in for a Ray dataset: ``iter_batches`` yields the given column batches."""

    def __init__(self, *batches):
        self.batches = batches

    def iter_batches(self, **kwargs):
        yield from self.batches


def _rows(epochs: list[int], widths: list[int]) -> dict:
    n = len(epochs)
    images = np.empty(n, dtype=object)
    images[:] = [np.zeros((8, w, 3), np.uint8) for w in widths]
    empty = np.empty(n, dtype=object)
    empty[:] = [np.zeros((0, 4), np.float32)] * n
    labels = np.empty(n, dtype=object)
    labels[:] = [np.zeros(0, np.int64)] * n
    return {"image": images, "boxes": empty, "labels": labels, "ignore_boxes": empty.copy(),
            "image_id": np.arange(n), "index": np.arange(n), "ori_h": np.full(n, 8), "ori_w": np.array(widths),
            "scale_x": np.ones(n), "scale_y": np.ones(n), "flip": np.zeros(n, bool), "epoch": np.array(epochs),
            "error": np.array([""] * n)}


def test_no_batch_spans_two_epochs():
    """Batch size 2; epoch 0 has 3 landscape images and 1 portrait one, epoch 1 two landscape ones. Without the
    boundary the third landscape image of epoch 0 would share a batch with epoch 1's first."""
    cols = _rows([0, 0, 0, 0, 1, 1], [16, 16, 4, 16, 16, 16])  # width 4 < height 8: portrait
    out = list(iter_detection_batches(Rows(cols), 2, CollateConfig(), with_masks=False, train=True, with_epoch=True))
    assert [(e, [m["image_id"] for m in b["img_metas"]]) for e, b in out] == [(0, [0, 1]), (0, [3]), (0, [2]),
                                                                            (1, [4, 5])]


def test_an_epoch_without_a_usable_image_stops_the_run():
    """on_error=skip: every image of epoch 0 failed; the run stops naming the epoch instead of this rank running
    no iteration in it (the other ranks would wait for it forever under DDP)."""
    cols = _rows([0, 0, 1], [16, 16, 16])
    cols["error"] = np.array(["a.jpg: truncated", "b.jpg: truncated", ""])
    with pytest.raises(CorruptImageError, match=r"none of the 2 images of this worker's share of epoch 0 could be "
                                                r"used; first: a.jpg: truncated"):
        list(iter_detection_batches(Rows(cols), 2, CollateConfig(), with_masks=False, train=True))


def test_epoch_order_pads_every_rank_to_the_same_count():
    """5 records, 2 ranks: order = permutation([seed, epoch]) + its first element; rank r takes r::2."""
    perm = np.random.default_rng([0, 2]).permutation(5)
    padded = np.concatenate([perm, perm[:1]])
    for rank in (0, 1):
        assert epoch_order(5, seed=0, epoch=2, shard=(rank, 2), pad=True).tolist() == padded[rank::2].tolist()
    assert epoch_order(5, seed=None, epoch=2, shard=(1, 2)).tolist() == [1, 3]
