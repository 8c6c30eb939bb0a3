"""kdwrap.integrations.timm: KDTask trains every kdwrap method through timm's task API the way timm's train.py drives
a task: Mixup/CutMix soft targets, EMA, checkpoints that resume_task_checkpoint continues bit for bit, DDP on 2 ranks
equal to one process, torch.compile; its eval model is what kdwrap.export returns, current at every step."""
from __future__ import annotations

import copy
from pathlib import Path


import pytest
import timm
import torch
from torch import nn

try:
    from timm.task import load_task_ema_checkpoint, resume_task_checkpoint
except ImportError:
    pytest.skip("KDTask needs timm's task API with checkpoint state: pip install 'timm>=1.0.27'", allow_module_level=True)
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import load_checkpoint
from timm.optim import create_optimizer_v2
from timm.utils import CheckpointSaver

import kdwrap
from dist_utils import run_two_ranks
from integration_recipes import run_recipe
from kdwrap.integrations import timm as kd_timm
from kdwrap.integrations.timm import KDTask

NET = "test_resnet"  # a tiny timm ResNet with BatchNorm; 32x32 inputs
# method -> its options for a few quick steps (ONE and OKDDip ramp up, so that resuming must restore the clock)
OPTIONS = {
    "one": lambda: dict(branches=2, rampup_steps=4),
    "osakd": lambda: dict(k=2, bank_size=16),
    "kd": lambda: dict(teacher=make_net(seed=1)),
    "dml": lambda: dict(),
    "okddip": lambda: dict(branches=3, rampup_steps=4),
    "byot": lambda: dict(),
    "pcl": lambda: dict(branches=2, rampup_steps=4, augment=None),  # random views: no expected output to compare
}
# method -> the export options of the model whose training-mode forward the task's output is: PCL deploys the
# temporal mean of the peer that trains, and trains (and outputs) the live peer.
TRAINED = {"pcl": dict(mean=False)}


