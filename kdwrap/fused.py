"""Fused execution of ONE's branches: the ``m`` replicated tails run as one ``m``-times wider tail.

:func:`fuse_branches` rewrites the fx graph of a tail (``train_graph`` or ``eval_graph`` of the torchvision
``DualGraphModule`` that :mod:`kdwrap.surgery` builds, or ``.graph`` of a plain ``GraphModule``) into one graph that
computes every branch at once, with fewer and larger kernels. It is a graph transformation driven by per-op rules,
not code written per architecture. Nothing is copied: each call reads the branches' *current* parameters and buffers
and concatenates them (``torch.cat`` is differentiable, so each branch's own parameters get their own gradients);
state_dict, optimizer, DDP and export keep seeing the branch modules only. The concatenation happens once, at the
top of the graph, one ``torch.cat`` per group of same-shaped tensors (:func:`_pack`), because a small tail's step on
a GPU is bound by kernel launches: a CIFAR ResNet tail concatenates in 8 kernels (forward and backward) instead of 46.

Layout. Every value of the tail graph gets one of four kinds:

* ``shared``: identical for every branch (the trunk output, extra inputs, constants, shapes, anything computed from
  shared values only). Computed once.
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
* The branches' outputs are returned as views of the fused/stacked result (``chunk``/``unbind``).
* Squeeze-excitation (pool, conv 1x1, act, conv 1x1, sigmoid, mul) follows from the rules above.

Stochastic ops. Dropout (any variant) and ``RReLU`` on a fused value draw an independent mask per element, hence
per branch: the same distribution as sequential execution, not the same random numbers. Drop-path / stochastic
depth (timm's traced ``drop_path``, torchvision's ``stochastic_depth``) draws one mask per sample *and branch*
(``new_empty`` of a per-branch shape ``(B, 1, 1, 1)`` becomes ``(B, m, 1, 1)``), as sequential execution does. A
random op applied to a shared value is applied to its ``m`` copies. Exact equality with sequential execution is
therefore only testable with ``p = 0`` or in eval mode.

Everything else raises :class:`FusionError` naming the node and the op: channel concatenation (DenseNet, GhostNet,
ShuffleNet, DLA), splits (Res2Net, CSP, MixNet), layer norm (ConvNeXt, Swin, ViT), attention and matmuls of
activations, permutes/reshapes that move the batch or branch axis, unknown modules (including custom leaf modules)
and unknown functions with per-branch inputs, transposed convolutions, random tensors created from scratch,
in-place ops on shared values, and modules with hooks (the fused graph would bypass them). Functions with only
shared inputs are computed once (assumed deterministic unless known to be random). A few checks need shapes (a
reshape that mixes the batch axis, a pooling of an unbatched input, a broadcast that would move the branch axis):
they raise :class:`FusionError` at the first call; :meth:`FusedBranches.check` runs them ahead of time on fake
tensors.
"""
from __future__ import annotations

import builtins
import operator
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .errors import FusionError

__all__ = ["FusionError", "FusedBranches", "fuse_branches"]


# Value kinds (see the module docstring).
_S, _F, _K, _L = "shared", "fused", "stacked", "list"


# ----------------------------------------------------------------------------------------------------------------
# Runtime helpers: the fused graph calls these. They read modules' current parameters, buffers and flags.
# ----------------------------------------------------------------------------------------------------------------


def _fail(msg: str) -> None:
    raise FusionError(msg)


def _to_fused(x: Tensor, m: int) -> Tensor:
    """Shared -> fused: ``m`` copies along axis 1 (``torch.cat`` keeps channels_last)."""
    if not isinstance(x, Tensor) or x.ndim < 2:
        _fail(f"a shared value of shape {tuple(getattr(x, 'shape', ()))} cannot be laid out per branch along axis 1")
    return torch.cat([x] * m, 1)


def _list_to_fused(xs: Sequence[Tensor]) -> Tensor:
    if xs[0].ndim < 2:
        _fail(f"per-branch values of shape {tuple(xs[0].shape)} cannot be laid out per branch along axis 1")
    return torch.cat(list(xs), 1)


def _stacked_to_fused(y: Tensor) -> Tensor:
    """(m, B, C, ...) -> (B, m*C, ...)."""
    if y.ndim < 3:
        _fail(f"stacked per-branch values of shape {tuple(y.shape)} have no axis to fuse along")
    return y.movedim(0, 1).flatten(1, 2)


