"""The writing playground at `/`: the page's static files, and how a browser authenticates its WebSocket.

The page is plain HTML/CSS/JavaScript shipped inside the package (`serving/static/`, package data in pyproject.toml), with
no build step and nothing loaded from another origin; a Content-Security-Policy on the page enforces the latter.

Browsers cannot set an `Authorization` header on a WebSocket handshake, so the page offers its key as a subprotocol:
`Sec-WebSocket-Protocol: textmill.v1, textmill.bearer.<base64url(key), unpadded>` (the scheme Kubernetes' API server uses
for `base64url.bearer.authorization.k8s.io.<token>`). The server answers with `textmill.v1` only, never echoing the key.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from fastapi import FastAPI, WebSocket
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"
SUBPROTOCOL = "textmill.v1"
BEARER_PREFIX = "textmill.bearer."
# Everything from this origin only: a CDN script, font or stylesheet added by mistake is blocked (and the browser test sees
# the console error). `ws:`/`wss:` because CSP's 'self' does not match WebSocket URLs in every browser.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self' ws: wss:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def mount(app: FastAPI, keys_required: bool) -> None:
    """Serve the playground: `GET /` (index.html with a CSP) and `GET /static/<file>`.

    `keys_required` is written into the page (`<body data-keys-required>`), so it knows to show the key field without
    asking `/info`, which needs the key itself when keys are set."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    page = page.replace("<body>", f'<body data-keys-required="{str(keys_required).lower()}">', 1)

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache",
                                           "X-Content-Type-Options": "nosniff"})


def websocket_credentials(ws: WebSocket) -> tuple[str | None, str | None]:
    """(Authorization header value, subprotocol to accept with) for a WebSocket handshake.

    The `Authorization` header wins when present (non-browser clients); otherwise a `textmill.bearer.<base64url key>`
    subprotocol is turned into `Bearer <key>`. A malformed one yields no credentials (the guard then refuses with 1008),
    never an exception. The subprotocol to accept is `textmill.v1` when the client offered it (a browser fails the
    handshake if it offered subprotocols and the server picks none), else None.
    """
    offered = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    accept = SUBPROTOCOL if SUBPROTOCOL in offered else None
    header = ws.headers.get("authorization")
    if header is None:
        encoded = next((p[len(BEARER_PREFIX):] for p in offered if p.startswith(BEARER_PREFIX)), None)
        if encoded is not None:
            try:
                header = "Bearer " + base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError, ValueError):
                header = None
    return header, accept
