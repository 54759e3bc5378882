"""From a pipeline list to per-image samples, without Ray.

* :func:`build_transforms` splits a pipeline list (``train_pipeline`` / ``test_pipeline`` in the YAML files) into a
  :class:`Compose` of per-image transforms and the batch-level :class:`~raydet.data.collate.CollateConfig`
  (``Normalize`` + ``Pad``, applied by the collate step on the training worker).
* :func:`image_rng` is the random generator of one image in one epoch: ``default_rng([seed, epoch, image_id])``,
  so augmentation does not depend on which process or actor handles the image.
* :func:`load_sample` = load the image, turn the record into a sample (:func:`record_to_sample`), transform it.
  The Ray Data actors (raydet.data.ray_data) and :class:`TorchDetectionDataset` (the plain PyTorch reference
  loader) both call it, so they produce identical samples.

This module and the transforms do not import torch (the collate step does): a decode actor starts seconds faster.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from raydet.registry import build, current_path

from .image_io import size_text
from .seg_maps import read_seg_map
from .transforms import BatchTransform, CollateConfig, Normalize, Pad, Transform

__all__ = ["Compose", "build_transforms", "image_rng", "record_to_sample", "load_sample", "TorchDetectionDataset"]


class Compose:
    """Apply per-image transforms in order: ``sample = t_k(...t_1(sample, rng)..., rng)``."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        for t in self.transforms:
            sample = t(sample, rng)
        return sample

    def __len__(self) -> int:
        return len(self.transforms)

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


def build_transforms(pipeline_cfg: Sequence[dict | Transform] | None) -> tuple[Compose, CollateConfig]:
    """Pipeline list -> (per-image transforms, batch-level collate settings).

    Items are config dicts (``{"type": "Resize", ...}``, built with the registry: an unknown type is the
    registry's error) or already built transforms. ``Normalize`` and ``Pad`` must come after every per-image
    transform and appear at most once each.
    """
    per_image, norm, pad = [], None, None
    base = current_path()
    for i, item in enumerate(pipeline_cfg or []):
        where = f"{base}.pipeline[{i}]" if base else f"pipeline[{i}]"
        t = build(item, path=where) if isinstance(item, dict) else item
        name = type(t).__name__
        if isinstance(t, BatchTransform):
            if isinstance(t, Normalize):
                if norm is not None:
                    raise ValueError(f"{where}: Normalize appears twice in the pipeline")
                norm = t
            elif isinstance(t, Pad):
                if pad is not None:
                    raise ValueError(f"{where}: Pad appears twice in the pipeline")
                pad = t
            else:
                raise ValueError(f"{where}: unsupported batch-level transform {name}")
            continue
        if not callable(t):
            raise ValueError(f"{where}: expected a transform config dict or a transform, got {item!r}")
        if norm is not None or pad is not None:
            raise ValueError(f"{where}: {name} comes after Normalize/Pad; those run at batch time and must be the "
                             f"last items of the pipeline")
        per_image.append(t)
    cfg = CollateConfig()
    if norm is not None:
        cfg = CollateConfig(mean=norm.mean, std=norm.std, to_rgb=norm.to_rgb, size_divisor=cfg.size_divisor)
    if pad is not None:
        cfg = CollateConfig(mean=cfg.mean, std=cfg.std, to_rgb=cfg.to_rgb, size_divisor=pad.size_divisor)
    return Compose(per_image), cfg


def image_rng(seed: int, epoch: int, image_id: int) -> np.random.Generator:
    """The generator that drives the random transforms of one image in one epoch (all non-negative ints)."""
    return np.random.default_rng([int(seed), int(epoch), int(image_id)])


