"""Logger factories and W&B run bookkeeping: offline unless a key and a server are there, never a hang.

``wandb_logger`` decides between online and offline before W&B starts (an API key, then a
server that answers within ``connect_timeout``) and says which and why. ``start_loggers`` names,
groups and tags a W&B run from the Hydra overrides and logs the resolved config with
``method``/``student``/``teacher_model``/``dataset`` beside it; ``finish_loggers`` puts
``results.json`` into the run summary (key ``results``, read by ``kd-table --wandb``), the
compression report as a table, and closes the run so that an offline directory is complete.
``CSVLogger`` is Lightning's, keeping one ``metrics.csv`` whole when the worker processes of
``ddp_spawn``/``ddp_fork`` write it in turn.
"""

from __future__ import annotations

import csv
import io
import logging
import netrc
import os
import re
import socket
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from kd.results import write_bytes_atomic

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.wandb.ai"
# overrides that say where a run writes, not what it is: left out of the run name
NAME_NOISE = ("hydra.", "paths.", "logger", "teacher.store_dir", "trainer.enable_progress_bar")
# tags and convenience config keys: (config key, Hydra group)
IDENTITY = (("method", "distill"), ("student", "model/student"), ("teacher_model", "model/teacher"), ("dataset", "data"))


class _CSVWriter(ExperimentWriter):
    """Lightning's CSV writer, taking the columns of ``metrics.csv`` from the file itself.

    Lightning's writer remembers the columns it wrote in memory and appends with those. Under
    ``ddp_spawn`` or ``ddp_fork`` every ``fit``/``validate``/``test`` runs in new processes, each
    with a copy of the logger of the main process, which never wrote: the writer of ``validate`` then
    knows only the ``val/`` columns and fails on the rows ``fit`` wrote (``dict contains fields
    not in fieldnames``). Reading the header first makes each process add to the file as one
    writer would. A resumed run's writer keeps the file (``CSVLogger.continue_at``).
    """

    def __init__(self, log_dir: str, continues: bool = False) -> None:
        self.continues = continues
        super().__init__(log_dir=log_dir)

    def save(self) -> None:
        if self.metrics and self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                on_disk = next(csv.reader(file), [])
            keys = sorted(set(self.metrics_keys).union(on_disk, *self.metrics))
            if keys != on_disk:
                self._rewrite_with_new_header(keys)
            self.metrics_keys = keys
        super().save()

    def _check_log_dir_exists(self) -> None:
        if not self.continues:  # Lightning's: a warning, and metrics.csv deleted
            super()._check_log_dir_exists()


class CSVLogger(LightningCSVLogger):
    """Lightning's ``CSVLogger`` that keeps one ``metrics.csv`` whole across processes (``ddp_spawn``)
    and, in a resumed run, the rows of the steps before the resume (``continue_at``).

    See ``_CSVWriter``. Same arguments as ``lightning.pytorch.loggers.CSVLogger``.
    """

    continues = False

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:  # noqa: D102 - see CSVLogger.experiment
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _CSVWriter(log_dir=self.log_dir, continues=self.continues)
        return self._experiment

    def continue_at(self, step: int) -> None:
        """A resumed run continues ``metrics.csv``: the rows logged at steps up to ``step`` (the
        checkpoint's last trained batch) are kept, the later ones (trained again now) dropped.

        Called before the run logs; the file is rewritten atomically.
        """
        self.continues = True
        path = Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE
        if not path.is_file():
            return
        with path.open(newline="") as file:
            reader = csv.DictReader(file)
            header, rows = reader.fieldnames or [], [r for r in reader if _step_of(r) <= step]
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=header, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_bytes_atomic(path, out.getvalue().encode())


def _step_of(row: Mapping[str, str]) -> float:
    try:
        return float(row.get("step") or "inf")
    except ValueError:
        return float("inf")


def continue_history(loggers: Sequence[Logger], run_dir: Path, step: int) -> None:
    """A resumed run adds to the history of the run it continues instead of starting a new one.

    ``CSVLogger``: ``metrics.csv`` keeps the rows up to ``step`` (``CSVLogger.continue_at``). W&B:
    the run resumes by the id of the newest run in ``<save_dir>/wandb/`` (online or offline),
    unless ``logger.wandb.id`` is given.

    Args:
        loggers: The run's loggers, before anything is logged.
        run_dir: The run directory.
        step: The checkpoint's last trained batch (Lightning's ``_batches_that_stepped`` in it).
    """
    for logger in loggers:
        if isinstance(logger, CSVLogger):
            logger.continue_at(step)
        elif isinstance(logger, WandbLogger) and not logger._wandb_init.get("id"):
            found = wandb_run_id(Path(logger.save_dir or run_dir) / "wandb")
            if found is not None:
                log.info("resume: W&B run %s continues", found)
                logger._wandb_init.update(id=found, resume="allow")


