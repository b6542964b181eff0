"""kd's commands: argument parsing, Hydra entry points and callbacks, one-line error printing.

Nothing in the library imports this package (``tests/test_architecture.py`` checks it): the
commands are a skin over ``kd.training``, ``kd.sweeps`` and ``kd.compress``.

- ``kd-train`` (``kd.cli.train``): one run or a sweep, from ``conf/train.yaml``.
- ``kd-eval`` (``kd.cli.eval``): the test accuracy of a deployable artifact.
- ``kd-nodes`` (``kd.cli.nodes``): the feature node names of a model.
- ``kd-table`` (``kd.cli.table``): the table of a sweep.
"""

from __future__ import annotations

from pathlib import Path


def config_dir() -> str:
    """``conf/`` of the source tree, or the copy packaged inside ``kd`` when installed as a wheel."""
    package = Path(__file__).resolve().parent.parent  # kd/
    for candidate in (package.parent / "conf", package / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"kd's conf/ directory is missing next to {package}")
