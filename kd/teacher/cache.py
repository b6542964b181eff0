"""An exact cache of the frozen teacher's outputs on every view of every training sample.

The teacher is frozen and runs in eval mode, so its output on a training input is a function of
the input alone. When the inputs come from a finite set (no augmentation: one view per sample;
CIFAR's pad-crop-flip: 162; Hinton's MNIST jitter: 25, see ``kd.data.views``) the teacher can
run once on each ``(index, view)`` and every later step, epoch, run and sweep reads its logits
(and the features the method needs, when they fit) instead of running it again. In KD the
teacher's forward is most of a step (resnet32x4 -> resnet8x4: about twice the student's whole
training step), so this is the largest saving there is.

An entry is keyed by a SHA-256 of everything that decides its content: the teacher's class and
every tensor of its state_dict, the feature nodes, the stored data (every byte of the training
split's images and labels), how inputs are made from them (normalisation, the views), the
storage dtype and the format. A cache built for one teacher, dataset or transform therefore
lives in another directory and is never read for another. Entries are written to a temporary
directory and renamed into place under a file lock (like the teacher store, ``kd.teacher.source``); on
opening, a complete entry is checked against its key, its array shapes and a few outputs the
teacher recomputes, and a mismatch is refused with what to delete.

Stored as ``.npy`` arrays ``(N, V, ...)`` (float16 by default: the logits to about 3 significant
digits, 2 bytes each) opened memory-mapped, so runs share the pages and nothing is loaded
whole; on a GPU the arrays are copied to device memory once when they fit.

With ``top_k`` only the ``k`` largest logits of each view are stored exactly (their values and
class indices), with one number for the rest: the log of the mean of their exponentials. The
logits read back are the stored top-k, and that value for every other class. Their softmax is
the teacher's exactly on the top-k classes and spreads the remaining probability mass evenly
over the others; at a distillation temperature above 1 the tail is flatter than the teacher's
(``meta.json`` records the mean and largest tail mass, the probability the top-k leave out).
ImageNet's 1000 logits take 2000 bytes per view in float16; the top 10 take 44. The idea and
its use on ImageNet are FKD's (Shen & Xing, ECCV 2022), which stores top-k soft labels of
pre-drawn crops (``kd.data.crops.CropViews``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from torch import Tensor

from kd.errors import ConfigError, check_int, check_writable_dir
from kd.models.features import FeatureExtractor
from kd.outputs import ModelOutput

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
_DTYPES = {"float16": np.float16, "float32": np.float32}


def _hash_tensor(h: Any, t: Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())


def teacher_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of a model's class and every parameter and buffer (names, shapes, dtypes, bytes)."""
    h = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        _hash_tensor(h, tensor)
    return h.hexdigest()


def data_fingerprint(dataset: Any) -> str:
    """SHA-256 of a training split's stored inputs and labels and of how inputs are made from them.

    In-memory splits are hashed byte for byte. A split read from files (ImageNet) provides
    ``content_digest()`` (its files' paths and sizes): hashing every byte would take longer than
    building the cache, and ``verify`` recomputes random stored outputs on every open anyway.
    """
    h = hashlib.sha256(f"{type(dataset).__qualname__}|{json.dumps(dataset.spec(), sort_keys=True)}|".encode())
    if hasattr(dataset, "content_digest"):
        h.update(f"files:{dataset.content_digest()}|".encode())
    else:
        _hash_tensor(h, dataset.images if hasattr(dataset, "images") else dataset.inputs)
    _hash_tensor(h, dataset.targets)
    return h.hexdigest()


def check_cacheable(dataset: Any, data_key: str) -> None:
    """Refuses a training split whose inputs are not a finite set of views.

    Raises:
        ConfigError: If the split cannot render ``(index, view)`` pairs (e.g. RandomResizedCrop).
    """
    if not all(hasattr(dataset, a) for a in ("render", "num_views", "spec", "targets")):
        raise ConfigError(
            "teacher_cache.enabled", f"the training inputs of {data_key} are not a finite set of views "
            f"({type(dataset).__name__}: e.g. RandomResizedCrop draws from an infinite set), so no "
            "exact cache exists; set teacher_cache.enabled=false, or for data=imagenet pre-draw the crops "
            "with data.views=E (E per image, FKD-style)"
        )


