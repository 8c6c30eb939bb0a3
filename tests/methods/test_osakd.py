from __future__ import annotations

import copy
import io
import os
import pickle
import socket
from collections import deque

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import kdwrap
from kdwrap.knn import knn_soft_labels
from kdwrap.methods.osakd import DEFAULT_ALPHA, OSAKDLoss, OSAKDModel, build_osakd


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class AuxNet(nn.Module):
    """Inception-like: (logits, aux) in training, logits in eval."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.aux = nn.Linear(6, 4)

    def forward(self, x):
        if self.training:
            return self.fc(x), self.aux(x)
        return self.fc(x)


class DictNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return {"logits": self.fc(x), "features": x}


def assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key, value in a.items():
        assert torch.equal(value, b[key]) if torch.is_tensor(value) else value == b[key], key


def reference_loss(z, y, k, alpha, bank: deque, distill="mse"):
    """METHODS.md, written out with loops, in float64; ``bank`` is a deque(maxlen=bank_size) of (p, label)."""
    z = z.detach().double()
    p = z.softmax(1)
    b, c = z.shape
    ref = list(bank) if len(bank) >= k else []
    ref += [(p[i], int(y[i])) for i in range(b)]
    off = len(ref) - b
    s = torch.zeros(b, c, dtype=torch.float64)
    for i in range(b):
        d = sorted((float(((p[i] - v) ** 2).sum()), j) for j, (v, _) in enumerate(ref) if j != off + i)[:k]
        for _, j in d:
            s[i, ref[j][1]] += 1.0 / len(d)
    ce = F.cross_entropy(z, y)
    if distill == "mse":
        dist_term = ((p - s) ** 2).sum(1).mean()
    else:
        dist_term = (torch.xlogy(s, s) - s * p.log()).sum(1).mean()
    bank.extend((p[i], int(y[i])) for i in range(b))
    return alpha * ce + (1 - alpha) * dist_term, s


# ------------------------------------------------------------------------------------------------------ the loss
@pytest.mark.parametrize("distill", ["mse", "kl"])
def test_loss_matches_reference_over_steps(distill):
    torch.manual_seed(0)
    net = nn.Linear(6, 4)
    model, loss_fn = kdwrap.osakd(net, k=5, alpha=0.7, bank_size=10, distill=distill)
    bank: deque = deque(maxlen=10)
    fills = []
    for step in range(5):  # in-batch (0 < 5), in-batch (4 < 5), bank+batch, wrapped bank, ...
        x, y = torch.randn(4, 6) * 2, torch.randint(0, 4, (4,))
        z = model(x)
        loss = loss_fn(z, y)
        ref, s = reference_loss(z, y, 5, 0.7, bank, distill)
        assert abs(loss.item() - ref.item()) < 1e-6, step
        torch.testing.assert_close(loss_fn.soft_labels.double(), s)
        fills.append(int(loss_fn.parts["bank_fill"]))
    assert fills == [4, 8, 10, 10, 10]
    assert set(loss_fn.parts) == {"loss", "ce", "distill", "bank_fill", "soft_true_mass", "soft_one_hot",
                                  "distill_grad_ratio"}
    assert all(not v.requires_grad for v in loss_fn.parts.values())


def test_in_batch_mode_bank_size_zero():
    torch.manual_seed(1)
    model, loss_fn = kdwrap.osakd(nn.Linear(6, 3), k=3, bank_size=0)
    for _ in range(3):
        x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
        z = model(x)
        loss = loss_fn(z, y)
        ref, _ = reference_loss(z, y, 3, DEFAULT_ALPHA, deque(maxlen=0))
        assert abs(loss.item() - ref.item()) < 1e-6
        assert int(loss_fn.parts["bank_fill"]) == 0
    assert list(loss_fn.state_dict()) == ["_extra_state", "bank.vectors", "bank.labels", "bank.ptr", "bank.count"]
    assert loss_fn.state_dict()["_extra_state"] == {"step": 3}


def test_alpha_one_is_exactly_cross_entropy():
    torch.manual_seed(2)
    model, loss_fn = kdwrap.osakd(nn.Linear(6, 4), alpha=1.0, k=2, bank_size=8)
    for _ in range(3):
        x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
        z = model(x)
        assert torch.equal(loss_fn(z, y), F.cross_entropy(z, y))


def test_gradient_reaches_model_and_soft_labels_are_constants():
    torch.manual_seed(3)
    model, loss_fn = kdwrap.osakd(nn.Identity(), k=3, alpha=0.5, bank_size=0)
    z = torch.randn(6, 4, requires_grad=True)
    y = torch.randint(0, 4, (6,))
    loss_fn(model(z), y).backward()
    s = loss_fn.soft_labels
    assert not s.requires_grad and s.grad_fn is None
    z2 = z.detach().clone().requires_grad_(True)
    p = z2.softmax(1)
    (0.5 * F.cross_entropy(z2, y) + 0.5 * ((p - s) ** 2).sum(1).mean()).backward()
    torch.testing.assert_close(z.grad, z2.grad)

    net = SmallCNN()
    model, loss_fn = kdwrap.osakd(net, k=2, bank_size=16)
    loss_fn(model(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 3])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_bank_is_updated_after_the_soft_labels_and_holds_detached_p():
    torch.manual_seed(4)
    model, loss_fn = kdwrap.osakd(nn.Linear(6, 4), k=2, bank_size=32)
    x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
    z = model(x)
    loss_fn(z, y)
    # First step: in-batch soft labels, then the bank holds exactly this batch.
    torch.testing.assert_close(loss_fn.soft_labels, knn_soft_labels(z.softmax(1), y, 4, 2))
    v, lab = loss_fn.bank.get()
    torch.testing.assert_close(v, z.detach().softmax(1))
    assert torch.equal(lab, y) and not v.requires_grad


def test_soft_targets_from_mixup():
    torch.manual_seed(5)
    model, loss_fn = kdwrap.osakd(nn.Linear(6, 4), k=2, bank_size=16)
    x = torch.randn(4, 6)
    y_soft = torch.tensor([[0.7, 0.3, 0, 0], [0, 0.2, 0.8, 0], [0, 0, 0.4, 0.6], [1.0, 0, 0, 0]])
    z = model(x)
    loss_fn(z, y_soft)
    torch.testing.assert_close(loss_fn.parts["ce"], F.cross_entropy(z, y_soft).detach())
    assert loss_fn.bank.get()[1].tolist() == [0, 2, 3, 0]  # argmax of the soft targets


def test_eval_mode_is_plain_cross_entropy_and_leaves_the_bank():
    torch.manual_seed(6)
    model, loss_fn = kdwrap.osakd(nn.Linear(6, 4), k=2, bank_size=16)
    loss_fn(model(torch.randn(4, 6)), torch.tensor([0, 1, 2, 3]))
    state = copy.deepcopy(loss_fn.state_dict())
    model.eval()
    x, y = torch.randn(7, 6), torch.randint(0, 4, (7,))
    for _ in range(2):
        with torch.no_grad():
            z = model(x)
            assert torch.equal(loss_fn(z, y), F.cross_entropy(z, y))
    assert set(loss_fn.parts) == {"loss", "ce", "bank_fill"}
    assert_same_state(loss_fn.state_dict(), state)


def test_capture_protocol_errors():
    model, loss_fn = kdwrap.osakd(nn.Linear(6, 4), k=2, bank_size=16)
    y = torch.tensor([0, 1, 2])
    with pytest.raises(RuntimeError, match="without a preceding forward"):
        loss_fn(torch.randn(3, 4), y)
    z = model(torch.randn(3, 6))
    loss_fn(z, y)
    with pytest.raises(RuntimeError, match="twice for one forward"):
        loss_fn(z, y)
    model(torch.randn(3, 6))
    with pytest.raises(RuntimeError, match="last forward"):
        loss_fn(torch.randn(2, 4), y[:2])


def test_invalid_labels():
    model, loss_fn = kdwrap.osakd(nn.Linear(6, 4), k=2, bank_size=16)
    z = model(torch.randn(3, 6))
    with pytest.raises(ValueError, match=r"\[0, 4\).*\[0, 4\]"):
        loss_fn(z, torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        loss_fn(z, torch.tensor([0, -1, 2]))
    with pytest.raises(TypeError, match=r"float dtype.*y.long\(\)"):
        loss_fn(z, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"shape \(3,\).*view\(-1\)"):
        loss_fn(z, torch.tensor([[0], [1], [2]]))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        loss_fn(z, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="int class indices"):
        loss_fn(z, torch.tensor([True, False, True]))
    with pytest.raises(TypeError, match="torch.Tensor"):
        loss_fn(z, [0, 1, 2])
    loss_fn(z, torch.tensor([0, 1, 3], dtype=torch.int32))  # any integer dtype is fine


def test_k_larger_than_available_uses_all_and_single_sample_distills_nothing():
    model, loss_fn = kdwrap.osakd(nn.Identity(), k=8, bank_size=64)
    z = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 0.0]])
    loss_fn(model(z), torch.tensor([0, 1, 2]))  # 2 neighbours each, not 8
    torch.testing.assert_close(loss_fn.soft_labels.sum(1), torch.ones(3))
    torch.testing.assert_close(loss_fn.soft_labels[2], torch.tensor([0.5, 0.5, 0.0]))
    # One sample, empty bank: no neighbour at all, s = p, so the distillation term and its gradient are zero.
    model, loss_fn = kdwrap.osakd(nn.Identity(), k=8, bank_size=64, alpha=0.0)
    z = torch.randn(1, 3, requires_grad=True)
    loss = loss_fn(model(z), torch.tensor([1]))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


def test_non_finite_outputs_never_become_neighbours():
    model, loss_fn = kdwrap.osakd(nn.Identity(), k=2, bank_size=8)
    z = torch.tensor([[float("nan"), 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    loss_fn(model(z), torch.tensor([2, 0, 1]))
    z2 = torch.tensor([[3.0, 0.1, 0.0], [0.1, 3.0, 0.0]])
    loss_fn(model(z2), torch.tensor([0, 1]))
    assert torch.isfinite(loss_fn.parts["loss"])
    assert loss_fn.soft_labels[:, 2].sum() == 0  # the NaN sample's label (2) is nobody's neighbour


def test_autocast_computes_in_float32():
    torch.manual_seed(7)
    net = nn.Linear(6, 4)
    model, loss_fn = kdwrap.osakd(net, k=2, bank_size=0)
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = model(x)
        loss = loss_fn(z, y)
    assert z.dtype == torch.bfloat16 and loss.dtype == torch.float32
    ref, _ = reference_loss(z.float(), y, 2, DEFAULT_ALPHA, deque(maxlen=0))
    assert abs(loss.item() - ref.item()) < 1e-6


def test_state_dict_round_trip_resumes_the_bank():
    torch.manual_seed(8)
    net = nn.Linear(6, 4)
    model, loss_fn = kdwrap.osakd(net, k=3, bank_size=12)
    for _ in range(4):
        loss_fn(model(torch.randn(5, 6)), torch.randint(0, 4, (5,)))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "loss": loss_fn.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    model2, loss_fn2 = kdwrap.osakd(nn.Linear(6, 4), k=3, bank_size=12)
    model2.load_state_dict(ckpt["model"])
    loss_fn2.load_state_dict(ckpt["loss"])
    assert len(loss_fn2.bank) == 12 and int(loss_fn2.bank.ptr) == int(loss_fn.bank.ptr)
    x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
    assert torch.equal(loss_fn(model(x), y), loss_fn2(model2(x), y))
    assert_same_state(loss_fn.state_dict(), loss_fn2.state_dict())


def test_faiss_backend_gives_the_same_loss():
    pytest.importorskip("faiss", reason="faiss is an optional extra: pip install 'kdwrap[faiss]'")
    torch.manual_seed(9)
    net = nn.Linear(6, 5)
    m1, l1 = kdwrap.osakd(net, k=4, bank_size=20, backend="torch")
    m2, l2 = kdwrap.osakd(net, k=4, bank_size=20, backend="faiss")
    for _ in range(4):
        x, y = torch.randn(8, 6) * 2, torch.randint(0, 5, (8,))
        torch.testing.assert_close(l1(m1(x), y), l2(m2(x), y))


# --------------------------------------------------------------------------------------------- model and export
def test_forward_returns_exactly_what_the_net_returns():
    net = SmallCNN()
    model, _ = kdwrap.osakd(net)
    x = torch.randn(2, 3, 8, 8)
    out = model(x)
    assert type(out) is torch.Tensor and out.shape == (2, 5)
    model.eval()
    assert torch.equal(model(x), net.eval()(x))
    assert isinstance(model, OSAKDModel) and model.method == "osakd" and model.model is net


def test_tuple_and_dict_outputs_need_output():
    model, loss_fn = kdwrap.osakd(AuxNet(), output=0, k=2, bank_size=8)
    out = model(torch.randn(4, 6))
    assert isinstance(out, tuple) and len(out) == 2
    loss_fn(out, torch.tensor([0, 1, 2, 3]))
    model.eval()
    assert isinstance(model(torch.randn(4, 6)), torch.Tensor)

    model, loss_fn = kdwrap.osakd(DictNet(), output="logits", k=2, bank_size=8)
    loss_fn(model(torch.randn(4, 6)), torch.tensor([0, 1, 2, 3]))

    model, _ = kdwrap.osakd(AuxNet(), k=2, bank_size=8)
    with pytest.raises(TypeError, match="output=0"):
        model(torch.randn(4, 6))
    model, _ = kdwrap.osakd(DictNet(), k=2, bank_size=8)
    with pytest.raises(TypeError, match=r"keys \['logits', 'features'\].*output='logits'"):
        model(torch.randn(4, 6))
    model, _ = kdwrap.osakd(DictNet(), output="nope", k=2, bank_size=8)
    with pytest.raises(TypeError, match="does not name"):
        model(torch.randn(4, 6))


def test_export_is_the_plain_net():
    net = SmallCNN()
    model, loss_fn = kdwrap.osakd(net, k=2, bank_size=16)
    for _ in range(2):
        loss_fn(model(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 3])).backward()
    exported = kdwrap.export(model)
    assert type(exported) is type(net) and exported is not net
    assert exported.state_dict().keys() == net.state_dict().keys()
    for key, value in net.state_dict().items():
        assert torch.equal(exported.state_dict()[key], value)
    for m in exported.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        assert not any("kdwrap" in type(v).__module__ for v in vars(m).values())
    assert all(p.grad is None for p in exported.parameters())
    blob = pickle.dumps(exported)
    assert b"kdwrap" not in blob
    restored = pickle.loads(blob)
    x = torch.randn(2, 3, 8, 8)
    exported.eval()
    restored.eval()
    torch.testing.assert_close(restored(x), exported(x))
    assert model.export(copy_model=False) is net
    with pytest.raises(TypeError, match="no branch or ensemble"):
        kdwrap.export(model, branch=1)


@pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")  # deprecated, but still how many users deploy
def test_export_works_with_torch_export_and_torchscript():
    torch.manual_seed(10)
    model, loss_fn = kdwrap.osakd(SmallCNN(), k=2, bank_size=16)
    loss_fn(model(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 3]))
    net = kdwrap.export(model).eval()
    x = torch.randn(2, 3, 8, 8)
    program = torch.export.export(net, (x,))
    torch.testing.assert_close(program.module()(x), net(x))
    torch.testing.assert_close(torch.jit.script(net)(x), net(x))
    torch.testing.assert_close(torch.jit.trace(net, (x,))(x), net(x))


def test_summary_and_wrap_entry_point():
    model, _ = kdwrap.wrap(SmallCNN(), "osakd", k=4, bank_size=64)
    text = kdwrap.summary(model, input_size=(1, 3, 8, 8))
    assert "OSAKD" in text and "4-NN" in text and "64" in text and "SmallCNN" in text
    model, _ = kdwrap.osakd(SmallCNN(), bank_size=0)
    assert "in-batch" in kdwrap.summary(model)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"k": 0}, ValueError, "k=0 is invalid"),
        ({"k": 2.5}, TypeError, "k must be an int"),
        ({"k": True}, TypeError, "k must be an int"),
        ({"alpha": -0.1}, ValueError, r"outside \[0, 1\]"),
        ({"alpha": 1.5}, ValueError, r"outside \[0, 1\]"),
        ({"alpha": "0.9"}, TypeError, "alpha must be a float"),
        ({"bank_size": -1}, ValueError, "bank_size=-1 is invalid.*0 for in-batch"),
        ({"bank_size": 4, "k": 8}, ValueError, "smaller than k=8.*bank_size >= 8"),
        ({"backend": "annoy"}, ValueError, "valid backends: auto, torch, faiss"),
        ({"distance": "l1"}, ValueError, "valid distances: l2, cosine"),
        ({"distill": "ce"}, ValueError, "valid distills: mse, kl"),
        ({"output": 1.0}, TypeError, "output must be"),
    ],
)
def test_argument_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        build_osakd(nn.Linear(3, 2), **kwargs)


def test_loss_types_and_state():
    model, loss_fn = kdwrap.osakd(nn.Linear(3, 2), k=2, bank_size=8)
    assert isinstance(loss_fn, OSAKDLoss) and isinstance(loss_fn, kdwrap.KDLoss)
    assert loss_fn.model is model
    assert not any(k.startswith("model") for k in loss_fn.state_dict())  # the weights live in the model only


# ---------------------------------------------------------------------------------------------------- distributed
DDP_BATCH = {0: 6, 1: 4}


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model, loss_fn = kdwrap.osakd(nn.Linear(5, 4), k=2, bank_size=40)
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(100 + rank)
        local = []
        for _ in range(3):
            b = DDP_BATCH[rank]
            x = torch.randn(b, 5, generator=g)
            y = torch.randint(0, 2, (b,), generator=g) + 2 * rank  # rank 0: {0, 1}, rank 1: {2, 3}
            z = ddp(x)
            loss = loss_fn(z, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            local.append((z.detach().softmax(1), y))
        torch.save({"bank": loss_fn.state_dict(), "local": local}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_banks_identical_and_hold_both_ranks(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert_same_state(r0["bank"], r1["bank"])
    # 3 steps x (6 + 4) = 30 entries: per step rank 0's then rank 1's.
    expected_v = torch.cat([torch.cat([r0["local"][t][0], r1["local"][t][0]]) for t in range(3)])
    expected_y = torch.cat([torch.cat([r0["local"][t][1], r1["local"][t][1]]) for t in range(3)])
    assert int(r0["bank"]["bank.count"]) == 30
    torch.testing.assert_close(r0["bank"]["bank.vectors"][:30], expected_v)
    assert torch.equal(r0["bank"]["bank.labels"][:30], expected_y)
    assert set(expected_y.tolist()) >= {0, 2} and set(expected_y.tolist()) <= {0, 1, 2, 3}


def test_auto_backend_times_torch_and_faiss_once_the_bank_is_full():
    pytest.importorskip("faiss", reason="faiss is an optional extra: pip install 'kdwrap[faiss]'")
    model, loss_fn = kdwrap.osakd(nn.Identity(), k=4, bank_size=32)
    ref_model, reference = kdwrap.osakd(nn.Identity(), k=4, bank_size=32, backend="torch")
    g = torch.Generator().manual_seed(0)
    for step in range(6):
        z, y = torch.randn(16, 5, generator=g) * 3, torch.randint(0, 5, (16,), generator=g)
        loss_fn(model(z), y)
        reference(ref_model(z), y)
        # A filling bank changes shape every step: nothing is timed until it is full (after step 1).
        assert list(loss_fn.backend_timings) == ([] if step < 2 else [(16, 5, 32)])
        torch.testing.assert_close(loss_fn.soft_labels, reference.soft_labels)  # either backend: the same labels
    assert set(loss_fn.backend_timings[(16, 5, 32)]) == {"torch", "faiss"}

    fixed_model, fixed = kdwrap.osakd(nn.Identity(), k=4, bank_size=16)
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(3):
            fixed(fixed_model(torch.randn(16, 5)), torch.randint(0, 5, (16,)))
    finally:
        torch.use_deterministic_algorithms(False)
    assert fixed.backend_timings == {}  # a timed choice could differ between runs
