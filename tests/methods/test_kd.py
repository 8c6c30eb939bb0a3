"""KD: the loss against a hand-written reference of METHODS.md, the frozen teacher, export, checkpoints, errors."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdwrap
from conftest import DictTinyNet, TinyNet, tiny_hf_vit, vit_batch
from kdwrap import OptionError
from kdwrap.methods.kd import HintonKDLoss, HintonKDModel
from loop_utils import assert_resume_in_process_is_exact

BATCH = 8


def _batch(step):
    g = torch.Generator().manual_seed(3000 + step)
    return torch.randn(BATCH, 3, 16, 16, generator=g), torch.randint(0, 5, (BATCH,), generator=g)


def _teacher():
    """A 'trained' teacher: its own seed, so every process builds the same one (as from a checkpoint)."""
    with torch.random.fork_rng():
        torch.manual_seed(77)
        return TinyNet()


def _build(**options):
    return kdwrap.kd(TinyNet(), _teacher(), **options)


def reference_loss(z_s, z_t, y, temperature, alpha):
    """METHODS.md, written out the obvious way, in float64."""
    z_s, z_t, T = z_s.double(), z_t.double(), temperature
    p_t = F.softmax(z_t / T, dim=1)
    kl = (p_t * (p_t.log() - F.log_softmax(z_s / T, dim=1))).sum(1).mean()
    return (1 - alpha) * F.cross_entropy(z_s, y) + alpha * T**2 * kl


# ------------------------------------------------------------------------------------------------------ the loss
@pytest.mark.parametrize("temperature, alpha", [(4.0, 0.9), (2.0, 0.3)])
def test_loss_matches_reference_over_steps(temperature, alpha):
    student, teacher = TinyNet(), _teacher()
    model, loss_fn = kdwrap.kd(student, teacher, temperature=temperature, alpha=alpha)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        x, y = _batch(step)
        before = copy.deepcopy(student)  # the student's output on x, recomputed outside the wrapper
        z = model(x)
        torch.testing.assert_close(z, before(x), rtol=0, atol=0)
        with torch.no_grad():
            z_t = teacher(x)
        loss = loss_fn(z, y)
        ref = reference_loss(z.detach(), z_t, y, temperature, alpha)
        assert abs(loss.item() - ref.item()) < 1e-6, step
        assert set(loss_fn.parts) == {"loss", "ce", "kl"} and not any(v.requires_grad for v in loss_fn.parts.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss_fn.step == 3


def test_alpha_zero_is_cross_entropy_and_temperature_scales_the_kl_by_t_squared():
    model, loss_fn = _build(alpha=0.0)
    x, y = _batch(0)
    z = model(x)
    torch.testing.assert_close(loss_fn(z, y), F.cross_entropy(z, y))
    # A teacher equal to the student (no BatchNorm, so train and eval mode agree): the KL term vanishes.
    student = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 5))
    model, loss_fn = kdwrap.kd(student, copy.deepcopy(student), alpha=1.0, temperature=3.0)
    assert loss_fn(model(x), y).item() == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------------------------------ the teacher
def test_the_teacher_is_frozen_in_eval_mode_and_outside_parameters_and_state_dict():
    student, teacher = TinyNet(), _teacher()
    teacher.train()
    model, loss_fn = kdwrap.kd(student, teacher)
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in model.parameters()}
    assert {id(p) for p in model.parameters()} == {id(p) for p in student.parameters()}
    assert list(model.state_dict()) == [f"student.{k}" for k in student.state_dict()]
    teacher_state = copy.deepcopy(teacher.state_dict())  # BatchNorm statistics included
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    assert model.training and not teacher.training
    for step in range(3):
        x, y = _batch(step)
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
        assert all(p.grad is None for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_state[key]), key


def test_to_moves_the_teacher_with_the_student():
    model, loss_fn = _build()
    model.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in model.teacher.parameters())
    x, y = _batch(0)
    loss_fn(model(x.double()), y).backward()
    model.float()
    assert all(p.dtype == torch.float32 for p in model.teacher.parameters())


def test_eval_forward_runs_only_the_student():
    model, loss_fn = _build()
    calls = []
    model.teacher.register_forward_hook(lambda *a: calls.append(1))
    model.eval()
    x, y = _batch(0)
    with torch.no_grad():  # validation
        z = model(x)
        torch.testing.assert_close(loss_fn(z, y), F.cross_entropy(z, y))
    assert calls == []
    model.train()
    loss_fn(model(x), y)
    assert calls == [1]


def test_forward_has_no_graph_break():
    model, _ = _build()
    explained = torch._dynamo.explain(model)(_batch(0)[0])
    assert explained.graph_break_count == 0, explained.break_reasons


# ------------------------------------------------------------------------------------------------- export and state
def test_export_is_the_student_with_its_keys_and_equals_the_wrapper_in_eval():
    student = TinyNet()
    keys = list(student.state_dict())
    model, loss_fn = kdwrap.kd(student, _teacher())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batch(0)
    loss_fn(model(x), y).backward()
    opt.step()
    deployed = kdwrap.export(model)
    assert type(deployed) is TinyNet and list(deployed.state_dict()) == keys
    assert all(p.grad is None for p in deployed.parameters())
    model.eval(), deployed.eval()
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x))
    assert kdwrap.export(model, copy_model=False) is student
    with pytest.raises(TypeError, match="valid options: copy_model"):
        kdwrap.export(model, branch=1)


def test_state_dict_round_trip_and_resume_into_a_fresh_wrapper(tmp_path):
    """Rebuilt with the same teacher (it is not in the checkpoint) and other initial student weights."""
    assert_resume_in_process_is_exact(tmp_path, _build, _batch, save_at=2, steps=4)


def test_wrap_by_name_and_summary():
    model, loss_fn = kdwrap.wrap(TinyNet(), method="kd", teacher=_teacher(), temperature=3)
    assert isinstance(model, HintonKDModel) and isinstance(loss_fn, HintonKDLoss)
    assert loss_fn.config() == {"temperature": 3.0, "alpha": 0.9}
    text = kdwrap.summary(model)
    assert "teacher: TinyNet" in text and "0.1 * CE(z_s, y) + 0.9 * T^2" in text and "T = 3" in text
    assert "measured step times: docs/methods.md" in text


# ------------------------------------------------------------------------------------------------------ errors
class _Declares(nn.Sequential):
    def __init__(self, num_classes):
        super().__init__(nn.Flatten(), nn.LazyLinear(num_classes))
        self.num_classes = num_classes


def test_a_teacher_of_other_classes_is_an_error_naming_both_numbers():
    with pytest.raises(ValueError, match="teacher predicts 10 classes but the student 5"):
        kdwrap.kd(_Declares(5), _Declares(10))
    model, loss_fn = kdwrap.kd(TinyNet(), TinyNet(num_classes=7))  # no num_classes attribute: found at the forward
    with pytest.raises(ValueError, match="teacher predicts 7 classes but the student 5"):
        model(_batch(0)[0])


@pytest.mark.parametrize("options, exc, match", [
    (dict(temperature=0), ValueError, "temperature=0 is invalid"),
    (dict(temperature=-1.0), ValueError, "finite number > 0"),
    (dict(temperature=float("inf")), ValueError, "finite number > 0"),
    (dict(temperature="4"), TypeError, "temperature must be a float"),
    (dict(alpha=1.5), ValueError, r"alpha=1.5 is outside \[0, 1\]"),
    (dict(alpha=-0.1), ValueError, r"outside \[0, 1\]"),
    (dict(alpha=True), TypeError, "alpha must be a float"),
    (dict(temprature=2), OptionError, "did you mean 'temperature'"),
    (dict(branches=2), OptionError, "valid options: temperature, alpha, check_finite, output, teacher_output"),
    (dict(output=1.5), TypeError, "output must be an int index or a str key"),
    (dict(teacher_output=["logits"]), TypeError, "teacher_output must be an int index or a str key"),
])
def test_bad_options_are_clear_errors(options, exc, match):
    with pytest.raises(exc, match=match):
        _build(**options)


def test_a_missing_or_wrong_teacher_is_a_clear_error():
    student = TinyNet()
    with pytest.raises(TypeError, match=r"needs a trained teacher: kdwrap.kd\(student, teacher\)"):
        kdwrap.wrap(student, method="kd")
    with pytest.raises(ValueError, match="the teacher is the student itself"):
        kdwrap.kd(student, student)
    with pytest.raises(TypeError, match="teacher must be a torch.nn.Module"):
        kdwrap.kd(student, "resnet110.pt")
    wrapped, _ = kdwrap.osakd(TinyNet())
    with pytest.raises(ValueError, match=r"kdwrap.export\(teacher_wrapper\)"):
        kdwrap.kd(student, wrapped)


# ------------------------------------------------------------------------------------------------ container outputs
def test_hf_classifiers_with_output_logits_match_the_reference_and_export_as_is():
    student, teacher = tiny_hf_vit(seed=1), tiny_hf_vit(seed=2)
    model, loss_fn = kdwrap.wrap(student, method="kd", teacher=teacher, output="logits")
    assert model.teacher_output == "logits"  # defaults to output
    x, y = vit_batch()
    before = copy.deepcopy(student)
    z = model(x)
    assert type(z) is torch.Tensor
    loss = loss_fn(z, y)
    loss.backward()
    with torch.no_grad():
        z_t = teacher(x).logits
    ref = reference_loss(before(x).logits, z_t, y, 4.0, 0.9)
    assert abs(loss.item() - ref.item()) < 1e-6
    ref.backward()
    for (name, got), want in zip(student.named_parameters(), before.parameters(), strict=True):
        assert got.grad is not None, name
        torch.testing.assert_close(got.grad, want.grad.float(), atol=1e-6, rtol=1e-5)
    assert all(p.grad is None for p in teacher.parameters())

    model.eval()
    deployed = kdwrap.export(model)
    assert type(deployed) is type(student)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x).logits, model(x))


def test_only_the_teacher_returns_a_container():
    student = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    x, y = vit_batch()
    model, _ = kdwrap.kd(student, tiny_hf_vit())
    with pytest.raises(TypeError, match=r"the teacher returned a dict .*teacher_output='logits'"):
        model(x)
    model, loss_fn = kdwrap.kd(student, tiny_hf_vit(), teacher_output="logits")
    loss_fn(model(x), y).backward()
    assert model.output is None and student[1].weight.grad is not None


def test_a_container_output_without_output_is_an_error_naming_the_option():
    model, _ = kdwrap.kd(DictTinyNet(), _teacher())
    with pytest.raises(TypeError, match=r"the student returned a dict with keys \['logits'\].*output='logits'"):
        model(_batch(0)[0])