def make_net(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return timm.create_model(NET, pretrained=False, num_classes=10)


def make_task(method: str, seed: int = 0, **kwargs) -> KDTask:
    torch.manual_seed(seed)  # the branches and peers kdwrap adds start from the global RNG
    return KDTask(make_net(seed), method=method, verbose=False, **OPTIONS.get(method, dict)(), **kwargs)


def hard_batch(step: int, batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)


def mixed_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch mixed as timm's Mixup mixes one, with a fixed ratio: the same inputs and soft targets in every run."""
    x, y = hard_batch(step)
    lam = 0.7
    return x * lam + x.flip(0) * (1 - lam), mixup_target(y, 10, lam, smoothing=0.1)


def deployed_ce(task: KDTask, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The cross-entropy term of the deployed model among the loss's parts (per branch, peer or exit for some)."""
    wrapper = task.loss_fn.model
    ce = parts["ce"]
    index = {"one": getattr(wrapper, "branch", 0), "dml": getattr(wrapper, "peer", 0), "okddip": -1, "byot": -1,
             "pcl": getattr(wrapper, "branch", 0)}
    return ce if ce.dim() == 0 else ce[index[task.method]]


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


@pytest.mark.parametrize("method", list(kdwrap.METHODS))
def test_each_method_trains_on_mixup_targets_with_ema_and_evaluates_the_exported_model(method):
    task = make_task(method)
    model = task.get_trainable_module()
    eval_model = task.get_eval_model()  # taken once, before training, as train.py takes it
    task.setup_ema(decay=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    targets = []
    for step in range(2):
        x, y = mixup(*hard_batch(step))
        targets.append(y)
        expected = kdwrap.export(model, **TRAINED.get(method, {}))(x)  # its training-mode forward, on a copy
        result = task(x, y)
        assert result.keys() >= {"loss", "output", "ce"}
        torch.testing.assert_close(result["output"], expected)
        # every method's cross-entropy takes the dense soft targets as timm's SoftTargetCrossEntropy does
        torch.testing.assert_close(deployed_ce(task, result), SoftTargetCrossEntropy()(result["output"], y))
        opt.zero_grad()
        result["loss"].backward()
        opt.step()
        task.update_ema(step=step + 1)
    assert task.loss_fn.step == 2
    if method == "osakd":  # its bank labels the mixed samples by their dominant class
        torch.testing.assert_close(task.loss_fn.bank.get()[1], torch.cat([y.argmax(1) for y in targets]))

    x = hard_batch(9)[0]
    for ema, wrapper in ((False, model), (True, task.get_trainable_module(ema=True).module)):
        exported = kdwrap.export(wrapper)
        served = eval_model if not ema else task.get_eval_model(ema=True)
        assert type(served) is type(exported) is type(make_net())
        assert_same_state(served.state_dict(), exported.state_dict())  # current after the steps, not a copy
        with torch.no_grad():
            torch.testing.assert_close(served.eval()(x), exported.eval()(x))
    averaged = task.get_eval_model(ema=True).state_dict()
    assert any(not torch.equal(v, averaged[k]) for k, v in eval_model.state_dict().items() if v.is_floating_point())


def test_the_criterion_says_which_cross_entropy():
    x, y = hard_batch(0)
    for criterion, kwargs in (
        (LabelSmoothingCrossEntropy(0.1), {}),
        (nn.CrossEntropyLoss(label_smoothing=0.1), {}),
        (None, dict(criterion_kwargs=dict(smoothing=0.1))),
    ):
        task = make_task("osakd", criterion=criterion, **kwargs)
        result = task(x, y)
        torch.testing.assert_close(result["ce"], LabelSmoothingCrossEntropy(0.1)(result["output"], y))
    with pytest.raises(TypeError, match="own cross-entropy terms"):
        make_task("osakd", criterion=BinaryCrossEntropy())
    with pytest.raises(ValueError, match="not both"):
        make_task("osakd", criterion=nn.CrossEntropyLoss(), criterion_kwargs=dict(smoothing=0.1))


def _train(task: KDTask, opt: torch.optim.Optimizer, steps: range) -> list[float]:
    """The steps of timm's train_one_epoch: task forward, backward, optimizer step, EMA update."""
    losses = []
    for step in steps:
        result = task(*mixed_batch(step))
        opt.zero_grad()
        result["loss"].backward()
        opt.step()
        task.update_ema(step=step + 1)
        losses.append(result["loss"].item())
    return losses


def _sgd(task: KDTask) -> torch.optim.Optimizer:
    return create_optimizer_v2(task.get_trainable_module(), "sgd", lr=0.05, momentum=0.9, weight_decay=1e-4)


@pytest.mark.parametrize("method", ["one", "osakd"])
def test_resume_task_checkpoint_continues_bit_exactly_and_the_checkpoint_is_the_deployed_model(method, tmp_path):
    task = make_task(method)
    opt = _sgd(task)
    task.setup_ema(decay=0.9)
    saver = CheckpointSaver(model=task.get_trainable_module(), optimizer=opt, task=task,
                            checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
    _train(task, opt, range(2))
    saver.save_recovery(epoch=0, batch_idx=1)
    path = str(tmp_path / "recovery-0-1.pth.tar")
    uninterrupted = _train(task, opt, range(2, 4))
    checkpoint = torch.load(path, weights_only=True)
    for ema in ("", "_ema"):  # the deployed model's tensors are the wrapper's, written once
        held = {t.untyped_storage().data_ptr() for t in checkpoint["task_state" + ema]["model"].values()
                if isinstance(t, torch.Tensor)}
        assert {t.untyped_storage().data_ptr() for t in checkpoint["state_dict" + ema].values()} <= held

    resumed = make_task(method, seed=1)  # other initial weights: everything must come from the checkpoint
    resumed_opt = _sgd(resumed)
    resume_task_checkpoint(resumed, path, optimizer=resumed_opt)  # as train.py resumes, in this order
    resumed.setup_ema(decay=0.9)
    load_task_ema_checkpoint(resumed, path)
    assert resumed.loss_fn.step == 2

    # state_dict / state_dict_ema load into a fresh model of the user's class (timm.create_model, validate.py)
    deployed = make_net(seed=2)
    load_checkpoint(deployed, path, use_ema=False)
    assert_same_state(deployed.state_dict(), kdwrap.export(resumed.get_trainable_module()).state_dict())
    assert_same_state(timm.create_model(NET, num_classes=10, checkpoint_path=path).state_dict(),
                      resumed.get_eval_model(ema=True).state_dict())

    assert _train(resumed, resumed_opt, range(2, 4)) == uninterrupted
    assert_same_state(resumed.get_trainable_module().state_dict(), task.get_trainable_module().state_dict())
    assert_same_state(resumed.loss_fn.state_dict(), task.loss_fn.state_dict())
    assert_same_state(resumed.get_trainable_module(ema=True).state_dict(),
                      task.get_trainable_module(ema=True).state_dict())


def test_the_eval_model_follows_the_task_to_another_dtype():
    task = make_task("one")
    eval_model = task.get_eval_model()
    task.double()  # gives the wrapper's buffers new tensors
    x, y = mixed_batch(0)
    task(x.double(), y.double())["loss"].backward()  # a step's BatchNorm statistics
    exported = kdwrap.export(task.get_trainable_module())
    assert next(eval_model.parameters()).dtype == torch.float64
    assert_same_state(eval_model.state_dict(), exported.state_dict())


def test_a_checkpoint_without_the_kdwrap_state_is_refused(tmp_path):
    plain = tmp_path / "plain.pth.tar"
    torch.save({"state_dict": make_net().state_dict()}, plain)
    with pytest.raises(kdwrap.errors.CheckpointError, match="--initial-checkpoint"):
        resume_task_checkpoint(make_task("osakd"), str(plain))
    other = tmp_path / "dml.pth.tar"
    torch.save(make_task("dml").get_checkpoint_state(), other)
    with pytest.raises(kdwrap.errors.CheckpointError, match="'dml', but this task trains 'osakd'"):
        resume_task_checkpoint(make_task("osakd"), str(other))


def test_a_method_without_deployed_pieces_is_refused_by_name(monkeypatch):
    monkeypatch.delitem(kd_timm.DEPLOYED_PIECES, "osakd")
    with pytest.raises(NotImplementedError, match=r"DEPLOYED_PIECES\['osakd'\]"):
        make_task("osakd")


def _frozen_bn_one_task() -> KDTask:
    task = make_task("one")
    for m in task.get_trainable_module().modules():  # per-rank batch statistics differ from the whole batch's
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return task


def _ddp_worker(rank: int, folder: str) -> None:
    """Each step from the one-process run's state before it (lockstep): one step's float noise is compared, not
    that of several steps grown through the optimizer, which depends on the CPU's kernels."""
    task = _frozen_bn_one_task()
    opt = _sgd(task)  # before prepare_distributed, as in train.py
    task.prepare_distributed()
    for step in range(2):
        before = torch.load(Path(folder) / f"before{step}.pt", weights_only=False)
        task.load_task_state(before["task"])
        opt.load_state_dict(before["optimizer"])
        x, y = mixed_batch(step)
        half = slice(rank * 4, rank * 4 + 4)
        result = task(x[half], y[half])
        opt.zero_grad()
        result["loss"].backward()
        opt.step()
        if rank == 0:
            torch.save(task.get_task_state(), Path(folder) / f"ddp_after{step}.pt")


def test_prepare_distributed_on_two_ranks_equals_one_process_on_the_whole_batch(tmp_path):
    task = _frozen_bn_one_task()
    opt = _sgd(task)
    after = []
    for step in range(2):
        torch.save({"task": task.get_task_state(), "optimizer": opt.state_dict()}, tmp_path / f"before{step}.pt")
        result = task(*mixed_batch(step))
        opt.zero_grad()
        result["loss"].backward()
        opt.step()
        after.append(copy.deepcopy(task.get_task_state()))
    run_two_ranks(_ddp_worker, str(tmp_path))
    for step, reference in enumerate(after):
        ddp = torch.load(tmp_path / f"ddp_after{step}.pt", weights_only=False)
        for part in ("model", "loss"):
            assert ddp[part].keys() == reference[part].keys()
            for key, value in reference[part].items():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    torch.testing.assert_close(ddp[part][key], value, atol=1e-5, rtol=1e-4,
                                               msg=f"step {step}: {part} {key}")
                else:
                    assert ddp[part][key] == value if not isinstance(value, torch.Tensor) else \
                        torch.equal(ddp[part][key], value), f"step {step}: {part} {key}"
    # the step moved every branch and the gate (so the comparison above covers them)
    first = torch.load(tmp_path / "before0.pt", weights_only=False)["task"]["model"]
    moved = {k.split(".")[0] + "." + k.split(".")[1] for k, v in after[-1]["model"].items()
             if v.is_floating_point() and not torch.equal(v, first[k]) and k.startswith("branches.")}
    assert moved == {"branches.0", "branches.1"}  # both of the two branches


def test_compile_traces_without_graph_break_and_gives_the_eager_loss():
    counters = torch._dynamo.utils.counters
    torch._dynamo.reset()
    counters.clear()
    task, eager = make_task("one"), make_task("one")
    eval_model = task.compile(backend="eager")
    x, y = mixed_batch(0)
    result = task(x, y)
    result["loss"].backward()
    torch.testing.assert_close(result["loss"], eager(x, y)["loss"])
    assert task.get_eval_model() is eval_model
    with torch.no_grad():
        torch.testing.assert_close(eval_model.eval()(x), kdwrap.export(task.get_trainable_module()).eval()(x))
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_timm_optimizers_skip_weight_decay_where_the_users_model_says():
    net = timm.create_model("test_vit", pretrained=False, num_classes=10, img_size=32)
    task = KDTask(net, method="dml", verbose=False)
    model = task.get_trainable_module()
    names = {id(p): n for n, p in model.named_parameters()}
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    undecayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {f"peers.{i}.{n}" for i in (0, 1) for n in ("pos_embed", "cls_token")} <= undecayed
    assert "peers.1.patch_embed.proj.weight" not in undecayed


def test_the_timm_recipe_of_the_docs_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = run_recipe("timm's task API", blocks=1)  # the train.py patch: tests/integrations/test_timm_train.py
    assert namespace["resumed"].loss_fn.step == 4  # the ramp-up clock of the 4 steps before the checkpoint
    assert (tmp_path / "kd-run" / "model_best.pth.tar").is_file()
    assert {"loss", "deployed_ce", "ce_ensemble", "ramp_weight"} == namespace["train_metrics"].keys()


# method -> the classifiers AGC leaves out: every branch's, peer's and exit's, and PCL's ensemble classifier
# (test_resnet's classifier is `fc`). ONE's gate and OKDDip's attention output no class logits: they are clipped.
CLASSIFIER_PREFIXES = {
    "one": ["branches.0.fc", "branches.1.fc"],
    "okddip": ["branches.0.fc", "branches.1.fc", "branches.2.fc"],
    "pcl": ["branches.0.fc", "branches.1.fc", "ensemble"],
    "byot": ["body.fc", "heads.0.fc", "heads.1.fc", "heads.2.fc"],
    "osakd": ["model.fc"],
    "kd": ["student.fc"],
    "dml": ["peers.0.fc", "peers.1.fc"],
}


@pytest.mark.parametrize("method", list(kdwrap.METHODS))
def test_agc_clips_everything_but_the_classifiers_of_every_branch_peer_and_exit(method):
    task = make_task(method)
    named = dict(task.get_trainable_module().named_parameters())
    heads = {f"{prefix}.{p}" for prefix in CLASSIFIER_PREFIXES[method] for p in ("weight", "bias")}
    assert heads <= named.keys()
    clipped = {id(p) for p in task.get_clip_parameters(exclude_head=True)}
    assert {n for n, p in named.items() if id(p) not in clipped} == heads
    assert len(clipped) == len(named) - len(heads)
    assert len(task.get_clip_parameters(exclude_head=False)) == len(named)
    if method == "one":
        assert all(id(p) in clipped for p in task.get_trainable_module().gate.parameters())


def test_agc_refuses_a_method_without_its_classifiers_by_name(monkeypatch):
    task = make_task("osakd")
    monkeypatch.delitem(kd_timm.CLASSIFIERS, "osakd")
    with pytest.raises(NotImplementedError, match=r"CLASSIFIERS\['osakd'\].*--clip-mode norm"):
        task.get_clip_parameters(exclude_head=True)


def test_prepare_distributed_on_the_cpu_takes_trains_py_device_ids(tmp_path):
    """train.py passes device_ids=[device] on every device; DDP refuses device ids for a CPU module."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        task = _frozen_bn_one_task()
        opt = _sgd(task)
        task.prepare_distributed(device_ids=[torch.device("cpu")])
        assert isinstance(task.get_trainable_module(), nn.parallel.DistributedDataParallel)
        before = task.get_eval_model().fc.weight.detach().clone()
        result = task(*mixed_batch(0))
        opt.zero_grad()
        result["loss"].backward()
        opt.step()
        assert not torch.equal(task.get_eval_model().fc.weight, before)
    finally:
        torch.distributed.destroy_process_group()
