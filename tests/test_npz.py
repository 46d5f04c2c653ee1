"""ADM-style .npz at scale: memory-mapped reading, streamed concatenation, resumable parts."""

import numpy as np
import pytest

from dtr_jax import npz
from dtr_jax.errors import InputFileError


def _arrays(n=7, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "arr_0": rng.integers(0, 256, (n, 4, 5, 3), dtype=np.uint8),
        "arr_1": rng.integers(0, 10, n).astype(np.int32),
    }


def test_read_array_maps_np_savez_files_and_loads_compressed_ones(tmp_path):
    arrays = _arrays()
    np.savez(tmp_path / "plain.npz", **arrays)
    np.savez_compressed(tmp_path / "packed.npz", **arrays)
    for name in ("plain.npz", "packed.npz"):
        for key, value in arrays.items():
            read = npz.read_array(str(tmp_path / name), key)
            np.testing.assert_array_equal(read, value)
            assert read.dtype == value.dtype
    assert isinstance(npz.read_array(str(tmp_path / "plain.npz"), "arr_0"), np.memmap)
    assert not isinstance(npz.read_array(str(tmp_path / "packed.npz"), "arr_0"), np.memmap)
    assert npz.headers(str(tmp_path / "plain.npz"), "f") == {
        k: (v.shape, v.dtype) for k, v in arrays.items()
    }


def test_headers_refuse_what_is_not_an_npz(tmp_path):
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(InputFileError, match=r"eval\.samples='.*x\.npz' is not an \.npz"):
        npz.headers(str(tmp_path / "x.npz"), "eval.samples")


def test_concatenate_joins_every_key_and_is_mapped_back(tmp_path):
    parts = [_arrays(n, seed) for seed, n in enumerate((3, 5, 1))]
    sources = []
    for i, arrays in enumerate(parts):
        sources.append(str(tmp_path / f"p{i}.npz"))
        np.savez(sources[-1], **arrays)
    out = str(tmp_path / "all.npz")
    npz.concatenate(out, sources)
    with np.load(out) as data:  # a plain .npz: numpy (and ADM's reader) open it
        assert sorted(data.files) == ["arr_0", "arr_1"]
        for key in ("arr_0", "arr_1"):
            expected = np.concatenate([p[key] for p in parts])
            np.testing.assert_array_equal(data[key], expected)
            np.testing.assert_array_equal(npz.read_array(out, key), expected)
    assert isinstance(npz.read_array(out, "arr_0"), np.memmap)


def test_digest_names_settings():
    assert npz.digest({"a": 1, "b": "x"}) == npz.digest({"b": "x", "a": 1})
    assert npz.digest({"a": 1, "b": "x"}) != npz.digest({"a": 2, "b": "x"})
    assert len(npz.digest({})) == 8


class Interrupt(Exception):
    pass


def _compute(calls, fail_at=None):
    def compute(i):
        if i == fail_at:
            raise Interrupt
        calls.append(i)
        return {"x": np.full((2, 3), i, np.float32)}

    return compute


def test_parts_resume_after_an_interruption(tmp_path):
    directory = str(tmp_path / "job")
    calls = []
    with pytest.raises(Interrupt):
        npz.Parts(4, directory).fill(_compute(calls, fail_at=2), [2] * 4, "done")
    assert calls == [0, 1]
    assert sorted(p.name for p in (tmp_path / "job").iterdir()) == [
        "part-00000.npz",
        "part-00001.npz",
    ]
    parts = npz.Parts(4, directory)
    parts.fill(_compute(calls), [2] * 4, "done")
    assert calls == [0, 1, 2, 3]  # the rerun computed only the missing parts
    (x,) = parts.concatenated("x", dtype=np.float64)
    assert x.dtype == np.float64
    np.testing.assert_array_equal(x[:, 0], [0, 0, 1, 1, 2, 2, 3, 3])
    parts.fill(_compute(calls, fail_at=0), [2] * 4, "done")  # all done: nothing computed
    parts.remove()
    assert not (tmp_path / "job").exists()


def test_parts_without_a_directory_stay_in_memory():
    calls = []
    parts = npz.Parts(3)
    parts.fill(_compute(calls), [2, 2, 2], "done")
    assert calls == [0, 1, 2] and parts.concatenated("x")[0].shape == (6, 3)
    assert parts.done().all()


def test_progress_counts_only_this_runs_work_and_throttles_to_the_end(monkeypatch):
    from dtr_jax import progress as progress_lib

    clock, lines = [100.0], []
    monkeypatch.setattr(progress_lib.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(progress_lib.logging, "info", lambda fmt, *a: lines.append(fmt % a))
    progress = progress_lib.Progress("sampled", total=100, done=40, every_secs=10)
    clock[0] += 5
    progress.add(10)  # 5 s since the start: below every_secs, nothing logged
    clock[0] += 5
    progress.add(10)  # 20 new rows in 10 s: 2/s, 40 left
    clock[0] += 1
    progress.add(40)  # the end is always logged
    assert lines == [
        "sampled 60/100 (2.0 images/s, ETA 0h00m20s)",
        "sampled 100/100 (5.5 images/s, ETA 0h00m00s)",
    ]
