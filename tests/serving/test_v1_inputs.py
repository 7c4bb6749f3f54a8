"""What a ``/v1`` predict body may be (serving/v1_body.py), against a real server: raw
bytes with or without a content type, multipart forms, JSON with base64 images; and 405
for a wrong method."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from cvserve.serving.v1_body import MAX_IMAGES

PREDICT = "/v1/models/tiny-resnet:predict"


@pytest.fixture(scope="module")
def photos(data_dir) -> dict[str, bytes]:
    small = data_dir / "images" / "small"
    return {p.name: p.read_bytes() for p in sorted(small.glob("*.jpg"))[:3]}


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def _top(answer: dict) -> list[int]:
    return [t["index"] for t in answer["top_k"]]


def test_every_form_of_one_image_gets_the_same_answer(client, photos):
    jpg = next(iter(photos.values()))
    want = client.post(PREDICT, content=jpg, headers={"content-type": "image/jpeg"})
    assert want.status_code == 200
    b64 = base64.b64encode(jpg).decode()
    sent = {
        "no content type": client.post(PREDICT, content=jpg),
        # curl --data-binary @photo.jpg without -H: the README's pipeline example
        "form-urlencoded": client.post(
            PREDICT, content=jpg, headers={"content-type": "application/x-www-form-urlencoded"}
        ),
        "octet-stream": client.post(
            PREDICT, content=jpg, headers={"content-type": "application/octet-stream"}
        ),
        "json": client.post(PREDICT, json={"image": b64}),
        "json data url": client.post(PREDICT, json={"image": "data:image/jpeg;base64," + b64}),
    }
    for how, r in sent.items():
        assert r.status_code == 200, (how, r.text)
        got = r.json()
        assert got["image_size"] == want.json()["image_size"], how
        assert _top(got) == _top(want.json()), how
        assert "decode" in r.headers["server-timing"], how


def test_multipart_one_file_is_one_answer_several_are_a_list(client, photos):
    names = list(photos)
    singles = {n: client.post(PREDICT, content=photos[n]).json() for n in names}
    r = client.post(PREDICT, files={"image": (names[0], photos[names[0]], "image/jpeg")})
    assert r.status_code == 200, r.text
    assert "results" not in r.json() and _top(r.json()) == _top(singles[names[0]])
    files = [("images", (n, photos[n], "image/jpeg")) for n in names]
    r = client.post(PREDICT + "?top_k=2", files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == len(names)
    for n, got in zip(names, results, strict=True):  # in the order sent
        assert got["image_size"] == singles[n]["image_size"]
        assert _top(got) == _top(singles[n])[:2]
    stages = dict(e.split(";dur=") for e in r.headers["server-timing"].split(", "))
    assert {"recv", "decode", "infer"} <= set(stages)
    r = client.post(PREDICT, json={"images": [base64.b64encode(photos[n]).decode() for n in names]})
    assert [_top(x) for x in r.json()["results"]] == [_top(singles[n]) for n in names]


def test_one_bad_image_in_a_list_fails_the_request_naming_it(client, photos):
    good = next(iter(photos.values()))
    files = [("images", ("ok.jpg", good, "image/jpeg")), ("images", ("bad.jpg", b"\xff\xd8\xffjunk", "image/jpeg"))]  # fmt: skip
    r = client.post(PREDICT, files=files)
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith("image 1 ('bad.jpg'): ")
    assert client.post(PREDICT, content=good).status_code == 200


def test_bad_forms_are_clear_400s(client, photos):
    jpg = next(iter(photos.values()))
    form = "multipart/form-data; boundary=XyZ"
    cases = {
        "text field": (
            {"data": {"top_k": "3"}, "files": {"image": ("a.jpg", jpg, "image/jpeg")}},
            "is not a file",
        ),
        "no boundary": (
            {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}},
            "boundary",
        ),
        "cut short": (
            {
                "content": b'--XyZ\r\nContent-Disposition: form-data; name="image"; '
                b'filename="a.jpg"\r\n\r\n' + jpg[:100],
                "headers": {"content-type": form},
            },
            "closing boundary",
        ),  # fmt: skip
        "no file": ({"content": b"--XyZ--\r\n", "headers": {"content-type": form}}, "no file"),
        "not json": (
            {"content": b"{nope", "headers": {"content-type": "application/json"}},
            "JSON",
        ),
        "other keys": ({"json": {"image": "", "top_k": 3}}, "query string"),
        "not base64": ({"json": {"image": "@@@"}}, "base64"),
        "not a string": ({"json": {"image": 3}}, "base64 string"),
        "not a list": ({"json": {"images": "abc"}}, "list"),
        "too many": (
            {"json": {"images": ["AAAA"] * (MAX_IMAGES + 1)}},
            f"the limit is {MAX_IMAGES}",
        ),
    }
    for how, (kwargs, words) in cases.items():
        r = client.post(PREDICT, **kwargs)
        assert r.status_code == 400, (how, r.status_code, r.text)
        assert words in r.json()["error"]["message"], (how, r.text)
    # text/plain is no form at all
    r = client.post(PREDICT, content=b"hello", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "curl -F" in r.json()["error"]["message"]
    assert client.post(PREDICT, content=jpg).status_code == 200  # nothing lost


def test_the_body_limit_applies_to_forms_and_json(client):
    big = bytes(4 * 1024 * 1024)  # the fixture's limit is 4 MiB
    r = client.post(PREDICT, files={"image": ("big.jpg", big, "image/jpeg")})
    assert r.status_code == 413 and r.json()["error"]["max_body_bytes"] == 4 * 1024 * 1024
    r = client.post(PREDICT, json={"image": base64.b64encode(big[: 3 * 1024 * 1024]).decode()})
    assert r.status_code == 413
    # under the limit but over 1 MiB: parsed off the event loop, the same answer
    noise = np.random.default_rng(0).integers(0, 256, (640, 640, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG", compress_level=0)
    assert 1 << 20 < len(buf.getvalue()) < 3 << 20
    r = client.post(PREDICT, json={"image": base64.b64encode(buf.getvalue()).decode()})
    assert r.status_code == 200 and r.json()["image_size"] == [640, 640]
    r = client.post(PREDICT, files={"image": ("noise.png", buf.getvalue(), "image/png")})
    assert r.status_code == 200 and r.json()["image_size"] == [640, 640]


@pytest.mark.parametrize("fmt", ["AVIF", "HEIF"])
def test_avif_and_heic_are_served(client, fmt):
    if fmt == "HEIF":
        import pillow_heif

        pillow_heif.register_heif_opener()
    buf = io.BytesIO()
    Image.new("RGB", (120, 80), (10, 200, 30)).save(buf, fmt)
    r = client.post(
        PREDICT, content=buf.getvalue(), headers={"content-type": f"image/{fmt.lower()}"}
    )
    assert r.status_code == 200, r.text
    assert r.json()["image_size"] == [120, 80]


def test_a_wrong_method_is_405_with_allow(client):
    for path in (PREDICT, "/v1/pipelines/ocr:predict", "/v1/models/nope:predict"):
        r = client.get(path)
        assert r.status_code == 405, (path, r.status_code, r.text)
        assert r.headers["allow"] == "POST"
        assert r.json()["error"]["kind"] == "method_not_allowed"
        assert "use POST" in r.json()["error"]["message"]
    r = client.put("/v1/models")
    assert r.status_code == 405 and "GET" in r.headers["allow"]
    assert client.get("/v1/models/tiny-resnet").status_code == 200


def test_heic_without_the_extra_is_a_415_naming_it(client, monkeypatch):
    import sys

    import pillow_heif

    pillow_heif.register_heif_opener()
    buf = io.BytesIO()
    Image.new("RGB", (40, 30)).save(buf, "HEIF")
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # as if the extra were absent
    r = client.post(PREDICT, content=buf.getvalue(), headers={"content-type": "image/heic"})
    assert r.status_code == 415
    err = r.json()["error"]
    assert "pip install 'cvserve[heic]'" in err["message"] and "HEIF" not in err["supported"]
