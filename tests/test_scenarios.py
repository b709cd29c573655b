"""Benchmark builders: split_digits and the paper loaders on tiny folders made here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_cifar100
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import CIFAR100

from avalanche_d2l.scenarios import (
    ImagePathDataset,
    default_image_transforms,
    fg_imagenet_wnids,
    icarl_class_order,
    split_cifar100,
    split_cub200,
    split_digits,
    split_fg_imagenet,
    split_imagenet_r,
    split_mini_imagenet,
    stratified_split,
)

# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def _stream_tensors(stream, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for exp in stream:
        ds = exp.dataset
        n = len(ds) if limit is None else min(limit, len(ds))
        for i in range(n):
            x, y, _ = ds[i]
            xs.append(x)
            ys.append(int(y))
    return torch.stack(xs), torch.tensor(ys)


def _check_class_partition(bench, n_classes: int) -> None:
    seen: set[int] = set()
    for train_exp, test_exp in zip(bench.train_stream, bench.test_stream):
        classes = set(train_exp.classes_in_this_experience)
        assert not classes & seen, "a class appears in two experiences"
        assert set(test_exp.classes_in_this_experience) == classes
        assert {int(t) for t in train_exp.dataset.targets} == classes
        seen |= classes
    assert seen == set(range(n_classes))


def _solid_image(path: Path, r: int, g: int, size=(12, 10)) -> None:
    """A solid colour image: red encodes the class, green the item (decoded after transforms)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, (r, g, 128))
    if path.suffix.lower() in (".jpg", ".jpeg"):
        img.save(path, quality=100, subsampling=0)
    else:
        img.save(path)


def _red(k: int) -> int:
    return 20 + 50 * k


def _decode(x: torch.Tensor) -> tuple[int, int]:
    """Class and item index back from a solid image tensor in [0, 1]."""
    r, g = (x[0].mean() * 255).item(), (x[1].mean() * 255).item()
    return round((r - 20) / 50), round((g - 20) / 30)


def _image_folder(split_dir: Path, classes, n_per_class: int, ext: str = ".jpg") -> None:
    for k, name in enumerate(classes):
        for i in range(n_per_class):
            _solid_image(split_dir / name / f"img_{i}{ext}", _red(k), 20 + 30 * i)


WNIDS4 = ["n01000001", "n01000002", "n01000003", "n01000004"]

# ------------------------------------------------------------------------------------------
# split_digits
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("image_size", [8, 16])
def test_split_digits_shapes_and_range(channels, image_size):
    bench = split_digits(n_experiences=5, image_size=image_size, channels=channels, seed=0)
    assert bench.n_classes == 10 and len(bench.train_stream) == 5
    x, _y = _stream_tensors(bench.train_stream, limit=20)
    assert x.shape[1:] == (channels, image_size, image_size)
    assert x.min() >= 0 and x.max() <= 1 and x.max() > 0.5
    if channels == 3:
        assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])


@pytest.mark.parametrize("n_experiences", [2, 5, 10])
def test_split_digits_classes_disjoint_and_complete(n_experiences):
    bench = split_digits(n_experiences=n_experiences, seed=3)
    assert len(bench.train_stream) == n_experiences
    _check_class_partition(bench, 10)


def test_split_digits_stratified_split_sizes():
    bench = split_digits(n_experiences=10, seed=0, test_size=0.3)
    n_train = [len(e.dataset) for e in bench.train_stream]
    n_test = [len(e.dataset) for e in bench.test_stream]
    assert sum(n_train) + sum(n_test) == 1797
    assert sum(n_test) == 540  # ceil(0.3 * 1797)
    for tr, te in zip(n_train, n_test):  # every class keeps ~30 % of its images for test
        assert abs(te - 0.3 * (tr + te)) <= 1.0


def test_split_digits_deterministic_by_seed():
    a, b = split_digits(seed=7), split_digits(seed=7)
    assert a.classes_order == b.classes_order
    xa, ya = _stream_tensors(a.train_stream, limit=30)
    xb, yb = _stream_tensors(b.train_stream, limit=30)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    c = split_digits(seed=8)
    assert c.classes_order != a.classes_order


