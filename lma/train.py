"""Training and evaluation of DLRM models with any embedding kind at any memory budget."""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lma.checkpoint import save_checkpoint
from lma.data import DataSource, open_source, random_split, take, time_split
from lma.embeddings import EMBEDDINGS, EmbeddingSpec, build_embedding
from lma.features import Encoded, FeatureMap
from lma.metrics import log_loss, roc_auc
from lma.model import DLRM, DLRMConfig
from lma.schema import Schema

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "adagrad", "sgd")


@dataclass
class TrainConfig:
    data: str = "synth:100000"
    schema: str | None = None
    embedding: str = "full"
    compression: float = 1.0  # embedding params = full-table params / compression
    budget_bytes: int | None = None  # alternative to compression: fp32 bytes of embedding params
    dim: int = 16
    bottom_mlp: list[int] = field(default_factory=lambda: [64, 32])
    top_mlp: list[int] = field(default_factory=lambda: [64, 32])
    dropout: float = 0.0
    interaction: str = "dot"
    standardize: bool = False  # standardise dense features with the training rows' mean/std
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 256
    epochs: int = 10
    patience: int = 2  # epochs without a better validation AUC before stopping
    seed: int = 0
    threads: int = 0  # 0: torch's default
    split: str = "random"  # "random" (seeded permutation) or "time" (schema's time column)
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    min_count: int = 1  # vocabulary threshold of full tables (and of the budget's reference)
    options: dict[str, Any] = field(default_factory=dict)  # embedding-kind options
    on_error: str = "fail"
    device: str = "cpu"  # "cpu", "cuda", "cuda:N" or "auto" (cuda when available)
    out: str | None = None
    progress: bool = True

    def validate(self) -> None:
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"--embedding must be one of {sorted(EMBEDDINGS)}, got {self.embedding!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.compression <= 0:
            raise ValueError(f"--compression must be > 0, got {self.compression}")
        if self.embedding == "full" and (self.compression != 1 or self.budget_bytes):
            raise ValueError("full tables have a fixed size: use --compression 1 (or another kind)")
        if not (self.device in ("cpu", "auto") or self.device.startswith("cuda")):
            raise ValueError(f"--device must be cpu, cuda[:N] or auto, got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: no CUDA device is available here")
        if self.split not in ("random", "time"):
            raise ValueError(f"--split must be 'random' or 'time', got {self.split!r}")


@dataclass
class Splits:
    schema: Schema
    train: Encoded
    val: Encoded
    test: Encoded


@dataclass
class TrainResult:
    model: DLRM
    feature_map: FeatureMap
    metrics: dict[str, Any]
    history: list[dict[str, float]]
    out: Path | None


def load_splits(cfg: TrainConfig, source: DataSource | None = None) -> tuple[Splits, DataSource]:
    source = source or open_source(cfg.data, cfg.schema, on_error=cfg.on_error, progress=cfg.progress)
    data = source.read_all()
    if data.labels is None:
        raise ValueError(f"{cfg.data}: training needs labelled rows (this source has no label column)")
    n = len(data)
    if n < 10:
        raise ValueError(f"{cfg.data}: only {n} rows; training needs at least 10")
    if cfg.split == "time":
        times = getattr(data, "times", None)
        if times is None:
            raise ValueError(f"{cfg.data}: --split time needs a schema with a time column")
        tr, va, te = time_split(times, cfg.fractions)
    else:
        tr, va, te = random_split(n, cfg.seed, cfg.fractions)
    return Splits(source.schema, take(data, tr), take(data, va), take(data, te)), source


def embedding_budget(cfg: TrainConfig, fmap: FeatureMap) -> tuple[int, int]:
    """(full-table params, this run's embedding params)."""
    full = fmap.full_table_rows(cfg.min_count) * cfg.dim
    if cfg.embedding == "full":
        return full, full
    n = cfg.budget_bytes // 4 if cfg.budget_bytes else int(full / cfg.compression)
    return full, max(n, cfg.dim)


