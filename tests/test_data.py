"""CIFAR-10 -> .beton conversion and the FFCV loaders, with real ffcv, on a synthetic CIFAR-10 in the
official layout (conftest) and, where it is present, the real one."""

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import one_error_line, run_main
from trainer import UserError
from trainer.config import DataConfig
from trainer.data import cifar10
from trainer.data.cifar10 import MEAN, STD, prepare, read_split
from trainer.data import build_loaders
from trainer.data.common import shard_indices
from trainer.distributed import Dist


@pytest.fixture(scope="module")
def source_test(cifar_source):
    return read_split(cifar_source, "test")


def _denormalise(x: torch.Tensor) -> np.ndarray:
    """Normalised NCHW floats back to NHWC uint8, as stored."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255
    return (x.float() * std + mean).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _checksum(path: Path) -> tuple[int, str]:
    import hashlib

    return path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()


def test_prepare_counts_per_class(beton_dir):
    from ffcv.fields.decoders import IntDecoder
    from ffcv.loader import Loader, OrderOption

    for split, per_class in (("train", 500), ("test", 100)):
        loader = Loader(
            str(beton_dir / f"{split}.beton"), batch_size=5000, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
            pipelines={"image": None, "label": [IntDecoder()]},
        )
        labels = np.concatenate([np.array(y, copy=True).ravel() for (y,) in loader])
        assert len(labels) == 10 * per_class
        assert np.bincount(labels, minlength=10).tolist() == [per_class] * 10
    record = json.loads((beton_dir / cifar10.SIDECAR).read_text())
    assert record["counts"]["train"] == [500] * 10 and record["counts"]["test"] == [100] * 10
    assert record["label_names"][:2] == ["airplane", "automobile"]


def test_train_pixels_exact_through_sequential_loader(beton_dir, cifar_source):
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    source = read_split(cifar_source, "train")
    sample = np.random.default_rng(0).choice(len(source), size=2_000, replace=False)
    sample.sort()  # SEQUENTIAL walks the given indices in order
    loader = Loader(
        str(beton_dir / "train.beton"), batch_size=500, num_workers=1, order=OrderOption.SEQUENTIAL,
        indices=sample, pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]},
    )
    # ffcv reuses its batch buffers: copy each batch before asking for the next.
    images = np.concatenate([np.array(x, copy=True) for x, _ in loader])
    labels = np.concatenate([np.array(y, copy=True).ravel() for _, y in loader])
    assert images.shape == (2_000, 32, 32, 3)
    np.testing.assert_array_equal(images, source.images[sample])
    np.testing.assert_array_equal(labels, source.labels[sample])


def test_test_loader_yields_source_exactly(beton_dir, source_test):
    # One decoding thread and two torch threads: ffcv's epoch sets torch's count to its own.
    cfg = DataConfig(dir=str(beton_dir), batch_size=250, num_workers=1, dtype="float32")
    _, test = build_loaders(cfg, Dist.single(), threads=2)
    xs, ys = [], []
    for x, y in test:
        assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.is_contiguous(memory_format=torch.channels_last)
        xs.append(_denormalise(x))
        ys.append(y.clone().numpy())
    np.testing.assert_array_equal(np.concatenate(xs), source_test.images)
    np.testing.assert_array_equal(np.concatenate(ys), source_test.labels)
    assert torch.get_num_threads() == 2  # put back after ffcv's thread changed it, as it started


@pytest.mark.slow
def test_train_loader_augments_and_casts(beton_dir):
    cfg = DataConfig(dir=str(beton_dir), batch_size=250, num_workers=2, cutout=12, dtype="bfloat16", train_subset=1000)
    train, _ = build_loaders(cfg, Dist.single(), threads=1)
    assert len(train) == 4 and train.num_samples == 1000
    batches = [(x.clone(), y.clone()) for x, y in train]
    x = torch.cat([b[0] for b in batches])
    assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)
    # Normalised: roughly zero mean, unit spread.
    assert abs(x.float().mean().item()) < 0.3 and 0.6 < x.float().std().item() < 1.3
    # Cutout fills a 12x12 square with the mean colour, which normalises to ~0 in all channels.
    zero_pixels = (x.float().abs() < 0.02).all(dim=1).sum(dim=(1, 2))
    assert (zero_pixels >= 100).float().mean() > 0.9  # a few squares are clipped at the border
    assert torch.get_num_threads() == 1


def test_more_workers_than_cores_are_lowered_with_one_warning(beton_dir, capsys):
    # base.yaml asks for 8: on a 2-core machine ffcv's numba threads refused it with a 35-line
    # traceback ("The number of threads must be between 1 and 2") before the loaders lowered it.
    from trainer.data import common

    cores = len(os.sched_getaffinity(0))
    common._LOWERED.clear()  # the warning is once per process: another test may have had it
    cfg = DataConfig(dir=str(beton_dir), batch_size=100, num_workers=cores + 6, train_subset=200, test_subset=100,
                     val_split=0)
    train, test = build_loaders(cfg, Dist.single(), threads=1)
    assert [len(x) for x, _ in train] == [100, 100] and sum(len(x) for x, _ in test) == 100
    err = capsys.readouterr().err
    assert err.count("warning: data.num_workers=") == 1, err
    assert f"data.num_workers={cores + 6} is more than the {cores} cores this process may use; using {cores}" in err
    assert common.loader_workers(cores) == cores and capsys.readouterr().err == ""


def test_prepare_is_idempotent(beton_dir, cifar_source, capsys):
    before = [_checksum(beton_dir / n) for n in ("train.beton", "test.beton", cifar10.SIDECAR)]
    assert prepare(beton_dir, cifar_source) is False
    assert "nothing to do" in capsys.readouterr().out
    assert [_checksum(beton_dir / n) for n in ("train.beton", "test.beton", cifar10.SIDECAR)] == before


def test_prepare_cli_second_run_does_nothing(beton_dir, cifar_source):
    r = run_main("trainer.data", "prepare", "--source", str(cifar_source), "--out", str(beton_dir))
    assert r.returncode == 0, r.stderr
    assert "nothing to do" in r.stdout


@pytest.mark.slow
def test_prepare_on_one_core_exits_once_its_files_are_written(cifar_source, tmp_path):
    """A real process allowed one core, as a 1-CPU SLURM task or container runs it: prepare wrote
    its files, then hung at its exit in numba's TBB thread pool (found when the suite's workers
    were pinned to a core each). A hang is the subprocess's timeout here."""
    import subprocess

    one_core = {min(os.sched_getaffinity(0))}
    r = subprocess.run([sys.executable, "-m", "trainer.data", "prepare", "--source", str(cifar_source), "--out",
                        str(tmp_path / "out"), "--workers", "1"], preexec_fn=lambda: os.sched_setaffinity(0, one_core),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"train.beton", "test.beton", cifar10.SIDECAR}