def _branch_shape(x: Tensor, m: int) -> torch.Size:
    """The per-branch shape of a fused value."""
    return torch.Size((x.shape[0], x.shape[1] // m, *x.shape[2:]))


def _branch_size(x: Tensor, m: int, *args: Any, **kwargs: Any) -> Any:
    shape = _branch_shape(x, m)
    dim = args[0] if args else kwargs.get("dim")
    return shape if dim is None else shape[dim]


def _branch_numel(x: Tensor, m: int) -> int:
    return x.numel() // m


# (The helpers avoid generator expressions, which torch.compile cannot trace without a graph break.)


def _prod(xs: Iterable[int]) -> int:
    out = 1
    for x in xs:
        out = out * x
    return out


def _norm_dims(dim: Any, ndim: int) -> list[int]:
    dims = list(dim) if isinstance(dim, (tuple, list, torch.Size)) else [dim]
    out = []
    for d in dims:
        if not isinstance(d, int):
            _fail(f"dim={dim!r} is not a (tuple of) int")
        out.append(d % ndim if ndim else 0)
    return out


# Functions passed as arguments of the helpers below are named by a key (fx writes arguments as source code):
# ".name" is the tensor method ``name``; any other key is looked up here.
_FUNCTIONS: dict[str, Callable] = {}


def _fn_key(fn: Any) -> str:
    if isinstance(fn, str):
        return "." + fn
    key = f"{getattr(fn, '__module__', None) or ''}.{getattr(fn, '__qualname__', None) or getattr(fn, '__name__', '')}"
    key = f"{key}#{id(fn)}"
    _FUNCTIONS[key] = fn
    return key


def _call(fn: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    if isinstance(fn, str):
        if fn.startswith("."):
            return getattr(x, fn[1:])(*args, **kwargs)
        fn = _FUNCTIONS[fn]
    return fn(x, *args, **kwargs)


def _cat_opt(ts: Sequence[Tensor | None] | Tensor | None) -> Tensor | None:
    """The fused (concatenated along axis 0) form of a per-branch parameter given as ``m`` tensors; a tensor that is
    already fused (from :func:`_pack`) or None passes through."""
    if ts is None or isinstance(ts, Tensor):
        return ts
    return None if ts[0] is None else torch.cat(list(ts))


def _per_branch(t: Sequence[Tensor | None] | Tensor | None, m: int) -> list[Any]:
    """The ``m`` per-branch parts of a parameter given as ``m`` tensors or fused (views, no copy)."""
    if t is None:
        return [None] * m
    return list(t.chunk(m)) if isinstance(t, Tensor) else list(t)


def _pack(groups: Sequence[Sequence[Sequence[Tensor]]]) -> list[list[Tensor]]:
    """The fused form of many per-branch parameters at once. Each group holds entries (the ``m`` tensors of one
    parameter, one per branch) that agree in dtype and in every axis after the first; the whole group is one
    ``torch.cat``, split back into one fused tensor per entry (views). In backward the split's gradient is one cat
    too, so a group of ``n`` parameters costs at most 2 kernels instead of the ``n`` that concatenating each one
    costs: for a CIFAR ResNet tail, 8 instead of 46 (the step is bound by kernel launches there)."""
    out = []
    for group in groups:
        flat = []
        sizes = []
        for entry in group:
            n = 0
            for t in entry:
                flat.append(t)
                n = n + t.shape[0]
            sizes.append(n)
        whole = torch.cat(flat)
        out.append([whole] if len(sizes) == 1 else list(whole.split(sizes)))
    return out


def _ew(fn: Any, kinds: tuple[str, ...], m: int, inplace: bool, *args: Any, **kwargs: Any) -> Any:
    """An elementwise op with several operands, at least one of them per-branch (fused or list); returns fused.

    Direct when every fused operand has the same width and no shared tensor reaches axis 1; otherwise in the
    ``(B, m, C, ...)`` view where broadcasting matches the per-branch broadcasting exactly.
    """
    nd = 0
    for a, k in zip(args, kinds):
        if k == _L:
            nd = max(nd, a[0].ndim)
        elif isinstance(a, Tensor):
            nd = max(nd, a.ndim)
    widths = set()
    direct = True
    for a, k in zip(args, kinds):
        if k == _F:
            if a.ndim != nd:
                _fail(
                    f"{_fn_name(fn)}: a per-branch operand of ndim {a.ndim} is broadcast against ndim {nd}, which "
                    "would move the branch axis"
                )
            widths.add(a.shape[1])
        elif k == _L:
            direct = False
        elif isinstance(a, Tensor) and a.ndim >= nd - 1 and a.ndim > 0:
            if a.shape[a.ndim - nd + 1] != 1:
                direct = False
    if nd < 2:
        _fail(f"{_fn_name(fn)}: per-branch result of ndim {nd} has no axis to fuse along")
    if direct and len(widths) <= 1:
        return _call(fn, *args, **kwargs)
    new = []
    for a, k in zip(args, kinds):
        if k == _F:
            a = a.unflatten(1, (m, -1))
        elif k == _L:
            s = a[0].ndim
            if s == nd:
                a = torch.stack(list(a), 1)
            else:
                a = torch.stack(list(a), 0).view(m, *([1] * (nd - 1 - s)), *a[0].shape)
        elif isinstance(a, Tensor) and a.ndim == nd:
            a = a.unsqueeze(1)
        new.append(a)
    out = _call(fn, *new, **kwargs)
    return args[0] if inplace else out.flatten(1, 2)


def _fn_name(fn: Any) -> str:
    if isinstance(fn, str):
        return f"{fn}()" if fn.startswith(".") else fn.split("#")[0]
    return getattr(fn, "__name__", repr(fn))


def _dim_op(fn: Any, pos: int, kw: str, x: Tensor, *args: Any, **kwargs: Any) -> Any:
    """An op acting along ``dim`` (reductions, softmax, normalize...): fine on fused values for dims >= 2."""
    if len(args) > pos:
        dim = args[pos]
    else:
        dim = kwargs.get(kw, kwargs.get("axis"))
    if dim is None:
        _fail(f"{_fn_name(fn)} without dim would act across the batch and branch axes")
    if min(_norm_dims(dim, x.ndim)) < 2:
        _fail(f"{_fn_name(fn)} along dim={dim!r} acts across the channel axis, which holds the branches")
    return _call(fn, x, *args, **kwargs)


def _spatial(fn: Any, k: int, x: Tensor, *args: Any, **kwargs: Any) -> Any:
    """Pooling / padding modules and functions over the last ``k`` axes: channel-independent on batched input."""
    if k and x.ndim != k + 2:
        _fail(f"{_fn_name(fn)} on a {x.ndim}-D (unbatched) input would act on the branch axis")
    return _call(fn, x, *args, **kwargs)


def _flatten(x: Tensor, start_dim: int = 0, end_dim: int = -1) -> Tensor:
    s, e = start_dim % x.ndim, end_dim % x.ndim
    if s == 0 and e > 0:
        _fail(f"flatten({start_dim}, {end_dim}) merges the batch axis with the branch axis")
    return x.flatten(start_dim, end_dim)


def _resolve_shape(shape: Sequence[int], numel: int) -> list[int]:
    shape = list(shape)
    known, free = 1, -1
    for i, s in enumerate(shape):
        if not isinstance(s, int):
            _fail(f"reshape to {shape!r}: not a shape")
        if s == -1:
            free = i
        else:
            known = known * s
    if free >= 0:
        shape[free] = numel // known if known else 0
    return shape


def _reshape(x: Tensor, m: int, method: str, *shape: Any) -> Tensor:
    """``view``/``reshape`` to a per-branch shape: valid iff it keeps the batch axis (then branch-major holds)."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    per = _branch_shape(x, m)
    target = _resolve_shape(shape, _prod(per))
    if len(target) < 2 or target[0] != per[0]:
        _fail(f".{method}{tuple(shape)} of a per-branch {tuple(per)} value does not keep the batch axis first")
    return getattr(x, method)(target[0], target[1] * m, *target[2:])


def _reshape_as(x: Tensor, m: int, method: str, other: Tensor, other_fused: bool) -> Tensor:
    return _reshape(x, m, method[: -len("_as")], _branch_shape(other, m) if other_fused else other.shape)


def _unflatten(x: Tensor, m: int, dim: int, sizes: Sequence[int]) -> Tensor:
    d = dim % x.ndim
    if d == 0:
        _fail("unflatten of the batch axis")
    if d >= 2:
        return x.unflatten(dim, sizes)
    per = _branch_shape(x, m)
    sizes = _resolve_shape(sizes, per[1])
    return _reshape(x, m, "reshape", per[0], *sizes, *per[2:])


def _squeeze(x: Tensor, m: int, *args: Any, **kwargs: Any) -> Tensor:
    per = _branch_shape(x, m)
    dim = args[0] if args else kwargs.get("dim")
    dims = list(range(x.ndim)) if dim is None else _norm_dims(dim, x.ndim)
    for d in dims:
        if d < 2 and per[d] == 1:
            _fail("squeeze would drop the batch or branch axis")
    return x.squeeze(*args, **kwargs)


def _unsqueeze(x: Tensor, dim: int) -> Tensor:
    if dim % (x.ndim + 1) < 2:
        _fail(f"unsqueeze({dim}) inserts an axis before the branch axis")
    return x.unsqueeze(dim)


def _transpose(fn: Any, x: Tensor, d0: int, d1: int) -> Tensor:
    a, b = _norm_dims((d0, d1), x.ndim)
    if a != b and min(a, b) < 2:
        _fail(f"transpose({d0}, {d1}) moves the batch or branch axis (channels-last layouts are not supported)")
    return _call(fn, x, d0, d1)


def _permute(fn: Any, x: Tensor, *dims: Any) -> Tensor:
    perm = dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
    p = _norm_dims(perm, x.ndim)
    if p[:2] != [0, 1]:
        _fail(f"permute{tuple(perm)} moves the batch or branch axis (channels-last layouts are not supported)")
    return _call(fn, x, *dims)


def _getitem(x: Tensor, idx: Any) -> Tensor:
    items = list(idx) if isinstance(idx, tuple) else [idx]
    count = 0
    for i in items:
        if isinstance(i, (Tensor, list)):
            _fail("advanced (tensor/list) indexing of a per-branch value")
        if i is not None and i is not Ellipsis:
            count += 1
    full: list[Any] = []
    for i in items:
        full.extend([slice(None)] * (x.ndim - count) if i is Ellipsis else [i])
    lead = full[:2]
    if lead and not isinstance(lead[0], slice):
        _fail(f"indexing {idx!r} removes or adds an axis before the branch axis")
    if len(lead) > 1 and lead[1] != slice(None):
        _fail(f"indexing {idx!r} selects along the channel axis, which holds the branches")
    return x[idx]


def _pad(x: Tensor, m: int, pad: Sequence[int], mode: str = "constant", value: float | None = None) -> Tensor:
    k = len(pad) // 2
    if k <= x.ndim - 2:
        return F.pad(x, pad, mode, value)
    if k == x.ndim - 1 and mode == "constant":  # pads the channel axis too (option-A shortcut): per branch
        return F.pad(x.unflatten(1, (m, -1)), pad, mode, value).flatten(1, 2)
    _fail(f"F.pad({list(pad)}, mode={mode!r}) of a {x.ndim}-D per-branch value pads the batch axis or is not constant")


def _new_fused(x: Tensor, m: int, method: str, *args: Any, **kwargs: Any) -> Tensor:
    """``x.new_empty(size)`` & co: ``m`` per-branch tensors, laid out fused (axis 1 is ``m`` times larger)."""
    if method == "new_full":
        size, rest = args[0], args[1:]
    elif len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
        size, rest = args[0], ()
    else:
        size, rest = args, ()
    size = list(size)
    if len(size) < 2:
        _fail(f".{method}({size}) creates a per-branch tensor with no axis to fuse along")
    size[1] = size[1] * m
    return getattr(x, method)(size, *rest, **kwargs)


def _stochastic_depth(x: Tensor, m: int, p: float, mode: str, training: bool = True) -> Tensor:
    """torchvision's ``stochastic_depth`` with one draw per sample (``row``) or per batch, and per branch."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"drop probability has to be between 0 and 1, but got {p}")
    if mode not in ("batch", "row"):
        raise ValueError(f"mode has to be either 'batch' or 'row', but got {mode}")
    if not training or p == 0.0:
        return x
    survival = 1.0 - p
    size = [x.shape[0] if mode == "row" else 1, m] + [1] * (x.ndim - 1)
    noise = torch.empty(size, dtype=x.dtype, device=x.device).bernoulli_(survival)
    if survival > 0.0:
        noise.div_(survival)
    return (x.unflatten(1, (m, -1)) * noise).flatten(1, 2)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _conv_t(
    x: Tensor, shared: bool, mode: str, m: int, weights: Sequence[Tensor] | Tensor,
    biases: Sequence[Tensor | None] | Tensor | None, stride: Any, padding: Any, dilation: Any, groups: int,
    same: bool = False,
) -> Tensor:
    """A convolution per branch. On a shared input with ``groups == 1``: one dense conv with the weights concatenated
    along out-channels. Otherwise one grouped conv (``groups * m``) on the fused input, or, in ``split`` mode (and in
    ``auto`` mode on CPU, where oneDNN's grouped-conv backward is slow), ``m`` dense convs on its channel slices,
    concatenated. Depthwise convs stay one (depthwise) conv in every mode. ``weights``/``biases``: ``m`` tensors or
    fused."""
    w0 = weights if isinstance(weights, Tensor) else weights[0]
    k = w0.ndim - 2
    if x.ndim != k + 2:
        _fail(f"conv{k}d on a {x.ndim}-D (unbatched) input")
    if same:  # timm Conv2dSame: TF "same" padding computed from the input size (spatial axes only)
        from timm.layers.padding import pad_same

        x = pad_same(x, w0.shape[-2:], stride, dilation)
        padding = 0
    fn = _CONV[k]
    dense_shared = shared and groups == 1
    depthwise = w0.shape[1] == 1
    if not dense_shared and not depthwise and (mode == "split" or (mode == "auto" and x.device.type == "cpu")):
        xs = [x] * m if shared else list(x.chunk(m, 1))
        ws, bs = _per_branch(weights, m), _per_branch(biases, m)
        outs = [fn(xs[i], ws[i], bs[i], stride, padding, dilation, groups) for i in range(m)]
        return torch.cat(outs, 1)
    if shared and not dense_shared:
        x = _to_fused(x, m)
    return fn(x, _cat_opt(weights), _cat_opt(biases), stride, padding, dilation, groups if dense_shared else groups * m)


def _conv(x: Tensor, convs: Sequence[nn.Module], shared: bool, mode: str, same: bool = False,
          params: Sequence[Tensor | None] | None = None) -> Tensor:
    """A conv module rule; ``params``: the fused (weight, bias) from :func:`_pack`, else read from the modules."""
    c = convs[0]
    padding = c.padding
    if c.padding_mode != "zeros":
        x = F.pad(x, c._reversed_padding_repeated_twice, mode=c.padding_mode)
        padding = 0
    w, b = params if params is not None else ([cv.weight for cv in convs], [cv.bias for cv in convs])
    return _conv_t(x, shared, mode, len(convs), w, b, c.stride, padding, c.dilation, c.groups, same)


def _conv_f(x: Tensor, shared: bool, mode: str, weight: Sequence[Tensor], bias: Sequence[Tensor] | None = None,
            stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1) -> Tensor:
    return _conv_t(x, shared, mode, len(weight), weight, bias, stride, padding, dilation, groups)


def _bn_core(
    x: Tensor, m: int, weight: Any, bias: Any, running: tuple[Tensor, Tensor] | None,
    means: Sequence[Tensor] | None, vars_: Sequence[Tensor] | None, nbts: Sequence[Tensor] | None,
    training: bool, track: bool, momentum: float | None, eps: float, bn_fn: Callable,
) -> tuple[Tensor, Any]:
    """Mirror of ``_BatchNorm.forward`` on concatenated tensors. ``weight``/``bias``: ``m`` tensors or fused;
    ``running``: the fused (mean, var) from :func:`_pack`, else concatenated here from ``means``/``vars_`` (the
    branches' buffers, where updated statistics go back to). Returns the output and the pending buffer update
    ``(sources, destinations, counters)`` to apply with :func:`_bn_epilogue`, or None."""
    w, b = _cat_opt(weight), _cat_opt(bias)
    has_buf = means is not None and vars_ is not None
    use_batch = training or not has_buf
    if not has_buf or (training and not track):
        return bn_fn(x, None, None, w, b, use_batch, 0.0 if momentum is None else momentum, eps), None
    rm, rv = running if running is not None else torch.cat([*means, *vars_]).chunk(2)
    if not training:
        return bn_fn(x, rm, rv, w, b, use_batch, 0.0 if momentum is None else momentum, eps), None
    counters = list(nbts) if nbts is not None else []
    if momentum is None:
        if not counters:  # the module does not update its statistics then (factor 0)
            return bn_fn(x, rm, rv, w, b, True, 0.0, eps), None
        # Cumulative average, factor 1 / (count + 1) per branch, without reading the counts on the host.
        srm, srv = torch.zeros_like(rm), torch.zeros_like(rv)
        y = bn_fn(x, srm, srv, w, b, True, 1.0, eps)  # <- batch mean, unbiased batch var
        width = rm.numel() // m
        factor = torch.cat([(n + 1).to(rm.dtype).reciprocal().expand(width) for n in counters])
        rm, rv = torch.lerp(rm, srm, factor), torch.lerp(rv, srv, factor)
    else:
        y = bn_fn(x, rm, rv, w, b, True, momentum, eps)  # updates the concatenated buffers in place
    return y, ([*rm.chunk(m), *rv.chunk(m)], [*means, *vars_], counters)


def _bn_epilogue(pending: Iterable[Any]) -> None:
    """Copy updated running statistics back into the branches' buffers; count the batch."""
    srcs: list[Tensor] = []
    dsts: list[Tensor] = []
    counters: list[Tensor] = []
    for p in pending:
        if p is not None:
            srcs.extend(p[0])
            dsts.extend(p[1])
            counters.extend(p[2])
    with torch.no_grad():
        if dsts:
            torch._foreach_copy_(dsts, srcs)
        if counters:
            torch._foreach_add_(counters, 1)


def _sync_bn_fn(bn: nn.Module, x: Tensor) -> Callable:
    """F.batch_norm, or the synchronised version where ``nn.SyncBatchNorm.forward`` would synchronise."""
    if not isinstance(bn, nn.SyncBatchNorm):
        return F.batch_norm
    if not (bn.training and torch.distributed.is_available() and torch.distributed.is_initialized()):
        return F.batch_norm
    if x.device.type not in ("cuda", "hpu", "xpu", torch._C._get_privateuse1_backend_name()):
        raise ValueError("SyncBatchNorm expected input tensor to be on GPU or XPU")
    group = bn.process_group or torch.distributed.group.WORLD
    world = torch.distributed.get_world_size(group)
    if world <= 1:
        return F.batch_norm
    from torch.nn.modules._functions import SyncBatchNorm as sync_batch_norm

    def fn(x: Tensor, rm: Any, rv: Any, w: Any, b: Any, training: bool, momentum: float, eps: float) -> Tensor:
        return sync_batch_norm.apply(x, w, b, rm, rv, eps, momentum, group, world)

    return fn


def _bn(x: Tensor, bns: Sequence[nn.Module], defer: bool, params: Sequence[Tensor | None] | None = None) -> Any:
    """A BatchNorm module rule (torch BatchNorm*d / SyncBatchNorm, timm BatchNormAct2d's normalisation part).
    ``params``: the fused (weight, bias, running_mean, running_var) from :func:`_pack`, else read from the modules."""
    bn = bns[0]
    if isinstance(bn, nn.modules.batchnorm._BatchNorm):
        bn._check_input_dim(x)
    m = len(bns)
    has_buf = bn.running_mean is not None and bn.running_var is not None
    if params is None:
        w, b, running = [b.weight for b in bns], [b.bias for b in bns], None
    else:
        w, b, running = params[0], params[1], (params[2], params[3]) if has_buf else None
    y, pending = _bn_core(
        x, m, w, b, running,
        [b.running_mean for b in bns] if has_buf else None, [b.running_var for b in bns] if has_buf else None,
        [b.num_batches_tracked for b in bns] if bn.num_batches_tracked is not None else None,
        bn.training, bn.track_running_stats, bn.momentum, bn.eps, _sync_bn_fn(bn, x),
    )
    if defer:
        return y, pending
    if pending is not None:
        _bn_epilogue([pending])
    return y


def _bn_f(x: Tensor, m: int, running_mean: Any, running_var: Any, weight: Any = None, bias: Any = None,
          training: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """``F.batch_norm`` with per-branch (list) statistics and affine parameters; statistics copied back at once."""
    y, pending = _bn_core(
        x, m, weight, bias, None, running_mean, running_var, None, training, True, momentum, eps, F.batch_norm
    )
    if pending is not None:
        _bn_epilogue([pending])
    return y


def _frozen_bn(x: Tensor, bns: Sequence[nn.Module], params: Sequence[Tensor] | None = None) -> Tensor:
    """torchvision ``FrozenBatchNorm2d`` / timm ``FrozenBatchNormAct2d`` (normalisation part), same arithmetic.
    ``params``: the fused (weight, bias, running_mean, running_var) from :func:`_pack`, else read from the modules."""
    if params is None:
        params = [torch.cat([getattr(b, k) for b in bns]) for k in ("weight", "bias", "running_mean", "running_var")]
    w, b_, rm, rv = [t.reshape(1, -1, 1, 1) for t in params]
    scale = w * (rv + bns[0].eps).rsqrt()
    return x * scale + (b_ - rm * scale)


def _group_norm_t(x: Tensor, m: int, num_groups: int, weights: Any, biases: Any, eps: float) -> Tensor:
    return F.group_norm(x, num_groups * m, _cat_opt(weights), _cat_opt(biases), eps)


def _group_norm(x: Tensor, gns: Sequence[nn.Module], params: Sequence[Tensor | None] | None = None) -> Tensor:
    g = gns[0]
    w, b = params if params is not None else ([n.weight for n in gns], [n.bias for n in gns])
    return _group_norm_t(x, len(gns), g.num_groups, w, b, g.eps)


def _group_norm_f(
    x: Tensor, m: int, num_groups: int, weight: Any = None, bias: Any = None, eps: float = 1e-5
) -> Tensor:
    return _group_norm_t(x, m, num_groups, weight, bias, eps)


def _prelu(x: Tensor, mods: Sequence[nn.Module]) -> Tensor:
    m = len(mods)
    width = x.shape[1] // m if x.ndim >= 2 else 1
    w = torch.cat([p.weight.expand(width) if p.weight.numel() == 1 else p.weight for p in mods])
    return F.prelu(x, w)


def _linear_t(x: Tensor, kind: str, m: int, weights: Sequence[Tensor] | Tensor,
              biases: Sequence[Tensor | None] | Tensor | None) -> Tensor:
    """Linear per branch (on the last axis). A shared input: one matmul with concatenated weights, fused output.
    A fused (B, m*N.., D) or stacked (m, B, .., D) input: a per-branch batched matmul, stacked output (m, B, .., O).
    ``weights``/``biases``: ``m`` tensors or fused."""
    w, b = _cat_opt(weights), _cat_opt(biases)
    if kind == _S:
        y = F.linear(x, w, b)
        if x.ndim == 2:
            return y
        if x.ndim < 2:
            _fail(f"Linear on a {x.ndim}-D shared value has no batch axis")
        return y.unflatten(-1, (m, -1)).movedim(-2, 1).flatten(1, 2)
    if kind == _F:
        x = x.unflatten(1, (m, -1)).movedim(1, 0)
    shape = x.shape
    if x.ndim > 3:
        x = x.flatten(1, -2)
    w = w.unflatten(0, (m, -1)).transpose(1, 2)  # (m, D, O)
    y = torch.baddbmm(b.view(m, 1, -1), x, w) if b is not None else torch.bmm(x, w)
    return y if len(shape) <= 3 else y.unflatten(1, shape[1:-1])


def _linear(x: Tensor, kind: str, mods: Sequence[nn.Module], params: Sequence[Tensor | None] | None = None) -> Tensor:
    w, b = params if params is not None else ([l.weight for l in mods], [l.bias for l in mods])
    return _linear_t(x, kind, len(mods), w, b)


def _linear_f(x: Tensor, kind: str, weight: Sequence[Tensor], bias: Sequence[Tensor] | None = None) -> Tensor:
    return _linear_t(x, kind, len(weight), weight, bias)


def _split_fused(x: Tensor, m: int) -> list[Tensor]:
    return list(x.chunk(m, 1))


def _split_stacked(y: Tensor) -> list[Tensor]:
    return list(y.unbind(0))


# ----------------------------------------------------------------------------------------------------------------
# Rule tables
# ----------------------------------------------------------------------------------------------------------------

_ACTIVATIONS: tuple[type, ...] = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Softshrink,
    nn.Hardshrink, nn.LogSigmoid, nn.Threshold,
)
_RANDOM_MODULES: tuple[type, ...] = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.RReLU,
)
# module type -> number of spatial axes it acts on (0: any batched input)
_SPATIAL_MODULES: dict[type, int] = {
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3,
    nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3, nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3,
    nn.LPPool1d: 1, nn.LPPool2d: 2,
    nn.ZeroPad1d: 1, nn.ZeroPad2d: 2, nn.ZeroPad3d: 3, nn.ConstantPad1d: 1, nn.ConstantPad2d: 2,
    nn.ConstantPad3d: 3, nn.ReflectionPad1d: 1, nn.ReflectionPad2d: 2, nn.ReflectionPad3d: 3,
    nn.ReplicationPad1d: 1, nn.ReplicationPad2d: 2, nn.ReplicationPad3d: 3,
    nn.Upsample: 0, nn.UpsamplingNearest2d: 0, nn.UpsamplingBilinear2d: 0,
}
_SOFTMAX_MODULES: tuple[type, ...] = (nn.Softmax, nn.LogSoftmax, nn.Softmin)

_EW_FUNCS: set[Any] = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod, operator.pow,
    operator.neg, operator.pos, operator.abs, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
    operator.ge, operator.and_, operator.or_, operator.xor, operator.invert,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide, torch.true_divide,
    torch.pow, torch.maximum, torch.minimum, torch.fmax, torch.fmin, torch.where, torch.lerp, torch.addcmul,
    torch.addcdiv, torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max, torch.relu, torch.sigmoid,
    torch.tanh, torch.exp, torch.log, torch.log1p, torch.expm1, torch.sqrt, torch.rsqrt, torch.abs, torch.neg,
    torch.square, torch.erf, torch.reciprocal, torch.sign, torch.nan_to_num, torch.masked_fill, torch.sin,
    torch.cos, torch.floor, torch.ceil, torch.round, torch.zeros_like, torch.ones_like, torch.empty_like,
    torch.full_like, torch.eq, torch.ne, torch.lt, torch.le, torch.gt, torch.ge, torch.logical_and,
    torch.logical_or, torch.logical_not,
    F.relu, F.relu6, F.elu, F.selu, F.celu, F.leaky_relu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
    F.hardtanh, F.softplus, F.softsign, F.tanhshrink, F.softshrink, F.hardshrink, F.logsigmoid, F.threshold,
    F.sigmoid, F.tanh,
}
_EW_INPLACE_FUNCS: set[Any] = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.iand, operator.ior, operator.ixor,
    torch.relu_, torch.sigmoid_, torch.tanh_, torch.exp_, torch.clamp_, torch.selu_, torch.celu_, F.elu_,
    F.leaky_relu_, F.hardtanh_, torch.threshold_,
}
_RANDOM_FUNCS: set[Any] = {
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, F.rrelu, F.rrelu_,
    torch.dropout, torch.feature_dropout, torch.alpha_dropout, torch.feature_alpha_dropout, torch.bernoulli,
    torch.rand_like, torch.randn_like, torch.randint_like,
}
# Random functions with no tensor input: nothing to lay out per branch.
_RANDOM_FACTORIES: set[Any] = {torch.rand, torch.randn, torch.randint, torch.randperm, torch.normal, torch.poisson,
                               torch.multinomial}
