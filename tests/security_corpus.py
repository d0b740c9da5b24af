"""Hostile and malformed files, made byte by byte by the tests (nothing downloaded, nothing shipped).

Each entry: (name, filename the client claims, bytes, the documented statuses of POST /predict).
415 = not an allowed image format, 413 = over the pixel limit, 422 = truncated or corrupt.
`unusual_but_valid()` are odd images that must be *accepted* (200) without trouble.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

import numpy as np
from PIL import Image

HUGE = 30000  # 900 megapixels claimed by a header of a few dozen bytes


def _encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _noise(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    return image if mode == "RGB" else image.convert(mode)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_header(width: int, height: int, bit_depth: int = 8, color_type: int = 2) -> bytes:
    """A PNG signature and IHDR claiming a size, and no pixels at all."""
    return PNG_SIGNATURE + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0))


def png_claiming(width: int, height: int, bit_depth: int = 8) -> bytes:
    """IHDR claiming a size, then the start of an IDAT chunk and nothing more: no pixels."""
    idat = png_chunk(b"IDAT", zlib.compress(b"\x00" * 4096))
    return png_header(width, height, bit_depth) + idat[:24]


def png_bomb(width: int, height: int) -> bytes:
    """A complete, valid PNG of zeros: a few KB on the wire, width*height*3 bytes once decoded."""
    row = b"\x00" + b"\x00" * (width * 3)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return png_header(width, height) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def png_with_ztxt(megabytes: int) -> bytes:
    """A valid 8x8 PNG whose zTXt chunk inflates to `megabytes` MB of text."""
    valid = _encode(_noise(8, 8), "PNG")
    text = zlib.compress(b"A" * (megabytes * 1024 * 1024), 9)
    ztxt = png_chunk(b"zTXt", b"Comment\x00\x00" + text)
    return valid[:33] + ztxt + valid[33:]  # after the IHDR chunk (8 + 25 bytes)


def bmp_header(width: int, height: int, bits: int = 24) -> bytes:
    """A BITMAPINFOHEADER BMP claiming a size; the pixel array is missing."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bits, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info


def gif_header(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0) + b"\x2c" + struct.pack(
        "<HHHHB", 0, 0, width, height, 0) + b"\x08"


def jpeg_sof(width: int, height: int) -> bytes:
    """SOI, a baseline SOF0 claiming a size, then EOI: no tables, no scan."""
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    return b"\xff\xd8" + sof + b"\xff\xd9"


def tiff_header(width: int, height: int) -> bytes:
    """A little-endian TIFF with one IFD claiming a size, strip offsets pointing past the end."""
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 4096), (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, width * height)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\0\0\0\0"
    return b"II*\x00" + struct.pack("<I", 8) + ifd


def webp_vp8x(width: int, height: int) -> bytes:
    """An extended WebP header claiming a canvas size, with no image data after it."""
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00" + (width - 1).to_bytes(3, "little") + (
        height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x


def mp4_box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def tiny_mp4(truncated: bool) -> bytes:
    """ftyp + moov + an mdat that claims 1 MB; truncated cuts in the middle of moov."""
    ftyp = mp4_box(b"ftyp", b"isom\x00\x00\x02\x00isomiso2avc1mp41")
    mvhd = mp4_box(b"mvhd", b"\x00" * 100)
    moov = mp4_box(b"moov", mvhd + mp4_box(b"trak", b"\x00" * 200))
    mdat = struct.pack(">I", 1024 * 1024) + b"mdat" + b"\x00" * 64
    data = ftyp + moov + mdat
    return data[: len(ftyp) + 40] if truncated else data


def zip_bomb() -> bytes:
    """A ZIP holding 50 MB of zeros (a few tens of KB), named .png by the client."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("bomb.bin", b"\x00" * (50 * 1024 * 1024))
    return buffer.getvalue()


def eps_file() -> bytes:
    return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\n%%EndComments\n"
            b"(/etc/passwd) (r) file 100 string readstring pop print\nshowpage\n%%EOF\n")


def eps_binary_header() -> bytes:
    """The DOS EPS binary header (C5 D0 D3 C6) that Pillow's EPS plugin would accept."""
    body = eps_file()
    return b"\xc5\xd0\xd3\xc6" + struct.pack("<IIIIIIH", 30, len(body), 0, 0, 0, 0, 0xFFFF) + body


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    return data[: max(1, int(len(data) * keep))]


