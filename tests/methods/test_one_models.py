"""ONE on the model families users bring: timm and torchvision classifiers, and the paper's CIFAR ResNet-32."""
import pytest
import timm
import torch
import torchvision

import kdwrap

NUM_CLASSES = 7

MODELS = {
    # name: (constructor, input size, expected default split)
    "timm/resnet18": (lambda: timm.create_model("resnet18", num_classes=NUM_CLASSES), 64, "layer4"),
    "timm/resnet50": (lambda: timm.create_model("resnet50", num_classes=NUM_CLASSES), 64, "layer4"),
    "timm/resnext50_32x4d": (lambda: timm.create_model("resnext50_32x4d", num_classes=NUM_CLASSES), 64, "layer4"),
    "timm/efficientnet_b0": (lambda: timm.create_model("efficientnet_b0", num_classes=NUM_CLASSES), 64, "blocks.5"),
    "timm/mobilenetv3_large_100": (
        lambda: timm.create_model("mobilenetv3_large_100", num_classes=NUM_CLASSES), 64, "blocks.5"),
    "timm/convnext_tiny": (lambda: timm.create_model("convnext_tiny", num_classes=NUM_CLASSES), 64, "stages.3"),
    "timm/regnety_016": (lambda: timm.create_model("regnety_016", num_classes=NUM_CLASSES), 64, "s4"),
    "timm/densenet121": (
        lambda: timm.create_model("densenet121", num_classes=NUM_CLASSES), 64, "features.transition3"),
    "timm/vit_small_patch16_224": (
        lambda: timm.create_model("vit_small_patch16_224", num_classes=NUM_CLASSES, img_size=64), 64, "blocks.9"),
    "timm/deit_tiny_patch16_224": (
        lambda: timm.create_model("deit_tiny_patch16_224", num_classes=NUM_CLASSES, img_size=64), 64, "blocks.9"),
    "timm/swin_tiny_patch4_window7_224": (
        lambda: timm.create_model("swin_tiny_patch4_window7_224", num_classes=NUM_CLASSES, img_size=64,
                                  window_size=4), 64, "layers.3"),
    "tv/resnet50": (lambda: torchvision.models.resnet50(num_classes=NUM_CLASSES), 64, "layer4"),
    "tv/mobilenet_v3_small": (
        lambda: torchvision.models.mobilenet_v3_small(num_classes=NUM_CLASSES), 64, "features.9"),
    "tv/efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=NUM_CLASSES), 64, "features.6"),
    "tv/convnext_tiny": (lambda: torchvision.models.convnext_tiny(num_classes=NUM_CLASSES), 64, "features.6"),
    "tv/vit_b_16": (
        lambda: torchvision.models.vit_b_16(num_classes=NUM_CLASSES, image_size=64), 64,
        "encoder.layers.encoder_layer_9"),
    "tv/swin_t": (lambda: torchvision.models.swin_t(num_classes=NUM_CLASSES), 64, "features.6"),
    "tv/densenet121": (
        lambda: torchvision.models.densenet121(num_classes=NUM_CLASSES), 64, "features.transition3"),
    "kdwrap/cifar_resnet32": (lambda: _cifar_resnet32(), 32, "layer3"),
    # B x N x D tokens made by Linear + BatchNorm1d on flattened tokens: the gate pools the token axis.
    "timm/levit_128s": (lambda: timm.create_model("levit_128s", num_classes=NUM_CLASSES), 224, "stages.2"),
    # Its _load_from_state_dict reads the state dict's version metadata: export must pass it on.
    "tv/mnasnet0_5": (lambda: torchvision.models.mnasnet0_5(num_classes=NUM_CLASSES), 64, "layers.12"),
}


def _cifar_resnet32():
    from kdwrap.models import cifar_resnet32

    return cifar_resnet32(num_classes=NUM_CLASSES)


def _perturb(model):
    with torch.no_grad():
        for b in model.branches[1:]:
            for p in b.parameters():
                p.add_(0.02 * torch.randn_like(p))


@pytest.mark.parametrize("name", list(MODELS))
def test_one_step_export_and_round_trip(name):
    make, size, expected_split = MODELS[name]
    net = make()
    cls, keys = type(net), set(net.state_dict())
    model, loss_fn = kdwrap.one(net, branches=3)
    assert model.split == expected_split
    _perturb(model)

    x, y = torch.randn(2, 3, size, size), torch.randint(0, NUM_CLASSES, (2,))
    out = model(x)
    assert type(out) is torch.Tensor and out.shape == (2, NUM_CLASSES)
    loss = loss_fn(out, y)
    assert torch.isfinite(loss)
    loss.backward()
    for part, module in [("trunk", model.trunk), ("gate", model.gate)] + [
        (f"branch {i}", b) for i, b in enumerate(model.branches)
    ]:
        total = sum(p.grad.abs().sum() for p in module.parameters() if p.grad is not None)
        assert total > 0, f"{name}: no gradient in {part}"

    model.eval()
    exported = kdwrap.export(model).eval()
    assert type(exported) is cls
    assert set(exported.state_dict()) == keys
    with torch.no_grad():
        assert torch.allclose(exported(x), model(x), atol=1e-5)

    # state_dict round trip into a second wrapper of a freshly initialised model
    twin, _ = kdwrap.one(make(), branches=3)
    twin.load_state_dict(model.state_dict())
    twin.eval()
    with torch.no_grad():
        assert torch.equal(twin.forward_ensemble(x), model.forward_ensemble(x))
