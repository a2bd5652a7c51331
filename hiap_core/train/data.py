"""Datasets: Fashion-MNIST (IDX), CIFAR-10 (python pickles), ImageNet (ImageFolder).

Small datasets live in memory as uint8 tensors and are augmented in batches (`data.augment`:
random crop with padding and horizontal flip, flip only, or none): no per-sample decoding in the
training loop. Shuffling and augmentation are drawn from generators seeded by (seed, epoch, batch), so
a run is deterministic, resumable at any epoch, and a DDP run sees the same global batches as a single
process (each rank takes its slice).
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import pickle
import shutil
import struct
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..core.files import atomic_write
from .config import ConfigError
from .paths import RAW_DATA


class DatasetError(RuntimeError):
    """A dataset is missing, corrupt or malformed; the message names the file and the fix."""


FASHION_MNIST_DIRS = (Path("/usr/share/datasets/fashion-mnist"), RAW_DATA / "fashion-mnist")
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# sha256 of the decompressed IDX files (Debian's package recompresses them, so the .gz bytes differ).
FASHION_MNIST_FILES = {
    "train": (
        ("train-images-idx3-ubyte.gz", "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", (60000, 28, 28)),
        ("train-labels-idx1-ubyte.gz", "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", (60000,)),
    ),
    "test": (
        ("t10k-images-idx3-ubyte.gz", "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", (10000, 28, 28)),
        ("t10k-labels-idx1-ubyte.gz", "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", (10000,)),
    ),
}
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_DIRS = (RAW_DATA / "cifar10",)

NORMALIZATION = {  # (mean, std) per channel
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
CROP_PADDING = {"fashion_mnist": 2, "cifar10": 4}


SPLIT_SEED = 0  # the validation split is one fixed set, whatever the run's seed


def _random_subset(indices: torch.Tensor, size: int | None, seed: int) -> torch.Tensor:
    """A deterministic random `size` of `indices` (all when None or larger), in their order."""
    if size is None or size >= len(indices):
        return indices
    return indices[torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed))[:size].sort().values]


@dataclass
class ArrayDataset:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)
    num_classes: int
    ids: torch.Tensor | None = None  # int64 (N,): each sample's index in its split's file (None: 0..N-1)

    def __post_init__(self):
        if self.ids is None:
            self.ids = torch.arange(len(self.labels))

    def take(self, keep: torch.Tensor) -> ArrayDataset:
        return ArrayDataset(self.images[keep], self.labels[keep], self.num_classes, self.ids[keep])

    def subset(self, size: int | None, seed: int) -> ArrayDataset:
        """A deterministic random subset of `size` samples (all when None or larger)."""
        if size is None or size >= len(self.labels):
            return self
        return self.take(_random_subset(torch.arange(len(self.labels)), size, seed))


def validation_split(labels: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices) of a training set: `size` samples held out, stratified (each
    class in proportion, largest remainders rounded up), drawn with a fixed seed, so the split is the same
    on every machine and for every run. Both sorted; they never overlap."""
    n = len(labels)
    if not 0 <= size < n:
        raise ConfigError(f"invalid config: data.val_size = {size}: must be in [0, {n}), the training set has {n} images")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * size / n
    quota = exact.floor().long()
    quota[torch.argsort(exact - quota, descending=True, stable=True)[: size - int(quota.sum())]] += 1
    held = torch.zeros(n, dtype=torch.bool)
    for cls, k in zip(classes.tolist(), quota.tolist()):
        members = order[labels[order] == cls]
        held[members[:k]] = True
    return (~held).nonzero().flatten(), held.nonzero().flatten()


