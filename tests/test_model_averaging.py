"""Weight averaging around a kdwrap model (timm's ModelEmaV2/V3, torch's AveragedModel), and the exported model of
the average: the wrapper's state_dict holds tensors only, as the code that walks it assumes."""
import pytest
import torch
from timm.utils import ModelEmaV2, ModelEmaV3
from torch.optim.swa_utils import AveragedModel

import kdwrap
from conftest import TinyNet

# name -> (build around the model, update from the model after a step)
AVERAGERS = {
    "timm ModelEmaV2": (lambda m: ModelEmaV2(m, decay=0.5), lambda avg, m, step: avg.update(m)),
    "timm ModelEmaV3": (lambda m: ModelEmaV3(m, decay=0.5), lambda avg, m, step: avg.update(m, step=step)),
    "torch AveragedModel": (lambda m: AveragedModel(m), lambda avg, m, step: avg.update_parameters(m)),
}
WRAPPERS = {
    "one": lambda: kdwrap.one(TinyNet(), branches=3),
    "osakd": lambda: kdwrap.osakd(TinyNet(), k=2),
    "kd": lambda: kdwrap.kd(TinyNet(), TinyNet()),
    "dml": lambda: kdwrap.dml(TinyNet(), peers=2),
    "okddip": lambda: kdwrap.okddip(TinyNet(), branches=3),
    "byot": lambda: kdwrap.byot(TinyNet()),
    "pcl": lambda: kdwrap.pcl(TinyNet(), branches=3),
}


@pytest.mark.parametrize("method", list(WRAPPERS))
def test_state_dict_holds_tensors_only(method):
    model, _ = WRAPPERS[method]()
    assert all(isinstance(v, torch.Tensor) for v in model.state_dict().values())


@pytest.mark.parametrize("averager", list(AVERAGERS))
@pytest.mark.parametrize("method", list(WRAPPERS))
def test_the_average_trains_and_exports_the_users_model(method, averager):
    model, loss_fn = WRAPPERS[method]()
    build, update = AVERAGERS[averager]
    avg = build(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        update(avg, model, step)
    averaged = avg.module
    deployed = kdwrap.export(averaged)
    assert type(deployed) is TinyNet
    mine = dict(model.named_parameters())
    assert any(not torch.equal(p, mine[n]) for n, p in averaged.named_parameters())  # an average, not a copy
    averaged.eval(), deployed.eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), averaged(x))


def test_a_checkpoint_of_an_earlier_version_still_loads_and_still_checks_its_settings():
    model, _ = kdwrap.one(TinyNet(), branches=3)
    state = model.state_dict()
    legacy = {**state, "_extra_state": {"split": model.split, "branches": 3}}
    fresh, _ = kdwrap.one(TinyNet(), branches=3)
    fresh.load_state_dict(legacy)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in state.items())
    with pytest.raises(ValueError, match="branches=2"):
        fresh.load_state_dict({**state, "_extra_state": {"split": model.split, "branches": 2}})
