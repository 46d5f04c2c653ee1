"""Progress of long jobs (sampling, Inception features, latent extraction) in the log."""

from __future__ import annotations

import time

from absl import logging


class Progress:
    """Logs `<what> done/total (rate, ETA)` as work finishes, at most every `every_secs`
    (and always at the end). The rate counts only this run's work, not what an earlier
    run left done (`done`), so the ETA of a resumed job is not flattered."""

    def __init__(self, what: str, total: int, done: int = 0, every_secs: float = 0.0):
        self.what, self.total, self.done, self.every_secs = what, total, done, every_secs
        self._resumed_at = done
        self._start = self._logged = time.perf_counter()

    def add(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self._logged >= self.every_secs or self.done >= self.total:
            self._logged = now
            rate = (self.done - self._resumed_at) / max(now - self._start, 1e-9)
            eta = int((self.total - self.done) / max(rate, 1e-9))
            logging.info(
                "%s %d/%d (%.1f images/s, ETA %dh%02dm%02ds)",
                self.what,
                self.done,
                self.total,
                rate,
                eta // 3600,
                eta % 3600 // 60,
                eta % 60,
            )