def _download(url: str, dest: Path) -> None:
    def fetch(tmp: Path) -> None:
        with tmp.open("wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            shutil.copyfileobj(response, out)

    atomic_write(dest, fetch)


def _read_gzip(path: Path, fix: str) -> bytes:
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (EOFError, OSError, gzip.BadGzipFile) as err:
        raise DatasetError(f"{path} is truncated or not gzip ({err}). {fix}") from err


def _parse_idx(raw: bytes, path: Path, shape: tuple[int, ...], fix: str) -> np.ndarray:
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08 or raw[3] != len(shape):
        raise DatasetError(f"{path} is not an IDX file of {len(shape)}-d uint8 data (bad header). {fix}")
    dims = struct.unpack(f">{len(shape)}I", raw[4 : 4 + 4 * len(shape)])
    if dims != shape:
        raise DatasetError(f"{path} has shape {dims}, expected {shape}. {fix}")
    body = raw[4 + 4 * len(shape) :]
    if len(body) != int(np.prod(shape)):
        raise DatasetError(f"{path} holds {len(body)} bytes of data, expected {int(np.prod(shape))} (truncated). {fix}")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _fashion_mnist_dir(root: str | None, download: bool) -> Path:
    names = [name for split in FASHION_MNIST_FILES.values() for name, _, _ in split]
    candidates = [Path(root)] if root else list(FASHION_MNIST_DIRS)
    for folder in candidates:
        if all((folder / n).is_file() for n in names):
            return folder
    target = candidates[0] if root else FASHION_MNIST_DIRS[-1]
    if download:
        try:
            for name in names:
                if not (target / name).is_file():
                    _download(FASHION_MNIST_URL + name, target / name)
            return target
        except OSError as err:
            reason = f"download failed ({err})"
    else:
        reason = "download is disabled (data.download: false)"
    missing = [str(target / n) for n in names if not (target / n).is_file()]
    raise DatasetError(
        f"Fashion-MNIST not found: {missing[0] if missing else target} is missing and {reason}. Install Debian's "
        "package (`make data` or `apt-get install dataset-fashion-mnist`), or set data.root to a folder holding "
        "the four *-idx?-ubyte.gz files."
    )


def load_fashion_mnist(split: str, root: str | None = None, download: bool = True) -> ArrayDataset:
    folder = _fashion_mnist_dir(root, download)
    (img_name, img_sha, img_shape), (lbl_name, lbl_sha, lbl_shape) = FASHION_MNIST_FILES[split]
    arrays = []
    for name, sha, shape in ((img_name, img_sha, img_shape), (lbl_name, lbl_sha, lbl_shape)):
        path = folder / name
        fix = f"Delete it and reinstall `dataset-fashion-mnist` (or re-download it into {folder})."
        raw = _read_gzip(path, fix)
        array = _parse_idx(raw, path, shape, fix)
        digest = hashlib.sha256(raw).hexdigest()
        if digest != sha:
            raise DatasetError(
                f"{path}: sha256 of its contents is {digest}, expected {sha} (corrupt or not the official file). {fix}"
            )
        arrays.append(array)
    images, labels = arrays
    return ArrayDataset(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)), 10)


def _cifar10_archive(root: str | None, download: bool) -> Path:
    if root and Path(root).is_file():
        return Path(root)
    folders = [Path(root)] if root else list(CIFAR10_DIRS)
    for folder in folders:
        if (folder / CIFAR10_ARCHIVE).is_file():
            return folder / CIFAR10_ARCHIVE
    target = folders[0] / CIFAR10_ARCHIVE
    if download:
        try:
            _download(CIFAR10_URL, target)
            return target
        except OSError as err:
            reason = f"download failed ({err})"
    else:
        reason = "download is disabled (data.download: false)"
    raise DatasetError(
        f"CIFAR-10 not found: {target} is missing and {reason}. Put the official {CIFAR10_ARCHIVE} there, "
        "or set data.root to its folder or path."
    )


