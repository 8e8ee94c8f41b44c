"""Filesystems for datasets: local paths and ``hdfs://`` through ``pyarrow.fs``.

HDFS needs libhdfs, a JVM and the Hadoop classpath on the host; none exist on the CI machines,
so only the local path is exercised by tests. The HDFS code path is the same pyarrow API.
"""

from __future__ import annotations

import functools
import os
import posixpath
from urllib.parse import urlparse

import pyarrow.fs as pafs


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_remote(base) else os.path.join(base, *parts)


def resolve(path: str):
    """(filesystem, path-within-filesystem) for a local path, ``file://`` or ``hdfs://`` URI."""
    if path.startswith("hdfs://") or path.startswith("viewfs://"):
        u = urlparse(path)
        return _hadoop(u.hostname or "default", u.port or 0), u.path
    if path.startswith("file://"):
        path = path[len("file://"):]
    if is_remote(path):
        fs, inner = pafs.FileSystem.from_uri(path)
        return fs, inner
    return pafs.LocalFileSystem(), os.path.abspath(path)


@functools.lru_cache(maxsize=8)
def _hadoop(host: str, port: int):
    """One connection per namenode: the reader opens a file per stripe from several threads."""
    return pafs.HadoopFileSystem(host=host, port=port)


def read_text(path: str) -> str:
    fs, inner = resolve(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(path)
    with fs.open_input_stream(inner) as f:
        return f.read().decode("utf-8")


def write_text(path: str, text: str) -> None:
    fs, inner = resolve(path)
    parent = posixpath.dirname(inner)
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(inner) as f:
        f.write(text.encode("utf-8"))


def file_info(path: str):
    """The ``pyarrow.fs.FileInfo`` of a path (``type`` is ``NotFound`` when it does not exist)."""
    fs, inner = resolve(path)
    return fs.get_file_info(inner)


def list_dir(path: str) -> list:
    """``FileInfo`` of the direct children of a directory, sorted by name.

    Raises FileNotFoundError / NotADirectoryError so callers can word their own error.
    """
    fs, inner = resolve(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(path)
    if info.type != pafs.FileType.Directory:
        raise NotADirectoryError(path)
    entries = fs.get_file_info(pafs.FileSelector(inner, recursive=False))
    return sorted(entries, key=lambda e: e.base_name)


def make_dirs(path: str) -> None:
    fs, inner = resolve(path)
    fs.create_dir(inner, recursive=True)


def delete_file(path: str) -> None:
    fs, inner = resolve(path)
    fs.delete_file(inner)


def move(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst`` on one filesystem, replacing ``dst`` (HDFS rename does not)."""
    fs, src_inner = resolve(src)
    _, dst_inner = resolve(dst)
    if is_remote(dst) and fs.get_file_info(dst_inner).type != pafs.FileType.NotFound:
        fs.delete_file(dst_inner)
    fs.move(src_inner, dst_inner)


def write_text_atomic(path: str, text: str) -> None:
    """Write through a hidden temporary file and rename, so readers never see half a file."""
    parent, name = posixpath.split(path) if is_remote(path) else os.path.split(path)
    tmp = join(parent, f".{name}.tmp")
    write_text(tmp, text)
    move(tmp, path)


def open_input_file(path: str):
    """A random-access ``pyarrow.NativeFile`` (what ``pyarrow.orc.ORCFile`` needs)."""
    fs, inner = resolve(path)
    return fs.open_input_file(inner)


def open_output_stream(path: str):
    fs, inner = resolve(path)
    return fs.open_output_stream(inner)
