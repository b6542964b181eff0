"""One line for what Hydra refuses while composing a config, with the valid choices.

Hydra stops on an unknown config key (``distill.temprature=3``), an unknown group option
(``distill=kdd``) or an override it cannot parse, and prints several lines that end in "Set the
environment variable HYDRA_FULL_ERROR=1". ``run_app`` runs a Hydra entry point with those
errors raised instead, and reports each as kd reports every bad input: one line naming the key,
the closest valid choices and all of them, exit status 2.
"""

from __future__ import annotations

import difflib
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from kd.errors import ConfigError, Diverged

SHOWN = 30  # choices listed at most


def _choices(name: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    listed = ", ".join(options[:SHOWN]) + (f", ... ({len(options)} in all)" if len(options) > SHOWN else "")
    return f"{hint}valid: {listed}"


def composition_error(e: BaseException) -> ConfigError | None:
    """A Hydra composition or override error as a one-line ConfigError, or None for another error.

    kd-train (``run_app``) and kd-eval (``kd.cli.eval.compose_eval``) both report through it.
    """
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    if isinstance(e, MissingConfigException) and e.missing_cfg_file and e.options is not None:
        group, _, option = str(e.missing_cfg_file).rpartition("/")
        if group:
            return ConfigError(f"{group}={option}", f"no such option in conf/{group}/; {_choices(option, sorted(e.options))}")
    if isinstance(e, OverrideParseException):
        return ConfigError("cannot parse an override", f"{str(e).strip().splitlines()[0]} (override syntax: key=value, "
                           "group=option, +new.key=value)")
    if isinstance(e, ConfigCompositionException):
        cause = e.__cause__
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and getattr(cause, "full_key", None):
            full_key, key = str(cause.full_key), str(cause.key)
            parent = full_key[: -len(key) - 1] if full_key.endswith("." + key) else ""
            node = getattr(cause, "parent_node", None)
            keys = [str(k) for k in node.keys()] if node is not None and hasattr(node, "keys") else []
            where = f"in {parent}" if parent else "at the top level"
            target = node.get("_target_") if keys and "_target_" in keys else None
            where += f" ({str(target).rsplit('.', 1)[-1]})" if target else ""
            return ConfigError(full_key, f"no such key {where}; {_choices(key, keys)} "
                               f"(a key the config lacks is added with +{full_key}=...)")
        lines = str(e).strip().splitlines()
        return ConfigError("config", lines[0] if lines else type(e).__name__)
    return None


def run_app(main: Callable[[], Any], prog: str) -> None:
    """Runs a ``@hydra.main`` function, turning composition errors into one line and exit status 2.

    A sweep whose jobs failed with kd's own errors (printed as one line each as they failed) ends
    with one more line, not Hydra's traceback. Any other error a run raised is printed with its
    whole traceback, exit status 1, as Hydra does with ``HYDRA_FULL_ERROR=1``.
    """
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors rather than printing them
    try:
        main()
    except (ConfigError, Diverged) as e:  # a sweep's job: its line is printed; Hydra raises the first again
        print(f"{prog}: a job of the sweep failed ({type(e).__name__}, above); the others ran. `kd-table <sweep dir>` "
              "lists every job, the failed ones too", file=sys.stderr, flush=True)
        sys.exit(2 if isinstance(e, ConfigError) else 1)
    except Exception as e:  # noqa: BLE001
        message = composition_error(e)
        if message is None:
            traceback.print_exc()
            sys.exit(1)
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)
