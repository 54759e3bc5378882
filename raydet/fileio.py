"""Files on a local disk or in object storage (``s3://``, ``gs://``, any file system pyarrow or fsspec resolves).

Every place raydet reads or writes a file that a pipeline or a command line names (annotations, images, checkpoints,
run folders, results) goes through these helpers. A local path is handled by Python's own ``open`` / ``os`` exactly
as before; a URI ``scheme://...`` by a ``pyarrow.fs`` file system (``S3FileSystem``, ``GcsFileSystem``; fsspec for a
scheme pyarrow does not know, e.g. ``abfs://`` with adlfs installed).

* One file system object per process and bucket, created on first use (:func:`filesystem`): a Ray Data decode actor
  or a Ray Train worker makes its own when it first reads, nothing is pickled with credentials in it.
* Credentials and endpoints come from each cloud SDK's standard environment, read by the process that opens the
  file: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``,
  ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` (an S3-compatible server such as MinIO), ``AWS_PROFILE``, an
  instance role; ``GOOGLE_APPLICATION_CREDENTIALS`` or the node's service account for ``gs://``, and
  ``STORAGE_EMULATOR_HOST`` (``http://host:port``, the variable of Google's storage clients) for a GCS emulator or a
  private endpoint, reached without credentials.
* A missing bucket or object is a :class:`StorageNotFoundError` (a ``FileNotFoundError``) whose one-line message
  names the URI and says which is missing; any other failure (access denied, no network) a :class:`StorageError`
  naming the URI and the operation.
* :class:`MirroredFolder`: a local folder that code writes into as usual and that is copied to a URI, where a
  command's outputs go when its work dir is in a bucket (see :mod:`raydet.workspace`).

Reads fetch an object with one request (``open_input_file().read()``): a whole image, annotation file or
checkpoint; :func:`read_ends` fetches only the first and last bytes (the readers' look at each image file).
"""
from __future__ import annotations

import os
import posixpath
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass

from raydet.errors import RaydetError

__all__ = ["StorageError", "StorageNotFoundError", "not_found_error", "is_uri", "filesystem", "join", "dirname",
           "basename", "exists", "isfile", "isdir", "stat", "read_bytes", "read_text", "read_ends", "write_bytes",
           "write_text", "makedirs", "FileEntry", "list_files", "upload_file", "download_file", "upload_folder",
           "remove_tree", "MirroredFolder"]

