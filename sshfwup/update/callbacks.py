"""Precheck and success callbacks: what they are given (``UpdateContext``), how ``[fwup]
precheck_callback`` / ``success_callback`` specs are loaded and called, and the verdict of an
installed firmware (``report_only`` lives in :mod:`.update`, where configurations name it).

A callback is ``"package.module:function"`` or ``"/path/to/file.py:function"``, sync or async. A
precheck refuses by returning anything but None/True (or raising); a success callback returns an
``Outcome`` (None: the firmware is installed for the next boot) or raises ``UpdateError``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sshfwup.boot.bootenv import BootState
from sshfwup.device import Device

from .fwhead import FirmwareHead
from .fwup import FwupResult
from .outcome import UpdateError, Uploader
from .report import Report

__all__ = [
    "MOVED_CALLBACK_MODULES",
    "Callback",
    "UpdateContext",
    "applied_verdict",
    "call",
    "load_callback",
]


@dataclass(frozen=True)
class UpdateContext:
    """What a precheck or success callback gets."""

    device: Device
    uploader: Uploader
    report: Report
    boot: BootState  # before the update (precheck) / after fwup (success callback)
    running_root: str | None
    fwup: FwupResult | None = None
    firmware: FirmwareHead | None = None  # what the upload said it is (its meta.conf), if readable
    before: BootState | None = None  # success callback: the boot state read before the upload


Callback = Callable[[UpdateContext], Any]


#: Callbacks by the names they had before sshfwup's modules moved into packages (issue 21):
#: configurations written then keep working.
MOVED_CALLBACK_MODULES = {"sshfwup.pipeline": "sshfwup.update.pipeline", "sshfwup.update": "sshfwup.update.update"}


def load_callback(spec: str) -> Callback:
    """``"package.module:function"`` or ``"/path/to/file.py:function"`` → the function (sync or async)."""
    module_name, _, attr = spec.rpartition(":")
    module_name = MOVED_CALLBACK_MODULES.get(module_name, module_name)
    try:
        if module_name.endswith(".py"):
            # A plain file on the device: no package to install for a one-off hook.
            loader_spec = importlib.util.spec_from_file_location(f"sshfwup_callback_{abs(hash(module_name))}", module_name)
            if loader_spec is None or loader_spec.loader is None:
                raise ImportError(f"cannot load {module_name}")
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        fn = getattr(module, attr)
    except (ImportError, AttributeError, OSError, SyntaxError) as e:
        raise UpdateError(f"callback {spec!r} cannot be loaded: {e}") from None
    if not callable(fn):
        raise UpdateError(f"callback {spec!r} is not callable")
    return fn


async def call(fn: Callback, ctx: UpdateContext) -> Any:
    result = fn(ctx)
    if inspect.isawaitable(result):
        result = await result
    return result


def applied_verdict(ctx: UpdateContext) -> str:
    active = ctx.boot.active
    version = ctx.boot.version(active) if active else None
    return f"firmware {version or '?'} installed in slot {active or '?'}; it runs after the next reboot"
