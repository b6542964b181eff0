"""SLURM through hydra-submitit-launcher: conf/hydra/launcher/slurm*.yaml, kd/cli/slurm.py, and what sbatch receives.

No cluster here: ``sbatch``, ``srun`` and ``sacct`` are small stand-ins written by the ``fake_slurm``
fixture. ``sbatch`` keeps the script submitit writes and, when asked, runs it at once as a
one-node job on this machine, ``srun`` starting one process per task with the SLURM variables
a real one sets.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from omegaconf import DictConfig

from kd.cli.slurm import check_slurm_launch, device_count
from kd.cli.train import check_launch
from kd.errors import ConfigError
from tests.conftest import CONF

SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
JOB_ID = "4242"

FAKE_SBATCH = r"""#!/bin/bash
# sbatch stand-in: keeps the script; with FAKE_SLURM_RUN=1 runs it in the background as a one-node job
# with the variables SLURM sets (srun adds each task's own), then prints what sbatch prints.
cp "$1" "$FAKE_SLURM/job.sh"
flag() { sed -n "s/^#SBATCH --$1=//p" "$FAKE_SLURM/job.sh"; }
if [[ $FAKE_SLURM_RUN == 1 ]]; then
  [[ $(flag nodes) == 1 ]] || { echo "sbatch stand-in: one node only" >&2; exit 1; }
  (
    export SLURM_JOB_ID=4242 SLURM_JOB_NAME="$(flag job-name)" SLURM_NNODES=1 SLURM_JOB_NUM_NODES=1 \
      SLURM_NTASKS_PER_NODE="$(flag ntasks-per-node)" SLURM_NTASKS="$(flag ntasks-per-node)" SLURM_NODEID=0 \
      SLURM_NODELIST=localhost SLURM_JOB_NODELIST=localhost
    bash "$FAKE_SLURM/job.sh"
    touch "$FAKE_SLURM/done"
  ) >"$FAKE_SLURM/job.log" 2>&1 &
fi
echo "Submitted batch job 4242"
"""

FAKE_SRUN = r"""#!/bin/bash
# srun stand-in: starts the command once per task of the node, each with its rank and its own
# output where --output/--error say (%j: job id, %t: task).
out=/dev/null; err=/dev/null
while [[ $1 == --* ]]; do
  case $1 in
    --output) out=$2; shift 2;;
    --error) err=$2; shift 2;;
    *) shift;;
  esac
