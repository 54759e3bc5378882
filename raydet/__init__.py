"""raydet: object detection and instance segmentation on Ray.

The model, ops, losses and transforms are plain PyTorch / NumPy; Ray Data, Ray Train and Ray Tune wire them together.
"""
__version__ = "0.1.0"