def test_split_digits_explicit_class_order():
    order = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    bench = split_digits(n_experiences=5, class_order=order)
    assert list(bench.classes_order) == order
    assert set(bench.train_stream[0].classes_in_this_experience) == {9, 8}
    assert set(bench.train_stream[4].classes_in_this_experience) == {1, 0}


def test_split_digits_errors():
    with pytest.raises(ValueError, match="does not divide the 10 classes"):
        split_digits(n_experiences=3)
    with pytest.raises(ValueError, match="image_size must be >= 8"):
        split_digits(image_size=4)
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        split_digits(channels=2)
    with pytest.raises(ValueError, match="permutation of 0..9"):
        split_digits(class_order=[0, 1, 2])


# ------------------------------------------------------------------------------------------
# shared pieces
# ------------------------------------------------------------------------------------------


def test_stratified_split_sizes_and_seed():
    targets = [0] * 10 + [1] * 5 + [2] * 2
    tr, te = stratified_split(targets, test_fraction=0.2, seed=0)
    y = np.asarray(targets)
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(len(targets)))
    assert [int((y[te] == c).sum()) for c in range(3)] == [2, 1, 1]  # >= 1 per class
    tr2, te2 = stratified_split(targets, test_fraction=0.2, seed=0)
    assert np.array_equal(te, te2) and np.array_equal(tr, tr2)
    assert any(
        not np.array_equal(te, stratified_split(targets, test_fraction=0.2, seed=s)[1])
        for s in range(1, 4)
    )
    with pytest.raises(ValueError, match="test_fraction must be in"):
        stratified_split(targets, test_fraction=1.0, seed=0)
    with pytest.raises(ValueError, match="needs >= 2"):
        stratified_split([0, 0, 1], test_fraction=0.5, seed=0)


def test_image_path_dataset_is_lazy_and_rgb(tmp_path):
    lazy = ImagePathDataset(paths=[tmp_path / "not_there.jpg"], targets=[0], classes=["a"])
    assert lazy.targets == [0] and len(lazy) == 1  # no file is opened before an item is read
    grey = tmp_path / "grey.png"
    Image.new("L", (5, 4), 200).save(grey)
    img, y = ImagePathDataset(paths=[grey], targets=[1], classes=["a", "b"])[0]
    assert img.mode == "RGB" and img.size == (5, 4) and y == 1
    with pytest.raises(ValueError, match="outside range"):
        ImagePathDataset(paths=[grey], targets=[2], classes=["a", "b"])


def test_default_image_transforms():
    img = Image.new("RGB", (30, 20), (255, 0, 0))
    train, test = default_image_transforms(16)
    for t in (train, test):
        x = t(img)
        assert x.shape == (3, 16, 16) and x.min() >= 0 and x.max() <= 1
    _, test_norm = default_image_transforms(16, normalize=True)
    assert test_norm(img)[1].max() < 0  # green 0 -> (0 - mean) / std
    with pytest.raises(ValueError, match="image_size"):
        default_image_transforms(0)


# ------------------------------------------------------------------------------------------
# CIFAR-100 (torchvision's pickle format, 100 classes x 1 image per split)
# ------------------------------------------------------------------------------------------


def test_icarl_class_order_matches_reference_and_keeps_global_state():
    state = np.random.get_state()
    order = icarl_class_order()
    assert np.array_equal(np.random.get_state()[1], state[1])
    np.random.seed(1993)
    assert order == np.random.permutation(100).tolist()


def test_split_cifar100_genifer_protocol(cifar_root):
    bench = split_cifar100(cifar_root)
    order = icarl_class_order()
    assert list(bench.classes_order) == order
    sizes = [len(e.classes_in_this_experience) for e in bench.train_stream]
    assert sizes == [50, 10, 10, 10, 10, 10]
    assert set(bench.train_stream[0].classes_in_this_experience) == set(order[:50])
    assert set(bench.train_stream[1].classes_in_this_experience) == set(order[50:60])
    _check_class_partition(bench, 100)
    x, y = _stream_tensors(bench.test_stream)
    assert x.shape == (100, 3, 32, 32)
    assert torch.allclose(x, (2 * y.float() / 255).view(-1, 1, 1, 1).expand_as(x), atol=1e-6)
    xt, _ = _stream_tensors(bench.train_stream, limit=5)  # random crop with padding + flip
    assert xt.shape[1:] == (3, 32, 32) and xt.min() >= 0 and xt.max() <= 1


