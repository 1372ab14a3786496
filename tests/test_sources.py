"""extract/sources.py: every source kind, failures as values, pickling, selection and manifests."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from extract.idx import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR
from extract.sources import (
    CSVSource,
    DigitsSource,
    FolderSource,
    HDF5Source,
    IDXSource,
    SourceError,
    check_dataset,
    open_source,
)
from extract.spec import load_spec


def save(path: Path, array: np.ndarray, mode: str | None = None, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    image.save(path, format=fmt)


def rgb(seed: int, h: int = 6, w: int = 9) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def truncated_jpeg(path: Path) -> None:
    save(path, rgb(99, 32, 32), fmt="JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# -- class-folder trees ----------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    save(root / "train" / "dog" / "b.png", rgb(1))
    save(root / "train" / "dog" / "a.png", rgb(2))
    save(root / "train" / "cat" / "sub" / "c.png", rgb(3))
    save(root / "train" / "cat" / "gray.png", rgb(4)[:, :, 0])  # grayscale file
    save(root / "test" / "cat" / "d.png", rgb(5), mode="RGBA")
    save(root / "test" / "bird" / "p.png", rgb(6), mode="P")  # a class only the test split has
    (root / "test" / "bird" / "broken.png").write_bytes(b"this is not a png")
    truncated_jpeg(root / "test" / "bird" / "cut.jpg")
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    (root / "train" / "dog" / ".hidden.png").write_bytes(b"")
    return root


def test_folder_tree_splits_labels_ids(tree: Path):
    src = FolderSource(tree)
    assert src.class_names == ("bird", "cat", "dog")  # sorted union over splits
    assert list(src.splits) == ["test", "train"]
    assert src.sample_ids == [
        "test/bird/broken.png",
        "test/bird/cut.jpg",
        "test/bird/p.png",
        "test/cat/d.png",
        "train/cat/gray.png",
        "train/cat/sub/c.png",
        "train/dog/a.png",
        "train/dog/b.png",
    ]
    assert src.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2] and src.labels.dtype == np.int64
    assert src.splits["train"].tolist() == [4, 5, 6, 7] and src.splits["train"].dtype == np.int64
    item = src.load(6)
    assert (item.index, item.sample_id, item.label, item.split, item.error) == (6, "train/dog/a.png", 2, "train", None)
    np.testing.assert_array_equal(item.image, rgb(2))
    gray = src.load(4).image
    assert gray.shape == (6, 9, 3) and gray.dtype == np.uint8
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
    np.testing.assert_array_equal(src.load(3).image, rgb(5))  # RGBA -> RGB
    assert src.load(2).image.shape == (6, 9, 3)  # palette -> RGB


def test_corrupt_and_truncated_files_are_items_with_errors(tree: Path):
    src = FolderSource(tree)
    broken, cut = src.load(0), src.load(1)
    for item in (broken, cut):
        assert item.image is None and not item.ok and item.error
    assert "cannot identify image file" in broken.error
    assert "truncated" in cut.error.lower()
    assert [it.ok for it in src] == [False, False] + [True] * 6


def test_folder_without_split_folders_is_one_split(tmp_path: Path):
    save(tmp_path / "b" / "x.png", rgb(1))
    save(tmp_path / "a" / "y.png", rgb(2))
    save(tmp_path / "loose.png", rgb(3))  # no class folder: unlabelled
    src = FolderSource(tmp_path)
    assert list(src.splits) == ["all"] and src.class_names == ("a", "b")
    assert dict(zip(src.sample_ids, src.labels.tolist())) == {"a/y.png": 0, "b/x.png": 1, "loose.png": -1}


def test_selection_limit_and_manifest(tree: Path):
    full = FolderSource(tree)
    part = FolderSource(tree).select(["train", "test"], {"train": 2})
    assert len(part) == 6 and part.sample_ids[:2] == ["train/cat/gray.png", "train/cat/sub/c.png"]
    assert part.splits["train"].tolist() == [0, 1] and part.splits["test"].tolist() == [2, 3, 4, 5]
    assert part.load(0).sample_id == "train/cat/gray.png"
    assert FolderSource(tree).manifest_hash() == full.manifest_hash() != part.manifest_hash()
    with pytest.raises(SourceError, match="no split"):
        FolderSource(tree).select(["val"])


# -- CSV / TSV lists -------------------------------------------------------------------------------


def test_csv_list_named_labels_and_relative_paths(tmp_path: Path):
    save(tmp_path / "images" / "one.png", rgb(1))
    save(tmp_path / "images" / "two.png", rgb(2))
    (tmp_path / "images" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    lst = tmp_path / "lists" / "data.csv"
    lst.parent.mkdir()
    lst.write_text(
        "path,label,split\n../images/one.png,zebra,train\n../images/two.png,ant,test\n"
        "../images/bad.png,zebra,train\n../images/missing.png,,train\n"
    )
    src = CSVSource(lst)
    assert src.class_names == ("ant", "zebra")
    # Rows are grouped split after split (in order of first appearance), in list order within a split.
    assert src.sample_ids == ["../images/one.png", "../images/bad.png", "../images/missing.png", "../images/two.png"]
    assert src.labels.tolist() == [1, 1, -1, 0]
    assert list(src.splits) == ["train", "test"] and src.splits["train"].tolist() == [0, 1, 2]
    np.testing.assert_array_equal(src.load(0).image, rgb(1))
    np.testing.assert_array_equal(src.load(3).image, rgb(2))
    assert src.load(1).error and "missing.png" in src.load(2).error


def test_tsv_integer_labels_without_split(tmp_path: Path):
    save(tmp_path / "a.png", rgb(1))
    (tmp_path / "list.tsv").write_text("path\tlabel\na.png\t2\na.png\t10\n")
    src = CSVSource(tmp_path / "list.tsv")
    assert src.labels.tolist() == [2, 10] and len(src.class_names) == 11
    assert list(src.splits) == ["all"] and src.sample_ids == ["a.png", "a.png"]
    (tmp_path / "nolabel.csv").write_text("file,label\na.png,1\n")
    with pytest.raises(SourceError, match="needs 'path' and 'label'"):
        CSVSource(tmp_path / "nolabel.csv")


# -- HDF5 banks ------------------------------------------------------------------------------------


@pytest.fixture
def bank(tmp_path: Path) -> Path:
    import h5py

    path = tmp_path / "bank.h5"
    images = np.stack([rgb(i, 5, 7)[:, :, 0] for i in range(6)])  # grayscale (N, H, W)
    with h5py.File(path, "w") as f:
        f["images"] = images
        f["labels"] = np.array([0, 1, 2, 0, 1, 2])
        f["split"] = np.array([b"train", b"train", b"train", b"train", b"test", b"test"])
        f.attrs["class_names"] = ["a", "b", "c"]
    return path


def test_hdf5_bank(bank: Path):
    src = HDF5Source(bank)
    assert len(src) == 6 and src.class_names == ("a", "b", "c")
    assert src.sample_ids == ["train/0", "train/1", "train/2", "train/3", "test/0", "test/1"]
    item = src.load(4)
    assert item.split == "test" and item.label == 1 and item.image.shape == (5, 7, 3)
    np.testing.assert_array_equal(item.image[..., 1], rgb(4, 5, 7)[:, :, 0])
    src.close()


def test_hdf5_source_pickles_before_and_after_use(bank: Path):
    src = open_source({"kind": "hdf5", "path": str(bank), "splits": ["test"]})
    fresh = pickle.loads(pickle.dumps(src))  # before any file handle exists
    first = src.load(0)  # opens the file in this process
    assert src._h5 is not None
    used = pickle.loads(pickle.dumps(src))  # the open handle must not travel
    assert used._h5 is None
    for copy in (fresh, used):
        np.testing.assert_array_equal(copy.load(0).image, first.image)
        assert copy.sample_ids == ["test/0", "test/1"]
    for s in (src, fresh, used):
        s.close()


def test_hdf5_bad_layout(tmp_path: Path):
    import h5py

    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["images"] = np.zeros((3, 4, 4), np.float32)
    with pytest.raises(SourceError, match="uint8"):
        HDF5Source(tmp_path / "f.h5")


# -- IDX ---------------------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


@pytest.fixture
def idx_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (5, 28, 28), dtype=np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 4], np.uint8))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 256, (3, 28, 28), dtype=np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([9, 8, 7], np.uint8))
    return tmp_path


def test_idx_files(idx_dir: Path):
    src = IDXSource(idx_dir)
    assert len(src) == 8 and src.class_names == FASHION_MNIST_CLASSES
    assert src.splits["test"].tolist() == [5, 6, 7] and src.labels.tolist() == [0, 1, 2, 3, 4, 9, 8, 7]
    item = src.load(6)
    assert (item.sample_id, item.label, item.split) == ("test/1", 8, "test")
    assert item.image.shape == (28, 28, 3)
    copy = pickle.loads(pickle.dumps(src))
    assert copy._arrays == {}  # decoded pixels stay behind
    np.testing.assert_array_equal(copy.load(6).image, item.image)
    limited = open_source({"kind": "idx", "path": str(idx_dir), "splits": ["test"], "limit": 2})
    assert limited.sample_ids == ["test/0", "test/1"]


def test_truncated_idx_file_gives_error_items(idx_dir: Path):
    raw = (idx_dir / "t10k-images-idx3-ubyte").read_bytes()
    (idx_dir / "t10k-images-idx3-ubyte").write_bytes(raw[:-100])
    src = IDXSource(idx_dir)
    assert src.load(0).ok
    bad = src.load(5)
    assert not bad.ok and "truncated" in bad.error


def test_idx_missing_files(tmp_path: Path):
    with pytest.raises(SourceError, match="dataset-fashion-mnist"):
        IDXSource(tmp_path)
    assert check_dataset("idx", tmp_path, ["train"])  # both train files reported


@pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(),
    reason=f"Fashion-MNIST is not installed at {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_from_debian_package():
    dataset = {
        "kind": "idx",
        "path": str(FASHION_MNIST_DIR),
        "splits": ["train", "test"],
        "limit": {"train": 3, "test": 2},
    }
    src = open_source(dataset)
    assert len(src) == 5 and src.sample_ids == ["train/0", "train/1", "train/2", "test/0", "test/1"]
    assert src.labels.tolist()[:3] == [9, 0, 0]  # Fashion-MNIST's first training labels: ankle boot, T-shirt x2
    item = src.load(4)
    assert item.ok and item.image.shape == (28, 28, 3) and item.image.dtype == np.uint8
    assert len(IDXSource(FASHION_MNIST_DIR)) == 70000


# -- digits ------------------------------------------------------------------------------------------


def test_digits():
    from extract.spec import KNOWN_SPLIT_SIZES

    src = DigitsSource()
    assert len(src) == 1797 and src.class_names == tuple(str(i) for i in range(10))
    assert {k: len(v) for k, v in src.splits.items()} == KNOWN_SPLIT_SIZES["digits"]
    item = src.load(0)
    assert item.image.shape == (8, 8, 3) and item.image.dtype == np.uint8
    assert max(src.load(i).image.max() for i in range(10)) == 255
    assert (item.sample_id, item.label) == ("train/0", 0)
    spec = load_spec(
        {
            "model": {
                "flags": {
                    "image_size": 32,
                    "num_channels": 32,
                    "num_res_blocks": 1,
                    "channel_mult": "1,2,2",
                    "num_head_channels": 16,
                }
            },
            "dataset": {"kind": "digits", "splits": ["test"], "limit": 4},
            "features": {"timesteps": [10], "blocks": [3]},
        }
    )
    small = open_source(spec.dataset)
    assert small.sample_ids == ["test/0", "test/1", "test/2", "test/3"] and small.load(0).label == 4
    assert len(pickle.loads(pickle.dumps(small))) == 4


def test_index_out_of_range():
    with pytest.raises(IndexError):
        DigitsSource().select(["test"], 2).load(2)


def test_digits_pixels_are_scikit_learns_scaled():
    # scikit-learn's digits.images[0][0] is [0, 0, 5, 13, 9, 1, 0, 0] (a zero), scaled by 255/16 and rounded.
    item = DigitsSource().load(0)
    assert item.image[0, :, 0].tolist() == [0, 0, 80, 207, 143, 16, 0, 0] and item.label == 0


def test_load_rgb_keeps_pil_images_with_the_same_pixels(tree: Path):
    """The extraction's path: decoded files stay PIL (no PIL -> numpy -> PIL), pixels as `load` gives."""
    from PIL import Image

    src = FolderSource(tree)
    for i in range(len(src)):
        fast, plain = src.load_rgb(i), src.load(i)
        assert fast.error == plain.error
        if plain.ok:
            assert isinstance(fast.image, Image.Image) and fast.image.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(fast.image), plain.image)


@pytest.mark.parametrize("kind", ["folder", "csv", "hdf5"])
def test_a_file_dataset_without_a_path_is_refused_by_name(kind: str):
    with pytest.raises(SourceError, match=f"a {kind} dataset needs a path"):
        open_source({"kind": kind})
