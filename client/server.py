"""HTTP calls to a ComfyUI server: JSON requests, downloads, basic auth from the URL."""
from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from .errors import ServerError


class _Http:
    def __init__(self, url: str, headers: dict | None = None, timeout: float = 60):
        if "://" not in url:
            url = "http://" + url
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ServerError(f"server URL {url!r}: expected http:// or https://")
        self.headers = dict(headers or {})
        netloc = parts.hostname or ""
        if ":" in netloc:
            netloc = f"[{netloc}]"
        if parts.port:
            netloc += f":{parts.port}"
        if parts.username is not None:  # http://user:pass@host: HTTP basic auth
            cred = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            self.headers.setdefault("Authorization", "Basic " + base64.b64encode(cred.encode()).decode())
        self.base = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        self.timeout = timeout

    def ws_url(self, client_id: str) -> str:
        scheme = "wss" if self.base.startswith("https:") else "ws"
        return scheme + self.base[self.base.index(":"):] + "/ws?clientId=" + urllib.parse.quote(client_id)

    def request(self, path: str, data: Any = None, method: str | None = None, raw: bool = False):
        body = json.dumps(data).encode() if data is not None else None
        headers = dict(self.headers)
        if body is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.base + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                payload = r.read()
        except urllib.error.HTTPError as e:
            text = e.read()
            try:
                err = json.loads(text)
            except ValueError:
                err = text.decode(errors="replace")
            e.close()
            return e.code, err
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ServerError(f"cannot reach the ComfyUI server at {self.base}: {reason}") from None
        if raw:
            return 200, payload
        try:
            return 200, json.loads(payload) if payload else None
        except ValueError:
            raise ServerError(f"{self.base}{path}: the server did not answer JSON (is this a ComfyUI server?): "
                              f"{payload[:200]!r}") from None

    def get_json(self, path: str):
        status, body = self.request(path)
        if status != 200:
            raise ServerError(f"GET {path}: HTTP {status}: {str(body)[:500]}")
        return body

    def download(self, path: str, dest: str):
        req = urllib.request.Request(self.base + path, headers=self.headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r, open(dest + ".part", "wb") as f:
                while True:
                    chunk = r.read(1 << 20)
                    if not chunk:
                        break
                    f.write(chunk)
        except (urllib.error.URLError, OSError) as e:
            try:
                os.remove(dest + ".part")
            except OSError:
                pass
            code = getattr(e, "code", None)
            raise ServerError(f"download {path} failed: {f'HTTP {code}' if code else getattr(e, 'reason', e)}") from None
        os.replace(dest + ".part", dest)
