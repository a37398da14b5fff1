"""Data sets: toy2d, digits, a fake CIFAR-10 in the real pickle format, an image folder; user errors."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff.data import TOY2D_KINDS, TOY2D_SIZES, get_data, static_info, to_uint8
from fastdiff.errors import FastdiffError


@pytest.mark.parametrize("kind", TOY2D_KINDS)
def test_toy2d_shapes_labels_and_splits(kind):
    name = f"toy2d:{kind}"
    train, test = get_data(name, "train"), get_data(name, "test")
    shape, num_classes = static_info(name)
    for split, d in (("train", train), ("test", test)):
        assert d.x.shape == (TOY2D_SIZES[split], 2) and d.x.dtype == torch.float32
        assert d.shape == shape and not d.is_image and d.num_classes == num_classes
        assert d.x.abs().max() < 5 and d.x.std(0).min() > 0.3  # spread over a few units, as the MLP expects
        if num_classes:
            assert d.y.shape == (len(d.x),) and set(d.y.tolist()) == set(range(num_classes))
        else:
            assert d.y is None
    assert not torch.equal(train.x[: len(test.x)], test.x)
    assert torch.equal(get_data(name, "train").x, train.x)
    assert not torch.equal(get_data(name, "train", seed=1).x, train.x)


def test_toy2d_default_kind_and_labels_mean_modes():
    d = get_data("toy2d")
    assert d.name == "toy2d" and d.num_classes == 8
    centers = torch.stack([d.x[d.y == k].mean(0) for k in range(8)])
    angles = torch.atan2(centers[:, 1], centers[:, 0]) % (2 * np.pi)
    torch.testing.assert_close(angles, torch.arange(8) * np.pi / 4, rtol=0, atol=0.02)
    torch.testing.assert_close(centers.norm(dim=1), torch.full((8,), 1.5), rtol=0, atol=0.02)


def test_digits_scaled_split_fixed_by_seed_and_disjoint():
    from sklearn.datasets import load_digits

    train, test = get_data("digits", "train"), get_data("digits", "test")
    assert train.x.shape == (1437, 1, 8, 8) and test.x.shape == (360, 1, 8, 8)
    assert train.shape == static_info("digits")[0] and train.is_image and train.num_classes == 10
    assert train.x.min() == -1 and train.x.max() == 1
    assert set(train.y.tolist()) == set(test.y.tolist()) == set(range(10))
    # train + test is a partition of the 1797 images (as a multiset: some digits images are duplicates)
    ref = load_digits()
    full = torch.from_numpy(np.concatenate([ref.images.reshape(-1, 64) / 8.0 - 1.0, ref.target[:, None]], 1)).float()
    ours = torch.cat([torch.cat([d.x.reshape(-1, 64), d.y[:, None].float()], 1) for d in (train, test)])
    sort = lambda a: a[np.lexsort(a.numpy().T[::-1])]  # noqa: E731
    torch.testing.assert_close(sort(ours), sort(full), rtol=0, atol=1e-6)
    assert torch.equal(get_data("digits", "test").x, test.x)
    assert not torch.equal(get_data("digits", "test", seed=1).x, test.x)


def _write_fake_cifar10(root, n_per_batch=3, n_test=4):
    """Five train batches and a test batch in CIFAR-10's pickle format; image i is a flat colour.

    The real files are Python-2 pickles of dicts with b'data' (N x 3072 uint8, the R, G then B planes of 32x32)
    and b'labels'. torchvision reads them with encoding='latin1', which turns those Python-2 str keys into
    'data' / 'labels'; a Python-3 pickle with str keys reads back the same way.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    colours = []

    def batch(name, n, offset):
        rgb = np.array([[(17 * (offset + i)) % 256, 100, 255 - i] for i in range(n)], dtype=np.uint8)
        colours.append(rgb)
        data = np.repeat(rgb, 1024, axis=1)  # (n, 3072): R plane, G plane, B plane
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": [(offset + i) % 10 for i in range(n)], "batch_label": name}, f,
                        protocol=2)

    for k in range(5):
        batch(f"data_batch_{k + 1}", n_per_batch, k * n_per_batch)
    batch("test_batch", n_test, 100)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": n_per_batch}, f,
                    protocol=2)
    return np.concatenate(colours[:5]), colours[5]