WANDB_RUN_DIR = re.compile(r"(?:offline-)?run-(\d{8}_\d{6})-([a-z0-9]+)(?:-\d+)?")


def wandb_run_id(wandb_dir: Path) -> str | None:
    """The id of the newest W&B run in ``wandb_dir``, from its directory's name: ``run-<time>-<id>``
    or ``offline-run-<time>-<id>`` (W&B adds ``-<n>`` when the same id starts twice in a second)."""
    runs = [(m[1], m[2]) for p in wandb_dir.glob("*run-*") if p.is_dir() and (m := WANDB_RUN_DIR.fullmatch(p.name))]
    return max(runs)[1] if runs else None


def wandb_base_url() -> str:
    """The W&B server, as W&B itself reads it (``WANDB_BASE_URL``)."""
    return os.environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL).rstrip("/")


def wandb_api_key_present() -> bool:
    """Whether W&B would find credentials, without asking the server.

    Looks where ``wandb.init`` looks: ``WANDB_API_KEY`` or ``WANDB_IDENTITY_TOKEN_FILE``, then the
    ``.netrc`` entry that ``wandb login`` writes for the server's host.
    """
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        from wandb.sdk.lib.wbauth import read_netrc_auth  # wandb >= 0.22
    except ImportError:
        read_netrc_auth = None
    try:
        if read_netrc_auth is not None:
            return read_netrc_auth(host=wandb_base_url()) is not None
        path = Path(os.environ.get("NETRC", "~/.netrc")).expanduser()
        return path.exists() and netrc.netrc(path).authenticators(urlparse(wandb_base_url()).netloc) is not None
    except Exception:  # noqa: BLE001 - a malformed netrc is W&B's to report; here it means "no key"
        return False


def wandb_reachable(timeout: float) -> bool:
    """Whether a TCP connection to the W&B server (``WANDB_BASE_URL``) opens within ``timeout`` s.

    The name lookup runs in a thread too: without network it can block far longer than any
    socket timeout.
    """
    url = urlparse(wandb_base_url())
    port = url.port or (443 if url.scheme == "https" else 80)
    answer: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection((url.hostname or "api.wandb.ai", port), timeout=timeout):
                answer.append(True)
        except OSError:
            answer.append(False)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])


def wandb_offline(offline: bool | None, connect_timeout: float, save_dir: str) -> bool:
    """Whether a W&B run logs offline, with one log line saying why when it was not asked.

    Args:
        offline: True forces offline; False asks online; None: online when there is a key.
        connect_timeout: Seconds to wait for the server before going offline.
        save_dir: Where offline runs go (for the message).
    """
    where = f"logging offline to {save_dir}/wandb (upload later with `wandb sync {save_dir}/wandb/offline-run-*`)"
    mode = os.environ.get("WANDB_MODE", "")
    if offline or mode in ("offline", "dryrun", "disabled"):
        if not offline:
            log.info("WANDB_MODE=%s: %s", mode, where)
        return True
    if offline is None and not wandb_api_key_present():
        log.info("no W&B API key (WANDB_API_KEY or `wandb login`): %s", where)
        return True
    if not wandb_reachable(connect_timeout):
        log.warning("W&B server %s unreachable within %.0f s: %s", wandb_base_url(), connect_timeout, where)
        return True
    return False


