"""``kdwrap compare``: every method against plain and the free controls on a folder of images, resumed from its
``--out``; each bad input stops with an error naming the fix. The images are a few dozen from the shipped CIFAR-10
pack, written as an ImageFolder tree; every training is one epoch of LeNet-5."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from kdwrap.__main__ import main
from kdwrap.demo.data import cifar10_pack_path, load_cifar10_pack

pytest.importorskip("PIL", reason="pillow is an optional extra: pip install 'kdwrap[demo]'")
if not cifar10_pack_path().is_file():  # pragma: no cover - a wheel install without the pack
    pytest.skip("the CIFAR-10 pack (data/cifar10-jpeg.npz) is not here", allow_module_level=True)

CLASSES = 3
TINY = ["--model", "lenet5", "--epochs", "1", "--batch-size", "8", "--no-progress"]


def _write_folder(root: Path, per_class: dict[str, int], classes: int = CLASSES, resize: dict[int, int] | None = None
                  ) -> Path:
    """``per_class[split]`` images of each of the first ``classes`` CIFAR-10 classes, as PNG files."""
    from PIL import Image

    ds = _pack()
    for split, x, y in (("train", ds.x_train, ds.y_train), ("val", ds.x_test, ds.y_test)):
        for c in range(classes):
            folder = root / split / ds.classes[c]
            folder.mkdir(parents=True, exist_ok=True)
            for n, i in enumerate((y == c).nonzero().flatten()[:per_class[split]].tolist()):
                image = Image.fromarray(x[i].permute(1, 2, 0).numpy())
                size = (resize or {}).get(n)
                (image.resize((size, size)) if size else image).save(folder / f"{i}.png")
    return root


_PACK: list = []


def _pack():
    if not _PACK:
        _PACK.append(load_cifar10_pack())
    return _PACK[0]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # decoded image folders are cached; keep the tests' caches out of the user's
    monkeypatch.setenv("KDWRAP_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_folder(tmp_path_factory.mktemp("images"), {"train": 12, "val": 6})


def _run(folder: Path, out: Path | None, **kw):
    from kdwrap.demo.compare import run_compare

    settings = dict(data=str(folder), model="lenet5", epochs=1, batch_size=8, seeds=[0, 1], progress=False,
                    isolate=False, jobs=1, out=str(out) if out else None)
    return run_compare(**{**settings, **kw}, log=lambda s: None)


def test_compare_reports_every_deployed_model_against_plain_and_the_best_control(folder: Path, tmp_path: Path
                                                                                  ) -> None:
    res = _run(folder, tmp_path, methods=["one", "plain-ls", "plain-ema"])
    assert [r.name for r in res.rows] == ["plain", "plain-ls", "plain-ema", "ONE", "ONE-E"]
    header = res.table.splitlines()[0]
    best = max((r for r in res.rows if r.kind == "control"), key=lambda r: sum(r.last))
    assert f"vs {best.name} [95 % CI]" in header and "step vs plain" in header and "params trained / deployed" in header
    one = next(r for r in res.rows if r.name == "ONE")
    assert one.params_trained > one.params_deployed == res.rows[0].params_deployed
    assert all(len(r.last) == 2 and max(r.best) >= 0 for r in res.rows)
    assert any(v.startswith("ONE: ") and "vs plain" in v and f"vs {best.name}" in v for v in res.verdicts)
    assert res.settings["classes"] == CLASSES and res.settings["train"] == CLASSES * 12
    # the outputs: JSON, report, curves, and each deployed state_dict, which loads into the plain architecture
    results = json.loads((tmp_path / "comparison.json").read_text())
    assert results["best_control"] == best.name and len(results["curves"]["ONE-E"]) == 2
    assert "| ONE-E" in (tmp_path / "report.md").read_text()
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "curves.png").stat().st_size > 0
    from kdwrap.demo.networks import create_model

    net = create_model("lenet5", 3, CLASSES)
    net.load_state_dict(torch.load(tmp_path / "state_dicts" / "one_seed1.pt", weights_only=True))
    assert {p.name for p in (tmp_path / "state_dicts").glob("*_seed0.pt")} == {
        "plain_seed0.pt", "plain_ls_seed0.pt", "plain_ema_seed0.pt", "one_seed0.pt", "one_e_seed0.pt"}


def test_same_seed_same_weights_and_order_and_a_second_call_resumes(folder: Path, tmp_path: Path) -> None:
    # label smoothing 0 is plain cross-entropy: the same seed must then give the same model, to the last bit
    first = _run(folder, tmp_path, methods=["plain-ls"], options=["plain-ls.smoothing=0.0"], seeds=[0])
    assert first.rows[0].last == first.rows[1].last and first.rows[0].best == first.rows[1].best
    a, b = (torch.load(tmp_path / "state_dicts" / f, weights_only=True) for f in ("plain_seed0.pt",
                                                                                  "plain_ls_seed0.pt"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a second call with a new seed trains only that seed's runs; the first seed's results come back unchanged
    lines: list[str] = []
    from kdwrap.demo.compare import run_compare

    second = run_compare(data=str(folder), model="lenet5", epochs=1, batch_size=8, seeds=[0, 1], progress=False,
                         isolate=False, jobs=1, out=str(tmp_path), methods=["plain-ls"],
                         options=["plain-ls.smoothing=0.0"], log=lines.append)
    assert "2 trainings to run (2 finished before" in lines[0]
    assert [r.last[0] for r in second.rows] == [r.last[0] for r in first.rows]
    # another option for a finished training is another comparison: stop, naming the file to delete
    with pytest.raises(ValueError, match=r"plain-ls training of seed 0 with other options"):
        _run(folder, tmp_path, methods=["plain-ls"], seeds=[0])


def test_kd_from_a_teacher_checkpoint_and_parallel_processes_with_memory(folder: Path, tmp_path: Path) -> None:
    from kdwrap.demo.networks import create_model

    teacher = tmp_path / "teacher.pt"
    torch.save(create_model("small_cnn", 3, CLASSES).state_dict(), teacher)
    assert main(["compare", "--data", str(folder), *TINY, "--seeds", "0", "--jobs", "2", "--out",
                 str(tmp_path / "out"), "--methods", "plain", "--teacher", str(teacher), "--teacher-model",
                 "small_cnn", "--option", "kd.temperature=2"]) == 0
    results = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert [r["name"] for r in results["rows"]] == ["plain", "KD"]
    assert all(r["peak_memory"] > 0 for r in results["rows"])  # each training its own process: its own peak
    assert results["rows"][1]["params_trained"] == results["rows"][0]["params_trained"]  # the teacher is frozen


def test_models_by_timm_name_torchvision_name_or_your_own_callable(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from kdwrap.demo.networks import create_model, model_source

    (tmp_path / "my_nets.py").write_text(
        "import torch.nn as nn\n"
        "def tiny(num_classes):\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
        "                         nn.Linear(8, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert [model_source(n) for n in ("lenet5", "squeezenet1_0", "my_nets:tiny")] == ["timm", "torchvision", "user"]
    for name in ("squeezenet1_0", "my_nets:tiny"):
        net = create_model(name, 3, 4, (3, 32, 32))
        assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
        assert net.pretrained_cfg["input_size"] == (3, 32, 32)  # where kdwrap reads the size it traces with
    sys.modules.pop("my_nets", None)


def test_bfloat16_autocast_and_channels_last_train_every_method(folder: Path) -> None:
    # the GPU path (amp: bfloat16 autocast, channels-last tensors) runs on the CPU too, so it is checked here
    res = _run(folder, None, seeds=[0], amp=True, methods=["one", "osakd", "dml", "okddip", "byot", "pcl",
                                                            "plain-ema"])
    assert res.settings["amp"] is True
    assert [r.name for r in res.rows] == ["plain", "plain-ema", "ONE", "ONE-E", "OSAKD", "DML", "OKDDip", "BYOT",
                                          "PCL"]
    assert all(0 <= r.last[0] <= 100 and r.peak_memory is None for r in res.rows)
    assert all("no verdict against plain" in v for v in res.verdicts)


def test_without_data_it_compares_on_the_shipped_pack(capsys: pytest.CaptureFixture[str]) -> None:
    from kdwrap.demo.compare import run_compare

    res = run_compare(epochs=1, limit_train=60, seeds=[0], methods=["plain"], out=None, isolate=False, jobs=1,
                      progress=False, log=lambda s: None)
    assert res.settings["data"] == "cifar10-pack" and res.settings["model"] == "lenet5"  # the demo's defaults
    assert res.settings["train"] == 60 and res.settings["test"] == 10000 and res.settings["augment"] is False
    assert "drop --img-size" in _error(["--img-size", "32"], capsys)  # the pack's images have one size


def test_help_names_compare(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "compare" in capsys.readouterr().out


# --- bad input: an error naming the problem and the fix, exit status 2 ---------------------------------------------

def _error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["compare", *TINY, "--seeds", "0", *args]) == 2
    return " ".join(capsys.readouterr().err.split())


def test_a_folder_without_train_and_val(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "cats").mkdir()
    err = _error(["--data", str(tmp_path), "--out", str(tmp_path / "out")], capsys)
    assert "has no train/ and no val/ subfolder" in err and "PATH/train/<class>/<image>" in err


def test_an_unknown_model(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(["--data", str(folder), "--out", str(tmp_path), "--model", "no_such_net"], capsys)
    assert "unknown model 'no_such_net'" in err and "package.module:callable" in err


def test_an_unknown_method(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(["--data", str(folder), "--out", str(tmp_path), "--methods", "one", "distill"], capsys)
    assert "unknown method(s) distill; valid: plain, plain-ls, plain-ema, one," in err


def test_kd_without_a_teacher_and_a_malformed_option(folder: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert "pass --teacher CHECKPOINT" in _error(["--data", str(folder), "--out", str(tmp_path), "--methods", "kd"],
                                                 capsys)
    assert "expected METHOD.NAME=VALUE" in _error(["--data", str(folder), "--option", "branches=2"], capsys)
    assert "'osakd' is not among the methods compared" in _error(
        ["--data", str(folder), "--methods", "one", "--option", "osakd.k=4"], capsys)
    assert "plain-ls has no option smooth; its options: smoothing" in _error(
        ["--data", str(folder), "--methods", "plain-ls", "--option", "plain-ls.smooth=0.2"], capsys)
    assert "branchez" in _error(["--data", str(folder), "--out", str(tmp_path), "--methods", "one", "--option",
                                 "one.branchez=2"], capsys)


def test_images_of_mixed_sizes_need_img_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kdwrap.demo.image_folder import load_image_folder

    root = _write_folder(tmp_path / "mixed", {"train": 3, "val": 2}, resize={1: 40})
    err = _error(["--data", str(root), "--out", str(tmp_path / "out")], capsys)
    assert "images of mixed sizes" in err and "is 32x32" in err and "is 40x40" in err and "--img-size N" in err
    ds = load_image_folder(root, img_size=24)  # the fix
    assert ds.input_size == (3, 24, 24) and len(ds.y_train) == CLASSES * 3 and ds.x_train.dtype == torch.uint8


def test_a_folder_with_one_class(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _write_folder(tmp_path / "one", {"train": 3, "val": 2}, classes=1)
    err = _error(["--data", str(root), "--out", str(tmp_path / "out")], capsys)
    assert "train/ holds one class ('airplane')" in err and "at least two classes" in err


def test_an_out_holding_another_comparison(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kdwrap.demo.run_store import SETTINGS_FILE

    shared = {"source": {"kind": "image-folder", "path": "elsewhere", "img_size": None}, "model": "resnet18"}
    (tmp_path / SETTINGS_FILE).write_text(json.dumps({"written_by": "kdwrap compare", "shared": shared}))
    err = _error(["--data", str(folder), "--out", str(tmp_path)], capsys)
    assert f"--out {tmp_path} holds another comparison" in err and "'resnet18' there, 'lenet5' now" in err
    assert "pass a new --out" in err
