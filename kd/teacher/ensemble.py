"""Several frozen teachers as one: the ensemble's soft targets, each teacher stored and cached alone.

``model.teachers`` names the members (any mix of zoo, torchvision/timm and checkpoint teachers);
each is built, given weights (``teacher.ckpts.<name>``, pretrained, the store or trained now) and
cached exactly like the single teacher, under its own store key and cache entry. The run then
sees one teacher, a ``TeacherEnsemble``, whose output for a batch is a ``ModelOutput`` with:

- ``logits``: the ensemble's. With ``combine: probs`` (the default) they are
  ``T * log(mean_k softmax(z_k / T))``, whose softmax at temperature ``T`` is exactly the
  average of the members' tempered probabilities: the soft targets of Hinton et al. 2015
  (section 4) and You et al. (KDD 2017), for every logit method at its own temperature (``T``
  is the method's unless ``teacher.ensemble.temperature`` is given). ``combine: logits``
  averages the logits instead.
- ``features``: those of one named member (``teacher.ensemble.features_from``, the first by
  default): feature methods read one teacher.
- ``members``: every member's own output, by name, for methods that weigh the teachers
  themselves (``kd.losses.camkd``).

The ensemble's own accuracy (``results.json``: ``teacher.metrics``, each member's under
``teacher.members``) is that of its prediction, the mean of the members' probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kd.errors import ConfigError, check_int
from kd.losses.base import check_positive
from kd.models.features import FeatureExtractor
from kd.outputs import ModelOutput
from kd.teacher.cache import TeacherCache

COMBINES = ("probs", "logits")


def ensemble_logits(logits: Sequence[Tensor], combine: str = "probs", temperature: float = 1.0) -> Tensor:
    """The ensemble's logits ``(B, C)`` from each member's ``(B, C)``, in float32.

    ``probs``: ``T * (logsumexp_k log_softmax(z_k / T) - log K)``, so that
    ``softmax(result / T) = mean_k softmax(z_k / T)``. ``logits``: ``mean_k z_k``.
    """
    z = torch.stack([t.float() for t in logits])  # (K, B, C)
    if combine == "logits":
        return z.mean(0)
    log_p = torch.log_softmax(z / temperature, dim=-1)
    return temperature * (torch.logsumexp(log_p, dim=0) - math.log(len(logits)))


class TeacherEnsemble(nn.Module):
    """Frozen teachers by name, combined into one output (module docstring).

    Args:
        members: The teachers, by name (at least two), in order.
        combine: ``probs`` (average of tempered probabilities) or ``logits``.
        temperature: ``T`` of ``probs``, > 0.
        features_from: The member whose features methods read; None: the first.

    Raises:
        ConfigError: On fewer than two members, an unknown ``combine`` or member name.
    """

    def __init__(self, members: Mapping[str, nn.Module], combine: str = "probs", temperature: float = 1.0,
                 features_from: str | None = None) -> None:
        super().__init__()
        if len(members) < 2:
            raise ConfigError("model.teachers", f"an ensemble needs at least two teachers, got {len(members)}; "
                              "for one, set model.teacher")
        if combine not in COMBINES:
            raise ConfigError("teacher.ensemble.combine", f"must be one of {', '.join(COMBINES)}, got {combine!r}")
        names = list(members)
        if features_from is not None and features_from not in members:
            raise ConfigError("teacher.ensemble.features_from", f"names no teacher of model.teachers ({', '.join(names)}), "
                              f"got {features_from!r}")
        self.members = nn.ModuleDict(dict(members))
        self.combine = combine
        self.temperature = check_positive("teacher.ensemble.temperature", temperature)
        self.features_from = features_from or names[0]

    def combined(self, outputs: Mapping[str, ModelOutput]) -> ModelOutput:
        """One output from every member's: the ensemble's logits, the named member's features, all members."""
        logits = ensemble_logits([o.logits for o in outputs.values()], self.combine, self.temperature)
        return ModelOutput(logits, dict(outputs[self.features_from].features), members=dict(outputs))

    def forward(self, x: Tensor) -> Tensor:
        """The ensemble's prediction ``(B, C)``: the log of the members' mean probabilities (``T = 1``),
        or their mean logits (evaluation, export, the report's latency)."""
        return ensemble_logits([m(x) for m in self.members.values()], self.combine, 1.0)

    def extractor(self, nodes: Sequence[str], *, key: str, input_shape: tuple[int, ...], tracer: str = "auto") -> EnsembleExtractor:
        """The ensemble's feature extractor: ``nodes`` read from ``features_from``, logits from all."""
        return EnsembleExtractor(self, {
            name: FeatureExtractor(member, nodes if name == self.features_from else [], key=key,
                                   input_shape=input_shape, tracer=tracer)
            for name, member in self.members.items()
        })

    def extra_repr(self) -> str:
        return f"combine={self.combine}, temperature={self.temperature:g}, features_from={self.features_from}"


class EnsembleExtractor:
    """Runs every member's ``FeatureExtractor`` and combines their outputs (``TeacherEnsemble.combined``).

    Used wherever one teacher's extractor is: ``model`` is the ensemble, ``nodes`` the named
    member's, ``members`` each member's extractor (what each member's cache stores).
    """

    def __init__(self, ensemble: TeacherEnsemble, members: dict[str, FeatureExtractor]) -> None:
        self.model = ensemble
        self.members = members
        self.nodes = members[ensemble.features_from].nodes
        self.key = members[ensemble.features_from].key
        self._compiled: Callable[[Tensor], ModelOutput] | None = None

    def __call__(self, x: Tensor) -> ModelOutput:
        return self.model.combined({name: fx(x) for name, fx in self.members.items()})

    def sync(self) -> None:
        for fx in self.members.values():
            fx.sync()

    def ensure_built(self) -> None:
        for fx in self.members.values():
            fx.ensure_built()

    def compiled(self, mode: str = "default") -> Callable[[Tensor], ModelOutput]:
        """Each member's compiled extractor (torch.compile ``mode``), combined."""
        calls = {name: fx.compiled(mode) for name, fx in self.members.items()}
        return lambda x: self.model.combined({name: call(x) for name, call in calls.items()})

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_compiled": None}


