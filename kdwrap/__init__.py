"""kdwrap: online knowledge distillation (ONE, OSAKD) as a two-line change to any PyTorch image classifier."""
from .api import METHODS, export, one, osakd, register_method, summary, wrap
from .base import KDLoss, KDModel
from .errors import FusionError, KDWrapError, OptionError, SplitError, TraceError

__version__ = "0.1.0"

__all__ = [
    "METHODS", "KDLoss", "KDModel", "export", "one", "osakd", "register_method", "summary", "wrap", "__version__",
    "KDWrapError", "SplitError", "TraceError", "FusionError", "OptionError",
]
