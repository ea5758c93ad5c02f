"""Newline-aligned byte ranges of jsonl files, read through pyarrow filesystems.

A file of any size (local or on object storage) is cut into ``chunk_bytes`` ranges. A range owns
every line that *starts* inside it, so a reader of ``[start, end)`` skips the partial line at its
start and reads past ``end`` to finish its last line; no line is lost or read twice. Each range
also knows the number of its first line, so every record keeps its ``file:line`` address.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import pyarrow.fs as pafs

READ_BLOCK = 1 << 20


@dataclass(frozen=True)
class Chunk:
    path: str
    start: int
    end: int
    first_line: int = 1
    index: int = 0

    def to_row(self) -> dict:
        return asdict(self)


def resolve_inputs(patterns: list[str]) -> list[str]:
    """Expand local globs; URIs (``s3://…``, ``gs://…``) and plain paths pass through. Sorted, unique."""
    files: list[str] = []
    for pattern in patterns:
        if "://" in pattern:
            files.append(pattern)
            continue
        matches = sorted(glob.glob(os.path.expanduser(pattern))) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise FileNotFoundError(f"no file matches {pattern!r}")
        for match in matches:
            if not os.path.isfile(match):
                raise FileNotFoundError(f"input is not a file: {match}")
        files.extend(os.path.abspath(m) for m in matches)
    return sorted(dict.fromkeys(files))


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), path


def file_size(path: str) -> int:
    filesystem, inner = _filesystem(path)
    return filesystem.get_file_info(inner).size


def file_identity(path: str) -> dict:
    """Size and modification time: enough to tell that an input changed since the last run."""
    filesystem, inner = _filesystem(path)
    info = filesystem.get_file_info(inner)
    return {"path": path, "size": info.size, "mtime_ns": info.mtime_ns}


def _read_range(path: str, start: int, end: int) -> Iterator[bytes]:
    filesystem, inner = _filesystem(path)
    with filesystem.open_input_file(inner) as handle:
        handle.seek(start)
        position = start
        while position < end:
            block = handle.read(min(READ_BLOCK, end - position))
            if not block:
                return
            position += len(block)
            yield block


def lines_starting_in(path: str, start: int, end: int) -> int:
    """How many lines start at a byte offset in ``[start, end)`` (streamed, constant memory)."""
    count = 1 if start == 0 and end > 0 else 0
    # A line starts at p > 0 when byte p-1 is a newline: count newlines in [start-1, end-1).
    lo, hi = max(start - 1, 0), end - 1
    for block in _read_range(path, lo, hi):
        count += block.count(b"\n")
    return count


def plan_chunks(files: list[str], chunk_bytes: int) -> list[tuple[str, int, int]]:
    """``(path, start, end)`` ranges of at most ``chunk_bytes`` covering every file."""
    ranges = []
    for path in files:
        size = file_size(path)
        for start in range(0, max(size, 1), chunk_bytes):
            ranges.append((path, start, min(start + chunk_bytes, size)))
    return ranges


def number_chunks(ranges: list[tuple[str, int, int]], line_counts: list[int]) -> list[Chunk]:
    """Attach first-line numbers (per file) given each range's count of lines."""
    chunks, next_line, current = [], 1, None
    for index, ((path, start, end), count) in enumerate(zip(ranges, line_counts)):
        if path != current:
            current, next_line = path, 1
        chunks.append(Chunk(path, start, end, next_line, index))
        next_line += count
    return chunks


def read_lines(chunk: Chunk) -> Iterator[tuple[int, bytes]]:
    """``(line_number, raw_line)`` for every line the chunk owns (without the trailing newline)."""
    if chunk.start >= chunk.end:
        return
    filesystem, inner = _filesystem(chunk.path)
    with filesystem.open_input_file(inner) as handle:
        size = handle.size()
        position = chunk.start
        if chunk.start > 0:
            handle.seek(chunk.start - 1)
            position = chunk.start - 1
        else:
            handle.seek(0)
        buffer = b""
        skipping = chunk.start > 0  # the line in progress at start-1 belongs to the previous chunk
        line_number = chunk.first_line
        line_start = position
        while True:
            block = handle.read(READ_BLOCK)
            if not block:
                break
            buffer += block
            while True:
                newline = buffer.find(b"\n")
                if newline < 0:
                    break
                line, buffer = buffer[:newline], buffer[newline + 1 :]
                if skipping:
                    skipping = False
                else:
                    yield line_number, line.rstrip(b"\r")
                    line_number += 1
                line_start += newline + 1
                if line_start >= chunk.end:
                    return
            position += len(block)
        if buffer and not skipping and line_start < chunk.end and line_start < size:
            yield line_number, buffer.rstrip(b"\r")


def sample_lines(files: list[str], max_bytes: int, pieces: int = 64) -> Iterator[bytes]:
    """About ``max_bytes`` of whole lines drawn evenly from across all files (streamed).

    The inputs are cut into ``pieces`` ranges and each contributes lines from its start up to its
    share of the budget, so a sample covers the whole corpus rather than its first megabytes.
    """
    total = sum(file_size(path) for path in files)
    if total == 0:
        return
    ranges = plan_chunks(files, max(1, -(-total // pieces)))
    share = max(1, max_bytes // len(ranges))
    for path, start, end in ranges:
        taken = 0
        for _, line in read_lines(Chunk(path, start, end)):
            if line.strip():
                yield line
                taken += len(line)
            if taken >= share:
                break
