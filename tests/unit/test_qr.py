"""factors/qr.py: the QR images of an app enrolment read back to the text they carry."""

from __future__ import annotations

import struct
import zlib

import pytest

from mfa_service.factors import qr
from tests.support.qr import read_png, read_svg

URI = ("otpauth://totp/Cloud%20Platform:alice%40example.com"
       "?secret=JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP&issuer=Cloud%20Platform")


@pytest.mark.parametrize("text", [URI, "otpauth://totp/x?secret=AB", URI + "&x=" + "A" * 300])
def test_both_images_read_back_to_the_text(text: str) -> None:
    symbol = qr.modules(text)
    assert read_png(qr.png(symbol)) == text
    assert read_svg(qr.svg(symbol)) == text


def test_the_symbol_is_square_with_finder_patterns_in_three_corners() -> None:
    symbol = qr.modules(URI)
    n = len(symbol)
    assert all(len(row) == n for row in symbol)
    assert (n - 17) % 4 == 0  # a QR version v is 4v + 17 modules wide
    finder = [b"\x01" * 7, b"\x01\x00\x00\x00\x00\x00\x01", b"\x01\x00\x01\x01\x01\x00\x01"]
    for top, left in ((0, 0), (0, n - 7), (n - 7, 0)):
        rows = [symbol[top + r][left:left + 7] for r in range(7)]
        assert rows[0] == rows[6] == finder[0]
        assert rows[1] == rows[5] == finder[1]
        assert rows[2] == rows[3] == rows[4] == finder[2]


def test_the_png_has_the_quiet_zone_and_the_asked_scale() -> None:
    symbol = qr.modules(URI)
    data = qr.png(symbol, scale=5)
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    side = (len(symbol) + 2 * qr.QUIET_ZONE) * 5
    assert (width, height, depth, colour) == (side, side, 1, 0)
    idat = data.index(b"IDAT")
    length = struct.unpack(">I", data[idat - 4:idat])[0]
    raw = zlib.decompress(data[idat + 4:idat + 4 + length])
    stride = 1 + (side + 7) // 8
    lines = [raw[i:i + stride] for i in range(0, len(raw), stride)]
    assert len(lines) == side
    all_light = b"\x00" + bytes([0xFF]) * (side // 8)
    # The first and last 4 modules of rows are light (every bit 1), the first dark module
    # (the finder pattern's corner) starts right after.
    for line in lines[:qr.QUIET_ZONE * 5] + lines[-qr.QUIET_ZONE * 5:]:
        assert line.startswith(all_light)
    assert lines[qr.QUIET_ZONE * 5][1:3] == b"\xff\xff" and lines[qr.QUIET_ZONE * 5][3] < 0xFF


def test_the_svg_is_a_document_to_inline() -> None:
    document = qr.svg(qr.modules(URI), scale=4)
    assert document.startswith("<svg ") and "<?xml" not in document
    size = len(qr.modules(URI)) + 2 * qr.QUIET_ZONE
    assert f'width="{size * 4}"' in document and f'viewBox="0 0 {size} {size}"' in document
