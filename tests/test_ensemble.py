"""Teacher ensembles (kd.teacher.ensemble): the soft targets, each member stored and cached alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kd.errors import ConfigError
from kd.losses.kd import kd_loss
from kd.teacher.cache import TeacherCache
from kd.teacher.ensemble import EnsembleCache, TeacherEnsemble, ensemble_logits
from kd.teacher.source import get_teacher
from kd.training.module import DistillationModule
from kd.training.prepare import prepare
from kd.training.run import run

TWO = ("+model/teacher@model.teachers.big=digits_cnn", "+model/student@model.teachers.small=digits_cnn_tiny")


def test_the_ensemble_logits_give_the_mean_of_the_tempered_probabilities() -> None:
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(5, 7, generator=g) * 3 for _ in range(3)]
    for t in (1.0, 4.0):
        by_hand = sum(torch.softmax(zk / t, dim=1) for zk in z) / 3
        torch.testing.assert_close(torch.softmax(ensemble_logits(z, "probs", t) / t, dim=1), by_hand)
    torch.testing.assert_close(ensemble_logits(z, "logits"), (z[0] + z[1] + z[2]) / 3)
    # KD against the ensemble is KL from the averaged soft targets, T^2-scaled (Hinton et al. 2015)
    s, t = torch.randn(5, 7, generator=g), 4.0
    target = sum(torch.softmax(zk / t, dim=1) for zk in z) / 3
    kl = (target * (target.log() - torch.log_softmax(s / t, dim=1))).sum(1).mean() * t * t
    torch.testing.assert_close(kd_loss(s, ensemble_logits(z, "probs", t), t), kl)


def test_the_soft_targets_are_the_average_of_each_teacher_read_from_its_own_cache(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(*TWO, "teacher_cache.enabled=true")
    job = prepare(cfg)
    assert isinstance(job.teacher, TeacherEnsemble) and job.teacher.temperature == 4.0  # distill=kd's
    teacher = get_teacher(cfg, job.datamodule, job.teacher, job.features[1], torch.device("cpu"))
    assert isinstance(teacher.cache, EnsembleCache)
    caches = teacher.cache.members
    assert set(caches) == {"big", "small"} and all(isinstance(c, TeacherCache) for c in caches.values())
    assert caches["big"].directory != caches["small"].directory  # one entry per teacher
    assert {m.source for m in teacher.info.members.values()} == {"trained"}
    module = DistillationModule(job.student, job.criterion, job.optimization[0], 10, teacher=teacher.net,
                                teacher_features=job.features[1], teacher_cache=teacher.cache)
    batch = next(iter(job.datamodule.train_dataloader()))
    read = {name: [] for name in caches}
    for name, cache in caches.items():  # every read goes to the member's own cache
        lookup = cache.lookup
        cache.lookup = lambda i, v, lookup=lookup, name=name: read[name].append(len(i)) or lookup(i, v)  # type: ignore[method-assign]
    for net in teacher.net.members.values():
        net.register_forward_hook(lambda *_: pytest.fail("a cached teacher ran"))
    out = module.teacher_outputs(batch, batch["input"])
    assert read == {"big": [len(batch["target"])], "small": [len(batch["target"])]}
    stored = {name: cache.lookup(batch["index"], batch["view"]).logits for name, cache in caches.items()}
    by_hand = (torch.softmax(stored["big"] / 4, 1) + torch.softmax(stored["small"] / 4, 1)) / 2
    torch.testing.assert_close(torch.softmax(out.logits / 4, 1), by_hand)
    torch.testing.assert_close(out.members["small"].logits, stored["small"])
    with torch.no_grad():  # the stored outputs are the teachers' own (float16 storage)
        for name, net in teacher.net.members.items():
            net._forward_hooks.clear()
            torch.testing.assert_close(stored[name], net(batch["input"]), atol=2e-2, rtol=2e-3)
    # the features a feature method reads come from one named teacher (the first by default)
    assert teacher.net.features_from == "big"


def test_an_ensemble_run_records_every_teacher_and_the_ensemble(make_cfg, tmp_path: Path) -> None:
    member = tmp_path / "small.pt"
    from kd.models import ConvNet

    torch.save(ConvNet(in_channels=1, num_classes=10, channels=[8, 16], depth=1, hidden=0, dropout=0.0).state_dict(), member)
    results = run(make_cfg(*TWO, f"+teacher.ckpts.small={member}", "+teacher.ensemble.combine=logits",
                           "trainer.max_epochs=2", "trainer.limit_train_batches=4", "teacher.recipe.max_epochs=2"))
    assert results["student"]["epochs"] == 2
    teacher = json.loads((tmp_path / "run" / "results.json").read_text())["teacher"]
    assert teacher == json.loads(json.dumps(results["teacher"]))
    assert teacher["source"] == "ensemble" and set(teacher["members"]) == {"big", "small"}
    assert teacher["members"]["small"]["source"] == "checkpoint" and teacher["members"]["small"]["path"] == str(member)
    assert teacher["members"]["big"]["source"] == "trained"
    assert teacher["params"] == sum(m["params"] for m in teacher["members"].values())
    assert {"val/acc", "test/acc"} <= set(teacher["metrics"])
    # checkpoints hold the student and the method, never a teacher
    state = torch.load(results["student"]["checkpoint"], weights_only=True)["state_dict"]
    assert not [k for k in state if k.startswith("teacher")]


@pytest.mark.parametrize(("overrides", "key"), [
    (("teacher.ckpt=/x.pt",), "teacher.ckpt"),
    (("+teacher.ckpts.tiny=/x.pt",), "teacher.ckpts.tiny"),
    (("+teacher.ensemble.features_from=mid",), "teacher.ensemble.features_from"),
    (("+teacher.ensemble.combine=max",), "teacher.ensemble.combine"),
    (("+teacher.ensemble.temperature=0",), "teacher.ensemble.temperature"),
])
def test_bad_ensemble_settings_fail_before_anything_trains(make_cfg, overrides: tuple[str, ...], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        prepare(make_cfg(*TWO, *overrides))
    assert e.value.key == key
    with pytest.raises(ConfigError, match="at least two teachers"):
        prepare(make_cfg(TWO[0]))