class TeacherCache:
    """The stored outputs of one teacher on every ``(index, view)`` of one training split.

    Args:
        directory: The entry's directory (holding ``meta.json`` and the arrays).
        meta: Its ``meta.json``.
    """

    def __init__(self, directory: Path, meta: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.meta = meta
        self.num_samples, self.num_views = int(meta["num_samples"]), int(meta["num_views"])
        self.feature_names: list[str] = list(meta["features"])
        self.top_k: int | None = meta.get("top_k")
        self.num_classes = int(meta["shapes"]["logits"][0])
        self._arrays: dict[str, Any] | None = None  # opened lazily; never pickled (ddp_spawn)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"] = None if not self._on_device() else state["_arrays"]
        return state

    def _on_device(self) -> bool:
        return self._arrays is not None and any(isinstance(a, Tensor) for a in self._arrays.values())

    @property
    def arrays(self) -> dict[str, Any]:
        """The stored arrays ``(N, V, ...)`` by name, memory-mapped: ``logits`` (or ``topk_values``,
        ``topk_indices`` and ``tail``) and each feature node."""
        if self._arrays is None:
            self._arrays = {name: np.load(self.directory / file, mmap_mode="r")
                            for name, (file, _, _) in layout(self.meta).items()}
        return self._arrays

    @property
    def nbytes(self) -> int:
        """Bytes of all stored arrays."""
        return sum(int(a.nbytes) if isinstance(a, np.ndarray) else a.numel() * a.element_size()
                   for a in self.arrays.values())

    def to(self, device: torch.device | str) -> TeacherCache:
        """Copies the arrays into ``device`` memory (a GPU), so lookups are one gather there."""
        device = torch.device(device)
        if device.type != "cpu":
            self._arrays = {name: torch.from_numpy(np.ascontiguousarray(a)).to(device) if isinstance(a, np.ndarray)
                            else a.to(device) for name, a in self.arrays.items()}
        return self

    def rows(self, index: Tensor, view: Tensor) -> dict[str, Tensor]:
        """Each stored array's rows ``(B, ...)`` for ``(index, view)``: float32 (class indices: int64),
        on ``index``'s device."""
        out: dict[str, Tensor] = {}
        for name, array in self.arrays.items():
            if isinstance(array, Tensor):
                rows = array[index.to(array.device), view.to(array.device)]  # (B, ...)
            else:
                rows = torch.from_numpy(array[index.cpu().numpy(), view.cpu().numpy()])  # (B, ...), a copy
            dtype = torch.long if name == "topk_indices" else torch.float32
            out[name] = rows.to(device=index.device, dtype=dtype, non_blocking=True)
        return out

    def lookup(self, index: Tensor, view: Tensor) -> ModelOutput:
        """The teacher's stored outputs for samples ``index`` ``(B,)`` in views ``view`` ``(B,)``, as float32.

        Returns:
            Logits ``(B, num_classes)`` and the stored features, on ``index``'s device. From a
            top-k cache: the stored top-k logits, and the tail value for every other class.
        """
        out = self.rows(index, view)
        if self.top_k is None:
            logits = out.pop("logits")
        else:
            logits = expand_top_k(out.pop("topk_values"), out.pop("topk_indices"), out.pop("tail"), self.num_classes)
        return ModelOutput(logits, out)


def compress_top_k(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``k`` largest logits of each row, their classes, and the log-mean-exp of the others.

    Args:
        logits: ``(B, C)`` with ``0 < k < C``.

    Returns:
        Values ``(B, k)`` (descending), class indices ``(B, k)``, and the tail ``(B,)``:
        ``log(mean(exp(logits[j])))`` over the ``C - k`` classes outside the top-k.
    """
    logits = logits.float()
    values, indices = logits.topk(k, dim=1)
    return values, indices, tail_outside(logits, indices)[1]


def tail_outside(logits: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """The logits ``(B, C)`` with the classes ``indices`` ``(B, k)`` masked to -inf, and the
    log-mean-exp ``(B,)`` of the ``C - k`` others (``compress_top_k``'s tail)."""
    rest = logits.scatter(1, indices, float("-inf"))
    return rest, torch.logsumexp(rest, dim=1) - math.log(logits.shape[1] - indices.shape[1])


def left_out_mass(logits: Tensor, tail: Tensor, k: int) -> Tensor:
    """The softmax probability ``(B,)`` of the classes outside the top ``k``, from the tail of ``compress_top_k``."""
    return (tail + math.log(logits.shape[1] - k) - torch.logsumexp(logits.float(), dim=1)).exp()


def expand_top_k(values: Tensor, indices: Tensor, tail: Tensor, num_classes: int) -> Tensor:
    """Logits ``(B, num_classes)`` from ``compress_top_k``'s parts: ``values`` at ``indices``, ``tail`` elsewhere.

    Their log-sum-exp, and so their softmax on the top-k classes, equals that of the original
    logits (up to rounding): the tail value carries exactly the probability mass of the rest.
    """
    logits = tail[:, None].expand(len(tail), num_classes).clone()  # (B, C)
    return logits.scatter_(1, indices, values)


def layout(meta: dict[str, Any]) -> dict[str, tuple[str, tuple[int, ...], Any]]:
    """Each stored array's file name, shape after ``(N, V)`` and numpy dtype, from an entry's ``meta.json``."""
    dtype, shapes, k = _DTYPES[meta["key"]["dtype"]], meta["shapes"], meta.get("top_k")
    if k is None:
        arrays = {"logits": ("logits.npy", tuple(shapes["logits"]), dtype)}
    else:
        index_dtype = np.int16 if shapes["logits"][0] <= np.iinfo(np.int16).max else np.int32
        arrays = {"topk_values": ("topk_values.npy", (k,), dtype), "topk_indices": ("topk_indices.npy", (k,), index_dtype),
                  "tail": ("tail.npy", (), np.float32)}
    arrays.update({name: (f"feature_{i}.npy", tuple(shapes[name]), dtype) for i, name in enumerate(meta["features"])})
    return arrays


def cache_key(teacher: FeatureExtractor, dataset: Any, dtype: str, top_k: int | None = None) -> tuple[str, dict[str, Any]]:
    """The entry name and the description its digest is taken of."""
    keyed = {
        "format": CACHE_FORMAT,
        "teacher": {"class": type(teacher.model).__qualname__, "sha256": teacher_fingerprint(teacher.model),
                    "nodes": list(teacher.nodes), "precision": "32-true"},
        "data": {"class": type(dataset).__qualname__, "sha256": data_fingerprint(dataset), "spec": dataset.spec(),
                 "num_samples": len(dataset), "num_views": int(dataset.num_views)},
        "dtype": dtype,
    }
    if top_k is not None:  # absent otherwise, so entries of full logits keep their keys
        keyed["top_k"] = top_k
    digest = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()
    return f"{type(teacher.model).__name__.lower()}-{digest[:16]}", {**keyed, "sha256": digest}


@torch.inference_mode()
def _teacher_outputs(teacher: FeatureExtractor, dataset: Any, index: Tensor, views: Tensor,
                     device: torch.device) -> ModelOutput:
    x = dataset.render(index, views).to(device)  # (B, ...)
    return teacher(x)


def open_cache(
    teacher: FeatureExtractor,
    dataset: Any,
    directory: str | Path,
    *,
    dtype: str = "float16",
    top_k: int | None = None,
    batch_size: int = 512,
    num_workers: int = 0,
    max_gb: float = 16.0,
    verify: int = 16,
    device: torch.device | str = "cpu",
    build: bool = True,
    data_key: str = "data",
) -> TeacherCache:
    """Opens the cache of ``teacher`` on ``dataset``, building it first when there is none.

    Args:
        teacher: The frozen teacher's feature extractor (its nodes are stored with the logits).
        dataset: The training split: renders ``(index, view)`` (``kd.data.views.ImageViews``,
            ``kd.data.tensor.IndexedTensorDataset``).
        directory: Where caches live (one subdirectory per key).
        dtype: ``float16`` or ``float32`` storage.
        top_k: Store only the ``top_k`` largest logits of each view and the log-mean-exp of the
            rest (``compress_top_k``); None: all logits. Features are stored whole either way.
        batch_size: Inputs per teacher forward while building.
        num_workers: Processes rendering the inputs while building (a split read from image
            files needs several; in-memory splits render fastest in the main process).
        max_gb: Refuse to build an entry larger than this.
        verify: How many random ``(index, view)`` outputs the teacher recomputes to check an
            existing entry (0: none).
        device: Where the teacher runs while building and verifying.
        build: Build a missing entry (False: refuse, e.g. inside a multi-process launch).
        data_key: The config key of the data, for errors.

    Returns:
        The opened cache.

    Raises:
        ConfigError: On a dataset without finite views, a bad dtype or ``top_k`` (it must be
            below the number of classes), an entry larger than ``max_gb``, a missing entry when ``build`` is False, or an entry that disagrees with
            its key or with the teacher.
    """
    check_cacheable(dataset, data_key)
    if dtype not in _DTYPES:
        raise ConfigError("teacher_cache.dtype", f"must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if not max_gb > 0:
        raise ConfigError("teacher_cache.max_gb", f"must be > 0, got {max_gb}")
    if top_k is not None:
        check_int("teacher_cache.top_k", top_k, 1, valid=">= 1, or null to store every logit")
    check_int("teacher_cache.num_workers", num_workers, 0, valid=">= 0")
    device = torch.device(device)
    name, keyed = cache_key(teacher, dataset, dtype, top_k)
    root = Path(directory)
    entry = root / name
    if not (entry / "meta.json").is_file():
        if not build:
            raise ConfigError(
                "teacher_cache.enabled", f"no teacher cache at {entry}, and kd does not build one inside a "
                "multi-process launch; run the same command once on a single device first, or set "
                "teacher_cache.enabled=false"
            )
        check_writable_dir(root, "teacher_cache.dir")
        with FileLock(str(root / f"{name}.lock")):
            if not (entry / "meta.json").is_file():  # another run may have built it meanwhile
                _build(teacher, dataset, entry, keyed, dtype=dtype, top_k=top_k, batch_size=batch_size,
                       num_workers=num_workers, max_gb=max_gb, device=device)
    cache = _open_checked(entry, keyed)
    if verify:
        _verify(cache, teacher, dataset, verify, device)
    log.info("teacher cache %s: %d samples x %d views, %.1f MB", entry, cache.num_samples, cache.num_views,
             cache.nbytes / 1e6)
    return cache


def _open_checked(entry: Path, keyed: dict[str, Any]) -> TeacherCache:
    fix = f"delete {entry} to rebuild it"
    try:
        meta = json.loads((entry / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError("teacher_cache", f"cannot read {entry / 'meta.json'} ({e}); {fix}") from None
    if meta.get("key", {}).get("sha256") != keyed["sha256"]:
        raise ConfigError("teacher_cache", f"{entry} was built for another teacher, data or transform "
                          f"(its key differs from this run's); {fix}")
    cache = TeacherCache(entry, meta)
    arrays = _load_arrays(cache, fix)
    for name, (_, shape, dtype) in layout(meta).items():
        want, array = (cache.num_samples, cache.num_views, *shape), arrays[name]
        if tuple(array.shape) != want or array.dtype != dtype:
            raise ConfigError("teacher_cache", f"{entry}: {name} is {tuple(array.shape)} {array.dtype}, "
                              f"expected {want} {np.dtype(dtype).name}; {fix}")
    return cache


def _load_arrays(cache: TeacherCache, fix: str) -> dict[str, Any]:
    try:
        return cache.arrays
    except (OSError, ValueError) as e:
        raise ConfigError("teacher_cache", f"cannot read the arrays of {cache.directory} ({e}); {fix}") from None


def _verify(cache: TeacherCache, teacher: FeatureExtractor, dataset: Any, count: int, device: torch.device) -> None:
    """Recomputes ``count`` random stored outputs with the teacher and refuses a cache that disagrees."""
    g = torch.Generator().manual_seed(int(time.time_ns() % 2**31))
    index = torch.randint(cache.num_samples, (count,), generator=g)
    views = torch.randint(cache.num_views, (count,), generator=g)
    model = teacher.model
    was_training, before = model.training, next(model.parameters(), torch.empty(0)).device
    model.eval().to(device)
    try:
        fresh = _teacher_outputs(teacher, dataset, index, views, device)
    finally:
        model.to(before).train(was_training)
    stored = cache.rows(index, views)
    logits = fresh.logits.float().cpu()  # (B, C)
    tol = 2.0**-10 if cache.meta["key"]["dtype"] == "float16" else 1e-5  # float16 keeps 11 significant bits
    if cache.top_k is None:
        pairs = [("logits", stored["logits"], logits)]
    else:  # the stored values are the teacher's logits of the stored classes, no other class is larger, and the tail
        indices = stored["topk_indices"].cpu()
        picked, (rest, tail) = logits.gather(1, indices), tail_outside(logits, indices)
        pairs = [("the top-k logits", stored["topk_values"], picked), ("the tail", stored["tail"], tail)]
        outside = rest.max(1).values - picked.min(1).values  # (B,) > 0: a class outside the stored ones is larger
        if (outside > tol * picked.abs().max(1).values + 1e-4).any():
            raise ConfigError(
                "teacher_cache", f"{cache.directory} does not hold the teacher's top {cache.top_k} classes "
                f"(a logit outside them is larger by {float(outside.max()):.3g}); delete {cache.directory} to rebuild it"
            )
    pairs += [(n, stored[n], fresh.features[n]) for n in cache.feature_names]
    for name, s, f in pairs:
        f = f.float().cpu()
        bad = (s.cpu() - f).abs() > tol * f.abs() + 1e-4
        if bad.any():
            raise ConfigError(
                "teacher_cache", f"{cache.directory} disagrees with the teacher on {name} "
                f"(max difference {float((s.cpu() - f).abs().max()):.3g} over {count} spot-checked views); "
                f"delete {cache.directory} to rebuild it"
            )


class _Chunks(torch.utils.data.Dataset):
    """Chunk ``c`` of the flat ``(index, view)`` order rendered: for DataLoader workers while building."""

    def __init__(self, dataset: Any, num_views: int, total: int, batch_size: int) -> None:
        self.dataset, self.num_views, self.total, self.batch_size = dataset, num_views, total, batch_size

    def __len__(self) -> int:
        return math.ceil(self.total / self.batch_size)

    def __getitem__(self, c: int) -> tuple[int, Tensor]:
        lo = c * self.batch_size
        flat = torch.arange(lo, min(lo + self.batch_size, self.total))
        return lo, self.dataset.render(flat // self.num_views, flat % self.num_views)


def _build(teacher: FeatureExtractor, dataset: Any, entry: Path, keyed: dict[str, Any], *, dtype: str,
           top_k: int | None, batch_size: int, num_workers: int, max_gb: float, device: torch.device) -> None:
    """Runs the teacher on every ``(index, view)`` and moves the finished entry to ``entry``.

    Runs under the entry's lock: any temporary directory of this key is a leftover of a crashed
    build and is removed. The size and ``top_k`` are checked on one probe forward, before
    anything is written.
    """
    n, v = len(dataset), int(dataset.num_views)
    model = teacher.model
    was_training, before = model.training, next(model.parameters(), torch.empty(0)).device
    model.eval().to(device)
    try:
        probe = _teacher_outputs(teacher, dataset, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), device)
        shapes = {"logits": list(probe.logits.shape[1:])}
        shapes.update({name: list(t.shape[1:]) for name, t in probe.features.items()})
        num_classes = shapes["logits"][0]
        if top_k is not None and top_k >= num_classes:
            raise ConfigError("teacher_cache.top_k", f"must be below the teacher's {num_classes} classes, got {top_k} "
                              "(null stores every logit)")
        meta = {"key": keyed, "num_samples": n, "num_views": v, "features": list(probe.features), "shapes": shapes}
        if top_k is not None:
            meta["top_k"] = top_k
        arrays_layout = layout(meta)
        per_view = {name: math.prod(shape) * np.dtype(dt).itemsize for name, (_, shape, dt) in arrays_layout.items()}
        size = n * v * sum(per_view.values())
        if size > max_gb * 1e9:
            raise ConfigError(
                "teacher_cache.max_gb", f"the cache would take {size / 1e9:.1f} GB ({n} samples x {v} views x "
                f"{sum(per_view.values())} B: {per_view}) > max_gb={max_gb:g}; raise teacher_cache.max_gb, set "
                "teacher_cache.top_k, store logits only (a method that reads fewer teacher features) or set "
                "teacher_cache.enabled=false"
            )
        for stale in entry.parent.glob(f".{entry.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = entry.with_name(f".{entry.name}.tmp-{os.getpid()}")
        tmp.mkdir(parents=True)
        stored = {name: np.lib.format.open_memmap(tmp / file, mode="w+", dtype=dt, shape=(n, v, *shape))
                  for name, (file, shape, dt) in arrays_layout.items()}
        flat_arrays = {name: a.reshape(n * v, *a.shape[2:]) for name, a in stored.items()}  # in (index, view) order
        log.info("building the teacher cache %s: %d samples x %d views = %d teacher forwards (%.1f MB)",
                 entry, n, v, n * v, size / 1e6)
        loader = torch.utils.data.DataLoader(_Chunks(dataset, v, n * v, batch_size), batch_size=None,
                                             num_workers=num_workers)
        start, reported, tail_mass = time.time(), 0.0, []
        for lo, x in loader:
            with torch.inference_mode():
                out = teacher(x.to(device))
            hi = lo + len(x)
            parts = dict(out.features)
            if top_k is None:
                parts["logits"] = out.logits
            else:
                logits = out.logits.float()
                parts["topk_values"], parts["topk_indices"], parts["tail"] = compress_top_k(logits, top_k)
                tail_mass.append(left_out_mass(logits, parts["tail"], top_k).cpu().double())  # (b,)
            for name, part in parts.items():
                part = part.float() if part.is_floating_point() else part  # numpy has no bfloat16
                flat_arrays[name][lo:hi] = part.cpu().numpy()  # cast to the stored dtype
            done = hi / (n * v)
            if done - reported >= 0.1 or done == 1.0:
                reported = done
                log.info("teacher cache: %3.0f%% (%.0f s)", 100 * done, time.time() - start)
        for array in stored.values():
            array.flush()
        del flat_arrays, stored
    finally:
        model.to(before).train(was_training)
    meta.update({
        "teacher_forwards": n * v, "build_time_s": round(time.time() - start, 2),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"), "device": str(device),
    })
    if tail_mass:
        mass = torch.cat(tail_mass)
        meta["tail_mass"] = {"mean": float(mass.mean()), "max": float(mass.max())}
        log.info("teacher cache: the top %d logits leave out %.3g of the probability on average (at most %.3g)",
                 top_k, meta["tail_mass"]["mean"], meta["tail_mass"]["max"])
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if entry.exists():  # an incomplete entry (no meta.json): replace it
        shutil.rmtree(entry)
    os.replace(tmp, entry)
    log.info("teacher cache %s built in %.0f s", entry, meta["build_time_s"])
