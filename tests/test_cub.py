"""CUB-200-2011: the shipped Genifer experiment (``genifer_cub200``) read from a tiny folder in the
official layout, through the installed command line, and our split against Avalanche's
``SplitCUB200`` on the same folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from avalanche_d2l.cli import main
from avalanche_d2l.experiments import load_experiment
from avalanche_d2l.experiments.builders import build_benchmark
from avalanche_d2l.scenarios import split_cub200

torch.set_num_threads(1)


def _write_cub(root: Path, n_classes: int, per_class: int = 2, size=(12, 10)) -> Path:
    """``root/CUB_200_2011/`` with ``n_classes`` classes of ``per_class`` distinct noise images
    (the last of each class is a test image), the four text files and ``bounding_boxes.txt``
    (Avalanche's ``CUB200`` needs it) with boxes covering the whole image."""
    base = root / "CUB_200_2011"
    rng = np.random.default_rng(0)
    images, labels, split, boxes, classes = [], [], [], [], []
    image_id = 1
    for cid in range(1, n_classes + 1):
        folder = f"{cid:03d}.Bird_{cid}"
        classes.append(f"{cid} {folder}")
        (base / "images" / folder).mkdir(parents=True)
        for i in range(per_class):
            rel = f"{folder}/Bird_{cid}_{i}.png"
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(base / "images" / rel)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {cid}")
            split.append(f"{image_id} {int(i < per_class - 1)}")
            boxes.append(f"{image_id} 0.0 0.0 {size[0]}.0 {size[1]}.0")
            image_id += 1
    for name, lines in (
        ("images.txt", images),
        ("image_class_labels.txt", labels),
        ("train_test_split.txt", split),
        ("classes.txt", classes),
        ("bounding_boxes.txt", boxes),
    ):
        (base / name).write_text("\n".join(lines) + "\n")
    return base


@pytest.fixture(scope="module")
def cub_root(tmp_path_factory) -> Path:
    """All 200 classes, one train and one test image each: the shipped protocol, unchanged."""
    root = tmp_path_factory.mktemp("cub")
    _write_cub(root, 200)
    return root


def test_genifer_cub200_builds_the_papers_protocol_from_a_local_root(cub_root):
    """The file's benchmark on a CUB folder: 100 base classes then 5 tasks of 20, 224 px images
    normalised with ImageNet's statistics; its generator synthesises at 128 px and is resized to
    the 224 px input; the description gives a source (or 'paper silent') for the settings."""
    from avalanche_d2l.genifer import GeniferConfig
    from avalanche_d2l.genifer.parts import build_generator

    exp = load_experiment("genifer_cub200")
    assert "paper silent" in exp.description and "2106.05350" in exp.description
    bench = build_benchmark(exp.benchmark, str(cub_root), 0)
    sizes = [len(e.classes_in_this_experience) for e in bench.train_stream]
    assert sizes == [100, 20, 20, 20, 20, 20] and bench.n_classes == 200
    x, _, _ = bench.test_stream[0].dataset[0]
    assert x.shape == (3, 224, 224) and x.min() < 0  # normalised, not [0, 1]
    assert (exp.model.name, exp.model.feature_layer) == ("resnet18", "layer3")

    cfg = GeniferConfig.from_dict(exp.to_dict()["strategies"]["genifer"])
    gen = build_generator(cfg.generator, (3, 224, 224), 200, out_range=(-2.2, 2.7), seed=cfg.seed)
    assert gen.config.resolution == 128
    with torch.no_grad():
        out = gen(torch.randn(2, cfg.generator.z_dim), torch.tensor([0, 199]))
    assert out.shape == (2, 3, 224, 224)


def test_run_dry_run_of_genifer_cub200_on_a_tiny_folder(cub_root, tmp_path, capsys):
    """``avalanche-d2l run genifer_cub200 --data-root DIR --dry-run`` (the command line's entry
    point, in this process to skip a second import of torch and Avalanche; the minibatch cut to
    2 so the timed 224 px step is short) builds the benchmark, ResNet-18 and Genifer from the
    folder; a wrong root is one error that draws the layout."""
    args = ["run", "genifer_cub200", "--dry-run", "--device", "cpu", "--strategies", "genifer"]
    args += ["--batch-size", "2", "--no-progress", "--out", str(tmp_path / "o")]
    rc = main([*args, "--data-root", str(cub_root)])
    out, err = capsys.readouterr()
    assert rc == 0, err[-3000:]
    assert "1 run(s) of 6 experiences, image shape (3, 224, 224), device cpu" in out
    assert '"strategy": "genifer"' in out and "train_step_s" in out

    rc = main([*args, "--data-root", str(tmp_path / "no_cub")])
    err = capsys.readouterr().err
    assert rc == 2 and "split_cub200: root does not exist" in err and "images.txt" in err


def _experiences(bench) -> list[tuple[list[int], list[int], torch.Tensor]]:
    """Per experience of both streams: its classes, its targets and its images, in order."""
    out = []
    for stream in (bench.train_stream, bench.test_stream):
        for e in stream:
            items = [e.dataset[i] for i in range(len(e.dataset))]
            out.append(
                (
                    [int(c) for c in e.classes_in_this_experience],
                    [int(y) for _, y, *_ in items],
                    torch.stack([x for x, *_ in items]),
                )
            )
    return out


def _assert_same(ours, theirs) -> None:
    assert list(ours.classes_order) == list(theirs.classes_order)
    for (c1, y1, x1), (c2, y2, x2) in zip(_experiences(ours), _experiences(theirs), strict=True):
        assert c1 == c2 and y1 == y2
        assert torch.equal(x1, x2)  # the same files, in the same order


def test_split_cub200_is_the_split_of_avalanches_split_cub200(cub_root, tmp_path):
    """Our loader and Avalanche's ``SplitCUB200`` give the same experiences (classes, labels,
    images and their order) on the same folder: for the shipped protocol (100 + 5 x 20, class
    order seeded) and for an explicit class order with an equal split. The folder's boxes cover
    whole images: Avalanche crops to them, we do not."""
    from avalanche.benchmarks.classic import SplitCUB200

    tf = T.Compose([T.Resize((6, 6)), T.ToTensor()])
    ours = split_cub200(
        cub_root,
        n_experiences=6,
        first_experience_classes=100,
        seed=5,
        train_transform=tf,
        eval_transform=tf,
    )
    theirs = SplitCUB200(
        6,
        classes_first_batch=100,
        seed=5,
        shuffle=True,
        train_transform=tf,
        eval_transform=tf,
        dataset_root=cub_root,
    )
    assert list(ours.classes_order) != list(range(200))  # the seed did shuffle
    _assert_same(ours, theirs)

    small = tmp_path / "small"
    _write_cub(small, 6, per_class=3)
    order = [4, 0, 5, 2, 1, 3]
    ours = split_cub200(
        small,
        n_experiences=3,
        class_order=order,
        expected_classes=6,
        train_transform=tf,
        eval_transform=tf,
    )
    theirs = SplitCUB200(
        3,
        classes_first_batch=None,
        fixed_class_order=order,
        train_transform=tf,
        eval_transform=tf,
        dataset_root=small,
    )
    _assert_same(ours, theirs)


def test_first_experience_classes_must_split_the_rest_evenly(tmp_path):
    _write_cub(tmp_path, 6, per_class=2)
    bench = split_cub200(
        tmp_path, n_experiences=3, first_experience_classes=2, expected_classes=6, image_size=8
    )
    assert [len(e.classes_in_this_experience) for e in bench.train_stream] == [2, 2, 2]
    bench = split_cub200(
        tmp_path, n_experiences=2, first_experience_classes=4, expected_classes=6, image_size=8
    )
    assert [len(e.classes_in_this_experience) for e in bench.train_stream] == [4, 2]
    with pytest.raises(ValueError, match="first_experience_classes=3 and n_experiences=3"):
        split_cub200(tmp_path, n_experiences=3, first_experience_classes=3, expected_classes=6)
