"""The progress bar of the long measurements."""

from __future__ import annotations


def progress_bar(total: int | None, enabled: bool, desc: str):
    """A tqdm bar, or None when disabled or tqdm is missing."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False)
