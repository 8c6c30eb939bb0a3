"""Deploy a kdwrap model: export the plain architecture, then torch.export and ONNX, and check every output.

kdwrap.export(model) returns a model of your own class with your own state_dict keys, holding no reference to
kdwrap, so the usual deployment tools apply to it unchanged. This script shows that end to end and checks that each
artefact computes what the wrapper computes in eval mode (max abs difference printed; must be < 1e-4).

    python examples/deploy.py                                   # untrained kdwrap CIFAR ResNet-32, wrapped for ONE
    python examples/deploy.py --model resnet18 --input-size 224 # any timm model (pretrained=False)
    python examples/deploy.py --method osakd                    # or kd, dml, okddip, byot
    python examples/deploy.py --method dml --peers 3            # DML: peer 0 is exported
    python examples/deploy.py --checkpoint runs/one/last.pt     # a run of examples/train_cifar.py, any method
    python examples/deploy.py --checkpoint runs/one/deployed.pt --model cifar_resnet32   # its exported weights
    python examples/deploy.py --ensemble                        # also export ONE-E (trunk + all branches + gate)

Every method goes through one path: the wrapper is built by train_cifar.py's own table of methods (WRAPPERS), with
the method and settings of the checkpoint's config when --checkpoint is a train_cifar.py run, and the deployable
model is kdwrap.export of it. A method added to train_cifar.py deploys here with no change. A KD checkpoint needs no
teacher: the wrapper's eval-mode outputs and its export are the student's alone, and the teacher is not in its
state_dict, so the wrapper is rebuilt around a stand-in teacher that never runs.

Written to --out: deployed.pt (state_dict of the exported model), model.pt2 (torch.export) and model.onnx, both
with a dynamic batch axis (checked on a second batch size).
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch
from torch import nn

import kdwrap
import kdwrap.models  # noqa: F401  (registers cifar_resnet20/32/44/56/110 and small_cnn with timm)

TOLERANCE = 1e-4


@functools.cache
def train_cifar() -> ModuleType:
    """examples/train_cifar.py as a module: its WRAPPERS table builds a method's wrapper as training did."""
    spec = importlib.util.spec_from_file_location("train_cifar", Path(__file__).with_name("train_cifar.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(methods: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cifar_resnet32", help="timm model name or kdwrap's cifar_resnet*/small_cnn")
    p.add_argument("--method", default="one", choices=methods,
                   help="the method to wrap for, with train_cifar.py's defaults (default one; a --checkpoint of "
                   "train_cifar.py sets it)")
    p.add_argument("--branches", type=int, default=None, help="ONE, OKDDip branches (default: the method's)")
    p.add_argument("--peers", type=int, default=None, help="DML peers (default 2)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--input-size", type=int, default=32, help="image height = width (default 32)")
    p.add_argument("--checkpoint", default=None,
                   help="last.pt of examples/train_cifar.py (its settings override the options above), or a "
                   "state_dict of the plain model such as its deployed.pt")
    p.add_argument("--ensemble", action="store_true", help="ONE: also export and check ONE-E")
    p.add_argument("--batch", type=int, default=4, help="batch size of the check input")
    p.add_argument("--out", default="exported", help="output folder (default ./exported)")
    return p.parse_args()


def run_settings(args: argparse.Namespace, ckpt: dict[str, Any] | None, trainer: ModuleType) -> argparse.Namespace:
    """train_cifar.py's settings of the wrapper to rebuild: a run's own (its checkpoint's config), else
    train_cifar.py's defaults for --method, --branches and --peers. Sets --model and the data shape from the run."""
    if ckpt is not None and "model_args" in ckpt:
        margs = ckpt["model_args"]
        args.model, args.in_chans, args.num_classes = margs["model"], margs["in_chans"], margs["num_classes"]
        args.input_size = margs["input_size"][-1]
        # Runs recorded before a setting existed used the value LATER_KEYS gives it.
        settings = argparse.Namespace(**{**trainer.LATER_KEYS, **ckpt["config"]})
    else:
        argv = ["--method", args.method, "--model", args.model, "--out", args.out]
        argv += ["--branches", str(args.branches)] if args.branches is not None else []
        argv += ["--peers", str(args.peers)] if args.peers is not None else []
        # Never read: the teacher is replaced by a stand-in below.
        argv += ["--teacher", "unused"] if args.method == "kd" else []
        settings = trainer.parse_args(argv)
    # The ramp-up lives in the loss; only the model's eval-mode computation is deployed.
    settings.rampup_steps = 0
    return settings


def build(args: argparse.Namespace) -> tuple[nn.Module, str]:
    """The wrapper (in eval mode) and its method, built as train_cifar.py builds it, with the checkpoint's
    weights if one is given."""
    import timm

    trainer = train_cifar()
    ckpt: dict[str, Any] | None = None
    if args.checkpoint:
        ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    settings = run_settings(args, ckpt, trainer)
    method = settings.method
    if method not in trainer.WRAPPERS:
        raise SystemExit(f"{args.checkpoint}: a --method {method} run, which this train_cifar.py does not know; "
                         f"its methods: {', '.join(trainer.WRAPPERS)}")

    def create() -> nn.Module:
        return timm.create_model(args.model, pretrained=False, num_classes=args.num_classes, in_chans=args.in_chans)

    net = create()
    if ckpt is not None and "model_args" not in ckpt:
        # The plain model's state_dict: load it before wrapping; ONE's branch copies then start from it too.
        net.load_state_dict(ckpt)
    if method == "kd":
        # KD's teacher is outside the wrapper's state_dict and never runs in eval mode or in the export: a stand-in
        # of the student's architecture serves, so deploying needs no teacher run.
        settings.teacher_net = create()
    input_size = (args.in_chans, args.input_size, args.input_size)
    model, _ = trainer.WRAPPERS[method](settings, net, input_size, args.num_classes)
    if ckpt is not None and "model_args" in ckpt:
        model.load_state_dict(ckpt["model"])
    return model.eval(), method


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def onnx_run(path: Path, x: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Run an ONNX file: onnxruntime when installed, else onnx's pure-Python reference evaluator (slow, exact)."""
    try:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        runner = "onnxruntime"
    except ImportError:
        import onnx
        from onnx.reference import ReferenceEvaluator

        proto = onnx.load(str(path))
        out = ReferenceEvaluator(proto).run(None, {proto.graph.input[0].name: x.numpy()})[0]
        runner = "onnx.reference"
    return torch.from_numpy(out), runner


def check(name: str, fn: Callable[[], tuple[torch.Tensor, str]], ref: torch.Tensor, rows: list[list[str]]) -> None:
    """Run one deployment path; record its max abs difference to the wrapper, or why it could not run."""
    try:
        out, how = fn()
    except Exception as err:  # a tool missing or failing in this environment: say why and go on
        msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
        rows.append([name, "failed", f"{type(err).__name__}: {msg[:150]}"])
        return
    diff = max_diff(out, ref)
    rows.append([name, f"{diff:.2e}", how])
    # Relative to the logits' scale: float32 kernels of other runtimes differ by rounding, which grows with it.
    scale = max(1.0, float(ref.abs().max()))
    assert diff <= TOLERANCE * scale, (
        f"{name}: max abs diff {diff:.3e} to the wrapper exceeds {TOLERANCE:g} x the largest |logit| ({scale:.3g})"
    )


def main() -> None:
    args = parse_args(list(train_cifar().WRAPPERS))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, method = build(args)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.in_chans, args.input_size, args.input_size)

    with torch.no_grad():
        ref = model(x)  # the wrapper in eval mode: what training's test accuracy measured
    # Deployable: the original class and state_dict keys, the plain model's size.
    deployed = (model if method == "plain" else kdwrap.export(model)).eval()
    torch.save(deployed.state_dict(), out_dir / "deployed.pt")
    if method != "plain":
        print(kdwrap.summary(model))
    print(f"exported: {type(deployed).__module__}.{type(deployed).__name__}, "
          f"{sum(p.numel() for p in deployed.parameters()):,} parameters -> {out_dir / 'deployed.pt'}")

    rows: list[list[str]] = []

    def eager(module: torch.nn.Module, how: str) -> Callable[[], tuple[torch.Tensor, str]]:
        def run() -> tuple[torch.Tensor, str]:
            with torch.no_grad():
                return module(x), how
        return run

    # A second batch size, so the checks show that the saved programs are not tied to the traced one.
    x_other = torch.randn(args.batch + 3, args.in_chans, args.input_size, args.input_size)

    def exported_program(module: torch.nn.Module, filename: str) -> Callable[[], tuple[torch.Tensor, str]]:
        def run() -> tuple[torch.Tensor, str]:
            # A dynamic batch axis (as for ONNX below): without it the program accepts only the traced batch size.
            batch = torch.export.Dim("batch", min=1)
            program = torch.export.export(module, (x,), dynamic_shapes=({0: batch},))
            torch.export.save(program, out_dir / filename)
            loaded = torch.export.load(out_dir / filename).module()  # check the saved file, not the in-memory one
            with torch.no_grad():
                return loaded(x), f"torch.export.save/load -> {filename}"
        return run

    def exported_program_other_batch(module: torch.nn.Module, filename: str) -> Callable[[], tuple[torch.Tensor, str]]:
        def run() -> tuple[torch.Tensor, str]:
            loaded = torch.export.load(out_dir / filename).module()  # saved by exported_program's check
            with torch.no_grad():
                return loaded(x_other), f"{filename} on a batch of {len(x_other)} (traced with {len(x)})"
        return run

    def onnx_file() -> tuple[torch.Tensor, str]:
        path = out_dir / "model.onnx"
        # A dynamic batch axis, so the file serves any batch size.
        batch = torch.export.Dim("batch", min=1)
        torch.onnx.export(deployed, (x,), str(path), input_names=["image"], output_names=["logits"],
                          dynamo=True, dynamic_shapes={"x": {0: batch}})
        out, runner = onnx_run(path, x)
        return out, f"torch.onnx.export -> model.onnx, run by {runner}"

    check("exported model (eager)", eager(deployed, "kdwrap.export(model)"), ref, rows)
    check("torch.export", exported_program(deployed, "model.pt2"), ref, rows)
    with torch.no_grad():
        ref_other = model(x_other)
    check("torch.export, other batch", exported_program_other_batch(deployed, "model.pt2"), ref_other, rows)
    check("ONNX", onnx_file, ref, rows)

    if args.ensemble and method == "one":
        with torch.no_grad():
            ref_e = model.forward_ensemble(x)
        ensemble = kdwrap.export(model, ensemble=True).eval()
        check("ONE-E (eager)", eager(ensemble, "kdwrap.export(model, ensemble=True)"), ref_e, rows)
        check("ONE-E torch.export", exported_program(ensemble, "ensemble.pt2"), ref_e, rows)
        with torch.no_grad():
            ref_e_other = model.forward_ensemble(x_other)
        check("ONE-E torch.export, other batch", exported_program_other_batch(ensemble, "ensemble.pt2"),
              ref_e_other, rows)

    width = max(len(r[0]) for r in rows)
    print(f"\n{'artefact':<{width}}  max |diff| to the wrapper (eval)  how")
    for name, diff, how in rows:
        print(f"{name:<{width}}  {diff:<33}  {how}")
    failed = [r[0] for r in rows if r[1] == "failed"]
    print(f"\nall checked outputs agree to within {TOLERANCE:g} x the largest |logit|" + (f"; could not run: {', '.join(failed)}" if failed else ""))


if __name__ == "__main__":
    main()