_EW_METHODS = {
    "add", "sub", "mul", "div", "true_divide", "pow", "maximum", "minimum", "where", "lerp", "addcmul", "addcdiv",
    "clamp", "clip", "clamp_min", "clamp_max", "relu", "sigmoid", "tanh", "exp", "log", "log1p", "expm1", "sqrt",
    "rsqrt", "abs", "neg", "square", "erf", "reciprocal", "sign", "nan_to_num", "masked_fill", "sin", "cos",
    "floor", "ceil", "round", "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_not",
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__", "rsub",
    "fill_", "zero_", "hardswish", "silu", "gelu", "mish",
}
_RANDOM_METHODS = {"bernoulli", "bernoulli_", "uniform_", "normal_", "exponential_", "geometric_", "cauchy_",
                   "log_normal_", "random_"}
# Methods of one tensor whose other arguments only describe a dtype/device/format.
_CAST_METHODS = {"to", "type", "type_as", "float", "double", "half", "bfloat16", "contiguous", "clone", "detach",
                 "cpu", "cuda", "requires_grad_"}
# Ops acting along ``dim``: (index of dim among the arguments after the input, keyword)
_DIM_FUNCS: dict[Any, tuple[int, str]] = {
    torch.mean: (0, "dim"), torch.sum: (0, "dim"), torch.amax: (0, "dim"), torch.amin: (0, "dim"),
    torch.std: (0, "dim"), torch.var: (0, "dim"), torch.logsumexp: (0, "dim"), torch.prod: (0, "dim"),
    torch.nansum: (0, "dim"), torch.nanmean: (0, "dim"), torch.softmax: (0, "dim"), torch.log_softmax: (0, "dim"),
    torch.cumsum: (0, "dim"), torch.cumprod: (0, "dim"), F.softmax: (0, "dim"), F.log_softmax: (0, "dim"),
    F.softmin: (0, "dim"), F.normalize: (1, "dim"),
}
_DIM_METHODS: dict[str, tuple[int, str]] = {
    name: (0, "dim") for name in (
        "mean", "sum", "amax", "amin", "std", "var", "logsumexp", "prod", "nansum", "nanmean", "softmax",
        "log_softmax", "cumsum", "cumprod",
    )
}
_SPATIAL_FUNCS: dict[Any, int] = {
    F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3, F.avg_pool1d: 1,
    F.avg_pool2d: 2, F.avg_pool3d: 3, F.lp_pool1d: 1, F.lp_pool2d: 2, F.lp_pool3d: 3,
    torch.adaptive_avg_pool1d: 1, torch.avg_pool1d: 1, F.interpolate: 0, F.upsample: 0,
    F.upsample_nearest: 0, F.upsample_bilinear: 0,
}
_SPATIAL_INDEXED_FUNCS: dict[Any, int] = {  # pools that may return indices (kwarg / position 5 or 2)
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2,
    F.adaptive_max_pool3d: 3,
}
_SHAPE_ATTRS = {"ndim", "dtype", "device", "is_cuda", "layout", "requires_grad", "is_sparse", "is_quantized"}