def load_cifar10(split: str, root: str | None = None, download: bool = True, md5: str | None = None) -> ArrayDataset:
    """The official python archive (pickled batches), verified against `md5` (default: the official one)."""
    path = _cifar10_archive(root, download)
    expected = md5 or CIFAR10_MD5
    fix = f"Delete it and download the official {CIFAR10_ARCHIVE} again."
    digest = hashlib.md5(path.read_bytes()).hexdigest()
    if digest != expected:
        raise DatasetError(
            f"{path}: md5 is {digest}, expected {expected} (corrupt, truncated or not the official archive). {fix}"
        )
    members = (
        [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)] if split == "train" else ["cifar-10-batches-py/test_batch"]
    )
    images, labels = [], []
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in members:
                batch = pickle.load(io.BytesIO(tar.extractfile(member).read()), encoding="bytes")
                data = np.asarray(batch[b"data"], dtype=np.uint8)
                if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(batch[b"labels"]) != len(data):
                    raise DatasetError(f"{path}:{member} has data of shape {data.shape}, expected (N, 3072) with N labels. {fix}")
                images.append(data.reshape(-1, 3, 32, 32))
                labels.extend(batch[b"labels"])
    except (KeyError, tarfile.TarError, EOFError, OSError, pickle.UnpicklingError) as err:
        raise DatasetError(f"{path} is not a valid CIFAR-10 python archive ({err}). {fix}") from err
    return ArrayDataset(torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64), 10)


def augment_batch(images: torch.Tensor, padding: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crop with zero padding (none at `padding` 0) and horizontal flip, per sample, on a uint8
    batch (B, C, H, W); returns the batch and which samples were flipped."""
    B, C, H, W = images.shape
    padded = F.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (B, 1), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (B, 1), generator=generator)
    rows = (dy + torch.arange(H))[:, :, None]  # (B, H, 1)
    cols = (dx + torch.arange(W))[:, None, :]  # (B, 1, W)
    flip = torch.rand(B, generator=generator) < 0.5
    cols = torch.where(flip[:, None, None], 2 * dx[:, :, None] + W - 1 - cols, cols)
    batch_index = torch.arange(B)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch_index, rows, cols].permute(0, 3, 1, 2), flip


class TensorLoader:
    """Batches (normalised float images, labels) of an in-memory `ArrayDataset`.

    Training: reshuffled each epoch, last incomplete batch dropped, each of `world` ranks gets its
    contiguous slice of every global batch. Evaluation: in order, ranks take interleaved samples.
    `pin_memory` (for a CUDA device): batches in page-locked memory, so `.to(device, non_blocking=True)`
    copies while the host goes on. `views` (training, set by the engine when it reads cached teacher
    logits): each batch carries a third tensor, the view of every sample, `2 * id + flipped` (`id`: its
    index in its split's file), which only flips (or nothing) make exact.
    """

    def __init__(
        self,
        data: ArrayDataset,
        batch_size: int,
        mean,
        std,
        train: bool,
        seed: int = 0,
        augment: str = "none",
        padding: int = 0,
        rank: int = 0,
        world: int = 1,
        pin_memory: bool = False,
    ):
        if batch_size % world:
            raise ValueError(f"batch_size {batch_size} must be divisible by the number of processes {world}")
        if train and len(data.labels) < batch_size:
            raise ConfigError(
                f"invalid config: optim.batch_size = {batch_size}: the training set has {len(data.labels)} images "
                "(data.train_subset), fewer than one batch"
            )
        self.data, self.batch_size, self.train, self.seed = data, batch_size, train, seed
        self.augment, self.padding, self.rank, self.world = augment != "none", padding, rank, world
        self.pin_memory, self.views = pin_memory, False
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.data.labels)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def _batch(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised float images, labels), pinned when asked."""
        batch = (images.float() / 255.0 - self.mean) / self.std, labels
        return tuple(t.pin_memory() for t in batch) if self.pin_memory else batch

    def __iter__(self):
        n = len(self.data.labels)
        if not self.train:
            order = torch.arange(n)
            for start in range(0, n, self.batch_size):
                idx = order[start : start + self.batch_size][self.rank :: self.world]
                yield self._batch(self.data.images[idx], self.data.labels[idx])
            return
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch))
        local = self.batch_size // self.world
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            images, flipped = self.data.images[idx], torch.zeros(len(idx), dtype=torch.bool)
            if self.augment:
                gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 100_003 + b)
                images, flipped = augment_batch(images, self.padding, gen)
            mine = slice(self.rank * local, (self.rank + 1) * local)
            batch = self._batch(images[mine], self.data.labels[idx][mine])
            yield (*batch, (2 * self.data.ids[idx] + flipped)[mine]) if self.views else batch


