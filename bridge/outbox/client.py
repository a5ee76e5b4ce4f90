"""The HTTP side: one POST to ``/v1/dev/user/conversations/from-segments`` and what its answer means.

The key is resolved from ``$OMI_API_KEY`` > ``[api] api_key_file`` > ``[api] api_key`` and never
appears in a repr, a log line or an error text; only a fingerprint (a hash) is stored, so the outbox
can tell when the operator changed the key after a 401/403 pause.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import ipaddress
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from bridge.config import API_KEY_ENV, ApiOptions
from bridge.core.errors import BridgeError

_LOGGER = logging.getLogger(__name__)

ENDPOINT = "/v1/dev/user/conversations/from-segments"
"""omi-api.md §1 (backend/routers/developer.py)."""
CONNECT_TIMEOUT_SECONDS = 10.0
"""Connecting is quick or broken; only the read waits on the server's synchronous processing."""
KEY_SETTINGS_HINT = ("create a key with the conversations:write scope in the Omi app: Settings → Developer, "
                     "then set [api] api_key_file (or $OMI_API_KEY)")
DEFAULT_RETRY_AFTER_SECONDS = 3600.0
"""A 429 without a usable Retry-After: the window is one hour (omi-api.md §3)."""
_RETRY_IN_RE = re.compile(r"Try again in (\d+)s")


class Kind(enum.Enum):
    """What an answer means for the item (omi-api.md §9 "Response handling")."""

    SENT = "sent"  # 200 completed/deleted/...: done
    PROCESSING = "processing"  # 200 processing: an earlier attempt still runs on the server
    RETRY = "retry"  # network error, timeout, 5xx, 409, 503: same body later, with back-off
    RATE_LIMITED = "rate_limited"  # 429: not before Retry-After
    PAUSE = "pause"  # 401/403/config: the operator must act
    DEAD = "dead"  # 422 and other permanent rejections


@dataclass(frozen=True)
class Outcome:
    kind: Kind
    detail: str
    status_code: int | None = None
    server_id: str | None = None
    server_status: str | None = None
    discarded: bool | None = None
    retry_after: float | None = None
    hint: str = ""


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_base_url(base_url: str) -> str:
    """``base_url`` without a trailing slash; https, or http to a loopback address only."""
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    if not host or parts.scheme not in ("https", "http"):
        raise BridgeError(f"[api] base_url {base_url!r} is not an http(s) URL",
                          "set [api] base_url to https://api.omi.me")
    if parts.scheme == "http" and not is_loopback(host):
        raise BridgeError(f"[api] base_url {base_url!r}: plain http to {host} would send the API key "
                          "unencrypted",
                          "use https:// (plain http is allowed only to 127.0.0.1, ::1 or localhost)")
    return base_url.rstrip("/")


def api_key_source(api: ApiOptions) -> str | None:
    """Where the key comes from, by precedence: ``$OMI_API_KEY``, ``[api] api_key_file``,
    ``[api] api_key``; None when none is set."""
    if os.environ.get(API_KEY_ENV, "").strip():
        return f"${API_KEY_ENV}"
    if api.api_key_file:
        return "[api] api_key_file"
    if api.api_key.strip():
        return "[api] api_key"
    return None


def resolve_api_key(api: ApiOptions) -> str:
    """The key from the first source ``api_key_source`` names."""
    source = api_key_source(api)
    if source == f"${API_KEY_ENV}":
        return os.environ[API_KEY_ENV].strip()
    if source == "[api] api_key_file":
        path = Path(api.api_key_file).expanduser()
        try:
            key = path.read_text().strip()
        except FileNotFoundError:
            raise BridgeError(f"[api] api_key_file {path} does not exist",
                              "create it readable only by the user the daemon runs as (the service: "
                              f"sudo install -m 600 -o omi-bridge -g omi-bridge /dev/null {path}), "
                              f"then paste your omi_dev_... key into it (sudoedit {path})") from None
        except OSError as exc:
            raise BridgeError(f"cannot read [api] api_key_file {path}: {exc.strerror}",
                              "check the path and that the service user may read it") from None
        if not key:
            raise BridgeError(f"[api] api_key_file {path} is empty", KEY_SETTINGS_HINT)
        return key
    if source == "[api] api_key":
        return api.api_key.strip()
    raise BridgeError("no Omi API key is configured",
                      f"set ${API_KEY_ENV}, [api] api_key_file or [api] api_key; " + KEY_SETTINGS_HINT)


def fingerprint(base_url: str, key: str) -> str:
    """Identifies the (base_url, key) pair without revealing the key."""
    return hashlib.sha256(f"omi-bridge\0{base_url}\0{key}".encode()).hexdigest()[:16]


