"""Recalibration of a pruned model: fine-tuning with masks held, optional distillation, BN re-estimation.

Pruned taps stay pruned because :class:`~timm_deprune.layers.MaskedConv2d` trains with the masked weight (their
gradients are zero) and removed channels no longer exist. Data comes from any loader yielding ``(images,
labels)``; :func:`create_loaders` builds them with timm's own pipeline (ImageFolder, ``hfds/``, ... as in timm's
train.py). Multi-process / multi-GPU runs go through Hugging Face Accelerate (``accelerator=``).
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RecalibrateConfig", "RecalibrateResult", "recalibrate", "recalibrate_bn", "evaluate", "create_loaders"]

_CKPT = "recalibrate_last.pt"


@dataclass(frozen=True)
class RecalibrateConfig:
    """Fine-tuning settings.

    Args:
        epochs: passes over the training loader.
        max_steps: stop after this many optimizer steps in total (None: ``epochs * len(loader)``).
        lr: peak learning rate (AdamW); cosine decay to ``min_lr`` after ``warmup_steps`` of linear warmup.
        weight_decay: AdamW weight decay (pruned taps have zero weight and zero gradient, so they stay zero).
        kd_alpha: weight of the distillation loss when a teacher is given (``(1 - kd_alpha)`` on the labels).
        kd_temperature: softmax temperature of the distillation KL term.
        label_smoothing: cross-entropy label smoothing.
        amp: mixed precision: None = on CUDA only (bf16 where supported, else fp16 with a grad scaler).
        bn_batches: batches of BN statistics re-estimation before fine-tuning (0: none).
        checkpoint_dir: where to keep a resumable checkpoint (every ``checkpoint_every`` steps and at the end).
        seed: seeds the data order of every epoch, so a resumed run sees the same batches.
        progress: tqdm progress bars.
    """

    epochs: int = 1
    max_steps: Optional[int] = None
    lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_steps: int = 0
    weight_decay: float = 1e-5
    kd_alpha: float = 0.5
    kd_temperature: float = 4.0
    label_smoothing: float = 0.0
    amp: Optional[bool] = None
    bn_batches: int = 0
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 100
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "checkpoint_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 0):
            raise ValueError(f"max_steps must be a non-negative int or None, got {self.max_steps!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise ValueError(f"kd_alpha must be in [0, 1], got {self.kd_alpha}")
        if self.kd_temperature <= 0:
            raise ValueError(f"kd_temperature must be positive, got {self.kd_temperature}")
        if self.bn_batches < 0 or self.warmup_steps < 0:
            raise ValueError(f"bn_batches and warmup_steps must be >= 0, got {self.bn_batches}, {self.warmup_steps}")


@dataclass
class RecalibrateResult:
    steps: int
    epochs_done: int
    losses: list[float] = field(default_factory=list)  # mean training loss per epoch (this run)
    resumed_from: Optional[int] = None  # step of the checkpoint the run resumed from


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _batches(loader: Iterable, device: torch.device):
    for batch in loader:
        x, y = batch[0], batch[1]
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def batch_inputs(loader: Iterable, device: torch.device):
    """The input tensor of every batch of ``loader``: batches are input tensors or ``(input, target, ...)``
    sequences (a DataLoader of a labelled dataset); labels are ignored."""
    for i, batch in enumerate(loader):
        x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"batch {i} must be an input tensor or an (input, target) pair, got"
                            f" {type(batch).__name__}" + (f" of {type(x).__name__}" if x is not batch else ""))
        yield x.to(device, non_blocking=True)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Iterable, num_batches: int = 50, progress: bool = False) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics on ``num_batches`` batches (no gradients).

    ``loader`` yields input tensors or ``(input, target)`` pairs; labels are not needed and are ignored. A cheap
    first step after pruning: the statistics of the pruned network's activations replace the dense ones.
    """
    from tqdm.auto import tqdm

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    was_training = model.training
    model.train()
    device = _device_of(model)
    try:
        seen = 0
        for x in tqdm(batch_inputs(loader, device), total=num_batches, disable=not progress, desc="BN recalibration"):
            model(x)
            seen += 1
            if seen >= num_batches:
                break
        if seen == 0:
            raise ValueError("recalibrate_bn got an empty loader")
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was_training)
    return model


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, *, accelerator=None, amp: Optional[bool] = None,
             progress: bool = False) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy of ``model`` on ``loader`` (eval mode).

    Example:
        >>> evaluate(model, val_loader)  # doctest: +SKIP
        {'top1': 71.2, 'top5': 90.1, 'loss': 1.21, 'samples': 50000}
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = accelerator.device if accelerator is not None else _device_of(model)
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    try:
        for x, y in tqdm(_batches(loader, device), disable=not progress, desc="evaluate"):
            with _autocast(device, amp):
                logits = model(x)
            logits = logits.float()
            if accelerator is not None:
                logits, y = accelerator.gather_for_metrics((logits, y))
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit = top == y[:, None]
            correct1 += int(hit[:, 0].sum())
            correct5 += int(hit.any(1).sum())
            total += int(y.numel())
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("evaluate got an empty loader")
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total, "loss": loss_sum / total,
            "samples": total}