class ImageFolderLoader:
    """ImageNet-style folders with timm/DeiT preprocessing (RandomResizedCrop, flip, colour jitter;
    eval resize + center crop), ImageNet mean/std, a DataLoader with worker processes. `indices`: the
    samples of the folder to use (None: all)."""

    def __init__(
        self,
        dataset,
        img_size: int,
        batch_size: int,
        train: bool,
        seed: int = 0,
        workers: int = 4,
        rank: int = 0,
        world: int = 1,
        indices: torch.Tensor | None = None,
        pin_memory: bool = False,
    ):
        import timm.data
        from torch.utils.data import DataLoader, DistributedSampler, Subset

        if batch_size % world:
            raise ValueError(f"batch_size {batch_size} must be divisible by the number of processes {world}")
        dataset.transform = timm.data.create_transform(img_size, is_training=train)
        self.num_classes = len(dataset.classes)
        if indices is not None:
            dataset = Subset(dataset, indices.tolist())
        self.sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=train, seed=seed, drop_last=train)
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size // world,
            sampler=self.sampler,
            num_workers=workers,
            drop_last=train,
            persistent_workers=workers > 0,
            pin_memory=pin_memory,
        )

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)


def _imagenet_folder(root: str | None, split: str):
    """The ImageFolder dataset of `root/split` (no transform yet)."""
    from torchvision.datasets import ImageFolder

    if not root:
        raise DatasetError(
            "ImageNet needs data.root: a folder with train/ and val/ in ImageFolder layout (one subfolder per class)."
        )
    folder = Path(root) / split
    if not folder.is_dir():
        raise DatasetError(f"ImageNet folder {folder} is missing: data.root must hold train/ and val/ (ImageFolder layout).")
    if not any(p.is_dir() for p in folder.iterdir()):
        raise DatasetError(f"{folder} has no class subfolders: expected {folder}/<class>/<image>.JPEG.")
    return ImageFolder(str(folder))


@dataclass
class Loaders:
    """A run's data: training (the training images less the validation split, or a subset of them),
    validation (None with `data.val_size` 0) and test."""

    train: TensorLoader | ImageFolderLoader
    val: TensorLoader | ImageFolderLoader | None
    test: TensorLoader | ImageFolderLoader
    num_classes: int


def load_split(cfg, split: str) -> ArrayDataset:
    """The whole `train` or `test` file of an in-memory dataset (`cfg`: a `config.DataConfig`)."""
    if cfg.dataset == "fashion_mnist":
        return load_fashion_mnist(split, cfg.root, cfg.download)
    return load_cifar10(split, cfg.root, cfg.download, cfg.checksum)


