"""A JSON file of measured choices that processes on one machine share.

The Triton launchers' tuned configs (``ops/triton_tuning.py``) and the C++ kernels' GEMM
engines (``cpu_engine_cache.py``) are measured once and kept here, so that later processes
neither pay for the measurement again nor choose differently from the first.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/densenet_fast`` (``~/.cache/densenet_fast`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "densenet_fast"


class DiskCache:
    """The JSON file at ``path()``: a dict, read once and merged on every write.

    Writes go to a temporary file renamed over the cache (atomic), under an exclusive
    ``flock`` where the platform has one, so concurrent processes add to each other's entries.
    A cache that cannot be read starts empty; one that cannot be written is warned about
    once (naming ``what`` is kept and ``env``, the variable that moves it), and the results
    then last for the process."""

    def __init__(self, path: Callable[[], Path], what: str, env: str):
        self._path_of, self._what, self._env = path, what, env
        self._entries: dict | None = None
        self._path: Path | None = None
        self._warned = False
        self._lock = threading.Lock()

    def _load(self) -> dict:
        path = self._path_of()
        if self._entries is None or path != self._path:
            self._path, self._entries = path, self._read(path)
        return self._entries

    @staticmethod
    def _read(path: Path) -> dict:
        try:
            entries = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return entries if isinstance(entries, dict) else {}

    def get(self, key: str) -> Any:
        with self._lock:
            return self._load().get(key)

    def put(self, key: str, value: Any,
            merge: Callable[[Any, Any], Any] | None = None) -> None:
        """Store ``value`` under ``key``; with ``merge``, store ``merge(on_disk, value)``,
        where ``on_disk`` is what the file holds under ``key`` at the time of the write
        (``None`` if nothing), so that another process's entry is combined, not lost."""
        with self._lock:
            entries = self._load()
            path = self._path_of()
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with _exclusive(path.with_suffix(path.suffix + ".lock")):
                    on_disk = self._read(path)
                    stored = value if merge is None else merge(on_disk.get(key), value)
                    merged = {**on_disk, key: stored}
                    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name,
                                               suffix=".tmp")
                    with os.fdopen(fd, "w") as f:
                        json.dump(merged, f, indent=1, sort_keys=True)
                    os.replace(tmp, path)
                entries.update(merged)
            except OSError as exc:
                entries[key] = value
                if not self._warned:
                    self._warned = True
                    warnings.warn(f"densenet_fast: cannot write the {self._what} cache {path} "
                                  f"({exc}); set {self._env} to a writable file to keep "
                                  f"them across processes", stacklevel=3)

    def forget(self) -> None:
        """Drop what was read (the next lookup reads the file again)."""
        with self._lock:
            self._entries = None


@contextmanager
def _exclusive(lock_path: Path):
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the rename alone keeps the file whole
        yield
        return
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
