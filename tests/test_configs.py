"""Every file under conf/ composes, resolves and builds; every method and experiment runs.

Adding a config file adds its test: the parameters are read from the conf/ tree.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kd.models.build import build_model, count_parameters
from kd.training.run import run
from tests.conftest import CONF
from tests.datagen import write_cifar, write_image_folder, write_mnist

# Groups whose options are objects kd builds, and groups of named objects.
OBJECT_GROUPS = {"data", "model/teacher", "model/student", "distill", "optimizer", "scheduler"}
NAMED_OBJECT_GROUPS = {"callbacks", "logger"}
GPU_TRAINERS = {"gpu", "ddp"}
# groups whose options are the rows of one experiment's sweep
EXPERIMENT_OF_GROUP = {"hinton_row": ["experiment=hinton_mnist"], "cifar_row": ["experiment=cifar100_resnet56_resnet20"],
                       "tfkd_row": ["experiment=cifar100_tfkd_resnet18"]}


def group_options() -> list[tuple[str, str]]:
    options = []
    for path in sorted(CONF.rglob("*.yaml")):
        group = path.parent.relative_to(CONF).as_posix()
        if group not in (".", "hydra"):
            options.append((group, path.stem))
    return options


def test_the_conf_tree_has_the_documented_groups() -> None:
    groups = {g for g, _ in group_options()}
    assert groups >= {"data", "model/teacher", "model/student", "distill", "trainer", "logger",
                      "callbacks", "experiment", "paths", "debug"}
    assert {"cpu", "gpu", "ddp"} <= {o for g, o in group_options() if g == "trainer"}
    assert {"csv", "wandb", "tensorboard"} <= {o for g, o in group_options() if g == "logger"}
    assert (CONF / "hydra" / "default.yaml").is_file()


@pytest.mark.parametrize(("group", "option"), group_options(), ids=lambda v: str(v))
def test_every_config_file_composes_and_builds(make_cfg, group: str, option: str) -> None:
    cfg = make_cfg(*EXPERIMENT_OF_GROUP.get(group, []), f"{group}={option}", fast=False)
    resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert resolved["paths"]["output_dir"]
    node = OmegaConf.select(cfg, group.replace("/", "."))
    if group in OBJECT_GROUPS and node:
        if group.startswith("model"):
            cifar = str(node["_target_"]).startswith(("kd.models.cifar.", "kd.models.vit."))  # 32x32 nets
            obj = build_model(node, key=group, num_classes=10, input_shape=(3, 32, 32) if cifar else (1, 8, 8))
        else:
            obj = instantiate(node)
        if group == "optimizer":
            obj = obj([torch.nn.Parameter(torch.zeros(1))])
        if group == "scheduler":
            obj = obj(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
        assert obj is not None
    if group in NAMED_OBJECT_GROUPS:
        built = [instantiate(v) for v in (node or {}).values()]
        assert all(b is not None for b in built)
    if group == "trainer":
        assert cfg.trainer.accelerator == ("gpu" if option in GPU_TRAINERS else "cpu")
        if option not in GPU_TRAINERS or torch.cuda.is_available():
            instantiate(cfg.trainer, logger=False)


def model_definitions(role: str) -> dict[str, dict]:
    """The options of ``conf/model/<role>`` that define a net themselves (a ``_target_``), as written."""
    nodes = {p.stem: OmegaConf.load(p) for p in sorted((CONF / "model" / role).glob("*.yaml"))}
    return {name: OmegaConf.to_container(node) for name, node in nodes.items() if "_target_" in node}


def test_each_architecture_is_defined_in_one_file(make_cfg) -> None:
    # conf/model/student/ holds the definitions; a teacher that is also a student is a pointer
    # (conf/model/teacher/cifar_resnet56.yaml): two copies drift apart, and a drifted teacher copy
    # silently changes the teacher store's key.
    teachers, students = model_definitions("teacher"), model_definitions("student")
    both = sorted(set(teachers) & set(students))
    assert not both, f"conf/model/teacher and conf/model/student both define {both}: make the teacher file a pointer"
    copies = sorted(f"teacher/{t} = student/{s}" for t, node in teachers.items() for s in students if students[s] == node)
    assert not copies, f"the same net defined twice: {copies}: make the teacher file a pointer to the student one"
    pointers = sorted(p.stem for p in (CONF / "model" / "teacher").glob("*.yaml") if p.stem not in teachers)
    assert pointers  # the check below runs on something
    for name in pointers:
        assert list(OmegaConf.load(CONF / "model" / "teacher" / f"{name}.yaml").defaults) == [
            f"/model/student/{name}@_here_", "_self_"], f"model/teacher={name} should point to model/student={name}"
        cfg = make_cfg(f"model/teacher={name}", f"model/student={name}", fast=False)
        assert OmegaConf.to_container(cfg.model.teacher) == OmegaConf.to_container(cfg.model.student), name


DISTILL_OPTIONS = sorted(p.stem for p in (CONF / "distill").glob("*.yaml"))
# methods whose own terms have weight 0 in the main training after their init stage (RepDistiller)
ZERO_MAIN_WEIGHT = {"ab", "fsp"}
STAGED = {"ab", "fsp", "ft"}  # methods with a preliminary stage


def logged_losses(results: dict) -> dict[str, float]:
    """The epoch means of the ``train/loss_<term>`` columns a run logged to its metrics.csv."""
    import csv

    rows = list(csv.DictReader((Path(results["run_dir"]) / "csv" / "metrics.csv").open()))
    return {k: float(row[k]) for row in rows for k in row if k.startswith("train/loss_") and row[k]}


def check_terms(results: dict, option: str) -> None:
    """Every logged term is finite, and the method's own terms are not zero."""
    losses = logged_losses(results)
    assert losses and all(math.isfinite(v) for v in losses.values()), losses
    own = {k: v for k, v in losses.items() if k != "train/loss_ce"}
    if option not in ZERO_MAIN_WEIGHT | {"none"}:
        assert own and all(v != 0 for v in own.values()), losses


