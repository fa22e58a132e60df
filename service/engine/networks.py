"""Build a served network from its config: the demo zoo or a torchvision architecture with safetensors weights,
wrapped by ``create_feature_extractor`` so that ONE forward yields logits, pooled features, feature maps and the
outputs of the ``nodes.layers`` list (keys ``layers.0``, ``layers.1``, ...: :func:`layer_keys`).

The detectors that run the network themselves (``input_kind = "input"``) get modules built on the same extractor,
sharing its parameters: :class:`GraphOutput` (input -> one output, parameters named as in the network) and
:class:`TappedLogits` (input -> logits, the layer outputs passed through hookable taps)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torchvision.models.feature_extraction import create_feature_extractor

from service.settings import ModelConfig, repeated_layer


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


def layer_keys(config: ModelConfig) -> list[str]:
    """The output keys of the ``nodes.layers`` list: ``layers.0``, ``layers.1``, ..."""
    return [f"layers.{i}" for i in range(len(config.nodes.layers))]


class AliasedOutputs(nn.Module):
    """The extractor's graph module, plus the outputs of nodes that several output keys name (``feature_maps``
    and one of ``layers``, say) under each of those keys."""

    def __init__(self, graph: nn.Module, aliases: dict[str, str]) -> None:
        super().__init__()
        self.graph = graph
        self.aliases = aliases
        """key -> the key its node's output has in the graph's result"""

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        outputs: dict[str, Tensor] = self.graph(x)
        for alias, key in self.aliases.items():
            outputs[alias] = outputs[key]
        return outputs


def graph_module(extractor: nn.Module) -> nn.Module:
    """The ``create_feature_extractor`` graph module inside an extractor of :func:`build_extractor`."""
    return extractor.graph if isinstance(extractor, AliasedOutputs) else extractor


def build_extractor(network: nn.Module, config: ModelConfig) -> nn.Module:
    """Graph module returning ``{"logits", "features"?, "feature_maps"?, "layers.<i>"...}`` in one forward.

    A node may give several of the outputs (``feature_maps`` and one of ``layers``), but ``layers`` names each node
    at most once (checked by the config too; again here for configs built without validation)."""
    if (problem := repeated_layer(config.nodes.layers)) is not None:
        raise NetworkConfigError(f"model {config.name!r}: nodes.layers: {problem}")
    nodes = {"logits": config.nodes.logits}
    if config.nodes.features:
        nodes["features"] = config.nodes.features
    if config.nodes.feature_maps:
        nodes["feature_maps"] = config.nodes.feature_maps
    nodes.update(zip(layer_keys(config), config.nodes.layers, strict=True))
    return_nodes: dict[str, str] = {}
    aliases: dict[str, str] = {}
    for key, node in nodes.items():
        if node in return_nodes:  # one node, several keys: computed once, returned under each
            aliases[key] = return_nodes[node]
        else:
            return_nodes[node] = key
    try:
        extractor = create_feature_extractor(network, return_nodes=return_nodes)
    except ValueError as exc:
        raise NetworkConfigError(f"model {config.name!r}: bad graph node in {nodes}: {exc}") from exc
    return (AliasedOutputs(extractor, aliases) if aliases else extractor).eval()


class GraphOutput(nn.Module):
    """``input -> one output`` (``key``) of the extractor, for the detectors that differentiate through the network
    or sample its dropout: the extractor's submodules are registered here under the network's own names (shared,
    not copied), so ``named_parameters()`` names them as in the network (``fc.weight``: what a ``param_filter``
    names) and ``train()`` / ``eval()`` reach its dropout layers."""

    _extractor: nn.Module

    def __init__(self, extractor: nn.Module, key: str) -> None:
        super().__init__()
        object.__setattr__(self, "_extractor", extractor)  # not a submodule: no "extractor." prefix in the names
        self.key = key
        for name, child in graph_module(extractor).named_children():
            self.add_module(name, child)

    def forward(self, x: Tensor) -> Tensor:
        return self._extractor(x)[self.key]  # type: ignore[no-any-return]


class TappedLogits(nn.Module):
    """``input -> logits`` of the extractor that also passes the output of each of ``keys`` through an
    ``nn.Identity`` tap (``taps[i]``), so that forward hooks on the taps see those outputs (NACUE's ``layers``)."""

    _extractor: nn.Module

    def __init__(self, extractor: nn.Module, keys: list[str]) -> None:
        super().__init__()
        object.__setattr__(self, "_extractor", extractor)
        self.keys = list(keys)
        self.taps = nn.ModuleList(nn.Identity() for _ in self.keys)

    def forward(self, x: Tensor) -> Tensor:
        outputs = self._extractor(x)
        for tap, key in zip(self.taps, self.keys, strict=True):
            tap(outputs[key])
        return outputs["logits"]  # type: ignore[no-any-return]


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