def many_frame_gif(frames: int) -> bytes:
    """A 4x4 GIF with `frames` 1x1 frames, written by hand (Pillow's writer would merge them)."""
    palette = bytes(range(256)) * 3
    header = b"GIF89a" + struct.pack("<HHBBB", 4, 4, 0xF7, 0, 0) + palette[:768]
    loop = b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    first = b"\x2c" + struct.pack("<HHHHB", 0, 0, 4, 4, 0) + b"\x02\x05\x84\x8f\xa9\x0b\x05\x00"
    parts = [header, loop, first]
    for i in range(frames - 1):
        control = b"\x21\xf9\x04\x04" + struct.pack("<H", 1) + b"\x00\x00"
        parts.append(control + b"\x2c" + struct.pack("<HHHHB", i % 4, (i // 4) % 4, 1, 1, 0) + b"\x02\x02\x44\x01\x00")
    return b"".join(parts) + b"\x3b"


def hostile_files() -> list[tuple[str, str, bytes, set[int]]]:
    jpeg = _encode(_noise(256, 192, 1), "JPEG", quality=90)
    png = _encode(_noise(256, 192, 2), "PNG")
    webp = _encode(_noise(256, 192, 3), "WEBP", quality=80)
    gif = _encode(_noise(128, 96, 4).convert("P"), "GIF")
    tiff = _encode(_noise(128, 96, 5), "TIFF", compression="tiff_deflate")
    bmp = _encode(_noise(64, 48, 6), "BMP")
    interlaced = _encode(_noise(256, 192, 7), "PNG", optimize=False)
    html = b"<!doctype html><html><body><script>alert(document.cookie)</script></body></html>"
    svg = (b'<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
           b'<svg xmlns="http://www.w3.org/2000/svg" width="100" height="100"><text>&x;</text></svg>')
    corpus = [
        ("zero bytes", "empty.jpg", b"", {422}),
        ("truncated JPEG", "cut.jpg", truncated(jpeg), {422}),
        ("JPEG cut after the header", "head.jpg", jpeg[:200], {422}),
        ("truncated PNG", "cut.png", truncated(png), {422}),
        ("truncated interlaced PNG", "cut-interlaced.png", truncated(interlaced, 0.3), {422}),
        ("truncated WebP", "cut.webp", truncated(webp), {422}),
        ("truncated GIF", "cut.gif", truncated(gif), {422}),
        ("truncated TIFF", "cut.tiff", truncated(tiff), {415, 422}),
        ("truncated BMP", "cut.bmp", truncated(bmp), {422}),
        ("truncated MP4 sent as an image", "clip.mp4", tiny_mp4(truncated=True), {415}),
        ("MP4 renamed .png", "clip.png", tiny_mp4(truncated=False), {415}),
        ("PNG header 1x1, no pixels", "one.png", png_claiming(1, 1), {422}),
        ("PNG header 30000x30000, no pixels", "huge.png", png_claiming(HUGE, HUGE), {413}),
        ("PNG header 16-bit 30000x30000", "huge16.png", png_claiming(HUGE, HUGE, 16), {413}),
        ("PNG header 0x0", "zero.png", png_header(0, 0), {415, 422}),
        ("PNG header 2^31-1 wide", "wide.png", png_claiming(2**31 - 1, 1), {413}),
        ("BMP header 1x1, no pixels", "one.bmp", bmp_header(1, 1), {422}),
        ("BMP header 30000x30000, no pixels", "huge.bmp", bmp_header(HUGE, HUGE), {413}),
        ("BMP header with 0 bits per pixel", "zero-bits.bmp", bmp_header(64, 64, bits=0), {415, 422}),
        ("BMP header with negative width", "negative.bmp", bmp_header(-64, 64), {413, 415, 422}),
        ("GIF header 65535x65535", "huge.gif", gif_header(65535, 65535), {413}),
        ("JPEG SOF 65500x65500", "huge.jpg", jpeg_sof(65500, 65500), {413}),
        ("TIFF header 30000x30000", "huge.tiff", tiff_header(HUGE, HUGE), {413}),
        ("TIFF 64x64 with strips past the end", "strips.tiff", tiff_header(64, 64), {422}),
        ("WebP VP8X 16384x16384, no data", "huge.webp", webp_vp8x(16384, 16384), {413}),
        ("PNG decompression bomb over the pixel limit", "bomb.png", png_bomb(5000, 5000), {413}),
        ("PNG with a zTXt chunk inflating to 64 MB", "ztxt.png", png_with_ztxt(64), {422}),
        ("PNG chunk claiming 2 GB", "bigchunk.png", png_header(8, 8) + struct.pack(">I", 0x7FFFFFF0) + b"IDAT",
         {422}),
        ("PNG with a corrupt IHDR CRC", "crc.png", png_header(8, 8)[:-4] + b"\0\0\0\0", {415, 422}),
        ("PNG with garbage IDAT", "garbage-idat.png",
         png_header(8, 8) + png_chunk(b"IDAT", b"\x78\x9c" + b"\xff" * 64) + png_chunk(b"IEND", b""), {422}),
        ("PNG signature only", "sig.png", PNG_SIGNATURE, {415, 422}),
        ("JPEG SOI+EOI only", "soi.jpg", b"\xff\xd8\xff\xd9", {415, 422}),
        ("GIF with LZW garbage", "lzw.gif", gif_header(8, 8) + b"\x05\xff\xff\xff\xff\xff\x00\x3b", {422}),
        ("HTML renamed .jpg", "page.jpg", html, {415}),
        ("SVG with an XXE entity renamed .jpg", "vector.jpg", svg, {415}),
        ("plain SVG", "vector.svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', {415}),
        ("EPS (would need Ghostscript)", "print.eps", eps_file(), {415}),
        ("EPS with the DOS binary header, renamed .jpg", "print.jpg", eps_binary_header(), {415}),
        ("PDF renamed .png", "doc.png", b"%PDF-1.7\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n", {415}),
        ("ZIP bomb renamed .png", "bomb.png", zip_bomb(), {415}),
        ("GIF/JavaScript polyglot", "poly.gif", b"GIF89a/*\x0a\x00\x0a\x00\x00\x00\x00*/=1;alert(1)//", {415, 422}),
        ("HTML then PNG polyglot", "poly.png", html + png, {415}),
        ("PDF header then JPEG polyglot", "poly.jpg", b"%PDF-1.4\n" + jpeg, {415}),
        ("truncated PNG then ZIP polyglot", "poly-zip.png", truncated(png, 0.3) + zip_bomb()[:4096], {422}),
        ("ICO (not an allowed format)", "icon.jpg", _encode(_noise(32, 32, 8), "ICO"), {415}),
        ("PPM (not an allowed format)", "pixels.png", _encode(_noise(16, 16, 9), "PPM"), {415}),
        ("PCX (not an allowed format)", "pixels.bmp", _encode(_noise(16, 16, 10), "PCX"), {415}),
        ("random bytes", "noise.jpg", np.random.default_rng(11).bytes(4096), {415}),
        ("a text file", "notes.png", b"just some text, not an image\n" * 10, {415}),
        ("null bytes", "nulls.jpg", b"\x00" * 4096, {415}),
    ]
    return corpus


def unusual_but_valid() -> list[tuple[str, bytes, tuple[int, int]]]:
    """Odd but legitimate images: each must get 200 with its real size."""
    cmyk = _encode(_noise(40, 30, 12).convert("CMYK"), "JPEG")
    sixteen = _encode(Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16)), "PNG")
    rgb48 = png_header(40, 30, 16, 2)  # 16-bit RGB, written by hand (Pillow cannot save it)
    rows = b"".join(b"\x00" + b"\x12\x34" * 3 * 40 for _ in range(30))
    rgb48 += png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b"")
    png = _encode(_noise(20, 10, 13), "PNG")
    return [
        ("1x1 PNG", _encode(_noise(1, 1, 14), "PNG"), (1, 1)),
        ("CMYK JPEG", cmyk, (40, 30)),
        ("16-bit greyscale PNG", sixteen, (40, 30)),
        ("16-bit RGB PNG", rgb48, (40, 30)),
        ("GIF with 10,000 frames (first frame only)", many_frame_gif(10_000), (4, 4)),
        ("PNG followed by a ZIP (trailing bytes ignored)", png + zip_bomb()[:2048], (20, 10)),
        ("LA-mode PNG", _encode(_noise(12, 12, 15).convert("LA"), "PNG"), (12, 12)),
        ("1-bit TIFF", _encode(_noise(12, 12, 16).convert("1"), "TIFF"), (12, 12)),
        ("animated WebP", _encode(_noise(16, 16, 17), "WEBP", save_all=True,
                                  append_images=[_noise(16, 16, 18)]), (16, 16)),
    ]
