"""Files with provenance metadata, made by the tests: a self-made C2PA certificate chain, signed
JPEG/PNG files, XMP-only files, tampered and stripped copies.

The certificates follow the C2PA signing-credential rules the library enforces: an ES256 end-entity
certificate issued by a CA (self-signed leaves are refused), key usage digitalSignature, extended
key usage emailProtection, subject and authority key identifiers.
"""

from __future__ import annotations

import datetime
import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from PIL import Image

AI = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
SOURCE_TYPES = ("trainedAlgorithmicMedia", "compositeWithTrainedAlgorithmicMedia", "digitalCapture",
                "compositeCapture", "algorithmicMedia", "humanEdits")
MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "MP4": "video/mp4"}


@dataclass(frozen=True)
class Chain:
    root_pem: str
    chain_pem: str  # leaf then root
    key_pem: str
    org: str


def _name(common_name: str, org: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)])


def _key_usage(**on: bool) -> x509.KeyUsage:
    names = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
             "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
    return x509.KeyUsage(**{name: on.get(name, False) for name in names})


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def make_chain(org: str = "D3 Test Signing") -> Chain:
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = {"not_valid_before": now - datetime.timedelta(days=1), "not_valid_after": now + datetime.timedelta(days=30)}
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = _name(f"{org} Root CA", org)
    root = (x509.CertificateBuilder(subject_name=root_name, issuer_name=root_name, public_key=root_key.public_key(),
                                    serial_number=x509.random_serial_number(), **valid)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False)
            .sign(root_key, hashes.SHA256()))
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder(subject_name=_name(f"{org} Signer", org), issuer_name=root_name,
                                    public_key=leaf_key.public_key(), serial_number=x509.random_serial_number(),
                                    **valid)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
            .sign(root_key, hashes.SHA256()))
    key_pem = leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()).decode()
    return Chain(root_pem=_pem(root), chain_pem=_pem(leaf) + _pem(root), key_pem=key_pem, org=org)


def plain_image(fmt: str, seed: int = 0, size: tuple[int, int] = (64, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def sign(data: bytes, fmt: str, chain: Chain, source_type: str = AI, ingredients: int = 0,
         generator: str = "d3-tests") -> bytes:
    import c2pa

    manifest = {"claim_generator_info": [{"name": generator, "version": "1.0"}], "title": f"test.{fmt.lower()}",
                # (fmt is JPEG, PNG or MP4)
                "assertions": [{"label": "c2pa.actions", "data": {"actions": [
                    {"action": "c2pa.created", "digitalSourceType": source_type}]}}]}
    signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(c2pa.C2paSigningAlg.ES256, chain.chain_pem.encode(),
                                                        chain.key_pem.encode(), None))
    builder = c2pa.Builder(manifest)
    ingredient = plain_image("JPEG", seed=99, size=(8, 8))
    for number in range(ingredients):
        builder.add_ingredient({"title": f"ingredient-{number}.jpg", "relationship": "componentOf"},
                               "image/jpeg", io.BytesIO(ingredient))
    out = io.BytesIO()
    builder.sign(signer, MIME[fmt], io.BytesIO(data), out)
    return out.getvalue()


# -- XMP ----------------------------------------------------------------------------------------
def xmp_packet(source_type: str, style: str = "attribute", padding: int = 0) -> bytes:
    uri = source_type if source_type.startswith("http") else "http://cv.iptc.org/newscodes/digitalsourcetype/" \
        + source_type
    if style == "attribute":
        body = f'<rdf:Description rdf:about="" Iptc4xmpExt:DigitalSourceType="{uri}"/>'
    else:
        body = (f'<rdf:Description rdf:about=""><Iptc4xmpExt:DigitalSourceType>{uri}'
                f'</Iptc4xmpExt:DigitalSourceType></rdf:Description>')
    return ('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
            '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" '
            'xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/">'
            f'{body}</rdf:RDF>{" " * padding}</x:xmpmeta><?xpacket end="w"?>').encode()


def with_xmp(data: bytes, fmt: str, packet: bytes) -> bytes:
    """Insert an XMP packet the way each format stores it: JPEG APP1, PNG iTXt (uncompressed)."""
    if fmt == "JPEG":
        payload = b"http://ns.adobe.com/xap/1.0/\x00" + packet
        if len(payload) + 2 > 0xFFFF:
            raise ValueError("an APP1 segment holds at most 65533 bytes")
        return data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:]
    chunk = b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + packet
    return _insert_png_chunk(data, b"iTXt", chunk)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, position = [], 8
    while position < len(data):
        (length,) = struct.unpack(">I", data[position:position + 4])
        kind = data[position + 4:position + 8]
        chunks.append((kind, data[position + 8:position + 8 + length]))
        position += 12 + length
    return chunks


