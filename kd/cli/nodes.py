"""``kd-nodes``: the feature names of the configured networks (student, teacher, peers...), with their shapes.

Distillation methods name the features they read (``distill.student_nodes=[layer2]``); this
lists every name the models offer, with the shape of its output for one input of the data, and
marks the taps of the model configs (``_nodes_``). Same config tree and overrides as kd-train:

    kd-nodes                                         # the digits pair
    kd-nodes experiment=digits_resnet                # torchvision ResNet-34 -> ResNet-18
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, OmegaConf

from kd.cli import config_dir
from kd.errors import ConfigError, instantiate_checked

if TYPE_CHECKING:
    from torch import nn


def node_table(model: nn.Module, input_shape: tuple[int, ...], taps: dict[str, Any] | None = None) -> list[str]:
    """Lines ``name  shape  [tap]`` for every node (or module, when FX cannot trace) of a model."""
    import torch

    from kd.models.features import FeatureExtractor, available_nodes

    mode, names = available_nodes(model)
    extractor = FeatureExtractor(model, names, key="nodes", input_shape=input_shape, tracer="fx" if mode == "fx" else "hooks")
    was = model.training
    model.eval()
    with torch.no_grad():
        out = extractor(torch.zeros(1, *input_shape))
    model.train(was)
    tapped: dict[str, list[str]] = {}
    for tap, value in (taps or {}).items():
        for name in [value] if isinstance(value, str) else list(value):
            tapped.setdefault(name, []).append(tap)
    width = max(len(n) for n in names)
    lines = [f"# {type(model).__name__}: {len(names)} {'FX nodes' if mode == 'fx' else 'modules (hooks)'}"]
    for name in names:
        value = out.features.get(name)
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else "-"
        mark = f"  <- {', '.join(tapped[name])}" if name in tapped else ""
        lines.append(f"{name:<{width}}  {shape}{mark}")
    return lines


def networks(cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    """Every network of the config by its key: the student, its peers, the teacher or the ensemble's
    members, and a chain's links (docs/roles.md)."""
    found = [("model.student", cfg.model.student)]
    found += [(f"model.peers.{n}", v) for n, v in (OmegaConf.select(cfg, "model.peers") or {}).items()]
    teachers = OmegaConf.select(cfg, "model.teachers") or {}
    found += [(f"model.teachers.{n}", v) for n, v in teachers.items()] or [("model.teacher", cfg.model.teacher)]
    found += [(f"chain.links.{n}.model", v.model) for n, v in (OmegaConf.select(cfg, "chain.links") or {}).items()]
    return found


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> None:
    """Prints the node table of every network of the config (``networks``)."""
    from kd.models.build import NODES_KEY, build_model  # and torch: not imported for --help

    try:
        datamodule = instantiate_checked(cfg.data, "data")
        shape = tuple(datamodule.input_shape)
        for key, node in networks(cfg):
            model = build_model(node, key=key, num_classes=datamodule.num_classes, input_shape=shape)
            taps = OmegaConf.to_container(node[NODES_KEY], resolve=True) if NODES_KEY in node else None
            print(f"{key}:")
            print("\n".join(node_table(model, shape, taps)), flush=True)
    except ConfigError as e:
        print(f"kd-nodes: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def cli() -> None:
    """The ``kd-nodes`` command: ``main`` with one-line errors for configs Hydra cannot compose."""
    from kd.cli.compose_errors import run_app

    run_app(main, "kd-nodes")


if __name__ == "__main__":
    cli()