def test_split_cifar100_other_orders(cifar_root):
    a = split_cifar100(
        cifar_root, n_experiences=10, first_experience_classes=None, class_order=None, seed=0
    )
    assert [len(e.classes_in_this_experience) for e in a.train_stream] == [10] * 10
    b = split_cifar100(
        cifar_root, n_experiences=10, first_experience_classes=None, class_order=None, seed=0
    )
    c = split_cifar100(
        cifar_root, n_experiences=10, first_experience_classes=None, class_order=None, seed=1
    )
    assert a.classes_order == b.classes_order != c.classes_order
    explicit = list(range(99, -1, -1))
    d = split_cifar100(
        cifar_root, n_experiences=2, first_experience_classes=None, class_order=explicit
    )
    assert list(d.classes_order) == explicit
    e = split_cifar100(cifar_root, normalize=True)
    x, _ = _stream_tensors(e.test_stream, limit=1)
    assert x.min() < 0  # mean/std normalisation applied


def test_split_cifar100_errors(tmp_path, cifar_root):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=r"(?s)root does not exist.*nowhere.*download=True"):
        split_cifar100(missing)
    (cifar_root / "cifar-100-python" / "meta").unlink()
    with pytest.raises(FileNotFoundError, match=r"(?s)missing meta.*cifar-100-python/"):
        split_cifar100(cifar_root)
    with pytest.raises(ValueError, match="first_experience_classes=50 and n_experiences=7"):
        split_cifar100(cifar_root, n_experiences=7)
    with pytest.raises(ValueError, match=r"n_experiences=7 does not divide the 100 classes"):
        split_cifar100(cifar_root, n_experiences=7, first_experience_classes=None)
    with pytest.raises(ValueError, match="unknown class_order 'icarll'"):
        split_cifar100(cifar_root, class_order="icarll")


def test_split_cifar100_checksum_and_class_count(tmp_path, monkeypatch):
    write_cifar100(tmp_path)  # torchvision's real MD5 table: these files fail it
    with pytest.raises(ValueError, match=r"(?s)MD5.*download=True"):
        split_cifar100(tmp_path)
    md5 = write_cifar100(tmp_path / "small", n_classes=4)
    monkeypatch.setattr(CIFAR100, "train_list", [["train", md5["train"]]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", md5["test"]]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": md5["meta"]})
    with pytest.raises(ValueError, match="found 4 classes, expected 100"):
        split_cifar100(tmp_path / "small")
    bench = split_cifar100(
        tmp_path / "small",
        expected_classes=4,
        n_experiences=3,
        first_experience_classes=2,
        class_order=None,
    )
    assert [len(e.classes_in_this_experience) for e in bench.train_stream] == [2, 1, 1]


# ------------------------------------------------------------------------------------------
# CUB-200-2011
# ------------------------------------------------------------------------------------------

CUB_CLASS_IDS = [2, 5, 7, 11]  # non-contiguous on purpose: labels are their ranks


def _write_cub(root: Path) -> Path:
    base = root / "CUB_200_2011"
    images, labels, split, classes = [], [], [], []
    image_id = 1
    for k, cid in enumerate(CUB_CLASS_IDS):
        folder = f"{cid:03d}.Bird_{cid}"
        classes.append(f"{cid} {folder}")
        for i in range(3):
            rel = f"{folder}/Bird_{cid}_{i}.jpg"
            _solid_image(base / "images" / rel, _red(k), 20 + 30 * i)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {cid}")
            split.append(f"{image_id} {int(i < 2)}")
            image_id += 1
    for name, lines in (
        ("images.txt", images),
        ("image_class_labels.txt", labels),
        ("train_test_split.txt", split),
        ("classes.txt", classes),
    ):
        (base / name).write_text("\n".join(lines) + "\n")
    return base


