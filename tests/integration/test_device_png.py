"""scripts/_png.py, the PNG chunk code device_bundle.sh (record a texture's chunks) and device_eval.sh (put them
back around a fresh encoding of the pixels) share: the restore round trip on Pillow-made PNGs, and both scripts
use it. The full scripts need the LIBERO bundle (see docs/device-eval.md)."""

from __future__ import annotations

import base64
import importlib.util
import io
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

pytestmark = pytest.mark.integration

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
_spec = importlib.util.spec_from_file_location("_png", SCRIPTS / "_png.py")
png = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(png)


def _chunk(ctype: bytes, body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + ctype + body + zlib.crc32(ctype + body).to_bytes(4, "big")


def _pillow_png(mode: str, pnginfo: PngInfo | None = None, **save: object) -> tuple[bytes, bytes]:
    """-> (PNG file with the given extra chunks, raw pixels) of a fixed 13 x 7 image."""
    pixels = np.random.default_rng(0).integers(0, 256, (7, 13, len(mode)), dtype=np.uint8)
    im = Image.fromarray(pixels, mode)
    buf = io.BytesIO()
    im.save(buf, "PNG", pnginfo=pnginfo, **save)
    return buf.getvalue(), im.tobytes()


def _bare(raw: bytes, mode: str) -> bytes:
    """What device_eval.sh encodes: the pixels alone, Pillow, compress_level=1."""
    buf = io.BytesIO()
    Image.frombytes(mode, (13, 7), raw).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_recorded_chunks_go_back_in_their_places(mode: str) -> None:
    info = PngInfo()
    info.add(b"sRGB", b"\x00")
    info.add_text("Software", "rsd test")
    written, raw = _pillow_png(mode, info, dpi=(72, 72))
    assert written[-12:] == _chunk(b"IEND", b"")
    original = written[:-12] + _chunk(b"tEXt", b"Comment\x00after the image data") + written[-12:]

    ihdr, chunks = png.png_chunks(original)
    assert [(t, after) for t, _, after in chunks] == [("sRGB", False), ("tEXt", False), ("pHYs", False),
                                                      ("tEXt", True)]
    assert chunks[0][1] == base64.b64encode(b"\x00").decode()
    assert ihdr[:8] == (13).to_bytes(4, "big") + (7).to_bytes(4, "big")  # width, height

    bare = _bare(raw, mode)
    assert png.png_chunks(bare)[1] == []  # Pillow adds nothing of its own to bare pixels
    restored = png.with_chunks(bare, chunks)
    assert png.png_chunks(restored) == (ihdr, chunks)
    assert [t for t, _ in png.png_raw_chunks(restored)] == ["IHDR", "sRGB", "tEXt", "pHYs", "IDAT", "tEXt", "IEND"]
    Image.open(io.BytesIO(restored)).verify()  # every CRC
    back = Image.open(io.BytesIO(restored))
    back.load()
    assert back.mode == mode and back.tobytes() == raw
    assert back.info["srgb"] == 0 and back.info["Software"] == "rsd test"
    assert back.info["dpi"] == pytest.approx((72, 72), abs=0.01)


def test_raw_chunks_of_a_hand_built_png_and_what_is_not_one() -> None:
    ihdr = (1).to_bytes(4, "big") + (1).to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])  # 1 x 1, 8-bit gray
    idat = zlib.compress(b"\x00\x80")  # filter byte, one pixel
    data = png.SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"gAMA", (45455).to_bytes(4, "big")) + \
        _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    assert png.png_raw_chunks(data) == [("IHDR", ihdr), ("gAMA", (45455).to_bytes(4, "big")), ("IDAT", idat),
                                        ("IEND", b"")]
    assert png.png_raw_chunks(data + b"trailing bytes") == png.png_raw_chunks(data)  # nothing read after IEND
    assert png.png_chunks(data) == (ihdr, [["gAMA", base64.b64encode((45455).to_bytes(4, "big")).decode(), False]])
    assert np.asarray(Image.open(io.BytesIO(data))).tolist() == [[128]]

    with pytest.raises(ValueError, match="not a PNG"):
        png.png_chunks(b"RIFF....WEBPVP8L")
    with pytest.raises(ValueError, match="truncated PNG: chunk 'IDAT'"):
        png.png_chunks(data[:-20])
    with pytest.raises(ValueError, match="IHDR first"):
        png.png_chunks(png.SIGNATURE + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    without_iend = data[: -len(_chunk(b"IEND", b""))]  # ends exactly on a chunk boundary
    with pytest.raises(ValueError, match="without IEND"):
        png.png_chunks(without_iend)


@pytest.mark.parametrize("script", ["device_bundle.sh", "device_eval.sh"])
def test_both_device_scripts_use_the_shared_parser(script: str) -> None:
    text = (SCRIPTS / script).read_text()
    assert "from _png import png_chunks" in text and '"$ROOT/scripts"' in text
    assert "def png_chunks" not in text and "def png_raw_chunks" not in text and "struct.unpack" not in text
    subprocess.run(["bash", "-n", str(SCRIPTS / script)], check=True)