def _timm_classes() -> dict[str, tuple[type, ...]]:
    out: dict[str, tuple[type, ...]] = {"bn_act": (), "frozen_bn_act": (), "conv_same": (), "pool_same": ()}
    try:
        from timm.layers.norm_act import BatchNormAct2d, FrozenBatchNormAct2d, SyncBatchNormAct
    except ImportError:  # pragma: no cover - timm is a dependency
        return out
    out["bn_act"] = (BatchNormAct2d, SyncBatchNormAct)
    out["frozen_bn_act"] = (FrozenBatchNormAct2d,)
    try:
        import importlib

        cs = importlib.import_module("timm.layers.conv2d_same")
        ps = importlib.import_module("timm.layers.pool2d_same")
        out["conv_same"] = (cs.Conv2dSame,)
        out["pool_same"] = (ps.AvgPool2dSame, ps.MaxPool2dSame)
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    return out


def _frozen_bn_classes() -> tuple[type, ...]:
    try:
        from torchvision.ops.misc import FrozenBatchNorm2d
    except ImportError:  # pragma: no cover
        return ()
    return (FrozenBatchNorm2d,)


def _own_forward(mod: nn.Module, *classes: type) -> bool:
    """``mod`` is an instance of one of ``classes`` and does not override its forward."""
    return any(isinstance(mod, c) and type(mod).forward is c.forward for c in classes)