class KDWandbLogger(WandbLogger):
    """Lightning's ``WandbLogger``, except that an offline run leaves ``WANDB_MODE`` as it found it.

    Lightning sets ``WANDB_MODE=dryrun`` for the whole process, which would turn every later run
    of a sweep in the same process offline too. It also passes ``anonymous=None``, which W&B
    warns about; that is left out.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)

    @property
    def experiment(self) -> Any:  # noqa: D102 - see WandbLogger.experiment
        before = os.environ.get("WANDB_MODE")
        try:
            return super().experiment
        finally:
            if before is None:
                os.environ.pop("WANDB_MODE", None)
            else:
                os.environ["WANDB_MODE"] = before


def wandb_logger(
    project: str = "kd",
    save_dir: str = ".",
    offline: bool | None = None,
    name: str | None = None,
    group: str | None = None,
    tags: Sequence[str] = (),
    log_model: bool | str = False,
    connect_timeout: float = 5.0,
    **kwargs: Any,
) -> WandbLogger:
    """A Lightning ``WandbLogger`` that goes online only when it can, and never hangs a run.

    W&B's own online init waits about two minutes for an unreachable server. Here the mode is
    decided first (``wandb_offline``): online needs an API key (unless ``offline=False``) and a
    server that answers within ``connect_timeout`` seconds; otherwise the run logs offline to
    ``<save_dir>/wandb/offline-run-*``, to upload later with ``wandb sync``.

    Args:
        project: W&B project.
        save_dir: Directory of the local W&B files (the run directory).
        offline: True: offline; False: online (offline when the server is unreachable);
            None: online when an API key is found and the server answers.
        name: Run name; None: built from the overrides by ``start_loggers``.
        group: Run group; None: the sweep or the experiment.
        tags: Run tags; empty: method, student, teacher and dataset.
        log_model: Upload checkpoints as artifacts (``True``: the best at the end; ``"all"``:
            every one). Online only: an offline run warns and skips them.
        connect_timeout: Seconds to wait for the W&B server before going offline.
        **kwargs: Passed on to ``wandb.init``.
    """
    offline = wandb_offline(offline, connect_timeout, save_dir)
    if offline and log_model:
        log.warning("W&B artifacts need an online run: checkpoints are not uploaded (log_model=%s ignored)", log_model)
        log_model = False
    return KDWandbLogger(
        project=project, save_dir=save_dir, offline=offline, name=name, group=group,
        tags=list(tags), log_model=log_model, **kwargs,
    )


def _choice(resolved: Mapping[str, Any], choices: Mapping[str, Any], overrides: Sequence[str], group: str) -> str | None:
    """The option of a config group: Hydra's choice, else the override, else the class of ``_target_``."""
    if choices.get(group):
        return str(choices[group])
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key == group and value:
            return value
    node: Any = resolved
    for part in group.split("/"):
        node = node.get(part) if isinstance(node, Mapping) else None
    target = node.get("_target_") if isinstance(node, Mapping) else None
    return str(target).rsplit(".", 1)[-1] if target else None


def run_identity(
    resolved: Mapping[str, Any], overrides: Sequence[str] = (), choices: Mapping[str, Any] | None = None,
    sweep: str | None = None,
) -> dict[str, Any]:
    """A run's W&B name, group, tags and convenience config keys, from its config and overrides.

    Args:
        resolved: The resolved config.
        overrides: The command-line overrides (``kd.results.task_overrides()``).
        choices: Hydra's chosen option per config group (``hydra.runtime.choices``), if any.
        sweep: The sweep this run belongs to (a multirun), if any.

    Returns:
        ``name`` (the overrides that say what the run is, e.g. ``distill=kd,seed=0``; else method
        and student), ``group`` (the sweep, else the experiment, else None), ``tags`` and
        ``keys`` (method, student, teacher_model, dataset, seed).

    Example:
        >>> run_identity({"seed": 0}, ["distill=kd", "paths.root=/tmp", "seed=1"])["name"]
        'distill=kd,seed=1'
    """
    choices = choices or {}
    keys = {key: _choice(resolved, choices, overrides, group) for key, group in IDENTITY}
    keys["seed"] = resolved.get("seed")
    kept = [o.lstrip("+~") for o in overrides if not o.lstrip("+~").startswith(NAME_NOISE)]
    name = ",".join(kept) or "-".join(str(keys[k]) for k in ("method", "student") if keys[k]) or None
    experiment = _choice({}, choices, overrides, "experiment")
    tags = [f"{key.removesuffix('_model')}:{value}" for key, value in keys.items() if key != "seed" and value]
    return {"name": name[:128] if name else None, "group": sweep or experiment, "tags": tags, "keys": keys}


