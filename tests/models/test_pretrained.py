"""Pretrained torchvision and timm models, from generated weights in a private cache; nothing is downloaded."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from kd.errors import ConfigError
from kd.models import build_model, pretrained_source, timm_model, torchvision_model
from kd.models import pretrained as pretrained_weights
from kd.models.features import FeatureExtractor

RESNET18 = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
MARK = "torchvision:ResNet18_Weights.IMAGENET1K_V1"


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache of the test's own; the network is unreachable (probe says so)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(pretrained_weights, "reachable", lambda url, timeout=5.0: False)
    return tmp_path / "torch"


def cache_weights(name: str, weights: torchvision.models.WeightsEnum) -> dict[str, torch.Tensor]:
    """Writes a random model's state_dict (bias of the head 0.123) where torch hub caches ``weights``."""
    torch.manual_seed(0)
    state = torchvision.models.get_model(name, weights=None, num_classes=len(weights.meta["categories"])).state_dict()
    head = [k for k in state if k.endswith(".bias") and state[k].shape == (len(weights.meta["categories"]),)][-1]
    state[head].fill_(0.123)
    path = pretrained_weights.torch_hub_file(weights.url)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def assert_equal_states(model: nn.Module, state: dict[str, torch.Tensor], skip: str = "@") -> None:
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(skip)}
    assert set(own) == {k for k in state if not k.startswith(skip)}
    assert all(torch.equal(own[k], state[k]) for k in own), "a weight differs from the cached file"


# --- torchvision ---------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", ["IMAGENET1K_V1", "DEFAULT", "ResNet18_Weights.IMAGENET1K_V1"])
def test_cached_weights_load_in_full_and_mark_the_model_pretrained(torch_home: Path, weights: str) -> None:
    state = cache_weights("resnet18", RESNET18)
    assert pretrained_weights.torch_hub_file(RESNET18.url) == torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    model = torchvision_model("resnet18", num_classes=1000, weights=weights)
    assert_equal_states(model, state)
    assert torch.all(model.fc.bias == 0.123)
    assert pretrained_source(model) == MARK


@pytest.mark.parametrize(("name", "weights", "head"), [
    ("resnet18", RESNET18, "fc"),
    ("mobilenet_v3_small", torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1, "classifier.3"),
])
def test_other_classes_get_a_new_head_on_the_pretrained_body(torch_home: Path, name: str, weights, head: str) -> None:
    state = cache_weights(name, weights)
    model = torchvision_model(name, num_classes=10, weights="IMAGENET1K_V1")
    new = model.get_submodule(head)
    assert isinstance(new, nn.Linear) and new.weight.shape == (10, state[f"{head}.weight"].shape[1])
    assert not torch.any(new.bias == 0.123)
    assert_equal_states(model, state, skip=head + ".")
    assert pretrained_source(model) is None  # fine-tuned as a teacher, not used as is
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 10)


