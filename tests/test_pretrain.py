"""``fedmqtt pretrain --augment`` and ``--weight-decay`` (issue #11, the in-domain backbone): the random affine
views (:func:`fedmqtt.pretrain.random_affine`), the ``--augment`` spec, and the command on real IDX files with the
recipe recorded in the model file."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmqtt.errors import ConfigError
from fedmqtt.pretrain import Augment, random_affine


def _blob(size: int = 28, centre: tuple[int, int] = (14, 14)) -> torch.Tensor:
    image = torch.zeros(1, 1, size, size)
    image[0, 0, centre[0] - 2 : centre[0] + 2, centre[1] - 2 : centre[1] + 2] = 1.0
    return image


def _centre_of_mass(image: torch.Tensor) -> tuple[float, float]:
    plane = image[0, 0].clamp(min=0)
    rows, cols = torch.meshgrid(torch.arange(plane.shape[0]), torch.arange(plane.shape[1]), indexing="ij")
    total = float(plane.sum())
    return float((rows * plane).sum()) / total, float((cols * plane).sum()) / total


def test_augment_spec_parses_any_subset_and_refuses_what_it_cannot_use() -> None:
    assert Augment.parse(Augment.DEFAULT) == Augment() == Augment(rotate=10, shift=0.1, scale=0.1)
    assert Augment.parse("rotate=15") == Augment(rotate=15.0, shift=0.1, scale=0.1)
    assert Augment.parse(" shift=0.05 , scale=0 ") == Augment(rotate=10.0, shift=0.05, scale=0.0)
    with pytest.raises(ConfigError, match=r"^--augment: expected rotate=DEG,shift=F,scale=F .*got 'zoom=2'"):
        Augment.parse("rotate=5,zoom=2")
    with pytest.raises(ConfigError, match=r"^--augment: rotate must be a number, got 'ten'"):
        Augment.parse("rotate=ten")
    with pytest.raises(ConfigError, match=r"^--augment: scale must be between 0 and 0.9, got 1.5"):
        Augment.parse("scale=1.5")
    with pytest.raises(ConfigError, match=r"^--augment: shift must be between 0 and 1, got nan"):
        Augment(shift=math.nan)


@settings(max_examples=25, deadline=None)
@given(
    count=st.integers(1, 4),
    size=st.integers(8, 32),
    fill=st.floats(-1.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_no_rotation_shift_or_scale_is_the_identity(count: int, size: int, fill: float, seed: int) -> None:
    images = torch.rand(count, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 4 - 2
    out = random_affine(images, Augment(rotate=0, shift=0, scale=0), torch.Generator().manual_seed(seed), fill=fill)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert torch.allclose(out, images, atol=1e-5)


def test_views_are_drawn_per_image_from_the_generator_and_the_background_is_the_fill() -> None:
    fill = -0.4242  # MNIST's blank pixel once normalised
    images = _blob().repeat(64, 1, 1, 1) * 3.0 + fill
    first = random_affine(images, Augment(), torch.Generator().manual_seed(7), fill=fill)
    again = random_affine(images, Augment(), torch.Generator().manual_seed(7), fill=fill)
    other = random_affine(images, Augment(), torch.Generator().manual_seed(8), fill=fill)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert len({first[i].numpy().tobytes() for i in range(64)}) == 64  # every image its own view
    assert torch.allclose(first[:, :, 0, :], torch.full_like(first[:, :, 0, :], fill), atol=1e-6)  # edges stay blank


@pytest.mark.parametrize("shift", [0.0, 0.1, 0.2])
def test_the_shift_moves_an_image_by_at_most_its_fraction_of_the_size(shift: float) -> None:
    images = _blob().repeat(200, 1, 1, 1)
    out = random_affine(images, Augment(rotate=0, shift=shift, scale=0), torch.Generator().manual_seed(1))
    moves = np.array([np.subtract(_centre_of_mass(out[i : i + 1]), (13.5, 13.5)) for i in range(200)])
    limit = shift * 28
    assert np.abs(moves).max() <= limit + 0.05
    if shift:
        assert np.abs(moves).max() > 0.7 * limit  # drawn over the whole range, both axes, both signs
        assert (moves.min(axis=0) < 0).all() and (moves.max(axis=0) > 0).all()


def test_rotation_and_scale_keep_a_centred_blob_centred_and_scale_changes_its_mass() -> None:
    images = _blob().repeat(100, 1, 1, 1)
    rotated = random_affine(images, Augment(rotate=30, shift=0, scale=0), torch.Generator().manual_seed(2))
    for i in range(100):
        assert np.allclose(_centre_of_mass(rotated[i : i + 1]), (13.5, 13.5), atol=0.05)
    scaled = random_affine(images, Augment(rotate=0, shift=0, scale=0.3), torch.Generator().manual_seed(3))
    masses = scaled.sum(dim=(1, 2, 3)) / images[0].sum()
    assert 0.7**2 - 0.05 <= float(masses.min()) < 0.85 and 1.15 < float(masses.max()) <= 1.3**2 + 0.05


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedmqtt.data import write_idx_dataset

    return write_idx_dataset(tmp_path_factory.mktemp("idx"), num_train=200, num_test=300, seed=5)


def _pretrain(idx_dir: Path, out: Path, *flags: str) -> int:
    from fedmqtt.cli import main

    return main(["pretrain", "--model", "mlp", "--data-dir", str(idx_dir), "--public-slice", "100",
                 "--epochs", "3", "--lr", "0.02", "--out", str(out), *flags])  # fmt: skip


def test_pretrain_augment_records_its_recipe_is_reproducible_and_trains_on_other_views(
    idx_dir: Path, tmp_path: Path
) -> None:
    from fedmqtt.model_file import load_model_file

    assert _pretrain(idx_dir, tmp_path / "a", "--augment", "--weight-decay", "0.001") == 0
    assert _pretrain(idx_dir, tmp_path / "b", "--augment", "--weight-decay", "0.001") == 0
    assert _pretrain(idx_dir, tmp_path / "c", "--augment", "rotate=20,shift=0.05", "--weight-decay", "0.001") == 0
    assert _pretrain(idx_dir, tmp_path / "plain") == 0
    a, b, c, plain = (load_model_file(tmp_path / n) for n in ("a", "b", "c", "plain"))
    assert a.meta["augment"] == {"rotate": 10.0, "shift": 0.1, "scale": 0.1} and a.meta["weight_decay"] == 0.001
    assert c.meta["augment"] == {"rotate": 20.0, "shift": 0.05, "scale": 0.1}
    assert plain.meta["augment"] is None and plain.meta["weight_decay"] == 0.0
    assert a.digest == b.digest  # same seed: same views, same order, same weights
    assert a.digest != c.digest != plain.digest
    assert a.meta["train_images"] == 100 and a.meta["eval_images"] == 200  # the slice's own images, not the views
    assert a.meta["accuracy"] > 0.2  # above chance (0.1); an mlp on 3 epochs of moved synthetic images learns less


def test_pretrain_augment_blocks_of_epochs_cover_every_epoch(
    idx_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Views are held in memory a block at a time; splitting the epochs into blocks trains on all of them."""
    import fedmqtt.pretrain as pretrain_module
    import fedmqtt.training as training

    seen: list[int] = []
    real = training.train_local

    def counting(net: torch.nn.Module, dataset: object, **kwargs: object) -> object:
        seen.append(len(dataset))  # type: ignore[arg-type]
        return real(net, dataset, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pretrain_module, "VIEWS_PER_BLOCK", 250)  # 2 epochs of 100 images a block
    monkeypatch.setattr(training, "train_local", counting)
    assert _pretrain(idx_dir, tmp_path / "m", "--augment", "--epochs", "5") == 0
    assert seen == [200, 200, 100]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--augment", "tilt=3"), r"--augment: expected rotate=DEG,shift=F,scale=F"),
        (("--augment", "rotate=200"), r"--augment: rotate must be between 0 and 180, got 200"),
        (("--weight-decay", "-1"), r"--weight-decay: must be 0 or more, got -1"),
    ],
)
def test_pretrain_refuses_a_bad_augment_or_weight_decay_before_training(
    idx_dir: Path, tmp_path: Path, flags: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _pretrain(idx_dir, tmp_path / "m", *flags) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "m").exists()