def build_model(cfg: TrainConfig, fmap: FeatureMap, train_tokens: np.ndarray) -> DLRM:
    full, n_params = embedding_budget(cfg, fmap)
    spec = EmbeddingSpec(
        kind=cfg.embedding, dim=cfg.dim, n_params=n_params, seed=cfg.seed,
        min_count=cfg.min_count, options=dict(cfg.options),
    )
    state = EMBEDDINGS[cfg.embedding].prepare(spec, fmap, train_tokens, progress=cfg.progress)
    emb = build_embedding(spec, fmap, **state)
    schema = fmap.schema
    mcfg = DLRMConfig(
        n_dense=len(schema.dense), slot_fields=schema.slot_fields(), dim=cfg.dim,
        bottom_mlp=list(cfg.bottom_mlp), top_mlp=list(cfg.top_mlp), dropout=cfg.dropout,
        interaction=cfg.interaction,
    )
    return DLRM(mcfg, emb)


def make_optimizers(cfg: TrainConfig, model: DLRM) -> list[torch.optim.Optimizer]:
    sparse = {id(p) for p in model.embedding.sparse_parameters()}
    dense_params = [p for p in model.parameters() if id(p) not in sparse and p.requires_grad]
    sparse_params = [p for p in model.parameters() if id(p) in sparse]
    opts: list[torch.optim.Optimizer] = []
    if cfg.optimizer == "adam":
        opts.append(torch.optim.Adam(dense_params, lr=cfg.lr, weight_decay=cfg.weight_decay))
        if sparse_params:
            opts.append(torch.optim.SparseAdam(sparse_params, lr=cfg.lr))
    elif cfg.optimizer == "adagrad":
        opts.append(torch.optim.Adagrad(dense_params + sparse_params, lr=cfg.lr,
                                        weight_decay=0.0 if sparse_params else cfg.weight_decay))
    else:
        opts.append(torch.optim.SGD(dense_params + sparse_params, lr=cfg.lr,
                                    weight_decay=0.0 if sparse_params else cfg.weight_decay))
    return opts


@torch.no_grad()
def predict_proba(model: nn.Module, data: Encoded, batch_size: int = 8192) -> np.ndarray:
    """Click probabilities (N,) float64 of every row."""
    model.eval()
    device = next(model.parameters()).device
    out = np.empty(len(data), dtype=np.float64)
    dense = torch.from_numpy(np.ascontiguousarray(data.dense))
    tokens = torch.from_numpy(np.ascontiguousarray(data.tokens))
    for s in range(0, len(data), batch_size):
        logits = model(dense[s : s + batch_size].to(device), tokens[s : s + batch_size].to(device))
        out[s : s + batch_size] = torch.sigmoid(logits).double().cpu().numpy()
    return out


def evaluate(model: nn.Module, data: Encoded) -> dict[str, float]:
    if data.labels is None:
        raise ValueError("evaluation needs labelled rows; this data has no label column "
                         "(score unlabelled rows with `lma predict`)")
    p = predict_proba(model, data)
    return {"auc": roc_auc(data.labels, p), "logloss": log_loss(data.labels, p), "rows": len(data)}


