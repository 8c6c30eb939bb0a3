"""FSDP2 (`fully_shard`) on 2 CPU processes (gloo): both methods train sharded; a full state dict exports."""
import pytest
import torch

import kdwrap
from conftest import TinyNet
from dist_utils import run_two_ranks


def _worker(rank, method, out):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model, loss_fn = kdwrap.wrap(TinyNet(), method=method)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(10 + rank)
    losses = []
    for _ in range(3):
        x, y = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 5, (4,), generator=g)
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save({"state": state, "losses": losses, "loss_fn": loss_fn.state_dict()}, out)


@pytest.mark.parametrize("method", ["one", "osakd"])
def test_fully_shard_trains_and_the_full_state_dict_exports(tmp_path, method):
    out = tmp_path / "full.pt"
    run_two_ranks(_worker, method, str(out))
    saved = torch.load(out)
    assert all(torch.isfinite(torch.tensor(saved["losses"])))
    torch.manual_seed(0)
    model, loss_fn = kdwrap.wrap(TinyNet(), method=method)
    initial = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    model.load_state_dict(saved["state"])
    loss_fn.load_state_dict(saved["loss_fn"])
    assert any(not torch.equal(initial[k], v) for k, v in model.state_dict().items() if k in initial)
    if method == "osakd":  # the bank holds both ranks' entries: 3 steps x 2 ranks x 4
        assert len(loss_fn.bank) == 24
    model.eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(kdwrap.export(model).eval()(x), model(x), atol=1e-5, rtol=1e-5)