def _detail(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    detail = data.get("detail", data) if isinstance(data, dict) else data
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):  # pydantic error list
        msgs = []
        for err in detail:
            if isinstance(err, dict):
                loc = ".".join(str(p) for p in err.get("loc", ()))
                msgs.append(f"{loc}: {err.get('msg', '')}" if loc else str(err.get("msg", err)))
            else:
                msgs.append(str(err))
        return "; ".join(msgs)
    return json.dumps(detail)[:500]


def _retry_after(response: httpx.Response, detail: str) -> float:
    raw = response.headers.get("Retry-After", "")
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    if m := _RETRY_IN_RE.search(detail):
        return float(m.group(1))
    return DEFAULT_RETRY_AFTER_SECONDS


def classify(response: httpx.Response) -> Outcome:
    """Turn an HTTP answer into what the outbox should do (omi-api.md §2, §5, §9)."""
    code = response.status_code
    if code == 200:
        try:
            data = response.json()
            server_id, status = str(data["id"]), str(data.get("status", ""))
            discarded = bool(data.get("discarded", False))
        except (ValueError, KeyError, TypeError):
            return Outcome(Kind.RETRY, f"200 with an unreadable body: {response.text[:200]!r}", code)
        kind = Kind.PROCESSING if status == "processing" else Kind.SENT
        return Outcome(kind, status, code, server_id, status, discarded)
    detail = _detail(response)
    if code == 401:
        return Outcome(Kind.PAUSE, f"the Omi API rejected the API key (401 {detail})", code,
                       hint=KEY_SETTINGS_HINT)
    if code == 403:
        if "scope" in detail:
            reason = f"the API key lacks the conversations:write scope (403 {detail})"
        else:
            reason = f"the Omi API refused the API key (403 {detail})"
        return Outcome(Kind.PAUSE, reason, code, hint=KEY_SETTINGS_HINT)
    if code in (404, 405):
        return Outcome(Kind.PAUSE, f"{response.request.url} does not exist ({code} {detail})", code,
                       hint="check [api] base_url (default https://api.omi.me)")
    if code == 429:
        return Outcome(Kind.RATE_LIMITED, f"429 {detail}", code,
                       retry_after=_retry_after(response, detail))
    if code == 409 or code == 408 or code >= 500:
        return Outcome(Kind.RETRY, f"{code} {detail}", code)
    return Outcome(Kind.DEAD, f"{code} {detail}", code)


def network_outcome(exc: Exception) -> Outcome:
    if isinstance(exc, httpx.TimeoutException):
        text = f"timed out ({type(exc).__name__})"
    else:
        text = f"network error: {type(exc).__name__}: {exc}"
    return Outcome(Kind.RETRY, text)


@dataclass(frozen=True)
class Credentials:
    base_url: str
    key: str = dataclasses.field(repr=False)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.base_url, self.key)

    @classmethod
    def from_config(cls, api: ApiOptions) -> Credentials:
        return cls(check_base_url(api.base_url), resolve_api_key(api))


def _timeout(api: ApiOptions) -> httpx.Timeout:
    return httpx.Timeout(api.timeout_seconds, connect=min(CONNECT_TIMEOUT_SECONDS, api.timeout_seconds))


def _headers(creds: Credentials) -> dict[str, str]:
    return {"Authorization": f"Bearer {creds.key}", "Content-Type": "application/json",
            "User-Agent": "omi-bridge"}


class OmiClient:
    """Blocking client (``transcribe --send``, ``outbox retry``)."""

    def __init__(self, api: ApiOptions, creds: Credentials,
                 transport: httpx.BaseTransport | None = None) -> None:
        self._creds = creds
        self._http = httpx.Client(timeout=_timeout(api), transport=transport)

    def __repr__(self) -> str:
        return f"OmiClient({self._creds.base_url!r})"

    def post(self, body: bytes) -> Outcome:
        try:
            response = self._http.post(self._creds.base_url + ENDPOINT, content=body,
                                       headers=_headers(self._creds))
        except httpx.HTTPError as exc:
            return network_outcome(exc)
        return classify(response)

    def close(self) -> None:
        self._http.close()


class AsyncOmiClient:
    """The daemon's client: a request never blocks the event loop."""

    def __init__(self, api: ApiOptions, creds: Credentials,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._creds = creds
        self._http = httpx.AsyncClient(timeout=_timeout(api), transport=transport)

    def __repr__(self) -> str:
        return f"AsyncOmiClient({self._creds.base_url!r})"

    async def post(self, body: bytes) -> Outcome:
        try:
            response = await self._http.post(self._creds.base_url + ENDPOINT, content=body,
                                             headers=_headers(self._creds))
        except httpx.HTTPError as exc:
            return network_outcome(exc)
        return classify(response)

    async def aclose(self) -> None:
        await self._http.aclose()

