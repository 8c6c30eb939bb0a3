"""kdwrap: knowledge distillation (ONE, OSAKD, DML, OKDDip, BYOT, PCL online; classic KD from a teacher) as a two-line
change to any PyTorch image classifier.

The public surface is what this package exports:

* the wrappers ``one``, ``osakd``, ``kd``, ``dml``, ``okddip``, ``byot``, ``pcl`` and ``wrap(net, method=...)``,
  each returning ``(model, loss_fn)``;
* ``export`` (the deployable model) and ``summary`` (what a wrapper did to the model, and why);
* the registry of methods, ``METHODS`` and ``register_method``;
* the errors (``KDWrapError`` and its subclasses) and the base classes ``KDModel`` and ``KDLoss``.

The classes the wrappers return and their options are documented in ``kdwrap.methods``; ``kdwrap.fused`` exports
the registry of fusion rules, ``kdwrap.integrations`` the Hugging Face, Lightning and timm adapters, ``kdwrap.models``
reference classifiers, ``kdwrap.controls`` the free controls to compare against (label smoothing, a weight average).
Everything else is internal and may change between versions: ``kdwrap.graph`` (reading and cutting a model),
``kdwrap.demo``, and modules named with a leading underscore.
"""
from .api import METHODS, byot, dml, export, kd, okddip, one, osakd, pcl, register_method, summary, wrap
from .base import KDLoss, KDModel
from .errors import CheckpointError, FusionError, KDWrapError, OptionError, SplitError, TraceError

__version__ = "0.1.0"

__all__ = [
    "METHODS", "KDLoss", "KDModel", "byot", "dml", "export", "kd", "okddip", "one", "osakd", "pcl", "register_method",
    "summary", "wrap",
    "__version__",
    "KDWrapError", "SplitError", "TraceError", "FusionError", "OptionError", "CheckpointError",
]
