"""What a ``/v1`` predict body may carry, read into the images it holds.

- image bytes (``image/*``, ``application/octet-stream``, or no content type): one image;
  curl's ``--data-binary`` default, ``application/x-www-form-urlencoded``, is taken as
  image bytes when the bytes are an image (the decoder sniffs every format anyway);
- ``multipart/form-data`` (``curl -F image=@photo.jpg``): every file part is one image,
  in the order sent (one file: the usual answer; several: a list); a text field is
  refused (parameters go in the query string);
- ``application/json``: ``{"image": "<base64>"}`` (one) or ``{"images": [...]}`` (several);
  a ``data:image/...;base64,`` prefix is allowed.

The body is read under the server's ``max_body_bytes`` first (:func:`read_body`), so every
form obeys the same limit as raw bytes. :class:`Images` says whether the client sent one
image (the answer is the usual one) or a list (the answer is ``{"results": [...]}``).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from cvserve.images.decode import sniff_format
from cvserve.serving.errors import BadRequest, UnsupportedMediaType

__all__ = ["ACCEPTED", "MAX_IMAGES", "Images", "parse_body"]

#: The content types a predict body may have (the 415 message lists them).
ACCEPTED = ("image/*", "application/octet-stream", "multipart/form-data", "application/json")
#: The most images one request may carry (each still passes admission on its own).
MAX_IMAGES = 64
_RAW = ("image/", "application/octet-stream")
_FORM_URLENCODED = "application/x-www-form-urlencoded"


@dataclass(frozen=True)
class Images:
    """The images of one request; ``many``: sent as a list (several form files, or
    ``images``), so the answer is a list too (``images`` even of one)."""

    items: tuple[bytes, ...]
    many: bool
    names: tuple[str, ...] = ()

    def name(self, i: int) -> str:
        """How an error names image ``i`` (its file name, else its position)."""
        if i < len(self.names) and self.names[i]:
            return f"image {i} ({self.names[i]!r})"
        return f"image {i}"


def parse_body(content_type: str | None, body: bytes) -> Images:
    """The images in ``body`` given its ``Content-Type`` (400 for a malformed form or
    JSON, 415 for a type no form takes)."""
    ctype, options = parse_options_header(content_type or "application/octet-stream")
    media = ctype.decode("latin-1").lower()
    if media.startswith(_RAW) or media == "":
        return Images((body,), many=False)
    if media == "multipart/form-data":
        return _form(options.get(b"boundary"), body)
    if media == "application/json" or media.endswith("+json"):
        return _json(body)
    if media == _FORM_URLENCODED and sniff_format(body) is not None:
        return Images((body,), many=False)  # curl --data-binary @photo.jpg, no -H
    raise UnsupportedMediaType(
        f"content-type {media!r}: send image bytes (image/* or application/octet-stream), a "
        'multipart form (curl -F image=@photo.jpg) or JSON {"image": "<base64>"}',
        accepted=list(ACCEPTED),
    )


def _form(boundary: bytes | None, body: bytes) -> Images:
    if not boundary:
        raise BadRequest("multipart/form-data without a boundary in its content-type")
    parts: list[tuple[dict[bytes, bytes], bytearray]] = []
    header = [b"", b""]
    ended = []

    def on_part_begin() -> None:
        parts.append(({}, bytearray()))

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def on_header_end() -> None:
        parts[-1][0][header[0].strip().lower()] = header[1].strip()
        header[0] = header[1] = b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1][1].extend(data[start:end])

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
        "on_end": lambda: ended.append(True),
    }
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except MultipartParseError as e:
        raise BadRequest(f"malformed multipart form: {e}") from None
    if not ended:
        raise BadRequest("malformed multipart form: it ends before its closing boundary")
    items: list[bytes] = []
    names: list[str] = []
    for headers, data in parts:
        _, disp = parse_options_header(headers.get(b"content-disposition", b""))
        field = disp.get(b"name", b"").decode("utf-8", "replace")
        filename = disp.get(b"filename")
        if filename is None:
            raise BadRequest(
                f"form field {field!r} is not a file: send images as files "
                "(curl -F image=@photo.jpg) and parameters in the query string",
                field=field,
            )
        items.append(bytes(data))
        names.append(filename.decode("utf-8", "replace"))
    items_ = _checked(items, "the form has no file part")
    return Images(items_, len(items_) > 1, tuple(names))


def _json(body: bytes) -> Images:
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or set(doc) not in ({"image"}, {"images"}):
        keys = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise BadRequest(
            'a JSON body is {"image": "<base64>"} or {"images": ["<base64>", ...]}; '
            f"got {keys}; parameters go in the query string"
        )
    if "image" in doc:
        return Images((_b64(doc["image"], "image"),), many=False)
    images = doc["images"]
    if not isinstance(images, list):
        raise BadRequest('"images" must be a list of base64 strings')
    items = [_b64(v, f"images[{i}]") for i, v in enumerate(images)]
    return Images(_checked(items, '"images" is empty'), many=True)


def _b64(value: object, where: str) -> bytes:
    if not isinstance(value, str):
        raise BadRequest(f"{where} must be a base64 string, not {type(value).__name__}")
    if value.startswith("data:"):
        head, sep, value = value.partition(",")
        if not sep or not head.endswith(";base64"):
            raise BadRequest(f"{where}: a data URL must be data:<type>;base64,<data>")
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadRequest(f"{where} is not valid base64: {e}") from None


def _checked(items: list[bytes], empty: str) -> tuple[bytes, ...]:
    if not items:
        raise BadRequest(empty)
    if len(items) > MAX_IMAGES:
        raise BadRequest(
            f"{len(items)} images in one request; the limit is {MAX_IMAGES}",
            max_images=MAX_IMAGES,
        )
    return tuple(items)
