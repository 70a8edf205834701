"""`densenet-fast train`: a short run on the embedded digits, IDX files, checkpoints."""

import gzip
import json

import pytest
import torch
from test_sync_batchnorm import expected_collectives
from tolerances import assert_close

from densenet_fast import DenseNet
from densenet_fast.training.checkpoint import load_checkpoint
from densenet_fast.training.data import load_embedded, load_idx, to_inputs
from densenet_fast.training.loop import TrainConfig, run_training
from densenet_fast.training.recipe import (
    RECIPES,
    distort,
    learning_rate,
    refresh_running_statistics,
)

# The loop's mechanics on the seed's recipe (a constant rate: the loss falls within steps).
SMALL = dict(growth_rate=8, block_config=(2, 2), batch_size=32, image_size=16, lr=3e-3,
             train_limit=320, test_limit=100, progress=False, recipe="seed")


def test_embedded_digits_are_real_and_balanced():
    train, test = load_embedded()
    assert len(train) == 4000 and len(test) == 1000
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (28, 28)
    assert torch.bincount(test.labels).tolist() == [100] * 10
    assert torch.bincount(train.labels[:100]).tolist() == [10] * 10  # interleaved classes
    assert train.images.float().mean() > 20  # ink on the page, not an empty array


def test_short_run_drives_the_loss_down_and_writes_outputs(tmp_path):
    metrics = run_training(TrainConfig(epochs=2, out_dir=str(tmp_path), **SMALL))
    losses = metrics["step_losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2, losses
    for name in ("predictions.png", "curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert [h["epoch"] for h in written["history"]] == [1, 2]
    assert written["test_images"] == 100 and 0.0 <= written["test_accuracy"] <= 1.0


def _write_idx(path, array: torch.Tensor, compress: bool):
    header = bytes([0, 0, 0x08, array.dim()]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.to(torch.uint8).numpy().tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def test_idx_files_in_torchvision_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = torch.randint(0, 256, (7, 28, 28))
    labels = torch.randint(0, 10, (7,))
    _write_idx(raw / "train-images-idx3-ubyte", images, compress=False)
    _write_idx(raw / "train-labels-idx1-ubyte", labels, compress=False)
    _write_idx(raw / "t10k-images-idx3-ubyte.gz", images[:3], compress=True)
    _write_idx(raw / "t10k-labels-idx1-ubyte.gz", labels[:3], compress=True)
    train, test = load_idx(tmp_path)
    assert torch.equal(train.images, images.to(torch.uint8)) and torch.equal(train.labels, labels)
    assert len(test) == 3
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01" + b"\x00"))
    with pytest.raises(ValueError, match="header promises"):
        load_idx(tmp_path)


def test_resume_continues_exactly_where_it_stopped(tmp_path):
    full = run_training(TrainConfig(epochs=2, out_dir=str(tmp_path / "full"),
                                    save=str(tmp_path / "full.pt"), **SMALL))
    run_training(TrainConfig(epochs=1, out_dir=str(tmp_path / "a"),
                             save=str(tmp_path / "half.pt"), **SMALL))
    resumed = run_training(TrainConfig(epochs=2, out_dir=str(tmp_path / "b"),
                                       resume=str(tmp_path / "half.pt"),
                                       save=str(tmp_path / "resumed.pt"), **SMALL))
    assert resumed["step_losses"] == full["step_losses"][-len(resumed["step_losses"]):]
    def without_time(history):
        return [{k: v for k, v in h.items() if k != "seconds"} for h in history]

    assert without_time(resumed["history"]) == without_time(full["history"])
    config = TrainConfig(**SMALL).model_config()
    a = load_checkpoint(tmp_path / "full.pt", config)["model"]
    b = load_checkpoint(tmp_path / "resumed.pt", config)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_bad_checkpoints_are_refused_before_anything_loads(tmp_path):
    run_training(TrainConfig(epochs=1, out_dir=str(tmp_path), save=str(tmp_path / "ck.pt"),
                             **SMALL))
    data = (tmp_path / "ck.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="unreadable"):
        run_training(TrainConfig(epochs=2, out_dir=str(tmp_path),
                                 resume=str(tmp_path / "truncated.pt"), **SMALL))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="was not written by 'densenet-fast train'"):
        run_training(TrainConfig(epochs=2, out_dir=str(tmp_path),
                                 resume=str(tmp_path / "foreign.pt"), **SMALL))
    other = dict(SMALL, growth_rate=6)
    with pytest.raises(ValueError, match="holds a model built with"):
        run_training(TrainConfig(epochs=2, out_dir=str(tmp_path),
                                 resume=str(tmp_path / "ck.pt"), **other))


def test_train_command_end_to_end(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "densenet_fast.cli", "train", "--growth-rate", "8",
         "--block-config", "2,2", "--epochs", "1", "--image-size", "16", "--batch-size", "32",
         "--train-limit", "128", "--test-limit", "50", "--quiet", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "test accuracy" in proc.stdout and (tmp_path / "metrics.json").exists()
    bad = subprocess.run([sys.executable, "-m", "densenet_fast.cli", "train", "--resume",
                          str(tmp_path / "nope.pt"), "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


@pytest.mark.parametrize("options", [[], ["--sync-bn"]], ids=["per-process-bn", "sync-bn"])
def test_two_process_ddp_ends_with_identical_weights(tmp_path, options):
    import os
    import subprocess
    import sys

    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo")  # loopback only
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "densenet_fast.cli", "train", "--growth-rate", "8", "--block-config", "2,2",
         "--epochs", "1", "--image-size", "16", "--batch-size", "16", "--train-limit", "256",
         "--test-limit", "50", "--threads", "1", "--quiet", "--out-dir", str(tmp_path),
         *options],
        env=env, capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["processes"] == 2
    first, second = metrics["parameter_checksums"]
    assert first == second, "the two processes' weights diverged"
    # Synchronised: every step's statistics went through the fused blocks' collectives
    # (evaluation, in eval mode, takes none).
    expected = len(expected_collectives(dict(growth_rate=8, block_config=(2, 2),
                                             num_init_features=16, bn_size=4)))
    assert metrics["sync_bn_collectives_per_step"] == (expected if options else 0)
    assert proc.stdout.count("test accuracy ") == 2  # one epoch line and one summary, rank 0



def test_one_cycle_schedule_warms_up_then_decays_to_zero():
    recipe = RECIPES["default"]
    rates = [learning_rate(recipe, step, 100) for step in range(100)]
    peak = rates.index(max(rates))
    assert max(rates) == recipe.lr and peak == 14  # 15% warm-up
    assert all(a < b for a, b in zip(rates[:peak], rates[1:peak + 1], strict=True))
    assert all(a >= b for a, b in zip(rates[peak:], rates[peak + 1:], strict=False))
    assert rates[-1] < 1e-3 * recipe.lr
    assert learning_rate(RECIPES["seed"], 50, 100) == RECIPES["seed"].lr


def test_distortions_are_small_seeded_and_keep_the_background():
    x = to_inputs(load_embedded()[0].images[:8], 32)
    first = distort(x, torch.Generator().manual_seed(3))
    assert torch.equal(first, distort(x, torch.Generator().manual_seed(3)))
    assert first.shape == x.shape and not torch.equal(first, x)
    assert (first[:, :, 0, :] == -1).float().mean() > 0.9  # the border stays background
    # Small: each distorted digit is still closer to itself than to any other digit.
    distances = torch.cdist(first.flatten(1), x.flatten(1))
    assert torch.equal(distances.argmin(1), torch.arange(8))


def test_refreshed_statistics_are_the_training_set_average():
    torch.manual_seed(0)
    model = DenseNet(growth_rate=4, block_config=(2,), num_init_features=8, num_classes=10,
                     in_channels=1)
    x = torch.randn(48, 1, 16, 16)
    refresh_running_statistics(model, x, batch_size=16)
    batches = [x[i:i + 16] for i in (0, 16, 32)]
    stem_means = [model.features.conv0(b).mean((0, 2, 3)) for b in batches]
    assert_close(model.features.norm0.running_mean, torch.stack(stem_means).mean(0),
                 torch.float32, "norm0 running mean")
    assert model.features.norm0.momentum == 0.1 and model.training
