"""The .beton files are checked before training (issue #12, defects 5, 7 and 8): a cut, modified,
foreign or wrongly shaped file is refused with one line naming it, and summary.json records the hashes
of the files as they were read, not the sidecar's claim. Broken files are made here from copies of the
session's synthetic set (conftest.beton_dir) and with ffcv's own writer."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import SMALL_RUN
from helpers import SMALL, one_error_line, run_main
from trainer import UserError
from trainer.config import DataConfig, load_config
from trainer.data import build_loaders, cifar10
from trainer.data.cifar10 import SIDECAR, DataError
from trainer.data.checks import verify
from trainer.data.resident import read_beton
from trainer.distributed import Dist
from trainer.training.progress import Progress
from trainer.training.summary import summary


@pytest.fixture
def data(tmp_path, beton_dir) -> Path:
    """A copy of the good synthetic set that a test may damage."""
    return Path(shutil.copytree(beton_dir, tmp_path / "data"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _build(data_dir: Path, loader: str = "ffcv"):
    cfg = DataConfig(dir=str(data_dir), loader=loader, batch_size=100, num_workers=1)
    return build_loaders(cfg, Dist.single(), threads=1)


def _write_beton(path: Path, images: np.ndarray, labels: np.ndarray, names=("image", "label")) -> None:
    """A .beton written by ffcv's own writer, with the field kinds prepare uses under `names`."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    fields = {names[0]: RGBImageField(write_mode="raw"), names[1]: IntField()}
    DatasetWriter(str(path), fields, num_workers=1).from_indexed_dataset(cifar10.Split(images, labels))


def _write_set(folder: Path, side: int, names=("image", "label"), per_class: int = 10) -> None:
    """train.beton and test.beton of side x side images, and a sidecar that describes exactly these
    files, as if prepare had written them: only the layout check can refuse them."""
    rng = np.random.default_rng(0)
    labels = np.arange(10 * per_class) % 10
    images = rng.integers(0, 256, size=(len(labels), side, side, 3), dtype=np.uint8)
    for split in cifar10.SPLITS:
        (folder / f"{split}.beton").unlink(missing_ok=True)
        _write_beton(folder / f"{split}.beton", images, labels, names)
    record = json.loads((folder / SIDECAR).read_text())
    record["outputs"] = cifar10._describe([folder / "train.beton", folder / "test.beton"])
    record["counts"] = {split: [per_class] * 10 for split in cifar10.SPLITS}
    (folder / SIDECAR).write_text(json.dumps(record))


def test_good_set_is_verified_and_recorded_with_hashes_computed_now(data):
    record = verify(data)
    assert record["sidecar_checked"] is True
    assert record["train_images"] == 5000 and record["test_images"] == 1000
    for split in ("train", "test"):
        assert record[f"{split}_sha256"] == _sha256(data / f"{split}.beton")
        assert record[f"{split}_bytes"] == (data / f"{split}.beton").stat().st_size


@pytest.mark.parametrize("loader", ["ffcv", "resident"])
@pytest.mark.parametrize("keep", ["half", "all but the last 100 bytes"])
@pytest.mark.parametrize("sidecar", [True, False])
def test_truncated_beton_is_refused_by_both_loaders(data, loader, keep, sidecar):
    path = data / "train.beton"
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2] if keep == "half" else content[:-100])
    if not sidecar:
        (data / SIDECAR).unlink()
    expected = "records" if sidecar else "truncated"  # the size against the sidecar, else the layout
    with pytest.raises(DataError, match=rf"^{path}: .*{expected}"):
        _build(data, loader)


def test_truncated_beton_is_refused_where_the_bench_reads_it(data):
    path = data / "test.beton"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match=rf"^{path}: not a readable .beton"):
        read_beton(path)


def test_modified_beton_of_the_same_size_is_refused(data):
    path = data / "train.beton"
    record = verify(data)  # verified once: a change after it must still be seen
    with path.open("r+b") as f:
        f.seek(9_000_000)  # inside an image's pixels
        byte = f.read(1)
        f.seek(9_000_000)
        f.write(bytes([byte[0] ^ 1]))
    assert record["train_sha256"] != _sha256(path)
    with pytest.raises(DataError, match=rf"^{path}: SHA-256 {_sha256(path)[:16]}… differs .*modified"):
        _build(data)


def test_counts_that_differ_from_the_sidecar_are_refused(data):
    record = json.loads((data / SIDECAR).read_text())
    record["counts"]["test"] = [99] * 10
    (data / SIDECAR).write_text(json.dumps(record))
    with pytest.raises(DataError, match=r"test.beton: 1,000 images, .* but cifar10.json records 990"):
        _build(data)


def test_malformed_sidecar_is_one_line(data):
    (data / SIDECAR).write_text('{"format": 1, "outputs": {}}')
    with pytest.raises(DataError, match=r"cifar10.json: malformed \(no 'train.beton' entry\)"):
        verify(data)
    (data / SIDECAR).write_text("{not json")
    with pytest.raises(DataError, match=r"cifar10.json: unreadable \(not JSON"):
        verify(data)


@pytest.mark.parametrize("loader", ["ffcv", "resident"])
def test_images_of_the_wrong_shape_are_refused(data, loader):
    _write_set(data, side=16)
    with pytest.raises(DataError, match=r"train.beton: 100 of 100 images are not 32x32x3 \(image 0 is 16x16x3\)"):
        _build(data, loader)


def test_other_field_names_are_refused(data):
    _write_set(data, side=32, names=("img", "target"))
    with pytest.raises(
        DataError, match=r"train.beton: fields img \(RGBImageField\), target \(IntField\); expected image .* and label"
    ):
        _build(data)


def test_without_sidecar_the_layout_is_checked_and_the_summary_records_the_files_hashes(data, capsys):
    (data / SIDECAR).unlink()
    train, _ = _build(data)
    assert "cifar10.json: missing" in capsys.readouterr().err
    assert train.num_samples == 5000
    cfg = load_config(SMALL, [f"data.dir={data}"])
    recorded = summary(cfg, Progress(), 0, Dist.single(), True)["data"]
    assert recorded["train_sha256"] == _sha256(data / "train.beton")
    assert recorded["test_sha256"] == _sha256(data / "test.beton")
    assert recorded["sidecar_checked"] is False and recorded["dir"] == str(data.resolve())


def test_prepare_out_that_is_a_file_is_one_line(tmp_path, cifar_source):
    out = tmp_path / "not-a-folder"
    out.write_text("keep me\n")
    r = run_main("trainer.data", "prepare", "--source", str(cifar_source), "--out", str(out))
    one_error_line(r, str(out), "not a folder")
    assert out.read_text() == "keep me\n"
    with pytest.raises(UserError, match="cannot create the folder"):
        cifar10.prepare(out / "sub", cifar_source)


def test_trainer_refuses_a_truncated_beton_with_one_line(data, tmp_path):
    path = data / "train.beton"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    (data / SIDECAR).unlink()  # the layout check alone, as for files converted elsewhere
    run_dir = tmp_path / "run"
    r = run_main("trainer", "--config", str(SMALL), "--run-dir", str(run_dir), f"data.dir={data}", *SMALL_RUN)
    one_error_line(r, str(path), "not a readable .beton")
