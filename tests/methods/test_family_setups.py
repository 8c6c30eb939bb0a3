"""KD, DML, OKDDip, BYOT and PCL (OKDDip and PCL also with their branches fused) inside real training setups, as ONE
and OSAKD are tested: DDP on 2 CPU ranks equals one process on the whole batch (static graph and
find_unused_parameters), torch.compile traces the forward without a graph break and gives the eager loss."""
import pytest
import torch
from torch import nn

import kdwrap
from conftest import TinyNet
from dist_utils import run_two_ranks
from loop_utils import assert_compiles_without_graph_break, assert_states_close, lockstep_rank_states, reference_states

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


def _ddp_worker(rank, method, find_unused, states_path, out):
    model, loss_fn = _make(method)
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused)
    after = lockstep_rank_states(model, loss_fn, ddp, _batch, torch.load(states_path), rank)
    if rank == 0:
        torch.save(after, out)


@pytest.mark.parametrize("find_unused", [False, True])
@pytest.mark.parametrize("method", list(BUILDS))
def test_ddp_two_ranks_match_one_process_with_whole_batch(tmp_path, method, find_unused):
    """Three SGD steps in lockstep: each DDP step starts from the one-process run's state before that step (model,
    optimizer, loss), so each comparison is of one step at float tolerance: the all-reduced mean of two half-batch
    gradients sums in another order than the whole batch's, and compared after n free-running steps that rounding
    grows with each step (by how much depends on the CPU's kernels). After every step: the whole model state (PCL's
    temporal means and their clock included) and the loss's state agree, and every weight that learns moved."""
    model, loss_fn = _make(method)
    states = reference_states(model, loss_fn, _batch, STEPS)
    torch.save(states, tmp_path / "states.pt")
    out = tmp_path / "rank0.pt"
    run_two_ranks(_ddp_worker, method, find_unused, str(tmp_path / "states.pt"), str(out))
    after = torch.load(out)
    assert len(after) == STEPS
    learns = {k for k, p in model.named_parameters()}
    for step, (got, want) in enumerate(zip(after, states[1:], strict=True)):
        assert_states_close(got["model"], want["model"], f"step {step}: model")
        assert_states_close(got["loss"], want["loss"], f"step {step}: loss")
        still = [k for k in learns if torch.equal(want["model"][k], states[step]["model"][k])]
        assert still == [], f"step {step}: {still} did not move"


@pytest.mark.parametrize("method", list(BUILDS))
def test_torch_compile_has_no_graph_break_and_gives_the_eager_loss(method):
    assert_compiles_without_graph_break(lambda: _make(method), _batch)
