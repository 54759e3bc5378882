"""raydet: object detection and instance segmentation on Ray.

The model, ops, losses and transforms are plain PyTorch / NumPy; Ray Data, Ray Train and Ray Tune wire them together.
"""
import os as _os

__version__ = "0.1.0"

# In a source tree (PYTHONPATH, or a Ray job's uploaded working dir) the ops live in ../ops and are still imported as
# raydet.ops; an installed raydet carries them inside the package instead.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
_ops_init = _os.path.join(_root, "ops", "__init__.py")
if not _os.path.isdir(_os.path.join(__path__[0], "ops")) and _os.path.isfile(_ops_init):
    with open(_ops_init, encoding="utf-8") as _f:
        if "raydet.ops" in _f.read(300):
            __path__.append(_root)
