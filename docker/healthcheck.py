#!/usr/bin/env python3
"""Container HEALTHCHECK: exit 0 when TorchServe's ``/ping`` answers ``Healthy``, else 1.

With token authorization on, TorchServe 0.12 wants the inference key even for ``/ping``. It writes the
keys to ``key_file.json`` in its working directory (mode 0600, owned by the serving user, which the
HEALTHCHECK runs as too). An inference key expires after ``token_expiration_min`` and TorchServe never
renews it by itself, so without help the container would turn unhealthy an hour after it started, and
every client would be locked out. When ``/ping`` refuses a key that the key file says has expired, this
script asks the token API (on the management port, which listens on the container's loopback only) for
a new inference key, then pings again. Clients re-read the key from ``key_file.json``.

Standard library only: it runs on the image's Python without the project installed.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

INFERENCE_URL = os.environ.get("FRUIT_INFERENCE_URL", "http://127.0.0.1:8080")
MANAGEMENT_URL = os.environ.get("FRUIT_MANAGEMENT_URL", "http://127.0.0.1:8081")
KEY_FILE = Path(os.environ.get("FRUIT_KEY_FILE", "key_file.json"))
TIMEOUT = 4.0  # below the HEALTHCHECK --timeout, so a hung server reports "unhealthy" rather than a killed check


def read_keys(path: Path) -> dict:
    """The parsed key file, or ``{}`` when it is missing or half written (TorchServe rewrites it on renewal)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def expired(entry: object, now: datetime | None = None) -> bool:
    """Whether a key-file entry's ``expiration time`` (a Java ``Instant``, e.g. ``2026-11-23T15:05:00.123456Z``) has passed."""
    if not isinstance(entry, dict) or not isinstance(entry.get("expiration time"), str):
        return False
    try:
        when = datetime.fromisoformat(entry["expiration time"])
    except ValueError:
        return False
    return when <= (now or datetime.now(UTC))


def get(url: str, token: str | None) -> tuple[int, bytes]:
    """(HTTP status, body); status 0 when nothing answered."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:  # fixed loopback URLs only
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def ping(keys: dict) -> tuple[bool, str]:
    status, body = get(f"{INFERENCE_URL}/ping", (keys.get("inference") or {}).get("key"))
    try:
        healthy = status == 200 and json.loads(body).get("status") == "Healthy"
    except (ValueError, AttributeError):
        healthy = False
    return healthy, f"{status} {body[:200].decode('utf-8', 'replace').strip()}" if status else "no answer"


def main() -> int:
    keys = read_keys(KEY_FILE)
    healthy, answer = ping(keys)
    if not healthy and answer.startswith("400") and expired(keys.get("inference")) and (keys.get("API") or {}).get("key"):
        status, body = get(f"{MANAGEMENT_URL}/token?type=inference", keys["API"]["key"])
        if status != 200:
            print(f"inference key expired and renewing it failed: {status} {body[:200]!r}", file=sys.stderr)
            return 1
        healthy, answer = ping(read_keys(KEY_FILE))
    if healthy:
        return 0
    print(f"torchserve is not healthy: {answer}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
