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
from lma.embeddings.tables import SPARSE_THRESHOLD
from lma.features import Encoded, FeatureMap
from lma.metrics import log_loss, roc_auc
from lma.model import DLRM, DLRMConfig, build_dlrm, first_order_spec
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
    # First-order (wide) term beside DLRM: a scalar per token + a linear dense term (see
    # lma.model.DLRMConfig.first_order). Full tables get a full scalar table with its own
    # vocabulary threshold; every other kind a hashed scalar table of n_params / dim floats.
    first_order: bool = False
    first_order_min_count: int = 1
    first_order_l2: float = 1e-3  # L2 (weight decay) of the scalar table
    first_order_lr: float | None = None  # None: --lr
    # With a first-order term: train it alone first (early-stopped on validation AUC, at most
    # this many epochs), then everything together from there. 0: train everything at once.
    warmup_epochs: int = 50
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
        if self.warmup_epochs < 0:
            raise ValueError(f"--warmup-epochs must be >= 0, got {self.warmup_epochs}")
        if self.first_order_min_count < 1:
            raise ValueError(f"--first-order-min-count must be >= 1, got {self.first_order_min_count}")
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
    tr, va, te = split_rows(cfg.split, n, cfg.seed, cfg.fractions, data.times, cfg.data)
    return Splits(source.schema, take(data, tr), take(data, va), take(data, te)), source


