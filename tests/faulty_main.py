"""`python -m dtr_jax.main` with a fault injected, for tests/test_faults.py and
tests/test_interruptions.py.

The fault is named by the environment variable DTR_TEST_FAULT (the production code
knows nothing of it):

  slow_meta      every checkpoint's meta write (in Orbax's async save thread) waits
                 DTR_TEST_SLOW seconds first, after printing 'FAULT: saving <step>'
                 to stderr: a kill then lands inside an unfinished save;
  slow_commit    every commit record waits likewise after 'FAULT: committing <step>':
                 a kill then leaves a complete but uncommitted step;
  enospc:<step>  writing checkpoint <step> fails with ENOSPC, as on a full disk;
  slow_shard:<name>  `--mode extract` waits likewise before the last record of the shard
                 file <name>, after 'FAULT: completing <name>': a kill then leaves it
                 unfinished;
  no_torch       torch cannot be imported, as where it is not installed;
  cheap_fid      not a fault: the Fréchet distance is a cheap function of the same
                 statistics (its 2048x2048 matrix square root takes a minute or more on
                 2 cores), for a test of the path to it, not of its value.
"""

import errno
import os
import re
import sys
import time

import numpy as np

FAULT = os.environ.get("DTR_TEST_FAULT", "")


class _NoTorch:
    """A meta-path finder for which torch is not installed (`import torch` fails)."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


if FAULT == "no_torch":
    sys.meta_path.insert(0, _NoTorch())

# Imported after the finder is in place, so that torch is blocked from the start.
from orbax.checkpoint._src.handlers import json_checkpoint_handler  # noqa: E402

from dtr_jax import checkpoint, main, metrics  # noqa: E402
from dtr_jax.data import latents  # noqa: E402

SLOW = float(os.environ.get("DTR_TEST_SLOW", "2"))


def _announce(what: str) -> None:
    sys.stderr.write(f"FAULT: {what}\n")  # one write: never interleaved with a log line
    sys.stderr.flush()
    time.sleep(SLOW)


def _step_of(directory) -> int:
    return int(re.search(r"/(\d+)(\.orbax-checkpoint-tmp[^/]*)?/meta", str(directory)).group(1))


_save_meta = json_checkpoint_handler.JsonCheckpointHandler._save_fn


async def _faulty_save_meta(self, x, directory):
    step = _step_of(directory)
    if FAULT == "slow_meta":
        _announce(f"saving {step}")
    if FAULT == f"enospc:{step}":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
    return await _save_meta(self, x, directory)


_commit = checkpoint.Checkpoints._commit_previous


def _slow_commit(self):
    if self._pending is not None:
        _announce(f"committing {self._pending[0]}")
    return _commit(self)


_write_record = latents.ShardWriter.write


def _slow_last_record(self, record):
    if self.left == 1 and FAULT == f"slow_shard:{self.path.name}":
        _announce(f"completing {self.path.name}")
    return _write_record(self, record)


def _cheap_distance(mu1, sigma1, mu2, sigma2):
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2))


json_checkpoint_handler.JsonCheckpointHandler._save_fn = _faulty_save_meta
if FAULT == "cheap_fid":
    metrics.frechet_distance = _cheap_distance
if FAULT == "slow_commit":
    checkpoint.Checkpoints._commit_previous = _slow_commit
if FAULT.startswith("slow_shard:"):
    latents.ShardWriter.write = _slow_last_record

if __name__ == "__main__":
    main.run()