@pytest.mark.parametrize("option", DISTILL_OPTIONS)
def test_every_method_runs_end_to_end(make_cfg, option: str) -> None:
    results = run(make_cfg(f"distill={option}"))
    assert results["status"] == "completed"
    check_terms(results, option)
    # debug=fdr caps preliminary stages at one epoch (stages.max_epochs)
    assert [s["epochs"] for s in results["stages"]] == ([1] if option in STAGED else [])
    assert results["config"]["distill"]["_target_"] == make_cfg(f"distill={option}").distill._target_


@pytest.fixture(scope="module")
def resnet34_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A (randomly initialised) torchvision ResNet-34 teacher checkpoint for digits."""
    from kd.models import torchvision_model

    path = tmp_path_factory.mktemp("teacher") / "resnet34.pt"
    torch.save(torchvision_model("resnet34", num_classes=10, in_channels=1, small_input=True).state_dict(), path)
    return path


@pytest.mark.parametrize("option", DISTILL_OPTIONS)
def test_every_method_runs_unchanged_on_a_torchvision_pair(make_cfg, resnet34_teacher: Path, option: str) -> None:
    # torchvision ResNet-34 -> ResNet-18, features named only in the model configs' _nodes_
    if option in ("camkd", "deit"):
        pytest.skip("CA-MKD weighs an ensemble (one teacher file is refused); DeiT's student needs a distillation "
                    "token, which ResNet-18 has not (tests/losses/test_camkd.py, test_deit.py)")
    results = run(make_cfg(
        f"distill={option}", "experiment=digits_resnet", f"teacher.ckpt={resnet34_teacher}", "teacher.evaluate=false",
        "callbacks=none",
    ))
    assert results["status"] == "completed"
    check_terms(results, option)
    assert results["student"]["params"] == 11_172_810  # torchvision's resnet18, 1 channel, 3x3 stem, 10 classes


# one batch of each stage (debug=fdr) costs seconds, not tens of seconds, on the big nets
SMALL_BATCHES = ["data.batch_size=16", "data.eval_batch_size=16", "teacher.recipe.batch_size=16"]


def generated_data(cfg, root: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Overrides that point an experiment's data at small files in the real on-disk formats, shrunk."""
    target = str(cfg.data._target_)
    if target.endswith("MNISTDataModule"):
        return [f"data.root={write_mnist(root)}", "data.val_size=40"]  # idx files
    if target.endswith("CIFARDataModule"):  # python pickles, 3 training images per class
        return [f"data.root={write_cifar(root, dataset=cfg.data.dataset)}", "data.val_size=100", *SMALL_BATCHES]
    if target.endswith("ImageNetDataModule"):  # all 1000 class folders, tiny JPEGs
        write_image_folder(root, classes=cfg.data.num_classes, per_class=2, test_per_class=1)
        teacher = cfg.model.teacher
        if teacher.get("weights"):  # a pretrained teacher: its weights file where torch hub caches it
            monkeypatch.setenv("TORCH_HOME", str(root / "torch"))
            cache_pretrained(teacher.name, teacher.weights)
        return [f"data.root={root}", "data.val_per_class=1", "data.image_size=64", "data.num_workers=0", *SMALL_BATCHES]
    return []


