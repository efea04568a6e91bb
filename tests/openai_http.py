"""Plain HTTP calls to the daemon's OpenAI API, for what the openai SDK does not send (vLLM's /tokenize, raw bodies,
a client that goes away)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request


def call(url: str, body: dict | bytes | None = None, headers: dict | None = None, context=None,
         timeout: float = 60) -> tuple[int, dict | None]:
    """(status, JSON body or None) of a GET (no body) or POST; error statuses are returned, not raised."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as err:
        raw = err.read()
        return err.code, json.loads(raw) if raw else None
