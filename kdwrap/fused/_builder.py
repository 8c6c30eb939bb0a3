"""The graph transformation: one pass over a branch's fx graph that gives every value a layout (see docs/fused.md)
and emits the fused graph, asking the rule registries (:mod:`.modules`, :mod:`.ops`) what each module and op
becomes. The builder itself only does the value plumbing: layouts, conversions, per-branch replication, the
parameter pack and errors that name the node.
"""
from __future__ import annotations

import operator
from typing import Any, Sequence

from torch import Tensor, fx, nn

from ..errors import FusionError
from ._catalog import (
    RANDOM_FACTORIES, describe_node, get_by_path, is_inplace_call, is_random_call, is_shape_query, nearby_module,
)
from ._layers import split_fused, split_stacked, write_back_bn_stats, zip_branches
from ._layout import (
    FUSED, LIST, SHARED, STACKED, Val, list_to_fused, new_fused, pack_parameters, shared_to_fused, stacked_to_fused,
)
from .modules import find_module_rule
from .ops import fail_without_rule, find_op_rule

__all__ = ["Builder"]


class Builder:
    """Builds the fused graph of ``m`` branches from the tail's graph (:meth:`build`). It is the
    :class:`._rule_builder.RuleBuilder` that the rules of :mod:`.modules` and :mod:`.ops` are given."""

    def __init__(self, branches: Sequence[nn.Module], graph: fx.Graph, training: bool, conv_mode: str,
                 per_branch_input: bool = False) -> None:
        self.branches, self.src, self.training, self.conv_mode = list(branches), graph, training, conv_mode
        self.per_branch_input = per_branch_input
        self.m = len(branches)
        self.g = fx.Graph()
        self.env: dict[fx.Node, Val] = {}
        self.fused_copies: dict[fx.Node, fx.Node] = {}
        self.module_refs: dict[str, tuple[fx.Node, ...]] = {}
        self.pending: list[fx.Node] = []
        # The parameter pack (see pack_parameters): one node near the top of the graph, its groups filled in by
        # params().
        # Group key -> (its entries: m tensor refs each, the node picking the group's output); in pack order.
        self.pack: fx.Node | None = None
        self.pack_groups: dict[tuple[Any, ...], tuple[list[tuple[fx.Node, ...]], fx.Node]] = {}
        self.acts: set[fx.Node] = set()  # shared nodes holding activations (not parameters, constants or shapes)
        self.node: fx.Node | None = None
        self.uses: dict[str, int] = {}
        for n in graph.nodes:
            if n.op == "call_module":
                self.uses[n.target] = self.uses.get(n.target, 0) + 1

    # -- errors ------------------------------------------------------------------------------------------------
    def fail(self, reason: str) -> None:
        n = self.node
        where = f"node '{n.name}' ({describe_node(n)}{nearby_module(n)})" if n is not None else "the tail"
        raise FusionError(
            f"cannot fuse the {self.m} branches ({'train' if self.training else 'eval'} graph): {where}: {reason}"
        )

    # -- value plumbing ----------------------------------------------------------------------------------------
    def val(self, a: Any) -> Val:
        if isinstance(a, fx.Node):
            return self.env[a]
        return Val(SHARED, self.shared(a, "an element of this argument"))  # constants, or containers of shared nodes

    def shared(self, a: Any, what: str = "this argument") -> Any:
        """``a`` with every node replaced by its (shared) new node; fails on per-branch values."""

        def f(n: fx.Node) -> fx.Node:
            v = self.env[n]
            if v.kind != SHARED:
                self.fail(f"{what} depends on the branch ({v.kind} value '{n.name}'); no rule for that")
            return v.ref

        return fx.map_arg(a, f)

    def kinds_in(self, args: Any, kwargs: Any) -> set[str]:
        out: set[str] = set()
        fx.map_arg((args, kwargs), lambda n: out.add(self.env[n].kind))
        return out

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> fx.Node:
        return self.g.call_function(fn, args, kwargs)

    def fused(self, v: Val) -> fx.Node:
        """The value laid out fused (converting shared, stacked and list values)."""
        if v.kind == FUSED:
            return v.ref
        if v.kind == SHARED:
            if not isinstance(v.ref, fx.Node):
                self.fail(f"constant {v.ref!r} used where a per-branch tensor is needed")
            if v.ref not in self.fused_copies:
                self.fused_copies[v.ref] = self.call(shared_to_fused, v.ref, self.m)
            return self.fused_copies[v.ref]
        if v.kind == STACKED:
            return self.call(stacked_to_fused, v.ref)
        return self.call(list_to_fused, v.ref)

    def as_list(self, v: Val, what: str) -> Any:
        """A per-branch operand (weights, statistics) as a tuple of m refs."""
        if v.kind == LIST:
            return v.ref
        if v.kind == SHARED:
            return None if v.ref is None else (v.ref,) * self.m
        self.fail(f"{what} is computed from the branch activations ({v.kind}); weights must be parameters")

    def modules(self, target: str) -> tuple[fx.Node, ...]:
        if target not in self.module_refs:
            self.module_refs[target] = tuple(self.g.get_attr(f"branches.{i}.{target}") for i in range(self.m))
        return self.module_refs[target]

    def params(self, target: str, names: Sequence[str], buffers: Sequence[str] = ()) -> tuple[Any, ...] | None:
        """The fused form of the named parameters and buffers of module ``target``, taken from the parameter pack
        (None for an attribute that is None); None when the module has a parameter the pack cannot hold."""
        mod = self.branches[0].get_submodule(target)
        if self.uses.get(target, 0) != 1:  # a second call may have to see the statistics the first one wrote
            return None
        tensors = [getattr(mod, k, None) for k in names]
        if any(t is not None and (not isinstance(t, Tensor) or t.ndim < 1) for t in tensors):
            return None
        if self.pack is None:
            self.pack = self.call(pack_parameters, ())
        if target not in self.module_refs:  # looked up once, before the pack, and shared with the rule's node
            with self.g.inserting_before(self.pack):
                self.modules(target)
        out = []
        for k, t in zip(names, tensors):
            if t is None:
                out.append(None)
                continue
            key = (k in buffers, t.dtype, t.device, tuple(t.shape[1:]))
            if key not in self.pack_groups:
                self.pack_groups[key] = ([], self.call(operator.getitem, self.pack, len(self.pack_groups)))
            entries, group = self.pack_groups[key]
            with self.g.inserting_before(self.pack):
                entries.append(tuple(self.call(getattr, mod_ref, k) for mod_ref in self.modules(target)))
            # (each module is called once, see above: an attribute is requested once)
            out.append(self.call(operator.getitem, group, len(entries) - 1))
        return tuple(out)

    def module_forward(self, path: str, x: Any) -> fx.Node:
        """``module.forward(x)`` (no hooks can be registered, see _check_hooks; skips ``__call__``'s overhead)."""
        return self.g.call_method("forward", (self.g.get_attr(path), x))

    def replicate_one(self, node: fx.Node, i: int) -> fx.Node:
        def pick(n: fx.Node) -> Any:
            v = self.env[n]
            return v.ref[i] if v.kind == LIST else v.ref

        return self.g.create_node(node.op, node.target, fx.map_arg(node.args, pick), fx.map_arg(node.kwargs, pick))

    def replicate(self, node: fx.Node) -> Val:
        """Run the node once per branch on the per-branch (list) parts of its inputs: a list value."""
        outs = []
        for i in range(self.m):

            def pick(n: fx.Node, i: int = i) -> Any:
                v = self.env[n]
                if v.kind == LIST:
                    return v.ref[i]
                if v.kind == SHARED:
                    return v.ref
                self.fail(f"internal: {v.kind} input in a per-branch computation")

            args = fx.map_arg(node.args, pick)
            kwargs = fx.map_arg(node.kwargs, pick)
            outs.append(self.g.create_node(node.op, node.target, args, kwargs))
        return Val(LIST, tuple(outs))

    def copy_shared(self, node: fx.Node) -> Val:
        new = self.g.create_node(node.op, node.target, self.shared(node.args), self.shared(node.kwargs))
        if not is_shape_query(node) and self.has_act(node):
            self.acts.add(new)
        return Val(SHARED, new)

    def has_act(self, node: fx.Node) -> bool:
        found = []

        def visit(n: fx.Node) -> fx.Node:
            found.append(self.env[n].kind == SHARED and self.env[n].ref in self.acts)
            return n

        fx.map_arg((node.args, node.kwargs), visit)
        return any(found)

    # -- driver ------------------------------------------------------------------------------------------------
    def build(self) -> fx.Graph:
        out_node = None
        first_input = True
        for node in self.src.nodes:
            self.node = node
            if node.op == "placeholder":
                # The data input: one value for every branch, or (per_branch_input) the branches' own inputs
                # concatenated along axis 1, which is the fused layout by definition. Other inputs are shared.
                kind = FUSED if first_input and self.per_branch_input else SHARED
                first_input = False
                self.env[node] = Val(kind, self.g.node_copy(node))
                if kind == SHARED:
                    self.acts.add(self.env[node].ref)
            elif node.op == "get_attr":
                self.env[node] = self.get_attr(node)
            elif node.op == "call_module":
                self.env[node] = self.call_module(node)
            elif node.op in ("call_function", "call_method"):
                self.env[node] = self.call_op(node)
            elif node.op == "output":
                out_node = node
        self.node = out_node
        returned = out_node.args[0] if out_node is not None else None
        # A tensor, or a tuple of tensors (a tail that also returns its classifier's input: OKDDip's, PCL's peers).
        values = returned if isinstance(returned, tuple) else (returned,)
        if not values or not all(isinstance(r, fx.Node) for r in values):
            self.fail("the tail must return a tensor or a tuple of tensors")
        if self.pack is not None:
            self.pack.args = (tuple(tuple(entries) for entries, _ in self.pack_groups.values()),)
        if self.pending:
            self.call(write_back_bn_stats, tuple(self.pending))
        per_branch = [self.per_branch_outputs(self.env[r]) for r in values]
        res = per_branch[0] if not isinstance(returned, tuple) else self.call(zip_branches, tuple(per_branch))
        self.g.output(res)
        self.g.lint()
        return self.g

    def per_branch_outputs(self, v: Val) -> fx.Node:
        """A node holding the list of the ``m`` branches' values of ``v``."""
        if v.kind == FUSED:
            return self.call(split_fused, v.ref, self.m)
        if v.kind == STACKED:
            return self.call(split_stacked, v.ref)
        if v.kind == LIST:
            return self.call(list, v.ref)
        return self.call(list, (v.ref,) * self.m)

    # -- get_attr ----------------------------------------------------------------------------------------------
    def get_attr(self, node: fx.Node) -> Val:
        objs = [get_by_path(b, node.target) for b in self.branches]
        if all(o is objs[0] for o in objs) or not isinstance(objs[0], Tensor):
            return Val(SHARED, self.g.get_attr(f"branches.0.{node.target}"))
        if node.target.rsplit(".", 1)[-1].startswith("_tensor_constant"):  # a constant baked in by tracing
            return Val(SHARED, self.g.get_attr(f"branches.0.{node.target}"))
        return Val(LIST, tuple(self.g.get_attr(f"branches.{i}.{node.target}") for i in range(self.m)))

    # -- modules -----------------------------------------------------------------------------------------------
    def call_module(self, node: fx.Node) -> Val:
        target = node.target
        mod = self.branches[0].get_submodule(target)
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            self.fail(f"{type(mod).__name__} called with other than one tensor input; no rule for that")
        v = self.val(node.args[0])
        out = self.apply_module(target, mod, v)
        if out.kind == SHARED and v.kind == SHARED and v.ref in self.acts:
            self.acts.add(out.ref)
        return out

    def apply_module(self, target: str, mod: nn.Module, v: Val) -> Val:
        rule = find_module_rule(mod)
        if rule is None:
            self.fail(
                f"{type(mod).__name__} has no fusion rule (supported: convolutions, batch/group norm, Linear, "
                "activations, dropout, pooling, flatten; kdwrap.fused.register_module_rule adds one for a module "
                "of your own)"
            )
        if v.kind == LIST and not rule.per_branch_params:  # computed from parameters only: once per branch
            return Val(LIST, tuple(self.module_forward(f"branches.{i}.{target}", v.ref[i]) for i in range(self.m)))
        return rule.apply(self, target, mod, v)

    # -- functions and methods ---------------------------------------------------------------------------------
    def call_op(self, node: fx.Node) -> Val:
        kinds = self.kinds_in(node.args, node.kwargs)
        is_method = node.op == "call_method"
        target = node.target
        inplace = is_inplace_call(node)
        first = node.args[0] if node.args else None
        first_kind = self.env[first].kind if isinstance(first, fx.Node) else SHARED
        random = is_random_call(node)

        if not is_method and target in RANDOM_FACTORIES:
            self.fail("a random tensor created from scratch cannot be drawn per branch; no rule for that")
        if kinds <= {SHARED} and is_method and target == "new_empty":  # uninitialised, filled (randomly?) per branch
            return Val(FUSED, self.call(new_fused, self.env[first].ref, self.m, target, *self.shared(node.args[1:]),
                                        **self.shared(node.kwargs)))
        if kinds <= {SHARED}:
            if inplace and isinstance(first, fx.Node):
                self.fail("in-place op on a value shared by every branch (each branch would apply it again)")
            if random:
                if not isinstance(first, fx.Node):
                    self.fail("random op with no tensor input")
                return self.with_first(node, Val(FUSED, self.fused(self.env[first])), FUSED)
            return self.copy_shared(node)
        if inplace and first_kind == SHARED:
            self.fail("in-place op on a value shared by every branch, with a per-branch operand")
        rule = find_op_rule(node)
        if rule is not None and rule.takes_params and first_kind != LIST:
            return rule.apply(self, node)
        if is_shape_query(node) and first_kind == LIST:  # shapes of per-branch parameters agree: branch 0's
            return Val(SHARED, self.replicate_one(node, 0))
        if FUSED not in kinds and STACKED not in kinds and not self.has_act(node):
            return self.replicate(node)  # parameters and constants only: compute per branch
        # From here on: a fused or stacked input, or a shared activation meeting per-branch parameters.
        if rule is None:
            fail_without_rule(self, node)
        return rule.apply(self, node)

    def with_first(self, node: fx.Node, first: Val, kind: str) -> Val:
        """Copy ``node`` with its first argument replaced (its other arguments must be shared)."""
        args = (first.ref, *self.shared(node.args[1:]))
        return Val(kind, self.g.create_node(node.op, node.target, args, self.shared(node.kwargs)))

    def data_input(self, node: fx.Node) -> fx.Node:
        """The first argument as a fused value, the others being shared."""
        return self.fused(self.val(node.args[0]))