# A process that builds both ffcv loaders, reads a batch of each, and saves the test batch.
CACHE_PROBE = """
import sys
import numpy as np
from trainer.config import DataConfig
from trainer.data import build_loaders
from trainer.distributed import Dist
cfg = DataConfig(dir=sys.argv[1], batch_size=100, num_workers=1, dtype="float32", train_subset=200, test_subset=100,
                 flip=True, translate=2, cutout=8)
train, test = build_loaders(cfg, Dist.single(), threads=1)
next(iter(train))
np.save(sys.argv[2], next(iter(test))[0].numpy())
"""


@pytest.mark.slow
def test_ffcv_compiles_once_then_every_process_loads_them_from_numbas_cache(beton_dir, tmp_path):
    """ffcv compiled its typed dict and its pipeline stages with numba in every process (8 s of CPU
    before a rank's first step); trainer/data/numba_cache.py keeps them in numba's disk cache. The
    second process loads what the first compiled, and decodes the same test batch with it."""
    import subprocess

    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"), "NUMBA_DEBUG_CACHE": "1"}
    runs = [subprocess.run([sys.executable, "-c", CACHE_PROBE, str(beton_dir), str(tmp_path / f"{i}.npy")],
                           capture_output=True, text=True, timeout=300, env=env) for i in (1, 2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    first, second = ([line for line in r.stdout.splitlines() if line.startswith("[cache] data ")] for r in runs)
    for name in ("typeddict._setitem", "typeddict._getitem", "RandomHorizontalFlip", "RandomTranslate", "Cutout",
                 "BasicDecoder"):
        assert any("saved" in line and name in line for line in first), (name, first)
        assert any("loaded" in line and name in line for line in second), (name, second)
    assert not any("saved" in line for line in second), second  # nothing compiled again
    np.testing.assert_array_equal(np.load(tmp_path / "1.npy"), np.load(tmp_path / "2.npy"))


def _plus_one(x):  # compiled by the next test: numba caches only functions of a source file
    return x + 1


def test_a_cache_numba_cannot_write_leaves_the_compile_as_it_was(tmp_path, monkeypatch):
    """numba raises a failed cache write out of the compile itself: a full disk where the cache lives
    (here a real one, a 4 KiB tmpfs) would have ended ffcv's loader thread, and the training with it."""
    import subprocess

    import numba

    from trainer.data.numba_cache import _enable_caching

    disk = tmp_path / "full"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "numba-cache", str(disk)], capture_output=True,
                           text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {mount.stderr.strip()}")
    try:
        monkeypatch.setattr(numba.config, "CACHE_DIR", str(disk))
        compiled = numba.njit(_plus_one)
        _enable_caching(compiled)
        assert compiled(41) == 42
        assert not list(disk.rglob("*.nbc"))  # nothing saved: the disk was full
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.fixture
def broken_source(tmp_path, cifar_source):
    """A copy of the source (symlinks) whose files a test may replace."""
    src = tmp_path / "cifar-10-batches-py"
    src.mkdir()
    for f in cifar_source.iterdir():
        (src / f.name).symlink_to(f)
    return src


@pytest.fixture
def good_out(tmp_path, beton_dir):
    """An output folder already holding good converted data."""
    out = tmp_path / "out"
    shutil.copytree(beton_dir, out)
    return out


def test_truncated_batch_is_named_and_good_data_kept(broken_source, good_out, cifar_source):
    before = [_checksum(good_out / n) for n in ("train.beton", "test.beton")]
    (broken_source / "data_batch_3").unlink()
    (broken_source / "data_batch_3").write_bytes((cifar_source / "data_batch_3").read_bytes()[:1_000_000])
    r = run_main("trainer.data", "prepare", "--source", str(broken_source), "--out", str(good_out))
    one_error_line(r, "data_batch_3", "truncated or malformed")
    assert [_checksum(good_out / n) for n in ("train.beton", "test.beton")] == before
    assert sorted(p.name for p in good_out.iterdir()) == sorted(["train.beton", "test.beton", cifar10.SIDECAR])


def test_missing_batch_file_is_named(broken_source, tmp_path):
    (broken_source / "data_batch_5").unlink()
    r = run_main("trainer.data", "prepare", "--source", str(broken_source), "--out", str(tmp_path / "o"))
    one_error_line(r, "data_batch_5", "missing")
    assert not (tmp_path / "o" / "train.beton").exists()


def test_malformed_batch_is_named(broken_source, tmp_path):
    import pickle

    (broken_source / "test_batch").unlink()
    with open(broken_source / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((10_000, 3000), np.uint8), b"labels": [0] * 10_000}, f)
    r = run_main("trainer.data", "prepare", "--source", str(broken_source), "--out", str(tmp_path / "o"))
    one_error_line(r, "test_batch", "3072")


