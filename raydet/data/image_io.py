"""Image files: a cheap look at each file, its header (size, EXIF orientation) and a strict decode.

* :func:`image_file_problem`: first and last bytes only (missing, empty, not an image, JPEG cut short).
* :func:`read_image_header`: stored size and EXIF orientation from the header (Pillow, no pixel decoding).
* :func:`resolve_orientation`: the ``exif_orientation`` policy of the readers, training, test and infer:

  - ``"auto"`` (default): per image, from the sizes. Annotations whose (height, width) is the upright size get the
    EXIF rotation applied when decoding (what every labelling tool that shows the upright photo produces);
    annotations of the stored size keep the stored pixels; a size matching neither is an
    :class:`ImageSizeMismatchError` naming the file. When both frames have the same size (orientations 2-4, square
    images) the upright frame is used, as MMCV's ``imread`` and Detectron2's ``read_image`` do.
  - ``"apply"``: always the upright frame (Pillow's ``ImageOps.exif_transpose``, MMCV's default).
  - ``"ignore"``: always the stored pixels.

  The readers decide it once per image when the annotations are read and store the result in the record
  (``record["orientation"]``: the EXIF orientation 1-8 to apply, 1 = as stored), so every decoder does the same.
* :func:`read_image`: decode -> uint8 (h, w, 3) RGB. JPEGs go through libjpeg-turbo in strict mode (simplejpeg):
  a libjpeg warning about the data (bytes zeroed mid-scan, a file cut short and given a new end marker) is a
  :class:`CorruptImageError` naming the file, where OpenCV would return half-grey pixels. Other formats (PNG, BMP,
  TIFF, WebP, GIF) are decoded by OpenCV.

A path may be a URI (``s3://bucket/images/a.jpg``, :mod:`raydet.fileio`): the look at a file fetches its first
256 KiB and last bytes, a decode the whole object, in the process that asks (a Ray Data actor reads the bytes
itself: nothing is copied to a local disk).
"""
from __future__ import annotations

import io
from typing import Any, NamedTuple

import cv2
import numpy as np

from raydet import fileio
from raydet.errors import RaydetError

__all__ = ["CorruptImageError", "ImageSizeMismatchError", "ImageHeader", "EXIF_ORIENTATION_POLICIES",
           "check_exif_orientation", "image_file_problem", "image_file_ends", "read_image_header",
           "resolve_orientation", "apply_orientation", "read_image", "size_text", "HEADER_BYTES"]

EXIF_ORIENTATION_POLICIES = ("auto", "apply", "ignore")
_ORIENTATION_TAG = 0x0112
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*", b"GIF8")
_TAIL_BYTES = 64   # a JPEG's end-of-image marker may be followed by a little padding
HEADER_BYTES = 1 << 18  # of an object in a bucket, fetched for its header: enough for nearly every image's (EXIF too)
# libjpeg warnings that leave the pixels intact (colour profile, version and colour-transform notes); every other
# warning means entropy-coded data was missing or damaged and part of the image is made up.
_BENIGN_JPEG_WARNINGS = ("bad ICC marker", "unknown JFIF revision", "Unknown Adobe color transform")


class CorruptImageError(RaydetError, OSError):
    """An image file exists but cannot be decoded completely (corrupt, truncated, not an image)."""


class ImageSizeMismatchError(CorruptImageError):
    """An image's size matches neither the stored nor (under its EXIF orientation) the upright frame of its
    annotations, as the ``exif_orientation`` policy allows."""


class ImageHeader(NamedTuple):
    """What an image file's header says: stored ``height``, ``width`` (pixels) and EXIF ``orientation`` (1-8; 1 when
    absent or invalid)."""

    height: int
    width: int
    orientation: int

    @property
    def upright_size(self) -> tuple[int, int]:
        """(height, width) after the EXIF orientation is applied (orientations 5-8 swap them)."""
        return (self.width, self.height) if self.orientation >= 5 else (self.height, self.width)


def size_text(height: int, width: int, words: bool = True) -> str:
    """An image size as every data message writes it: ``"640 x 480 (width x height)"`` (``words=False``: without
    the parenthesis, for a second size in the same message)."""
    return f"{int(width)} x {int(height)}" + (" (width x height)" if words else "")


def check_exif_orientation(value: str) -> str:
    if value not in EXIF_ORIENTATION_POLICIES:
        raise ValueError(f"exif_orientation must be one of {EXIF_ORIENTATION_POLICIES}, got {value!r}")
    return value


def _who(image_id: Any) -> str:
    return f"image id {image_id}: " if image_id is not None else ""


def _not_found_reason(exc: BaseException) -> str:
    """`` (<reason>)`` of a missing object in a bucket (which of bucket and key is missing), else ``""``."""
    return f" ({exc.reason})" if isinstance(exc, fileio.StorageNotFoundError) else ""


