"""Fused execution of replicated tails (ONE's, OKDDip's, PCL's): the ``m`` tails run as one ``m``-times wider tail.

:func:`fuse_branches` rewrites the fx graph of a tail into one graph that computes every branch at once, with fewer
and larger kernels, reading the branches' own parameters at each call (:class:`FusedBranches` runs it); a tail with an
op no rule covers raises :class:`FusionError`. :func:`register_module_rule` adds a rule for a module of your own, and
:mod:`.planner` decides, for the methods' ``execution`` option, whether a training forward runs the branches fused.
How it works (the value layouts, the rules, the modules of this package): docs/fused.md.
"""
from ..errors import FusionError
from .branches import FusedBranches, fuse_branches
from .modules import ModuleRule, register_module_rule

__all__ = ["FusionError", "FusedBranches", "ModuleRule", "fuse_branches", "register_module_rule"]
