"""Age estimation from face images. Knows nothing of Ray: usable in a notebook, a test or a Serve replica.

    >>> from agecore import Predictor
    >>> Predictor.__module__
    'agecore.predictor'
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["ImageError", "Predictor", "UserError", "__version__"]

if TYPE_CHECKING:
    from agecore.errors import UserError
    from agecore.images import ImageError
    from agecore.predictor import Predictor

_LAZY = {"Predictor": "agecore.predictor", "ImageError": "agecore.images", "UserError": "agecore.errors"}


def __getattr__(name: str) -> Any:
    # imported on first use, so that `import agecore.config` does not load torch and timm
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'agecore' has no attribute {name!r}")
