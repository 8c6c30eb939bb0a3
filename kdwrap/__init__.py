"""kdwrap: knowledge distillation (ONE, OSAKD, DML, OKDDip, BYOT, PCL online; classic KD from a teacher) as a two-line
change to any PyTorch image classifier.

The public surface is what this package exports, plus the modules ``kdwrap.methods``, ``kdwrap.surgery``,
``kdwrap.taps``, ``kdwrap.probe``, ``kdwrap.knn``, ``kdwrap.memory_bank``, ``kdwrap.fused``, ``kdwrap.models``
and ``kdwrap.seeds``. Modules named with a leading underscore are internal: they may change between versions.
"""
from .api import METHODS, byot, dml, export, kd, okddip, one, osakd, pcl, register_method, summary, wrap
from .base import KDLoss, KDModel
from .errors import CheckpointError, FusionError, KDWrapError, OptionError, SplitError, TraceError

__version__ = "0.1.0"

__all__ = [
    "METHODS", "KDLoss", "KDModel", "byot", "dml", "export", "kd", "okddip", "one", "osakd", "pcl", "register_method", "summary", "wrap",
    "__version__",
    "KDWrapError", "SplitError", "TraceError", "FusionError", "OptionError", "CheckpointError",
]
