"""KD, DML, OKDDip, BYOT and PCL (OKDDip and PCL also with their branches fused) inside real training setups, as ONE
and OSAKD are tested: DDP on 2 CPU ranks equals one process on the whole batch (static graph and
find_unused_parameters), torch.compile traces the forward without a graph break and gives the eager loss."""
import pytest
import torch
from torch import nn

import kdwrap
from conftest import TinyNet
from dist_utils import run_two_ranks
from loop_utils import assert_compiles_without_graph_break, train_steps

STEPS, BATCH = 3, 8

# method -> its wrapper, from the same initial weights in every process. BYOT's feature term is summed over the
# batch (the reference code's), so it scales with each rank's batch under DDP: weight 0 here, its maths is tested
# against the reference in test_byot.py.
BUILDS = {
    "kd": lambda: kdwrap.kd(TinyNet(), TinyNet()),
    "dml": lambda: kdwrap.dml(TinyNet(), peers=2),
    "okddip": lambda: kdwrap.okddip(TinyNet(), branches=3),
    "byot": lambda: kdwrap.byot(TinyNet(), feature_weight=0.0),
    # Random views would differ between the ranks and the whole batch: every peer sees the batch as given here.
    "pcl": lambda: kdwrap.pcl(TinyNet(), branches=3, augment=None),
    # The branches as one fused graph (that returns the classifier inputs too) under DDP and torch.compile.
    "okddip-fused": lambda: kdwrap.okddip(TinyNet(), branches=3, execution="fused"),
    "pcl-fused": lambda: kdwrap.pcl(TinyNet(), branches=3, augment=None, execution="fused"),
}


def _batch(step):
    g = torch.Generator().manual_seed(7000 + step)
    return torch.randn(BATCH, 3, 16, 16, generator=g), torch.randint(0, 5, (BATCH,), generator=g)


def _make(method):
    torch.manual_seed(0)
    model, loss_fn = BUILDS[method]()
    for m in model.modules():  # per-rank batch statistics would differ from the whole batch's: use running stats
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model, loss_fn


def _ddp_worker(rank, method, find_unused, out):
    model, loss_fn = _make(method)
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused)
    train_steps(model, loss_fn, ddp, _batch, STEPS, rank)
    if rank == 0:
        torch.save(model.state_dict(), out)


@pytest.mark.parametrize("find_unused", [False, True])
@pytest.mark.parametrize("method", list(BUILDS))
def test_ddp_two_ranks_match_one_process_with_whole_batch(tmp_path, method, find_unused):
    out = tmp_path / "rank0.pt"
    run_two_ranks(_ddp_worker, method, find_unused, str(out))
    model, loss_fn = _make(method)
    train_steps(model, loss_fn, model, _batch, STEPS)
    ddp_state = torch.load(out)
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(ddp_state[key], value, atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.parametrize("method", list(BUILDS))
def test_torch_compile_has_no_graph_break_and_gives_the_eager_loss(method):
    assert_compiles_without_graph_break(lambda: _make(method), _batch)
