"""Deploy a kdwrap model: export the plain architecture, then torch.export and ONNX, and check every output.

kdwrap.export(model) returns a model of your own class with your own state_dict keys, holding no reference to
kdwrap, so the usual deployment tools apply to it unchanged. This script shows that end to end and checks that each
artefact computes what the wrapper computes in eval mode (max abs difference printed; must be < 1e-4).

    python examples/deploy.py                                   # untrained kdwrap CIFAR ResNet-32, wrapped for ONE
    python examples/deploy.py --model resnet18 --input-size 224 # any timm model (pretrained=False)
    python examples/deploy.py --method osakd
    python examples/deploy.py --method dml --peers 3            # DML: peer 0 is exported
    python examples/deploy.py --checkpoint runs/one/last.pt     # a run of examples/train_cifar.py
    python examples/deploy.py --checkpoint runs/one/deployed.pt --model cifar_resnet32   # its exported weights
    python examples/deploy.py --ensemble                        # also export ONE-E (trunk + all branches + gate)

A checkpoint of any train_cifar.py method is rebuilt as the wrapper it trained (ONE, OSAKD, DML) and exported,
except KD's: a KD wrapper in eval mode computes its student alone and its state_dict holds only the student (the
teacher is not in it), so a KD checkpoint is deployed as the plain student, with no teacher to load: the exported
model and the wrapper's eval outputs are the same computation.

Written to --out: deployed.pt (state_dict of the exported model), model.pt2 (torch.export) and model.onnx, both
with a dynamic batch axis (checked on a second batch size).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import kdwrap
import kdwrap.models  # noqa: F401  (registers cifar_resnet20/32/44/56/110 and small_cnn with timm)

TOLERANCE = 1e-4


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cifar_resnet32", help="timm model name or kdwrap's cifar_resnet*/small_cnn")
    p.add_argument("--method", default="one", choices=["one", "osakd", "dml"])
    p.add_argument("--branches", type=int, default=3, help="ONE branches")
    p.add_argument("--peers", type=int, default=2, help="DML peers")
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


# How a method's wrapper is rebuilt around the network: (net, args, split, input_size) -> model. Only eval-mode
# outputs matter here, so the loss options are not needed.
WRAPPERS: dict[str, Callable[[nn.Module, argparse.Namespace, Any, tuple[int, int, int]], nn.Module]] = {
    "plain": lambda net, args, split, size: net,
    "one": lambda net, args, split, size: kdwrap.one(net, branches=args.branches, split=split, input_size=size)[0],
    "osakd": lambda net, args, split, size: kdwrap.osakd(net)[0],
    "dml": lambda net, args, split, size: kdwrap.dml(net, peers=args.peers)[0],
}
# Methods whose checkpoint is deployed as the plain network held under a key prefix (see the module docstring).
PLAIN_UNDER = {"kd": "student."}


def build(args: argparse.Namespace) -> tuple[nn.Module, str]:
    """The wrapped model (in eval mode) and its method, with the checkpoint's weights if one is given."""
    import timm

    ckpt: dict[str, Any] | None = None
    if args.checkpoint:
        ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    if ckpt is not None and "model_args" in ckpt:
        # A full checkpoint of train_cifar.py: rebuild exactly the model it trained.
        cfg, margs = ckpt["config"], ckpt["model_args"]
        args.model, args.method, args.branches = margs["model"], cfg["method"], cfg["branches"]
        args.peers = cfg.get("peers", args.peers)
        if args.method in PLAIN_UNDER:
            prefix = PLAIN_UNDER[args.method]
            print(f"a {args.method} run: deploying its network under '{prefix}' as a plain model (no teacher needed)")
            ckpt["model"] = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
            args.method = "plain"
        args.in_chans, args.num_classes = margs["in_chans"], margs["num_classes"]
        args.input_size = margs["input_size"][-1]
        split = cfg["split"]
    else:
        split = None
    net = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes, in_chans=args.in_chans)
    if ckpt is not None and "model_args" not in ckpt:
        # The plain model's state_dict: load it before wrapping; ONE's branch copies then start from it too.
        net.load_state_dict(ckpt)
    input_size = (args.in_chans, args.input_size, args.input_size)
    model = WRAPPERS[args.method](net, args, split, input_size)
    if ckpt is not None and "model_args" in ckpt:
        model.load_state_dict(ckpt["model"])
    return model.eval(), args.method


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
    args = parse_args()
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