def _insert_png_chunk(data: bytes, kind: bytes, payload: bytes) -> bytes:
    chunks = _png_chunks(data)
    out = data[:8] + _png_chunk(*chunks[0])  # IHDR first
    out += _png_chunk(kind, payload)
    return out + b"".join(_png_chunk(k, p) for k, p in chunks[1:])


# -- edits after signing ------------------------------------------------------------------------
def change_one_pixel(data: bytes, fmt: str) -> bytes:
    """The signed file with its pixels changed and its metadata kept byte for byte."""
    if fmt == "PNG":
        image = Image.open(io.BytesIO(data)).convert("RGB")
        pixels = np.array(image)
        pixels[0, 0] = 255 - pixels[0, 0]
        raw = b"".join(b"\x00" + row.tobytes() for row in pixels)
        out, done = data[:8], False
        for kind, payload in _png_chunks(data):
            if kind == b"IDAT":
                if not done:
                    out += _png_chunk(b"IDAT", zlib.compress(raw))
                    done = True
                continue
            out += _png_chunk(kind, payload)
        return out
    # JPEG: nudge one quantisation-table entry, which changes the decoded pixels of every block that
    # uses it while leaving a decodable file and every metadata segment untouched.
    position = _top_level_segment(data, 0xDB)
    table = position + 5  # marker, length (2), precision/id byte: the first entry (the DC step)
    edited = bytearray(data)
    edited[table] = edited[table] + 1 if edited[table] < 255 else 254
    return bytes(edited)


def _top_level_segment(data: bytes, wanted: int) -> int:
    """Offset of the image's own first segment of a type (not one inside an embedded thumbnail)."""
    position = 2
    while position < len(data):
        marker = data[position + 1]
        if marker == wanted:
            return position
        if marker == 0xDA:
            break
        (length,) = struct.unpack(">H", data[position + 2:position + 4])
        position += 2 + length
    raise ValueError(f"no top-level segment 0xFF{wanted:02X}")


def strip_metadata(data: bytes, fmt: str) -> bytes:
    """The same encoded pixels with every APPn/COM segment (JPEG) or ancillary chunk (PNG) removed."""
    if fmt == "PNG":
        keep = {b"IHDR", b"PLTE", b"IDAT", b"IEND"}
        return data[:8] + b"".join(_png_chunk(k, p) for k, p in _png_chunks(data) if k in keep)
    out, position = bytearray(data[:2]), 2
    while position < len(data):
        marker = data[position + 1]
        if marker == 0xDA:  # start of scan: the rest is pixel data
            out += data[position:]
            break
        (length,) = struct.unpack(">H", data[position + 2:position + 4])
        segment = data[position:position + 2 + length]
        if not (0xE0 <= marker <= 0xEF or marker == 0xFE) or marker == 0xE0:  # keep JFIF APP0
            out += segment
        position += 2 + length
    return bytes(out)


def malformed_jumbf_jpeg(seed: int = 0) -> bytes:
    """A JPEG with an APP11 segment that claims to be C2PA JUMBF but whose boxes are garbage."""
    data = plain_image("JPEG", seed)
    box = struct.pack(">I", 0x7FFFFFF0) + b"jumb" + struct.pack(">I", 40) + b"jumd" + b"c2pa" + b"\x00" * 12 \
        + b"c2pa\x00" + b"\xff" * 200
    payload = b"JP" + struct.pack(">HI", 1, 1) + box
    return data[:2] + b"\xff\xeb" + struct.pack(">H", len(payload) + 2) + payload + data[2:]