def test_split_cub200_reads_official_layout(tmp_path):
    base = _write_cub(tmp_path)
    for root in (tmp_path, base):  # the parent or CUB_200_2011/ itself
        bench = split_cub200(root, n_experiences=2, image_size=8, expected_classes=4, seed=0)
        assert bench.n_classes == 4
        _check_class_partition(bench, 4)
        x, y = _stream_tensors(bench.test_stream)
        assert x.shape == (4, 3, 8, 8) and sorted(y.tolist()) == [0, 1, 2, 3]
        assert [_decode(xi)[0] for xi in x] == y.tolist()  # label k is the k-th class id
        assert all(_decode(xi)[1] == 2 for xi in x)  # flag 0 (test) was the third image
        xt, yt = _stream_tensors(bench.train_stream)
        assert xt.shape == (8, 3, 8, 8) and [_decode(xi)[0] for xi in xt] == yt.tolist()


def test_split_cub200_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)root does not exist.*images.txt"):
        split_cub200(tmp_path / "nope", expected_classes=4, n_experiences=2)
    base = _write_cub(tmp_path)
    with pytest.raises(ValueError, match=r"found 4 classes, expected 200"):
        split_cub200(tmp_path)
    with pytest.raises(ValueError, match=r"n_experiences=3 does not divide the 4 classes"):
        split_cub200(tmp_path, expected_classes=4, n_experiences=3)
    lines = (base / "images.txt").read_text().splitlines()
    (base / "images.txt").write_text("\n".join([lines[0], "two bad", *lines[2:]]))
    with pytest.raises(ValueError, match=r"images.txt:2: expected '<id> <value>'"):
        split_cub200(tmp_path, expected_classes=4, n_experiences=2)
    (base / "images.txt").write_text("\n".join(lines))
    (base / "images" / lines[0].split()[1]).unlink()
    with pytest.raises(FileNotFoundError, match="1 image files listed in images.txt are missing"):
        split_cub200(tmp_path, expected_classes=4, n_experiences=2)
    (base / "train_test_split.txt").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"(?s)missing train_test_split.txt.*Expected layout"
    ):
        split_cub200(tmp_path, expected_classes=4, n_experiences=2)


# ------------------------------------------------------------------------------------------
# Mini-ImageNet
# ------------------------------------------------------------------------------------------


def test_split_mini_imagenet_labels_follow_sorted_wnids(tmp_path):
    _image_folder(tmp_path / "train", WNIDS4, 2)
    _image_folder(tmp_path / "val", WNIDS4, 1)  # val/ accepted for test/
    bench = split_mini_imagenet(tmp_path, n_experiences=2, image_size=8, expected_classes=4)
    _check_class_partition(bench, 4)
    x, y = _stream_tensors(bench.test_stream)
    assert x.shape == (4, 3, 8, 8) and [_decode(xi)[0] for xi in x] == y.tolist()
    loader = DataLoader(bench.train_stream[0].dataset, batch_size=4)
    xb, yb, tb = next(iter(loader))
    assert xb.shape == (4, 3, 8, 8) and tb.eq(0).all()
    assert [_decode(xi)[0] for xi in xb] == yb.tolist()


def test_split_mini_imagenet_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)root does not exist.*train/"):
        split_mini_imagenet(tmp_path / "nope")
    _image_folder(tmp_path / "train", WNIDS4, 2)
    with pytest.raises(FileNotFoundError, match=r"missing test/ \(or val/\)"):
        split_mini_imagenet(tmp_path, n_experiences=2, expected_classes=4)
    _image_folder(tmp_path / "test", WNIDS4 + ["n09999999"], 1)
    with pytest.raises(ValueError, match="has class folders that .* lacks: n09999999"):
        split_mini_imagenet(tmp_path, n_experiences=2, expected_classes=4)
    for f in (tmp_path / "test" / "n09999999").iterdir():
        f.unlink()
    (tmp_path / "test" / "n09999999").rmdir()
    with pytest.raises(ValueError, match="found 4 classes, expected 100"):
        split_mini_imagenet(tmp_path, n_experiences=2)
    with pytest.raises(ValueError, match="n_experiences=20 does not divide the 6 classes"):
        split_mini_imagenet(tmp_path, expected_classes=6)
    (tmp_path / "train" / "n01000005").mkdir()
    with pytest.raises(ValueError, match=r"n01000005 has no image files"):
        split_mini_imagenet(tmp_path, n_experiences=5, expected_classes=5)


