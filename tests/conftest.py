"""Shared fixtures: the real configs, composed and shrunk, each test in its own tmp_path."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from kd.cli import config_dir

CONF = Path(config_dir())
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")


def compose_cfg(overrides: list[str], tmp_path: Path) -> DictConfig:
    """Composes conf/train.yaml with ``overrides``, writing only under ``tmp_path``."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.root = str(tmp_path / "outputs")
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.trainer.enable_progress_bar = False
    return cfg


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """``make_cfg(*overrides)``: the real config with ``debug=fdr`` unless ``fast=False``."""

    def make(*overrides: str, fast: bool = True, run_dir: str = "run") -> DictConfig:
        cfg = compose_cfg([*(["debug=fdr"] if fast else []), *overrides], tmp_path)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / run_dir)
        return cfg

    return make


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., int]]:
    """``cli(*args)``: runs ``kd-train`` in this process, writing under tmp_path; its exit code."""
    monkeypatch.setenv("KD_OUTPUT_ROOT", str(tmp_path / "outputs"))
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # kd-train sets it; restored after the test
    monkeypatch.setenv("KD_VERBOSE", "0")  # kd-train -v sets it; restored after the test

    def call(*args: str) -> int:
        from kd.cli.train import cli

        monkeypatch.setattr(sys, "argv", ["kd-train", *args])
        try:
            cli()
        except SystemExit as e:
            return int(e.code or 0)
        return 0

    yield call
