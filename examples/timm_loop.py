"""An ordinary timm training loop, with online KD added by two changed lines (marked ``# kdwrap:``).

    python examples/timm_loop.py                      # ONE on resnet10t, digits upscaled to 32x32
    python examples/timm_loop.py --method osakd --model cifar_resnet20 --steps 100

After training, the loop exports the deployable model (the original timm architecture, no kdwrap code needed to
load it) and checks that it gives exactly the outputs of the wrapper in eval mode.
"""
from __future__ import annotations

import argparse
import io

import timm
import torch
import torch.nn.functional as F

import kdwrap
import kdwrap.models  # noqa: F401  (registers kdwrap's cifar_resnet* and small_cnn with timm)
from kdwrap.demo.data import batches, load_digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet10t", help="any timm model name (trained from scratch)")
    parser.add_argument("--method", default="one", choices=kdwrap.METHODS)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    # Data: scikit-learn's 8x8 digits (no download), upscaled to 32x32 so ImageNet-style models keep some pixels.
    x_train, y_train, x_test, y_test, classes = load_digits()
    x_train = F.interpolate(x_train, size=32, mode="bilinear", align_corners=False)
    x_test = F.interpolate(x_test, size=32, mode="bilinear", align_corners=False)
    mean, std = x_train.mean(), x_train.std()
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std

    model = timm.create_model(args.model, pretrained=False, in_chans=1, num_classes=len(classes))
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (1, 32, 32)}  # the size this loop feeds it
    criterion = torch.nn.CrossEntropyLoss()
    model, criterion = kdwrap.wrap(model, args.method)  # kdwrap: wrap the model; the criterion becomes kdwrap's loss
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)

    step, gen = 0, torch.Generator().manual_seed(args.seed)
    model.train()
    while step < args.steps:
        for x, y in batches(x_train, y_train, args.batch_size, shuffle=True, generator=gen, drop_last=True):
            loss = criterion(model(x), y)  # unchanged: model(x) still returns plain logits
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step % 20 == 0 or step == args.steps:
                parts = ", ".join(f"{k} {v.float().mean().item():.3f}" for k, v in criterion.parts.items())
                print(f"step {step:4d}  {parts}")
            if step == args.steps:
                break

    model.eval()
    deployed = kdwrap.export(model)  # kdwrap: was `deployed = model`; the plain timm model with the trained weights
    print(kdwrap.summary(model))

    # The exported model is the original timm class with the original state_dict keys: a fresh timm model loads it.
    buf = io.BytesIO()
    torch.save(deployed.state_dict(), buf)
    buf.seek(0)
    fresh = timm.create_model(args.model, pretrained=False, in_chans=1, num_classes=len(classes))
    fresh.load_state_dict(torch.load(buf))
    fresh.eval()
    with torch.no_grad():
        wrapper_out = model(x_test)  # in eval mode the wrapper computes exactly the deployed model
        deployed_out = fresh(x_test)
    torch.testing.assert_close(deployed_out, wrapper_out)
    acc = (deployed_out.argmax(1) == y_test).float().mean().item()
    print(f"exported {type(fresh).__name__} ({buf.getbuffer().nbytes:,} bytes): test accuracy {100 * acc:.2f} % "
          f"({len(y_test)} images); its outputs equal the wrapper's eval outputs")
    if args.method == "one":
        with torch.no_grad():
            ens = kdwrap.export(model, ensemble=True).eval()(x_test)
        print(f"ONE-E (gated ensemble of {model.num_branches} branches): test accuracy "
              f"{100 * (ens.argmax(1) == y_test).float().mean().item():.2f} %")


if __name__ == "__main__":
    main()