def test_a_new_stem_is_random_unmarked_and_logged(torch_home: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = cache_weights("resnet18", RESNET18)
    caplog.set_level(logging.WARNING, logger="kd.models.tv")
    model = torchvision_model("resnet18", num_classes=1000, in_channels=1, weights="IMAGENET1K_V1")
    assert model.conv1.weight.shape == (64, 1, 7, 7)
    assert_equal_states(model, state, skip="conv1.")
    assert pretrained_source(model) is None
    assert "resnet18 with weights=IMAGENET1K_V1: the 1-channel stem is newly initialised" in caplog.text
    small = torchvision_model("resnet18", num_classes=1000, in_channels=1, small_input=True, weights="IMAGENET1K_V1")
    assert small.conv1.weight.shape == (64, 1, 3, 3) and pretrained_source(small) is None


def test_missing_weights_without_network_fail_at_once_naming_path_and_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    probed: list[str] = []
    monkeypatch.setattr(pretrained_weights, "reachable", lambda url, timeout=5.0: probed.append(url) or False)
    path = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        torchvision_model("resnet18", num_classes=10, weights="IMAGENET1K_V1")
    assert time.monotonic() - start < 2
    assert str(err.value) == (
        "weights: ResNet18_Weights.IMAGENET1K_V1 is not in the torch hub cache and download.pytorch.org cannot be "
        f"reached: put resnet18-f37072fd.pth at {path} (download it from "
        "https://download.pytorch.org/models/resnet18-f37072fd.pth on a machine with internet)"
    )
    assert probed == [RESNET18.url]


def test_missing_weights_are_downloaded_under_a_socket_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(pretrained_weights, "reachable", lambda url, timeout=5.0: True)
    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()
    calls: list[tuple[str, str | None, float | None]] = []

    def download(url: str, dst: str, hash_prefix: str | None = None, progress: bool = True) -> None:
        calls.append((url, hash_prefix, socket.getdefaulttimeout()))
        torch.save(state, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    before = socket.getdefaulttimeout()
    model = torchvision_model("resnet18", num_classes=1000, weights="IMAGENET1K_V1")
    assert calls == [(RESNET18.url, "f37072fd", pretrained_weights.DOWNLOAD_TIMEOUT_S)]
    assert socket.getdefaulttimeout() == before
    assert_equal_states(model, state)
    torchvision_model("resnet18", num_classes=1000, weights="IMAGENET1K_V1")
    assert len(calls) == 1, "cached weights were downloaded again"


def test_a_failed_download_says_where_to_put_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(pretrained_weights, "reachable", lambda url, timeout=5.0: True)

    def stalled(*args: object, **kwargs: object) -> None:
        raise TimeoutError("The read operation timed out")

    monkeypatch.setattr(torch.hub, "download_url_to_file", stalled)
    with pytest.raises(ConfigError, match=(
        r"^weights: downloading ResNet18_Weights.IMAGENET1K_V1 from https://download.pytorch.org/models/"
        r"resnet18-f37072fd.pth failed \(TimeoutError: The read operation timed out\); put resnet18-f37072fd.pth at "
    )):
        torchvision_model("resnet18", num_classes=10, weights="IMAGENET1K_V1")


_UNPICKLED: list[str] = []


def _record(what: str) -> str:
    _UNPICKLED.append(what)
    return what


class _Planted:
    def __reduce__(self) -> tuple[Callable[[str], str], tuple[str]]:
        return _record, ("code ran",)


def test_cached_weights_are_loaded_without_running_pickled_code(torch_home: Path) -> None:
    state = cache_weights("resnet18", RESNET18)
    path = pretrained_weights.torch_hub_file(RESNET18.url)
    torch.save({**state, "planted": _Planted()}, path)
    with pytest.raises(ConfigError, match=rf"^weights: cannot load {path} as ResNet18_Weights.IMAGENET1K_V1 \(UnpicklingError"):
        torchvision_model("resnet18", num_classes=1000, weights="IMAGENET1K_V1")
    assert _UNPICKLED == []


def test_unknown_weights_list_the_members_of_the_enum(torch_home: Path) -> None:
    with pytest.raises(ConfigError, match=(
        r"^weights: resnet18 has no weights 'IMAGENET1K_V2'; did you mean IMAGENET1K_V1\? "
        r"ResNet18_Weights has IMAGENET1K_V1, DEFAULT$"
    )):
        torchvision_model("resnet18", num_classes=10, weights="IMAGENET1K_V2")
    with pytest.raises(ConfigError, match=(
        r"^weights: ResNet34_Weights.IMAGENET1K_V1 are not weights of resnet18; ResNet18_Weights has IMAGENET1K_V1, DEFAULT$"
    )):
        torchvision_model("resnet18", num_classes=10, weights="ResNet34_Weights.IMAGENET1K_V1")


def test_new_classes_on_a_model_whose_head_is_no_linear_are_refused(torch_home: Path) -> None:
    cache_weights("squeezenet1_0", torchvision.models.SqueezeNet1_0_Weights.IMAGENET1K_V1)
    assert pretrained_source(torchvision_model("squeezenet1_0", num_classes=1000, weights="DEFAULT")) is not None
    with pytest.raises(ConfigError, match=(
        r"^weights: squeezenet1_0's pretrained head is not an nn.Linear of 1000 outputs, so kd cannot replace it "
        r"for 10 classes; use weights with data of 1000 classes, or another model$"
    )):
        torchvision_model("squeezenet1_0", num_classes=10, weights="DEFAULT")


# --- the network probe ---------------------------------------------------------------------------


def test_the_probe_connects_to_the_server_or_its_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        assert pretrained_weights.reachable(f"https://127.0.0.1:{port}/models/x.pth", timeout=2)
        monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{port}")  # a host that does not exist, behind a proxy
        assert pretrained_weights.reachable("https://kd-test.invalid/x.pth", timeout=2)
        monkeypatch.delenv("https_proxy")
    start = time.monotonic()
    assert not pretrained_weights.reachable(f"https://127.0.0.1:{port}/models/x.pth", timeout=2)  # closed now
    assert time.monotonic() - start < 2.5


# --- timm ----------------------------------------------------------------------------------------


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache of the test's own; the Hub is unreachable (probe says so)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read once, when huggingface_hub was imported
    monkeypatch.setattr(pretrained_weights, "reachable", lambda url, timeout=5.0: False)
    return cache


def cache_timm_weights(cache: Path, repo: str) -> dict[str, torch.Tensor]:
    """Writes a random timm model's weights (classifier bias 0.123) into a Hub cache, as ``hf download`` does."""
    import safetensors.torch
    import timm

    torch.manual_seed(0)
    state = timm.create_model(repo.split("/")[1].split(".")[0]).state_dict()
    state["fc.bias"].fill_(0.123)
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "snapshots" / commit).mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    safetensors.torch.save_file(state, folder / "snapshots" / commit / "model.safetensors")
    return state


def test_a_timm_model_fits_the_data_and_is_fx_traceable() -> None:
    node = {"_target_": "kd.models.timm_model", "name": "test_resnet"}
    model = build_model(node, key="model.teacher", num_classes=10, input_shape=(1, 32, 32))  # classes, channels from the data
    assert pretrained_source(model) is None
    extractor = FeatureExtractor(model, ["layer2", "layer4"], key="model.teacher._nodes_", input_shape=(1, 32, 32), tracer="fx")
    out = extractor(torch.randn(2, 1, 32, 32))
    assert extractor.mode == "fx"
    assert out.logits.shape == (2, 10) and out.features["layer2"].dim() == 4


def test_unknown_timm_names_and_tags_fail_with_close_matches() -> None:
    with pytest.raises(ConfigError, match=r"^name: timm has no model 'test_resnt'; did you mean test_resnet.*see timm.list_models\(\)$"):
        timm_model("test_resnt", num_classes=10)
    with pytest.raises(ConfigError, match=r"^name: timm has no weights 'resnet18.foo'; tagged weights of this model: .*resnet18.a1_in1k"):
        timm_model("resnet18.foo", num_classes=10)
    with pytest.raises(ConfigError, match=r"^pretrained: timm has no pretrained weights for 'test_vit4'$"):
        timm_model("test_vit4", num_classes=10, pretrained=True)


def test_timm_pretrained_offline_loads_the_hub_cache(hf_cache: Path) -> None:
    state = cache_timm_weights(hf_cache, "timm/test_resnet.r160_in1k")
    model = timm_model("test_resnet", num_classes=1000, pretrained=True)
    assert_equal_states(model, state)
    assert pretrained_source(model) == "timm:test_resnet.r160_in1k"
    tuned = timm_model("test_resnet", num_classes=10, pretrained=True)
    assert tuned.fc.weight.shape == (10, state["fc.weight"].shape[1])
    assert_equal_states(tuned, state, skip="fc.")
    assert pretrained_source(tuned) is None


def test_timm_pretrained_offline_without_the_weights_fails_clearly(hf_cache: Path) -> None:
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        timm_model("test_resnet", num_classes=10, pretrained=True)
    assert time.monotonic() - start < 3
    assert str(err.value) == (
        f"pretrained: the weights of test_resnet (timm/test_resnet.r160_in1k) are not in the Hugging Face cache {hf_cache} "
        "and https://huggingface.co cannot be reached; on a machine with internet run `hf download "
        "timm/test_resnet.r160_in1k`, then copy its cache folder models--timm--test_resnet.r160_in1k into "
        f"{hf_cache} (or point HF_HUB_CACHE at a copy)"
    )
    assert constants.HF_HUB_OFFLINE == offline, "offline mode leaked out of the call"


def test_without_timm_installed_the_error_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    with pytest.raises(ConfigError, match=r"^_target_: timm is not installed: pip install timm \(or pip install kd\[timm\]\)$"):
        timm_model("resnet18", num_classes=10)
