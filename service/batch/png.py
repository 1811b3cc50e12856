"""A small PNG decoder for digit images: zlib and numpy only, so serving needs no Pillow.

Reads non-interlaced PNGs of any colour type at bit depths 1-16 and returns grey levels in
[0, 1] (RGB by luminance, alpha composited over black, the way ``/generate`` writes ink as
white on black). What it cannot read raises :class:`PngError` with the reason.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

__all__ = ["PngError", "read_png", "encode_png"]

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: colour type -> samples per pixel
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


class PngError(ValueError):
    """The bytes are not a PNG this decoder reads; the message says why."""


def read_png(data: bytes) -> np.ndarray:
    """Grey levels in [0, 1], shape ``(height, width)``, float64."""
    if not data.startswith(_SIGNATURE):
        raise PngError("not a PNG file (no PNG signature)")
    pos, header, palette, idat = len(_SIGNATURE), None, None, []
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        body = data[pos + 8 : pos + 8 + length]
        if len(body) != length:
            raise PngError(f"truncated {kind.decode(errors='replace')} chunk")
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"PLTE":
            palette = np.frombuffer(body, np.uint8).reshape(-1, 3)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if header is None:
        raise PngError("no IHDR chunk")
    width, height, depth, colour, _, _, interlace = header
    if colour not in _CHANNELS or depth not in _DEPTHS[colour]:
        raise PngError(f"colour type {colour} at bit depth {depth} is not valid PNG")
    if not idat:
        raise PngError("no image data (IDAT chunk): the file is truncated or incomplete")
    if interlace:
        raise PngError("interlaced PNGs are not supported; save it without interlacing")
    if colour == 3 and palette is None:
        raise PngError("palette image without a PLTE chunk")
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as exc:
        raise PngError(f"image data does not decompress ({exc})") from None
    channels = _CHANNELS[colour]
    bits = channels * depth
    stride = (width * bits + 7) // 8
    if len(raw) < height * (stride + 1):
        raise PngError(f"image data holds {len(raw)} bytes, {height * (stride + 1)} expected")
    rows = _unfilter(raw, height, stride, max(1, bits // 8))
    samples = _samples(rows, width, channels, depth)
    top = float((1 << depth) - 1)
    if colour == 3:
        assert palette is not None
        index = samples[..., 0].astype(np.intp)
        if index.max(initial=0) >= len(palette):
            raise PngError("palette index out of range")
        rgb = palette[index].astype(np.float64) / 255.0
        return _luminance(rgb)
    values = samples.astype(np.float64) / top
    if colour == 0:
        return values[..., 0]
    if colour == 4:
        return values[..., 0] * values[..., 1]
    grey = _luminance(values[..., :3])
    return grey * values[..., 3] if colour == 6 else grey


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def _unfilter(raw: bytes, height: int, stride: int, bpp: int) -> np.ndarray:
    """Undo the per-scanline filters (PNG spec section 9)."""
    out = np.zeros((height, stride), np.uint8)
    prior = np.zeros(stride, np.int32)
    for y in range(height):
        start = y * (stride + 1)
        kind = raw[start]
        line = np.frombuffer(raw, np.uint8, stride, start + 1).astype(np.int32)
        if kind == 0:
            cur = line
        elif kind == 2:
            cur = (line + prior) & 0xFF
        elif kind in (1, 3, 4):
            cur = line.copy()
            for x in range(stride):
                left = int(cur[x - bpp]) if x >= bpp else 0
                up = int(prior[x])
                if kind == 1:
                    pred = left
                elif kind == 3:
                    pred = (left + up) >> 1
                else:
                    corner = int(prior[x - bpp]) if x >= bpp else 0
                    p = left + up - corner
                    pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                    pred = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                cur[x] = (cur[x] + pred) & 0xFF
        else:
            raise PngError(f"scanline {y} has unknown filter type {kind}")
        out[y] = cur
        prior = cur
    return out


def _samples(rows: np.ndarray, width: int, channels: int, depth: int) -> np.ndarray:
    height = rows.shape[0]
    if depth == 8:
        return rows[:, : width * channels].reshape(height, width, channels)
    if depth == 16:
        wide = (
            rows[:, : width * channels * 2].reshape(height, width * channels, 2).astype(np.uint16)
        )
        return ((wide[..., 0] << 8) | wide[..., 1]).reshape(height, width, channels)
    bits = np.unpackbits(rows, axis=1)[:, : width * depth].reshape(height, width, depth)
    weights = (1 << np.arange(depth - 1, -1, -1)).astype(np.uint8)
    return (bits * weights).sum(axis=2, dtype=np.uint16).reshape(height, width, 1)


def encode_png(image: np.ndarray) -> bytes:
    """A grey-level image in [0, 1] as an 8-bit PNG (for tests and sample folders)."""
    data = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    height, width = data.shape
    raw = b"".join(b"\x00" + row.tobytes() for row in data)

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    return (
        _SIGNATURE
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )
