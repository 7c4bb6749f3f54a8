"""The fake predict server (cvserve.bench.fake) on a free port, and images to send."""

from __future__ import annotations

import pytest

from cvserve.bench import BenchImage, load_images
from cvserve.bench.fake import serve_in_thread


@pytest.fixture(scope="session")
def fake_url():
    with serve_in_thread(delay=0.0005) as url:
        yield url


@pytest.fixture(scope="session")
def small_images(data_dir) -> list[BenchImage]:
    return load_images(data_dir / "images" / "small")


@pytest.fixture(scope="session")
def tiny_images() -> list[BenchImage]:
    """Two small payloads: the fake server does not decode, so size is all that matters."""
    return [
        BenchImage("a.jpg", b"\xff\xd8\xff" + bytes(100), "image/jpeg"),
        BenchImage("b.png", b"\x89PNG\r\n\x1a\n" + bytes(200), "image/png"),
    ]