def _autocast(device: torch.device, amp: Optional[bool]):
    use = (device.type == "cuda") if amp is None else bool(amp)
    if not use:
        return torch.autocast(device_type=device.type, enabled=False)
    dtype = torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _lr_lambda(cfg: RecalibrateConfig, total: int):
    floor = cfg.min_lr / cfg.lr

    def fn(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        t = (step - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return fn


def _save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{path.stem}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic: an interrupted save never replaces a good checkpoint
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def recalibrate(model: nn.Module, train_loader: Iterable, config: RecalibrateConfig = RecalibrateConfig(), *,
                teacher: Optional[nn.Module] = None, accelerator=None) -> RecalibrateResult:
    """Fine-tune a pruned ``model`` in place with its masks held.

    Args:
        model: the pruned model (its masked depth-wise convs keep pruned taps at zero).
        train_loader: yields ``(images, labels)``; a timm loader from :func:`create_loaders` or any DataLoader.
        config: schedule, distillation, AMP, checkpointing.
        teacher: the dense model for knowledge distillation (KL on logits at ``config.kd_temperature``).
        accelerator: an ``accelerate.Accelerator`` for multi-process / multi-GPU runs (``accelerate launch``);
            model, optimizer and loader are prepared by it and only the main process writes checkpoints.

    Returns:
        steps done, per-epoch mean loss, and the step a resumed run started from.
    """
    from tqdm.auto import tqdm

    if not isinstance(config, RecalibrateConfig):
        raise TypeError(f"config must be a RecalibrateConfig, got {type(config).__name__}")
    try:
        steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError("train_loader must have a length (a DataLoader or timm loader)") from None
    if steps_per_epoch == 0:
        raise ValueError("train_loader is empty")
    total = config.max_steps if config.max_steps is not None else config.epochs * steps_per_epoch
    main = accelerator is None or accelerator.is_main_process
    device = accelerator.device if accelerator is not None else _device_of(model)

    if config.bn_batches:
        recalibrate_bn(model, train_loader, config.bn_batches, progress=config.progress and main)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() > 1]
    no_decay = [p for p in params if p.dim() <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, total))
    use_scaler = device.type == "cuda" and (config.amp is None or config.amp) and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler and accelerator is None)
    if accelerator is not None:
        model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    teacher_mode = teacher.training if teacher is not None else False
    if teacher is not None:
        teacher = teacher.to(device).eval()  # run under no_grad below; its parameters are left as they are

    step, resumed = 0, None
    ckpt = Path(config.checkpoint_dir) / _CKPT if config.checkpoint_dir else None
    raw = accelerator.unwrap_model(model) if accelerator is not None else model
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        raw.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = resumed = int(state["step"])

    def save():
        if ckpt is not None and main:
            _save_checkpoint(ckpt, {"model": raw.state_dict(), "optimizer": optimizer.state_dict(),
                                    "scheduler": scheduler.state_dict(), "step": step, "config": asdict(config)})
        if accelerator is not None:
            accelerator.wait_for_everyone()

    losses: list[float] = []
    model.train()
    bar = tqdm(total=total, initial=step, disable=not (config.progress and main), desc="recalibrate")
    epoch = step // steps_per_epoch
    while step < total:
        torch.manual_seed(config.seed + epoch)  # the epoch's data order: a resumed run replays it exactly
        skip = step - epoch * steps_per_epoch
        epoch_loss, n = 0.0, 0
        for i, (x, y) in enumerate(_batches(train_loader, device)):
            if i < skip:
                continue  # batches this epoch already trained on before the interruption
            if step >= total:
                break
            with _autocast(device, config.amp):
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
                if teacher is not None:
                    with torch.no_grad():
                        t_logits = teacher(x).float()
                    temp = config.kd_temperature
                    kd = F.kl_div(F.log_softmax(logits.float() / temp, 1), F.log_softmax(t_logits / temp, 1),
                                  reduction="batchmean", log_target=True) * temp * temp
                    loss = (1 - config.kd_alpha) * loss + config.kd_alpha * kd
            optimizer.zero_grad(set_to_none=True)
            if accelerator is not None:
                accelerator.backward(loss)
            else:
                scaler.scale(loss).backward()
            if accelerator is None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            step += 1
            epoch_loss += float(loss.detach())
            n += 1
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if step % config.checkpoint_every == 0:
                save()
        if n:
            losses.append(epoch_loss / n)
        epoch += 1
    bar.close()
    if accelerator is not None and accelerator.num_processes > 1:
        from timm.utils import distribute_bn

        distribute_bn(model, accelerator.num_processes, reduce=True)  # every rank ends with the same BN statistics
    save()
    model.eval()
    if teacher is not None:
        teacher.train(teacher_mode)
    return RecalibrateResult(steps=step, epochs_done=epoch, losses=losses, resumed_from=resumed)