def image_file_problem(path: str, ends: tuple[bytes, bytes, int] | None = None) -> str | None:
    """Why ``path`` is not a complete image file, from a cheap look at its first and last bytes (no decoding):
    missing, empty, not a JPEG / PNG / BMP / TIFF / GIF / WebP, or a JPEG without its end-of-image marker (the file
    was cut short). None when it looks complete. Corruption inside the data is only found when decoding.
    ``ends``: ``(first bytes, last bytes, size)`` when already read (:func:`raydet.fileio.read_ends`)."""
    try:
        head, tail, size = ends if ends is not None else fileio.read_ends(path, 16, _TAIL_BYTES)
    except FileNotFoundError as exc:
        return "image file not found" + _not_found_reason(exc)
    except OSError as exc:
        return f"cannot read the image file: {exc.strerror or str(exc).removeprefix(f'{path}: ')}"
    tail = tail[-_TAIL_BYTES:]
    if size == 0:
        return "image file is empty"
    if not (head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")):
        return "not an image file (unknown format)"
    if head.startswith(b"\xff\xd8") and b"\xff\xd9" not in tail:
        return "truncated JPEG (the file ends before its end-of-image marker)"
    return None


def _orientation(im) -> int:
    """The EXIF orientation of an opened (not loaded) Pillow image; 1 when absent, unreadable or out of range."""
    from PIL import Image

    try:
        if im.format == "PNG":  # Pillow's PNG getexif() decodes the pixels to look for an eXIf chunk after them
            raw = im.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = im.getexif()
        value = exif.get(_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001  (a damaged EXIF block: the pixels are still usable, shown as stored)
        return 1
    return int(value) if isinstance(value, int) and 1 <= value <= 8 else 1


def image_file_ends(path: str) -> tuple[bytes, bytes, int] | None:
    """For a URI: its first :data:`HEADER_BYTES`, last bytes and size, fetched once for both
    :func:`image_file_problem` and :func:`read_image_header`; None for a local path, or when the object cannot be
    read (those two then say why)."""
    if not fileio.is_uri(path):
        return None
    try:
        return fileio.read_ends(path, HEADER_BYTES, _TAIL_BYTES)
    except OSError:
        return None


def read_image_header(path: str, image_id: Any = None, head: bytes | None = None) -> ImageHeader:
    """Stored size and EXIF orientation of an image file, read with Pillow without decoding the pixels (~30 us for
    a JPEG). Raises FileNotFoundError or :class:`CorruptImageError` (a header Pillow cannot read) naming the
    file. For a URI, from its first :data:`HEADER_BYTES` (``head`` when already fetched), else the whole object."""
    from PIL import Image, UnidentifiedImageError

    # No warnings.catch_warnings() here: it swaps process-wide state and is not thread-safe (the readers call this
    # from a thread pool, inside one catch_warnings of their own that quiets Pillow's notes on odd EXIF data)
    remote = fileio.is_uri(path)
    try:
        if remote and head is None:
            head = fileio.read_ends(path, HEADER_BYTES, 0)[0]
        for attempt in (0, 1):
            try:
                with Image.open(io.BytesIO(head) if remote else path) as im:
                    width, height = im.size
                    return ImageHeader(int(height), int(width), _orientation(im))
            except (UnidentifiedImageError, SyntaxError, ValueError, OSError):
                if not remote or attempt or len(head) < HEADER_BYTES:  # the whole file was read already
                    raise
                head = fileio.read_bytes(path)  # a header longer than the prefix
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{_who(image_id)}image file not found: {path}{_not_found_reason(exc)}") from None
    except fileio.StorageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, SyntaxError, ValueError, OSError) as exc:
        raise CorruptImageError(f"{_who(image_id)}cannot read the image header ({exc}): {path}") from None


def resolve_orientation(policy: str, header: ImageHeader, size: tuple[int, int] | None = None,
                        path: str = "", image_id: Any = None) -> int:
    """The EXIF orientation (1-8, 1 = stored pixels) to apply to an image with ``header`` under ``policy`` (see the
    module docstring), given its annotations' (height, width) ``size`` (None: no annotations, any frame fits).

    Raises :class:`ImageSizeMismatchError` naming ``path`` when ``size`` fits no frame the policy allows.
    """
    check_exif_orientation(policy)
    stored = (header.height, header.width)
    candidates = {"ignore": [(1, stored)], "apply": [(header.orientation, header.upright_size)],
                  "auto": [(header.orientation, header.upright_size), (1, stored)]}[policy]
    for orientation, frame in candidates:
        if size is None or (int(size[0]), int(size[1])) == frame:
            return orientation
    sizes = f"{size_text(*stored, words=False)} as stored"
    if header.orientation != 1:
        sizes += f", {size_text(*header.upright_size, words=False)} upright (EXIF orientation {header.orientation})"
    hint = "" if policy == "auto" or header.orientation == 1 else " (exif_orientation: auto accepts either frame)"
    raise ImageSizeMismatchError(f"{_who(image_id)}the annotations give the image size {size_text(*size)} but the "
                                 f"image is {sizes}{hint}: {path}")


def apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """Stored pixels (h, w, ...) -> the upright image for an EXIF ``orientation`` (the transposes of Pillow's
    ``ImageOps.exif_transpose``: 6 = rotate 90 degrees clockwise, 8 = counter-clockwise; 5-8 swap h and w).
    Returns a contiguous array; orientation 1 (or an unknown value) returns ``image`` unchanged."""
    ops = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1),
           7: lambda a: np.rot90(a, 2).swapaxes(0, 1), 8: lambda a: np.rot90(a, 1)}
    op = ops.get(int(orientation))
    return image if op is None else np.ascontiguousarray(op(image))