def test_missing_source_folder(tmp_path):
    r = run_main("trainer.data", "prepare", "--source", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"))
    one_error_line(r, "nowhere", "no such folder")


def test_without_source_the_download_fails_with_advice(tmp_path, monkeypatch):
    # No internet here: the official download must fail fast with one line that says what to do.
    monkeypatch.delenv("CIFAR10_SOURCE", raising=False)
    r = run_main("trainer.data", "prepare", "--out", str(tmp_path / "o"))
    one_error_line(r, "could not download", "--source")


def test_source_comes_from_the_option_then_the_environment(cifar_source, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR10_SOURCE", str(cifar_source))
    r = run_main("trainer.data", "prepare", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    assert f"using CIFAR10_SOURCE={cifar_source}" in r.stdout
    assert json.loads((tmp_path / "o" / "cifar10.json").read_text())["source_dir"] == str(cifar_source.resolve())
    # --source wins over the environment
    r = run_main("trainer.data", "prepare", "--source", str(tmp_path / "nowhere"), "--out", str(tmp_path / "p"))
    one_error_line(r, "nowhere", "no such folder")


def test_interrupted_write_keeps_previous_files(good_out, cifar_source, monkeypatch):
    from ffcv.writer import DatasetWriter

    before = [_checksum(good_out / n) for n in ("train.beton", "test.beton")]
    real = DatasetWriter.from_indexed_dataset

    def write_then_die(self, dataset, **kw):
        real(self, dataset, **kw)  # the temporary file is complete...
        raise KeyboardInterrupt  # ...but the run dies before renaming it into place

    monkeypatch.setattr(DatasetWriter, "from_indexed_dataset", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare(good_out, cifar_source, force=True)
    assert [_checksum(good_out / n) for n in ("train.beton", "test.beton")] == before
    assert not [p for p in good_out.iterdir() if p.name.endswith(".tmp")]
    # The record was withdrawn before writing began, so the next run converts again.
    assert not cifar10.is_current(good_out, cifar_source)


def test_changed_source_is_converted_again(broken_source, good_out, cifar_source):
    assert cifar10.is_current(good_out, cifar_source)
    meta = broken_source / "batches.meta"
    data = meta.read_bytes()
    meta.unlink()
    meta.write_bytes(data)  # same content, new file: still current
    assert cifar10.is_current(good_out, broken_source)
    import pickle

    (broken_source / "test_batch").unlink()
    batch = pickle.loads((cifar_source / "test_batch").read_bytes(), encoding="bytes")
    batch[b"data"] = batch[b"data"].copy()
    batch[b"data"][0, 0] ^= 1  # one pixel differs
    (broken_source / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    assert not cifar10.is_current(good_out, broken_source)


def test_shard_indices_partition():
    for n, world in ((10_000, 2), (1001, 2), (10_000, 3), (7, 4)):
        shards = [shard_indices(n, r, world) for r in range(world)]
        np.testing.assert_array_equal(np.concatenate(shards), np.arange(n))


def _rank_main(rank: int, world: int, data_dir: str, out: str, port: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = DataConfig(dir=data_dir, batch_size=100, num_workers=1, flip=False, translate=0,
                         train_subset=2000, test_subset=999)
        train, test = build_loaders(cfg, Dist(rank, rank, world, torch.device("cpu")), threads=1)
        test_x = np.concatenate([_denormalise(x) for x, _ in test])
        epochs = [np.concatenate([_denormalise(x) for x, _ in train]) for _ in range(2)]
        np.savez(f"{out}/rank{rank}.npz", test=test_x, epoch0=epochs[0], epoch1=epochs[1], steps=len(train))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_loaders_shard_under_two_process_gloo_group(beton_dir, source_test, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(2, str(beton_dir), str(tmp_path), port), nprocs=2, join=True)
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]

    # Test shards: disjoint, and together exactly the (odd-sized) test subset, nothing repeated.
    assert len(ranks[0]["test"]) + len(ranks[1]["test"]) == 999
    np.testing.assert_array_equal(np.concatenate([r["test"] for r in ranks]), source_test.images[:999])

    # Train shards: each rank half of the subset per epoch, disjoint, and reshuffled between epochs.
    key = lambda images: {img.tobytes() for img in images}  # CIFAR-10 has no duplicate images
    for epoch in ("epoch0", "epoch1"):
        a, b = key(ranks[0][epoch]), key(ranks[1][epoch])
        assert len(a) == len(b) == 1000 and not a & b
    # data.batch_size is the global batch: 50 a rank, so as many steps as one process takes at 100.
    assert [int(r["steps"]) for r in ranks] == [2000 // 100] * 2
    assert not np.array_equal(ranks[0]["epoch0"], ranks[0]["epoch1"])


def test_launcher_prepares_a_data_folder_without_beton_files(cifar_source, tmp_path, monkeypatch):
    """A newcomer's first sweep: data.dir names an empty place; the launcher converts CIFAR-10 there
    (from CIFAR10_SOURCE here; the download elsewhere) before planning, and a second launch reuses it."""
    monkeypatch.setenv("CIFAR10_SOURCE", str(cifar_source))
    data = tmp_path / "fresh"
    args = ("jobs/launch.py", "--arch", "resnet9_tiny", "--profile", "smoke", "--local", "--dry-run",
            "--runs", str(tmp_path / "runs"), f"data.dir={data}")
    r = run_main(*args)
    assert r.returncode == 0, r.stderr
    assert "no .beton files yet; preparing CIFAR-10" in r.stdout and f"using CIFAR10_SOURCE={cifar_source}" in r.stdout
    assert {p.name for p in data.iterdir()} >= {"train.beton", "test.beton", "cifar10.json"}
    again = run_main(*args)
    assert again.returncode == 0 and "preparing" not in again.stdout


# ---- loader start-up failures: one error line each (issue #21 item 1) ----------------------------


def _small_trainer_args(beton_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    from conftest import small_run_args

    return [*small_run_args(beton_dir, "train.epochs=1", "data.train_subset=200", "data.test_subset=100", *extra),
            "--run-dir", str(run_dir)]


@pytest.mark.parametrize("loader", ["ffcv", "resident"])
def test_data_dir_without_the_files_is_one_line(loader, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_main("trainer", *_small_trainer_args(empty, tmp_path / "run", f"data.loader={loader}"))
    one_error_line(r, f"{empty / 'train.beton'}: not found; convert CIFAR-10 first: python -m trainer.data prepare")


@pytest.mark.parametrize("loader", ["ffcv", "resident"])
def test_ffcv_that_does_not_import_is_one_line_saying_what_to_do(loader, beton_dir, tmp_path, monkeypatch):
    # As where ffcv's wheel or a library it links fails to load: every ffcv module hidden.
    for name in [n for n in sys.modules if n == "ffcv" or n.startswith("ffcv.")] + ["ffcv"]:
        monkeypatch.setitem(sys.modules, name, None)
    r = run_main("trainer", *_small_trainer_args(beton_dir, tmp_path / "run", f"data.loader={loader}"))
    one_error_line(r, "data.format=beton: ffcv, which reads the .beton files, does not import here",
                   "./setup.sh", "data.loader=resident data.format=python")


def _dying_pipeline(*args, **kwargs):
    # What numba raises in ffcv's thread when it cannot compile a pipeline: a message of many lines.
    raise RuntimeError("Failed in nopython mode pipeline (step: nopython frontend)\nUntyped global name 'x'")


@pytest.mark.parametrize("loader", ["ffcv", "resident"])
def test_ffcv_thread_that_dies_is_one_line_not_a_hang(loader, beton_dir, tmp_path, monkeypatch):
    # ffcv compiles and runs its pipeline in a thread of its own; before, the thread's death left the
    # training loop waiting on its queue for ever, after a traceback.
    from ffcv.loader.epoch_iterator import EpochIterator

    monkeypatch.setattr(EpochIterator, "run_pipeline", _dying_pipeline)
    r = run_main("trainer", *_small_trainer_args(beton_dir, tmp_path / "run", f"data.loader={loader}"))
    line = one_error_line(r, "train.beton: ffcv's loader thread failed (RuntimeError: Failed in nopython mode "
                             "pipeline (step: nopython frontend)); ./setup.sh", "data.loader=resident")
    assert "Untyped" not in line


def test_more_threads_than_numba_allows_are_lowered_or_one_line(beton_dir, capsys, monkeypatch):
    import numba

    from trainer.data import common
    from trainer.data.ffcv_loader import ffcv_loader

    common._LOWERED.clear()
    monkeypatch.setattr(numba.config, "NUMBA_NUM_THREADS", 1)  # as NUMBA_NUM_THREADS=1 in the environment
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # on 2 cores (one core would be the limit)
    assert common.loader_workers(2) == 1
    assert "data.num_workers=2 is more than the 1 threads numba may start here (NUMBA_NUM_THREADS); using 1" in \
        capsys.readouterr().err
    monkeypatch.undo()
    # Asked of ffcv itself (the loaders lower it first): its refusal is one line naming the file.
    too_many = numba.config.NUMBA_NUM_THREADS + 1
    with pytest.raises(UserError, match=r"train.beton: ffcv could not start its loader \(ValueError: The number of "
                                        r"threads must be between 1 and \d+\)$"):
        ffcv_loader(beton_dir / "train.beton", batch_size=100, num_workers=too_many)


def test_batch_bigger_than_the_data_is_one_line(beton_dir, tmp_path):
    r = run_main("trainer", *_small_trainer_args(beton_dir, tmp_path / "run", "data.batch_size=400"))
    one_error_line(r, "data.batch_size=400 exceeds the 200 training images")
