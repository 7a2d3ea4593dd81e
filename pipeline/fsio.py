"""fsspec helpers every writer and reader shares: URL -> filesystem, URL joins, checked relative names, atomic writes.

The single source of truth for "write a file so readers never see half of it" and "join a URL" in vitpipe
(`vitpipe.jobs` uses these too). Atomic means: a reader sees the old complete file or the new complete file, two
concurrent writers never share a temporary file, and a writer that raises (or is killed) leaves the old file as it
was. How that is achieved depends on the filesystem:

* local: a uniquely named temporary file in the target's folder (`.<name>.<random>.tmp`), flushed and fsync'ed,
  then `os.replace` (an atomic rename over the target) and an fsync of the folder so the rename survives a crash.
  A killed writer can leave its temporary file behind; it is never read.
* S3 (`s3://`, `s3a://`): `write_atomic` is one PUT; `open_atomic` streams an uncommitted multipart upload
  (`autocommit=False`) that is completed at the end. S3 publishes an object only when its upload completes, so
  there is no temporary object and no copy; an error aborts the upload. (A killed writer leaves an incomplete
  upload that is never visible; a bucket lifecycle rule for incomplete multipart uploads removes it.)
* other filesystems: a uniquely named temporary file next to the target, then `fs.mv` over it (never deleting
  the target first); an error removes the temporary file.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Iterator
from typing import IO

import fsspec
from fsspec.implementations.local import LocalFileSystem

__all__ = ["check_relative_path", "join_url", "open_atomic", "url_to_fs", "write_atomic", "write_bytes_atomic"]

# object stores whose files support autocommit=False + commit()/discard() (an upload published only on commit)
_UPLOAD_COMMIT_PROTOCOLS = {"s3", "s3a"}
_SEGMENT = re.compile(r"[A-Za-z0-9_=+-][A-Za-z0-9._=+-]*")


def url_to_fs(url: str, storage_options: dict | None = None, fresh: bool = False):
    """(filesystem, path) for any fsspec URL or plain path; `fresh` skips fsspec's instance cache (per worker)."""
    opts = dict(storage_options or {})
    if fresh:
        opts["skip_instance_cache"] = True
    return fsspec.core.url_to_fs(url, **opts)


def join_url(base: str, *parts: str) -> str:
    """`base/part1/part2...` keeping the URL scheme (no os.path: URLs are not local paths).

    Slashes at the edges of each part are stripped and empty parts dropped, so `join_url("s3://b/x/", "/y/", "z")`
    is `s3://b/x/y/z`. The parts are not validated: a name that comes from outside (a manifest, a config) goes
    through `check_relative_path` first.
    """
    tail = [p.strip("/") for p in parts]
    return "/".join([base.rstrip("/"), *[p for p in tail if p]])


def check_relative_path(name: str, what: str = "name", suffix: str | None = None) -> str:
    """`name` if it is a plain relative path that stays inside the folder it is joined to; else ValueError.

    Allowed: one or more `/`-separated segments of ASCII letters, digits and `._=+-`, each starting with a letter,
    digit or one of `_=+-` (so no `.`/`..` segment and no hidden file), optionally required to end with `suffix`.
    Rejected, among others: `../x.tar`, `a/../../x.tar`, `/etc/passwd`, `file:///x`, `s3://other/x.tar`, `a//b`,
    `a\\b`, `~/x`, `%2e%2e/x`, names with spaces or non-ASCII characters.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} {name!r} must be a non-empty relative path")
    if not all(_SEGMENT.fullmatch(seg) for seg in name.split("/")):
        raise ValueError(f"{what} {name!r} is not a relative path inside its folder "
                         "('/'-separated segments of [A-Za-z0-9._=+-], none starting with '.')")
    if suffix is not None and not name.endswith(suffix):
        raise ValueError(f"{what} {name!r} does not end with {suffix!r}")
    return name


def _protocols(fs) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def _tmp_name(path: str) -> str:
    """A fresh hidden temporary name in `path`'s folder (the base name is shortened to stay under NAME_MAX)."""
    head, _, base = path.rpartition("/")
    name = f".{base[:120]}.{secrets.token_hex(8)}.tmp"
    return f"{head}/{name}" if head else name


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:  # some filesystems do not open folders; the file itself is already on disk
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _open_atomic_local(path: str) -> Iterator[IO[bytes]]:
    folder = os.path.dirname(path)
    os.makedirs(folder or ".", exist_ok=True)
    while True:
        tmp = _tmp_name(path)
        try:
            # O_EXCL: a name another writer holds is never shared; mode 0o666 lets the umask decide permissions
            # (mkstemp's 0600 would make shard sets unreadable to other users of shared storage)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


@contextlib.contextmanager
def _open_atomic_upload(fs, path: str) -> Iterator[IO[bytes]]:
    f = fs.open(path, "wb", autocommit=False)
    try:
        yield f
        f.close()  # uploads the last part; with autocommit=False nothing is published yet
        f.commit()
    except BaseException:
        with contextlib.suppress(Exception):
            f.discard()  # abort the multipart upload; nothing was published
        f.closed = True  # without this, garbage collection would close (and flush) the discarded file
        raise


@contextlib.contextmanager
def _open_atomic_move(fs, path: str) -> Iterator[IO[bytes]]:
    folder = path.rpartition("/")[0]
    if folder:
        fs.makedirs(folder, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with fs.open(tmp, "wb") as f:
            yield f
        fs.mv(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            if fs.exists(tmp):
                fs.rm(tmp)
        raise


def open_atomic(fs, path: str) -> contextlib.AbstractContextManager[IO[bytes]]:
    """A binary file to write `path` on `fs` through; the file appears at `path` only when the `with` block ends
    without an exception (see the module docstring for how, per filesystem). Missing parent folders are created.

        with open_atomic(fs, path) as f:
            f.write(header); f.write(body)
    """
    if isinstance(fs, LocalFileSystem):
        return _open_atomic_local(fs._strip_protocol(path))
    if set(_protocols(fs)) & _UPLOAD_COMMIT_PROTOCOLS:
        return _open_atomic_upload(fs, fs._strip_protocol(path))
    return _open_atomic_move(fs, fs._strip_protocol(path))


def write_atomic(fs, path: str, data: bytes) -> None:
    """Write `data` to `path` on `fs` atomically: readers see the old file or the new one, never a partial one."""
    if isinstance(fs, LocalFileSystem) or not set(_protocols(fs)) & _UPLOAD_COMMIT_PROTOCOLS:
        with open_atomic(fs, path) as f:
            f.write(data)
    else:
        fs.pipe_file(fs._strip_protocol(path), data)  # one PUT (one completed multipart upload when huge)


def write_bytes_atomic(url: str, data: bytes, storage_options: dict | None = None) -> None:
    """`write_atomic` for a URL or plain path (parent folders are created)."""
    fs, path = url_to_fs(url, storage_options)
    write_atomic(fs, path, data)
