"""The divergence guard reads a device-side record every few steps, before checkpoints and at the end."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch

from kd.errors import ConfigError, Diverged
from kd.training.finite import FiniteWatch
from kd.training.run import run

NAN, INF = float("nan"), float("inf")


def _step(watch: FiniteWatch, step: int, kd: float, ce: float = 1.0, reduce=None) -> None:
    terms = {"kd": torch.tensor(kd), "ce": torch.tensor(ce)}
    watch.note(terms, terms["kd"] + terms["ce"], (step, 0, step), reduce)


def test_the_first_non_finite_term_is_named_with_its_step_when_the_record_is_read() -> None:
    watch = FiniteWatch(every=16)
    for step in range(3):
        _step(watch, step, 0.5)
    _step(watch, 3, 0.5, ce=INF)  # the first: ce is inf
    _step(watch, 4, NAN)  # later ones do not replace it
    _step(watch, 5, 0.5)  # nothing read yet: the step went on
    with pytest.raises(Diverged) as err:
        watch.check()
    e = err.value
    assert (e.term, e.value, e.step, e.epoch, e.batch) == ("train/loss_ce", INF, 3, 0, 3)
    watch.check()  # raised once: the record is gone


def test_the_record_is_read_every_n_steps_and_forgotten_when_finite() -> None:
    watch = FiniteWatch(every=4)
    for step in range(8):  # two reads, both finite
        _step(watch, step, 0.1)
    assert watch.where == [] and int(watch.count) == 0
    _step(watch, 8, 0.1)
    _step(watch, 9, NAN)
    _step(watch, 10, 0.1)
    with pytest.raises(Diverged, match=r"^train/loss_kd is nan at step 9 \(epoch 0, batch 9\)"):
        _step(watch, 11, 0.1)  # the fourth step since the last read reads it


def test_only_the_sum_non_finite_names_the_sum() -> None:
    watch = FiniteWatch(every=1)
    with pytest.raises(Diverged) as err:
        _step(watch, 0, 3e38, ce=3e38)  # float32 overflow of finite terms
    assert (err.value.term, err.value.value) == ("train/loss", INF)


def test_a_new_set_of_terms_reads_the_old_record_first() -> None:
    watch = FiniteWatch(every=16)
    _step(watch, 0, NAN)
    with pytest.raises(Diverged, match="^train/loss_kd is nan at step 0"):
        watch.note({"crd": torch.tensor(1.0)}, torch.tensor(1.0), (1, 0, 1))


def test_a_rank_whose_own_terms_are_finite_stops_with_the_others() -> None:
    watch = FiniteWatch(every=2)
    _step(watch, 0, 0.1, reduce=lambda t: t + 1)  # another rank reports one diverged rank
    with pytest.raises(Diverged, match="^a loss term on another rank is nan at step 1"):
        _step(watch, 1, 0.1, reduce=lambda t: t + 1)


@pytest.mark.parametrize("every", [0, -1, 1.5, True])
def test_a_read_interval_below_one_is_refused(every) -> None:
    with pytest.raises(ConfigError, match=r"^speed.finite_check_every: must be an integer >= 1"):
        FiniteWatch(every)


class FailAfter(L.Callback):
    """Raises in the step after ``step``, as an op that fails on NaN weights (an SVD) would."""

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if trainer.global_step == self.step + 1:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")


def test_a_step_that_fails_on_the_nan_weights_reports_the_divergence(make_cfg, tmp_path: Path, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "kd_test_finite", sys.modules[__name__])
    cfg = make_cfg("trainer.limit_train_batches=6", "+callbacks.nan._target_=tests.faults.NaNAt", "+callbacks.nan.step=2",
                   "+callbacks.nan.term=kd", "+callbacks.fail._target_=kd_test_finite.FailAfter", "+callbacks.fail.step=2")
    with pytest.raises(Diverged) as err:
        run(cfg)
    assert (err.value.term, err.value.step) == ("train/loss_kd", 2)
    assert isinstance(err.value.__context__, torch.linalg.LinAlgError)
    results = (tmp_path / "run" / "results.json").read_text()
    assert '"status": "failed"' in results and '"step": 2' in results
    assert math.isnan(err.value.value)
