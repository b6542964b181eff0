"""Several distillation methods at once, each with its own weights (CRD + KD, FitNet + KD).

The members are ordinary method configs composed under ``methods`` (see
``conf/distill/crd_kd.yaml``); each keeps its own ``weight`` (a number or a schedule) and
``ce_weight``. Their terms are merged into one dict, so every term is logged on its own; a
term whose name another member already used is logged as ``<member>_<term>``.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from kd.errors import ConfigError
from kd.losses.base import DistillationLoss, Stage
from kd.outputs import Batch, DataInfo, ModelOutput


class Combined(DistillationLoss):
    """The sum of several methods' weighted terms.

    Args:
        methods: Methods by name; each brings its own weights and feature nodes.

    Raises:
        ConfigError: If no method is given, a member is not a method, or more than one member
            weights the hard-label cross-entropy (it would be counted twice: set
            ``ce_weight: 0`` on all but one).
    """

    def __init__(self, methods: Mapping[str, DistillationLoss]) -> None:
        members = dict(methods)
        if not members:
            raise ConfigError("methods", "needs at least one method")
        for name, member in members.items():
            if not isinstance(member, DistillationLoss):
                raise ConfigError(f"methods.{name}", f"is not a distillation method: {type(member).__name__}")
        with_ce = [name for name, m in members.items() if m.ce_weight > 0]
        if len(with_ce) > 1:
            raise ConfigError(
                "methods", f"{' and '.join(with_ce)} both weight the cross-entropy, which would count "
                f"it twice; set ce_weight: 0 on all but one (e.g. methods.{with_ce[-1]}.ce_weight=0)"
            )
        super().__init__(
            student_nodes=[n for m in members.values() for n in m.student_nodes],
            teacher_nodes=[n for m in members.values() for n in m.teacher_nodes],
        )
        self.student_nodes = tuple(dict.fromkeys(self.student_nodes))
        self.teacher_nodes = tuple(dict.fromkeys(self.teacher_nodes))
        self.methods = nn.ModuleDict(members)
        self.requires_teacher = any(m.requires_teacher for m in members.values())
        self.requires_index = any(m.requires_index for m in members.values())
        self.requires_pairs = any(m.requires_pairs for m in members.values())
        self.requires_strong_view = any(m.requires_strong_view for m in members.values())

    def setup(self, student: ModelOutput, teacher: ModelOutput | None, data: DataInfo) -> None:
        for name, member in self.methods.items():
            try:
                member.setup(student, teacher, data)
            except ConfigError as e:
                raise e.with_prefix(f"methods.{name}") from None

    def stages(self) -> list[Stage]:
        return [stage for member in self.methods.values() for stage in member.stages()]

    def forward(
        self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch, epoch: int = 0
    ) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        for name, member in self.methods.items():
            for term, value in member(student, teacher, batch, epoch).items():
                # two members with the same term name (two FitNets) stay apart: <member>_<term>
                terms[f"{name}_{term}" if term in terms else term] = value
        return terms

    def extra_repr(self) -> str:
        return ""
