"""The C2PA reader's child process (run as a script): stdlib and c2pa only, no app code.

stdin: one JSON line {mime, path, memory_mb, trust_anchors}, then the file's bytes when no path is
given. stdout: one JSON report. The parent kills it when its time limit passes; RLIMIT_AS bounds
its memory, so a hostile manifest (huge boxes, thousands of ingredients) can only end this child.
"""

from __future__ import annotations

import io
import json
import os
import resource
import sys
from typing import Any

# Failure codes that mean the content or the manifest no longer matches what was signed.
_TAMPER_PREFIXES = ("assertion.dataHash.mismatch", "assertion.bmffHash.mismatch", "assertion.boxesHash.mismatch",
                    "assertion.hashedURI.mismatch", "claimSignature.mismatch", "assertion.collectionHash.mismatch")


def _claim_generator(manifest: dict) -> str | None:
    info = manifest.get("claim_generator_info")
    if isinstance(info, list) and info:
        first = info[0] if isinstance(info[0], dict) else {}
        name, version = first.get("name"), first.get("version")
        if name:
            return f"{name}/{version}" if version else str(name)
    generator = manifest.get("claim_generator")
    return str(generator) if generator else None


def _actions(manifest: dict) -> list[dict]:
    found = []
    for assertion in manifest.get("assertions") or []:
        if not isinstance(assertion, dict) or not str(assertion.get("label", "")).startswith("c2pa.actions"):
            continue
        for action in (assertion.get("data") or {}).get("actions") or []:
            if isinstance(action, dict):
                found.append({"action": action.get("action"),
                              "digital_source_type": action.get("digitalSourceType"),
                              "software_agent": _agent(action.get("softwareAgent"))})
    return found[:100]


def _agent(agent: object) -> str | None:
    if isinstance(agent, dict):
        return agent.get("name")
    return str(agent) if agent else None


def _codes(results: dict | None) -> tuple[list[str], list[str], list[str]]:
    active = (results or {}).get("activeManifest") or {}
    pick = lambda kind: [str(item.get("code")) for item in active.get(kind) or [] if isinstance(item, dict)]  # noqa: E731
    return pick("success"), pick("informational"), pick("failure")


def report(reader: Any, trust_configured: bool) -> dict:  # a c2pa.Reader
    manifest = reader.get_active_manifest() or {}
    state = reader.get_validation_state()
    success, informational, failure = _codes(reader.get_validation_results())
    signature = manifest.get("signature_info") or {}
    if "signingCredential.trusted" in success:
        trust = "trusted"
    elif any(code.startswith("signingCredential.") for code in failure):
        trust = "untrusted"
    else:
        trust = "unknown"
    tampered = any(code.startswith(_TAMPER_PREFIXES) for code in failure)
    other_failures = [code for code in failure if not code.startswith("signingCredential.")]
    if tampered:
        status = "tampered"
    elif other_failures:
        status = "invalid"
    elif trust == "trusted":
        status = "trusted"
    else:
        status = "untrusted"  # a valid signature by a signer the operator's trust list does not name
    return {
        "present": True,
        "status": status,
        "validation_state": state,
        "validation_codes": {"success": success, "informational": informational, "failure": failure},
        "claim_generator": _claim_generator(manifest),
        "title": manifest.get("title"),
        "actions": _actions(manifest),
        "signer": {"issuer": signature.get("issuer"), "common_name": signature.get("common_name"),
                   "algorithm": signature.get("alg"), "time": signature.get("time"), "trust": trust,
                   "trust_list_configured": trust_configured},
        "ingredients": len(manifest.get("ingredients") or []),
        "manifest_label": manifest.get("label"),
    }


def main() -> None:
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything the library prints goes to stderr, never into the report
    header = sys.stdin.buffer.readline()
    job = json.loads(header)
    data = None if job.get("path") else sys.stdin.buffer.read()
    import c2pa

    limit = int(job["memory_mb"]) * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    anchors = job.get("trust_anchors")
    # Nothing is fetched: no OCSP, no remote manifests (the service may run offline, and a file
    # must not make it reach out to an address of the file's choosing).
    settings: dict = {"verify": {"verify_trust": True, "ocsp_fetch": False, "remote_manifest_fetch": False}}
    if anchors:
        settings["trust"] = {"trust_anchors": anchors}
    try:
        context = c2pa.Context.from_dict(settings)
        stream = open(job["path"], "rb") if job.get("path") else io.BytesIO(data)  # noqa: SIM115
        with stream, c2pa.Reader(job["mime"], stream, context=context) as reader:
            result = report(reader, bool(anchors))
    except c2pa.C2paError as exc:
        text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        if "ManifestNotFound" in type(exc).__name__ or "not found" in text.lower() and "manifest" in text.lower():
            result = {"present": False}
        else:
            result = {"present": True, "status": "error", "error": f"the C2PA data could not be read: {text}"}
    except MemoryError:
        result = {"present": True, "status": "error",
                  "error": f"reading the C2PA manifest needed more than {job['memory_mb']} MB"}
    protocol.write(json.dumps(result))
    protocol.flush()


if __name__ == "__main__":
    main()
