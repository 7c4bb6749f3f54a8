"""The images a bench sends: ``(name, bytes, content_type)`` triples read from files."""

from __future__ import annotations

import logging
import mimetypes
import os
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)

__all__ = [
    "BenchImage",
    "ImageSourceError",
    "load_images",
    "sniff_content_type",
    "synthetic_images",
    "write_synthetic_photos",
]


class ImageSourceError(ValueError):
    """The images to send could not be read (missing, empty or unreadable)."""


class BenchImage(NamedTuple):
    name: str
    data: bytes
    content_type: str


_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
)


def sniff_content_type(data: bytes, name: str = "") -> str | None:
    """The image MIME type from the leading bytes, else from the file name; None if neither."""
    for magic, ctype in _MAGIC:
        if data.startswith(magic):
            return ctype
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis"):
        return "image/avif"
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"mif1", b"msf1"):
        return "image/heif"
    guess, _ = mimetypes.guess_type(name)
    return guess if guess and guess.startswith("image/") else None


def _files(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=_raise):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath, f) for f in sorted(filenames) if not f.startswith("."))
    return found


def _raise(err: OSError) -> None:
    raise err


def load_images(
    source: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
) -> list[BenchImage]:
    """Read images from a file, a directory (recursively, sorted) or a list of either.

    Files that are not images (by magic bytes or extension) are skipped and logged.
    Raises :class:`ImageSourceError` when a path is missing or unreadable, or when no
    image is left.
    """
    sources = [source] if isinstance(source, str | os.PathLike) else list(source)
    if not sources:
        raise ImageSourceError("no image paths given")
    images: list[BenchImage] = []
    skipped: list[str] = []
    for src in sources:
        root = Path(src)
        try:
            if root.is_dir():
                files = _files(root)
                names = [p.relative_to(root).as_posix() for p in files]
            elif root.exists():
                files, names = [root], [root.name]
            else:
                raise ImageSourceError(f"image path {str(root)!r} does not exist")
            for path, name in zip(files, names, strict=True):
                data = path.read_bytes()
                ctype = sniff_content_type(data, name)
                if ctype is None:
                    skipped.append(name)
                    continue
                images.append(BenchImage(name, data, ctype))
        except OSError as e:
            raise ImageSourceError(f"cannot read images from {str(root)!r}: {e}") from e
    if skipped:
        log.warning("skipped %d non-image file(s): %s", len(skipped), ", ".join(skipped[:5]))
    if not images:
        what = ", ".join(repr(str(s)) for s in sources)
        extra = f" ({len(skipped)} non-image file(s) skipped)" if skipped else ""
        raise ImageSourceError(f"no image files in {what}{extra}")
    return images


#: Sizes of the synthetic photos, by the shared data set's classes (its medium photos are
#: 1352x900 to 2048x1362, its large ones 3024x2268 to 4608x1976).
SYNTHETIC_SIZES = {"small": (640, 480), "medium": (1600, 1200), "large": (3200, 2400)}


def synthetic_images(
    n: int = 8, size: tuple[int, int] = (1600, 1200), prefix: str = "synthetic"
) -> list[BenchImage]:
    """Photo-sized JPEGs with smooth structure and noise, for machines without the data set
    (seeded: the same bytes every time)."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for i in range(n):
        f = 0.002 + 0.002 * i
        base = np.stack(
            [np.sin(xx * f + i), np.cos(yy * f * 1.3 - i), np.sin((xx + yy) * f * 0.7)], -1
        )
        px = ((base * 0.5 + 0.5) * 200 + rng.normal(0, 12, base.shape)).clip(0, 255)
        buf = io.BytesIO()
        Image.fromarray(px.astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(BenchImage(f"{prefix}-{i}.jpg", buf.getvalue(), "image/jpeg"))
    return out


def write_synthetic_photos(root: str | os.PathLike[str], n: int = 3) -> Path:
    """``root/small``, ``root/medium`` and ``root/large`` of synthetic JPEGs (kept when
    already there); returns ``root``."""
    root = Path(root)
    for name, size in SYNTHETIC_SIZES.items():
        folder = root / name
        if folder.is_dir() and len(list(folder.glob("*.jpg"))) >= n:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for image in synthetic_images(n, size, prefix=f"synthetic-{name}"):
            (folder / image.name).write_bytes(image.data)
    return root
