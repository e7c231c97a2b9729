"""Reading back the QR codes the service draws, as a phone's camera would: each image
rasterised and decoded by zxing-cpp's reader (an implementation of the standard's decoder,
independent of how the symbol was drawn)."""

from __future__ import annotations

import io
import re

import zxingcpp
from PIL import Image, ImageDraw


def read_png(data: bytes) -> str:
    """The text of the QR code in a PNG image ("" when none is found)."""
    barcode = zxingcpp.read_barcode(Image.open(io.BytesIO(data)))
    return barcode.text if barcode is not None else ""


def read_svg(document: str, *, scale: int = 6) -> str:
    """The text of the QR code in an SVG drawn as the service draws it: a light square and
    one path of horizontal runs (``M x y.5 h n``), in module units of its viewBox."""
    size = int(re.search(r'viewBox="0 0 (\d+) \d+"', document)[1])  # type: ignore[index]
    path = re.search(r'<path [^>]*d="([^"]*)"', document)[1]  # type: ignore[index]
    image = Image.new("L", (size * scale, size * scale), 255)
    draw = ImageDraw.Draw(image)
    for x, y, n in re.findall(r"M(\d+) (\d+)\.5h(\d+)", path):
        left, top = int(x) * scale, int(y) * scale
        draw.rectangle((left, top, left + int(n) * scale - 1, top + scale - 1), fill=0)
    barcode = zxingcpp.read_barcode(image)
    return barcode.text if barcode is not None else ""