def cache_pretrained(name: str, weights: str) -> Path:
    """Writes a (random) state_dict where torch hub caches torchvision's ``weights`` of ``name``."""
    import torchvision

    entry = torchvision.models.get_model_weights(name)[weights]
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(entry.url).name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torchvision.models.get_model(name, num_classes=len(entry.meta["categories"])).state_dict(), path)
    return path


EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("option", [e for e in EXPERIMENTS if "/cifar_row:" not in (CONF / "experiment" / f"{e}.yaml").read_text()])
def test_every_experiment_runs_end_to_end(make_cfg, tmp_path: Path, monkeypatch, option: str) -> None:
    overrides = [f"experiment={option}"]
    cfg = make_cfg(*overrides)
    overrides += generated_data(cfg, tmp_path / "data", monkeypatch)
    results = run(make_cfg(*overrides))
    assert results["status"] == "completed"
    assert (results["teacher"] is None) == (not instantiate(cfg.distill).requires_teacher)  # Tf-KD_reg: none
    chained = results.get("chain")  # the last link of a chain learns from the link before it, stored in the chain
    if chained:
        assert results["teacher"]["path"] == chained["links"][-1]["student"]["weights"]
    elif results["teacher"] is not None:  # a teacher pretrained in full is used as is; an ensemble's members alike
        for teacher in (results["teacher"].get("members") or {"": results["teacher"]}).values():
            assert teacher["source"] == ("pretrained" if cfg.model.teacher.get("weights") else "trained")
    for name, node in (results["config"]["model"].get("peers") or {}).items():  # each peer trained and saved
        assert results["peers"][name]["params"] > 0 and Path(results["peers"][name]["weights"]).is_file()


# the teacher -> student pairs of the CRD/DKD tables: the experiments whose columns are cifar_row
CIFAR_PAIRS = [e for e in EXPERIMENTS if "/cifar_row:" in (CONF / "experiment" / f"{e}.yaml").read_text()]
# DKD's beta per pair: mdistiller's configs/cifar100/dkd/*.yaml (8 where a file sets none)
DKD_BETA = {"wrn_40_2_wrn_16_2": 6, "wrn_40_2_wrn_40_1": 6, "resnet56_resnet20": 2, "resnet110_resnet20": 2,
            "resnet110_resnet32": 2, "resnet32x4_resnet8x4": 8, "vgg13_vgg8": 6, "vgg13_mobilenetv2": 6,
            "resnet50_mobilenetv2": 8, "resnet50_vgg8": 8, "resnet32x4_shufflenetv1": 8, "resnet32x4_shufflenetv2": 8,
            "wrn_40_2_shufflenetv1": 8}
