"""``kd-train``: the Hydra command line of kd. ``python -m kd.train`` is the same.

Examples:
    kd-train                                       # the default experiment (digits, Hinton KD)
    kd-train distill=kd distill.temperature=8 distill.weight=0.5 distill.ce_weight=0.5 trainer.max_epochs=5
    kd-train -m distill=none,kd seed=0,1           # a sweep
    kd-train --help                                # the config groups and their options
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from kd.errors import ConfigError
from kd.run import run


def config_dir() -> str:
    """``conf/`` of the source tree, or the copy packaged inside ``kd`` when installed as a wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "conf", here / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"kd's conf/ directory is missing next to {here}")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Runs ``run(cfg)``; a ConfigError becomes one line on stderr and exit status 2."""
    try:
        results = run(cfg)
    except ConfigError as e:
        print(f"kd-train: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    return results["student"]["metrics"].get("val/acc")


if __name__ == "__main__":
    main()