def build_loaders(
    cfg, img_size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, pin_memory: bool = False
) -> Loaders:
    """The loaders of `cfg` (a `config.DataConfig`): `data.val_size` training images held out for validation
    (`validation_split`), `data.train_subset` of the rest drawn per `seed`; `pin_memory` for a CUDA device."""
    if cfg.dataset == "imagenet":
        train_folder = _imagenet_folder(cfg.root, "train")
        train_idx, val_idx = validation_split(torch.tensor(train_folder.targets), cfg.val_size)

        def make(dataset, train, indices):
            return ImageFolderLoader(dataset, img_size, batch_size, train, seed, cfg.workers, rank, world, indices, pin_memory)

        test_folder = _imagenet_folder(cfg.root, "val")
        test_idx = _random_subset(torch.arange(len(test_folder)), cfg.test_subset, seed)
        val = make(copy.copy(train_folder), False, val_idx) if cfg.val_size else None  # same scan, own transform
        train = make(train_folder, True, _random_subset(train_idx, cfg.train_subset, seed))
        return Loaders(train, val, make(test_folder, False, test_idx), train.num_classes)
    pool = load_split(cfg, "train")
    train_idx, val_idx = validation_split(pool.labels, cfg.val_size)
    train_set = pool.take(train_idx).subset(cfg.train_subset, seed)
    test_set = load_split(cfg, "test").subset(cfg.test_subset, seed)
    mean, std = NORMALIZATION[cfg.dataset]
    padding = CROP_PADDING[cfg.dataset] if cfg.augment == "crop_flip" else 0
    train = TensorLoader(train_set, batch_size, mean, std, True, seed, cfg.augment, padding, rank, world, pin_memory)

    def evaluation(data: ArrayDataset) -> TensorLoader:
        return TensorLoader(data, batch_size, mean, std, False, seed, rank=rank, world=world, pin_memory=pin_memory)

    val = evaluation(pool.take(val_idx)) if cfg.val_size else None
    return Loaders(train, val, evaluation(test_set), pool.num_classes)


LOGITS_FILE = "logits.safetensors"  # hiap_core.train.teacher_logits writes it
# the stage tracks no code (tests/test_dvc.py: COMMITTED_OUTPUT_STAGES), so a cache of an older format needs --force
REMAKE_LOGITS = "remake it: `dvc repro --force --single-item teacher_logits`"


def tensor_sha256(values: torch.Tensor) -> str:
    """sha256 of a CPU tensor's values: the logits cache records its own and its training images' (the file
    vouches for itself on read, and for the images it was made from)."""
    return hashlib.sha256(values.contiguous().numpy().tobytes()).hexdigest()


def load_teacher_logits(cfg, teacher_sha256: str) -> torch.Tensor:
    """The cached teacher logits of `cfg.teacher_logits` (`cfg`: a `config.RunConfig`), refused in one line
    unless they are the values the cache was written with (a truncated or changed file is refused) and were
    made from this teacher (`teacher_sha256`) and these training images, for a flip-only augmentation."""
    from safetensors import safe_open

    path = Path(cfg.teacher_logits) / LOGITS_FILE
    where = f"invalid config: teacher_logits = {cfg.teacher_logits!r}"
    if cfg.data.augment == "crop_flip":
        raise ConfigError(f"{where}: cached logits are exact for data.augment flip or none, not crop_flip")
    if not path.is_file():
        raise ConfigError(f"{where}: {path} not found; make it with python -m hiap_core.train.teacher_logits")
    try:
        with safe_open(str(path), "pt") as f:
            metadata, logits = f.metadata() or {}, f.get_tensor("logits")
    except Exception as err:  # safetensors raises its own error types for a truncated or foreign file
        raise ConfigError(f"{where}: {path} is not a readable logits cache (corrupt or truncated); {REMAKE_LOGITS}") from err
    if metadata.get("logits_sha256") != tensor_sha256(logits):
        why = (
            "records no sha256 of its values (an older cache)"
            if "logits_sha256" not in metadata
            else "holds other values than it was written with"
        )
        raise ConfigError(f"{where}: {path} {why}; {REMAKE_LOGITS}")
    if metadata.get("teacher_sha256") != teacher_sha256:
        raise ConfigError(f"{where}: made from another teacher's weights; remake it (the teacher_logits stage)")
    if metadata.get("images_sha256") != tensor_sha256(load_split(cfg.data, "train").images):
        raise ConfigError(f"{where}: made from other training images; remake it (the teacher_logits stage)")
    return logits
