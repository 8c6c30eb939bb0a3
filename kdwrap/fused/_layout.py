"""The runtime of the fused graph, part 1: the four value layouts (shared, fused, stacked, list), conversions
between them, and the shape, elementwise and indexing helpers the generated graph calls.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import FusionError

# Value kinds (see docs/fused.md).
SHARED, FUSED, STACKED, LIST = "shared", "fused", "stacked", "list"


class Val:
    """A value of the fused graph: its layout (one of the kinds above) and its node(s) in the new graph."""

    __slots__ = ("kind", "ref")

    def __init__(self, kind: str, ref: Any) -> None:
        self.kind, self.ref = kind, ref  # ref: a new-graph Node / constant, or (for lists) a tuple of m of them


# ----------------------------------------------------------------------------------------------------------------
# Runtime helpers: the fused graph calls these. They read modules' current parameters, buffers and flags.
# ----------------------------------------------------------------------------------------------------------------


def fail(msg: str) -> None:
    raise FusionError(msg)


def shared_to_fused(x: Tensor, m: int) -> Tensor:
    """Shared -> fused: ``m`` copies along axis 1 (``torch.cat`` keeps channels_last)."""
    if not isinstance(x, Tensor) or x.ndim < 2:
        fail(f"a shared value of shape {tuple(getattr(x, 'shape', ()))} cannot be laid out per branch along axis 1")
    return torch.cat([x] * m, 1)


def list_to_fused(xs: Sequence[Tensor]) -> Tensor:
    if xs[0].ndim < 2:
        fail(f"per-branch values of shape {tuple(xs[0].shape)} cannot be laid out per branch along axis 1")
    return torch.cat(list(xs), 1)


def stacked_to_fused(y: Tensor) -> Tensor:
    """(m, B, C, ...) -> (B, m*C, ...)."""
    if y.ndim < 3:
        fail(f"stacked per-branch values of shape {tuple(y.shape)} have no axis to fuse along")
    return y.movedim(0, 1).flatten(1, 2)


def branch_shape(x: Tensor, m: int) -> torch.Size:
    """The per-branch shape of a fused value."""
    return torch.Size((x.shape[0], x.shape[1] // m, *x.shape[2:]))


def branch_size(x: Tensor, m: int, *args: Any, **kwargs: Any) -> Any:
    shape = branch_shape(x, m)
    dim = args[0] if args else kwargs.get("dim")
    return shape if dim is None else shape[dim]


def branch_numel(x: Tensor, m: int) -> int:
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
            fail(f"dim={dim!r} is not a (tuple of) int")
        out.append(d % ndim if ndim else 0)
    return out


# Functions passed as arguments of the helpers below are named by a key (fx writes arguments as source code):
# ".name" is the tensor method ``name``; any other key is looked up here.
_FUNCTIONS: dict[str, Callable] = {}


def function_key(fn: Any) -> str:
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


def cat_param(ts: Sequence[Tensor | None] | Tensor | None) -> Tensor | None:
    """The fused (concatenated along axis 0) form of a per-branch parameter given as ``m`` tensors; a tensor that is
    already fused (from :func:`pack_parameters`) or None passes through."""
    if ts is None or isinstance(ts, Tensor):
        return ts
    return None if ts[0] is None else torch.cat(list(ts))


def split_param(t: Sequence[Tensor | None] | Tensor | None, m: int) -> list[Any]:
    """The ``m`` per-branch parts of a parameter given as ``m`` tensors or fused (views, no copy)."""
    if t is None:
        return [None] * m
    return list(t.chunk(m)) if isinstance(t, Tensor) else list(t)


def pack_parameters(groups: Sequence[Sequence[Sequence[Tensor]]]) -> list[list[Tensor]]:
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


def fused_elementwise(fn: Any, kinds: tuple[str, ...], m: int, inplace: bool, *args: Any, **kwargs: Any) -> Any:
    """An elementwise op with several operands, at least one of them per-branch (fused or list); returns fused.

    Direct when every fused operand has the same width and no shared tensor reaches axis 1; otherwise in the
    ``(B, m, C, ...)`` view where broadcasting matches the per-branch broadcasting exactly.
    """
    nd = 0
    for a, k in zip(args, kinds):
        if k == LIST:
            nd = max(nd, a[0].ndim)
        elif isinstance(a, Tensor):
            nd = max(nd, a.ndim)
    widths = set()
    direct = True
    for a, k in zip(args, kinds):
        if k == FUSED:
            if a.ndim != nd:
                fail(
                    f"{_fn_name(fn)}: a per-branch operand of ndim {a.ndim} is broadcast against ndim {nd}, which "
                    "would move the branch axis"
                )
            widths.add(a.shape[1])
        elif k == LIST:
            direct = False
        elif isinstance(a, Tensor) and a.ndim >= nd - 1 and a.ndim > 0:
            if a.shape[a.ndim - nd + 1] != 1:
                direct = False
    if nd < 2:
        fail(f"{_fn_name(fn)}: per-branch result of ndim {nd} has no axis to fuse along")
    if direct and len(widths) <= 1:
        return _call(fn, *args, **kwargs)
    new = []
    for a, k in zip(args, kinds):
        if k == FUSED:
            a = a.unflatten(1, (m, -1))
        elif k == LIST:
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


def fused_dim_op(fn: Any, pos: int, kw: str, x: Tensor, *args: Any, **kwargs: Any) -> Any:
    """An op acting along ``dim`` (reductions, softmax, normalize...): fine on fused values for dims >= 2."""
    if len(args) > pos:
        dim = args[pos]
    else:
        dim = kwargs.get(kw, kwargs.get("axis"))
    if dim is None:
        fail(f"{_fn_name(fn)} without dim would act across the batch and branch axes")
    if min(_norm_dims(dim, x.ndim)) < 2:
        fail(f"{_fn_name(fn)} along dim={dim!r} acts across the channel axis, which holds the branches")
    return _call(fn, x, *args, **kwargs)


def fused_spatial(fn: Any, k: int, x: Tensor, *args: Any, **kwargs: Any) -> Any:
    """Pooling / padding modules and functions over the last ``k`` axes: channel-independent on batched input."""
    if k and x.ndim != k + 2:
        fail(f"{_fn_name(fn)} on a {x.ndim}-D (unbatched) input would act on the branch axis")
    return _call(fn, x, *args, **kwargs)


def fused_flatten(x: Tensor, start_dim: int = 0, end_dim: int = -1) -> Tensor:
    s, e = start_dim % x.ndim, end_dim % x.ndim
    if s == 0 and e > 0:
        fail(f"flatten({start_dim}, {end_dim}) merges the batch axis with the branch axis")
    return x.flatten(start_dim, end_dim)


def _resolve_shape(shape: Sequence[int], numel: int) -> list[int]:
    shape = list(shape)
    known, free = 1, -1
    for i, s in enumerate(shape):
        if not isinstance(s, int):
            fail(f"reshape to {shape!r}: not a shape")
        if s == -1:
            free = i
        else:
            known = known * s
    if free >= 0:
        shape[free] = numel // known if known else 0
    return shape


def fused_reshape(x: Tensor, m: int, method: str, *shape: Any) -> Tensor:
    """``view``/``reshape`` to a per-branch shape: valid iff it keeps the batch axis (then branch-major holds)."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    per = branch_shape(x, m)
    target = _resolve_shape(shape, _prod(per))
    if len(target) < 2 or target[0] != per[0]:
        fail(f".{method}{tuple(shape)} of a per-branch {tuple(per)} value does not keep the batch axis first")
    return getattr(x, method)(target[0], target[1] * m, *target[2:])


