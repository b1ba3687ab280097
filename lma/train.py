"""Training and evaluation of DLRM models with any embedding kind at any memory budget."""

from __future__ import annotations

import json
import logging
import math
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lma.checkpoint import save_checkpoint
from lma.data import DataSource, open_source, random_split, take, time_split
from lma.data.store import EncodedStore, RowsView
from lma.embeddings import EMBEDDINGS, EmbeddingSpec, build_embedding
from lma.embeddings.tables import SPARSE_THRESHOLD
from lma.features import Encoded, FeatureMap
from lma.jsonio import json_default
from lma.metrics import log_loss, roc_auc
from lma.model import DLRM, DLRMConfig, build_dlrm, first_order_spec
from lma.optim import RowWiseAdagrad
from lma.schema import Schema
from lma.signatures import DEFAULT_MIN_COUNT, DEFAULT_SAMPLE_ROWS, compute_signatures

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "adagrad", "sgd", "rowwise")
# Learning rate of row-wise Adagrad (``--optimizer rowwise``) unless --sparse-lr says otherwise:
# the best of 0.01, 0.03, 0.1 for robez and lma 4x on synth:20000:1, 2 epochs (docs/RESULTS.md).
ROWWISE_LR = 0.1
# A best state larger than this is kept on disk instead of as a copy in memory.
SPILL_BYTES = 256 << 20


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
    # adam: Adam, SparseAdam for sparse tables; rowwise: Adam, row-wise Adagrad (one float of
    # state per row) for sparse tables and shared memories; adagrad, sgd: that for everything.
    optimizer: str = "adam"
    lr: float = 1e-3
    sparse_lr: float | None = None  # lr of the sparse tables (default: lr; rowwise: ROWWISE_LR)
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
    # Out of core: encode the rows once to a file in work_dir (default: a temporary folder,
    # removed at the end) and train from it, reading each batch (lma.data.store); peak memory
    # does not grow with the rows beyond the split and epoch indices (8 bytes per row each).
    stream: bool = False
    work_dir: str | None = None
    epoch_rows: int | None = None  # train on at most this many (shuffled) rows per epoch
    # A feature map whose tokens join the training rows' (e.g. the value set of a larger
    # dataset from `lma data synth --feature-map`): the vocabulary of more rows than are trained.
    vocab_from: str | None = None
    # Data parallel over the processes torchrun starts (gloo on CPU, nccl on CUDA): each global
    # batch of batch_size rows is split over the ranks and the gradients summed.
    ddp: bool = False

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
        if self.epoch_rows is not None and self.epoch_rows < 1:
            raise ValueError(f"--epoch-rows must be >= 1, got {self.epoch_rows}")
        if self.sparse_lr is not None and self.sparse_lr <= 0:
            raise ValueError(f"--sparse-lr must be > 0, got {self.sparse_lr}")
        serve = str(self.options.get("serve", "hash"))
        if serve != "hash":
            # The hot form is made at export from a trained hash form (its rows are the trained
            # memory's); it has no gradient, so refuse it before any data is read.
            raise ValueError(f"--option serve={serve}: training needs serve=hash (the default); "
                             "the hot serving form is made at export (lma export --lma-serving "
                             "hot or auto)")


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
    rank: int = 0  # this process's rank in distributed training (0 otherwise)


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


def _prepare_state(cfg: TrainConfig, spec: EmbeddingSpec, fmap: FeatureMap,
                   train_tokens: np.ndarray | RowsView) -> dict[str, Any]:
    if isinstance(train_tokens, RowsView) and cfg.embedding == "lma":
        # LMA's prepare would turn the lazy on-disk rows into one array; the signatures only
        # read their sample, so compute them here with the same options.
        opts = spec.options
        table = compute_signatures(
            train_tokens,  # type: ignore[arg-type]
            set_kind=str(opts.get("set_kind", "rows")),
            n_sample_rows=int(opts.get("sample_rows", DEFAULT_SAMPLE_ROWS)),
            min_count=int(opts.get("sig_min_count", DEFAULT_MIN_COUNT)),
            seed=spec.seed, slot_fields=fmap.schema.slot_fields(), progress=cfg.progress,
        )
        return {"signatures": table}
    return EMBEDDINGS[cfg.embedding].prepare(spec, fmap, train_tokens, progress=cfg.progress)


