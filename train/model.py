"""Model construction, optional pretrained weights, and TorchScript export."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torchvision
from fruitserve.handler.artifacts import TORCHSCRIPT_DEPRECATION, load_torchscript

ARCHES = ("resnet18", "resnet34", "resnet50")


def build_model(arch: str, num_classes: int, weights: Path | None = None) -> torch.nn.Module:
    """A torchvision ResNet with ``num_classes`` outputs, from scratch or from a local state dict.

    Weights are only ever read from a file the user names (``weights_only=True``, no
    pickled code); nothing is downloaded.
    """
    if arch not in ARCHES:
        raise ValueError(f"unknown --arch {arch!r}; choose from {', '.join(ARCHES)}")
    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        own = model.state_dict()
        # The classifier of an ImageNet checkpoint has 1000 outputs: keep ours when shapes differ.
        compatible = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        missing = sorted(set(own) - set(compatible))
        if len(compatible) < len(own) // 2:
            raise ValueError(f"{weights} does not look like {arch} weights ({len(compatible)}/{len(own)} tensors match)")
        model.load_state_dict(compatible, strict=False)
        if any(not k.startswith("fc.") for k in missing):
            raise ValueError(f"{weights} is missing backbone tensors: {missing[:5]}")
    return model


def set_backbone_trainable(model: torch.nn.Module, trainable: bool) -> None:
    """Freeze or unfreeze everything except the final ``fc`` layer (fine-tuning)."""
    for name, param in model.named_parameters():
        if not name.startswith("fc."):
            param.requires_grad_(trainable)


def export_torchscript(model: torch.nn.Module, path: Path, example: torch.Tensor) -> float:
    """Script the model in eval mode on CPU, save it, reload it, and return max |scripted - eager|.

    TorchScript remains what TorchServe loads without our code; torch 2.14 marks
    ``torch.jit`` deprecated, and that one warning is expected here.
    """
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    example = example.to("cpu")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=TORCHSCRIPT_DEPRECATION, category=FutureWarning)
        scripted = torch.jit.script(model)
        tmp = path.with_name(path.name + ".tmp")
        scripted.save(str(tmp))
        tmp.replace(path)
    reloaded = load_torchscript(path, torch.device("cpu"))
    with torch.inference_mode():
        return float((reloaded(example) - model(example)).abs().max())


def eager_from_torchscript(scripted: torch.jit.ScriptModule, arch: str, num_classes: int) -> torch.nn.Module:
    """The torchvision model a ``model.pt`` was scripted from, with its weights (what ``torch.export`` needs)."""
    model = build_model(arch, num_classes)
    model.load_state_dict(scripted.state_dict())
    return model.eval()


def export_onnx(model: torch.nn.Module, path: Path, example: torch.Tensor,
                outputs: tuple[str, ...] = ("logits",)) -> None:
    """ONNX with a dynamic batch dimension: input ``images`` (for a torchvision model, normalised float NCHW, as
    ``model.pt`` takes), outputs named ``outputs``. torch.export-based (``dynamo=True``, the exporter torch
    recommends since 2.9; it needs onnxscript)."""
    import inspect
    import logging

    batch = torch.export.Dim("batch", min=1, max=4096)
    argument = next(iter(inspect.signature(model.forward).parameters))
    tmp = path.with_name(path.name + ".tmp")
    # the exporter's passes log every step at INFO: keep them to warnings while it runs
    quiet = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.WARNING)
    try:
        torch.onnx.export(model.to("cpu").eval(), (example.to("cpu"),), str(tmp), dynamo=True, external_data=False,
                          input_names=["images"], output_names=list(outputs), dynamic_shapes={argument: {0: batch}},
                          verbose=False)
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)
    tmp.replace(path)
