"""What a fusion rule (:mod:`.modules`, :mod:`.ops`) may ask of the graph builder that calls it.

The rules only annotate their ``builder`` argument with this protocol: :class:`._builder.Builder` implements it and
imports the rule registries, so the rules never import the builder (no circle of imports).
"""
from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

from torch import fx, nn

from ._layout import Val

__all__ = ["RuleBuilder"]


class RuleBuilder(Protocol):
    """The builder of the fused graph, as a rule sees it: the new graph, the layout of every value so far, and the
    value plumbing (conversions between layouts, the parameter pack, errors that name the node)."""

    m: int  # the number of branches
    g: fx.Graph  # the fused graph being built
    training: bool  # which of the tail's graphs is fused (train or eval)
    conv_mode: str  # fuse_branches' conv_mode
    env: dict[fx.Node, Val]  # source-graph node -> its value in the fused graph
    acts: set[fx.Node]  # shared nodes holding activations (not parameters, constants or shapes)
    uses: dict[str, int]  # module path -> how many times the source graph calls it
    pending: list[fx.Node]  # BatchNorm statistics to write back after the last layer

    def fail(self, reason: str) -> None:
        """Raise a FusionError naming the node being fused and ``reason``."""

    def val(self, a: Any) -> Val:
        """The value of a source-graph argument (a node, or a constant: shared)."""

    def shared(self, a: Any, what: str = "this argument") -> Any:
        """``a`` with every node replaced by its (shared) new node; fails on per-branch values."""

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> fx.Node:
        """A ``call_function`` node of the fused graph."""

    def fused(self, v: Val) -> fx.Node:
        """The value laid out fused (converting shared, stacked and list values)."""

    def as_list(self, v: Val, what: str) -> Any:
        """A per-branch operand (weights, statistics) as a tuple of m refs."""

    def modules(self, target: str) -> tuple[fx.Node, ...]:
        """The ``m`` branches' modules at path ``target``, as nodes of the fused graph."""

    def params(self, target: str, names: Sequence[str], buffers: Sequence[str] = ()) -> tuple[Any, ...] | None:
        """The fused form of the named parameters and buffers of module ``target``, from the parameter pack."""

    def module_forward(self, path: str, x: Any) -> fx.Node:
        """``module.forward(x)`` for the module at ``path`` of the fused graph's root."""

    def replicate(self, node: fx.Node) -> Val:
        """Run the node once per branch on the per-branch (list) parts of its inputs: a list value."""

    def apply_module(self, target: str, mod: nn.Module, v: Val) -> Val:
        """Module ``target`` (``mod``, branch 0's) on ``v``, by its rule."""

    def data_input(self, node: fx.Node) -> fx.Node:
        """The first argument as a fused value, the others being shared."""
