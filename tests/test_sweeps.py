"""The memory searches' arithmetic, on synthetic jobs (the CLI tests run real ones)."""

import pytest

from densenet_fast.benchmark import sweeps


def _counted(answer: int):
    tried = []

    def fits(n: int) -> bool:
        tried.append(n)
        return n <= answer

    return fits, tried


@pytest.mark.parametrize("answer", [0, 1, 2, 7, 100, 513, 1023, 1024])
@pytest.mark.parametrize("guess", [None, 1, 3, 99, 100, 101, 512, 700, 1024, 5000])
def test_largest_finds_the_answer_from_any_guess(answer, guess):
    fits, _ = _counted(answer)
    assert sweeps._largest(fits, 1024, guess) == answer


def test_a_close_guess_costs_a_handful_of_tries():
    """Doubling then bisection to 1024 takes about twenty tries; a guess within 1% a few."""
    for answer in (300, 811, 1000):
        fits, blind = _counted(answer)
        sweeps._largest(fits, 1024)
        fits, guided = _counted(answer)
        assert sweeps._largest(fits, 1024, round(answer * 1.005)) == answer
        assert len(guided) <= 6 < len(blind), (answer, guided, blind)


def test_affine_guess_extrapolates_the_per_image_cost():
    # 100 MiB of weights and state, 10 MiB per image: 1 GiB holds 92 images.
    mib = 2**20
    peaks = {8: 100 * mib + 8 * 10 * mib, 16: 100 * mib + 16 * 10 * mib}
    assert sweeps._affine_guess(peaks, 1024 * mib, 1024) == 92
    assert sweeps._affine_guess({8: 5, 16: 5}, 10, 64) == 64  # no cost per image: the cap


def test_largest_batch_guesses_from_two_probes(monkeypatch):
    """The search measures 8 and 16, then starts where their line meets the budget."""
    mib = 2**20

    def fake_fits(name, config, budget, settings, tries, label, on_try=None):
        peak = 100 * mib + config.batch_size * 10 * mib
        tries.append({**label, "total_peak_bytes": peak})
        return peak <= budget

    monkeypatch.setattr(sweeps, "_fits_budget", fake_fits)
    config = sweeps.depth_config(40)
    result = sweeps.largest_batch("densenet_fast", config, 1024 * mib, None, max_batch=1024)
    batches = [t["batch"] for t in result["tries"]]
    assert result["max_batch"] == 92
    assert batches[:3] == [8, 16, 92] and len(batches) <= 5, batches


def test_out_of_memory_on_cuda_ends_the_try_not_the_search(monkeypatch):
    """On CUDA the tries run in the searching process: running out of memory is a try that
    does not fit, recorded with the error's first line, and leaves no exception behind."""
    import types

    import torch

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\ndetails")

    monkeypatch.setattr(sweeps, "measure_in_process", out_of_memory)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    tries, seen = [], []
    fits = sweeps._fits_budget("densenet_fast", sweeps.depth_config(40), 2**30,
                               types.SimpleNamespace(device="cuda"), tries, {"batch": 64},
                               lambda name, attempt: seen.append((name, attempt)))
    assert not fits
    assert tries == [{"batch": 64, "error": "densenet_fast (train) ran out of memory: "
                                            "CUDA out of memory. Tried to allocate 2.00 GiB"}]
    assert seen == [("densenet_fast", tries[0])]
