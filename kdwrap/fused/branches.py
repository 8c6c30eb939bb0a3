"""The public object: :func:`fuse_branches` checks that the branches can share one graph and builds it;
:class:`FusedBranches` runs it.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, fx, nn

from ..errors import FusionError
from ._builder import Builder
from ._catalog import get_by_path

# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------


def _tail_graph(branch: nn.Module, training: bool) -> fx.Graph:
    name = "train_graph" if training else "eval_graph"
    graph = getattr(branch, name, None)
    if isinstance(graph, fx.Graph):
        return graph
    if isinstance(branch, fx.GraphModule):
        return branch.graph
    raise FusionError(
        f"cannot fuse a {type(branch).__name__}: fusion needs fx GraphModules (kdwrap's tails), got no fx graph"
    )


def _check_hooks(branches: Sequence[nn.Module]) -> None:
    from torch.nn.modules import module as module_mod

    globals_ = [
        getattr(module_mod, n, None) for n in (
            "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
            "_global_backward_pre_hooks",
        )
    ]
    if any(g for g in globals_):
        raise FusionError("cannot fuse the branches: global module hooks are registered; fused execution would "
                          "not call them")
    for i, b in enumerate(branches):
        for path, mod in b.named_modules():
            hooks = [
                n for n in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
                if getattr(mod, n, None)
            ]
            if hooks:
                raise FusionError(
                    f"cannot fuse the branches: module '{path or '<tail>'}' of branch {i} has hooks "
                    f"({', '.join(h.strip('_') for h in hooks)}) that fused execution would bypass"
                )


def _check_same_structure(branches: Sequence[nn.Module], graphs: Sequence[fx.Graph]) -> None:
    ref = str(graphs[0])
    for i, g in enumerate(graphs[1:], 1):
        if str(g) != ref:
            raise FusionError(f"cannot fuse the branches: branch {i} has a different graph from branch 0")
    for node in graphs[0].nodes:
        if node.op not in ("call_module", "get_attr"):
            continue
        objs = []
        for i, b in enumerate(branches):
            try:
                objs.append(get_by_path(b, node.target))
            except AttributeError:
                raise FusionError(f"cannot fuse the branches: branch {i} has no '{node.target}'") from None
        t0 = type(objs[0])
        for i, o in enumerate(objs[1:], 1):
            if type(o) is not t0 or (isinstance(o, Tensor) and o.shape != objs[0].shape):
                raise FusionError(
                    f"cannot fuse the branches: '{node.target}' differs between branch 0 and branch {i}"
                )
            if isinstance(o, nn.Module) and o.extra_repr() != objs[0].extra_repr():
                raise FusionError(
                    f"cannot fuse the branches: module '{node.target}' is configured differently in branch {i} "
                    f"({o.extra_repr()} vs {objs[0].extra_repr()})"
                )


class FusedBranches:
    """The ``m`` branches run as one fused graph. Call it like the list of branches: ``fused(f, **extra)`` returns
    ``[b(f, **extra) for b in branches]`` (same values and gradients, to float tolerance). Built with
    ``per_branch_input``, each branch reads its own input: ``fused(torch.cat(fs, 1))`` returns
    ``[b(f_i) for b, f_i in zip(branches, fs)]`` (:meth:`inputs` makes that concatenation). A tail that returns a
    tuple (a classifier's input besides the logits) gives a tuple per branch.

    Not an ``nn.Module`` and owns no parameters: the generated graph (``graph_module``) reads the branch modules'
    current parameters, buffers and ``training`` flags at every call, so it stays valid after ``.to(device)``,
    ``.to(memory_format=...)``, ``load_state_dict`` (also ``assign=True``), optimizer steps, DDP wrapping and
    ``SyncBatchNorm`` conversion (module objects are looked up by path at each call, so swapped modules are picked
    up). Build it again after changing the branches' structure or their graphs, or after registering hooks on
    them. Deep copies and pickles rebuild it for the copied branches (copy it together with them: a shallow
    replica, as ``nn.DataParallel`` makes, would still point at the original branches).

    Use the FusedBranches built for the mode the branches are in (``training`` picks the traced graph; BN, dropout
    and drop-path read the modules' own flags). Keep it out of the module tree (``graph_module`` holds the branch
    modules, so registering it would duplicate their parameters). Build it outside ``torch.compile``d code; calling
    it inside compiled code is graph-break free.
    """

    def __init__(self, branches: Sequence[nn.Module], training: bool, graph: fx.Graph, conv_mode: str,
                 per_branch_input: bool = False) -> None:
        self.branches = tuple(branches)
        self.training = bool(training)
        self.conv_mode = conv_mode
        self.per_branch_input = bool(per_branch_input)
        self.graph = graph
        root = nn.Module()
        root.branches = nn.ModuleList(self.branches)
        gm = fx.GraphModule(root, graph, class_name="FusedTail")
        gm.branches = root.branches  # live modules (GraphModule copied a skeleton of the referenced paths)
        self.graph_module = gm
        self._forward = gm.forward

    @property
    def num_branches(self) -> int:
        return len(self.branches)

    @property
    def code(self) -> str:
        """The generated Python code of the fused graph."""
        return self.graph_module.code

    def __call__(self, f: Tensor, **extra: Any) -> list[Any]:
        return self._forward(f, **extra)

    def inputs(self, fs: Sequence[Tensor]) -> Tensor:
        """The branches' own inputs (one each) as the fused graph built with ``per_branch_input`` reads them:
        concatenated along axis 1, branch-major."""
        if len(fs) != self.num_branches:
            raise ValueError(f"{self.num_branches} branches need {self.num_branches} inputs, got {len(fs)}")
        if any(not isinstance(f, Tensor) or f.ndim < 2 for f in fs):
            raise FusionError("the branches' own inputs must be tensors of at least 2 axes (batch first) to be "
                              "laid out per branch along axis 1")
        return torch.cat(list(fs), 1)

    def check(self, f: Tensor, **extra: Any) -> None:
        """Run the fused graph and branch 0 once on fake tensors (no computation), raising the
        :class:`FusionError` that a shape-dependent rule would raise at the first real call, or if the output
        shapes differ from the branch's. Buffers are restored afterwards (only version counters change)."""
        from torch._subclasses.fake_tensor import FakeTensorMode

        saved = [(t, t.detach().clone()) for b in self.branches for t in b.buffers()]
        try:
            with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
                outs = self._forward(f, **extra)
                ref = self.branches[0](f.chunk(self.num_branches, 1)[0] if self.per_branch_input else f, **extra)
                shapes = [_shapes(o) for o in outs]
                ref_shape = _shapes(ref)
        finally:
            with torch.no_grad():
                for t, v in saved:
                    t.copy_(v)
        for i, shape in enumerate(shapes):
            if shape != ref_shape:
                raise FusionError(f"fused branch {i} returns shape {shape}, the branch returns {ref_shape}")

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return fuse_branches, (list(self.branches), self.training, self.conv_mode, self.per_branch_input)

    def __repr__(self) -> str:
        return (
            f"FusedBranches(branches={self.num_branches}, mode={'train' if self.training else 'eval'}, "
            f"conv_mode={self.conv_mode!r})"
        )


def _shapes(out: Any) -> Any:
    """The shape of a returned tensor, or the shapes of a returned tuple."""
    if isinstance(out, tuple):
        return tuple(_shapes(o) for o in out)
    return tuple(out.shape) if isinstance(out, Tensor) else None


def fuse_branches(branches: Sequence[nn.Module], training: bool, conv_mode: str = "auto",
                  per_branch_input: bool = False) -> FusedBranches:
    """Fuse structurally identical fx tails (ONE's ``model.branches``) into one graph for the given mode.

    ``training`` picks the graph (``train_graph`` or ``eval_graph`` of a ``DualGraphModule``; a plain
    ``GraphModule``'s ``.graph`` either way); it must match the mode the branches run in. ``conv_mode`` says how a
    convolution on a fused input runs: ``"grouped"``: one conv with ``groups * m`` (fewest kernels: GPUs);
    ``"split"``: ``m`` dense convs on the channel slices, outputs concatenated (for backends whose grouped
    convolutions are slow, such as oneDNN on CPU); ``"auto"`` (default): ``"split"`` for CPU tensors,
    ``"grouped"`` otherwise, decided at each call from the input's device. Convs on the shared trunk output with
    ``groups == 1`` and depthwise convs are always one conv. ``per_branch_input``: each branch reads its own input
    (PCL's peers, each on the trunk's output for its own view), given concatenated along axis 1 (the fused layout,
    :meth:`FusedBranches.inputs`), instead of one input shared by all.

    Raises :class:`FusionError` naming the node and op when a rule is missing (see docs/fused.md); the
    caller then runs the branches one after the other.
    """
    if conv_mode not in ("auto", "grouped", "split"):
        raise ValueError(f"conv_mode must be 'auto', 'grouped' or 'split', got {conv_mode!r}")
    branches = list(branches)
    if not branches:
        raise ValueError("fuse_branches needs at least one branch")
    graphs = [_tail_graph(b, training) for b in branches]
    _check_same_structure(branches, graphs)
    _check_hooks(branches)
    graph = Builder(branches, graphs[0], bool(training), conv_mode, bool(per_branch_input)).build()
    return FusedBranches(branches, training, graph, conv_mode, per_branch_input)
