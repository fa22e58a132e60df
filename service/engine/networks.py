"""Build a served network from its config: the demo zoo or a torchvision architecture with safetensors weights,
wrapped by ``create_feature_extractor`` so that ONE forward yields logits, pooled features and feature maps."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torchvision.models.feature_extraction import create_feature_extractor

from service.settings import ModelConfig


class NetworkConfigError(ValueError):
    """The model config does not describe a network that can be built."""


class Chain(nn.Module):
    """Submodules applied in turn; a tensor with more than 2 dims is flattened before an ``nn.Linear``."""

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: Tensor) -> Tensor:
        for part in self.parts:
            if isinstance(part, nn.Linear) and x.dim() > 2:
                x = torch.flatten(x, 1)
            x = part(x)
        return x


class LogitsOnly(nn.Module):
    """The network as ``input -> logits`` (torchvision segmentation models return ``{"out": ...}``)."""

    def __init__(self, extractor: nn.Module) -> None:
        super().__init__()
        self.extractor = extractor

    def forward(self, x: Tensor) -> Tensor:
        return self.extractor(x)["logits"]


def _zoo_network(config: ModelConfig) -> nn.Module:
    from ood_core import zoo

    if config.architecture == "digits-classifier":
        return zoo.load_classifier(config.weights, device="cpu")
    if config.architecture == "digits-segmenter":
        return zoo.load_segmenter(config.weights, device="cpu")
    raise NetworkConfigError(f"unknown zoo architecture {config.architecture!r}")


def _torchvision_network(config: ModelConfig) -> nn.Module:
    """``torchvision.models.get_model(architecture, weights=None, num_classes=...)``: any registered builder
    (classification, segmentation, ...); nothing is downloaded, the weights come from ``config.weights``."""
    import torchvision.models as tvm

    if config.weights is None:
        raise NetworkConfigError(f"model {config.name!r}: a torchvision network needs a safetensors 'weights' file")
    try:
        builder = tvm.get_model_builder(config.architecture)
    except ValueError:
        raise NetworkConfigError(
            f"torchvision has no architecture {config.architecture!r} (see torchvision.models.list_models())"
        ) from None
    kwargs: dict[str, Any] = {"weights": None, "num_classes": config.num_classes}
    accepted = inspect.signature(builder).parameters
    # segmentation builders: no pretrained backbone download; the auxiliary head is a training aid, not served
    kwargs.update({k: v for k, v in (("weights_backbone", None), ("aux_loss", False)) if k in accepted})
    network = tvm.get_model(config.architecture, **kwargs)
    tensors = load_file(str(config.weights))
    try:
        missing, unexpected = network.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise NetworkConfigError(f"weights {config.weights} do not fit {config.architecture}: {exc}") from exc
    if missing or unexpected:
        raise NetworkConfigError(
            f"weights {config.weights} do not fit {config.architecture}: missing {list(missing)[:5]}, "
            f"unexpected {list(unexpected)[:5]}"
        )
    return network


def build_network(config: ModelConfig) -> nn.Module:
    """The raw network (CPU, eval mode)."""
    network = _zoo_network(config) if config.source == "zoo" else _torchvision_network(config)
    return network.eval()


def build_extractor(network: nn.Module, config: ModelConfig) -> nn.Module:
    """Graph module returning ``{"logits", "features"?, "feature_maps"?}`` in one forward."""
    nodes = {"logits": config.nodes.logits}
    if config.nodes.features:
        nodes["features"] = config.nodes.features
    if config.nodes.feature_maps:
        nodes["feature_maps"] = config.nodes.feature_maps
    try:
        extractor = create_feature_extractor(network, return_nodes={v: k for k, v in nodes.items()})
    except ValueError as exc:
        raise NetworkConfigError(f"model {config.name!r}: bad graph node in {nodes}: {exc}") from exc
    return extractor.eval()


def build_heads(network: nn.Module, config: ModelConfig) -> dict[str, nn.Module | None]:
    """``head`` modules from features / feature maps to logits, as named in ``config.heads``."""
    modules = dict(network.named_modules())
    heads: dict[str, nn.Module | None] = {}
    for kind in ("features", "feature_maps"):
        names: list[str] = getattr(config.heads, kind)
        unknown = [n for n in names if n not in modules]
        if unknown:
            raise NetworkConfigError(f"model {config.name!r}: no submodule(s) {unknown} for the {kind} head")
        heads[kind] = Chain([modules[n] for n in names]).eval() if names else None
    return heads
