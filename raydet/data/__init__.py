"""Datasets, transforms, collate and the Ray Data input pipeline.

* readers (records, see raydet.structures): :class:`CocoDataset`, :class:`VOCDataset`,
  :class:`SyntheticShapesDataset` (raydet.data.datasets)
* image files: :func:`read_image` (strict decoding, EXIF orientation), :func:`read_image_header`
  (raydet.data.image_io)
* per-image transforms: :class:`Resize`, :class:`RandomFlip`; batch-level :class:`Normalize`, :class:`Pad`
  (raydet.data.transforms); SSD's :class:`PhotoMetricDistortion`, :class:`Expand`, :class:`MinIoURandomCrop`
  (raydet.data.augmentation); :func:`build_transforms` splits a pipeline list (raydet.data.pipeline)
* batches: :func:`collate_detection` (raydet.data.collate)
* precomputed proposals (Fast R-CNN): :func:`write_proposals`, :func:`read_proposals` (raydet.data.proposals; a
  dataset's ``proposal_file``)
* semantic maps (HTC's semantic branch): :func:`read_seg_map` (raydet.data.seg_maps; a COCO dataset's
  ``seg_prefix``)
* Records: :class:`RecordTable` (raydet.data.record_table), a dataset's records as flat NumPy columns.
* Ray Data: :func:`build_ray_dataset`, :func:`iter_detection_batches` (raydet.data.ray_data; Ray is imported
  only when a dataset is built); :class:`TorchDetectionDataset` is the plain PyTorch reference loader.

Importing this package does not import torch (``collate_detection`` / ``collate_samples`` load it on first use),
so Ray Data decode actors, which unpickle classes from here, start without paying for torch.
"""
from .datasets import VOC_CLASSES, CocoDataset, DetectionDataset, SyntheticShapesDataset, VOCDataset
from .image_io import CorruptImageError, ImageSizeMismatchError, read_image, read_image_header
from .pipeline import Compose, TorchDetectionDataset, build_transforms, image_rng, load_sample, record_to_sample
from .ray_data import DecodeAndTransform, build_ray_dataset, iter_detection_batches
from .record_table import RecordTable
from .transforms import CollateConfig, Normalize, Pad, RandomFlip, Resize, Transform, rescale_size, scales_from_range
from .augmentation import Expand, MinIoURandomCrop, PhotoMetricDistortion
from .proposals import read_proposals, write_proposals
from .seg_maps import read_seg_map

__all__ = [
    "CollateConfig", "collate_detection", "collate_samples",
    "DetectionDataset", "CocoDataset", "VOCDataset", "SyntheticShapesDataset", "VOC_CLASSES", "read_image",
    "CorruptImageError", "ImageSizeMismatchError", "read_image_header",
    "Compose", "build_transforms", "image_rng", "load_sample", "record_to_sample", "TorchDetectionDataset",
    "DecodeAndTransform", "build_ray_dataset", "iter_detection_batches", "RecordTable",
    "Transform", "Resize", "RandomFlip", "Normalize", "Pad", "scales_from_range", "rescale_size",
    "PhotoMetricDistortion", "Expand", "MinIoURandomCrop", "read_proposals", "write_proposals", "read_seg_map",
]


def __getattr__(name):  # the torch-based collate functions, imported on first use
    if name in ("collate_detection", "collate_samples"):
        from . import collate

        return getattr(collate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
