"""The OCR server a user writes first: FastAPI + RapidOCR, the yardstick for cvserve's OCR
pipeline in ``benchmarks/heavy.py``.

One ``RapidOCR()`` (rapidocr-onnxruntime 1.4.4: PP-OCRv4 det + rec and the angle
classifier, the package's default settings) shared by a plain ``def`` endpoint, so
FastAPI runs each request in its threadpool. It answers ``{"lines": [{box, text,
score}]}`` in the order RapidOCR returns them.

    python benchmarks/baselines/ocr_server.py --port 8002
    curl --data-binary @page.jpg -H 'content-type: image/jpeg' http://127.0.0.1:8002/ocr

The image is decoded with Pillow (EXIF orientation applied, RGB) and handed to RapidOCR as
the BGR array it expects: RapidOCR 1.4.4's own loader of encoded bytes ignores EXIF
orientation and passes palette images through as gray indices, so on the shared OCR set
(an EXIF-rotated photo, a palette PNG) it would read different pixels than cvserve does.
``POST /v1/pipelines/ocr:predict`` is the same endpoint under cvserve's route, so that
``cvserve bench`` (which posts to that route) can load this server as it loads cvserve.
"""

from __future__ import annotations

import io

import numpy as np
from fastapi import Body, FastAPI, HTTPException
from PIL import Image, ImageOps, UnidentifiedImageError

#: the route ``cvserve bench --pipeline ocr`` posts to
BENCH_ROUTE = "/v1/pipelines/ocr:predict"


def create_app() -> FastAPI:
    """The app, with its RapidOCR engine loaded."""
    from rapidocr_onnxruntime import RapidOCR

    engine = RapidOCR()
    app = FastAPI(title="RapidOCR baseline")

    def ocr(body: bytes = Body(..., media_type="image/jpeg")) -> dict:
        try:
            image = ImageOps.exif_transpose(Image.open(io.BytesIO(body))).convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise HTTPException(400, f"cannot decode image: {e}") from None
        bgr = np.ascontiguousarray(np.asarray(image)[:, :, ::-1])
        result, _elapsed = engine(bgr)
        lines = [
            {"box": np.asarray(box, dtype=float).tolist(), "text": text, "score": float(score)}
            for box, text, score in result or []
        ]
        return {"lines": lines}

    app.post("/ocr")(ocr)
    app.post(BENCH_ROUTE)(ocr)

    from _app import add_readyz  # beside this script

    return add_readyz(app)


def main(argv: list[str] | None = None) -> None:
    from _app import serve_main  # beside this script

    serve_main(__doc__, 8002, lambda a: create_app(), argv)


if __name__ == "__main__":
    main()