@pytest.fixture
def fake_cifar10(tmp_path, monkeypatch):
    """A fake CIFAR-10 that torchvision's own loader accepts.

    torchvision checks the md5 of each file against the real data set's (`_check_integrity` and, for
    batches.meta, `_load_meta`, both through `torchvision.datasets.cifar.check_integrity`). No fake file
    can pass that, so the test replaces the md5 check by a check that the file exists; the loading code
    (and fastdiff's conversion) is the real one.
    """
    import torchvision.datasets.cifar

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    return tmp_path, _write_fake_cifar10(tmp_path)


def test_cifar10_from_a_fake_folder(fake_cifar10):
    root, (train_rgb, test_rgb) = fake_cifar10
    train, test = get_data("cifar10", "train", root=str(root)), get_data("cifar10", "test", root=str(root))
    assert train.x.shape == (15, 3, 32, 32) and test.x.shape == (4, 3, 32, 32)
    assert train.shape == static_info("cifar10")[0] and train.num_classes == 10
    assert train.y.tolist() == [i % 10 for i in range(15)] and test.y.tolist() == [(100 + i) % 10 for i in range(4)]
    # channel order and scaling: pixel value v becomes v / 127.5 - 1 in its own channel
    for d, rgb in ((train, train_rgb), (test, test_rgb)):
        expect = torch.from_numpy(rgb).float() / 127.5 - 1
        torch.testing.assert_close(d.x[:, :, 5, 7], expect, rtol=0, atol=1e-6)
        assert torch.equal(to_uint8(d.x)[:, :, 0, 0], torch.from_numpy(rgb))
        assert (d.x == d.x[:, :, :1, :1]).all()


def test_cifar10_refuses_files_failing_the_md5_check(tmp_path):
    _write_fake_cifar10(tmp_path)
    with pytest.raises(FastdiffError, match="not found or corrupt"):
        get_data("cifar10", root=str(tmp_path))


@pytest.mark.parametrize("root", ["", "missing"])
def test_cifar10_without_data_says_how_to_get_it(tmp_path, root):
    with pytest.raises(FastdiffError) as err:
        get_data("cifar10", root=str(tmp_path / root) if root else "")
    msg = str(err.value)
    assert "download=True" in msg and "--data-root" in msg and "cifar-10-batches-py" in msg
    assert "\n" not in msg


def test_image_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    # a wide RGB image: the centre crop keeps its green middle and drops the red/blue sides
    wide = np.zeros((20, 40, 3), dtype=np.uint8)
    wide[:, :10, 0], wide[:, 10:30, 1], wide[:, 30:, 2] = 255, 255, 255
    Image.fromarray(wide).save(tmp_path / "a.png")
    Image.fromarray(np.full((16, 16), 51, dtype=np.uint8), mode="L").save(tmp_path / "sub" / "b.PNG")
    Image.fromarray(np.full((9, 9, 4), 204, dtype=np.uint8), mode="RGBA").save(tmp_path / "sub" / "c.png")
    (tmp_path / "notes.txt").write_text("not an image")
    d = get_data("folder", root=str(tmp_path), image_size=8)
    assert d.x.shape == (3, 3, 8, 8) and d.shape == static_info("folder", 8)[0] and d.y is None
    torch.testing.assert_close(d.x[0, :, 2:6, 2:6], torch.tensor([-1.0, 1.0, -1.0])[:, None, None].expand(3, 4, 4))
    torch.testing.assert_close(d.x[1], torch.full((3, 8, 8), 51 / 127.5 - 1), rtol=0, atol=0.02)
    torch.testing.assert_close(d.x[2], torch.full((3, 8, 8), 204 / 127.5 - 1), rtol=0, atol=0.02)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FastdiffError, match="no images"):
        get_data("folder", root=str(tmp_path))
    with pytest.raises(FastdiffError, match="no images"):
        get_data("folder", root="")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(FastdiffError, match="broken.png"):
        get_data("folder", root=str(tmp_path))


@pytest.mark.parametrize("name, split, match", [("mnist", "train", "unknown data set"),
                                                ("toy2d:spiral", "train", "unknown toy2d kind"),
                                                ("digits:big", "train", "no variants"),
                                                ("digits", "val", "unknown split")])
def test_bad_names_are_user_errors(name, split, match):
    with pytest.raises(FastdiffError, match=match):
        get_data(name, split)


def test_static_info_rejects_unknown_names():
    with pytest.raises(FastdiffError, match="unknown data set"):
        static_info("mnist")