def _truncated_jpeg(data: bytes) -> bool:
    # Entropy-coded JPEG data stuffs every 0xFF byte, so an end-of-image marker (FF D9) after the last
    # start-of-scan marker (FF DA) means the last scan is complete.
    return data[:2] == b"\xff\xd8" and data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda")


def _decode_jpeg(data: bytes, path: str, who: str) -> np.ndarray | None:
    """libjpeg-turbo, strict: a warning about damaged data is a CorruptImageError. None when this decoder cannot
    read the file at all (a JPEG flavour simplejpeg's build lacks: OpenCV gets a try)."""
    import simplejpeg

    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
    except ValueError as exc:
        message = str(exc)
    try:  # strict mode also stops on warnings: a lenient decode tells a warning from a fatal error
        image = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=False)
    except ValueError:
        return None
    if any(benign in message for benign in _BENIGN_JPEG_WARNINGS):
        return image
    raise CorruptImageError(f"{who}cannot decode image file (damaged JPEG data, libjpeg: {message.rstrip('.')}): "
                            f"{path}")


def _exif_orientation(data: bytes) -> int:
    """The EXIF orientation in an image file's bytes (1 when there is none or Pillow cannot read the header)."""
    from PIL import Image

    try:  # no warnings.catch_warnings(): not thread-safe (decoders run in threads)
        with Image.open(io.BytesIO(data)) as im:
            return _orientation(im)
    except Exception:  # noqa: BLE001  (a format only OpenCV reads: no EXIF to apply)
        return 1


def read_image(path: str, image_id: Any = None, orientation: int | str = "apply",
               size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode an image file -> uint8 (h, w, 3) RGB.

    Args:
        path: the file.
        image_id: named in errors.
        orientation: the EXIF orientation to apply (int 1-8, as a reader stored it in ``record["orientation"]``;
            1 = the stored pixels), or a policy resolved from the file's header with :func:`resolve_orientation`:
            ``"apply"`` (default: upright, as MMCV and Detectron2 read images), ``"ignore"``, or ``"auto"`` (needs
            ``size``, the annotations' (height, width)).

    Raises FileNotFoundError (missing), :class:`CorruptImageError` (undecodable, truncated or damaged data) or
    :class:`ImageSizeMismatchError` (``size`` fits no frame), naming the file and the image id.
    """
    who = _who(image_id)
    try:
        if fileio.is_uri(path):
            data = np.frombuffer(fileio.read_bytes(path), dtype=np.uint8)
        else:
            data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{who}image file not found: {path}{_not_found_reason(exc)}") from None
    except fileio.StorageError as exc:
        raise fileio.StorageError(f"{who}{exc}") from None
    except OSError as exc:
        raise OSError(f"{who}cannot read image file {path}: {exc}") from None
    if data.size == 0:
        raise CorruptImageError(f"{who}image file is empty: {path}")
    raw = data.tobytes()
    if _truncated_jpeg(raw):
        raise CorruptImageError(f"{who}truncated JPEG (no end-of-image marker after the last scan): {path}")
    image = _decode_jpeg(raw, path, who) if raw[:3] == b"\xff\xd8\xff" else None
    if image is None:
        bgr = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        if bgr is None:
            raise CorruptImageError(f"{who}cannot decode image file (corrupt, truncated or not an image): {path}")
        image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    if isinstance(orientation, str):
        if orientation == "ignore" and size is None:
            orientation = 1
        else:
            header = ImageHeader(image.shape[0], image.shape[1], _exif_orientation(raw))
            orientation = resolve_orientation(orientation, header, size, path, image_id)
    return apply_orientation(image, orientation)