def fused_reshape_as(x: Tensor, m: int, method: str, other: Tensor, other_fused: bool) -> Tensor:
    return fused_reshape(x, m, method[: -len("_as")], branch_shape(other, m) if other_fused else other.shape)


def fused_unflatten(x: Tensor, m: int, dim: int, sizes: Sequence[int]) -> Tensor:
    d = dim % x.ndim
    if d == 0:
        fail("unflatten of the batch axis")
    if d >= 2:
        return x.unflatten(dim, sizes)
    per = branch_shape(x, m)
    sizes = _resolve_shape(sizes, per[1])
    return fused_reshape(x, m, "reshape", per[0], *sizes, *per[2:])


def fused_squeeze(x: Tensor, m: int, *args: Any, **kwargs: Any) -> Tensor:
    per = branch_shape(x, m)
    dim = args[0] if args else kwargs.get("dim")
    dims = list(range(x.ndim)) if dim is None else _norm_dims(dim, x.ndim)
    for d in dims:
        if d < 2 and per[d] == 1:
            fail("squeeze would drop the batch or branch axis")
    return x.squeeze(*args, **kwargs)


def fused_unsqueeze(x: Tensor, dim: int) -> Tensor:
    if dim % (x.ndim + 1) < 2:
        fail(f"unsqueeze({dim}) inserts an axis before the branch axis")
    return x.unsqueeze(dim)