CRD_COLUMNS = ["student", "kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "nst", "crd", "crd_kd", "dkd"]
LOW_LR_STUDENTS = {"mobile_half", "shufflenet_v1", "shufflenet_v2"}  # RepDistiller: lr 0.01


def pair_sweep(option: str) -> list[str]:
    return str(OmegaConf.load(CONF / "experiment" / f"{option}.yaml").hydra.sweeper.params.cifar_row).split(",")


@pytest.mark.parametrize("option", [*CIFAR_PAIRS, "imagenet_resnet34_resnet18"])
@pytest.mark.parametrize("method", ["none", "kd", "crd", "dkd", "at"])
def test_a_method_picked_in_an_experiment_keeps_its_own_settings(make_cfg, option: str, method: str) -> None:
    # distill=<method> replaces the experiment's method whole: nothing of the experiment's leaks into it
    cfg = make_cfg(f"experiment={option}", f"distill={method}", fast=False)
    expected = make_cfg(f"distill={method}", fast=False).distill
    assert OmegaConf.to_container(cfg.distill) == OmegaConf.to_container(expected)
    assert instantiate(cfg.distill) is not None


def test_the_13_pairs_of_the_crd_tables_are_experiments() -> None:
    assert len(CIFAR_PAIRS) == 13 and set(CIFAR_PAIRS) == {f"cifar100_{p}" for p in DKD_BETA}


@pytest.mark.parametrize("option", CIFAR_PAIRS)
def test_cifar_pairs_follow_the_reference_recipe(make_cfg, option: str) -> None:
    kd, crd = (make_cfg(f"experiment={option}", f"cifar_row={row}", fast=False).distill for row in ("kd", "crd"))
    assert (kd.temperature, kd.weight, kd.ce_weight) == (4, 0.9, 0.1)
    assert (crd.weight, crd.ce_weight, crd.feat_dim, crd.nce_k, crd.nce_t, crd.nce_mom) == (0.8, 1, 128, 16384, 0.07, 0.5)
    cfg = make_cfg(f"experiment={option}", "cifar_row=dkd", fast=False)
    assert cfg.distill.beta == DKD_BETA[option.removeprefix("cifar100_")]
    assert cfg.distill.temperature == 4 and cfg.distill.ce_weight == 1
    assert cfg.distill.weight.epochs == 20  # the linear warm-up of the DKD terms
    assert cfg.protocol.published_measure == "best_test_epoch"  # mdistiller's number: the best test epoch
    assert (cfg.trainer.max_epochs, cfg.data.batch_size, cfg.data.dataset) == (240, 64, "cifar100")
    student = str(cfg.model.student._target_).rsplit(".", 1)[-1]
    lr = 0.01 if student in LOW_LR_STUDENTS else 0.05  # set by the pair, as RepDistiller's train_student.py
    assert (cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay) == (lr, 0.9, 5e-4)
    assert list(cfg.scheduler.milestones) == [150, 180, 210] and cfg.scheduler.gamma == 0.1
    recipe = cfg.teacher.recipe  # the teacher trains on the same recipe
    assert (recipe.max_epochs, recipe.batch_size, recipe.optimizer.lr) == (240, 64, 0.05)
    assert list(recipe.scheduler.milestones) == [150, 180, 210]
    sweep = pair_sweep(option)  # every column of the tables; the paper's number of each where it has one
    assert set(CRD_COLUMNS) <= set(sweep) and set(cfg.pair.published) <= set(sweep) | {"teacher"}
    assert {"teacher", *(c for c in CRD_COLUMNS if c not in ("crd_kd", "dkd"))} <= set(cfg.pair.published)
    assert make_cfg(f"experiment={option}", "cifar_row=kd", fast=False).protocol.published_measure == "last_epoch"
    if "fsp" in sweep:  # RepDistiller's FSP: the stem's output, then every stage
        fsp = make_cfg(f"experiment={option}", "cifar_row=fsp", fast=False).distill
        assert len(fsp.student_nodes) == len(fsp.teacher_nodes) >= 4 and fsp.student_nodes[0] in ("relu", "conv1", "relu0")
    if "mlkd" in sweep:  # the authors' two views and lr 0.025 (0.01 for the students that always get it)
        mlkd = make_cfg(f"experiment={option}", "cifar_row=mlkd", fast=False)
        assert mlkd.distill.views == 2 and mlkd.optimizer.lr == (0.01 if student in LOW_LR_STUDENTS else 0.025)
    if "reviewkd" in sweep:
        review = make_cfg(f"experiment={option}", "cifar_row=reviewkd", fast=False).distill
        assert review.weight.value == cfg.pair.reviewkd_weight and review.weight.epochs == 20


def test_the_cifar_teachers_sweep_covers_every_teacher_of_the_pairs(make_cfg) -> None:
    sweep = OmegaConf.load(CONF / "experiment" / "cifar100_teachers.yaml").hydra.sweeper.params["model/student"]
    teachers = {
        entry["override /model/teacher"] for p in CIFAR_PAIRS
        for entry in OmegaConf.load(CONF / "experiment" / f"{p}.yaml").defaults if "override /model/teacher" in entry
    }
    assert teachers <= set(sweep.split(","))
    cfg = make_cfg("experiment=cifar100_teachers", fast=False)  # each trained alone on the recipe
    assert cfg.distill._target_ == "kd.losses.ce.CrossEntropy" and cfg.trainer.max_epochs == 240


CIFAR_ROWS = sorted(p.stem for p in (CONF / "cifar_row").glob("*.yaml"))


def column_on_pair() -> list[tuple[str, str]]:
    """Each column once, on the least used pair whose sweep has it: every pair runs at least once."""
    used = dict.fromkeys(CIFAR_PAIRS, 0)
    out = []
    for row in CIFAR_ROWS:
        pair = min((p for p in CIFAR_PAIRS if row in pair_sweep(p)), key=lambda p: (used[p], CIFAR_PAIRS.index(p)))
        used[pair] += 1
        out.append((row, pair))
    return out


# each column once and each pair at least once, end to end (debug=fdr, generated CIFAR pickles);
# the pairs are left out of test_every_experiment_runs_end_to_end, which this covers for them
COLUMN_ON_PAIR = column_on_pair()


@pytest.mark.parametrize(("row", "option"), COLUMN_ON_PAIR)
def test_every_column_runs_on_a_pair(make_cfg, tmp_path: Path, monkeypatch, row: str, option: str) -> None:
    overrides = [f"experiment={option}", f"cifar_row={row}"]
    overrides += generated_data(make_cfg(*overrides), tmp_path / "data", monkeypatch)
    cfg = make_cfg(*overrides)
    results = run(cfg)
    assert results["status"] == "completed"
    assert results["method"] == type(instantiate(cfg.distill)).__name__
    assert (results["teacher"] is None) == (row == "student")
    student = build_model(cfg.model.student, key="model.student", num_classes=100, input_shape=(3, 32, 32))
    assert results["student"]["params"] == count_parameters(student)


def test_every_column_of_the_tables_is_swept_by_some_pair() -> None:
    assert set(CIFAR_ROWS) == {row for p in CIFAR_PAIRS for row in pair_sweep(p)}
    assert {pair for _, pair in COLUMN_ON_PAIR} == set(CIFAR_PAIRS)  # every pair runs end to end


def test_every_cell_of_every_pair_composes_with_the_pairs_settings(make_cfg) -> None:
    # each of the 13 pairs x its columns: the method builds with the pair's settings, and under
    # protocol=paper (fp32 even with trainer=gpu) it reports its paper's measure
    cells = 0
    for option in CIFAR_PAIRS:
        for row in pair_sweep(option):
            cfg = make_cfg(f"experiment={option}", f"cifar_row={row}", "protocol=paper", "trainer=gpu", fast=False)
            assert instantiate(cfg.distill) is not None, (option, row)
            assert cfg.trainer.precision == "32-true" and cfg.protocol.name == "paper"
            best = row in ("dkd", "reviewkd", "dist", "kd_ls", "mlkd", "kd_dot", "kdsvd")
            assert cfg.protocol.published_measure == ("best_test_epoch" if best else "last_epoch"), (option, row)
            cells += 1
    assert cells >= 13 * 15


def test_the_tfkd_rows_follow_the_authors_recipe_and_run(make_cfg, tmp_path: Path, monkeypatch) -> None:
    cfg = make_cfg("experiment=cifar100_tfkd_resnet18", fast=False)
    assert (cfg.trainer.max_epochs, cfg.data.batch_size, cfg.data.dataset) == (200, 128, "cifar100")
    assert (cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay) == (0.1, 0.9, 5e-4)
    assert list(cfg.scheduler.milestones) == [60, 120, 160] and cfg.scheduler.gamma == 0.2
    recipe = cfg.teacher.recipe  # Tf-KD_self's teacher: the same architecture on the same recipe
    assert (recipe.max_epochs, recipe.batch_size, recipe.optimizer.lr, list(recipe.scheduler.milestones)) == (
        200, 128, 0.1, [60, 120, 160])
    assert cfg.model.teacher == cfg.model.student
    sweep = OmegaConf.load(CONF / "experiment" / "cifar100_tfkd_resnet18.yaml").hydra.sweeper.params.tfkd_row
    assert set(sweep.split(",")) == set(cfg.pair.published)
    for row, method in (("student", "CrossEntropy"), ("self", "KDLoss"), ("reg", "TfKDRegLoss")):
        overrides = ["experiment=cifar100_tfkd_resnet18", f"tfkd_row={row}"]
        overrides += generated_data(make_cfg(*overrides), tmp_path / "data", monkeypatch)
        results = run(make_cfg(*overrides, run_dir=row))
        assert results["status"] == "completed" and results["method"] == method
        assert (results["teacher"] is None) == (row != "self")
        assert results["student"]["params"] == 11_220_132  # kuangliu's CIFAR ResNet18 at 100 classes
        if row == "self":
            assert results["teacher"]["params"] == 11_220_132


def test_the_cskd_experiment_follows_the_authors_recipe(make_cfg) -> None:
    cfg = make_cfg("experiment=cifar100_cskd_resnet18", fast=False)
    assert (cfg.trainer.max_epochs, cfg.data.batch_size, cfg.optimizer.lr, cfg.optimizer.weight_decay) == (200, 128, 0.1, 1e-4)
    assert list(cfg.scheduler.milestones) == [100, 150] and cfg.scheduler.gamma == 0.1
    assert (cfg.distill.temperature, cfg.distill.weight, cfg.distill.ce_weight) == (4.0, 1.0, 1.0)
    sweep = OmegaConf.load(CONF / "experiment" / "cifar100_cskd_resnet18.yaml").hydra.sweeper.params.distill
    assert sweep == "none,cskd"


def test_experiment_overlays_override_groups(make_cfg) -> None:
    cfg = make_cfg("experiment=digits_baseline")
    assert cfg.distill._target_ == "kd.losses.ce.CrossEntropy"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_gpu_trainer_runs_end_to_end(make_cfg) -> None:
    assert run(make_cfg("trainer=gpu"))["status"] == "completed"


def test_configs_read_no_files_outside_conf() -> None:
    for path in CONF.rglob("*.yaml"):
        text = Path(path).read_text()
        assert "!!python" not in text and "eval(" not in text, path


def test_the_experiments_of_peers_and_ensembles_follow_their_recipes(make_cfg) -> None:
    cfg = make_cfg("experiment=cifar100_dml_resnet32", fast=False)
    assert (cfg.trainer.max_epochs, cfg.data.batch_size, cfg.optimizer.lr, cfg.optimizer.nesterov) == (200, 64, 0.1, True)
    assert list(cfg.scheduler.milestones) == [60, 120, 180] and cfg.scheduler.gamma == 0.1
    assert (cfg.distill.temperature, cfg.distill.weight, cfg.distill.ce_weight) == (1.0, 1.0, 1.0)  # DML: T 1
    assert OmegaConf.load(CONF / "experiment" / "cifar100_dml_resnet32.yaml").hydra.sweeper.params.distill == "none,dml,kdcl"
    mixed = make_cfg("experiment=cifar100_dml_wrn28_10_resnet32", fast=False).model
    assert (mixed.peers.wrn.depth, mixed.peers.wrn.widen_factor, mixed.student._target_) == (
        28, 10, "kd.models.cifar.resnet.resnet32")
    ban = make_cfg("experiment=cifar100_ban_wrn28_1", fast=False)
    assert (ban.chain.generations, ban.distill.temperature, ban.distill.ce_weight) == (3, 1.0, 0.0)
    assert ban.model.teacher == ban.model.student and ban.model.student.depth == 28 and ban.model.student.widen_factor == 1
    assert (ban.trainer.max_epochs, ban.optimizer.lr, list(ban.scheduler.milestones)) == (200, 0.1, [60, 120, 160])
    assert ban.teacher.recipe.max_epochs == 200 and ban.teacher.recipe.optimizer.lr == 0.1
    takd = make_cfg("experiment=cifar100_takd_resnet110_resnet8", fast=False)
    assert takd.chain.links.assistant.model._target_ == "kd.models.cifar.resnet.resnet20"
    assert (takd.model.teacher._target_, takd.model.student._target_) == (
        "kd.models.cifar.resnet.resnet110", "kd.models.cifar.resnet.resnet8")
    cfg = make_cfg("experiment=cifar100_camkd", fast=False)
    assert cfg.teacher.ensemble.size == 3 and cfg.model.teacher._target_ == "kd.models.cifar.resnet.resnet32x4"
    assert (cfg.optimizer.lr, cfg.optimizer.nesterov, cfg.trainer.max_epochs, cfg.distill.temperature) == (0.05, True, 240, 4.0)
