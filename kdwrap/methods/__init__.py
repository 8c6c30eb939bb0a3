"""The distillation methods, one module each. Each declares its entry point (``kdwrap.one``, ...) where it is
defined, in :mod:`.registry`; importing this package imports every method's module, in the order of
``kdwrap.METHODS``, so that each registers its entry point."""
from . import one, osakd, kd, dml, okddip, byot, pcl
from .registry import METHODS, register_method

__all__ = ["METHODS", "register_method", "one", "osakd", "kd", "dml", "okddip", "byot", "pcl"]