def fused_transpose(fn: Any, x: Tensor, d0: int, d1: int) -> Tensor:
    a, b = _norm_dims((d0, d1), x.ndim)
    if a != b and min(a, b) < 2:
        fail(f"transpose({d0}, {d1}) moves the batch or branch axis (channels-last layouts are not supported)")
    return _call(fn, x, d0, d1)


def fused_permute(fn: Any, x: Tensor, *dims: Any) -> Tensor:
    perm = dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
    p = _norm_dims(perm, x.ndim)
    if p[:2] != [0, 1]:
        fail(f"permute{tuple(perm)} moves the batch or branch axis (channels-last layouts are not supported)")
    return _call(fn, x, *dims)


def fused_getitem(x: Tensor, idx: Any) -> Tensor:
    items = list(idx) if isinstance(idx, tuple) else [idx]
    count = 0
    for i in items:
        if isinstance(i, (Tensor, list)):
            fail("advanced (tensor/list) indexing of a per-branch value")
        if i is not None and i is not Ellipsis:
            count += 1
    full: list[Any] = []
    for i in items:
        full.extend([slice(None)] * (x.ndim - count) if i is Ellipsis else [i])
    lead = full[:2]
    if lead and not isinstance(lead[0], slice):
        fail(f"indexing {idx!r} removes or adds an axis before the branch axis")
    if len(lead) > 1 and lead[1] != slice(None):
        fail(f"indexing {idx!r} selects along the channel axis, which holds the branches")
    return x[idx]


def fused_pad(x: Tensor, m: int, pad: Sequence[int], mode: str = "constant", value: float | None = None) -> Tensor:
    k = len(pad) // 2
    if k <= x.ndim - 2:
        return F.pad(x, pad, mode, value)
    if k == x.ndim - 1 and mode == "constant":  # pads the channel axis too (option-A shortcut): per branch
        return F.pad(x.unflatten(1, (m, -1)), pad, mode, value).flatten(1, 2)
    fail(f"F.pad({list(pad)}, mode={mode!r}) of a {x.ndim}-D per-branch value pads the batch axis or is not constant")


def new_fused(x: Tensor, m: int, method: str, *args: Any, **kwargs: Any) -> Tensor:
    """``x.new_empty(size)`` & co: ``m`` per-branch tensors, laid out fused (axis 1 is ``m`` times larger)."""
    if method == "new_full":
        size, rest = args[0], args[1:]
    elif len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
        size, rest = args[0], ()
    else:
        size, rest = args, ()
    size = list(size)
    if len(size) < 2:
        fail(f".{method}({size}) creates a per-branch tensor with no axis to fuse along")
    size[1] = size[1] * m
    return getattr(x, method)(size, *rest, **kwargs)


def fused_stochastic_depth(x: Tensor, m: int, p: float, mode: str, training: bool = True) -> Tensor:
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