_URI = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$", re.DOTALL)
BUCKET_SCHEMES = ("s3", "gs", "gcs")  # pyarrow paths are "<bucket>/<key>"
CREDENTIALS_HINT = ("credentials come from the cloud SDK's environment: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                     "(AWS_ENDPOINT_URL for an S3-compatible server), GOOGLE_APPLICATION_CREDENTIALS for gs://")


class StorageError(RaydetError, OSError):
    """A URI cannot be read, listed or written (access denied, no network, ...); the message names the URI."""


class StorageNotFoundError(StorageError, FileNotFoundError):
    """A URI's bucket or object does not exist; ``reason`` says which (``the bucket 'b' does not exist`` or ``no
    object with this key in bucket 'b'``)."""

    reason = "not found"


# --------------------------------------------------------------------------------------------------- URIs
def is_uri(path) -> bool:
    """Whether ``path`` is a URI ``scheme://...`` (object storage, ``file://``, ...) rather than a local path."""
    return isinstance(path, str) and _URI.match(path) is not None


def _split(uri: str) -> tuple[str, str, str]:
    """``(scheme, netloc, key)`` of ``scheme://netloc/key``."""
    scheme, rest = _URI.match(uri).groups()
    netloc, _, key = rest.partition("/")
    return scheme.lower(), netloc, key


def join(base, *parts) -> str:
    """``os.path.join`` for local paths; for a URI, the parts joined with ``/`` (a part that is itself a URI starts
    over)."""
    base, parts = os.fspath(base), [os.fspath(p) for p in parts]
    if not is_uri(base) and not any(is_uri(p) for p in parts):
        return os.path.join(base, *parts)
    out = base
    for part in parts:
        if is_uri(part):
            out = part
        elif not is_uri(out):
            out = os.path.join(out, part)
        elif part:
            out = out.rstrip("/") + "/" + part.lstrip("/")
    return out


def dirname(path) -> str:
    """The parent folder (``scheme://netloc`` stays itself)."""
    path = os.fspath(path)
    if not is_uri(path):
        return os.path.dirname(path)
    scheme, netloc, key = _split(path)
    return f"{scheme}://{netloc}" + ("/" + posixpath.dirname(key.rstrip("/")) if "/" in key.rstrip("/") else "")


def basename(path) -> str:
    path = os.fspath(path)
    return posixpath.basename(path.rstrip("/")) if is_uri(path) else os.path.basename(path)


# --------------------------------------------------------------------------------------------------- file systems
_FILESYSTEMS: dict[tuple[str, str], object] = {}
_LOCK = threading.Lock()


def _new_filesystem(uri: str):
    """``(pyarrow file system, path in it)`` for ``uri``: pyarrow's own, else fsspec's wrapped for pyarrow."""
    import pyarrow
    import pyarrow.fs as pafs

    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if emulator and _split(uri)[0] in ("gs", "gcs"):  # a GCS emulator or private endpoint (the Cloud SDKs' variable)
        scheme, _, host = emulator.rpartition("://")
        fs = pafs.GcsFileSystem(anonymous=True, endpoint_override=host.rstrip("/"), scheme=scheme or "http")
        _, netloc, key = _split(uri)
        return fs, f"{netloc}/{key}".rstrip("/")
    try:
        return pafs.FileSystem.from_uri(uri)
    except pyarrow.ArrowInvalid as exc:
        if "nrecognized filesystem" not in str(exc) and "ot a recognized" not in str(exc):
            raise StorageError(f"{uri}: {_first_line(str(exc))}") from None
    try:
        import fsspec
    except ImportError:
        raise StorageError(f"{uri}: pyarrow has no file system for this scheme (and fsspec is not installed)") from None
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as exc:
        raise StorageError(f"{uri}: no file system for this scheme: {_first_line(str(exc))}") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def filesystem(uri: str):
    """``(pyarrow.fs.FileSystem, path in it)`` for a URI. Buckets (``s3://``, ``gs://``) get one file system object
    per process and bucket, made on first use with the credentials of this process's environment."""
    scheme, netloc, key = _split(uri)
    if scheme not in BUCKET_SCHEMES:
        return _new_filesystem(uri)
    with _LOCK:
        fs = _FILESYSTEMS.get((scheme, netloc))
        if fs is None:
            fs, _ = _new_filesystem(f"{scheme}://{netloc}")
            _FILESYSTEMS[(scheme, netloc)] = fs
    return fs, f"{netloc}/{key}".rstrip("/")


def _first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


def not_found_error(uri: str) -> StorageNotFoundError:
    """A not-found error for ``uri`` that says whether its bucket exists."""
    reason = "no such file or folder"
    scheme, netloc, _ = _split(uri)
    if scheme in BUCKET_SCHEMES:
        try:
            import pyarrow.fs as pafs

            fs, _ = filesystem(uri)
            missing = fs.get_file_info(netloc).type == pafs.FileType.NotFound
        except Exception:  # noqa: BLE001  (the bucket cannot even be looked at: say only that the object is missing)
            missing = False
        reason = f"the bucket '{netloc}' does not exist" if missing else f"no object with this key in bucket '{netloc}'"
    exc = StorageNotFoundError(f"{uri}: not found ({reason})")
    exc.reason = reason
    return exc


def _storage_error(exc: BaseException, uri: str, action: str) -> StorageError:
    """pyarrow's / fsspec's exception for ``uri`` as raydet's one-line error."""
    if isinstance(exc, StorageError):
        return exc
    text = str(exc)
    if isinstance(exc, FileNotFoundError) or "NO_SUCH_KEY" in text or "NoSuchKey" in text:
        return not_found_error(uri)
    if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text or re.search(r"Bucket '[^']*' not found", text):
        netloc = _split(uri)[1]
        error = StorageNotFoundError(f"{uri}: not found (the bucket '{netloc}' does not exist)")
        error.reason = f"the bucket '{netloc}' does not exist"
        return error
    hint = ""
    if any(k in text for k in ("ACCESS_DENIED", "AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoes",
                               "credentials", "Credentials", "401", "403")):
        hint = f" ({CREDENTIALS_HINT})"
    return StorageError(f"{uri}: cannot {action}: {_first_line(text)}{hint}")


def _call(uri: str, action: str, fn):
    """``fn(fs, path)`` on ``uri``'s file system, its failures as :class:`StorageError`."""
    try:
        fs, path = filesystem(uri)
        return fn(fs, path)
    except StorageError:
        raise
    except (OSError, ValueError) as exc:
        raise _storage_error(exc, uri, action) from None


# --------------------------------------------------------------------------------------------------- queries
def _info(uri: str):
    return _call(uri, "look at", lambda fs, p: fs.get_file_info(p))


def exists(path) -> bool:
    path = os.fspath(path)
    if not is_uri(path):
        return os.path.exists(path)
    import pyarrow.fs as pafs

    return _info(path).type != pafs.FileType.NotFound


def isfile(path) -> bool:
    path = os.fspath(path)
    if not is_uri(path):
        return os.path.isfile(path)
    import pyarrow.fs as pafs

    return _info(path).type == pafs.FileType.File


def isdir(path) -> bool:
    """A folder: for object storage, a prefix with at least one object under it (or a bucket)."""
    path = os.fspath(path)
    if not is_uri(path):
        return os.path.isdir(path)
    import pyarrow.fs as pafs

    return _info(path).type == pafs.FileType.Directory


@dataclass(frozen=True)
class FileEntry:
    """A file found by :func:`list_files`: its ``path`` (a URI for object storage), ``size`` (bytes) and ``mtime``
    (seconds since the epoch)."""

    path: str
    size: int
    mtime: float


def list_files(folder, recursive: bool = True) -> list[FileEntry]:
    """The files under ``folder`` (sorted by path; none when it does not exist). A missing bucket is a
    :class:`StorageNotFoundError`."""
    folder = os.fspath(folder)
    if not is_uri(folder):
        out = []
        for root, dirs, files in os.walk(folder):
            if not recursive:
                dirs[:] = []
            for name in files:
                p = os.path.join(root, name)
                try:
                    st = os.stat(p)
                except OSError:
                    continue
                out.append(FileEntry(p, st.st_size, st.st_mtime))
        return sorted(out, key=lambda e: e.path)
    import pyarrow.fs as pafs

    prefix = folder.rstrip("/")
    scheme, netloc, _ = _split(prefix)

    def listing(fs, p):
        try:
            infos = fs.get_file_info(pafs.FileSelector(p, recursive=recursive))
        except FileNotFoundError:  # no such prefix (a missing bucket is another error)
            if scheme in BUCKET_SCHEMES and fs.get_file_info(netloc).type == pafs.FileType.NotFound:
                raise
            return []
        return [(i.path, i.size, i.mtime) for i in infos if i.type == pafs.FileType.File]

    found = _call(prefix, "list", listing)
    fs_root = _call(prefix, "list", lambda fs, p: p)
    out = []
    for p, size, mtime in found:
        rel = p[len(fs_root):].lstrip("/") if p.startswith(fs_root) else p
        out.append(FileEntry(f"{prefix}/{rel}", int(size or 0), mtime.timestamp() if mtime is not None else 0.0))
    return sorted(out, key=lambda e: e.path)


def stat(path) -> FileEntry:
    """Size and modification time of a file; a missing one is a :class:`StorageNotFoundError` (a local one a
    ``FileNotFoundError``)."""
    path = os.fspath(path)
    if not is_uri(path):
        st = os.stat(path)
        return FileEntry(path, st.st_size, st.st_mtime)
    import pyarrow.fs as pafs

    info = _info(path)
    if info.type != pafs.FileType.File:
        raise not_found_error(path)
    return FileEntry(path, int(info.size or 0), info.mtime.timestamp() if info.mtime is not None else 0.0)


# --------------------------------------------------------------------------------------------------- reading
def read_bytes(path) -> bytes:
    """The whole file (one request for an object)."""
    path = os.fspath(path)
    if not is_uri(path):
        with open(path, "rb") as f:
            return f.read()

    def read(fs, p):
        with fs.open_input_file(p) as f:
            return f.read()

    return _call(path, "read", read)


def read_text(path, encoding: str = "utf-8") -> str:
    return read_bytes(path).decode(encoding)


def read_ends(path, head: int, tail: int) -> tuple[bytes, bytes, int]:
    """``(first head bytes, last tail bytes, size)`` of a file, without reading the rest."""
    path = os.fspath(path)
    if not is_uri(path):
        with open(path, "rb") as f:
            first = f.read(head)
            size = f.seek(0, os.SEEK_END)
            f.seek(max(size - tail, 0))
            return first, f.read(), size

    def read(fs, p):
        with fs.open_input_file(p) as f:
            size = f.size()
            first = f.read_at(min(head, size), 0) if size else b""
            if size <= head or not tail:
                return first, first[-tail:] if tail else b"", size
            return first, f.read_at(min(tail, size), max(size - tail, 0)), size

    return _call(path, "read", read)


# --------------------------------------------------------------------------------------------------- writing
def makedirs(path) -> None:
    """``os.makedirs(path, exist_ok=True)`` for a local path; nothing for object storage (no folders there)."""
    path = os.fspath(path)
    if not is_uri(path):
        os.makedirs(path, exist_ok=True)


def write_bytes(path, data: bytes) -> None:
    """Write a whole file (an object appears complete or not at all; a local file is written in place, its folder
    created)."""
    path = os.fspath(path)
    if not is_uri(path):
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        return

    def write(fs, p):
        with fs.open_output_stream(p) as f:
            f.write(data)

    _call(path, "write", write)


def write_text(path, text: str, encoding: str = "utf-8") -> None:
    write_bytes(path, text.encode(encoding))


def upload_file(local: str, uri: str) -> None:
    """Copy the local file ``local`` to ``uri`` (a local destination is a plain copy)."""
    if not is_uri(uri):
        os.makedirs(os.path.dirname(os.path.abspath(uri)), exist_ok=True)
        shutil.copyfile(local, uri)
        return

    def copy(fs, p):
        with open(local, "rb") as src, fs.open_output_stream(p) as dst:
            shutil.copyfileobj(src, dst, 8 << 20)

    _call(uri, "write", copy)


def download_file(uri: str, local: str) -> None:
    """Copy ``uri`` to the local file ``local`` (its folder created)."""
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    data = read_bytes(uri)
    with open(local, "wb") as f:
        f.write(data)


def upload_folder(local: str, uri: str) -> list[str]:
    """Copy every file under the local folder ``local`` to the same relative path under ``uri``; returns the
    destinations."""
    out = []
    for entry in list_files(local):
        rel = os.path.relpath(entry.path, local).replace(os.sep, "/")
        dest = join(uri, rel)
        upload_file(entry.path, dest)
        out.append(dest)
    return out


def remove_tree(path) -> None:
    """Delete a folder and everything under it (a prefix's objects); nothing when it does not exist."""
    path = os.fspath(path)
    if not is_uri(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    for entry in list_files(path):
        _call(entry.path, "delete", lambda fs, p: fs.delete_file(p))


# --------------------------------------------------------------------------------------------------- mirrors
class MirroredFolder:
    """A local folder written as usual whose files are copied to ``target`` when it is a URI.

    With a local ``target``, ``local`` is ``target`` itself (created) and :meth:`sync` does nothing. With a URI,
    ``local`` is a new scratch folder on this machine; the files named in ``download`` that exist under the URI
    are fetched into it first (``log.jsonl`` of a resumed run, which goes on growing); :meth:`sync` uploads each
    file that changed since the previous sync (size or modification time) and :meth:`close` syncs a last time and
    deletes the scratch folder. Nothing under the URI is ever deleted.

    Args:
        target: the destination folder, a local path or a URI.
        download: file names (relative to ``target``) to fetch into the scratch folder first.
        prefix: of the scratch folder's name (in the temporary directory).
    """

    def __init__(self, target: str, download=(), prefix: str = "raydet-out-"):
        self.target = os.fspath(target)
        self.remote = is_uri(self.target)
        self._uploaded: dict[str, tuple[int, int]] = {}
        if not self.remote:
            self.local = self.target
            os.makedirs(self.local, exist_ok=True)
            return
        self.local = tempfile.mkdtemp(prefix=prefix)
        for name in download:
            uri = join(self.target, name)
            if isfile(uri):
                download_file(uri, os.path.join(self.local, name))
                self._uploaded[name] = self._stamp(os.path.join(self.local, name))

    @staticmethod
    def _stamp(path: str) -> tuple[int, int]:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns

    def path(self, *parts: str) -> str:
        """A local path inside the folder (write here)."""
        return os.path.join(self.local, *parts)

    def uri(self, *parts: str) -> str:
        """Where a file of the folder ends up (the target's path or URI)."""
        return join(self.target, *parts)

    def sync(self) -> list[str]:
        """Upload the files that changed since the last sync; returns their destinations (none for a local
        target)."""
        if not self.remote:
            return []
        done = []
        for entry in list_files(self.local):
            rel = os.path.relpath(entry.path, self.local).replace(os.sep, "/")
            try:
                stamp = self._stamp(entry.path)
            except FileNotFoundError:  # removed while we looked
                continue
            if self._uploaded.get(rel) == stamp:
                continue
            upload_file(entry.path, join(self.target, rel))
            self._uploaded[rel] = stamp
            done.append(join(self.target, rel))
        return done

    def close(self, upload: bool = True) -> None:
        """Sync a last time (unless ``upload`` is false) and delete the scratch folder (a URI target only)."""
        if not self.remote:
            return
        try:
            if upload:
                self.sync()
        finally:
            shutil.rmtree(self.local, ignore_errors=True)