def split_rows(split: str, n: int, seed: int, fractions: tuple[float, float, float],
               times: np.ndarray | None, name: str = "data"
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices of (train, val, test) as training made them: ``split`` is "random" (seeded
    permutation) or "time" (the schema's time column, earliest rows first)."""
    if split == "time":
        if times is None:
            raise ValueError(f"{name}: --split time needs a schema with a time column")
        return time_split(times, fractions)
    return random_split(n, seed, fractions)


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
    first_order = None
    if cfg.first_order:
        if cfg.embedding == "full":
            first_order = first_order_spec("full", fmap.full_table_rows(cfg.first_order_min_count),
                                           cfg.first_order_min_count, cfg.seed)
        else:
            first_order = first_order_spec("hash", max(1, n_params // cfg.dim), 1, cfg.seed)
    mcfg = DLRMConfig(
        n_dense=len(schema.dense), slot_fields=schema.slot_fields(), dim=cfg.dim,
        bottom_mlp=list(cfg.bottom_mlp), top_mlp=list(cfg.top_mlp), dropout=cfg.dropout,
        interaction=cfg.interaction, first_order=first_order,
    )
    return build_dlrm(mcfg, emb, fmap)


def make_optimizers(cfg: TrainConfig, model: DLRM, wide_only: bool = False
                    ) -> list[torch.optim.Optimizer]:
    """Optimizers of the model's parameters (only the first-order term's with ``wide_only``).

    Groups: the first-order scalar table (L2 ``first_order_l2``, lr ``first_order_lr``), the
    first-order dense weights (no L2, the same lr), everything else (``weight_decay``, ``lr``).
    Tables trained with sparse gradients get a sparse-capable optimizer and no L2.
    """
    sparse = {id(p) for p in model.embedding.sparse_parameters()}
    fo_table: list[nn.Parameter] = []
    fo_rest: list[nn.Parameter] = []
    if model.first_order is not None:
        sparse |= {id(p) for p in model.first_order.sparse_parameters()}
        fo_table = list(model.first_order.parameters())
        fo_rest = list(model.linear.parameters()) if model.linear is not None else []
    fo_ids = {id(p) for p in fo_table + fo_rest}
    fo_lr = cfg.first_order_lr if cfg.first_order_lr is not None else cfg.lr
    groups = [
        {"params": [p for p in fo_table if id(p) not in sparse], "lr": fo_lr,
         "weight_decay": cfg.first_order_l2},
        {"params": [p for p in fo_rest if id(p) not in sparse], "lr": fo_lr, "weight_decay": 0.0},
    ]
    sparse_groups = [{"params": [p for p in fo_table + fo_rest if id(p) in sparse], "lr": fo_lr}]
    rest = [] if wide_only else [
        p for p in model.parameters() if id(p) not in fo_ids and p.requires_grad]
    groups.append({"params": [p for p in rest if id(p) not in sparse], "lr": cfg.lr,
                   "weight_decay": cfg.weight_decay})
    sparse_groups.append({"params": [p for p in rest if id(p) in sparse], "lr": cfg.lr})
    groups = [g for g in groups if g["params"]]
    sparse_groups = [g for g in sparse_groups if g["params"]]
    ignored = []
    if cfg.first_order_l2 > 0 and any(id(p) in sparse for p in fo_table):
        ignored.append("--first-order-l2")
    if cfg.weight_decay > 0 and any(id(p) in sparse for p in rest):
        ignored.append("--weight-decay")
    if ignored:
        log.warning("%s: not applied to the tables trained with sparse gradients (above %d "
                    "floats, or option sparse=true)", " and ".join(ignored), SPARSE_THRESHOLD)
    opts: list[torch.optim.Optimizer] = []
    if cfg.optimizer == "adam":
        if groups:
            opts.append(torch.optim.Adam(groups))
        if sparse_groups:
            opts.append(torch.optim.SparseAdam(sparse_groups))
    else:
        # Adagrad and SGD take sparse gradients but refuse weight decay with them, so the sparse
        # tables get an optimizer of their own and the dense groups keep their weight decay.
        cls = torch.optim.Adagrad if cfg.optimizer == "adagrad" else torch.optim.SGD
        if groups:
            opts.append(cls(groups))
        if sparse_groups:
            opts.append(cls(sparse_groups))
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


def _score(val: dict[str, float]) -> float:
    """Early-stopping score of a validation result: its AUC, or -inf where the AUC is undefined
    (one class only, or NaN predictions), so that such an epoch never replaces a real best but
    the first epoch still gives a best state."""
    auc = val["auc"]
    return auc if math.isfinite(auc) else -math.inf


class _Loop:
    """Epochs of minibatch training with early stopping on validation AUC; the best state (over
    every phase run so far) is kept in ``best_state``."""

    def __init__(self, cfg: TrainConfig, model: DLRM, splits: Splits, device: torch.device):
        self.cfg, self.model, self.splits = cfg, model, splits
        train = splits.train
        self.dense = torch.from_numpy(np.ascontiguousarray(train.dense)).to(device)
        self.tokens = torch.from_numpy(np.ascontiguousarray(train.tokens)).to(device)
        self.labels = torch.from_numpy(np.ascontiguousarray(train.labels)).to(device)
        self.device = device
        self.rng = np.random.default_rng(cfg.seed)
        self.loss_fn = nn.BCEWithLogitsLoss()
        self.best_auc, self.best_state, self.best_epoch = -1.0, None, -1
        self.history: list[dict[str, Any]] = []
        self.train_time, self.rows_seen = 0.0, 0

    def run(self, opts: list[torch.optim.Optimizer], epochs: int, phase: str) -> None:
        cfg, model, device = self.cfg, self.model, self.device
        n = len(self.labels)
        n_batches = math.ceil(n / cfg.batch_size)
        bad_epochs = 0
        label = f"{phase} " if phase != "train" else ""
        for epoch in range(epochs):
            model.train()
            perm = torch.from_numpy(self.rng.permutation(n)).to(device)
            bar = tqdm(total=n, desc=f"{label}epoch {epoch + 1}/{epochs}", unit="row",
                       disable=not cfg.progress, leave=False)
            t0 = time.perf_counter()
            # Running loss kept on the device: reading it back every step would stall a GPU.
            running_t = torch.zeros((), device=device)
            for b in range(n_batches):
                idx = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                logits = model(self.dense[idx], self.tokens[idx])
                loss = self.loss_fn(logits, self.labels[idx])
                for o in opts:
                    o.zero_grad(set_to_none=True)
                loss.backward()
                for o in opts:
                    o.step()
                running_t = 0.98 * running_t + 0.02 * loss.detach() if b else loss.detach()
                bar.update(len(idx))
                if b % 20 == 0 and cfg.progress:
                    el = time.perf_counter() - t0
                    bar.set_postfix(loss=f"{running_t.item():.4f}",
                                    rows_s=f"{bar.n / max(el, 1e-9):,.0f}")
            bar.close()
            running = float(running_t)
            self.train_time += time.perf_counter() - t0
            self.rows_seen += n
            val = evaluate(model, self.splits.val)
            step = len(self.history) + 1
            self.history.append({"epoch": step, "phase": phase, "train_loss": running,
                                 "val_auc": val["auc"], "val_logloss": val["logloss"]})
            log.info("%sepoch %d: loss %.4f val_auc %.4f val_logloss %.4f", label, epoch + 1,
                     running, val["auc"], val["logloss"])
            if cfg.progress:
                tqdm.write(f"{label}epoch {epoch + 1}: train_loss {running:.4f} "
                           f"val_auc {val['auc']:.4f} val_logloss {val['logloss']:.4f}")
            score = _score(val)
            if self.best_state is None or score > self.best_auc:
                self.best_auc, self.best_epoch, bad_epochs = score, step, 0
                self.best_state = copy.deepcopy(model.state_dict())
            else:
                bad_epochs += 1
                if bad_epochs >= cfg.patience:
                    break


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
    loop = _Loop(cfg, model, splits, device)
    if model.first_order is not None and cfg.warmup_epochs > 0:
        # Wide warm-up: the first-order term alone (a logistic regression) until validation
        # AUC stops improving; the joint phase starts from its best state and keeps it unless
        # the deep part improves validation AUC.
        model.wide_only = True
        loop.run(make_optimizers(cfg, model, wide_only=True), cfg.warmup_epochs, "wide")
        model.wide_only = False
        model.load_state_dict(loop.best_state)
    loop.run(make_optimizers(cfg, model), cfg.epochs, "joint" if model.first_order else "train")
    history, best_epoch = loop.history, loop.best_epoch
    train_time, rows_seen = loop.train_time, loop.rows_seen
    best_state = loop.best_state
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
        ) + (model.first_order.state_bytes() if model.first_order is not None else 0),
        "first_order_params": (model.first_order.parameter_count()
                               if model.first_order is not None else 0),
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

