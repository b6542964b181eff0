"""The errors kd raises for bad input (``ConfigError``), a run that diverged (``Diverged``) and a run
stopped by SIGTERM (``Terminated``)."""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterable
from typing import Any


class ConfigError(ValueError):
    """A configuration value or input file that kd cannot use.

    Raised where the value enters (a constructor, a loader), before any training starts. The
    command line prints it as one line, ``kd-train: error: <key>: <message>``, and exits with
    status 2.

    Args:
        key: The config key at fault (``distill.temperature``, ``teacher.ckpt``), or the name of
            the argument when the caller does not know the full key.
        message: What is wrong and how to fix it.
    """

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")

    def with_prefix(self, prefix: str) -> ConfigError:
        """The same error with its key placed under a config node (``temperature`` -> ``distill.temperature``)."""
        if not prefix or self.key.startswith(prefix + ".") or self.key == prefix:
            return self
        return ConfigError(f"{prefix}.{self.key}", self.message)


def closest_names(name: str, names: Iterable[str], n: int = 3) -> list[str]:
    """The ``n`` names nearest ``name``: those it begins or is part of (``_``/``-`` and case aside,
    shortest first), then difflib's closest. For "did you mean" in messages."""
    names = list(dict.fromkeys(names))

    def plain(s: str) -> str:
        return s.lower().replace("_", "").replace("-", "")

    want = plain(name)
    part = sorted((m for m in names if want and want in plain(m)), key=lambda m: (not plain(m).startswith(want), len(m), m))
    return list(dict.fromkeys([*part, *difflib.get_close_matches(name, names, n=n)]))[:n]


def check_int(
    name: str, value: Any, low: int | None = None, high: int | None = None, valid: str = ""
) -> int:
    """Checks ``value`` is an integer (not a bool) in ``[low, high)``.

    Args:
        name: The argument or config key, for the message.
        value: The value to check.
        low: Smallest allowed value, or None.
        high: First disallowed value above, or None.
        valid: How the message describes the allowed range (``">= 0"``).

    Raises:
        ConfigError: ``<name>: must be an integer <valid>, got <value>``.
    """
    ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok or (low is not None and value < low) or (high is not None and value >= high):
        raise ConfigError(name, f"must be an integer{' ' + valid if valid else ''}, got {value!r}")
    return value


def instantiate_checked(node: Any, key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` whose failures become one-line ConfigErrors naming ``key``.

    A ConfigError raised by the constructor keeps its message, its key placed under ``key``
    (``temperature`` -> ``distill.temperature``); any other failure is reported with the target
    and the original error.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf.errors import InterpolationResolutionError

    try:
        return instantiate(node, **kwargs)
    except InterpolationResolutionError as e:
        message = str(e).splitlines()[0]
        if "_nodes_" in message:
            message += (
                ": the model config defines no such feature tap (_nodes_); name the features "
                "instead, e.g. distill.student_nodes=[layer2] (kd-nodes lists the names)"
            )
        raise ConfigError(key, message) from None
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, ConfigError):
            # Hydra names the nested node that failed: `full_key: distill.methods.kd`
            where = [line[len("full_key: "):] for line in str(e).splitlines() if line.startswith("full_key: ")]
            raise cause.with_prefix(where[0] if where and where[0].startswith(key) else key) from None
        target = node.get("_target_", "?") if hasattr(node, "get") else "?"
        if isinstance(cause, ImportError):  # Hydra's message spans lines; the import's own error says it
            root = cause.__cause__ or cause.__context__
            detail = f"cannot import it ({root or cause}); is the _target_ spelled right and its module on the Python path (PYTHONPATH)?"
            detail = " ".join(detail.split())
        else:
            detail = " ".join(f"{type(cause).__name__}: {cause}".split()) if cause else str(e).splitlines()[0]
        raise ConfigError(key, f"cannot build {target}: {detail}") from e


class Diverged(RuntimeError):
    """A loss term became NaN or Inf: training stops, and nothing from that step on is saved.

    Args:
        term: The loss term (``train/loss_kd``).
        value: Its value (``nan``, ``inf``, ``-inf``).
        step: The optimizer step it was computed for (0-based: steps done before it).
        epoch: The epoch (0-based).
        batch: The batch of the epoch (0-based).
    """

    def __init__(self, term: str, value: float, step: int, epoch: int, batch: int) -> None:
        self.term, self.value, self.step, self.epoch, self.batch = term, float(value), int(step), int(epoch), int(batch)
        super().__init__(
            f"{term} is {self.value} at step {self.step} (epoch {self.epoch}, batch {self.batch}); training stopped "
            "and no checkpoint holds weights from that step on. Lower the learning rate or the loss weights, or clip "
            "gradients (trainer.gradient_clip_val)"
        )

    def as_dict(self) -> dict[str, Any]:
        return {"term": self.term, "value": str(self.value), "step": self.step, "epoch": self.epoch, "batch": self.batch}


class Terminated(SystemExit):
    """The run received SIGTERM (``kill``, ``timeout``, a scheduler's cancel): it stopped, resumable.

    A ``SystemExit`` with status 143 (128 + SIGTERM), so a sweep stops as its process was told to,
    and a scheduler or ``timeout`` sees a failure, not a success.

    Args:
        message: What was stopped and how to continue it.
    """

    def __init__(self, message: str) -> None:
        super().__init__(143)
        self.message = message

    def __str__(self) -> str:
        return self.message


def check_writable_dir(path: Any, key: str, keep: bool = True) -> None:
    """Creates directory ``path`` if needed and checks that a file can be written in it.

    Args:
        path: The directory.
        key: The config key that names it, for the message.
        keep: False: the directories this check created are removed again (the caller may still stop).

    Raises:
        ConfigError: One line naming the path and why it cannot be used (a file, no permission).
    """
    import tempfile
    from pathlib import Path

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(key, f"{path} is a file, not a directory; give a directory")
    created = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".kd-write-check-"):
            pass
    except OSError as e:
        raise ConfigError(key, f"cannot write in {path} ({e.strerror or e}); give a directory you can write to") from e
    finally:
        if not keep:
            for p in created:  # innermost first
                with contextlib.suppress(OSError):
                    p.rmdir()


class NoSpace(ConfigError):
    """A file kd writes does not fit on its disk: nothing was written (the previous file stays whole).

    Args:
        path: The file.
        needed: Its size in bytes.
        free: The bytes free on its disk.
    """

    def __init__(self, path: Any, needed: int, free: int) -> None:
        self.path, self.needed, self.free = path, int(needed), int(free)
        super().__init__("disk", f"no space left for {path}: it needs {_size(needed)}, {_size(free)} is free there; "
                         "free some space, or write elsewhere (paths.root: KD_OUTPUT_ROOT; teacher.store_dir)")


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


class UnreadableFile(ConfigError):
    """A data file that cannot be read, found when it is first read (a DataLoader worker included).

    Built from one string, ``"<key>: <message>"``, as a DataLoader re-raises a worker's error in
    the main process: then the string is the worker's traceback, whose last line is this error's.

    Args:
        text: ``"<key>: <message>"``, or a worker's traceback ending with that.
    """

    def __init__(self, text: str) -> None:
        last = text.strip().splitlines()[-1] if text.strip() else text
        if "Traceback" in text:  # "kd.errors.UnreadableFile: data.root: ..."
            last = last.split(": ", 1)[-1]
        key, _, message = last.partition(": ")
        super().__init__(key, message)