done
expand() { local p=${1//%j/$SLURM_JOB_ID}; echo "${p//%t/$2}"; }
for ((t = 0; t < SLURM_NTASKS; t++)); do
  SLURM_PROCID=$t SLURM_LOCALID=$t "$@" >"$(expand "$out" $t)" 2>"$(expand "$err" $t)" &
done
status=0
for job in $(jobs -p); do wait "$job" || status=$?; done
exit $status
"""

FAKE_SACCT = r"""#!/bin/bash
# sacct stand-in: the job's state, for submitit's watcher.
echo "JobID|State|NodeList"
if [[ -e $FAKE_SLURM/done ]]; then echo "4242|COMPLETED|localhost"; else echo "4242|RUNNING|localhost"; fi
"""


@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory of stand-ins for sbatch, srun and sacct, first on PATH; sbatch copies its script there."""
    bin_dir = tmp_path / "slurm_bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("srun", FAKE_SRUN), ("sacct", FAKE_SACCT)):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(bin_dir))
    return bin_dir


def compose_hydra(*overrides: str) -> DictConfig:
    """conf/train.yaml composed with its ``hydra`` node, as a multirun would see it."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    cfg.hydra.mode = RunMode.MULTIRUN
    return cfg


def test_the_slurm_launcher_asks_for_the_trainers_nodes_and_devices() -> None:
    cfg = compose_hydra("hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2")
    launcher = cfg.hydra.launcher
    assert launcher._target_ == SLURM_LAUNCHER
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert launcher.partition is None
    assert launcher.submitit_folder == f"{cfg.hydra.sweep.dir}/.submitit/%j"
    check_slurm_launch(cfg)  # accepted


def test_slurm_cpu_asks_for_no_gpu_and_one_task_with_the_cpu_trainer() -> None:
    cfg = compose_hydra("hydra/launcher=slurm_cpu")
    launcher = cfg.hydra.launcher
    assert launcher._target_ == SLURM_LAUNCHER
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (1, 1, None)
    check_slurm_launch(cfg)
    ddp = compose_hydra("hydra/launcher=slurm_cpu", "trainer.devices=4", "+trainer.strategy=ddp", "+trainer.num_nodes=2")
    assert (ddp.hydra.launcher.nodes, ddp.hydra.launcher.tasks_per_node) == (2, 4)
    check_slurm_launch(ddp)


@pytest.mark.parametrize(("launcher", "refused"), [("slurm", False), ("basic", True)])
def test_check_launch_lets_plain_ddp_run_under_the_slurm_launcher(
    monkeypatch: pytest.MonkeyPatch, launcher: str, refused: bool
) -> None:
    cfg = compose_hydra(f"hydra/launcher={launcher}", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2")
    hydra_config = HydraConfig.instance()
    monkeypatch.setattr(hydra_config, "cfg", hydra_config.cfg)  # restored after the test
    hydra_config.set_config(cfg)
    if refused:  # Hydra's local launcher: every rank would re-run the sweep
        with pytest.raises(ConfigError, match="use trainer.strategy=ddp_spawn"):
            check_launch(cfg)
    else:  # srun starts each rank once; one job per DDP group
        check_launch(cfg)


@pytest.mark.parametrize(
    ("overrides", "key", "message"),
    [
        (["trainer=ddp"], "trainer.devices", "is -1, but a SLURM job needs the number of devices per node"),
        (["trainer=ddp", "trainer.devices=auto"], "trainer.devices", "is 'auto', but"),
        (["trainer=ddp", "trainer.devices=4", "hydra.launcher.tasks_per_node=0"],
         "hydra.launcher.tasks_per_node", "must be a positive integer, got 0"),
        (["trainer=ddp", "trainer.devices=4", "hydra.launcher.tasks_per_node=8"],
         "hydra.launcher.tasks_per_node", "is 8 but trainer.devices is 4"),
        (["trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2", "hydra.launcher.nodes=1"],
         "hydra.launcher.nodes", "is 1 but trainer.num_nodes is 2"),
        (["trainer=ddp", "trainer.devices=4", "trainer.strategy=ddp_spawn"],
         "trainer.strategy", "ddp_spawn starts its own processes"),
        (["hydra/launcher=slurm_cpu", "trainer=gpu"], "hydra.launcher.gpus_per_node", "allocates no GPU"),
    ],
    ids=["devices=-1", "devices=auto", "tasks=0", "tasks!=devices", "nodes!=num_nodes", "ddp_spawn", "cpu-gpu"],
)
def test_a_slurm_request_lightning_would_refuse_is_a_config_error(overrides: list[str], key: str, message: str) -> None:
    if not any(o.startswith("hydra/launcher=") for o in overrides):
        overrides = ["hydra/launcher=slurm", *overrides]
    with pytest.raises(ConfigError) as e:
        check_slurm_launch(compose_hydra(*overrides))
    assert e.value.key == key
    assert message in e.value.message
    assert "\n" not in str(e.value)


def test_other_launchers_are_not_checked() -> None:
    check_slurm_launch(compose_hydra("trainer=ddp"))  # devices -1 is fine for the local launcher


@pytest.mark.parametrize(
    ("devices", "count"),
    [(4, 4), ("4", 4), ([0, 1], 2), ("0,1", 2), (-1, None), ("auto", None), (0, None), (True, None)],
)
def test_device_count(devices: object, count: int | None) -> None:
    assert device_count(devices) == count


def test_the_sbatch_script_asks_for_one_ddp_group_per_job(cli, fake_slurm: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from submitit.slurm.slurm import SlurmJob

    # submitted, never run: a completed result stands in for each job's
    monkeypatch.setattr(SlurmJob, "results", lambda self: [JobReturn(status=JobStatus.COMPLETED)])
    sweep = tmp_path / "sweep"
    code = cli("-m", "hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
               "hydra.launcher.partition=gpu", "distill.temperature=1,2", f"hydra.sweep.dir={sweep}")
    assert code == 0
    script = (fake_slurm / "job.sh").read_text()
    flags = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", script, flags=re.MULTILINE))
    assert flags["nodes"] == "2"
    assert flags["ntasks-per-node"] == "4"  # one task per GPU, as Lightning's SLURMEnvironment needs
    assert flags["gpus-per-node"] == "4"
    assert flags["partition"] == "gpu" and flags["cpus-per-task"] == "8"
    assert flags["array"] == "0-1%2"  # the sweep's two runs, one array task each
    assert flags["job-name"] == "train"  # not bash/interactive, which would hide SLURM from Lightning
    assert flags["output"].startswith(f"{sweep}/.submitit/")
    command = script.strip().splitlines()[-1]
    assert command.startswith("srun --unbuffered --output ")  # srun starts the nodes x tasks ranks
    assert command.endswith(f"-u -m submitit.core._submit {sweep}/.submitit/%j")
    assert (sweep / ".submitit" / JOB_ID / f"{JOB_ID}_submission.sh").is_file()


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["-m", "seed=0,1", "trainer=ddp"], "kd-train: error: trainer.devices: is -1, but a SLURM job needs"),
        (["-m", "trainer=ddp", "trainer.devices=2,4"], "kd-train: error: trainer.devices: is swept (trainer.devices=2,4)"),
        (["trainer=ddp", "trainer.devices=4"], "kd-train: error: hydra/launcher: the SLURM launcher submits jobs only in a multirun"),
    ],
    ids=["devices=-1", "swept-devices", "no-multirun"],
)
def test_a_bad_slurm_launch_stops_before_sbatch(cli, capsys, fake_slurm: Path, tmp_path: Path,
                                                args: list[str], error: str) -> None:
    code = cli(*args, "hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path / 's'}", f"hydra.run.dir={tmp_path / 'r'}")
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(error) and "\n" not in err  # one line
    assert not (fake_slurm / "job.sh").exists()  # sbatch never ran
    assert not (tmp_path / "r").exists()  # nor did a run start here


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("launcher", "overrides", "tasks"),
    [
        ("slurm_cpu", [], 1),
        ("slurm_cpu", ["trainer.devices=2", "+trainer.strategy=ddp"], 2),
        pytest.param("slurm", ["trainer=gpu"], 1, marks=[
            pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]),
    ],
    ids=["one-process", "cpu-ddp-2-tasks", "one-gpu"],
)
def test_a_sweep_job_runs_as_a_slurm_job_and_writes_its_results(cli, fake_slurm: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch, launcher: str,
                                                                overrides: list[str], tasks: int) -> None:
    monkeypatch.setenv("FAKE_SLURM_RUN", "1")
    sweep = tmp_path / "sweep"
    code = cli("-m", f"hydra/launcher={launcher}", *overrides, "debug=fdr", "distill=none", "seed=3",
               f"hydra.sweep.dir={sweep}")
    log = fake_slurm / "job.log"
    assert code == 0, log.read_text() if log.exists() else "sbatch did not run the job"
    script = (fake_slurm / "job.sh").read_text()
    assert f"#SBATCH --ntasks-per-node={tasks}" in script and "#SBATCH --nodes=1" in script
    gpu = launcher == "slurm"
    assert ("#SBATCH --gpus-per-node=1" in script) if gpu else ("--gpus-per-node" not in script)
    results = json.loads((sweep / "0" / "results.json").read_text())
    assert results["seed"] == 3
    assert not (sweep / "0" / "failure.json").exists()
    # submitit ran the job in every task, and Lightning took the tasks for the ranks of a SLURM job
    task = sweep / ".submitit" / JOB_ID
    for t in range(tasks):
        out, err = (task / f"{JOB_ID}_{t}_log.out").read_text(), (task / f"{JOB_ID}_{t}_log.err").read_text()
        assert f"JobEnvironment(job_id={JOB_ID}, hostname" in out and f"global_rank={t}({tasks})" in out
        assert "Job completed successfully" in out
        # Lightning's SLURMEnvironment was detected (its lines go through Hydra's job logging, to stdout)
        assert "SLURM auto-requeueing enabled" in out + err
    first = (task / f"{JOB_ID}_0_log.out").read_text() + (task / f"{JOB_ID}_0_log.err").read_text()
    assert f"used: {gpu}" in first  # Lightning's "GPU available: ..., used: ..."
    if tasks > 1:
        second = (task / f"{JOB_ID}_1_log.out").read_text() + (task / f"{JOB_ID}_1_log.err").read_text()
        assert f"Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/{tasks}" in second