def build_model(cfg: TrainConfig, fmap: FeatureMap, train_tokens: np.ndarray | RowsView) -> DLRM:
    """The model of ``cfg`` on ``fmap``; ``train_tokens`` ((N, S) array, or the lazy on-disk rows
    of streaming training) feed per-token state such as LMA's signatures."""
    full, n_params = embedding_budget(cfg, fmap)
    spec = EmbeddingSpec(
        kind=cfg.embedding, dim=cfg.dim, n_params=n_params, seed=cfg.seed,
        min_count=cfg.min_count, options=dict(cfg.options),
    )
    state = _prepare_state(cfg, spec, fmap, train_tokens)
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
    if cfg.sparse_lr is not None:
        sparse_groups = [{**g, "lr": cfg.sparse_lr} for g in sparse_groups]
    if cfg.optimizer == "rowwise":
        if groups:
            opts.append(torch.optim.Adam(groups))
        if sparse_groups:
            lr = cfg.sparse_lr if cfg.sparse_lr is not None else ROWWISE_LR
            opts.append(RowWiseAdagrad([{**g, "lr": lr} for g in sparse_groups]))
    elif cfg.optimizer == "adam":
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


def _metrics(labels: np.ndarray, p: np.ndarray) -> dict[str, float]:
    return {"auc": roc_auc(labels, p), "logloss": log_loss(labels, p), "rows": len(labels)}


def evaluate(model: nn.Module, data: Encoded) -> dict[str, float]:
    if data.labels is None:
        raise ValueError("evaluation needs labelled rows; this data has no label column "
                         "(score unlabelled rows with `lma predict`)")
    return _metrics(data.labels, predict_proba(model, data))


# Rows of one evaluation read from disk at a time (a multiple of predict_proba's batch, so the
# batches, and so the numbers, are those of the in-memory evaluation).
_EVAL_CHUNK = 8192 * 16


def evaluate_store(model: nn.Module, store: EncodedStore, idx: np.ndarray) -> dict[str, float]:
    """:func:`evaluate` of the on-disk rows ``idx`` (in that order), read in chunks."""
    p = np.empty(len(idx), np.float64)
    labels = np.empty(len(idx), np.float32)
    for a in range(0, len(idx), _EVAL_CHUNK):
        part = store.take(idx[a : a + _EVAL_CHUNK])
        p[a : a + len(part)] = predict_proba(model, part)
        labels[a : a + len(part)] = part.labels
    return _metrics(labels, p)


def _score(val: dict[str, float]) -> float:
    """Early-stopping score of a validation result: its AUC, or -inf where the AUC is undefined
    (one class only, or NaN predictions), so that such an epoch never replaces a real best but
    the first epoch still gives a best state."""
    auc = val["auc"]
    return auc if math.isfinite(auc) else -math.inf


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _sparse_ids(model: DLRM) -> set[int]:
    ids = {id(p) for p in model.embedding.sparse_parameters()}
    if model.first_order is not None:
        ids |= {id(p) for p in model.first_order.sparse_parameters()}
    return ids