def _module_rule(mod: nn.Module) -> str | None:
    timm = _timm_classes()
    if isinstance(mod, nn.modules.conv._ConvNd) and not mod.transposed:
        if _own_forward(mod, nn.Conv1d, nn.Conv2d, nn.Conv3d):
            return "conv"
        if _own_forward(mod, *timm["conv_same"]):
            return "conv_same"
        return None
    if _own_forward(mod, *timm["bn_act"]):
        return "bn_act"
    if _own_forward(mod, *timm["frozen_bn_act"]):
        return "frozen_bn_act"
    if _own_forward(mod, nn.SyncBatchNorm, nn.modules.batchnorm._BatchNorm):
        return "bn"
    if _own_forward(mod, *_frozen_bn_classes()):
        return "frozen_bn"
    if _own_forward(mod, nn.GroupNorm):
        return "gn"
    if _own_forward(mod, nn.Linear):
        return "linear"
    if _own_forward(mod, nn.PReLU):
        return "prelu"
    if type(mod) in _ACTIVATIONS:
        return "ew"
    if type(mod) in _RANDOM_MODULES:
        return "random"
    if type(mod) in _SPATIAL_MODULES or _own_forward(mod, *timm["pool_same"]):
        if getattr(mod, "return_indices", False):
            return None
        return "spatial"
    if type(mod) is nn.Flatten:
        return "flatten"
    if type(mod) is nn.Unflatten:
        return "unflatten"
    if type(mod) in _SOFTMAX_MODULES:
        return "softmax"
    return None


def _is_inplace_method(name: str) -> bool:
    return name.endswith("_") and not name.endswith("__")


# Functions with an ``inplace`` flag: its position among the positional arguments.
_INPLACE_POS: dict[Any, int] = {
    F.relu: 1, F.relu6: 1, F.selu: 1, F.silu: 1, F.mish: 1, F.hardswish: 1, F.hardsigmoid: 1, F.elu: 2,
    F.celu: 2, F.leaky_relu: 2, F.hardtanh: 3, F.threshold: 3, F.dropout: 3, F.dropout1d: 3, F.dropout2d: 3,
    F.dropout3d: 3, F.alpha_dropout: 3, F.feature_alpha_dropout: 3, F.rrelu: 4,
}


def _is_inplace_call(node: fx.Node) -> bool:
    t = node.target
    if node.op == "call_method":
        return _is_inplace_method(t)
    if t in _EW_INPLACE_FUNCS or t is F.rrelu_:
        return True
    pos = _INPLACE_POS.get(t)
    if pos is None:
        return False
    flag = node.kwargs.get("inplace", node.args[pos] if len(node.args) > pos else False)
    return flag is True


