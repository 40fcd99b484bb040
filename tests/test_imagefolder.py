"""ImageFolder device data (fedmqtt.imagefolder): PNGs written from IDX images load as exactly the IDX samples;
explicit class mapping; resizing and RGB for other models; clear errors for folders that are not class folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedmqtt.data import load_dataset, read_idx_file, write_idx_dataset
from fedmqtt.imagefolder import ImageFolderError, class_folders, is_imagefolder, load_imagefolder

# torchvision 0.29 deprecates its image decoders (in favour of TorchCodec) with a warning per image.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")


def write_imagefolder(
    idx_dir: Path, out: Path, *, train: bool = False, classes: tuple[int, ...] | None = None, limit: int | None = None
) -> Path:
    """Every image of an IDX split (the first ``limit``) as ``out/LABEL/NNNNN.png`` (uint8 gray, lossless), optionally
    only ``classes``."""
    from PIL import Image

    stem = "train" if train else "t10k"
    images = read_idx_file(next(idx_dir.glob(f"{stem}-images-idx3-ubyte*")), 3)
    labels = read_idx_file(next(idx_dir.glob(f"{stem}-labels-idx1-ubyte*")), 1)
    for index, (image, label) in enumerate(zip(images[:limit], labels[:limit], strict=True)):
        if classes is not None and int(label) not in classes:
            continue
        folder = out / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(image), mode="L").save(folder / f"{index:05d}.png")
    return out


@pytest.fixture(scope="module")
def idx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_idx_dataset(tmp_path_factory.mktemp("idx"), num_train=50, num_test=120, seed=4)


def _imagefolder_order(idx_dir: Path, classes: tuple[int, ...] | None = None) -> np.ndarray:
    """The IDX indices in ImageFolder's order: by class folder, then file name (= index)."""
    labels = read_idx_file(next(idx_dir.glob("t10k-labels-idx1-ubyte*")), 1).astype(np.int64)
    keep = [i for i in range(len(labels)) if classes is None or labels[i] in classes]
    return np.array(sorted(keep, key=lambda i: (str(labels[i]), i)), dtype=np.int64)


def test_pngs_of_idx_images_load_as_exactly_the_idx_samples(idx: Path, tmp_path: Path) -> None:
    folder = write_imagefolder(idx, tmp_path / "cam")
    loaded = load_imagefolder(folder, dataset="mnist")
    expected = load_dataset("mnist", idx, train=False).subset(_imagefolder_order(idx))
    assert loaded.images.shape == expected.images.shape == (120, 1, 28, 28)
    assert torch.equal(loaded.images, expected.images)  # bit for bit: uint8 gray survives PNG
    assert torch.equal(loaded.labels, expected.labels)
    fashion = load_imagefolder(folder, dataset="fashion-mnist")
    assert torch.equal(
        fashion.images, load_dataset("fashion-mnist", idx, train=False).subset(_imagefolder_order(idx)).images
    )


def test_a_camera_with_some_classes_keeps_their_indices(idx: Path, tmp_path: Path) -> None:
    folder = write_imagefolder(idx, tmp_path / "cam", classes=(3, 7))
    assert class_folders(folder) == {"3": 3, "7": 7}  # not ImageFolder's {"3": 0, "7": 1}
    loaded = load_imagefolder(folder)
    assert set(loaded.labels.tolist()) == {3, 7}
    expected = load_dataset("mnist", idx, train=False).subset(_imagefolder_order(idx, (3, 7)))
    assert torch.equal(loaded.labels, expected.labels) and torch.equal(loaded.images, expected.images)
    assert loaded.label_counts()[[3, 7]].sum() == len(loaded)


def test_other_models_get_rgb_resized_inputs_and_jpeg_is_read(idx: Path, tmp_path: Path) -> None:
    from PIL import Image

    folder = write_imagefolder(idx, tmp_path / "cam", classes=(1,))
    Image.new("RGB", (30, 40), (200, 200, 200)).save(folder / "1" / "zz-photo.jpg")
    small = load_imagefolder(folder)
    assert small.images.shape[1:] == (1, 28, 28)  # the JPEG was resized to the model's input
    big = load_imagefolder(folder, input_shape=(3, 56, 56))
    assert big.images.shape == (len(small), 3, 56, 56)
    assert torch.allclose(big.images[-1], torch.full((3, 56, 56), (200 / 255 - 0.1307) / 0.3081), atol=0.05)


def test_auto_detection_tells_image_folders_from_idx_directories(idx: Path, tmp_path: Path) -> None:
    assert not is_imagefolder(idx)
    assert is_imagefolder(write_imagefolder(idx, tmp_path / "cam", classes=(0,)))
    (tmp_path / "empty" / "0").mkdir(parents=True)
    assert not is_imagefolder(tmp_path / "empty")


def test_bad_folders_are_refused_with_what_to_do(idx: Path, tmp_path: Path) -> None:
    named = write_imagefolder(idx, tmp_path / "named", classes=(2,))
    (named / "2").rename(named / "cats")
    (named / "dogs").mkdir()
    with pytest.raises(ImageFolderError, match=r"'cats', 'dogs' do not name a class.*0\.\.9"):
        load_imagefolder(named)
    for name in ("10", "07", "-1"):
        odd = tmp_path / f"odd{name}" / name
        odd.mkdir(parents=True)
        with pytest.raises(ImageFolderError, match="do not name a class"):
            class_folders(odd.parent)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    with pytest.raises(ImageFolderError, match="has no class folders"):
        load_imagefolder(tmp_path / "flat")
    (tmp_path / "nofiles" / "4").mkdir(parents=True)
    (tmp_path / "nofiles" / "4" / "notes.txt").write_text("x")
    with pytest.raises(ImageFolderError, match="Found no valid file"):
        load_imagefolder(tmp_path / "nofiles")
    broken = write_imagefolder(idx, tmp_path / "broken", classes=(5,))
    (broken / "5" / "zz.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ImageFolderError, match=r"zz\.png is not a readable PNG or JPEG"):
        load_imagefolder(broken)
    with pytest.raises(ImageFolderError, match="is not a directory"):
        load_imagefolder(tmp_path / "missing")


MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


@pytest.mark.slow
def test_real_mnist_test_images_as_pngs_load_as_the_idx_samples(tmp_path: Path) -> None:
    assert MNIST.is_dir(), f"real MNIST files expected in {MNIST} (see shared/data/SOURCES.md)"
    folder = write_imagefolder(MNIST, tmp_path / "cam", limit=2000)
    loaded = load_imagefolder(folder)
    labels = read_idx_file(next(MNIST.glob("t10k-labels-idx1-ubyte*")), 1)[:2000].astype(np.int64)
    order = np.array(sorted(range(2000), key=lambda i: (str(labels[i]), i)))
    expected = load_dataset("mnist", MNIST, train=False).subset(order)
    assert torch.equal(loaded.images, expected.images) and torch.equal(loaded.labels, expected.labels)
    assert set(loaded.labels.tolist()) == set(range(10))


def test_the_device_command_names_a_bad_image_folder_before_connecting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedmqtt.cli import main

    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "a.png").write_bytes(b"x")
    base = ["device", "--broker", "mqtt://127.0.0.1:1", "--job", "j", "--id", "cam"]
    assert main([*base, "--data-dir", str(tmp_path)]) == 1  # auto: class folders of images -> imagefolder
    assert "'cats' do not name a class" in capsys.readouterr().err
    assert main([*base, "--data-format", "imagefolder"]) == 1
    assert "imagefolder needs --data-dir" in capsys.readouterr().err
