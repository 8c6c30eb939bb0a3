"""kdwrap: online knowledge distillation (ONE, OSAKD) as a two-line change to any PyTorch image classifier."""
from .api import METHODS, export, one, osakd, summary, wrap
from .base import KDLoss, KDModel

__version__ = "0.1.0"

__all__ = ["METHODS", "KDLoss", "KDModel", "export", "one", "osakd", "summary", "wrap", "__version__"]
