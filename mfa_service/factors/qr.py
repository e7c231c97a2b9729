"""QR codes for authenticator-app enrolment: a text (the otpauth:// URI) as SVG or PNG.

The symbol is encoded by zxing-cpp, in C++. Choosing the mask pattern (ISO/IEC 18004
section 7.8: each of the eight masks applied and scored by four penalty rules) is most of
a QR encoder's work; segno, in pure Python, spent about 6 ms of the event loop on it per
enrolment, 55 % of an enrolment's CPU (docs/BENCHMARKS.md). zxing-cpp makes the same
choice in about 0.2 ms. The two images are drawn here from its module matrix: a few lines
each, with a quiet zone of 4 modules as the standard asks (section 6.3.8).
"""

from __future__ import annotations

import re
import struct
import zlib

import zxingcpp

QUIET_ZONE = 4  # modules of light border on every side (ISO/IEC 18004 section 6.3.8)
_DARK_IS_ONE = bytes([1] + [0] * 255)
_DARK_RUN = re.compile(rb"\x01+")


def modules(text: str, *, error: str = "M") -> list[bytes]:
    """The symbol's dark (1) and light (0) modules, row by row, without the quiet zone.

    ``error``: the error correction level, L, M, Q or H (M restores 15 % of the
    codewords: enough for a code shown on a screen)."""
    barcode = zxingcpp.create_barcode(text, zxingcpp.BarcodeFormat.QRCode, ec_level=error)
    # zxing-cpp's Image exports the buffer protocol; its stub does not say so.
    image = memoryview(barcode.to_image(scale=1, add_quiet_zones=False))  # type: ignore[arg-type]
    height, width = image.shape or (0, 0)
    # One byte per module, 0 dark and 255 light, made 1 dark and 0 light.
    pixels = image.tobytes().translate(_DARK_IS_ONE)
    return [pixels[r * width:(r + 1) * width] for r in range(height)]


def svg(matrix: list[bytes], *, scale: int = 4) -> str:
    """The symbol as an SVG document (no XML declaration, so it can be inlined in HTML):
    one path, a horizontal stroke per run of dark modules, sized ``scale`` px a module."""
    size = len(matrix) + 2 * QUIET_ZONE
    runs = [f"M{run.start() + QUIET_ZONE} {y + QUIET_ZONE}.5h{run.end() - run.start()}"
            for y, row in enumerate(matrix) for run in _DARK_RUN.finditer(row)]
    px = size * scale
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{px}" height="{px}" '
            f'viewBox="0 0 {size} {size}" class="qrcode">'
            f'<rect width="{size}" height="{size}" fill="#fff"/>'
            f'<path stroke="#000" d="{"".join(runs)}"/></svg>')


def png(matrix: list[bytes], *, scale: int = 5) -> bytes:
    """The symbol as a 1-bit greyscale PNG (RFC 2083), ``scale`` px a module."""
    size = len(matrix) + 2 * QUIET_ZONE
    px = size * scale
    width = (px + 7) // 8
    pad = "0" * ((-px) % 8)  # a scanline fills whole bytes; the bits past it are ignored
    light = "1" * (QUIET_ZONE * scale)
    blank = b"\x00" + int("1" * px + pad, 2).to_bytes(width, "big")
    rows: list[bytes] = [blank] * (QUIET_ZONE * scale)
    for row in matrix:
        bits = light + "".join("0" * scale if m else "1" * scale for m in row) + light
        # Each scanline starts with its filter type: 0, none.
        rows.extend([b"\x00" + int(bits + pad, 2).to_bytes(width, "big")] * scale)
    rows.extend([blank] * (QUIET_ZONE * scale))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", px, px, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"".join(rows), 9)) + chunk(b"IEND", b""))
