"""Turn transformed samples into a model batch (see raydet.structures), in plain PyTorch.

:func:`collate_detection` is the training / evaluation collate: it takes the per-image samples produced by the
transforms (raydet.data.transforms), moves the uint8 images to ``device``, normalises and zero-pads them there
(the batch-level ``Normalize`` / ``Pad`` of the pipeline, held in a :class:`CollateConfig`), and rasterises
instance masks. :func:`collate_samples` is the older helper for already-resized ``(image, record)`` pairs.
"""
from __future__ import annotations

import numpy as np
import torch

from raydet.structures import IMAGENET_MEAN, IMAGENET_STD, collate_images, image_to_tensor, pad_to_divisor

from .transforms import CollateConfig

__all__ = ["CollateConfig", "collate_detection", "collate_samples"]

def _tensor(x, dtype, shape) -> torch.Tensor:
    """A fresh (writable, owned) tensor from an array-like."""
    return torch.from_numpy(np.array(x, dtype=dtype, copy=True).reshape(shape))


def _to(x: torch.Tensor, device) -> torch.Tensor:
    return x if device is None else x.to(device, non_blocking=True)


def collate_detection(samples: list[dict], cfg: CollateConfig, with_masks: bool = False, device=None) -> dict:
    """Per-image samples (see raydet.data.transforms) -> a Batch dict (see raydet.structures).

    Images are stacked as uint8 (B, H, W, 3) with H, W the largest ``img_shape`` rounded up to
    ``cfg.size_divisor``, moved to ``device`` (default: stay on the CPU), converted to float32, normalised and
    zeroed outside each image's ``img_shape``. Boxes, labels, ignore boxes and proposals go to ``device`` too. With
    ``with_masks``, each sample's ``masks`` (polygons or RLE at img_shape) become uint8 (n, h, w) bitmaps. Samples
    with a ``seg_map`` (uint8 (h, w) at img_shape; every sample or none) give ``gt_semantic_seg``, uint8 (B, H, W)
    over the padded batch, 255 (ignored) outside each image (MMDetection's ``seg_pad_value``).
    """
    if not samples:
        raise ValueError("collate_detection needs at least one sample")
    shapes = [tuple(int(v) for v in s["image"].shape[:2]) for s in samples]
    height = pad_to_divisor(max(h for h, _ in shapes), cfg.size_divisor)
    width = pad_to_divisor(max(w for _, w in shapes), cfg.size_divisor)
    pin = device is not None and torch.device(device).type == "cuda"
    raw = torch.zeros((len(samples), height, width, 3), dtype=torch.uint8, pin_memory=pin)
    raw_np = raw.numpy()  # copy through NumPy: images from Ray batches may be read-only views
    for i, (s, (h, w)) in enumerate(zip(samples, shapes)):
        raw_np[i, :h, :w] = s["image"]
    # (B, 3, H, W) float32; asking for a contiguous result makes the NHWC -> NCHW copy one fast pass
    images = _to(raw, device).permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
    if not cfg.to_rgb:
        images = images.flip(1)
    mean = torch.tensor(cfg.mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    images.mul_(1.0 / std).add_(-mean / std)  # (x - mean) / std in two in-place passes
    for i, (h, w) in enumerate(shapes):  # padding is zero after normalisation, as in MMDetection
        images[i, :, h:, :] = 0
        images[i, :, :, w:] = 0

    metas, boxes, labels, ignores, masks = [], [], [], [], []
    for s, (h, w) in zip(samples, shapes):
        metas.append({
            "image_id": int(s["image_id"]),
            "ori_shape": tuple(int(v) for v in s.get("ori_shape", (h, w))),
            "img_shape": (h, w),
            "pad_shape": (pad_to_divisor(h, cfg.size_divisor), pad_to_divisor(w, cfg.size_divisor)),
            "batch_input_shape": (height, width),
            "scale_factor": tuple(float(v) for v in s.get("scale_factor", (1.0, 1.0))),
            "flip": bool(s.get("flip", False)),
        })
        boxes.append(_to(_tensor(s["boxes"], np.float32, (-1, 4)), device))
        labels.append(_to(_tensor(s["labels"], np.int64, (-1,)), device))
        ignores.append(_to(_tensor(s.get("ignore_boxes", np.zeros((0, 4))), np.float32, (-1, 4)), device))
        if with_masks:
            from raydet.masks import instance_masks_to_bitmaps

            if s.get("masks") is None:
                raise ValueError(f"image {s['image_id']}: with_masks=True but the sample has no masks")
            if len(s["masks"]) != len(boxes[-1]):
                raise ValueError(f"image {s['image_id']}: {len(boxes[-1])} boxes but {len(s['masks'])} masks")
            masks.append(_to(torch.from_numpy(instance_masks_to_bitmaps(list(s["masks"]), h, w)), device))
    batch = {"images": images, "img_metas": metas, "gt_boxes": boxes, "gt_labels": labels,
             "gt_boxes_ignore": ignores}
    if with_masks:
        batch["gt_masks"] = masks
    if any(s.get("proposals") is not None for s in samples):
        batch["proposals"] = [_to(_tensor(s.get("proposals", np.zeros((0, 4))), np.float32, (-1, 4)), device)
                              for s in samples]
    seg_maps = [s.get("seg_map") for s in samples]
    if any(m is not None for m in seg_maps):
        batch["gt_semantic_seg"] = _to(_pad_seg_maps(seg_maps, metas, height, width), device)
    return batch


def _pad_seg_maps(seg_maps: list, metas: list[dict], height: int, width: int) -> torch.Tensor:
    """uint8 (h, w) maps, each of its image's ``img_shape`` -> uint8 (B, height, width), padded with 255 (ignored)."""
    from .seg_maps import SEG_IGNORE_INDEX

    out = np.full((len(seg_maps), height, width), SEG_IGNORE_INDEX, dtype=np.uint8)
    for i, (m, meta) in enumerate(zip(seg_maps, metas)):
        if m is None:
            raise ValueError(f"image {meta['image_id']}: no semantic map (seg_map) while other images of the batch "
                             f"have one")
        m = np.asarray(m)
        if m.shape != tuple(meta["img_shape"][:2]):
            raise ValueError(f"image {meta['image_id']}: semantic map of shape {m.shape}, image of "
                             f"{tuple(meta['img_shape'][:2])}")
        out[i, :m.shape[0], :m.shape[1]] = m
    return torch.from_numpy(out)


def collate_samples(samples, size_divisor: int = 32, with_masks: bool = False, mean=IMAGENET_MEAN,
                    std=IMAGENET_STD) -> dict:
    """Batch already-resized samples.

    Args:
        samples: list of ``(image HxWx3 uint8 RGB, record)``; each record may also carry ``ori_shape``,
            ``scale_factor`` (sx, sy) and ``flip`` when the image was resized / flipped (defaults: identity), and
            ``proposals`` (k, 4) in the image's pixels (then the batch carries ``proposals``), and ``seg_map``
            uint8 (h, w) class ids (then the batch carries ``gt_semantic_seg``, padded with 255).
        with_masks: rasterise ``record["masks"]`` to (n, h, w) uint8 bitmaps as ``gt_masks``.
    """
    images, metas, boxes, labels, ignores, masks = [], [], [], [], [], []
    for image, rec in samples:
        h, w = image.shape[:2]
        images.append(image_to_tensor(image, mean, std))
        ignore = np.asarray(rec.get("ignore", np.zeros(len(rec["labels"]), bool)), dtype=bool)
        rec_boxes = np.asarray(rec["boxes"], dtype=np.float32).reshape(-1, 4)
        boxes.append(torch.from_numpy(rec_boxes[~ignore]))
        labels.append(torch.from_numpy(np.asarray(rec["labels"], dtype=np.int64)[~ignore]))
        ignores.append(torch.from_numpy(rec_boxes[ignore]))
        metas.append({
            "image_id": int(rec.get("image_id", len(metas))),
            "ori_shape": tuple(rec.get("ori_shape", (h, w))),
            "img_shape": (h, w),
            "scale_factor": tuple(rec.get("scale_factor", (1.0, 1.0))),
            "flip": bool(rec.get("flip", False)),
            "pad_shape": (pad_to_divisor(h, size_divisor), pad_to_divisor(w, size_divisor)),
        })
        if with_masks:
            from raydet.masks import instance_masks_to_bitmaps

            kept = [m for m, ig in zip(rec["masks"], ignore) if not ig]
            masks.append(torch.from_numpy(instance_masks_to_bitmaps(kept, h, w)))
    batch_images = collate_images(images, size_divisor)
    for meta in metas:
        meta["batch_input_shape"] = tuple(batch_images.shape[-2:])
    batch = {"images": batch_images, "img_metas": metas, "gt_boxes": boxes, "gt_labels": labels,
             "gt_boxes_ignore": ignores}
    if with_masks:
        batch["gt_masks"] = masks
    if any(rec.get("proposals") is not None for _, rec in samples):
        batch["proposals"] = [_tensor(rec.get("proposals", np.zeros((0, 4))), np.float32, (-1, 4))
                              for _, rec in samples]
    seg_maps = [rec.get("seg_map") for _, rec in samples]
    if any(m is not None for m in seg_maps):
        batch["gt_semantic_seg"] = _pad_seg_maps(seg_maps, metas, *batch_images.shape[-2:])
    return batch
