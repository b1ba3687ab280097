"""Container health check: exit 0 when the server on this host answers 200 on readiness.

Used by the images' ``HEALTHCHECK`` and by docker-compose (the slim base has no curl).
``LMA_SERVE_PORT`` picks the port (8000); ``LMA_HEALTHCHECK_URL`` overrides the whole URL.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = os.environ.get("LMA_SERVE_PORT", "8000")
    url = os.environ.get("LMA_HEALTHCHECK_URL", f"http://127.0.0.1:{port}/v2/health/ready")
    try:
        with urllib.request.urlopen(
            url, timeout=float(os.environ.get("LMA_HEALTHCHECK_TIMEOUT", "2"))
        ) as r:
            return 0 if r.status == 200 else 1
    except (urllib.error.URLError, OSError, ValueError) as exc:
        sys.stderr.write(f"not ready: {url}: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
