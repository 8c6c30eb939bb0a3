"""The runtime of the fused graph, part 2: convolutions, normalisations, Linear and PReLU over ``m`` branches,
with each branch's parameters and statistics read from its own modules at every call.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._layout import FUSED, SHARED, cat_param, fail, shared_to_fused, split_param

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
        fail(f"conv{k}d on a {x.ndim}-D (unbatched) input")
    if same:  # timm Conv2dSame: TF "same" padding computed from the input size (spatial axes only)
        from timm.layers.padding import pad_same

        x = pad_same(x, w0.shape[-2:], stride, dilation)
        padding = 0
    fn = _CONV[k]
    dense_shared = shared and groups == 1
    depthwise = w0.shape[1] == 1
    if not dense_shared and not depthwise and (mode == "split" or (mode == "auto" and x.device.type == "cpu")):
        xs = [x] * m if shared else list(x.chunk(m, 1))
        ws, bs = split_param(weights, m), split_param(biases, m)
        outs = [fn(xs[i], ws[i], bs[i], stride, padding, dilation, groups) for i in range(m)]
        return torch.cat(outs, 1)
    if shared and not dense_shared:
        x = shared_to_fused(x, m)
    groups = groups if dense_shared else groups * m
    return fn(x, cat_param(weights), cat_param(biases), stride, padding, dilation, groups)


def fused_conv(x: Tensor, convs: Sequence[nn.Module], shared: bool, mode: str, same: bool = False,
               params: Sequence[Tensor | None] | None = None) -> Tensor:
    """A conv module rule; ``params``: the fused (weight, bias) from :func:`pack_parameters`, else read from the
    modules."""
    c = convs[0]
    padding = c.padding
    if c.padding_mode != "zeros":
        x = F.pad(x, c._reversed_padding_repeated_twice, mode=c.padding_mode)
        padding = 0
    w, b = params if params is not None else ([cv.weight for cv in convs], [cv.bias for cv in convs])
    return _conv_t(x, shared, mode, len(convs), w, b, c.stride, padding, c.dilation, c.groups, same)


def fused_functional_conv(x: Tensor, shared: bool, mode: str, weight: Sequence[Tensor],
                          bias: Sequence[Tensor] | None = None, stride: Any = 1, padding: Any = 0, dilation: Any = 1,
                          groups: int = 1) -> Tensor:
    return _conv_t(x, shared, mode, len(weight), weight, bias, stride, padding, dilation, groups)


def _bn_core(
    x: Tensor, m: int, weight: Any, bias: Any, running: tuple[Tensor, Tensor] | None,
    means: Sequence[Tensor] | None, vars_: Sequence[Tensor] | None, nbts: Sequence[Tensor] | None,
    training: bool, track: bool, momentum: float | None, eps: float, bn_fn: Callable,
) -> tuple[Tensor, Any]:
    """Mirror of ``_BatchNorm.forward`` on concatenated tensors. ``weight``/``bias``: ``m`` tensors or fused;
    ``running``: the fused (mean, var) from :func:`pack_parameters`, else concatenated here from
    ``means``/``vars_`` (the branches' buffers, where updated statistics go back to). Returns the output and the
    pending buffer update ``(sources, destinations, counters)`` to apply with :func:`write_back_bn_stats`, or
    None."""
    w, b = cat_param(weight), cat_param(bias)
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


def write_back_bn_stats(pending: Iterable[Any]) -> None:
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


def fused_batch_norm(x: Tensor, bns: Sequence[nn.Module], defer: bool,
                     params: Sequence[Tensor | None] | None = None) -> Any:
    """A BatchNorm module rule (torch BatchNorm*d / SyncBatchNorm, timm BatchNormAct2d's normalisation part).
    ``params``: the fused (weight, bias, running_mean, running_var) from :func:`pack_parameters`, else read from
    the modules."""
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
        write_back_bn_stats([pending])
    return y


def fused_functional_batch_norm(x: Tensor, m: int, running_mean: Any, running_var: Any, weight: Any = None,
                                bias: Any = None, training: bool = False, momentum: float = 0.1,
                                eps: float = 1e-5) -> Tensor:
    """``F.batch_norm`` with per-branch (list) statistics and affine parameters; statistics copied back at once."""
    y, pending = _bn_core(
        x, m, weight, bias, None, running_mean, running_var, None, training, True, momentum, eps, F.batch_norm
    )
    if pending is not None:
        write_back_bn_stats([pending])
    return y


def fused_frozen_batch_norm(x: Tensor, bns: Sequence[nn.Module], params: Sequence[Tensor] | None = None) -> Tensor:
    """torchvision ``FrozenBatchNorm2d`` / timm ``FrozenBatchNormAct2d`` (normalisation part), same arithmetic.
    ``params``: the fused (weight, bias, running_mean, running_var) from :func:`pack_parameters`, else read from
    the modules."""
    if params is None:
        params = [torch.cat([getattr(b, k) for b in bns]) for k in ("weight", "bias", "running_mean", "running_var")]
    w, b_, rm, rv = [t.reshape(1, -1, 1, 1) for t in params]
    scale = w * (rv + bns[0].eps).rsqrt()
    return x * scale + (b_ - rm * scale)


def _group_norm_t(x: Tensor, m: int, num_groups: int, weights: Any, biases: Any, eps: float) -> Tensor:
    return F.group_norm(x, num_groups * m, cat_param(weights), cat_param(biases), eps)


def fused_group_norm(x: Tensor, gns: Sequence[nn.Module], params: Sequence[Tensor | None] | None = None) -> Tensor:
    g = gns[0]
    w, b = params if params is not None else ([n.weight for n in gns], [n.bias for n in gns])
    return _group_norm_t(x, len(gns), g.num_groups, w, b, g.eps)


def fused_functional_group_norm(
    x: Tensor, m: int, num_groups: int, weight: Any = None, bias: Any = None, eps: float = 1e-5
) -> Tensor:
    return _group_norm_t(x, m, num_groups, weight, bias, eps)


def fused_prelu(x: Tensor, mods: Sequence[nn.Module]) -> Tensor:
    m = len(mods)
    width = x.shape[1] // m if x.ndim >= 2 else 1
    w = torch.cat([p.weight.expand(width) if p.weight.numel() == 1 else p.weight for p in mods])
    return F.prelu(x, w)


def _linear_t(x: Tensor, kind: str, m: int, weights: Sequence[Tensor] | Tensor,
              biases: Sequence[Tensor | None] | Tensor | None) -> Tensor:
    """Linear per branch (on the last axis). A shared input: one matmul with concatenated weights, fused output.
    A fused (B, m*N.., D) or stacked (m, B, .., D) input: a per-branch batched matmul, stacked output (m, B, .., O).
    ``weights``/``biases``: ``m`` tensors or fused."""
    w, b = cat_param(weights), cat_param(biases)
    if kind == SHARED:
        y = F.linear(x, w, b)
        if x.ndim == 2:
            return y
        if x.ndim < 2:
            fail(f"Linear on a {x.ndim}-D shared value has no batch axis")
        return y.unflatten(-1, (m, -1)).movedim(-2, 1).flatten(1, 2)
    if kind == FUSED:
        x = x.unflatten(1, (m, -1)).movedim(1, 0)
    shape = x.shape
    if x.ndim > 3:
        x = x.flatten(1, -2)
    w = w.unflatten(0, (m, -1)).transpose(1, 2)  # (m, D, O)
    y = torch.baddbmm(b.view(m, 1, -1), x, w) if b is not None else torch.bmm(x, w)
    return y if len(shape) <= 3 else y.unflatten(1, shape[1:-1])


def fused_linear(x: Tensor, kind: str, mods: Sequence[nn.Module],
                 params: Sequence[Tensor | None] | None = None) -> Tensor:
    w, b = params if params is not None else ([l.weight for l in mods], [l.bias for l in mods])
    return _linear_t(x, kind, len(mods), w, b)


def fused_functional_linear(x: Tensor, kind: str, weight: Sequence[Tensor],
                            bias: Sequence[Tensor] | None = None) -> Tensor:
    return _linear_t(x, kind, len(weight), weight, bias)


def split_fused(x: Tensor, m: int) -> list[Tensor]:
    return list(x.chunk(m, 1))


def split_stacked(y: Tensor) -> list[Tensor]:
    return list(y.unbind(0))


def zip_branches(per_value: Sequence[list[Tensor]]) -> list[tuple[Tensor, ...]]:
    """Per returned value the ``m`` branches' tensors -> per branch the tuple of its returned values."""
    return [tuple(values) for values in zip(*per_value)]
