"""Print the installed distributions a lock file does not name (bootstrap removes them).

Usage: python scripts/lock_extras.py requirements-lock.txt
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import distributions


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def main(lock_path: str) -> int:
    with open(lock_path, encoding="utf-8") as f:
        locked = {normalized(m.group(1)) for m in re.finditer(r"^([A-Za-z0-9._-]+)==", f.read(), re.M)}
    keep = locked | {"pip", "sshfwup"}
    extra = sorted({d.metadata["Name"] for d in distributions() if normalized(d.metadata["Name"]) not in keep})
    print(" ".join(extra))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
