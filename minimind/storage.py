"""Paths that may name object storage (``s3://``, ``gs://``, any pyarrow URI) as well as local or shared disks.

Runs already live on either (Ray Train uploads checkpoints; the run files go through pyarrow). Corpora do too:
prepare writes its shards to a URI directly, and a run that trains on a prepared corpus at a URI copies it once
per node into a local cache (``MINIMIND_CACHE``, default ``~/.cache/minimind``), keyed by the corpus' fingerprint,
so its shards are memory-mapped like local ones. Credentials and endpoints come from the environment as for any
pyarrow or AWS client (``AWS_ENDPOINT_URL`` for an S3-compatible server).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import pyarrow.fs as pafs


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def filesystem(path: str | Path) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding ``path`` and the path within it."""
    if is_uri(path):
        return pafs.FileSystem.from_uri(str(path))
    return pafs.LocalFileSystem(), str(Path(path).absolute())


def join(base: str | Path, *parts: str) -> str:
    """``base/part/...`` for URIs and local paths alike."""
    return "/".join([str(base).rstrip("/"), *parts])


def is_file(path: str | Path) -> bool:
    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type == pafs.FileType.File


def list_dir(path: str | Path) -> list[str]:
    """Names of the entries directly under ``path``, sorted; none when it does not exist."""
    fs, inner = filesystem(path)
    entries = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
    return sorted(entry.base_name for entry in entries)


def modified_time(path: str | Path) -> float | None:
    """When the file at ``path`` was last written (seconds since the epoch), or None when it does not exist."""
    fs, inner = filesystem(path)
    info = fs.get_file_info(inner)
    return None if info.type == pafs.FileType.NotFound or info.mtime is None else info.mtime.timestamp()


def read_text(path: str | Path) -> str:
    fs, inner = filesystem(path)
    with fs.open_input_stream(inner) as stream:
        return stream.read().decode("utf-8")


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` whole: a local file is renamed into place; an object appears whole when its upload ends."""
    if not is_uri(path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A name of its own: two writers of one file (two invocations of an experiment) must not share it.
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
        return
    fs, inner = filesystem(path)
    with fs.open_output_stream(inner) as stream:
        stream.write(text.encode("utf-8"))


def append_line(path: str | Path, line: str) -> None:
    """Add a line to a text file of one writer: appended locally; an object is written again whole (objects
    cannot grow), so a reader never sees half a line."""
    if not is_uri(path):
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
        return
    write_text(path, (read_text(path) if is_file(path) else "") + line + "\n")


def upload(local: str | Path, uri: str) -> None:
    """Copy a local file, or a local directory with everything in it, to ``uri``."""
    fs, inner = filesystem(uri)
    pafs.copy_files(str(Path(local).absolute()), inner, destination_filesystem=fs)


def move_dir(source: str | Path, target: str | Path) -> None:
    """Move a directory on one storage: renamed locally; copied then deleted in object storage, which has no
    directories to rename."""
    if not is_uri(source):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
        return
    fs, inner = filesystem(source)
    pafs.copy_files(inner, filesystem(target)[1], source_filesystem=fs, destination_filesystem=fs)
    fs.delete_dir(inner)


def delete_dir(path: str | Path) -> None:
    fs, inner = filesystem(path)
    if fs.get_file_info(inner).type != pafs.FileType.NotFound:
        fs.delete_dir(inner)


def cache_root() -> Path:
    return Path(os.environ.get("MINIMIND_CACHE", Path.home() / ".cache" / "minimind"))


def build_in_place(target: Path, fill: Callable[[Path], None]) -> None:
    """Make the directory ``target`` by ``fill``-ing a temporary folder beside it and renaming that into place, so
    processes racing to make it, or one killed halfway, never leave a partial one behind (the first one made stays)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        fill(staging)
        try:
            os.rename(staging, target)
        except OSError:  # another process made it first
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def cached_copy(uri: str, version: str) -> Path:
    """A local copy of the directory at ``uri`` as of ``version`` (e.g. a corpus fingerprint), made once per
    machine (:func:`build_in_place`)."""
    key = hashlib.sha256(f"{uri}\0{version}".encode()).hexdigest()[:16]
    target = cache_root() / "copies" / f"{Path(uri.rstrip('/')).name}-{key}"
    if not target.is_dir():
        fs, inner = filesystem(uri)
        build_in_place(
            target,
            lambda staging: pafs.copy_files(
                inner, str(staging), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
            ),
        )
    return target