def train_model(cfg: TrainConfig, splits: Splits | None = None) -> TrainResult:
    """Train, early-stop on validation AUC, evaluate on test, and (with ``cfg.out``) save."""
    cfg.validate()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t_load = time.perf_counter()
    source = None
    if splits is None:
        splits, source = load_splits(cfg)
    t_load = time.perf_counter() - t_load

    fmap = FeatureMap.build(splits.schema, [splits.train])
    model = build_model(cfg, fmap, splits.train.tokens)
    if cfg.standardize and splits.train.dense.shape[1]:
        model.dense_mean.copy_(torch.from_numpy(splits.train.dense.mean(0)))
        model.dense_std.copy_(torch.from_numpy(splits.train.dense.std(0) + 1e-6))
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    )
    # The whole model, shared embedding memory included, stays resident on the device; the
    # hashed-gather op picks its GPU kernel for CUDA tensors.
    model.to(device)
    full_params, n_params = embedding_budget(cfg, fmap)
    opts = make_optimizers(cfg, model)
    loss_fn = nn.BCEWithLogitsLoss()

    train = splits.train
    dense = torch.from_numpy(np.ascontiguousarray(train.dense)).to(device)
    tokens = torch.from_numpy(np.ascontiguousarray(train.tokens)).to(device)
    labels = torch.from_numpy(np.ascontiguousarray(train.labels)).to(device)
    rng = np.random.default_rng(cfg.seed)
    n = len(train)
    n_batches = math.ceil(n / cfg.batch_size)

    best_auc, best_state, best_epoch, bad_epochs = -1.0, None, -1, 0
    history: list[dict[str, float]] = []
    train_time, rows_seen = 0.0, 0
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.from_numpy(rng.permutation(n)).to(device)
        bar = tqdm(total=n, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="row",
                   disable=not cfg.progress, leave=False)
        t0 = time.perf_counter()
        # Running loss kept on the device: reading it back every step would stall a GPU.
        running_t = torch.zeros((), device=device)
        for b in range(n_batches):
            idx = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            logits = model(dense[idx], tokens[idx])
            loss = loss_fn(logits, labels[idx])
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o in opts:
                o.step()
            running_t = 0.98 * running_t + 0.02 * loss.detach() if b else loss.detach()
            bar.update(len(idx))
            if b % 20 == 0 and cfg.progress:
                el = time.perf_counter() - t0
                bar.set_postfix(loss=f"{running_t.item():.4f}", rows_s=f"{bar.n / max(el, 1e-9):,.0f}")
        bar.close()
        running = float(running_t)
        train_time += time.perf_counter() - t0
        rows_seen += n
        val = evaluate(model, splits.val)
        history.append({"epoch": epoch + 1, "train_loss": running, "val_auc": val["auc"],
                        "val_logloss": val["logloss"]})
        log.info("epoch %d: loss %.4f val_auc %.4f val_logloss %.4f", epoch + 1, running,
                 val["auc"], val["logloss"])
        if cfg.progress:
            tqdm.write(f"epoch {epoch + 1}: train_loss {running:.4f} val_auc {val['auc']:.4f} "
                       f"val_logloss {val['logloss']:.4f}")
        if val["auc"] > best_auc:
            best_auc, best_epoch, bad_epochs = val["auc"], epoch + 1, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad_epochs += 1
            if bad_epochs >= cfg.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.cpu()  # evaluation and checkpoints on the host; the checkpoint loads anywhere
    test = evaluate(model, splits.test)
    val = evaluate(model, splits.val)
    emb = model.embedding
    metrics: dict[str, Any] = {
        "test_auc": test["auc"],
        "test_logloss": test["logloss"],
        "val_auc": val["auc"],
        "val_logloss": val["logloss"],
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "train_rows_per_s": rows_seen / max(train_time, 1e-9),
        "train_seconds": train_time,
        "load_seconds": t_load,
        "embedding": cfg.embedding,
        "compression": full_params / max(n_params, 1),
        "embedding_params": emb.parameter_count(),
        "full_table_params": full_params,
        "embedding_state_bytes": emb.state_bytes(),
        "serving_bytes": emb.serving_bytes() + 4 * sum(
            p.numel() for name, p in model.named_parameters() if not name.startswith("embedding.")
        ),
        "embedding_serving_bytes": emb.serving_bytes(),
        "rows": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
        "seed": cfg.seed,
        "data": cfg.data,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if source is not None and getattr(source, "errors", None) is not None:
        metrics["bad_lines"] = source.errors.count
    out = None
    if cfg.out:
        out = Path(cfg.out)
        save_checkpoint(out, model, fmap, metrics, train_config=asdict(cfg), history=history)
    return TrainResult(model=model, feature_map=fmap, metrics=metrics, history=history, out=out)

