"""Real servers on free ports, serving the tiny zoo model."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from cvserve.config import BatchConfig, ModelConfig, ServerConfig
from cvserve.serving.process import ServerThread, free_port


def start_server(cache: Path, **batching) -> ServerThread:
    cfg = ServerConfig(
        port=free_port(),
        cache_dir=str(cache),
        preprocess_threads=2,
        max_body_bytes=4 * 1024 * 1024,
        models=(ModelConfig("tiny-resnet", batching=BatchConfig(**batching)),),
    )
    return ServerThread(cfg).start()


@pytest.fixture(scope="session")
def server_factory():
    """``start(cache, **batching)``: a new server, stopped by the caller."""
    return start_server


@pytest.fixture(scope="module")
def server(model_cache):
    srv = start_server(model_cache, max_batch_size=8, max_delay_ms=20, max_queue=256)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def distinct_images(data_dir) -> list[bytes]:
    """64 different JPEGs: crops of the shared photos at several places and sizes."""
    photos = sorted((data_dir / "images" / "small").glob("*.jpg"))
    out = []
    for i in range(64):
        im = Image.open(photos[i % len(photos)]).convert("RGB")
        w, h = im.size
        k = i // len(photos)
        box = (k * w // 12, k * h // 12, w - k * w // 16, h - (k % 3) * h // 10)
        buf = io.BytesIO()
        im.crop(box).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    assert len(set(out)) == 64
    return out