# ------------------------------------------------------------------------------------------
# ImageNet-R
# ------------------------------------------------------------------------------------------


def test_split_imagenet_r_seeded_stratified_split(tmp_path):
    _image_folder(tmp_path / "imagenet-r", WNIDS4, 5)

    def items(bench):
        return {
            s: [_decode(xi) for xi in _stream_tensors(getattr(bench, s))[0]]
            for s in ("train_stream", "test_stream")
        }

    bench = split_imagenet_r(
        tmp_path, n_experiences=4, image_size=8, expected_classes=4, test_fraction=0.2, seed=0
    )
    _check_class_partition(bench, 4)
    a = items(bench)
    assert len(a["train_stream"]) == 16 and len(a["test_stream"]) == 4
    assert sorted(k for k, _ in a["test_stream"]) == [0, 1, 2, 3]  # one test image per class
    assert set(a["train_stream"]).isdisjoint(a["test_stream"])
    assert set(a["train_stream"]) | set(a["test_stream"]) == {
        (k, i) for k in range(4) for i in range(5)
    }
    same = items(
        split_imagenet_r(tmp_path, n_experiences=4, image_size=8, expected_classes=4, seed=0)
    )
    assert sorted(same["test_stream"]) == sorted(a["test_stream"])
    other = [
        sorted(
            items(
                split_imagenet_r(
                    tmp_path, n_experiences=4, image_size=8, expected_classes=4, seed=s
                )
            )["test_stream"]
        )
        for s in (1, 2)
    ]
    assert any(o != sorted(a["test_stream"]) for o in other)


def test_split_imagenet_r_other_layouts(tmp_path):
    flat = tmp_path / "flat"
    _image_folder(flat, WNIDS4, 3)  # class folders directly under root
    bench = split_imagenet_r(
        flat, n_experiences=2, image_size=8, expected_classes=4, test_fraction=0.34
    )
    assert sum(len(e.dataset) for e in bench.test_stream) == 4
    presplit = tmp_path / "presplit"
    _image_folder(presplit / "train", WNIDS4, 3)
    _image_folder(presplit / "test", WNIDS4, 2)
    bench = split_imagenet_r(presplit, n_experiences=2, image_size=8, expected_classes=4)
    assert sum(len(e.dataset) for e in bench.train_stream) == 12
    assert sum(len(e.dataset) for e in bench.test_stream) == 8


def test_split_imagenet_r_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)root does not exist.*imagenet-r/"):
        split_imagenet_r(tmp_path / "nope")
    _solid_image(tmp_path / "loose.jpg", 0, 0)
    with pytest.raises(ValueError, match=r"(?s)no class folders.*1 image files"):
        split_imagenet_r(tmp_path, n_experiences=2, expected_classes=4)
    _image_folder(tmp_path / "imagenet-r", WNIDS4, 1)
    with pytest.raises(ValueError, match="needs >= 2"):
        split_imagenet_r(tmp_path, n_experiences=2, expected_classes=4)
    with pytest.raises(ValueError, match="test_fraction must be in"):
        split_imagenet_r(tmp_path, n_experiences=2, expected_classes=4, test_fraction=0.0)
    with pytest.raises(ValueError, match="n_experiences=3 does not divide the 200 classes"):
        split_imagenet_r(tmp_path, n_experiences=3)


# ------------------------------------------------------------------------------------------
# FG-ImageNet
# ------------------------------------------------------------------------------------------


