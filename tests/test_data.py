import gzip
import hashlib
import io
import pickle
import shutil
import struct
import tarfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hiap_core.train import data
from hiap_core.train.config import ConfigError, DataConfig, RunConfig

FASHION = data.FASHION_MNIST_DIRS[0]
needs_fashion = pytest.mark.skipif(not FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed (make data)")
PINNED_FIRST_VALIDATION_IDS = [1, 3, 47, 49, 80]  # of Fashion-MNIST's training file, data.val_size 5000


@needs_fashion
def test_fashion_mnist_loads_real_files():
    train, test = data.load_fashion_mnist("train"), data.load_fashion_mnist("test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert sorted(train.labels.unique().tolist()) == list(range(10))
    assert torch.bincount(test.labels).tolist() == [1000] * 10


@needs_fashion
def test_subset_is_deterministic_given_the_seed():
    train = data.load_fashion_mnist("train")
    a, b, c = train.subset(100, seed=1), train.subset(100, seed=1), train.subset(100, seed=2)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)
    assert train.subset(None, 0) is train


def write_idx(path, array: np.ndarray):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fashion_copy(tmp_path):
    if not FASHION.is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    for f in FASHION.iterdir():
        shutil.copy(f, tmp_path / f.name)
    return tmp_path


def test_missing_fashion_mnist_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(data.DatasetError, match=r"train-images-idx3-ubyte.gz is missing.*dataset-fashion-mnist"):
        data.load_fashion_mnist("train", root=str(tmp_path), download=False)


def test_truncated_file_is_reported(fashion_copy):
    path = fashion_copy / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(data.DatasetError, match=r"t10k-images-idx3-ubyte.gz is truncated"):
        data.load_fashion_mnist("test", root=str(fashion_copy), download=False)


def test_wrong_shape_is_reported(fashion_copy):
    write_idx(fashion_copy / "t10k-images-idx3-ubyte.gz", np.zeros((10000, 27, 27)))
    with pytest.raises(data.DatasetError, match=r"shape \(10000, 27, 27\), expected \(10000, 28, 28\)"):
        data.load_fashion_mnist("test", root=str(fashion_copy), download=False)


def test_wrong_checksum_is_reported(fashion_copy):
    write_idx(fashion_copy / "t10k-labels-idx1-ubyte.gz", np.zeros(10000))
    with pytest.raises(data.DatasetError, match=r"t10k-labels-idx1-ubyte.gz: sha256 .* expected"):
        data.load_fashion_mnist("test", root=str(fashion_copy), download=False)


def write_cifar10_archive(path, per_batch=6, seed=0):
    """A small archive in exactly the official format: cifar-10-batches-py/{data_batch_1..5,test_batch}."""
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            batch = {
                b"batch_label": name.encode(),
                b"labels": rng.integers(0, 10, per_batch).tolist(),
                b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                b"filenames": [b"x.png"] * per_batch,
            }
            raw = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_cifar10_archive_loads_and_is_verified(tmp_path):
    archive = tmp_path / data.CIFAR10_ARCHIVE
    md5 = write_cifar10_archive(archive)
    train = data.load_cifar10("train", root=str(tmp_path), download=False, md5=md5)
    test = data.load_cifar10("test", root=str(archive), download=False, md5=md5)
    assert train.images.shape == (30, 3, 32, 32) and test.images.shape == (6, 3, 32, 32)
    with tarfile.open(archive) as tar:
        first = pickle.load(tar.extractfile("cifar-10-batches-py/data_batch_1"), encoding="bytes")
    assert torch.equal(train.images[0].flatten(), torch.from_numpy(first[b"data"][0]))
    with pytest.raises(data.DatasetError, match="md5 is .* expected c58f"):  # our archive is not the official one
        data.load_cifar10("train", root=str(tmp_path), download=False)
    archive.write_bytes(archive.read_bytes()[:300])
    with pytest.raises(data.DatasetError, match="not a valid CIFAR-10"):
        data.load_cifar10("train", root=str(tmp_path), download=False, md5=hashlib.md5(archive.read_bytes()).hexdigest())
    with pytest.raises(data.DatasetError, match="CIFAR-10 not found"):
        data.load_cifar10("train", root=str(tmp_path / "none"), download=False)


def write_image_folder(root, classes=3, per_class=4, size=40):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)).save(folder / f"{i}.JPEG")
    return root


