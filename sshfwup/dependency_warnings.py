"""Keep dependencies' warnings away from operators: the entry points call ``silence()`` first.

A new release of a dependency can start warning about another dependency (cryptography 51 warns
that DSA is deprecated each time asyncssh, at import, names its DSA classes). Python prints such
warnings on stderr, ahead of sshfwup's own message, in every command and in the device's log —
noise the operator can do nothing about, and a change of what every command prints. The filters
are narrow: only the named categories, and only where the warning is attributed to the named
dependency's own modules (``warnings`` matches ``module`` against the module whose code
triggered it), so sshfwup's own warnings and everything else still show.

``tests/test_dependency_warnings.py`` runs each entry point and fails naming any warning it
printed: the next upstream warning is one clear failure, and one more line here.
"""

from __future__ import annotations

import importlib
import warnings

__all__ = ["SILENCED", "silence"]

# (category as "module:Class", regular expression for the modules the warning is attributed to, why)
SILENCED: tuple[tuple[str, str, str], ...] = (
    (
        "cryptography.utils:CryptographyDeprecationWarning",
        r"asyncssh(\..*)?\Z",
        "cryptography >= 47 deprecates DSA; asyncssh names its DSA classes at import (sshfwup never uses DSA keys)",
    ),
)


def silence() -> None:
    """Install the filters (idempotent; a category whose package is missing is skipped)."""
    for category_name, modules, _why in SILENCED:
        module_name, _, class_name = category_name.partition(":")
        try:
            category = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            continue  # the dependency is not installed here or no longer has that category
        warnings.filterwarnings("ignore", category=category, module=modules)
