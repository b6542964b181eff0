"""Named intermediate features of any model, without editing its code.

A method asks for features by name (``layer2``, ``layer2.1.add``, ``features.4``). kd collects
them with torchvision's FX feature extraction (``create_feature_extractor``), which knows every
operation of the forward pass, functional ones included (the residual ``add`` before a ReLU is
the pre-activation that AB and OFD need). A module name that is a prefix of node names
(``layer2``) means the last operation inside that module. Models FX cannot trace (data-dependent
control flow) fall back to forward hooks, which see module outputs only.

Two traps are handled here. A feature consumed by an in-place operation later in the forward
pass (``ReLU(inplace=True)`` after a BatchNorm, ``x.relu_()``) would come out already modified:
such nodes are copied right after they are computed. And the extractor shares its parameters
with the model, so checkpoints, optimizers and ``.to(device)`` see one set of weights.
"""

from __future__ import annotations

import difflib
import logging
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, fx, nn

from kd.errors import ConfigError
from kd.outputs import ModelOutput

log = logging.getLogger(__name__)

_LOGITS = "__kd_logits__"
_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


class FeatureExtractor:
    """Runs a model and returns its logits with the named features, as a ``ModelOutput``.

    Not an ``nn.Module`` on purpose: it holds no weights of its own (the model's are shared), so
    it adds nothing to checkpoints or optimizers. It follows the model's train/eval mode.

    Args:
        model: The network, unchanged.
        nodes: FX node or module names whose outputs to return (may be empty).
        key: Config key of the names, for error messages.
        input_shape: Shape of one input ``(C, H, W)``, for the check of the traced graph.
        tracer: ``"auto"`` (FX, falling back to hooks when the model cannot be traced), ``"fx"``
            or ``"hooks"``.

    Raises:
        ConfigError: When a name is not a node (or module) of the model; the message lists the
            available names.

    Example:
        >>> fx = FeatureExtractor(resnet18(), ["layer1", "layer4.1.add"], key="distill.student_nodes",
        ...                       input_shape=(3, 224, 224))
        >>> out = fx(images)  # out.logits (B, 1000), out.features["layer1"] (B, 64, 56, 56)
    """

    def __init__(
        self,
        model: nn.Module,
        nodes: Sequence[str],
        *,
        key: str,
        input_shape: tuple[int, ...],
        tracer: str = "auto",
    ) -> None:
        if tracer not in ("auto", "fx", "hooks"):
            raise ConfigError("tracer", f"must be auto, fx or hooks, got {tracer!r}")
        self.model = model
        self.nodes = list(dict.fromkeys(nodes))
        self.key = key
        self.mode = "none"
        self._last = ""  # the FX node whose value the model returns
        self._fx_names: dict[str, str] = {}  # requested name -> the FX node it means
        self._graph: fx.GraphModule | None = None
        self._hooked: dict[str, Tensor] = {}
        self._hooks: dict[str, tuple[nn.Module, Any]] = {}  # name -> (module, removable handle)
        self._active = False
        self._compiled: tuple[fx.GraphModule | None, Callable[[Tensor], ModelOutput]] | None = None
        if not self.nodes:
            return
        if tracer in ("auto", "fx"):
            try:
                available = fx_node_names(model)
            except Exception as e:  # noqa: BLE001 - any tracing failure
                if tracer == "fx":
                    raise ConfigError(key, f"FX cannot trace {type(model).__name__}: {type(e).__name__}: {e}") from e
                log.info("FX cannot trace %s (%s); collecting features with forward hooks", type(model).__name__, e)
            else:
                self._check_names(available, prefixes=True)
                self.mode, self._last = "fx", available[-1]
                # `layer1` means the last node inside layer1; two names of one node share it
                self._fx_names = {n: _resolve(n, available) for n in self.nodes}
                if _logits_match(self, input_shape):
                    return
                if tracer == "fx":
                    raise ConfigError(key, f"the FX graph of {type(model).__name__} does not reproduce its output")
                log.info("the FX graph of %s does not end in its logits; using forward hooks", type(model).__name__)
                self._graph = None
        self._check_names([n for n, _ in model.named_modules() if n], prefixes=False)
        self.mode = "hooks"
        self.sync()

    def _check_names(self, available: list[str], prefixes: bool) -> None:
        for name in self.nodes:
            if name in available or (prefixes and any(a.startswith(name + ".") for a in available)):
                continue
            pool = available + ([n for n, _ in self.model.named_modules() if n] if prefixes else [])
            close = difflib.get_close_matches(name, list(dict.fromkeys(pool)), n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            kind = "node" if prefixes else "module"
            raise ConfigError(
                self.key, f"{type(self.model).__name__} has no {kind} named {name!r}; {hint}"
                f"available: {', '.join(available)}"
            )

    def sync(self) -> None:
        """Re-attaches to the model's current submodules.

        Lightning's ``sync_batchnorm`` (and any module surgery) replaces submodules with new
        objects; the traced graph or the hooks would keep calling the old ones. Call this after
        such a change (the training modules call it when training starts); it is cheap when
        nothing changed.
        """
        if self.mode == "fx" and self._graph is not None:
            targets = [n.target for n in self._graph.graph.nodes if n.op == "call_module"]
            if any(self._graph.get_submodule(str(t)) is not self.model.get_submodule(str(t)) for t in targets):
                self._graph = None  # rebuilt on the next call
        if self.mode == "hooks":
            for name in self.nodes:
                module = self.model.get_submodule(name)
                old = self._hooks.get(name)
                if old is not None and old[0] is module:
                    continue
                if old is not None and old[1] is not None:
                    old[1].remove()
                self._hooks[name] = (module, module.register_forward_hook(_Hook(self, name)))

    def __getstate__(self) -> dict[str, Any]:
        # Picklable (ddp_spawn): the graph is rebuilt on first use; hook handles are not kept.
        state = dict(self.__dict__)
        state["_graph"] = None
        state["_compiled"] = None
        state["_hooked"] = {}
        state["_hooks"] = {name: (module, None) for name, (module, _) in self._hooks.items()}
        return state

    def ensure_built(self) -> None:
        """Builds the FX graph now if it was dropped (pickling, ``sync``), so nothing is traced later."""
        if self.mode == "fx" and self._graph is None:
            self._graph = _build_graph(self.model, sorted(set(self._fx_names.values())), self._last)

    def compiled(self, mode: str = "default") -> Callable[[Tensor], ModelOutput]:
        """``torch.compile`` of this extractor's call, its FX graph built first in eager mode.

        ``create_feature_extractor`` cannot run inside a compiled function, so the graph must exist
        before compiling. Compiled again when ``sync`` dropped the graph (module surgery).

        Args:
            mode: torch.compile's mode (``reduce-overhead``: CUDA graphs, for launch-bound small models).
        """
        self.ensure_built()
        if self._compiled is None or self._compiled[0] is not self._graph:
            self._compiled = (self._graph, torch.compile(self.__call__, mode=mode))
        return self._compiled[1]

    def __call__(self, x: Tensor) -> ModelOutput:
        """The model's logits and the requested features for a batch ``x``."""
        if self.mode == "fx":
            if self._graph is None:
                self._graph = _build_graph(self.model, sorted(set(self._fx_names.values())), self._last)
            out = _graph_for(self._graph, self.model.training)(x)
            return ModelOutput(logits=out[_LOGITS], features={n: out[self._fx_names[n]] for n in self.nodes})
        if self.mode == "hooks":
            self._active = True
            try:
                logits = self.model(x)
                missing = [n for n in self.nodes if n not in self._hooked]
                if missing:
                    raise ConfigError(
                        self.key, f"{', '.join(missing)} never ran in {type(self.model).__name__}.forward; "
                        "name modules that the forward pass calls"
                    )
                features = {n: self._hooked[n] for n in self.nodes}
            finally:
                self._active = False
                self._hooked = {}
            return ModelOutput(logits=logits, features=features)
        return ModelOutput(logits=self.model(x))


class _Hook:
    """Forward hook storing a module's output for an extractor (a class, so it pickles)."""

    def __init__(self, extractor: FeatureExtractor, name: str) -> None:
        self.extractor = extractor
        self.name = name

    def __call__(self, module: nn.Module, args: object, output: Tensor) -> None:
        if self.extractor._active:  # noqa: SLF001
            # A copy: the model may modify this output in place further on.
            self.extractor._hooked[self.name] = output.clone()  # noqa: SLF001


def fx_node_names(model: nn.Module) -> list[str]:
    """The FX node names of a model's forward pass, in order (train and eval graphs together).

    Raises:
        Exception: Whatever FX raises when the model cannot be traced.
    """
    from torchvision.models.feature_extraction import get_graph_node_names

    train, evaluation = get_graph_node_names(model)
    names = list(dict.fromkeys([*train, *evaluation]))
    return [n for n in names if n != "x"] if names and names[0] == "x" else names


def available_nodes(model: nn.Module) -> tuple[str, list[str]]:
    """``("fx", node names)`` when FX can trace the model, else ``("hooks", module names)``."""
    try:
        return "fx", fx_node_names(model)
    except Exception:  # noqa: BLE001
        return "hooks", [n for n, _ in model.named_modules() if n]


def _resolve(name: str, available: list[str]) -> str:
    """The FX node a name means: itself, or the last node inside the module of that name."""
    if name in available:
        return name
    return [a for a in available if a.startswith(name + ".")][-1]


def _build_graph(model: nn.Module, nodes: list[str], last: str) -> fx.GraphModule:
    from torchvision.models.feature_extraction import create_feature_extractor

    return_nodes = {n: n for n in nodes}
    return_nodes.setdefault(last, _LOGITS)
    graph = create_feature_extractor(model, return_nodes=return_nodes, suppress_diff_warning=True)
    if return_nodes[last] != _LOGITS:  # a requested feature is also the output node
        for g in (graph.train_graph, graph.eval_graph):
            output = next(n for n in g.nodes if n.op == "output")
            values = dict(output.args[0])
            values[_LOGITS] = values[last]
            output.args = (values,)
    for g in (graph.train_graph, graph.eval_graph):
        _copy_mutated_outputs(graph, g)
    graph.graph = graph.train_graph if graph.training else graph.eval_graph  # recompiles
    return graph


def _graph_for(graph: fx.GraphModule, training: bool) -> fx.GraphModule:
    """The graph module set to its train or eval graph.

    Only the graph is switched: ``nn.Module.train`` would also reset the mode of every
    submodule, which the model (a frozen teacher, a student with frozen BN) decides itself.
    """
    if graph.training != training:
        graph.graph = graph.train_graph if training else graph.eval_graph  # recompiles
        graph.training = training
    return graph


def _copy_mutated_outputs(root: nn.Module, graph: fx.Graph) -> None:
    """Makes each returned feature a copy taken before any in-place op can change it."""
    output = next(n for n in graph.nodes if n.op == "output")
    values = dict(output.args[0])
    for name, node in values.items():
        if name != _LOGITS and any(_in_place_use(root, user, node) for user in node.users):
            with graph.inserting_after(node):
                values[name] = graph.call_function(torch.clone, (node,))
    output.args = (values,)


def _in_place_use(root: nn.Module, user: fx.Node, node: fx.Node) -> bool:
    first = user.args[0] if user.args else None
    if first is not node:
        return False
    if user.op == "call_module":
        return bool(getattr(root.get_submodule(str(user.target)), "inplace", False))
    if user.op == "call_function":
        name = getattr(user.target, "__name__", "")
        in_place_name = name.endswith("_") and not name.startswith("_")  # torch.relu_, F.relu_
        return bool(user.kwargs.get("inplace", False)) or user.target in _INPLACE_FUNCTIONS or in_place_name
    if user.op == "call_method":
        return str(user.target).endswith("_") and not str(user.target).startswith("_")
    return False


@torch.no_grad()
def _logits_match(extractor: FeatureExtractor, input_shape: tuple[int, ...]) -> bool:
    """Whether the traced graph's last node is the model's output, on one random input."""
    model = extractor.model
    was_training = model.training
    model.eval()
    try:
        x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
        expected = model(x)
        got = extractor(x).logits
        return isinstance(expected, Tensor) and isinstance(got, Tensor) and torch.equal(expected, got)
    finally:
        model.train(was_training)
