"""Sanitization detectors: one module per detector, each registering itself.

Importing this package imports every module in it (except ``base`` and ``registry``), so a new
detector only needs its own file with a ``@register``-ed class.
"""

from __future__ import annotations

import importlib
import pkgutil

from poisonguard.detectors.base import Detector, DetectorResult, Finding
from poisonguard.detectors.registry import build, get, names, register, registered

_INTERNAL = {"base", "registry"}
for _m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _m.name not in _INTERNAL and not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["Detector", "DetectorResult", "Finding", "build", "get", "names", "register", "registered"]