class EnsembleCache:
    """The members' caches (one entry each, ``kd.teacher.cache``), read and combined like their forwards."""

    def __init__(self, ensemble: TeacherEnsemble, members: dict[str, TeacherCache]) -> None:
        self.ensemble = ensemble
        self.members = members

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.members.values())

    def to(self, device: torch.device | str) -> EnsembleCache:
        for cache in self.members.values():
            cache.to(device)
        return self

    def lookup(self, index: Tensor, view: Tensor) -> ModelOutput:
        """Each member's stored outputs for ``(index, view)``, combined."""
        return self.ensemble.combined({name: c.lookup(index, view) for name, c in self.members.items()})


def ensemble_settings(cfg: Any) -> dict[str, Any] | None:
    """The members' model configs by name (``model.teachers``), or None when the run has one teacher.

    Raises:
        ConfigError: When ``model.teachers`` is not a mapping of names to model configs.
    """
    from omegaconf import DictConfig, OmegaConf

    node = OmegaConf.select(cfg, "model.teachers")
    if node is None or (isinstance(node, DictConfig) and not node):
        return None
    if not isinstance(node, DictConfig) or not all(isinstance(v, DictConfig) for v in node.values()):
        raise ConfigError("model.teachers", "must map names to model configs, e.g. "
                          "+model/student@model.teachers.resnet56=resnet56")
    return dict(node.items())


def seed_ensemble(cfg: Any) -> dict[str, Any]:
    """An ensemble of ``model.teacher``: ``teacher.ensemble.size`` of it (3 by default), trained with
    recipe seeds ``seed, seed + 1, ...`` (``teacher.recipes.<name>.seed``), written into ``cfg``. For
    a run that sets the size, or a method that weighs an ensemble, given one teacher.

    Raises:
        ConfigError: If ``teacher.ckpt`` gives the one teacher's weights, or the size is below 2.
    """
    from omegaconf import OmegaConf, open_dict

    if OmegaConf.select(cfg, "teacher.ckpt"):
        raise ConfigError("teacher.ckpt", "is one teacher's file but the method weighs an ensemble; give its members "
                          "as model.teachers and their files as teacher.ckpts.<name>=PATH")
    size = check_int("teacher.ensemble.size", OmegaConf.select(cfg, "teacher.ensemble.size", default=3), 2, valid=">= 2")
    seed = int(cfg.teacher.recipe.seed)
    with open_dict(cfg):
        cfg.model.teachers = {f"seed{seed + i}": cfg.model.teacher for i in range(size)}
        cfg.teacher.recipes = OmegaConf.merge({f"seed{seed + i}": {"seed": seed + i} for i in range(size)},
                                              OmegaConf.select(cfg, "teacher.recipes") or {})
    return dict(cfg.model.teachers.items())


def build_ensemble(cfg: Any, criterion: nn.Module, *, num_classes: int, input_shape: tuple[int, ...]) -> TeacherEnsemble | None:
    """The run's teacher ensemble, its members built for the data (untrained), or None for one teacher.

    ``teacher.ensemble`` (all optional): ``combine`` (probs), ``temperature`` (the method's
    ``temperature``, else 1), ``features_from`` (the first member). ``teacher.recipes.<name>``
    changes a member's training recipe (``teacher.recipe``) where it is trained. A run that sets
    ``teacher.ensemble.size``, or a method that weighs an ensemble (``requires_ensemble``), given
    ``model.teacher`` only gets ``seed_ensemble``.

    Raises:
        ConfigError: On a bad member config, a ``teacher.ckpts`` name that is no member, or
            ``teacher.ckpt`` given with an ensemble.
    """
    from omegaconf import OmegaConf

    from kd.models.build import build_model

    members = ensemble_settings(cfg)
    sized = OmegaConf.select(cfg, "teacher.ensemble.size") is not None
    if members is None and (sized or getattr(criterion, "requires_ensemble", False)):
        members = seed_ensemble(cfg)
    if members is None:
        return None
    if OmegaConf.select(cfg, "teacher.ckpt"):
        raise ConfigError("teacher.ckpt", "is one teacher's file but model.teachers names an ensemble; give each "
                          "member's as teacher.ckpts.<name>=PATH")
    for key in ("ckpts", "recipes"):
        unknown = sorted(set(OmegaConf.select(cfg, f"teacher.{key}") or {}) - set(members))
        if unknown:
            raise ConfigError(f"teacher.{key}.{unknown[0]}", f"names no teacher of model.teachers ({', '.join(members)})")
    nets = {name: build_model(node, key=f"model.teachers.{name}", num_classes=num_classes, input_shape=input_shape)
            for name, node in members.items()}
    settings = OmegaConf.select(cfg, "teacher.ensemble") or {}
    temperature = settings.get("temperature")
    if temperature is None:
        temperature = getattr(criterion, "temperature", 1.0)
    return TeacherEnsemble(nets, combine=settings.get("combine", "probs"), temperature=temperature,
                           features_from=settings.get("features_from"))
