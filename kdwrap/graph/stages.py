"""The stages of a model, found by one rule, and what is read off them: the default split of ONE and OKDDip (the start
of the last stage), BYOT's exits (at the starts of the stages after the first) and the cuts a summary considers.

The rule reads the stages in the first of three ways that applies:

1. Containers of downsampling stages: walk down the containers (the model itself, ``nn.Sequential``,
   ``nn.ModuleList``, ``nn.ModuleDict``) following the last child that downsamples (a stride > 1 or a patch merging)
   while a container holds several downsampling children; those children of the container where the walk stops are
   the stages (ResNet ``layer1``..``layer4``, ConvNeXt/Swin/EfficientNet/RegNet ``stages.*``).
2. A stack of identical blocks, for models that downsample once (ViT, DeiT): the longest ``nn.Sequential`` or
   ``nn.ModuleList`` of 4 or more children of one class; its quarters are the stages.
3. The graph, for models whose downsampling is not a module (``F.max_pool2d`` in ``forward``): a trial forward
   gives every value's shape and a stage starts where a map shrinks (:func:`graph_stage_starts`).

:class:`Stages` holds the three readings, each computed once and only when asked (the graph's needs a trial
forward); the split (:meth:`Stages.split`) and the exits (:meth:`Stages.starts`) are both read off it. Where the two
are not the same cut, the difference is the rule's: the split may start at a downsampling child that is no stage (a
lone pooling, AlexNet's ``features.12``), which the exits skip, and in a stack of ``n`` blocks the split is block
``n - n // 4`` while the last exit is block ``3 * n // 4`` (the same when ``n`` is a multiple of 4).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import fx, nn

from ..errors import SplitError
from .cut import cut_graph
from .inputs import example_input, trial_mode
from .tracing import Traced, module_order, trace

__all__ = ["SplitChoice", "Stages", "auto_split", "given_split", "stage_starts", "graph_stage_starts", "is_stage",
           "downsamples"]

# A node downsamples when its output map has at most this share of the positions of its largest input map: a 2x2
# pooling or a stride-2 convolution (0.25), not a valid 5x5 convolution (32x32 -> 28x28 keeps 0.77).
_DOWNSAMPLED_SHARE = 0.5
# The ops that can downsample a map: convolutions and poolings, as modules or as functions (``F.max_pool2d``,
# ``torch.conv2d``). Reshapes (attention heads, patch flattening) change shapes without downsampling.
_DOWNSAMPLING_MODULES = (nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
                         nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)
_DOWNSAMPLING_NAMES = ("pool", "conv")

# The smallest stack of identical blocks that the rule reads as a model's stages.
_MIN_BLOCKS = 4


@dataclass
class SplitChoice:
    """The module that starts the tail, the rule that chose it (a sentence), whether kdwrap chose it, and the cuts
    the rule considered (module names; the chosen one among them)."""

    split: str
    rule: str
    automatic: bool = True
    considered: list[str] = field(default_factory=list)


def downsamples(module: nn.Module) -> bool:
    """Whether a module holds a layer that downsamples: a stride > 1, or a patch merging (Swin's halves the
    resolution without a stride)."""
    for m in module.modules():
        stride = getattr(m, "stride", None)
        if stride is not None:
            strides = stride if isinstance(stride, (tuple, list)) else (stride,)
            if any(isinstance(s, int) and s > 1 for s in strides):
                return True
        if "Merging" in type(m).__name__:
            return True
    return False


def is_stage(module: nn.Module) -> bool:
    """A stage holds layers: a module with children and parameters (not a bare convolution or pooling)."""
    return any(True for _ in module.children()) and any(True for _ in module.parameters())


class Stages:
    """The stages of ``net`` read off its eval-mode graph ``traced`` by the rule of this module.

    ``input_size`` is the input of the trial forward that the graph's reading needs (default: the model's own)."""

    def __init__(self, net: nn.Module, traced: Traced, input_size: Sequence[int] | None = None) -> None:
        self.net, self.traced, self.input_size = net, traced, input_size
        self.order = module_order(traced)  # module path -> index of its first node

    def children(self, path: str) -> list[str]:
        """The children of module ``path`` that own nodes of the graph, in execution order."""
        mod = self.net.get_submodule(path) if path else self.net
        names = [f"{path}.{n}" if path else n for n, _ in mod.named_children()]
        return sorted((n for n in names if n in self.order), key=self.order.__getitem__)

    def siblings(self, name: str) -> list[str]:
        """Module ``name`` and the other children of its parent that own nodes, in execution order."""
        return self.children(name.rsplit(".", 1)[0] if "." in name else "")

    @functools.cached_property
    def containers(self) -> tuple[str, list[str]] | None:
        """The first reading: the container where the walk stops and its downsampling children, in execution
        order; ``None`` where no container holds several."""

        def walk(path: str) -> tuple[str, list[str]] | None:
            if path and not isinstance(self.net.get_submodule(path), (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
                return None
            downs = [c for c in self.children(path) if downsamples(self.net.get_submodule(c))]
            if not downs:
                return None
            if len(downs) == 1:  # a single multi-stage child such as torchvision's `features`
                return walk(downs[0])
            return walk(downs[-1]) or (path, downs)

        return walk("")

    @functools.cached_property
    def block_stack(self) -> tuple[str, int] | None:
        """The second reading: the path and length of the longest stack of identical blocks; ``None`` if there is
        none."""
        best: tuple[int, str] | None = None
        for path, mod in self.net.named_modules():
            if path in self.order and isinstance(mod, (nn.Sequential, nn.ModuleList)) and len(mod) >= _MIN_BLOCKS:
                if len({type(c) for c in mod}) == 1 and (best is None or len(mod) > best[0]):
                    best = (len(mod), path)
        return None if best is None else (best[1], best[0])

    def blocks(self) -> list[str]:
        """The blocks of :attr:`block_stack` (module names)."""
        path, _ = self.block_stack
        return [f"{path}.{name}" for name, _ in self.net.get_submodule(path).named_children()]

    @functools.cached_property
    def from_graph(self) -> list[str]:
        """The third reading: :func:`graph_stage_starts` (a trial forward)."""
        return graph_stage_starts(self.net, self.traced, self.input_size)

    def split(self) -> SplitChoice:
        """The default split: the start of the last stage (block ``n - n // 4`` of a stack of ``n``), with the
        rule's sentence and the cuts it considered (the other stages and the blocks of the chosen one)."""
        found = self.containers
        if found is not None and found[1][-1] != next(iter(self.order), None):
            parent, downs = found
            split = downs[-1]
            stages = [d for d in downs if d == split or is_stage(self.net.get_submodule(d))]
            where = f"'{parent}'" if parent else "the model"
            return SplitChoice(
                split, f"the start of the last resolution stage (the last of the downsampling children of {where})",
                considered=stages + self.children(split),
            )
        if self.block_stack is not None:
            (path, n), blocks = self.block_stack, self.blocks()
            return SplitChoice(
                blocks[n - n // 4], f"block n - n // 4 of the longest stack of identical blocks '{path}' ({n} blocks)",
                considered=blocks,
            )
        stages = self.from_graph
        if len(stages) >= 2:
            # The other stages and the modules beside the chosen one (a LeNet's conv1, fc1, ...).
            return SplitChoice(stages[-1], "the start of the last resolution stage read from the graph",
                               considered=stages + self.siblings(stages[-1]))
        raise SplitError(
            f"kdwrap could not choose a split for {type(self.net).__name__} automatically; pass split=<module name>, "
            f"the first module of the part to replicate, e.g. one of: {', '.join(self.children('')[-6:])}; or, "
            "if the model downsamples inside forward (F.max_pool2d), input_size=(C, H, W) of your inputs, from which "
            "kdwrap reads its resolution stages"
        )

    def starts(self, exits: int | None = None) -> list[str]:
        """The modules that start the stages after the first (their input is the end of a stage), the last
        ``exits`` of them (the deepest; default all): the downsampling children that are stages (have children and
        parameters) and do not start at the network's first node; else the stack's quarters (``blocks.3``,
        ``blocks.6``, ``blocks.9`` of 12); else the graph's stages after the first."""
        first = min(self.order.values(), default=0)
        found = self.containers
        starts = [s for s in (found[1] if found else [])
                  if is_stage(self.net.get_submodule(s)) and self.order[s] > first]
        if not starts and self.block_stack is not None:
            (path, n), net = self.block_stack, self.net
            names = [name for name, _ in net.get_submodule(path).named_children()]
            starts = [f"{path}.{names[n * q // 4]}" for q in (1, 2, 3)]
        if not starts:
            starts = self.from_graph[1:]
        if not starts:
            raise SplitError(
                f"kdwrap could not find the stages of {type(self.net).__name__} (no container of downsampling "
                "stages, no stack of 4 or more identical blocks); name the modules that start a stage with "
                "stages=[...]"
            )
        return starts if exits is None else starts[-exits:]


def auto_split(
    net: nn.Module, traced: Traced | None = None, input_size: Sequence[int] | None = None, *, explain: bool = False
) -> str | SplitChoice:
    """The default split: the start of the last resolution stage, or the last quarter of a transformer's blocks.

    Rule: walk down the containers (the model itself, ``nn.Sequential``/``nn.ModuleList``) following the last child
    that downsamples (a stride > 1 or a patch merging) while a container holds several downsampling children; the
    last such child starts the last stage (ResNet ``layer4``, CIFAR ResNet ``layer3``, ConvNeXt/Swin/EfficientNet
    /RegNet last stage). Models that downsample only once (ViT, DeiT) are split at block ``n - n // 4`` of their
    longest stack of identical blocks. Where neither applies (a hand-written LeNet whose downsampling is
    ``F.max_pool2d``), the start of the last of the resolution stages read from the graph
    (:func:`graph_stage_starts`, a trial forward at ``input_size``).

    Returns the module name; with ``explain=True`` a :class:`SplitChoice`: the name, the rule that chose it as a
    sentence, and the cuts that rule considered.
    """
    choice = Stages(net, traced or trace(net, training=False), input_size).split()
    return choice if explain else choice.split


def given_split(net: nn.Module, traced: Traced, split: str) -> SplitChoice:
    """A split the user named: the cuts considered are its siblings (``layer3`` -> ``layer1`` .. ``fc``)."""
    siblings = Stages(net, traced).siblings(split)
    return SplitChoice(split, f"given by the user (split={split!r})", automatic=False, considered=siblings)


def stage_starts(
    net: nn.Module, traced: Traced, exits: int | None = None, input_size: Sequence[int] | None = None
) -> list[str]:
    """The modules that start the network's stages after the first (their input is the end of a stage), the last
    ``exits`` of them: :meth:`Stages.starts`. ResNet: ``layer2``, ``layer3``, ``layer4``; ConvNeXt:
    ``stages.1``..``stages.3``; ViT: ``blocks.3``, ``blocks.6``, ``blocks.9`` of 12."""
    return Stages(net, traced, input_size).starts(exits)


class _Shapes(fx.Interpreter):
    """Runs the graph, keeping each tensor-valued node's shape (keyed by the traced graph's nodes)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}

    def run_node(self, n: fx.Node) -> object:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.shapes[n] = tuple(out.shape)
        return out


def _positions(shape: Sequence[int]) -> int | None:
    return int(torch.Size(shape[2:]).numel()) if len(shape) == 4 else None


def graph_stage_starts(net: nn.Module, traced: Traced, input_size: Sequence[int] | None = None) -> list[str]:
    """The resolution stages read from the graph itself, for networks whose downsampling is not a module (a
    hand-written LeNet's ``F.max_pool2d``): a trial forward gives every value's shape; a node whose output map keeps
    at most half the positions of its input map, through a convolution or a pooling, downsamples; each stage starts at the last module called once,
    with a valid cut at its start (one value crossing), between the previous downsampling node and its own. Returns
    every stage's start in order, the first stage's included (it may be the network's first module); ``[]`` when
    the network has no map that shrinks or the trial forward fails (pass ``input_size``)."""
    shapes = _Shapes(fx.GraphModule(net, traced.graph))
    try:
        with trial_mode(net):
            shapes.run(example_input(net, input_size))
    except Exception:  # no shapes, no rule: the caller's error asks for a split or an input size
        return []
    nodes = list(traced.graph.nodes)

    def shape(n: fx.Node) -> Sequence[int]:
        return shapes.shapes.get(n, ())

    def may_downsample(n: fx.Node) -> bool:
        if n.op == "call_module":
            return isinstance(net.get_submodule(n.target), _DOWNSAMPLING_MODULES)
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
        return n.op in ("call_function", "call_method") and any(k in name for k in _DOWNSAMPLING_NAMES)

    downs = []
    for i, n in enumerate(nodes):
        if not may_downsample(n):
            continue
        out = _positions(shape(n))
        ins = [p for a in n.all_input_nodes if (p := _positions(shape(a)))]
        if out and ins and out <= _DOWNSAMPLED_SHARE * max(ins):
            downs.append(i)
    starts: dict[int, str] = {}  # index of a module's first node -> its name, for modules called once
    counts: dict[str, int] = {}
    for i, n in enumerate(nodes):
        if n.op == "call_module":
            counts[n.target] = counts.get(n.target, 0) + 1
            starts.setdefault(i, n.target)
    result, previous = [], -1
    for d in downs:
        for i in sorted((i for i in starts if previous < i <= d), reverse=True):
            name = starts[i]
            if counts[name] != 1 or name in result:
                continue
            try:
                cut_graph(traced, name, single=True)
            except SplitError:
                if i == min(starts):
                    result.append(name)  # the first module: a stage start with no trunk before it
                    break
                continue
            result.append(name)
            break
        previous = d
    return result
