"""The HTTP status each file of ``../shared/data/bad`` must get, and why.

Derived from MANIFEST.tsv (its notes end in Pillow's verdict on each file) and the
decoder's documented errors (``cvserve.images.decode``): a file Pillow decodes is served
(200); a corrupt, truncated or empty one is ``UndecodableImage`` (400); a declared size
or decompressed metadata over the limit is ``ImageTooLarge`` (413), refused before any
pixel is decoded; a format cvserve does not decode is ``UnsupportedImageType`` (415).

This holds for the ``pil``, ``pil-reduced`` and ``simplejpeg`` decoders. ``opencv`` is
lenient with two corrupt JPEGs (see ``OPENCV_LENIENT``) and serves their partial pixels.
``tests/images/test_decode.py`` checks the table against MANIFEST.tsv and the decoder.
"""

from __future__ import annotations

#: The ``error.kind`` of the JSON body that goes with each error status here.
KIND = {400: "undecodable_image", 413: "image_too_large", 415: "unsupported_media_type"}

#: Files Pillow alone cannot decode that an extra of cvserve's decodes, and that extra.
BY_EXTRA = {"hopper.heif": "heic"}

STATUS: dict[str, int] = {
    # Pillow 13: "decodes OK"
    "app13-multiple.jpg": 200,  # progressive, multiple APP13 segments
    "hopper.bmp": 200,
    "hopper.webp": 200,
    "hopper_16bit_qtables.jpg": 200,  # SOF1, 16-bit quantisation tables
    "hopper_bad_exif.jpg": 200,  # corrupt EXIF, pixels fine
    "hopper_gray.jpg": 200,
    "hopper_lzw.tif": 200,
    "hopper_orientation_6.jpg": 200,
    "hopper_orientation_8.jpg": 200,
    "i_trns.png": 200,  # 16-bit greyscale with tRNS
    "iss634.gif": 200,  # animated: the first frame
    "iss634.webp": 200,  # animated RGBA
    "junk_jpeg_header.jpg": 200,  # extraneous bytes: libjpeg warns, decodes
    "monkey16.png": 200,  # 16 bits per channel
    "p_trns_single.png": 200,
    "pil123p.png": 200,  # interlaced palette
    "pil123rgba.png": 200,  # interlaced RGBA
    "pil_sample_cmyk.jpg": 200,
    "sugarshack.mpo": 200,  # multi-picture JPEG: the first picture
    "testimgari.jpg": 200,  # arithmetic-coded JPEG
    "tiff_16bit_RGB.tiff": 200,
    # corrupt, truncated or empty: "open fails" / "load() fails" -> 400
    "79f5fc6bca756e1f067c6fc83e18b32e.jpg": 400,  # broken data stream
    "f006e96f3b27fdfaa075322d759ea2e8.jpg": 400,  # broken data stream
    "broken.png": 400,  # garbage IHDR
    "notjpeg.jpg": 400,  # zero bytes
    "shortfile.bmp": 400,
    "truncated.jpg": 400,  # header and tables only
    "truncated_image.png": 400,
    "truncated_jpeg.jpg": 400,
    "ultrahdr.jpg": 400,  # declares 1512x2688 (under the limit), cut short
    "zero_width.gif": 400,
    # over the limit, refused from the header: DecompressionBombError -> 413
    "decompression_bomb.gif": 413,  # declares 65535x66601
    "max_size.jpg": 413,  # declares 65535x65535
    "reallybig.bmp": 413,  # declares 3000000x2000000
    # a 1x1 PNG whose text chunk inflates past Pillow's limit ("Decompressed data too
    # large"): the decoder maps it to ImageTooLarge too, not to a pixel limit
    "png_decompression_dos.png": 413,
    # HEIF: Pillow alone cannot; pillow-heif (the heic extra, which the test extra
    # installs) decodes it
    "hopper.heif": 200,
    # formats cvserve does not decode -> 415
    "monkey12.jpg": 415,  # 12-bit JPEG (8-bit only)
}

#: Corrupt JPEGs that OpenCV decodes anyway (libjpeg's warnings ignored): 200 with it.
OPENCV_LENIENT = frozenset(
    {"79f5fc6bca756e1f067c6fc83e18b32e.jpg", "f006e96f3b27fdfaa075322d759ea2e8.jpg"}
)
