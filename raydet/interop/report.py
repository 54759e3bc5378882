"""What a checkpoint conversion did with each source tensor, and the check that it filled the whole model.

Every tensor of the source is either *placed* (into a model tensor, possibly reshaped or with class slots selected)
or *dropped* with a reason (e.g. BatchNorm's step counter, which FrozenBN has no use for). A conversion that leaves
a model tensor unfilled, fills one with the wrong shape, or finds a source tensor it has no place for fails with
:class:`ConversionError` naming the first such keys and shapes, before anything is written.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from raydet.errors import RaydetError

__all__ = ["ConversionError", "ConversionReport", "Placement", "check_complete"]

if TYPE_CHECKING:
    import torch


class ConversionError(RaydetError, ValueError):
    """The source checkpoint does not fit the pipeline's model (another architecture, or other class slots)."""


@dataclasses.dataclass
class Placement:
    """One source tensor: where it went (``target`` None when dropped) and how (``note``)."""

    source: str
    shape: tuple[int, ...]
    target: str | None
    note: str = ""


@dataclasses.dataclass
class ConversionReport:
    """The placements of every source tensor, plus what the target model needed.

    Attributes:
        source_format: e.g. ``"torchvision"``.
        placements: one per source tensor, in the source's order.
        filled: model tensors the source lacks that the converter may set itself (``target``: the model key), each
            at its initial value with the reason (e.g. a loss's state an older checkpoint did not save).
        classes, cat_ids: the model's class names and category ids (label ``i`` -> ``classes[i]``).
    """

    source_format: str
    placements: list[Placement] = dataclasses.field(default_factory=list)
    filled: list[Placement] = dataclasses.field(default_factory=list)
    classes: list[str] = dataclasses.field(default_factory=list)
    cat_ids: list[int] = dataclasses.field(default_factory=list)

    def place(self, source: str, tensor: torch.Tensor, target: str, note: str = "") -> None:
        self.placements.append(Placement(source, tuple(tensor.shape), target, note))

    def drop(self, source: str, tensor: torch.Tensor, reason: str) -> None:
        self.placements.append(Placement(source, tuple(tensor.shape), None, reason))

    def fill(self, target: str, tensor: torch.Tensor, reason: str) -> None:
        self.filled.append(Placement("", tuple(tensor.shape), target, reason))

    @property
    def placed(self) -> list[Placement]:
        return [p for p in self.placements if p.target is not None]

    @property
    def dropped(self) -> list[Placement]:
        return [p for p in self.placements if p.target is None]

    def summary(self) -> str:
        """A few lines: counts, then each dropped tensor (grouped by reason), each placement with a note and each
        model tensor filled at its initial value."""
        lines = [f"{len(self.placed)} source tensors placed, {len(self.dropped)} dropped ({self.source_format})"]
        reasons: dict[str, list[str]] = {}
        for p in self.dropped:
            reasons.setdefault(p.note, []).append(p.source)
        for reason, keys in reasons.items():
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            lines.append(f"  dropped {len(keys)}: {', '.join(keys[:3])}{more}: {reason}")
        for p in self.placed:
            if p.note:
                lines.append(f"  {p.source} {list(p.shape)} -> {p.target}: {p.note}")
        for p in self.filled:
            lines.append(f"  {p.target} {list(p.shape)} not in the source, set to its initial value: {p.note}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """A JSON-able record for the converted checkpoint's meta."""
        return {"source_format": self.source_format,
                "placed": [[p.source, p.target, p.note] for p in self.placed],
                "dropped": [[p.source, p.note] for p in self.dropped],
                **({"filled": [[p.target, p.note] for p in self.filled]} if self.filled else {})}


def check_complete(mapped: dict[str, torch.Tensor], model_state: dict[str, torch.Tensor],
                   unplaced: list[tuple[str, tuple[int, ...]]], source: str) -> None:
    """Raise :class:`ConversionError` unless ``mapped`` fills every model tensor with its shape and no source
    tensor was left without a place.

    Args:
        mapped: model key -> converted tensor. model_state: the target model's ``state_dict()``.
        unplaced: (source key, shape) of source tensors no rule placed or dropped.
        source: the source file, for the message.
    """
    missing = [k for k in model_state if k not in mapped]
    shapes = [f"{k}: converted {list(mapped[k].shape)} vs model {list(v.shape)}" for k, v in model_state.items()
              if k in mapped and tuple(mapped[k].shape) != tuple(v.shape)]
    extra = [k for k in mapped if k not in model_state]
    if not (missing or shapes or extra or unplaced):
        return
    lines = [f"{source} does not fit the pipeline's model (a checkpoint of another architecture or settings?); "
             "nothing was written"]
    if shapes:
        lines.append(f"  {len(shapes)} shape mismatches, e.g. " + "; ".join(shapes[:3]))
    if unplaced:
        lines.append(f"  {len(unplaced)} source tensors have no place in the model, e.g. "
                     + ", ".join(f"{k} {list(s)}" for k, s in unplaced[:3]))
    if missing:
        lines.append(f"  {len(missing)} model tensors have no source, e.g. "
                     + ", ".join(f"{k} {list(model_state[k].shape)}" for k in missing[:3]))
    if extra:
        lines.append(f"  {len(extra)} converted tensors the model lacks, e.g. {extra[:3]}")
    raise ConversionError("\n".join(lines))
