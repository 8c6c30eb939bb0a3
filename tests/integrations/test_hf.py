"""kdwrap.integrations.hf: the Hugging Face Trainer trains a kdwrap model (timm with ONE and OSAKD, an HF image
classifier with ONE and OSAKD), accumulates gradients as the plain loop does, checkpoints and resumes the loss's state,
and exports the deployable model; kdwrap itself never imports transformers."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

pytest.importorskip("transformers", reason="transformers is an optional extra: pip install 'kdwrap[hf]'")
pytest.importorskip("accelerate", reason="accelerate is an optional extra: pip install 'kdwrap[hf]'")
from transformers import ResNetConfig, ResNetForImageClassification, TrainerCallback, TrainingArguments  # noqa: E402

import kdwrap  # noqa: E402
import kdwrap.models  # noqa: E402,F401  (registers lenet5 with timm)
from integration_recipes import run_recipe  # noqa: E402
from kdwrap.integrations.hf import DEPLOYED_FILE, LOSS_STATE_FILE, RUN_FILE, KDTrainer  # noqa: E402



class Images(torch.utils.data.Dataset):
    """``n`` random 3x32x32 images with labels in [0, 10), as dicts the way HF datasets give them."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def hf_resnet() -> ResNetForImageClassification:
    config = ResNetConfig(num_labels=10, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    return ResNetForImageClassification(config)


WRAPPERS = {
    "timm lenet5, one": lambda: kdwrap.one(timm.create_model("lenet5", num_classes=10), branches=2,
                                           accumulation_steps=2),
    "timm lenet5, osakd": lambda: kdwrap.osakd(timm.create_model("lenet5", num_classes=10), k=2, bank_size=16),
    "hf resnet, osakd": lambda: kdwrap.osakd(hf_resnet(), output="logits", k=2, bank_size=16),
    "hf resnet, one": lambda: kdwrap.one(hf_resnet(), branches=2, output="logits", accumulation_steps=2),
}


def training_args(out: Path, **overrides) -> TrainingArguments:
    options = dict(output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                   num_train_epochs=1, save_strategy="no", logging_strategy="no", report_to=[], use_cpu=True,
                   disable_tqdm=True)
    return TrainingArguments(**{**options, **overrides})


def logits(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_trainer_trains_evaluates_and_saves_the_exported_model(wrapper, tmp_path):
    model, loss_fn = WRAPPERS[wrapper]()
    before = copy.deepcopy(kdwrap.export(model).state_dict())
    trainer = KDTrainer(model=model, kd_loss=loss_fn, args=training_args(tmp_path), train_dataset=Images(16),
                        eval_dataset=Images(8, seed=1))
    trainer.train()
    assert loss_fn.step == 4  # 16 images, micro-batches of 4: the loss ran once per micro-batch
    deployed = trainer.save_exported(str(tmp_path / "deployed"))
    assert any(not torch.equal(v, before[k]) for k, v in deployed.state_dict().items())  # it trained

    eval_set = Images(8, seed=1)
    model.eval()
    with torch.no_grad():
        wrapper_logits = logits(model(eval_set.x))
        torch.testing.assert_close(logits(deployed.eval()(eval_set.x)), wrapper_logits)
        # evaluate(): the cross-entropy of the deployed model's logits; predict(): those logits
        expected = torch.nn.functional.cross_entropy(wrapper_logits, eval_set.y).item()
    assert trainer.evaluate()["eval_loss"] == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(torch.as_tensor(trainer.predict(eval_set).predictions), wrapper_logits)

    # what save_exported wrote loads into a fresh model of the user's class
    if isinstance(deployed, ResNetForImageClassification):
        reloaded = ResNetForImageClassification.from_pretrained(str(tmp_path / "deployed"))
    else:
        reloaded = timm.create_model("lenet5", num_classes=10)
        reloaded.load_state_dict(torch.load(tmp_path / "deployed" / DEPLOYED_FILE))
    with torch.no_grad():
        torch.testing.assert_close(logits(reloaded.eval()(eval_set.x)), wrapper_logits)


class _InOrder(KDTrainer):
    """Batches in dataset order, so that a plain loop can replay exactly the micro-batches the Trainer used."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def test_gradient_accumulation_equals_the_plain_loop_recipe(tmp_path):
    """docs/training.md's accumulation loop, ``(loss_fn(model(x), y) / n).backward()`` and a step every n
    micro-batches, ends with the parameters and the ramp-up clock of a KDTrainer run on the same micro-batches."""
    def build():
        torch.manual_seed(0)
        return kdwrap.one(timm.create_model("lenet5", num_classes=10), branches=2, rampup_steps=4,
                          accumulation_steps=2)

    data = Images(16)
    model, loss_fn = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = _InOrder(model=model, kd_loss=loss_fn, args=training_args(tmp_path, max_grad_norm=0),
                       train_dataset=data, optimizers=(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)))
    trainer.train()

    ref, ref_loss = build()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for i in range(4):
        x, y = data.x[4 * i:4 * i + 4], data.y[4 * i:4 * i + 4]
        (ref_loss(ref(x), y) / 2).backward()
        if (i + 1) % 2 == 0:
            ref_opt.step()
            ref_opt.zero_grad()
    assert loss_fn.step == ref_loss.step == 4
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=lambda m: f"{name}: {m}")


class _LossStateAtTrainBegin(TrainerCallback):
    def __init__(self, loss_fn) -> None:
        self.loss_fn, self.state = loss_fn, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.state = copy.deepcopy(self.loss_fn.state_dict())


def test_a_checkpoint_holds_the_osakd_bank_and_resume_restores_it(tmp_path):
    model, loss_fn = WRAPPERS["timm lenet5, osakd"]()
    args = training_args(tmp_path, gradient_accumulation_steps=1, max_steps=2, save_strategy="steps", save_steps=2)
    KDTrainer(model=model, kd_loss=loss_fn, args=args, train_dataset=Images(16)).train()
    checkpoint = tmp_path / "checkpoint-2"
    saved = torch.load(checkpoint / LOSS_STATE_FILE)
    assert int(saved["bank.count"]) == 8 and saved["_extra_state"]["step"] == 2

    model, loss_fn = WRAPPERS["timm lenet5, osakd"]()  # a fresh process would start from here
    probe = _LossStateAtTrainBegin(loss_fn)
    args = training_args(tmp_path, gradient_accumulation_steps=1, max_steps=4)
    trainer = KDTrainer(model=model, kd_loss=loss_fn, args=args, train_dataset=Images(16), callbacks=[probe])
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert probe.state.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(probe.state[key], value) if isinstance(value, torch.Tensor) else probe.state[key] == value
    assert loss_fn.step == 4

    (checkpoint / LOSS_STATE_FILE).unlink()
    model, loss_fn = WRAPPERS["timm lenet5, osakd"]()
    trainer = KDTrainer(model=model, kd_loss=loss_fn, args=args, train_dataset=Images(16))
    with pytest.raises(FileNotFoundError, match="holds no kdwrap loss state"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def test_settings_that_would_train_wrongly_are_refused(tmp_path):
    model, loss_fn = kdwrap.one(timm.create_model("lenet5", num_classes=10), branches=2)  # accumulation_steps=1
    with pytest.raises(ValueError, match=r"accumulation_steps=2"):
        KDTrainer(model=model, kd_loss=loss_fn, args=training_args(tmp_path), train_dataset=Images(8))
    other, _ = kdwrap.osakd(timm.create_model("lenet5", num_classes=10))
    with pytest.raises(ValueError, match="returned together with kd_loss"):
        KDTrainer(model=other, kd_loss=loss_fn, args=training_args(tmp_path), train_dataset=Images(8))
    with pytest.raises(TypeError, match="kd_loss must be the loss"):
        KDTrainer(model=model, kd_loss=torch.nn.CrossEntropyLoss(), args=training_args(tmp_path))


def test_kdwrap_imports_no_integration_library_and_a_missing_one_names_its_extra():
    code = (
        "import sys, kdwrap, kdwrap.integrations\n"
        "assert not {'transformers', 'accelerate', 'lightning'} & set(sys.modules), sorted(sys.modules)\n"
        "sys.modules['transformers'] = sys.modules['lightning'] = None  # as if they were not installed\n"
        "for name in ('hf', 'lightning'):\n"
        "    try:\n"
        "        __import__('kdwrap.integrations.' + name)\n"
        "    except ImportError as err:\n"
        "        print(err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "pip install kdwrap[hf]" in out.stdout and "pip install kdwrap[lightning]" in out.stdout


def test_the_trainer_recipe_of_the_docs_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = run_recipe("Hugging Face `Trainer`", blocks=2)
    assert (tmp_path / "kd-osakd" / "deployed" / "config.json").is_file()
    assert (tmp_path / "kd-one" / "deployed" / DEPLOYED_FILE).is_file()
    for run in ("kd-osakd", "kd-one"):  # each recipe checkpoints into its own folder
        assert any((p / LOSS_STATE_FILE).is_file() for p in (tmp_path / run).glob("checkpoint-*"))
    namespace["trainer"].train(resume_from_checkpoint=True)  # as the page suggests: its own last checkpoint


def _checkpoint_of(wrapper: str, out: Path) -> Path:
    model, loss_fn = WRAPPERS[wrapper]()
    args = training_args(out, gradient_accumulation_steps=2, max_steps=1, save_strategy="steps", save_steps=1)
    KDTrainer(model=model, kd_loss=loss_fn, args=args, train_dataset=Images(16)).train()
    return out / "checkpoint-1"


def test_resuming_from_another_runs_checkpoint_names_both_runs(tmp_path):
    _checkpoint_of("hf resnet, osakd", tmp_path)  # a first run in the same output_dir
    model, loss_fn = WRAPPERS["timm lenet5, one"]()
    args = training_args(tmp_path, max_steps=2, save_strategy="no")
    trainer = KDTrainer(model=model, kd_loss=loss_fn, args=args, train_dataset=Images(16))
    with pytest.raises(kdwrap.CheckpointError, match=r"holds a kdwrap osakd wrapper of a "
                       r"ResNetForImageClassification.*this trainer trains a kdwrap one wrapper of a LeNet5.*own "
                       r"output_dir"):
        trainer.train(resume_from_checkpoint=True)


def test_resuming_a_checkpoint_of_other_settings_or_without_a_run_file_is_refused(tmp_path):
    """Same method and network, other settings (DML's peers): the Trainer's strict=False load would keep the extra
    peer's fresh weights; a checkpoint written before the run file existed: its parameter names decide."""
    def dml(peers):
        return kdwrap.dml(timm.create_model("lenet5", num_classes=10), peers=peers)

    model, loss_fn = dml(2)
    args = training_args(tmp_path, gradient_accumulation_steps=1, max_steps=1, save_strategy="steps", save_steps=1)
    KDTrainer(model=model, kd_loss=loss_fn, args=args, train_dataset=Images(16)).train()
    checkpoint = tmp_path / "checkpoint-1"
    model, loss_fn = dml(3)
    trainer = KDTrainer(model=model, kd_loss=loss_fn, args=training_args(tmp_path, max_steps=2),
                        train_dataset=Images(16))
    with pytest.raises(kdwrap.CheckpointError, match=r"holds a kdwrap dml wrapper of a LeNet5 \(loss DMLLoss\) "
                       r"with other settings \(\d+ parameter names differ, e\.g\. peers\.2\."):
        trainer.train(resume_from_checkpoint=str(checkpoint))

    model, loss_fn = kdwrap.osakd(timm.create_model("lenet5", num_classes=10))
    (checkpoint / RUN_FILE).unlink()
    trainer = KDTrainer(model=model, kd_loss=loss_fn, args=training_args(tmp_path, max_steps=2),
                        train_dataset=Images(16))
    with pytest.raises(kdwrap.CheckpointError, match=r"holds another model \(\d+ parameter names differ.*this "
                       r"trainer trains a kdwrap osakd wrapper of a LeNet5"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


@pytest.mark.parametrize("method", kdwrap.METHODS)
def test_every_wrapper_answers_what_the_trainer_reads_without_a_default(method):
    """transformers' Trainer reads ``model._keys_to_ignore_on_save`` directly (when a resumed checkpoint lacks
    keys); its other reads of the model (``config``, ``main_input_name``, ...) are guarded by getattr/hasattr."""
    net = timm.create_model("lenet5", num_classes=10)
    options = {"teacher": timm.create_model("lenet5", num_classes=10)} if method == "kd" else {}
    model, _ = kdwrap.wrap(net, method=method, **options)
    assert model._keys_to_ignore_on_save is None
    assert not hasattr(model, "config")  # no half-answer: Trainer integrations call model.config.to_dict()


def test_label_smoothing_is_refused_rather_than_ignored(tmp_path):
    model, loss_fn = WRAPPERS["timm lenet5, osakd"]()
    with pytest.raises(ValueError, match="label_smoothing_factor is not applied.*soft targets"):
        KDTrainer(model=model, kd_loss=loss_fn, args=training_args(tmp_path, label_smoothing_factor=0.1))


def test_a_method_registered_from_outside_without_a_user_network_is_recorded_as_unknown():
    """kdwrap's methods name the network they wrap; a KDModel of the user's own need not, and the run record says
    "unknown" instead of failing."""
    from kdwrap.integrations.hf import _describe

    class OwnModel(kdwrap.KDModel):
        method = "own"

    model = OwnModel()
    with pytest.raises(NotImplementedError, match="kdwrap own: this wrapper does not name the network it wraps"):
        model.user_network
    assert _describe(kdwrap.KDLoss(model)) == {"method": "own", "network": "unknown", "loss": "KDLoss"}