def _is_shape_query(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in ("size", "dim", "ndimension", "numel", "nelement")
    return node.op == "call_function" and node.target is builtins.getattr and (
        node.args[1] == "shape" or node.args[1] in _SHAPE_ATTRS
    )


def _describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module '{node.target}'"
    if node.op == "call_method":
        return f"method .{node.target}()"
    if node.op == "get_attr":
        return f"attribute '{node.target}'"
    t = node.target
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or repr(t)
    if mod in ("_operator", "operator"):
        mod = "operator"
    elif mod.startswith("torch._C") or mod == "torch":
        mod = "torch"
    return f"function {mod + '.' if mod else ''}{name}"


def _near(node: fx.Node) -> str:
    """The module path closest to a node (for messages): its own, or that of an input read from a module."""
    if node.op == "call_module":
        return ""
    for a in node.all_input_nodes:
        if a.op == "call_module":
            return f" (after module '{a.target}')"
        if a.op == "get_attr":
            return f" (using '{a.target}')"
    return ""


def _get_path(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


# ----------------------------------------------------------------------------------------------------------------
# Graph transformation
# ----------------------------------------------------------------------------------------------------------------


class _Val:
    __slots__ = ("kind", "ref")

    def __init__(self, kind: str, ref: Any) -> None:
        self.kind, self.ref = kind, ref  # ref: a new-graph Node / constant, or (for lists) a tuple of m of them


class _Builder:
    def __init__(self, branches: Sequence[nn.Module], graph: fx.Graph, training: bool, conv_mode: str) -> None:
        self.branches, self.src, self.training, self.conv_mode = list(branches), graph, training, conv_mode
        self.m = len(branches)
        self.g = fx.Graph()
        self.env: dict[fx.Node, _Val] = {}
        self.shared_to_fused: dict[fx.Node, fx.Node] = {}
        self.module_refs: dict[str, tuple[fx.Node, ...]] = {}
        self.pending: list[fx.Node] = []
        # The parameter pack (see _pack): one node near the top of the graph, its groups filled in by params().
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
        where = f"node '{n.name}' ({_describe(n)}{_near(n)})" if n is not None else "the tail"
        raise FusionError(
            f"cannot fuse the {self.m} branches ({'train' if self.training else 'eval'} graph): {where}: {reason}"
        )

    # -- value plumbing ----------------------------------------------------------------------------------------
    def val(self, a: Any) -> _Val:
        if isinstance(a, fx.Node):
            return self.env[a]
        return _Val(_S, self.shared(a, "an element of this argument"))  # constants, or containers of shared nodes

    def shared(self, a: Any, what: str = "this argument") -> Any:
        """``a`` with every node replaced by its (shared) new node; fails on per-branch values."""

        def f(n: fx.Node) -> fx.Node:
            v = self.env[n]
            if v.kind != _S:
                self.fail(f"{what} depends on the branch ({v.kind} value '{n.name}'); no rule for that")
            return v.ref

        return fx.map_arg(a, f)

    def kinds_in(self, args: Any, kwargs: Any) -> set[str]:
        out: set[str] = set()
        fx.map_arg((args, kwargs), lambda n: out.add(self.env[n].kind))
        return out

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> fx.Node:
        return self.g.call_function(fn, args, kwargs)

    def fused(self, v: _Val) -> fx.Node:
        """The value laid out fused (converting shared, stacked and list values)."""
        if v.kind == _F:
            return v.ref
        if v.kind == _S:
            if not isinstance(v.ref, fx.Node):
                self.fail(f"constant {v.ref!r} used where a per-branch tensor is needed")
            if v.ref not in self.shared_to_fused:
                self.shared_to_fused[v.ref] = self.call(_to_fused, v.ref, self.m)
            return self.shared_to_fused[v.ref]
        if v.kind == _K:
            return self.call(_stacked_to_fused, v.ref)
        return self.call(_list_to_fused, v.ref)

    def as_list(self, v: _Val, what: str) -> Any:
        """A per-branch operand (weights, statistics) as a tuple of m refs."""
        if v.kind == _L:
            return v.ref
        if v.kind == _S:
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
            self.pack = self.call(_pack, ())
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
            return v.ref[i] if v.kind == _L else v.ref

        return self.g.create_node(node.op, node.target, fx.map_arg(node.args, pick), fx.map_arg(node.kwargs, pick))

    def replicate(self, node: fx.Node) -> _Val:
        """Run the node once per branch on the per-branch (list) parts of its inputs: a list value."""
        outs = []
        for i in range(self.m):

            def pick(n: fx.Node, i: int = i) -> Any:
                v = self.env[n]
                if v.kind == _L:
                    return v.ref[i]
                if v.kind == _S:
                    return v.ref
                self.fail(f"internal: {v.kind} input in a per-branch computation")

            args = fx.map_arg(node.args, pick)
            kwargs = fx.map_arg(node.kwargs, pick)
            outs.append(self.g.create_node(node.op, node.target, args, kwargs))
        return _Val(_L, tuple(outs))

    def copy_shared(self, node: fx.Node) -> _Val:
        new = self.g.create_node(node.op, node.target, self.shared(node.args), self.shared(node.kwargs))
        if not _is_shape_query(node) and self.has_act(node):
            self.acts.add(new)
        return _Val(_S, new)

    def has_act(self, node: fx.Node) -> bool:
        found = []

        def visit(n: fx.Node) -> fx.Node:
            found.append(self.env[n].kind == _S and self.env[n].ref in self.acts)
            return n

        fx.map_arg((node.args, node.kwargs), visit)
        return any(found)

    # -- driver ------------------------------------------------------------------------------------------------
    def build(self) -> fx.Graph:
        out_node = None
        for node in self.src.nodes:
            self.node = node
            if node.op == "placeholder":
                self.env[node] = _Val(_S, self.g.node_copy(node))
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
        if out_node is None or not isinstance(out_node.args[0], fx.Node):
            self.fail("the tail must return a single tensor")
        v = self.env[out_node.args[0]]
        if self.pack is not None:
            self.pack.args = (tuple(tuple(entries) for entries, _ in self.pack_groups.values()),)
        if self.pending:
            self.call(_bn_epilogue, tuple(self.pending))
        if v.kind == _F:
            res = self.call(_split_fused, v.ref, self.m)
        elif v.kind == _K:
            res = self.call(_split_stacked, v.ref)
        elif v.kind == _L:
            res = self.call(list, v.ref)
        else:
            res = self.call(list, (v.ref,) * self.m)
        self.g.output(res)
        self.g.lint()
        return self.g

    # -- get_attr ----------------------------------------------------------------------------------------------
    def get_attr(self, node: fx.Node) -> _Val:
        objs = [_get_path(b, node.target) for b in self.branches]
        if all(o is objs[0] for o in objs) or not isinstance(objs[0], Tensor):
            return _Val(_S, self.g.get_attr(f"branches.0.{node.target}"))
        if node.target.rsplit(".", 1)[-1].startswith("_tensor_constant"):  # a constant baked in by tracing
            return _Val(_S, self.g.get_attr(f"branches.0.{node.target}"))
        return _Val(_L, tuple(self.g.get_attr(f"branches.{i}.{node.target}") for i in range(self.m)))

    # -- modules -----------------------------------------------------------------------------------------------
    def call_module(self, node: fx.Node) -> _Val:
        target = node.target
        mod = self.branches[0].get_submodule(target)
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            self.fail(f"{type(mod).__name__} called with other than one tensor input; no rule for that")
        v = self.val(node.args[0])
        out = self.apply_module(target, mod, v)
        if out.kind == _S and v.kind == _S and v.ref in self.acts:
            self.acts.add(out.ref)
        return out

    def apply_module(self, target: str, mod: nn.Module, v: _Val) -> _Val:
        rule = _module_rule(mod)
        name = type(mod).__name__
        if rule is None:
            self.fail(
                f"{name} has no fusion rule (supported: convolutions, batch/group norm, Linear, activations, "
                "dropout, pooling, flatten)"
            )
        m = self.m
        if v.kind == _L and rule not in ("conv", "conv_same", "bn", "bn_act", "frozen_bn", "frozen_bn_act", "gn",
                                         "linear", "prelu"):
            outs = tuple(
                self.module_forward(f"branches.{i}.{target}", v.ref[i]) for i in range(m)
            )
            return _Val(_L, outs)
        mod0 = f"branches.0.{target}"
        if rule == "ew":
            if getattr(mod, "inplace", False) and v.kind == _S:
                self.fail(f"in-place {name} on a value shared by every branch")
            if type(mod) is nn.Identity:
                return v
            return _Val(v.kind, self.module_forward(mod0, v.ref))
        if rule == "random":
            if v.kind == _S and self.training:  # one draw per branch: apply to m copies
                return _Val(_F, self.module_forward(mod0, self.fused(v)))
            if getattr(mod, "inplace", False) and v.kind == _S:
                self.fail(f"in-place {name} on a value shared by every branch")
            return _Val(v.kind, self.module_forward(mod0, v.ref))
        if v.kind == _S and rule in ("spatial", "flatten", "unflatten", "softmax"):
            return _Val(_S, self.module_forward(mod0, v.ref))
        if rule == "linear":
            if v.kind == _L:
                v = _Val(_F, self.fused(v))
            params = self.params(target, ("weight", "bias"))
            out = self.call(_linear, v.ref, v.kind, self.modules(target), params)
            return _Val(_F if v.kind == _S else _K, out)
        x = self.fused(v) if v.kind != _S or rule not in ("conv", "conv_same") else v.ref
        if rule in ("conv", "conv_same"):
            params = self.params(target, ("weight", "bias"))
            return _Val(_F, self.call(_conv, x, self.modules(target), v.kind == _S, self.conv_mode,
                                      rule == "conv_same", params))
        if rule in ("bn", "bn_act"):
            defer = self.uses.get(target, 0) == 1
            stats = ("running_mean", "running_var")
            params = self.params(target, ("weight", "bias", *stats), stats)
            out = self.call(_bn, x, self.modules(target), defer, params)
            if defer:
                self.pending.append(self.call(operator.getitem, out, 1))
                out = self.call(operator.getitem, out, 0)
            res = _Val(_F, out)
            if rule == "bn_act":
                res = self.act_parts(target, mod, res)
            return res
        if rule in ("frozen_bn", "frozen_bn_act"):
            names = ("weight", "bias", "running_mean", "running_var")  # all buffers in FrozenBatchNorm2d
            params = self.params(target, names, names)
            res = _Val(_F, self.call(_frozen_bn, x, self.modules(target), params))
            if rule == "frozen_bn_act":
                res = self.act_parts(target, mod, res)
            return res
        if rule == "gn":
            params = self.params(target, ("weight", "bias"))
            return _Val(_F, self.call(_group_norm, x, self.modules(target), params))
        if rule == "prelu":
            return _Val(_F, self.call(_prelu, x, self.modules(target)))
        mod_ref = self.g.get_attr(mod0)
        if rule == "spatial":
            k = _SPATIAL_MODULES.get(type(mod), 2)
            return _Val(_F, self.call(_spatial, mod_ref, k, x))
        if rule == "flatten":
            return _Val(_F, self.call(_flatten, x, mod.start_dim, mod.end_dim))
        if rule == "unflatten":
            return _Val(_F, self.call(_unflatten, x, m, mod.dim, tuple(mod.unflattened_size)))
        if rule == "softmax":
            if mod.dim is None:
                self.fail(f"{name} with dim=None (implicit dim) on a per-branch value")
            fn = {nn.Softmax: F.softmax, nn.LogSoftmax: F.log_softmax, nn.Softmin: F.softmin}[type(mod)]
            return _Val(_F, self.call(_dim_op, _fn_key(fn), 0, "dim", x, mod.dim))
        self.fail(f"internal: unhandled rule {rule}")  # pragma: no cover

    def act_parts(self, target: str, mod: nn.Module, v: _Val) -> _Val:
        """timm norm-act modules: the drop and act submodules after the normalisation."""
        for part in ("drop", "act"):
            sub = getattr(mod, part, None)
            if sub is not None:
                v = self.apply_module(f"{target}.{part}", sub, v)
        return v

    # -- functions and methods ---------------------------------------------------------------------------------
    def call_op(self, node: fx.Node) -> _Val:
        kinds = self.kinds_in(node.args, node.kwargs)
        is_method = node.op == "call_method"
        target = node.target
        name = target if is_method else getattr(target, "__name__", "")
        inplace = _is_inplace_call(node)
        first = node.args[0] if node.args else None
        first_kind = self.env[first].kind if isinstance(first, fx.Node) else _S
        random = self.is_random(node)

        if not is_method and target in _RANDOM_FACTORIES:
            self.fail("a random tensor created from scratch cannot be drawn per branch; no rule for that")
        if kinds <= {_S} and is_method and target == "new_empty":  # uninitialised, to be filled (randomly?) per branch
            return _Val(_F, self.call(_new_fused, self.env[first].ref, self.m, target, *self.shared(node.args[1:]),
                                      **self.shared(node.kwargs)))
        if kinds <= {_S}:
            if inplace and isinstance(first, fx.Node):
                self.fail("in-place op on a value shared by every branch (each branch would apply it again)")
            if random:
                if not isinstance(first, fx.Node):
                    self.fail("random op with no tensor input")
                return self.with_first(node, _Val(_F, self.fused(self.env[first])), _F)
            return self.copy_shared(node)
        if inplace and first_kind == _S:
            self.fail("in-place op on a value shared by every branch, with a per-branch operand")
        param_rule = {F.conv1d: self.rule_conv_f, F.conv2d: self.rule_conv_f, F.conv3d: self.rule_conv_f,
                      F.linear: self.rule_linear_f, F.batch_norm: self.rule_bn_f, F.group_norm: self.rule_gn_f}
        if not is_method and target in param_rule and first_kind != _L:
            return param_rule[target](node)
        if _is_shape_query(node) and first_kind == _L:  # shapes of per-branch parameters agree: branch 0's
            return _Val(_S, self.replicate_one(node, 0))
        if _F not in kinds and _K not in kinds and not self.has_act(node):
            return self.replicate(node)  # parameters and constants only: compute per branch
        # From here on: a fused or stacked input, or a shared activation meeting per-branch parameters.
        if not is_method and target is builtins.getattr:
            return self.rule_getattr(node)
        if is_method and target in ("size", "dim", "ndimension", "numel", "nelement"):
            return self.rule_size(node)
        if is_method and target in ("new_empty", "new_zeros", "new_ones", "new_full"):
            x = self.val(first)
            ref = self.fused(x) if x.kind == _L else x.ref  # only dtype/device are read
            return _Val(_F, self.call(_new_fused, ref, self.m, target, *self.shared(node.args[1:]),
                                      **self.shared(node.kwargs)))
        if is_method and target in _CAST_METHODS:
            return self.rule_cast(node)
        if (not is_method and (target in _EW_FUNCS or target in _EW_INPLACE_FUNCS or target in _RANDOM_FUNCS)) or (
            is_method and (target in _EW_METHODS or target in _RANDOM_METHODS or
                           (_is_inplace_method(target) and target[:-1] in _EW_METHODS))
        ):
            return self.rule_elementwise(node, inplace)
        if not is_method and target is operator.getitem:
            x = self.val(first)
            if x.kind not in (_F, _K):
                self.fail("indexing with a per-branch index")
            return _Val(_F, self.call(_getitem, self.fused(x), self.shared(node.args[1], "the index")))
        self.static_checks(node, name)
        fn = _fn_key(target)
        if not is_method and target in _DIM_FUNCS or is_method and target in _DIM_METHODS:
            pos, kw = _DIM_FUNCS[target] if not is_method else _DIM_METHODS[target]
            x = self.data_input(node)
            return _Val(_F, self.call(_dim_op, fn, pos, kw, x, *self.shared(node.args[1:]), **self.shared(node.kwargs)))
        if not is_method and (target in _SPATIAL_FUNCS or target in _SPATIAL_INDEXED_FUNCS):
            if target in _SPATIAL_INDEXED_FUNCS:
                ri = node.kwargs.get("return_indices", node.args[5] if len(node.args) > 5 and "max_pool" in name else
                                     (node.args[2] if len(node.args) > 2 and "adaptive" in name else False))
                if ri:
                    self.fail("pooling with return_indices")
                k = _SPATIAL_INDEXED_FUNCS[target]
            else:
                k = _SPATIAL_FUNCS[target]
            x = self.data_input(node)
            return _Val(_F, self.call(_spatial, fn, k, x, *self.shared(node.args[1:]), **self.shared(node.kwargs)))
        if (not is_method and target is torch.flatten) or (is_method and target == "flatten"):
            x = self.data_input(node)
            return _Val(_F, self.call(_flatten, x, *self.shared(node.args[1:]), **self.shared(node.kwargs)))
        if (not is_method and target is torch.unflatten) or (is_method and target == "unflatten"):
            x = self.data_input(node)
            return _Val(_F, self.call(_unflatten, x, self.m, *self.shared(node.args[1:]), **self.shared(node.kwargs)))
        if is_method and target in ("view", "reshape") or (not is_method and target is torch.reshape):
            x = self.data_input(node)
            if any(isinstance(a, torch.dtype) for a in node.args[1:]):
                self.fail("view as another dtype")
            method = "reshape" if not is_method else target
            return _Val(_F, self.call(_reshape, x, self.m, method, *self.shared(node.args[1:])))
        if is_method and target in ("view_as", "reshape_as"):
            x = self.data_input(node)
            other = self.val(node.args[1])
            if other.kind not in (_S, _F):
                self.fail(f"{target} of a {other.kind} value")
            return _Val(_F, self.call(_reshape_as, x, self.m, target, other.ref, other.kind == _F))
        if (not is_method and target is torch.squeeze) or (is_method and target == "squeeze"):
            x = self.data_input(node)
            return _Val(_F, self.call(_squeeze, x, self.m, *self.shared(node.args[1:]), **self.shared(node.kwargs)))
        if (not is_method and target is torch.unsqueeze) or (is_method and target == "unsqueeze"):
            x = self.data_input(node)
            return _Val(_F, self.call(_unsqueeze, x, *self.shared(node.args[1:]), **self.shared(node.kwargs)))
        if (not is_method and target in (torch.transpose, torch.swapaxes, torch.swapdims)) or (
            is_method and target in ("transpose", "swapaxes", "swapdims")
        ):
            x = self.data_input(node)
            return _Val(_F, self.call(_transpose, fn, x, *self.shared(node.args[1:]), **self.shared(node.kwargs)))
        if (not is_method and target is torch.permute) or (is_method and target == "permute"):
            x = self.data_input(node)
            return _Val(_F, self.call(_permute, fn, x, *self.shared(node.args[1:])))
        if not is_method and target is F.pad:
            x = self.data_input(node)
            return _Val(_F, self.call(_pad, x, self.m, *self.shared(node.args[1:]), **self.shared(node.kwargs)))
        if not is_method and name == "stochastic_depth" and "torchvision" in getattr(target, "__module__", ""):
            x = self.data_input(node)
            return _Val(_F, self.call(_stochastic_depth, x, self.m, *self.shared(node.args[1:]),
                                      **self.shared(node.kwargs)))
        hints = {
            "cat": "concatenation of per-branch values along channels (DenseNet-style) is not supported",
            "concat": "concatenation of per-branch values is not supported",
            "stack": "stacking per-branch values is not supported",
            "layer_norm": "layer norm normalises over the last axis (channels-last / tokens); not supported",
            "matmul": "matrix products of activations (attention) are not supported",
            "bmm": "matrix products of activations (attention) are not supported",
            "einsum": "einsum of activations is not supported",
            "scaled_dot_product_attention": "attention is not supported",
            "expand": "expand of a per-branch value is not supported",
            "expand_as": "expand of a per-branch value is not supported",
            "repeat": "repeat of a per-branch value is not supported",
            "split": "splitting a per-branch value is not supported",
            "chunk": "splitting a per-branch value is not supported",
        }
        self.fail(hints.get(name, f"no fusion rule for {_describe(node)} on per-branch inputs"))

    def static_checks(self, node: fx.Node, name: str) -> None:
        """Fail at build time, where the arguments are constants, on what the runtime helpers would reject."""
        rest = node.args[1:]
        if name == "permute":
            perm = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
            if all(isinstance(d, int) for d in perm) and perm and [d % len(perm) for d in perm][:2] != [0, 1]:
                self.fail(f"permute{tuple(perm)} moves the batch or branch axis (channels-last layouts are not "
                          "supported)")
        elif name in ("transpose", "swapaxes", "swapdims") and len(rest) == 2:
            a, b = rest
            if isinstance(a, int) and isinstance(b, int) and a >= 0 and b >= 0 and a != b and min(a, b) < 2:
                self.fail(f"transpose({a}, {b}) moves the batch or branch axis (channels-last layouts are not "
                          "supported)")
        elif name == "flatten":
            start = node.kwargs.get("start_dim", rest[0] if rest else 0)
            end = node.kwargs.get("end_dim", rest[1] if len(rest) > 1 else -1)
            if start == 0 and isinstance(end, int) and end != 0:
                self.fail("flatten(0, ...) merges the batch axis with the branch axis")
        elif name == "unsqueeze":
            d = node.kwargs.get("dim", rest[0] if rest else None)
            if isinstance(d, int) and 0 <= d < 2:
                self.fail(f"unsqueeze({d}) inserts an axis before the branch axis")
        elif (node.op == "call_method" and name in _DIM_METHODS) or node.target in _DIM_FUNCS:
            pos, kw = _DIM_METHODS[name] if node.op == "call_method" else _DIM_FUNCS[node.target]
            d = rest[pos] if len(rest) > pos else node.kwargs.get(kw, node.kwargs.get("axis"))
            if d is None and not any(isinstance(a, fx.Node) for a in rest):
                self.fail(f"{name} without dim acts across the batch and branch axes")
            dims = d if isinstance(d, (tuple, list)) else [d]
            if any(isinstance(x, int) and 0 <= x < 2 for x in dims):
                self.fail(f"{name} along dim={d!r} acts across the channel axis, which holds the branches")

    def is_random(self, node: fx.Node) -> bool:
        t = node.target
        if node.op == "call_method":
            return t in _RANDOM_METHODS
        if t not in _RANDOM_FUNCS:
            return False
        if t in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
                 F.rrelu, torch.dropout, torch.feature_dropout, torch.alpha_dropout, torch.feature_alpha_dropout):
            if t is F.rrelu:
                training = node.kwargs.get("training", node.args[3] if len(node.args) > 3 else False)
                p = 1.0
            else:
                training = node.kwargs.get("training", node.kwargs.get("train",
                                           node.args[2] if len(node.args) > 2 else True))
                p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
            if training is False or (isinstance(p, (int, float)) and p == 0):
                return False
        return True

    def with_first(self, node: fx.Node, first: _Val, kind: str) -> _Val:
        """Copy ``node`` with its first argument replaced (its other arguments must be shared)."""
        args = (first.ref, *self.shared(node.args[1:]))
        return _Val(kind, self.g.create_node(node.op, node.target, args, self.shared(node.kwargs)))

    def data_input(self, node: fx.Node) -> fx.Node:
        """The first argument as a fused value, the others being shared."""
        return self.fused(self.val(node.args[0]))

    def rule_getattr(self, node: fx.Node) -> _Val:
        x, attr = self.val(node.args[0]), node.args[1]
        if attr == "shape":
            return _Val(_S, self.call(_branch_shape, self.fused(x), self.m))
        if attr in _SHAPE_ATTRS:
            return _Val(_S, self.call(builtins.getattr, self.fused(x) if x.kind != _F else x.ref, attr))
        self.fail(f"attribute .{attr} of a per-branch value")

    def rule_size(self, node: fx.Node) -> _Val:
        x = self.fused(self.val(node.args[0]))
        t = node.target
        if t == "size":
            return _Val(_S, self.call(_branch_size, x, self.m, *self.shared(node.args[1:]), **self.shared(node.kwargs)))
        if t in ("numel", "nelement"):
            return _Val(_S, self.call(_branch_numel, x, self.m))
        return _Val(_S, self.g.call_method("dim", (x,)))

    def rule_cast(self, node: fx.Node) -> _Val:
        """``x.to(other)``, ``x.type_as(other)``, ``x.float()``...: the other arguments only carry a dtype, device or
        memory format, so any layout of theirs will do; the result has the kind of ``x``."""
        x = self.val(node.args[0])

        def raw(n: fx.Node) -> Any:
            v = self.env[n]
            return v.ref[0] if v.kind == _L else v.ref

        args, kwargs = fx.map_arg(node.args[1:], raw), fx.map_arg(node.kwargs, raw)
        if x.kind == _L:
            return _Val(_L, tuple(self.g.call_method(node.target, (r, *args), kwargs) for r in x.ref))
        out = self.g.call_method(node.target, (x.ref, *args), kwargs)
        if x.kind == _S and x.ref in self.acts:
            self.acts.add(out)
        return _Val(x.kind, out)

    def rule_elementwise(self, node: fx.Node, inplace: bool) -> _Val:
        vals = [self.val(a) for a in node.args]
        for k, a in node.kwargs.items():
            if isinstance(a, fx.Node) and self.env[a].kind != _S:
                self.fail(f"per-branch keyword argument {k}=")
        kwargs = self.shared(node.kwargs)
        nonshared = [i for i, v in enumerate(vals) if v.kind != _S]
        node_args = [i for i, v in enumerate(vals) if v.kind == _S and isinstance(v.ref, fx.Node)]
        if len(nonshared) == 1 and not node_args:
            i = nonshared[0]
            v = vals[i]
            if inplace and i != 0:
                self.fail("in-place op on a shared value with a per-branch operand")
            args = [w.ref for w in vals]
            if v.kind == _L:
                return self.replicate(node)
            return _Val(v.kind, self.g.create_node(node.op, node.target, tuple(args), kwargs))
        if inplace and vals[0].kind != _F:
            self.fail(f"in-place op on a {vals[0].kind} value with other tensor operands")
        kinds = []
        args = []
        for v in vals:
            if v.kind == _K:
                v = _Val(_F, self.fused(v))
            kinds.append(v.kind)
            args.append(v.ref)
        if _F not in kinds and _L not in kinds:  # pragma: no cover - excluded above
            self.fail("internal: no per-branch operand")
        return _Val(_F, self.call(_ew, _fn_key(node.target), tuple(kinds), self.m, inplace, *args, **kwargs))

    def bind_args(self, node: fx.Node, names: Sequence[str], defaults: dict[str, Any]) -> dict[str, _Val]:
        out = {k: _Val(_S, v) for k, v in defaults.items()}
        if len(node.args) > len(names):
            self.fail("unexpected positional arguments")
        for k, a in zip(names, node.args):
            out[k] = self.val(a)
        for k, a in node.kwargs.items():
            if k not in names:
                self.fail(f"unexpected keyword argument {k}=")
            out[k] = self.val(a)
        return out

    def require_shared(self, vals: dict[str, _Val], names: Iterable[str]) -> list[Any]:
        out = []
        for k in names:
            v = vals[k]
            if v.kind != _S:
                self.fail(f"argument {k} differs per branch; no rule for that")
            out.append(v.ref)
        return out

    def rule_conv_f(self, node: fx.Node) -> _Val:
        a = self.bind_args(node, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
                           {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1})
        x = a["input"]
        w = self.as_list(a["weight"], "the conv weight")
        b = self.as_list(a["bias"], "the conv bias")
        stride, padding, dilation, groups = self.require_shared(a, ("stride", "padding", "dilation", "groups"))
        if x.kind in (_K, _L):
            x = _Val(_F, self.fused(x))
        return _Val(_F, self.call(_conv_f, x.ref, x.kind == _S, self.conv_mode, w, b, stride, padding, dilation,
                                  groups))

    def rule_linear_f(self, node: fx.Node) -> _Val:
        a = self.bind_args(node, ("input", "weight", "bias"), {"bias": None})
        x = a["input"]
        w = self.as_list(a["weight"], "the linear weight")
        b = self.as_list(a["bias"], "the linear bias")
        if x.kind == _L:
            x = _Val(_F, self.fused(x))
        return _Val(_F if x.kind == _S else _K, self.call(_linear_f, x.ref, x.kind, w, b))

    def rule_bn_f(self, node: fx.Node) -> _Val:
        a = self.bind_args(
            node, ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
            {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5},
        )
        x = self.fused(a["input"])
        rm = self.as_list(a["running_mean"], "the running mean")
        rv = self.as_list(a["running_var"], "the running variance")
        w = self.as_list(a["weight"], "the batch-norm weight")
        b = self.as_list(a["bias"], "the batch-norm bias")
        training, momentum, eps = self.require_shared(a, ("training", "momentum", "eps"))
        if training is not False and rm is not None and a["running_mean"].kind == _S:
            self.fail("F.batch_norm in training updates statistics that are not per-branch buffers")
        return _Val(_F, self.call(_bn_f, x, self.m, rm, rv, w, b, training, momentum, eps))

    def rule_gn_f(self, node: fx.Node) -> _Val:
        a = self.bind_args(node, ("input", "num_groups", "weight", "bias", "eps"),
                           {"weight": None, "bias": None, "eps": 1e-5})
        x = self.fused(a["input"])
        groups, eps = self.require_shared(a, ("num_groups", "eps"))
        w = self.as_list(a["weight"], "the group-norm weight")
        b = self.as_list(a["bias"], "the group-norm bias")
        return _Val(_F, self.call(_group_norm_f, x, self.m, groups, w, b, eps))


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
                objs.append(_get_path(b, node.target))
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
    ``[b(f, **extra) for b in branches]`` (same values and gradients, to float tolerance).

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

    def __init__(self, branches: Sequence[nn.Module], training: bool, graph: fx.Graph, conv_mode: str) -> None:
        self.branches = tuple(branches)
        self.training = bool(training)
        self.conv_mode = conv_mode
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

    def __call__(self, f: Tensor, **extra: Any) -> list[Tensor]:
        return self._forward(f, **extra)

    def check(self, f: Tensor, **extra: Any) -> None:
        """Run the fused graph and branch 0 once on fake tensors (no computation), raising the
        :class:`FusionError` that a shape-dependent rule would raise at the first real call, or if the output
        shapes differ from the branch's. Buffers are restored afterwards (only version counters change)."""
        from torch._subclasses.fake_tensor import FakeTensorMode

        saved = [(t, t.detach().clone()) for b in self.branches for t in b.buffers()]
        try:
            with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
                outs = self._forward(f, **extra)
                ref = self.branches[0](f, **extra)
                shapes = [tuple(o.shape) if isinstance(o, Tensor) else None for o in outs]
                ref_shape = tuple(ref.shape)
        finally:
            with torch.no_grad():
                for t, v in saved:
                    t.copy_(v)
        for i, shape in enumerate(shapes):
            if shape != ref_shape:
                raise FusionError(f"fused branch {i} returns shape {shape}, the branch returns {ref_shape}")

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return fuse_branches, (list(self.branches), self.training, self.conv_mode)

    def __repr__(self) -> str:
        return (
            f"FusedBranches(branches={self.num_branches}, mode={'train' if self.training else 'eval'}, "
            f"conv_mode={self.conv_mode!r})"
        )


def fuse_branches(branches: Sequence[nn.Module], training: bool, conv_mode: str = "auto") -> FusedBranches:
    """Fuse structurally identical fx tails (ONE's ``model.branches``) into one graph for the given mode.

    ``training`` picks the graph (``train_graph`` or ``eval_graph`` of a ``DualGraphModule``; a plain
    ``GraphModule``'s ``.graph`` either way); it must match the mode the branches run in. ``conv_mode`` says how a
    convolution on a fused input runs: ``"grouped"``: one conv with ``groups * m`` (fewest kernels: GPUs);
    ``"split"``: ``m`` dense convs on the channel slices, outputs concatenated (for backends whose grouped
    convolutions are slow, such as oneDNN on CPU); ``"auto"`` (default): ``"split"`` for CPU tensors,
    ``"grouped"`` otherwise, decided at each call from the input's device. Convs on the shared trunk output with
    ``groups == 1`` and depthwise convs are always one conv.

    Raises :class:`FusionError` naming the node and op when a rule is missing (see the module docstring); the
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
    graph = _Builder(branches, graphs[0], bool(training), conv_mode).build()
    return FusedBranches(branches, training, graph, conv_mode)
