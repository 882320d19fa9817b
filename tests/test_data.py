import gzip

import numpy as np
import pytest
import torch

from switch_dit.data import DataError, DigitsDataset, FashionMNIST, ImageFolderDataset, center_crop_arr
from switch_dit.data.datasets import FASHION_MNIST_DEFAULT, read_idx


def _write_idx(path, arr: np.ndarray, truncate: int = 0):
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    with gzip.open(path, "wb") as f:
        f.write(data[: len(data) - truncate])


def test_idx_reader_and_fashion_mnist_from_any_folder(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    labels = np.array([0, 1, 2, 3, 9])
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    assert np.array_equal(read_idx(tmp_path / "train-images-idx3-ubyte.gz"), imgs)
    ds = FashionMNIST(tmp_path, image_size=32)
    assert len(ds) == 5 and ds.shape == (1, 32, 32)
    x, y = ds[4]
    assert y == 9
    assert torch.allclose(x[0, 2:30, 2:30], torch.from_numpy(imgs[4]).float() / 127.5 - 1)
    assert (x[0, :2] == -1).all()  # padded with black
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", imgs, truncate=10)
    with pytest.raises(DataError, match="truncated"):
        FashionMNIST(tmp_path)


def test_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        FashionMNIST(tmp_path)


def test_installed_fashion_mnist():
    """The Debian package that .ci/run installs: 60,000 training images, 6,000 per class."""
    ds = FashionMNIST(FASHION_MNIST_DEFAULT, "train", 32)
    assert len(ds) == 60000 and ds.shape == (1, 32, 32)
    assert torch.bincount(ds.labels).tolist() == [6000] * 10
    assert ds.images.min() == -1 and ds.images.max() == 1
    test = FashionMNIST(FASHION_MNIST_DEFAULT, "test", 28)
    assert len(test) == 10000 and test.shape == (1, 28, 28)


def test_digits():
    ds = DigitsDataset(8)
    assert len(ds) == 1797 and ds.shape == (1, 8, 8) and ds.num_classes == 10
    assert ds.images.min() >= -1 and ds.images.max() <= 1
    assert DigitsDataset(16).shape == (1, 16, 16)


def test_center_crop_matches_adm_recipe():
    from PIL import Image

    img = Image.fromarray(np.arange(300 * 200 * 3, dtype=np.uint32).reshape(200, 300, 3).astype(np.uint8))
    out = center_crop_arr(img, 64)
    assert out.shape == (64, 64, 3)
    # short side 200 >= 2*64: one box halving to 150x100, then bicubic to 96x64, centre crop of 64 columns
    half = img.resize((150, 100), resample=Image.BOX).resize((96, 64), resample=Image.BICUBIC)
    assert np.array_equal(out, np.array(half)[:, 16:80])


def test_image_folder_classes_flat_and_modes(tmp_path):
    from PIL import Image

    for c in ("b_dog", "a_cat"):
        (tmp_path / "cls" / c).mkdir(parents=True)
    Image.new("L", (10, 12), 128).save(tmp_path / "cls" / "a_cat" / "grey.png")
    Image.new("RGBA", (12, 12), (255, 0, 0, 10)).save(tmp_path / "cls" / "b_dog" / "rgba.png")
    Image.new("P", (12, 12)).save(tmp_path / "cls" / "b_dog" / "pal.gif")
    ds = ImageFolderDataset(tmp_path / "cls", 8)
    assert ds.class_names == ["a_cat", "b_dog"] and len(ds) == 3
    xs = [ds[i] for i in range(3)]
    assert all(x.shape == (3, 8, 8) for x, _ in xs) and [y for _, y in xs] == [0, 1, 1]
    assert torch.allclose(xs[2][0][0], torch.ones(8, 8))  # red channel of the RGBA image (files sort by name)
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (9, 9)).save(tmp_path / "flat" / "x.jpg")
    flat = ImageFolderDataset(tmp_path / "flat", 8)
    assert flat.num_classes == 1 and flat[0][1] == 0
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderDataset(tmp_path / "none", 8)


def test_image_folder_deep_and_float_images_keep_their_grey_and_odd_layouts_are_refused(tmp_path, monkeypatch):
    """16-bit, 32-bit integer and float grey images read as the same mid grey as an 8-bit one (PIL's conversion
    clipped 16-bit mid grey to white and float 0-1 to black); hidden folders are not classes; a class folder without
    images, or images beside class folders, are one-line errors; a decompression-bomb header is a corrupt image."""
    from PIL import Image

    root = tmp_path / "deep"
    root.mkdir()
    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(root / "a8.png")
    Image.fromarray(np.full((8, 8), 128 * 257, np.uint16)).save(root / "b16.png")
    Image.fromarray(np.full((8, 8), 128 * 257, np.int32)).save(root / "c32.tiff")
    Image.fromarray(np.full((8, 8), 128 / 255, np.float32)).save(root / "d01.tiff")
    ds = ImageFolderDataset(root, 8)
    assert [Image.open(f).mode for f, _ in ds.files] == ["L", "I;16", "I", "F"]
    first = ds[0][0]
    for i in range(1, 4):
        assert torch.equal(ds[i][0], first), ds.files[i][0].name
    # the range is the mode's, not guessed per image: a float image beyond 0-1 is refused, not rescaled
    Image.fromarray(np.full((8, 8), 128.0, np.float32)).save(root / "e255.tiff")
    with pytest.raises(DataError, match="F-mode image with values outside 0-1"):
        ImageFolderDataset(root, 8)[4]

    cls = tmp_path / "cls"
    for d in ("a", "a/.ipynb_checkpoints", ".git"):
        (cls / d).mkdir(parents=True)
    for f in ("a/x.png", "a/.ipynb_checkpoints/x.png", ".git/x.png"):
        Image.new("L", (8, 8)).save(cls / f)
    ds = ImageFolderDataset(cls, 8)
    assert ds.class_names == ["a"] and len(ds) == 1
    (cls / "b_empty").mkdir()
    with pytest.raises(DataError, match="class folder\\(s\\) 'b_empty' in .* hold no images"):
        ImageFolderDataset(cls, 8)
    (cls / "b_empty").rmdir()
    Image.new("L", (8, 8)).save(cls / "loose.png")
    with pytest.raises(DataError, match="1 image\\(s\\) outside them, e.g. 'loose.png'"):
        ImageFolderDataset(cls, 8)

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # an 8x8 image is then over twice the limit: a "bomb"
    with pytest.raises(DataError, match="corrupt or unreadable image .*a8.png.*exceeds limit.*--skip-corrupt"):
        ImageFolderDataset(root, 8)[0]