def test_fg_imagenet_packaged_wnids():
    wnids = fg_imagenet_wnids()
    assert len(wnids) == 100 == len(set(wnids))
    assert all(w.startswith("n") and len(w) == 9 and w[1:].isdigit() for w in wnids)


def test_split_fg_imagenet_label_order_is_list_order(tmp_path):
    wnids = fg_imagenet_wnids()
    chosen = [wnids[3], wnids[0], wnids[2], wnids[1]]  # not sorted: list order must win
    _image_folder(tmp_path / "train", chosen, 2, ext=".JPEG")
    _image_folder(tmp_path / "val", chosen, 1, ext=".JPEG")
    _image_folder(tmp_path / "train", ["n09999999"], 1, ext=".JPEG")  # not listed: ignored
    bench = split_fg_imagenet(tmp_path, wnids=chosen, n_experiences=2, image_size=8)
    assert list(bench.classes_order) == [0, 1, 2, 3]
    assert set(bench.train_stream[0].classes_in_this_experience) == {0, 1}
    x, y = _stream_tensors(bench.test_stream)
    assert [_decode(xi)[0] for xi in x] == y.tolist()  # label = position in `chosen`
    assert sum(len(e.dataset) for e in bench.train_stream) == 8
    shuffled = split_fg_imagenet(
        tmp_path, wnids=chosen, n_experiences=2, image_size=8, class_order=None, seed=1
    )
    assert sorted(shuffled.classes_order) == [0, 1, 2, 3]


def test_split_fg_imagenet_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)root does not exist.*ILSVRC2012"):
        split_fg_imagenet(tmp_path / "nope")
    chosen = fg_imagenet_wnids()[:4]
    _image_folder(tmp_path / "train", chosen[:3], 1, ext=".JPEG")
    with pytest.raises(FileNotFoundError, match=r"missing val/ \(or test/\)"):
        split_fg_imagenet(tmp_path, wnids=chosen, n_experiences=2)
    for i in range(3):  # ImageNet's val/ as shipped: flat, not sorted into wnid folders
        _solid_image(tmp_path / "val" / f"ILSVRC2012_val_{i:08d}.JPEG", 0, 0)
    with pytest.raises(FileNotFoundError, match=f"1 of 4 class folders missing .*{chosen[3]}"):
        split_fg_imagenet(tmp_path, wnids=chosen, n_experiences=2)
    _image_folder(tmp_path / "train", chosen[3:], 1, ext=".JPEG")
    with pytest.raises(FileNotFoundError, match=r"(?s)4 of 4 class folders.*3 loose image files"):
        split_fg_imagenet(tmp_path, wnids=chosen, n_experiences=2)
    with pytest.raises(FileNotFoundError, match="96 of 100 class folders missing"):
        split_fg_imagenet(tmp_path)
    with pytest.raises(ValueError, match="n_experiences=3 does not divide the 4 classes"):
        split_fg_imagenet(tmp_path, wnids=chosen, n_experiences=3)
    with pytest.raises(ValueError, match="without repeats"):
        split_fg_imagenet(tmp_path, wnids=[chosen[0], chosen[0]], n_experiences=1)


def test_split_color_digits_is_coloured_seeded_and_class_incremental():
    from avalanche_d2l.scenarios import split_color_digits

    a, b = split_color_digits(seed=3), split_color_digits(seed=3)
    xa = a.train_stream[0].dataset[0][0]
    assert xa.shape == (3, 16, 16) and 0.0 <= float(xa.min()) and float(xa.max()) <= 1.0
    assert torch.equal(xa, b.train_stream[0].dataset[0][0])
    # colour differs between channels (not a repeated grey image)
    assert not torch.allclose(xa[0], xa[1])
    classes = [set(e.classes_in_this_experience) for e in a.train_stream]
    assert set().union(*classes) == set(range(10)) and sum(map(len, classes)) == 10
    assert split_color_digits(seed=4).classes_order != a.classes_order or not torch.equal(
        split_color_digits(seed=4).train_stream[0].dataset[0][0], xa
    )