def _socket_bytes_written() -> int | None:
    """Bytes this process (all threads) has written with write(2)/writev(2) so far, sockets
    included (/proc/self/io ``wchar``; gloo's TCP transport writes with writev). None off Linux."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


@dataclass
class GradSyncStats:
    """What the data-parallel gradient sync of one rank handed to the collectives, summed over
    steps. ``dense_bytes``: the one flat buffer of dense gradients all-reduced per step.
    ``sparse_bytes``: this rank's coalesced sparse entries (indices + values), and
    ``sparse_sent_bytes`` the same padded to the largest rank's entry count, as all_gather
    sends them. ``wire_bytes``: what the process wrote meanwhile (/proc/self/io), i.e. what the
    collectives really put on the sockets, headers and algorithm included."""

    steps: int = 0
    dense_bytes: int = 0
    sparse_entries: int = 0  # coalesced rows (tables) or floats (shared memories) of this rank
    sparse_bytes: int = 0
    sparse_sent_bytes: int = 0
    count_bytes: int = 0  # the per-step exchange of entry counts
    wire_bytes: int | None = 0
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        per = max(self.steps, 1)
        out: dict[str, Any] = {"steps": self.steps, "seconds": self.seconds}
        for k in ("dense_bytes", "sparse_entries", "sparse_bytes", "sparse_sent_bytes",
                  "count_bytes", "wire_bytes"):
            v = getattr(self, k)
            out[f"{k}_per_step"] = None if v is None else v / per
        return out


def _all_reduce_grads(model: DLRM, stats: GradSyncStats | None = None) -> None:
    """Sum every parameter's gradient over the ranks (data parallel), so every rank takes the
    step single-process training takes. Dense gradients go in one flat buffer through one
    all_reduce. Sparse ones (large tables, shared memories) are never densified: a dense
    all-reduce of an (M,) memory would move M floats per step whatever the batch touched.
    Each rank coalesces its entries (one per touched row or slot), the counts are exchanged,
    and indices (int32 when the parameter's extent allows) and values are all-gathered padded to
    the largest count, then summed."""
    dist = torch.distributed
    world = dist.get_world_size()
    t0 = time.perf_counter()
    w0 = _socket_bytes_written() if stats is not None else None
    sparse_ids = _sparse_ids(model)
    dense: list[torch.Tensor] = []
    sparse: list[tuple[nn.Parameter, torch.Tensor]] = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in sparse_ids:
            g = p.grad
            # Every rank takes the same collectives for a parameter, reached by its batch or not.
            if g is None:
                g = torch.sparse_coo_tensor(
                    torch.zeros((p.dim(), 0), dtype=torch.int64, device=p.device),
                    torch.zeros((0, *p.shape[1:]), dtype=p.dtype, device=p.device), p.shape)
            sparse.append((p, g.coalesce()))
        else:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dense.append(p.grad)
    if dense:
        flat = torch.cat([g.reshape(-1) for g in dense])
        dist.all_reduce(flat)
        off = 0
        for g in dense:
            g.copy_(flat[off : off + g.numel()].view_as(g))
            off += g.numel()
        if stats is not None:
            stats.dense_bytes += flat.numel() * flat.element_size()
    if sparse:
        dev = sparse[0][1].device
        counts = torch.tensor([g.indices().shape[1] for _, g in sparse], dtype=torch.int64,
                              device=dev)
        all_counts = [torch.empty_like(counts) for _ in range(world)]
        dist.all_gather(all_counts, counts)
        table = torch.stack(all_counts).cpu()  # (world, n_sparse)
        for j, (p, g) in enumerate(sparse):
            n = int(table[:, j].max())
            idx, val = g.indices(), g.values()
            idx_dtype = torch.int32 if max(p.shape) < 2**31 else torch.int64
            idx_pad = torch.zeros((idx.shape[0], n), dtype=idx_dtype, device=dev)
            idx_pad[:, : idx.shape[1]] = idx
            val_pad = torch.zeros((n, *val.shape[1:]), dtype=val.dtype, device=dev)
            val_pad[: val.shape[0]] = val
            idx_parts = [torch.empty_like(idx_pad) for _ in range(world)]
            val_parts = [torch.empty_like(val_pad) for _ in range(world)]
            dist.all_gather(idx_parts, idx_pad)
            dist.all_gather(val_parts, val_pad)
            k = [int(c) for c in table[:, j]]
            p.grad = torch.sparse_coo_tensor(
                torch.cat([ip[:, :c] for ip, c in zip(idx_parts, k, strict=True)], 1).to(torch.int64),
                torch.cat([vp[:c] for vp, c in zip(val_parts, k, strict=True)], 0), g.shape).coalesce()
            if stats is not None:
                # Bytes per entry: its index (one per sparse dimension) and its value row.
                row = idx_pad.shape[0] * idx_pad.element_size() + math.prod(
                    val.shape[1:]) * val_pad.element_size()
                stats.sparse_entries += idx.shape[1]
                stats.sparse_bytes += idx.shape[1] * row
                stats.sparse_sent_bytes += n * row
        if stats is not None:
            stats.count_bytes += counts.numel() * counts.element_size()
    if stats is not None:
        stats.steps += 1
        stats.seconds += time.perf_counter() - t0
        w1 = _socket_bytes_written()
        if w0 is None or w1 is None or stats.wire_bytes is None:
            stats.wire_bytes = None
        else:
            stats.wire_bytes += w1 - w0


def _ddp_summary(model: DLRM, sync: GradSyncStats, optimizer_state: int) -> dict[str, Any]:
    """What each worker holds (the whole model and its optimizer state: plain data parallelism
    replicates them) and what each rank's gradient sync sent per step, gathered from every rank
    once at the end."""
    sparse = _sparse_ids(model)
    params = [p for p in model.parameters() if p.requires_grad]
    mine = {"sync": sync.summary(), "peak_rss_bytes": peak_rss_bytes()}
    ranks: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(ranks, mine)
    summary = {
        "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "buffer_bytes": sum(b.numel() * b.element_size() for b in model.buffers()),
        "optimizer_state_bytes": optimizer_state,
        "dense_gradient_floats": sum(p.numel() for p in params if id(p) not in sparse),
        "sparse_parameters": [list(p.shape) for p in params if id(p) in sparse],
        "ranks": ranks,
    }
    s0 = ranks[0]["sync"]
    log.info("ddp: %d ranks; per step rank 0 all-reduced %.3f MB dense, gathered %.3f MB sparse "
             "(%.0f entries), wrote %s MB to sockets; worker holds %.1f MB model + %.1f MB "
             "optimizer state", len(ranks), s0["dense_bytes_per_step"] / 1e6,
             s0["sparse_sent_bytes_per_step"] / 1e6, s0["sparse_entries_per_step"],
             "?" if s0["wire_bytes_per_step"] is None else f"{s0['wire_bytes_per_step'] / 1e6:.3f}",
             (summary["parameter_bytes"] + summary["buffer_bytes"]) / 1e6, optimizer_state / 1e6)
    return summary


class _MemoryRows:
    """Training rows resident on the device."""

    def __init__(self, data: Encoded, device: torch.device):
        self.dense = torch.from_numpy(np.ascontiguousarray(data.dense)).to(device)
        self.tokens = torch.from_numpy(np.ascontiguousarray(data.tokens)).to(device)
        self.labels = torch.from_numpy(np.ascontiguousarray(data.labels)).to(device)
        self.device = device

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: np.ndarray, idx_t: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.dense[idx_t], self.tokens[idx_t], self.labels[idx_t]


class _StoreRows:
    """Training rows ``idx`` of an on-disk store, read batch by batch."""

    def __init__(self, store: EncodedStore, idx: np.ndarray, device: torch.device):
        self.store, self.idx, self.device = store, idx, device

    def __len__(self) -> int:
        return len(self.idx)

    def batch(self, idx: np.ndarray, idx_t: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        enc = self.store.take(self.idx[idx])
        d = self.device
        return (torch.from_numpy(enc.dense).to(d), torch.from_numpy(enc.tokens).to(d),
                torch.from_numpy(enc.labels).to(d))


_CURRENT = "current"  # best_state marker: the model as it is now is the best


class _Loop:
    """Epochs of minibatch training with early stopping on validation AUC. The best state (over
    every phase run so far) is the model itself when the last epoch was the best, else a copy
    (small models) or a file in ``work_dir`` (large ones), never a deep copy per improvement of
    a multi-GB model."""

    def __init__(self, cfg: TrainConfig, model: DLRM, rows: _MemoryRows | _StoreRows,
                 validate: Callable[[], dict[str, float]], device: torch.device,
                 work_dir: Path | None):
        self.cfg, self.model, self.rows, self.validate = cfg, model, rows, validate
        self.device = device
        self.work_dir = work_dir
        self.rng = np.random.default_rng(cfg.seed)
        self.loss_fn = nn.BCEWithLogitsLoss()
        self.sum_loss_fn = nn.BCEWithLogitsLoss(reduction="sum")
        self.rank, self.world = _dist_rank_world()
        self.sync = GradSyncStats()
        self.best_auc, self.best_epoch = -1.0, -1
        self.best_state: dict[str, torch.Tensor] | Path | str | None = None
        self.history: list[dict[str, Any]] = []
        self.train_time, self.rows_seen = 0.0, 0

    def _state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.model.state_dict().values())

    def _keep_best(self, final: bool) -> None:
        if final:
            self.best_state = _CURRENT
        elif self._state_bytes() > SPILL_BYTES:
            if self.work_dir is None:
                self.work_dir = Path(tempfile.mkdtemp(prefix="lma-train-"))
            path = self.work_dir / "best_state.pt"
            torch.save(self.model.state_dict(), path)
            self.best_state = path
        else:
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def restore_best(self) -> None:
        """Load the best state into the model (nothing to do when it is the current one)."""
        best = self.best_state
        if best is None or best is _CURRENT:
            return
        if isinstance(best, Path):
            best = torch.load(best, map_location=self.device, weights_only=True, mmap=True)
        self.model.load_state_dict(best)  # type: ignore[arg-type]

    def run(self, opts: list[torch.optim.Optimizer], epochs: int, phase: str,
            last_phase: bool = True) -> None:
        cfg, model, device = self.cfg, self.model, self.device
        n = len(self.rows)
        n_use = min(n, cfg.epoch_rows) if cfg.epoch_rows else n
        n_batches = math.ceil(n_use / cfg.batch_size)
        bad_epochs = 0
        label = f"{phase} " if phase != "train" else ""
        for epoch in range(epochs):
            model.train()
            perm = self.rng.permutation(n)[:n_use]
            perm_t = torch.from_numpy(perm).to(device)
            bar = tqdm(total=n_use, desc=f"{label}epoch {epoch + 1}/{epochs}", unit="row",
                       unit_scale=True, disable=not cfg.progress, leave=False)
            t0 = time.perf_counter()
            # Running loss kept on the device: reading it back every step would stall a GPU.
            running_t = torch.zeros((), device=device)
            for b in range(n_batches):
                lo, hi = b * cfg.batch_size, min((b + 1) * cfg.batch_size, n_use)
                if self.world > 1:
                    # This rank's share of the global batch; the loss is its rows' sum over
                    # the global batch size, so the summed gradients are the global mean's.
                    lo, hi = lo + (hi - lo) * self.rank // self.world, lo + (hi - lo) * (
                        self.rank + 1) // self.world
                sl = slice(lo, hi)
                dense, tokens, labels = self.rows.batch(perm[sl], perm_t[sl])
                logits = model(dense, tokens)
                if self.world > 1:
                    n_global = min((b + 1) * cfg.batch_size, n_use) - b * cfg.batch_size
                    loss = self.sum_loss_fn(logits, labels) / n_global
                else:
                    loss = self.loss_fn(logits, labels)
                for o in opts:
                    o.zero_grad(set_to_none=True)
                loss.backward()
                if self.world > 1:
                    _all_reduce_grads(model, self.sync)
                for o in opts:
                    o.step()
                running_t = 0.98 * running_t + 0.02 * loss.detach() if b else loss.detach()
                bar.update(len(labels))
                if b % 20 == 0 and cfg.progress:
                    el = time.perf_counter() - t0
                    bar.set_postfix(loss=f"{running_t.item():.4f}",
                                    rows_s=f"{bar.n / max(el, 1e-9):,.0f}")
            bar.close()
            del perm, perm_t  # 8 bytes per row: not held through validation and the next draw
            running = float(running_t)
            self.train_time += time.perf_counter() - t0
            self.rows_seen += n_use
            val = self.validate()
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
                self._keep_best(final=last_phase and epoch == epochs - 1)
            else:
                bad_epochs += 1
                if bad_epochs >= cfg.patience:
                    break


@dataclass
class _Data:
    """What training reads: splits in memory, or an on-disk store with split indices."""

    schema: Schema
    n_train: int
    n_val: int
    n_test: int
    train_rows: Callable[[torch.device], _MemoryRows | _StoreRows]
    train_tokens: np.ndarray | RowsView
    train_chunks: Callable[[], Iterator[Encoded]]
    evaluate: Callable[[nn.Module, str], dict[str, float]]
    dense_stats: Callable[[], tuple[np.ndarray, np.ndarray]]


def _memory_data(splits: Splits) -> _Data:
    parts = {"val": splits.val, "test": splits.test}
    return _Data(
        schema=splits.schema, n_train=len(splits.train), n_val=len(splits.val),
        n_test=len(splits.test),
        train_rows=lambda device: _MemoryRows(splits.train, device),
        train_tokens=splits.train.tokens,
        train_chunks=lambda: iter([splits.train]),
        evaluate=lambda model, part: evaluate(model, parts[part]),
        dense_stats=lambda: (splits.train.dense.mean(0), splits.train.dense.std(0)),
    )


def _store_data(cfg: TrainConfig, store: EncodedStore, schema: Schema) -> _Data:
    n = len(store)
    if not store.labelled:
        raise ValueError(f"{cfg.data}: training needs labelled rows (this source has no label column)")
    if n < 10:
        raise ValueError(f"{cfg.data}: only {n} rows; training needs at least 10")
    tr, va, te = split_rows(cfg.split, n, cfg.seed, cfg.fractions, store.times(), cfg.data)
    parts = {"val": va, "test": te}
    chunk = 1 << 16

    def train_chunks() -> Iterator[Encoded]:
        # Token counts do not depend on row order: read the training rows in file order, a
        # window of the file at a time (a 1-byte mask per row instead of a sorted index copy).
        is_train = np.zeros(n, bool)
        is_train[tr] = True
        for a in tqdm(range(0, n, chunk), desc="feature map", unit="chunk",
                      disable=not cfg.progress, leave=False):
            rows = a + np.flatnonzero(is_train[a : a + chunk])
            if len(rows):
                yield store.take(rows)

    def dense_stats() -> tuple[np.ndarray, np.ndarray]:
        s1 = np.zeros(len(schema.dense))
        s2 = np.zeros(len(schema.dense))
        for enc in train_chunks():
            d = enc.dense.astype(np.float64)
            s1 += d.sum(0)
            s2 += (d * d).sum(0)
        mean = s1 / len(tr)
        return mean.astype(np.float32), np.sqrt(np.maximum(s2 / len(tr) - mean**2, 0.0)).astype(
            np.float32)

    return _Data(
        schema=schema, n_train=len(tr), n_val=len(va), n_test=len(te),
        train_rows=lambda device: _StoreRows(store, tr, device),
        train_tokens=RowsView(store, tr),
        train_chunks=train_chunks,
        evaluate=lambda model, part: evaluate_store(model, store, parts[part]),
        dense_stats=dense_stats,
    )


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux: ru_maxrss is in KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def train_model(cfg: TrainConfig, splits: Splits | None = None) -> TrainResult:
    """Train, early-stop on validation AUC, evaluate on test, and (with ``cfg.out``) save.

    With ``cfg.stream`` the rows are encoded once to a memory-mapped file and read back batch by
    batch (``splits`` must then be None); the model, its updates and evaluation are the same
    as in memory, row for row.
    """
    cfg.validate()
    own_group = cfg.ddp and not torch.distributed.is_initialized()
    if own_group:
        # Launched by torchrun (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment); every
        # rank reads the same rows and builds the same model, and trains its share of each batch.
        torch.distributed.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
    try:
        result = _train_model(cfg, splits)
        result.rank = _dist_rank_world()[0]
        return result
    finally:
        if own_group:
            # A process group left to interpreter exit can abort it ("terminate called without
            # an active exception" from the backend's threads): end the one this call began.
            torch.distributed.destroy_process_group()


def _train_model(cfg: TrainConfig, splits: Splits | None) -> TrainResult:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t_load = time.perf_counter()
    source = None
    store = None
    tmp_dir: Path | None = None
    work_dir: Path | None = Path(cfg.work_dir) if cfg.work_dir else None
    if cfg.stream:
        if splits is not None:
            raise ValueError("streaming training reads its own source: pass no splits")
        if work_dir is None:
            tmp_dir = work_dir = Path(tempfile.mkdtemp(prefix="lma-train-"))
        elif _dist_rank_world()[1] > 1:
            work_dir = work_dir / f"rank{_dist_rank_world()[0]}"
        source = open_source(cfg.data, cfg.schema, on_error=cfg.on_error, progress=cfg.progress)
        store = EncodedStore.open_or_write(source, work_dir / "rows")
        data = _store_data(cfg, store, source.schema)
    else:
        if splits is None:
            splits, source = load_splits(cfg)
        data = _memory_data(splits)
    t_load = time.perf_counter() - t_load
    try:
        return _train(cfg, data, source, work_dir, t_load)
    finally:
        if store is not None:
            store.close()
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)


def _train(cfg: TrainConfig, data: _Data, source: DataSource | None, work_dir: Path | None,
           t_load: float) -> TrainResult:
    t0 = time.perf_counter()
    fmap = FeatureMap.build(data.schema, data.train_chunks())
    if cfg.vocab_from:
        extra = FeatureMap.load(cfg.vocab_from)
        fmap = fmap.merged(extra)
        del extra
    t_fmap = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = build_model(cfg, fmap, data.train_tokens)
    t_build = time.perf_counter() - t0
    if cfg.standardize and len(data.schema.dense):
        mean, std = data.dense_stats()
        model.dense_mean.copy_(torch.from_numpy(mean))
        model.dense_std.copy_(torch.from_numpy(std + 1e-6))
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    )
    # The whole model, shared embedding memory included, stays resident on the device; the
    # hashed-gather op picks its GPU kernel for CUDA tensors.
    model.to(device)
    full_params, n_params = embedding_budget(cfg, fmap)
    loop = _Loop(cfg, model, data.train_rows(device), lambda: data.evaluate(model, "val"),
                 device, work_dir)
    if model.first_order is not None and cfg.warmup_epochs > 0:
        # Wide warm-up: the first-order term alone (a logistic regression) until validation
        # AUC stops improving; the joint phase starts from its best state and keeps it unless
        # the deep part improves validation AUC.
        model.wide_only = True
        loop.run(make_optimizers(cfg, model, wide_only=True), cfg.warmup_epochs, "wide",
                 last_phase=False)
        model.wide_only = False
        loop.restore_best()
    opts = make_optimizers(cfg, model)
    loop.run(opts, cfg.epochs, "joint" if model.first_order else "train")
    history, best_epoch = loop.history, loop.best_epoch
    train_time, rows_seen = loop.train_time, loop.rows_seen
    optimizer_state = sum(o.state_bytes() if isinstance(o, RowWiseAdagrad) else sum(
        t.numel() * t.element_size() for st in o.state.values() for t in st.values()
        if torch.is_tensor(t)) for o in opts)
    del opts
    loop.restore_best()
    model.cpu()  # evaluation and checkpoints on the host; the checkpoint loads anywhere
    t0 = time.perf_counter()
    test = data.evaluate(model, "test")
    val = data.evaluate(model, "val")
    t_eval = time.perf_counter() - t0
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
        "feature_map_seconds": t_fmap,
        "build_seconds": t_build,
        "eval_seconds": t_eval,
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
        "optimizer_state_bytes": optimizer_state,
        "rows": {"train": data.n_train, "val": data.n_val, "test": data.n_test},
        "rows_trained_per_epoch": min(data.n_train, cfg.epoch_rows or data.n_train),
        "vocabulary": sum(fmap.vocab_sizes(cfg.min_count)),
        "vocab_from": cfg.vocab_from,
        "seed": cfg.seed,
        "data": cfg.data,
        "stream": cfg.stream,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if source is not None and getattr(source, "errors", None) is not None:
        metrics["bad_lines"] = source.errors.count
    rank, world = _dist_rank_world()
    metrics["world_size"] = world
    if world > 1:
        metrics["ddp"] = _ddp_summary(model, loop.sync, optimizer_state)
    out = None
    if cfg.out and rank == 0:
        t0 = time.perf_counter()
        out = Path(cfg.out)
        save_checkpoint(out, model, fmap, metrics, train_config=asdict(cfg), history=history)
        metrics["save_seconds"] = time.perf_counter() - t0
    metrics["peak_rss_bytes"] = peak_rss_bytes()
    if out is not None:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=json_default))
    return TrainResult(model=model, feature_map=fmap, metrics=metrics, history=history, out=out)
