"""Callbacks: checking a job's callback URL, and POSTing the job's final JSON there when it ends.

Only https unless CALLBACK_ALLOW_HTTP; the host is resolved and every address checked (private,
loopback, link-local, reserved, multicast, not global: refused unless CALLBACK_ALLOW_PRIVATE), and
the request goes to the checked address itself, so a DNS answer that changes between the check
and the connection (rebinding) cannot redirect it. Redirects are not followed. Delivery is retried
with exponential backoff; its outcome is recorded through the job store (the owner of job rows).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import urllib3

from api.exceptions import DatabaseUnavailable, InvalidInput
from api.services.jobs import JobStore

log = logging.getLogger(__name__)

CALLBACK_ATTEMPTS = 5
CALLBACK_BACKOFF_S = 1.0  # then 2, 4, 8 s
CALLBACK_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class CallbackTarget:
    url: str
    scheme: str
    host: str
    port: int
    path: str
    addresses: tuple[str, ...]

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


def _refusal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why a callback may not go to this address (None: it may)."""
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    for name in ("loopback", "link_local", "unspecified", "multicast", "reserved", "private"):  # specific first
        if getattr(address, f"is_{name}"):
            return name.replace("_", "-")
    if not address.is_global:  # e.g. 100.64.0.0/10 shared address space
        return "non-public"
    return None


Resolver = Callable[[str, int], list[str]]  # (host, port) -> addresses; raises OSError when it does not resolve


def system_resolve(host: str, port: int) -> list[str]:
    """The host's addresses from the system resolver (getaddrinfo: /etc/hosts, DNS, ...)."""
    return [info[4][0].split("%")[0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def check_callback_url(url: str, allow_http: bool, allow_private: bool,
                       resolve: Resolver = system_resolve) -> CallbackTarget:
    """Validate a callback URL and resolve its host; InvalidInput (parameter callback_url) if refused."""
    def refuse(message: str) -> InvalidInput:
        return InvalidInput(f"callback_url {message}", parameter="callback_url")

    if len(url) > 2000:
        raise refuse("is longer than 2000 characters")
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed IPv6 bracket: https://[::1/x
        raise refuse("is not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http"):
        raise refuse("must be an https URL")
    if scheme == "http" and not allow_http:
        raise refuse("must use https (plain http is not allowed on this server)")
    if parts.username or parts.password:
        raise refuse("must not carry credentials")
    host = parts.hostname
    if not host:
        raise refuse("has no host")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise refuse("has an invalid port") from None
    try:
        addresses = tuple(dict.fromkeys(resolve(host, port)))
    except (OSError, UnicodeError):
        raise refuse(f"host {host!r} does not resolve") from None
    if not addresses:
        raise refuse(f"host {host!r} does not resolve")
    if not allow_private:
        for address in addresses:
            reason = _refusal(ipaddress.ip_address(address))
            if reason:
                raise refuse(f"host {host!r} resolves to {address}, a {reason} address; refused")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return CallbackTarget(url=url, scheme=scheme, host=host, port=port, path=path, addresses=addresses)


def _post(target: CallbackTarget, body: bytes, timeout_s: float) -> int:
    """POST to the first checked address, TLS verified against the URL's host name."""
    address = target.addresses[0]
    timeout = urllib3.Timeout(connect=min(5.0, timeout_s), read=timeout_s)
    if target.scheme == "https":
        pool = urllib3.HTTPSConnectionPool(address, target.port, timeout=timeout, retries=False,
                                           cert_reqs="CERT_REQUIRED", server_hostname=target.host,
                                           assert_hostname=target.host)
    else:
        pool = urllib3.HTTPConnectionPool(address, target.port, timeout=timeout, retries=False)
    try:
        response = pool.urlopen("POST", target.path, body=body, redirect=False, retries=False,
                                headers={"Host": target.host_header, "Content-Type": "application/json",
                                         "User-Agent": "d3-api-callback/1"})
        return response.status
    finally:
        pool.close()


def deliver_callback(url: str, payload: dict[str, Any], allow_http: bool, allow_private: bool,
                     attempts: int = CALLBACK_ATTEMPTS, backoff_s: float = CALLBACK_BACKOFF_S,
                     timeout_s: float = CALLBACK_TIMEOUT_S, resolve: Resolver = system_resolve) -> str:
    """POST `payload` with retries; returns a short status for `video_predictions.callback_status`.

    Retried: connection errors, timeouts, 408, 429 and 5xx. Not retried: other answers, refusals.
    """
    body = json.dumps(payload).encode()
    last = "not attempted"
    for attempt in range(1, attempts + 1):
        try:  # resolved and checked again at every attempt: DNS may have changed
            target = check_callback_url(url, allow_http, allow_private, resolve)
        except InvalidInput as exc:
            return f"refused: {exc.message}"[:64]
        try:
            status = _post(target, body, timeout_s)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            last = type(exc).__name__
        else:
            if 200 <= status < 300:
                return f"delivered: HTTP {status} (attempt {attempt})"
            last = f"HTTP {status}"
            if status < 500 and status not in (408, 429):
                return f"failed: {last} (attempt {attempt})"
        if attempt < attempts:
            time.sleep(backoff_s * 2 ** (attempt - 1))
    return f"failed: {last} after {attempts} attempts"[:64]


class CallbackSender:
    """Delivers a finished job's callback in a thread of its own, so retries never hold a job worker."""

    def __init__(self, jobs: JobStore, final_body: Callable[[uuid.UUID], tuple[str, dict[str, Any]] | None],
                 allow_http: bool, allow_private: bool) -> None:
        self.jobs = jobs
        self.final_body = final_body
        self.allow_http = allow_http
        self.allow_private = allow_private
        self.attempts = CALLBACK_ATTEMPTS
        self.backoff_s = CALLBACK_BACKOFF_S
        self.timeout_s = CALLBACK_TIMEOUT_S  # per attempt; build_services sets CALLBACK_TIMEOUT_S

    def send(self, job_id: uuid.UUID) -> threading.Thread:
        thread = threading.Thread(target=self.deliver, args=(job_id,), daemon=True, name="d3-video-callback")
        thread.start()
        return thread

    def deliver(self, job_id: uuid.UUID) -> str | None:
        """Deliver now (once per job: the pending -> sending claim); the recorded status, or None."""
        try:
            if not self.jobs.claim_callback(job_id):
                return None
            final = self.final_body(job_id)  # (callback URL, GET /predictions/<id> body)
            if final is None:
                self.jobs.record_callback(job_id, "failed: the job is gone")
                return None
            url, payload = final
            status = deliver_callback(url, payload, self.allow_http, self.allow_private,
                                      attempts=self.attempts, backoff_s=self.backoff_s, timeout_s=self.timeout_s)
            self.jobs.record_callback(job_id, status)
            log.info("callback for video job %s: %s", job_id, status)
            return status
        except DatabaseUnavailable as exc:
            log.warning("callback for video job %s not recorded: %s", job_id, exc)
        except Exception:
            log.exception("callback for video job %s failed", job_id)
        return None