def hydra_context() -> dict[str, Any]:
    """The overrides, group choices and sweep of the running Hydra job (empty outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:
        return {}
    sweep = None
    if hydra_cfg.mode == RunMode.MULTIRUN:
        path = Path(str(hydra_cfg.sweep.dir))
        sweep = f"{path.parent.name}/{path.name}" if path.parent.name else path.name
    return {"overrides": list(hydra_cfg.overrides.task), "choices": dict(hydra_cfg.runtime.choices), "sweep": sweep}


def flat_enough(value: Any) -> Any:
    """A config W&B can group and filter by at every key: nested dicts stay (shown dotted),
    lists of dicts become dicts keyed by position, other lists stay lists."""
    if isinstance(value, Mapping):
        return {str(k): flat_enough(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if any(isinstance(v, (Mapping, list, tuple)) for v in value):
            return {str(i): flat_enough(v) for i, v in enumerate(value)}
        return list(value)
    return value


def start_loggers(loggers: Sequence[Logger], resolved: dict[str, Any], overrides: Sequence[str] = ()) -> None:
    """Logs the resolved config to every logger; names, groups and tags a W&B run first.

    A W&B logger's own ``name``/``group``/``tags`` (``logger.wandb.name=...``) win over the ones
    made here. Called before training, when no W&B run exists yet.

    Args:
        loggers: The run's loggers.
        resolved: The resolved config.
        overrides: The command-line overrides, used outside Hydra (inside, Hydra's are read).
    """
    context = hydra_context()
    identity = run_identity(resolved, context.get("overrides", overrides), context.get("choices"), context.get("sweep"))
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            init = logger._wandb_init  # read by wandb.init on the first use of logger.experiment
            for key in ("name", "group", "tags"):
                if not init.get(key):
                    init[key] = identity[key]
            logger._name = init["name"]
            logger.log_hyperparams({**flat_enough(resolved), **identity["keys"]})
        else:
            logger.log_hyperparams(resolved)


def report_table(rows: Sequence[Mapping[str, Any]]) -> Any:
    """The compression report's rows as a ``wandb.Table``, nested cells (latency) as ``latency_ms/b1``."""
    import wandb

    flat_rows = []
    for row in rows:
        flat: dict[str, Any] = {}
        for key, value in row.items():
            if isinstance(value, Mapping):
                flat.update({f"{key}/{k}": v for k, v in value.items()})
            else:
                flat[key] = value
        flat_rows.append(flat)
    columns = list(dict.fromkeys(key for row in flat_rows for key in row))
    return wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in flat_rows])


@rank_zero_only
def finish_loggers(loggers: Sequence[Logger], results: Mapping[str, Any]) -> None:
    """Puts the final ``results.json`` into each W&B run's summary, then finishes the run.

    The summary holds the whole results under ``results`` (a contract: ``kd-table --wandb``
    reads ``run.summary["results"]``), the headline accuracies ``test/acc`` (the selected
    weights), ``final/test/acc`` and ``teacher/test/acc`` (and those of the other networks,
    ``role_headlines``), and the compression report as the table ``compression_report`` when
    there is one.
    """
    for logger in loggers:
        if not isinstance(logger, WandbLogger) or logger._experiment is None:
            continue
        run = logger.experiment
        student = results.get("student") or {}
        headline = {
            "test/acc": (student.get("metrics") or {}).get("test/acc"),
            "final/test/acc": (student.get("final_metrics") or {}).get("test/acc"),
            "teacher/test/acc": ((results.get("teacher") or {}).get("metrics") or {}).get("test/acc"),
        }
        headline.update(role_headlines(results))
        rows = (results.get("report") or {}).get("rows")
        if rows:
            run.log({"compression_report": report_table(rows)})
        run.summary.update({"results": dict(results), **{k: v for k, v in headline.items() if v is not None}})
        run.finish()


def role_headlines(results: Mapping[str, Any]) -> dict[str, float]:
    """The test accuracy of every other network of the run, for a W&B summary: ``teacher/<name>/test/acc``
    (an ensemble's members), ``peer/<name>/test/acc``, ``ensemble/test/acc``, ``link/<name>/test/acc``
    (a chain's earlier links) and ``generations/test/acc``."""
    chain = results.get("chain") or {}
    found = {
        **{f"teacher/{n}/test/acc": m.get("metrics", {}).get("test/acc")
           for n, m in ((results.get("teacher") or {}).get("members") or {}).items()},
        **{f"peer/{n}/test/acc": p.get("metrics", {}).get("test/acc") for n, p in (results.get("peers") or {}).items()},
        "ensemble/test/acc": ((results.get("ensemble") or {}).get("metrics") or {}).get("test/acc"),
        **{f"link/{link['name']}/test/acc": link["student"]["metrics"].get("test/acc") for link in chain.get("links", [])},
        "generations/test/acc": (chain.get("ensemble") or {}).get("test/acc"),
    }
    return {k: v for k, v in found.items() if v is not None}


def abort_wandb_run() -> None:
    """Finishes a W&B run left open by a job that raised, marked failed (exit code 1).

    Otherwise the next job of a sweep in the same process would log into it: Lightning's
    ``WandbLogger`` reuses a run that is still in progress.
    """
    import sys

    wandb = sys.modules.get("wandb")  # never imported: no run to close
    if wandb is not None and wandb.run is not None:
        wandb.run.finish(exit_code=1)
