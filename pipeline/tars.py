"""A minimal reader of tar shards in memory: ustar/GNU/pax members, ~20x faster than `tarfile` on shards of many
small members (the CIFAR-size case), and the grouping of members into samples (key, image bytes, label)."""

from __future__ import annotations

from .sources import IMAGE_EXTS


class TarFormatError(ValueError):
    """A tar header is not a tar header, or the data ends before the archive does."""


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    field = field.split(b"\0", 1)[0].strip()
    return int(field, 8) if field else 0


def iter_tar(data: bytes):
    """(member name, member bytes) of the regular files of an in-memory tar, in order.

    A minimal reader of ustar/GNU/pax headers, ~20x faster than `tarfile` on shards of many small members (the
    CIFAR-size case). Raises `TarFormatError` at a corrupt header or where the data is truncated.
    """
    view = memoryview(data)
    off, n, long_name = 0, len(data), None
    while off + 512 <= n:
        h = data[off : off + 512]
        if h.count(0) == 512:
            return
        if h[257:262] != b"ustar":  # cheaper than the checksum and catches garbage just as well in practice
            raise TarFormatError(f"not a tar header at byte {off}")
        size, kind = _octal(h[124:136]), h[156:157]
        start, end = off + 512, off + 512 + size
        if end > n:
            raise TarFormatError(f"tar member at byte {off} truncated")
        off = start + (-(-size // 512)) * 512
        if kind == b"L":  # GNU long name of the next member
            long_name = bytes(view[start:end]).split(b"\0", 1)[0].decode()
            continue
        if kind == b"x":  # pax extended header: only the path matters here
            for rec in bytes(view[start:end]).decode().split("\n"):
                if " path=" in rec:
                    long_name = rec.split(" path=", 1)[1]
            continue
        if kind not in (b"0", b"\0", b"7"):
            long_name = None
            continue
        if long_name is not None:
            name, long_name = long_name, None
        else:
            name = h[:100].split(b"\0", 1)[0].decode()
            if h[257:263] == b"ustar\0" and h[345] != 0:
                name = h[345:500].split(b"\0", 1)[0].decode() + "/" + name
        yield name, bytes(view[start:end])
    raise TarFormatError("tar ends without its end-of-archive blocks (truncated)")


def parse_shard(data: bytes, exclude: set[str]) -> tuple[list[tuple[str, bytes, object]], bool]:
    """Samples (key, image bytes, label) of a tar shard in file order, minus `exclude`; and whether the tar was
    cut short or corrupt (its complete samples before the damage are still returned)."""
    groups: dict[str, dict] = {}
    truncated = False
    try:
        for name, payload in iter_tar(data):
            base = name.rsplit("/", 1)[-1]
            if "." not in base:
                continue
            stem, ext = base.split(".", 1)
            ext = ext.lower()
            if ext in ("cls", "labels") or ext in IMAGE_EXTS:
                groups.setdefault(name[: len(name) - len(base)] + stem, {})[ext] = payload
    except (TarFormatError, UnicodeDecodeError, ValueError):
        truncated = True
    out = []
    for key, g in groups.items():
        if key in exclude:
            continue
        img = next((g[e] for e in ("jpg", "jpeg", "png", "webp") if e in g), None)
        if img is None:
            continue
        if "labels" in g:
            label = [int(x) for x in g["labels"].decode().split(",") if x.strip()]
        elif "cls" in g:
            label = int(g["cls"].decode())
        else:
            continue  # a sample cut off before its label member: incomplete
        out.append((key, img, label))
    return out, truncated
