"""What a file's own metadata says about where it came from: C2PA Content Credentials and the IPTC
digital source type in XMP.

The service reports this beside the pixel verdict and never lets it change the verdict: metadata
is stripped by most re-encoders and social networks, and anyone with an editor can write it. A
signed C2PA manifest is a claim by its signer, worth what the signer is worth to you (hence the
operator's trust list). See docs/PROVENANCE.md.

- XMP is found by packet scanning (XMP specification part 3, the method for files whose format the
  reader does not parse): the service reads JPEG, PNG, WebP, TIFF, GIF and video containers alike
  without a parser per format. Packets are bounded in size and count and parsed with defusedxml
  (no entities, no external references). IPTC IIM (the older binary block in JPEG APP13) defines no
  digital source type, so there is nothing to read there for this question.
- C2PA manifests are read by the Content Authenticity Initiative's own library (c2pa-python) in a
  child process under a memory limit and a time limit, only when the bytes carry the JUMBF label
  `c2pa` at all, so a file without credentials costs one substring search and no process.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from defusedxml import ElementTree
from defusedxml.common import DefusedXmlException

CHILD_SCRIPT = Path(__file__).resolve().with_name("c2pa_child.py")
IPTC_EXT_NS = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
RDF_NS = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
SOURCE_TYPE_PREFIX = "http://cv.iptc.org/newscodes/digitalsourcetype/"

# IPTC NewsCodes "Digital Source Type" (cv.iptc.org/newscodes/digitalsourcetype): code -> label.
SOURCE_TYPE_LABELS: dict[str, str] = {
    "digitalCapture": "Original digital capture sampled from real life",
    "computationalCapture": "Computational capture",
    "negativeFilm": "Digitised from a negative on film",
    "positiveFilm": "Digitised from a positive on film",
    "print": "Digitised from a print on non-transparent medium",
    "humanEdits": "Human-edited media",
    "minorHumanEdits": "Minor human edits",
    "compositeCapture": "Composite of captured elements",
    "algorithmicallyEnhanced": "Algorithmically-enhanced media",
    "dataDrivenMedia": "Data-driven media",
    "digitalArt": "Digital art",
    "virtualRecording": "Virtual recording",
    "compositeSynthetic": "Composite including synthetic elements",
    "trainedAlgorithmicMedia": "Trained algorithmic media (generative AI)",
    "compositeWithTrainedAlgorithmicMedia": "Composite with trained algorithmic media (generative AI)",
    "algorithmicMedia": "Pure algorithmic media",
    "screenCapture": "Screen capture",
    "softwareImage": "Digital creation by software",
}
# The two codes that say "made with generative AI" (what C2PA's AI disclosure and the IPTC
# guidance use). Every other known code declares a non-AI origin; an unknown code declares nothing.
AI_SOURCE_TYPES = frozenset({"trainedAlgorithmicMedia", "compositeWithTrainedAlgorithmicMedia"})

_PACKET_START = re.compile(rb"<x:xmpmeta[\s>]|<x:xapmeta[\s>]")
_PACKET_END = re.compile(rb"</x:xmpmeta>|</x:xapmeta>")
# C2PA data always carries the manifest store's JUMBF label (`c2pa`; `C2PA` in some box types).
_C2PA_MARKER = re.compile(rb"c2pa|C2PA")


@dataclass(frozen=True)
class ProvenanceLimits:
    timeout_s: float = 5.0  # the C2PA child's whole run
    memory_mb: int = 512  # the C2PA child's address space
    max_xmp_bytes: int = 1024 * 1024  # one XMP packet; a larger one is reported and skipped
    max_xmp_packets: int = 8
    trust_anchors_pem: str | None = None  # the operator's trust list (PEM bundle)


def source_type(value: str | None) -> dict[str, Any] | None:
    """A digital source type (full NewsCodes URI or bare code) as {code, uri, label, declares_ai}."""
    if not value:
        return None
    value = value.strip()
    code = value[len(SOURCE_TYPE_PREFIX):] if value.startswith(SOURCE_TYPE_PREFIX) else value
    known = code in SOURCE_TYPE_LABELS
    return {
        "code": code,
        "uri": SOURCE_TYPE_PREFIX + code if known or not value.startswith("http") else value,
        "label": SOURCE_TYPE_LABELS.get(code),
        "declares_ai": (code in AI_SOURCE_TYPES) if known else None,
    }


# -- XMP -------------------------------------------------------------------------------------
def xmp_packets(data: bytes | memoryview, limits: ProvenanceLimits) -> tuple[list[bytes], list[str]]:
    """Every XMP packet in the bytes (packet scanning), and notes about those skipped."""
    packets: list[bytes] = []
    notes: list[str] = []
    position = 0
    while len(packets) < limits.max_xmp_packets:
        start = _PACKET_START.search(data, position)
        if start is None:
            break
        end = _PACKET_END.search(data, start.end(), start.start() + limits.max_xmp_bytes + 16)
        if end is None:
            notes.append(f"an XMP packet larger than {limits.max_xmp_bytes} bytes (or unterminated) was skipped")
            position = start.end()
            continue
        packets.append(bytes(data[start.start():end.end()]))
        position = end.end()
    else:
        if _PACKET_START.search(data, position):
            notes.append(f"only the first {limits.max_xmp_packets} XMP packets were read")
    return packets, notes


def digital_source_type_from_xmp(packet: bytes) -> str | None:
    """Iptc4xmpExt:DigitalSourceType, as an attribute of rdf:Description, an element, or rdf:resource."""
    root = ElementTree.fromstring(packet, forbid_dtd=True)
    attribute = f"{{{IPTC_EXT_NS}}}DigitalSourceType"
    for element in root.iter():
        if attribute in element.attrib:
            return element.attrib[attribute]
        if element.tag == attribute:
            text = (element.text or "").strip()
            return text or element.attrib.get(f"{{{RDF_NS}}}resource")
    return None


def read_xmp_source_type(data: bytes | memoryview, limits: ProvenanceLimits) -> tuple[dict | None, list[str]]:
    packets, notes = xmp_packets(data, limits)
    for packet in packets:
        try:
            value = digital_source_type_from_xmp(packet)
        except (ElementTree.ParseError, DefusedXmlException, ValueError) as exc:
            notes.append(f"an XMP packet could not be parsed ({type(exc).__name__})")
            continue
        if value:
            return source_type(value), notes
    return None, notes


# -- C2PA ------------------------------------------------------------------------------------
def has_c2pa_marker(data: bytes | memoryview) -> bool:
    return _C2PA_MARKER.search(data) is not None


def read_c2pa(data: bytes | None, mime: str | None, limits: ProvenanceLimits,
              path: str | None = None) -> dict[str, Any]:
    """Run the C2PA reader in its child and return its report (never raises for a bad file)."""
    job = {"mime": mime, "path": path, "memory_mb": limits.memory_mb, "trust_anchors": limits.trust_anchors_pem}
    payload = json.dumps(job).encode() + b"\n" + (data or b"")
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONDONTWRITEBYTECODE": "1", "MALLOC_ARENA_MAX": "2"}
    try:
        # -s: no user site-packages; the child imports only the standard library and c2pa.
        done = subprocess.run([sys.executable, "-s", str(CHILD_SCRIPT)], input=payload, capture_output=True,
                              timeout=limits.timeout_s, env=env, close_fds=True, start_new_session=True,
                              check=False)
    except subprocess.TimeoutExpired:
        return {"present": True, "status": "error",
                "error": f"reading the C2PA manifest took longer than {limits.timeout_s:g} s; it was stopped"}
    try:
        report = json.loads(done.stdout.decode() or "null")
    except (UnicodeDecodeError, json.JSONDecodeError):
        report = None
    if not isinstance(report, dict):
        reason = "it ran out of memory" if done.returncode != 0 else "it gave no answer"
        return {"present": True, "status": "error", "error": f"the C2PA manifest could not be read ({reason})"}
    return report


# -- the block in every answer ------------------------------------------------------------------
def read_provenance(data: bytes | memoryview | mmap.mmap, mime: str | None, limits: ProvenanceLimits,
                    path: str | None = None) -> dict[str, Any]:
    """The `provenance` block: {c2pa, iptc_digital_source_type, declared_ai, declared_ai_source, notes}.

    `data` is the file's bytes (a memoryview of a mapped file for videos); `path`, when given, lets
    the C2PA child read the file itself instead of receiving the bytes. `mime` None: the C2PA library
    tells the format from the bytes.
    """
    iptc, notes = read_xmp_source_type(data, limits)
    c2pa: dict[str, Any] = {"present": False}
    if has_c2pa_marker(data):
        c2pa = read_c2pa(None if path else bytes(data), mime, limits, path)
    declared, source = None, None
    c2pa_types = [source_type(action.get("digital_source_type")) for action in c2pa.get("actions", [])]
    c2pa_claims = [t["declares_ai"] for t in c2pa_types if t and t["declares_ai"] is not None]
    if c2pa_claims:
        # A signed claim is read first: any action declaring generative AI makes the file declared AI.
        declared, source = any(c2pa_claims), "c2pa"
    elif iptc is not None and iptc["declares_ai"] is not None:
        declared, source = iptc["declares_ai"], "xmp"
    return {"c2pa": c2pa, "iptc_digital_source_type": iptc, "declared_ai": declared,
            "declared_ai_source": source, "notes": notes}


def read_provenance_of_file(path: str, limits: ProvenanceLimits, mime: str | None = None) -> dict[str, Any]:
    """The block for a file on disk (videos): mapped, not read into memory; the C2PA child opens the path."""
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return read_provenance(b"", mime or "", limits)
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return read_provenance(mapped, mime, limits, path=path)