def create_loaders(data_dir: str, model: nn.Module, *, batch_size: int = 64, dataset: str = "",
                   train_split: str = "train", val_split: str = "validation", num_workers: int = 2,
                   train_samples: Optional[int] = None, input_size: Optional[tuple[int, int, int]] = None,
                   no_aug: bool = False, distributed: bool = False):
    """Train and validation loaders from timm's pipeline (``create_dataset`` / ``create_loader``), as in train.py.

    ``dataset`` is timm's dataset name ("" for an ImageFolder root with ``train/`` and ``validation/`` (or
    ``val/``) folders, ``hfds/NAME`` for a Hugging Face dataset). Preprocessing follows the model's
    ``pretrained_cfg`` (``resolve_data_config``); ``input_size`` overrides it. Returns ``(train, val)``; a split
    that does not exist gives None.
    """
    from timm.data import create_dataset, create_loader, resolve_data_config

    cfg = resolve_data_config({"input_size": input_size} if input_size else {}, model=model)
    device = _device_of(model)
    loaders = []
    for split, training in ((train_split, True), (val_split, False)):
        try:
            ds = create_dataset(dataset, root=data_dir, split=split, is_training=training, batch_size=batch_size,
                                num_samples=train_samples if training else None)
        except (FileNotFoundError, RuntimeError, AssertionError) as e:
            if training:
                raise ValueError(f"no training split {split!r} under {data_dir}: {e}") from e
            loaders.append(None)
            continue
        loaders.append(create_loader(
            ds, input_size=cfg["input_size"], batch_size=batch_size, is_training=training, no_aug=no_aug,
            interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"], crop_pct=cfg["crop_pct"],
            num_workers=num_workers, distributed=distributed, device=device, use_prefetcher=False,
            persistent_workers=False))
    return tuple(loaders)
