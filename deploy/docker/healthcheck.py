#!/usr/bin/env python3
"""Container HEALTHCHECK: GET http://127.0.0.1:$TEXTMILL_PORT<path> (default /live); exit 0 on 200, else 1.

Standard library only (the slim image has no curl). Usage: textmill-healthcheck [/live|/ready] [--url BASE]
"""

import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    path = next((a for a in argv if a.startswith("/")), "/live")
    base = argv[argv.index("--url") + 1] if "--url" in argv else f"http://127.0.0.1:{os.environ.get('TEXTMILL_PORT', '8000')}"
    try:
        with urllib.request.urlopen(base.rstrip("/") + path, timeout=8) as r:
            ok = r.status == 200
    except (urllib.error.URLError, OSError) as e:
        print(f"{base}{path}: {e}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
