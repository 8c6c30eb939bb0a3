"""kdwrap in timm's own train.py: examples/timm_train_py.patch is a well-formed patch, its calls exist with the
arguments it passes, and docs/integrations.md shows it verbatim; what those calls do in train.py's places: stop on
a kdwrap option or checkpoint train.py would misuse, with the fix; take accumulation_steps from --grad-accum-steps;
log the summary, the deployed model's cross-entropy and the loss's scalar parts; validate ONE's ensemble on request.

Whether the patch applies to timm's train.py was checked by hand against the releases docs/integrations.md names:
the tests fetch nothing and vendor no timm file."""
from __future__ import annotations

import argparse
import ast
import inspect
import logging
import re

import pytest
import timm
import torch
import torch.nn.functional as F

pytest.importorskip("timm.task", reason="kdwrap.integrations.timm needs timm's task API: pip install 'timm>=1.0.27'")
from timm.utils import CheckpointSaver

import kdwrap
from integration_recipes import DOC
from kdwrap.integrations import timm_train as kdwrap_train

PATCH = DOC.parents[1] / "examples" / "timm_train_py.patch"
HUNK = re.compile(r"^@@ -(\d+),(\d+) \+(\d+),(\d+) @@")


def train_py_args(*argv: str) -> argparse.Namespace:
    """Parse ``argv`` as the patched train.py does: its own arguments the helpers read, then kdwrap's, then the
    check train.py's _parse_args runs."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--resume", default="", type=str)
    parser.add_argument("--grad-accum-steps", type=int, default=1)
    parser.add_argument("--kd-model-name", default=None, type=str)
    parser.add_argument("--model-ema-force-cpu", action="store_true", default=False)
    parser.add_argument("--img-size", type=int, default=None)
    kdwrap_train.add_arguments(parser)
    args = parser.parse_args(list(argv))
    args.rank, args.world_size, args.distributed = 0, 1, False  # utils.init_distributed_device sets them
    kdwrap_train.check_args(args)
    return args


def make_net() -> torch.nn.Module:
    return timm.create_model("test_resnet", pretrained=False, num_classes=10)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)


def _calls(text: str) -> list[ast.Call]:
    """The ``kdwrap_train.<name>(...)`` calls in ``text``, parsed."""
    calls = []
    for match in re.finditer(r"kdwrap_train\.\w+\(", text):
        depth, end = 0, match.end() - 1
        for end in range(match.end() - 1, len(text)):
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            if depth == 0:
                break
        calls.append(ast.parse(text[match.start():end + 1], mode="eval").body)
    return calls


def test_the_patch_is_well_formed_calls_what_exists_and_is_what_the_docs_show():
    text = PATCH.read_text()
    lines = text.splitlines()
    assert lines[:2] == ["--- a/train.py", "+++ b/train.py"]
    hunks, delta, i = [], 0, 2
    while i < len(lines):
        old_start, old_count, new_start, new_count = map(int, HUNK.match(lines[i]).groups())
        assert new_start == old_start + delta, lines[i]
        body = []
        i += 1
        while i < len(lines) and not lines[i].startswith("@@"):
            assert lines[i][:1] in (" ", "+", "-"), lines[i]
            body.append(lines[i])
            i += 1
        assert sum(line[0] in " -" for line in body) == old_count, body  # what git apply and patch count
        assert sum(line[0] in " +" for line in body) == new_count, body
        assert body[0][0] == body[-1][0] == " " and sum(line[0] == " " for line in body[:3]) == 3, body
        delta += new_count - old_count
        hunks.append(body)
    assert len(hunks) == 7
    # two lines of train.py change, the choice of the task and the epoch's train metrics; the rest is added
    assert [line for body in hunks for line in body if line[0] == "-"] == [
        "-    if args.kd_model_name is not None:", "-    return OrderedDict([('loss', loss_avg)])"]
    added = "\n".join(line[1:] for body in hunks for line in body if line[0] == "+")
    calls = _calls(added)
    assert {c.func.attr for c in calls} == set(kdwrap_train.__all__) - {"ACCUMULATING"}
    for call in calls:  # the arguments the patch passes bind to the helper's signature
        inspect.signature(getattr(kdwrap_train, call.func.attr)).bind(
            *call.args, **{k.arg: k.value for k in call.keywords})
    # docs/integrations.md shows the file itself
    section = re.search(r"^## timm's task API\n(.*?)(?=^## |\Z)", DOC.read_text(), re.S | re.M).group(1)
    assert re.search(r"^```diff\n(.*?)^```", section, re.S | re.M).group(1) == text


def test_mistakes_train_py_would_hide_stop_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="--kdwrap-kwargs without --kdwrap would train without kdwrap; add --kdwrap"):
        train_py_args("--kdwrap-kwargs", "branches=3")
    with pytest.raises(ValueError, match="--kdwrap-eval-ensemble without --kdwrap"):
        train_py_args("--kdwrap-eval-ensemble")

    # a kdwrap checkpoint resumed without --kdwrap: the flags it needs, from the checkpoint's own args
    args = train_py_args("--kdwrap", "one", "--kdwrap-kwargs", "branches=2", "rampup_steps=4")
    args.model = "test_resnet"  # what CheckpointSaver reads of train.py's arguments
    task = kdwrap_train.create_task(args, make_net(), None)
    optimizer = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.1)
    saver = CheckpointSaver(model=task.get_trainable_module(), optimizer=optimizer, args=args, task=task,
                            checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
    saver.save_checkpoint(epoch=0, metric=0.0)
    with pytest.raises(ValueError, match=r"resume with --kdwrap one --kdwrap-kwargs branches=2 rampup_steps=4 .*"
                                         r"--initial-checkpoint"):
        train_py_args("--resume", str(tmp_path / "last.pth.tar"))
    plain = tmp_path / "plain.pth.tar"
    torch.save({"state_dict": make_net().state_dict(), "epoch": 0}, plain)
    train_py_args("--resume", str(plain))  # a plain checkpoint resumes plain, as before

    # accumulation steps come from --grad-accum-steps, and another value in --kdwrap-kwargs is refused
    for method in kdwrap_train.ACCUMULATING:
        args = train_py_args("--kdwrap", method, "--grad-accum-steps", "2", "--kdwrap-kwargs", "branches=3")
        task = kdwrap_train.create_task(args, make_net(), None)
        counted = task.loss_fn if method != "pcl" else task.get_trainable_module()
        assert counted.accumulation_steps == 2, method
    with pytest.raises(ValueError, match="drop accumulation_steps from --kdwrap-kwargs"):
        train_py_args("--kdwrap", "one", "--grad-accum-steps", "2", "--kdwrap-kwargs", "accumulation_steps=1")
    train_py_args("--kdwrap", "one", "--grad-accum-steps", "2", "--kdwrap-kwargs", "accumulation_steps=2")
    with pytest.raises(ValueError, match="--kdwrap one and --kd-model-name resnet50 each choose"):
        train_py_args("--kdwrap", "one", "--kd-model-name", "resnet50")


def test_kd_points_at_train_pys_own_teacher_option():
    with pytest.raises(ValueError, match="use train.py's own --kd-model-name TEACHER"):
        train_py_args("--kdwrap", "kd")


def test_the_run_logs_the_summary_the_deployed_cross_entropy_and_the_parts_and_validates_the_ensemble(caplog):
    args = train_py_args("--kdwrap", "one", "--kdwrap-kwargs", "branches=2", "--kdwrap-eval-ensemble",
                         "--img-size", "32")
    with caplog.at_level(logging.INFO, logger="kdwrap.integrations.timm_train"):
        task = kdwrap_train.create_task(args, make_net(), None)
        assert "kdwrap ONE: ResNet split at" in caplog.text and "(3, 32, 32)" in caplog.text
        wrapper = task.get_trainable_module()
        deployed_ce, ce_ensemble = [], []
        for step in range(3):
            x, y = batch(step)
            expected = F.cross_entropy(kdwrap.export(wrapper)(x), y)  # the deployed model, before the step
            result = task(x, y)
            result["loss"].backward()
            deployed_ce.append(expected.item())
            ce_ensemble.append(result["ce_ensemble"].item())
            if step == 1:
                kdwrap_train.log_averages(task)  # train.py's log line after steps 0 and 1
        epoch = kdwrap_train.epoch_averages(task, args)  # train_one_epoch's return: summary.csv's train_*
    assert set(epoch) == {"deployed_ce", "ce_ensemble", "ramp_weight"}
    assert epoch["deployed_ce"] == pytest.approx(sum(deployed_ce) / 3, rel=1e-5)
    assert epoch["ce_ensemble"] == pytest.approx(sum(ce_ensemble) / 3, rel=1e-5)
    logged = re.search(r"kdwrap one: deployed_ce: (\S+)  ce_ensemble: (\S+)  ramp_weight: (\S+)", caplog.text)
    assert float(logged.group(1)) == pytest.approx(sum(deployed_ce[:2]) / 2, rel=1e-3)
    assert kdwrap_train.epoch_averages(task, args) == {}  # each epoch starts again

    seen = {}

    def validate(model, loader, loss_fn, args, device=None, amp_autocast=None, model_dtype=None, log_suffix=""):
        seen.update(model=model, suffix=log_suffix)
        return {"loss": 1.0, "top1": 50.0}

    x = batch(9)[0]
    metrics = kdwrap_train.validate_ensemble(task, validate, None, None, args, device=torch.device("cpu"))
    assert metrics == {"ensemble_loss": 1.0, "ensemble_top1": 50.0} and "ensemble" in seen["suffix"]
    with torch.no_grad():
        torch.testing.assert_close(seen["model"].eval()(x), kdwrap.export(wrapper, ensemble=True).eval()(x))
    args.kdwrap_eval_ensemble = False
    assert kdwrap_train.validate_ensemble(task, validate, None, None, args) == {}
    # PCL's ensemble classifier has no evaluation form: asking for it stops at the start
    with pytest.raises(ValueError, match="kdwrap pcl exports no ensemble"):
        kdwrap_train.create_task(train_py_args("--kdwrap", "pcl", "--kdwrap-eval-ensemble"), make_net(), None)
    # a run without --kdwrap: every call is a no-op
    plain = train_py_args()
    assert kdwrap_train.epoch_averages(None, plain) == {} and kdwrap_train.validate_ensemble(
        None, validate, None, None, plain) == {}
