"""Print README's "Clients" table from tests/ssh/test_clients.py's table of clients.

    .venv/bin/python scripts/clients_table.py

The table is the tests' parametrization, and every cell is what those tests assert; a test there
fails when README's copy differs from what this prints.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "ssh")]  # conftest, test_clients
    from test_clients import markdown_table

    sys.stdout.write(markdown_table())


if __name__ == "__main__":
    main()
