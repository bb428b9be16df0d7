"""Keep OpenSSL out of the supervisor process: it speaks no TLS, and ``ssl`` costs it ~4.5 MiB.

The supervisor (``sshfwup serve``'s long-lived process) serves no network client: the SSH front
is its child. Yet ``import ssl`` maps libssl and libcrypto (4–5 MiB of RSS, a fifth of a
process meant to stay ≤ 20 MiB), because anyio imports ``ssl`` names unconditionally
(``anyio.streams.tls``: ``from ssl import SSLContext``) and asyncio imports ``ssl`` when it can.
:func:`install`, called before either is imported, puts a module named ``ssl`` in their place
whose every name is a placeholder: a class that refuses to be instantiated. Importing and
annotating with them works; any use of TLS fails at once with :class:`TLSUnavailable`, never
silently. Nothing else in the process is affected; the front (its own interpreter) has the real
``ssl``. ``tests/test_imports.py`` checks that ``serve``'s supervisor never maps ``_ssl``, and
the whole suite runs the supervisor this way.
"""

from __future__ import annotations

import sys
import types
from typing import Any

__all__ = ["TLSUnavailable", "install"]


class TLSUnavailable(RuntimeError):
    """TLS was asked of the supervisor process, which has none (see the module docstring)."""


class _Placeholder:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TLSUnavailable(f"{type(self).__name__}: the sshfwup supervisor process has no TLS")

    def __class_getitem__(cls, item: Any) -> type:
        return cls


class _NoTLS(types.ModuleType):
    """``ssl`` without OpenSSL: each name a placeholder class (exceptions for ``*Error`` names,
    so ``except ssl.SSLError`` clauses still compile to something that never matches)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        base: type = Exception if name.endswith(("Error", "Exception")) else _Placeholder
        value = type(name, (base,), {"__module__": "ssl"})
        setattr(self, name, value)
        return value


def install() -> bool:
    """Replace ``ssl`` in this process, unless the real one is already imported (then nothing is
    gained, and replacing it would split the process in two views). Returns whether it did."""
    if "ssl" in sys.modules or "_ssl" in sys.modules:
        return False
    module = _NoTLS("ssl", __doc__)
    module.HAS_SNI = False  # what feature checks read first
    sys.modules["ssl"] = module
    return True
