"""Fused execution of replicated tails (ONE's, OKDDip's, PCL's): the ``m`` tails run as one ``m``-times wider tail.

:func:`fuse_branches` rewrites the fx graph of a tail (``train_graph`` or ``eval_graph`` of the torchvision
``DualGraphModule`` that :mod:`kdwrap.graph` builds, or ``.graph`` of a plain ``GraphModule``) into one graph that
computes every branch at once, with fewer and larger kernels. It is a graph transformation driven by per-op rules,
not code written per architecture. Nothing is copied: each call reads the branches' *current* parameters and buffers
and concatenates them (``torch.cat`` is differentiable, so each branch's own parameters get their own gradients);
state_dict, optimizer, DDP and export keep seeing the branch modules only. The concatenation happens once, at the
top of the graph, one ``torch.cat`` per group of same-shaped tensors (:func:`_pack`), because a small tail's step on
a GPU is bound by kernel launches: a CIFAR ResNet tail concatenates in 8 kernels (forward and backward) instead of 46.

Layout. Every value of the tail graph gets one of four kinds:

* ``shared``: identical for every branch (the trunk output, extra inputs, constants, shapes, anything computed from
  shared values only). Computed once. (Built with ``per_branch_input``, the tail's data input is ``fused`` instead:
  each branch's own input, concatenated along axis 1, as PCL's peers read the trunk's output on their own views.)
* ``fused``: the ``m`` per-branch values concatenated along **axis 1**, branch-major: a per-branch ``(B, C, ...)``
  tensor becomes ``(B, m*C, ...)`` whose channels ``[i*C, (i+1)*C)`` belong to branch ``i``. Axis 0 (batch) and the
  axes after 1 keep their per-branch meaning; this holds for NCHW maps and for ``(B, D)`` vectors alike.
* ``stacked``: ``(m, B, ...)``, the branches on a new leading axis: what the per-branch batched matmul of a
  ``Linear`` produces (classifier logits stay in this form up to the output, where they are unbound for free).
* ``list``: a tuple of ``m`` separately computed per-branch values (parameters, buffers and what is computed from
  them alone, e.g. a weight standardisation); concatenated when they meet a fused value.

Rules (``S`` shared, ``F`` fused; an ``S`` input is repeated ``m`` times along axis 1 where a rule needs ``F``):

* ``Conv1d/2d/3d`` (and ``F.conv*d``, timm ``Conv2dSame``): weights concatenated along out-channels. ``S`` input
  with ``groups == 1``: one dense conv, groups unchanged; ``F`` input (or grouped conv on ``S``): ``groups * m``
  (``conv_mode="grouped"``), or ``m`` dense convs on the channel slices, concatenated (``"split"``; ``"auto"`` picks
  it on CPU, where oneDNN's grouped-conv backward is slower than dense ones). Output ``F``.
* ``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, timm ``BatchNormAct2d``/``SyncBatchNormAct``/``FrozenBatchNormAct2d``,
  torchvision ``FrozenBatchNorm2d``, ``F.batch_norm``: per-channel, so weights, biases and running statistics are
  concatenated over ``m*C``. In training the updated statistics are copied back into each branch's buffers (one
  ``_foreach_copy_`` for the whole tail, after the last layer) and ``num_batches_tracked`` is incremented; both
  ``momentum`` (exponential) and ``momentum=None`` (cumulative average, computed without a host sync) and
  ``track_running_stats=False`` behave as in the modules. ``GroupNorm``/``F.group_norm``: ``num_groups * m``.
* Elementwise ops (activations, arithmetic, comparisons, ``where``, casts...): ``F`` op ``F`` of equal width and
  ``F`` op scalar run directly; otherwise (an identity shortcut ``x + f`` with ``f`` shared, a per-branch operand
  of another width such as a ``(B, 1, H, W)`` mask, a layer-scale parameter) the fused operands are viewed as
  ``(B, m, C, ...)``, the shared ones broadcast over ``m`` with no copy, the per-branch ones stacked on ``m``.
* Pooling (adaptive/avg/max/lp, timm ``*Pool2dSame``), interpolation, ``mean/sum/amax/...`` and ``softmax`` over
  axes >= 2, ``flatten(start_dim >= 1)``, ``view/reshape`` that keep the batch axis (``x.view(x.size(0), -1)``),
  ``squeeze/unsqueeze/transpose/permute`` that keep axes 0 and 1, indexing that keeps axes 0 and 1 whole
  (``x[:, :, ::2, ::2]``), ``F.pad`` (also of the channel axis: option-A shortcuts), ``x.shape``/``x.size()`` (they
  answer the per-branch shape), ``new_empty/new_zeros/...``: as their per-branch meaning requires.
* ``Linear``/``F.linear``: on a shared input one matmul with concatenated weights (output fused); on a fused
  ``(B, m*D)`` or stacked input a per-branch batched matmul (``torch.baddbmm``) with stacked weights, output
  stacked. Any number of leading axes.
* Parameter-only computations (weight standardisation, ``gamma.view(1, -1, 1, 1)``) run per branch (list values).
* The branches' outputs are returned as views of the fused/stacked result (``chunk``/``unbind``); a tail that
  returns a tuple (OKDDip's and PCL's: the logits and the classifier's input) gives one tuple per branch.
* Squeeze-excitation (pool, conv 1x1, act, conv 1x1, sigmoid, mul) follows from the rules above.

Stochastic ops. Dropout (any variant) and ``RReLU`` on a fused value draw an independent mask per element, hence
per branch: the same distribution as sequential execution, not the same random numbers. Drop-path / stochastic
depth (timm's traced ``drop_path``, torchvision's ``stochastic_depth``) draws one mask per sample *and branch*
(``new_empty`` of a per-branch shape ``(B, 1, 1, 1)`` becomes ``(B, m, 1, 1)``), as sequential execution does. A
random op applied to a shared value is applied to its ``m`` copies. Exact equality with sequential execution is
therefore only testable with ``p = 0`` or in eval mode.

Everything else raises :class:`FusionError` naming the node and the op: channel concatenation (DenseNet, GhostNet,
ShuffleNet, DLA), splits (Res2Net, CSP, MixNet), layer norm (ConvNeXt, Swin, ViT), attention and matmuls of
activations, permutes/reshapes that move the batch or branch axis, unknown modules (a custom leaf module until a
rule is registered for it) and unknown functions with per-branch inputs, transposed convolutions, random tensors
created from scratch, in-place ops on shared values, and modules with hooks (the fused graph would bypass them).
Functions with only shared inputs are computed once (assumed deterministic unless known to be random). A few checks
need shapes (a reshape that mixes the batch axis, a pooling of an unbatched input, a broadcast that would move the
branch axis): they raise :class:`FusionError` at the first call; :meth:`FusedBranches.check` runs them ahead of
time on fake tensors.

Where the rules live. :mod:`.modules` keeps the rules for modules in a registry keyed by class
(:func:`register_module_rule` adds one for a module of your own, e.g. a custom activation), :mod:`.ops` those for
functions and tensor methods keyed by a normalised op name (``torch.flatten`` and ``Tensor.flatten`` share one).
:mod:`._builder` walks the graph and asks them; :mod:`._layout` and :mod:`._layers` are the helpers the generated graph
calls at run time; :mod:`._catalog` says what each torch op does to a layout (elementwise, random, along a dim...).
:mod:`.planner` decides, for ONE's ``execution`` option, whether a training forward runs the branches fused or one
after the other (``"auto"``: the faster of the two, timed).
Modules named with a leading underscore are internal (their contents may change between versions); the public names
are the ones this package exports.
"""
from ..errors import FusionError
from .branches import FusedBranches, fuse_branches
from .modules import ModuleRule, register_module_rule

__all__ = ["FusionError", "FusedBranches", "ModuleRule", "fuse_branches", "register_module_rule"]
