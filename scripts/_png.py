"""PNG chunks of the device bundle's textures: what device_bundle.sh records, what device_eval.sh puts back.

A PNG file is the 8-byte signature, then chunks ``length (4 bytes, big-endian) | type (4) | data | CRC-32 (4)``
(https://www.w3.org/TR/png/#5Chunk-layout). The bundle ships RGB/RGBA textures as lossless WebP, which keeps the
pixels only: device_bundle.sh records the PNG's other chunks with :func:`png_chunks` (sRGB among them, which
MuJoCo's ``colorspace="auto"`` reads), and device_eval.sh puts them back around a fresh encoding of the pixels
with :func:`with_chunks`, then checks that :func:`png_chunks` of the result equals the record.

Both scripts import this file from ``scripts/`` (the device machine gets it with the working tree); it needs the
standard library only.
"""

from __future__ import annotations

import base64
import struct
import zlib

__all__ = ["SIGNATURE", "png_raw_chunks", "png_chunks", "with_chunks"]

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_raw_chunks(data: bytes) -> list[tuple[str, bytes]]:
    """-> ``[(type, data), ...]`` of a PNG file, IHDR first, up to and including IEND (CRCs are not checked)."""
    if data[:8] != SIGNATURE:
        raise ValueError(f"not a PNG: the file starts with {data[:8]!r}, not the PNG signature")
    pos, out = 8, []
    while pos < len(data):
        if pos + 12 > len(data):
            raise ValueError(f"truncated PNG: {len(data) - pos} stray bytes at offset {pos}")
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        ctype, body = data[pos + 4:pos + 8].decode("latin-1"), data[pos + 8:pos + 8 + length]
        if pos + 12 + length > len(data):
            raise ValueError(f"truncated PNG: chunk {ctype!r} at offset {pos} declares {length} bytes")
        out.append((ctype, body))
        pos += 12 + length
        if ctype == "IEND":
            break
    if not out or out[0][0] != "IHDR":
        raise ValueError(f"PNG without IHDR first (chunks {[t for t, _ in out[:4]]})")
    if out[-1][0] != "IEND":
        raise ValueError(f"truncated PNG: it ends after chunk {out[-1][0]!r} without IEND")
    return out


def png_chunks(data: bytes) -> tuple[bytes, list[list]]:
    """-> (IHDR data, ``[[type, base64 data, after_idat], ...]`` of every chunk but IHDR/IDAT/IEND, in order).

    The list is JSON data (device_bundle.sh writes it to textures.json); ``after_idat`` says on which side of the
    image data the chunk stood."""
    ihdr, seen_idat, out = b"", False, []
    for ctype, body in png_raw_chunks(data):
        if ctype == "IHDR":
            ihdr = body
        elif ctype == "IDAT":
            seen_idat = True
        elif ctype != "IEND":
            out.append([ctype, base64.b64encode(body).decode(), seen_idat])
    return ihdr, out


def with_chunks(png: bytes, chunks: list[list]) -> bytes:
    """The PNG file ``png``'s IHDR and IDAT with ``chunks`` (:func:`png_chunks`' list) in their places: those with
    ``after_idat`` false before the image data, the others after it, then IEND. Any other chunk of ``png`` is
    dropped (it is meant to be a bare encoding of the pixels, e.g. Pillow's of an image without ``.info``), so
    ``png_chunks(with_chunks(png, chunks))[1] == chunks``."""
    encoded = png_raw_chunks(png)
    theirs = [(t, base64.b64decode(b), after) for t, b, after in chunks]
    parts = [encoded[0]] + [(t, b) for t, b, after in theirs if not after]
    parts += [c for c in encoded if c[0] == "IDAT"] + [(t, b) for t, b, after in theirs if after] + [("IEND", b"")]
    return SIGNATURE + b"".join(
        struct.pack(">I", len(b)) + t.encode("latin-1") + b + struct.pack(">I", zlib.crc32(t.encode("latin-1") + b))
        for t, b in parts)