def record_to_sample(record: dict, image: np.ndarray, with_masks: bool = False,
                     seg_map: np.ndarray | None = None) -> dict:
    """A record (raydet.structures) and its decoded image -> an untransformed sample (raydet.data.transforms).

    Ignored (crowd / difficult) boxes go to ``ignore_boxes``; with ``with_masks`` the masks of the non-ignored
    instances are kept; a record's ``proposals`` (raydet.data.proposals) are kept. The image must have the record's
    (height, width). ``seg_map``: the image's uint8 (h, w) semantic map (raydet.data.seg_maps), the sample's
    ``seg_map``; it must have the image's size.
    """
    h, w = image.shape[:2]
    if (h, w) != (int(record["height"]), int(record["width"])):
        raise ValueError(f"image id {record['image_id']} ({record.get('file_name', '')}): the decoded image is "
                         f"{size_text(h, w)} but the annotations say {size_text(record['height'], record['width'])}")
    if seg_map is not None and tuple(np.shape(seg_map)) != (h, w):
        raise ValueError(f"image id {record['image_id']} ({record.get('file_name', '')}): the semantic map "
                         f"{record.get('seg_map_path', '')} is {size_text(*np.shape(seg_map)[:2])} but the image is "
                         f"{size_text(h, w, words=False)}")
    boxes = np.asarray(record["boxes"], np.float32).reshape(-1, 4)
    ignore = np.asarray(record.get("ignore", np.zeros(len(boxes), bool)), bool).reshape(-1)
    keep = ~ignore
    sample = {
        "image": image,
        "boxes": boxes[keep],
        "labels": np.asarray(record["labels"], np.int64).reshape(-1)[keep],
        "ignore_boxes": boxes[ignore],
        "image_id": int(record["image_id"]),
        "ori_shape": (h, w),
        "img_shape": (h, w),
        "scale_factor": (1.0, 1.0),
        "flip": False,
    }
    if with_masks:
        masks = record.get("masks")
        if masks is None or len(masks) != len(boxes):
            raise ValueError(f"image id {record['image_id']}: with_masks=True needs one mask per box, got "
                             f"{None if masks is None else len(masks)} masks for {len(boxes)} boxes")
        sample["masks"] = [masks[i] for i in np.flatnonzero(keep)]
    if record.get("proposals") is not None:
        sample["proposals"] = np.asarray(record["proposals"], np.float32).reshape(-1, 4)
    if seg_map is not None:
        sample["seg_map"] = np.asarray(seg_map, np.uint8)
    return sample


def load_sample(load_image: Callable[[dict], np.ndarray], record: dict, transforms: Callable, *, seed: int = 0,
                epoch: int = 0, with_masks: bool = False) -> dict:
    """Load, convert and transform one record with the generator :func:`image_rng(seed, epoch, image_id)`; a
    record's ``seg_map_path`` (a dataset's ``seg_prefix``) is read with :func:`raydet.data.seg_maps.read_seg_map`."""
    image = load_image(record)
    seg_map = None
    if record.get("seg_map_path"):
        seg_map = read_seg_map(record["seg_map_path"], record.get("image_id"), image.shape[:2])
    sample = record_to_sample(record, image, with_masks, seg_map)
    return transforms(sample, image_rng(seed, epoch, record["image_id"]))


class TorchDetectionDataset:
    """A ``torch.utils.data.Dataset`` over a raydet dataset with the same per-image transforms as the Ray pipeline.

    ``DataLoader(TorchDetectionDataset(ds, train=True), batch_size=2, collate_fn=tds.collate_fn, shuffle=True,
    num_workers=k)`` is the non-Ray reference loader (tests, benchmarks). Call :meth:`set_epoch` between epochs
    to change the augmentation draws; evaluation datasets (``train=False``) always use epoch 0.
    """

    def __init__(self, dataset, train: bool, seed: int = 0, epoch: int = 0):
        self.dataset = dataset
        self.train = train
        self.seed = seed
        self.epoch = epoch
        self.transforms, self.collate_cfg = build_transforms(dataset.pipeline)
        self.load_image = dataset.image_loader()
        self.with_masks = bool(getattr(dataset, "with_masks", False))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        record = self.dataset.records[index]
        return load_sample(self.load_image, record, self.transforms, seed=self.seed,
                           epoch=self.epoch if self.train else 0, with_masks=self.with_masks)

    def collate_fn(self, samples: list[dict]) -> dict:
        from .collate import collate_detection

        return collate_detection(samples, self.collate_cfg, self.with_masks)