def test_imagenet_folder_loader_uses_deit_preprocessing(tmp_path):
    root = write_image_folder(tmp_path)
    cfg = DataConfig(dataset="imagenet", root=str(root), workers=0, val_size=0)
    loaders = data.build_loaders(cfg, img_size=32, batch_size=4, seed=0)
    train, val, classes = loaders.train, loaders.test, loaders.num_classes
    assert classes == 3 and len(train) == 3 and len(val) == 3 and loaders.val is None
    x, y = next(iter(train))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.max() < 3
    assert abs(float(x.mean())) < 3  # normalised with ImageNet mean/std
    with pytest.raises(data.DatasetError, match="val"):
        shutil.rmtree(root / "val")
        data.build_loaders(cfg, img_size=32, batch_size=4, seed=0)
    with pytest.raises(data.DatasetError, match="data.root"):
        data.build_loaders(DataConfig(dataset="imagenet"), img_size=32, batch_size=4, seed=0)


def test_augmentation_is_a_padded_crop_with_optional_flip():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8)
    out, _ = data.augment_batch(images, 2, gen)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for b in range(32):
        crops = [padded[b, :, i : i + 8, j : j + 8] for i in range(5) for j in range(5)]
        assert any(torch.equal(out[b], c) or torch.equal(out[b], c.flip(-1)) for c in crops)


@pytest.mark.parametrize("augment", ["crop_flip", "flip", "none"])
def test_augment_setting_picks_crop_flip_flip_only_or_nothing(augment):
    images = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8)
    ds = data.ArrayDataset(images, torch.arange(64), 64)
    loader = data.TensorLoader(ds, 64, (0.0,), (1.0,), True, seed=1, augment=augment, padding=2 if augment == "crop_flip" else 0)
    batch, order = next(iter(loader))
    source = images[order].float() / 255
    same = [torch.equal(a, b) for a, b in zip(batch, source)]
    flipped = [torch.equal(a, b.flip(-1)) for a, b in zip(batch, source)]
    if augment == "none":
        assert all(same)
    elif augment == "flip":
        assert all(s or f for s, f in zip(same, flipped)) and 0 < sum(flipped) < 64
    else:
        assert sum(s or f for s, f in zip(same, flipped)) < 32  # most samples are shifted


def test_unknown_augment_is_refused_naming_the_choices():
    with pytest.raises(ConfigError, match="data.augment.*crop_flip, flip, none"):
        RunConfig(method="dense", data=DataConfig(augment="mixup")).validate()


def test_loader_shards_global_batches_across_ranks_and_is_deterministic():
    ds = data.ArrayDataset(torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8), torch.arange(40), 40)

    def make(rank=0, world=1):
        return data.TensorLoader(ds, 8, (0.5,), (0.5,), True, seed=3, augment="crop_flip", padding=1, rank=rank, world=world)

    single = list(make())
    ranks = [list(make(r, 2)) for r in range(2)]
    assert len(single) == 5
    for b, (x, y) in enumerate(single):
        assert torch.equal(torch.cat([ranks[0][b][0], ranks[1][b][0]]), x)
        assert torch.equal(torch.cat([ranks[0][b][1], ranks[1][b][1]]), y)
    again = make()
    assert all(torch.equal(a[0], b[0]) for a, b in zip(single, again))
    again.set_epoch(1)
    assert not torch.equal(next(iter(again))[1], single[0][1])
    test = data.TensorLoader(ds, 16, (0.5,), (0.5,), False, rank=1, world=2)
    assert sum(len(y) for _, y in test) == 20


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=20, max_size=200), st.integers(1, 19))
def test_validation_split_is_stratified_disjoint_and_fixed(labels, size):
    labels = torch.tensor(labels)
    train, val = data.validation_split(labels, size)
    assert len(val) == size and len(train) + len(val) == len(labels)
    assert not set(train.tolist()) & set(val.tolist())
    again = data.validation_split(labels.clone(), size)  # the same on every call, machine and run seed
    assert torch.equal(again[0], train) and torch.equal(again[1], val)
    for cls, count in zip(*torch.unique(labels, return_counts=True)):
        held = int((labels[val] == cls).sum())
        assert abs(held - float(count) * size / len(labels)) < 1 + 1e-9


@needs_fashion
def test_validation_split_of_fashion_mnist_is_pinned_and_never_meets_training_or_test():
    cfg = DataConfig(train_subset=1000, test_subset=100)
    loaders = data.build_loaders(cfg, img_size=28, batch_size=64, seed=3)
    val_ids, train_ids = loaders.val.data.ids, loaders.train.data.ids
    assert len(val_ids) == 5000 and torch.bincount(loaders.val.data.labels).tolist() == [500] * 10
    assert not set(val_ids.tolist()) & set(train_ids.tolist())
    other_seed = data.build_loaders(cfg, img_size=28, batch_size=64, seed=4)
    assert torch.equal(other_seed.val.data.ids, val_ids) and not torch.equal(other_seed.train.data.ids, train_ids)
    assert val_ids[:5].tolist() == PINNED_FIRST_VALIDATION_IDS  # a change would re-split every machine's data
    with pytest.raises(ConfigError, match="data.val_size"):
        data.build_loaders(DataConfig(val_size=60000), img_size=28, batch_size=64, seed=0)
