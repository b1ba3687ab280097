#!/usr/bin/env bash
# GPU check of the hashed-gather op (run from anywhere; takes a few minutes):
#   1. builds what it needs: nothing ahead of time (Triton JIT-compiles the kernels; the CPU ground
#      truth is the pure-torch reference); LMA_GPU_CHECK_BUILD=1 also builds the C++ CPU kernels,
#   2. checks the Triton kernels on the GPU against the CPU reference: bit-identical slot indices,
#      forward within 1e-6, backward (atomic scatter-add) within 1e-5, for lma / robez, Z in
#      {1, 4, 16}, aligned or not, extreme keys included; autograd and torch.compile through the op,
#   3. times forward and forward+backward of the op against nn.EmbeddingBag at Criteo-Kaggle size
#      (33.7M x 16 = 2.16 GB), and the op at 1/16 of that memory (M = 2^25, 134 MB).
#   4. checks lma::hot_gather (the LMA hot serving form: hot rows, the Triton gather for the other
#      tokens) against the CPU reference bit for bit, and times it beside the op at Z = 4,
#   5. checks the Triton key table lookup (lma::key_lookup, key table v3) against the numpy
#      reference (present, absent, extreme and filler keys; per-field defaults) and the fused
#      lma::hot_embed against hot_gather of it, and times the lookup at the Kaggle vocabulary.
# Prints a markdown table and writes it to $OUT/gpu_check.md when OUT is set.
# Env: PYTHON (default python3), LMA_GPU_CHECK_DEVICE=cpu for a dry run without a GPU (needs
# triton installed and TRITON_INTERPRET=1), LMA_GPU_CHECK_QUICK=1 for smaller timings.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
cd "$REPO"

echo "== machine"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
"$PY" -c "import triton; print('triton', triton.__version__)" || echo "triton: not importable"

if [ "${LMA_GPU_CHECK_BUILD:-0}" = "1" ]; then
  echo "== build C++ CPU kernels"
  timeout 240 "$PY" -m lma.ops.build --quiet && echo "C++ kernels ready" \
    || echo "C++ kernels not built (no compiler/ninja?): the CPU side uses the pure-torch reference"
else
  echo "== no build needed: Triton compiles the GPU kernels at first use; the CPU ground truth is"
  echo "   the pure-torch reference (LMA_GPU_CHECK_BUILD=1 also builds the C++ CPU kernels)"
fi

echo "== checks and timings"
"$PY" - <<'PYEOF'
import os
import statistics
import sys
import time

import torch

from lma import hashspec
from lma.ops import (
    HashedGatherConfig,
    backend_for,
    hashed_gather,
    hashed_gather_backward_reference,
    hashed_gather_reference,
    slot_indices_torch,
)

dev = torch.device(os.environ.get("LMA_GPU_CHECK_DEVICE", "cuda"))
quick = os.environ.get("LMA_GPU_CHECK_QUICK", "") == "1" or dev.type == "cpu"
if dev.type == "cuda" and not torch.cuda.is_available():
    sys.exit("no CUDA device visible")
from lma.ops import triton_kernels as tk  # noqa: E402  (the GPU kernels, imported explicitly)

card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (Triton interpreter dry run)"
lines = ["# GPU check of lma::hashed_gather", "", f"Device: {card}; torch {torch.__version__}; "
         f"automatic backend for {dev.type} tensors: {backend_for(dev)}", ""]
failures = []

# ---------------------------------------------------------------- correctness
I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1
g = torch.Generator().manual_seed(0)
n_rows = 64 if quick else 2048
keys_cpu = torch.randint(I64_MIN, I64_MAX, (n_rows, 26), dtype=torch.int64, generator=g)
keys_cpu.view(-1)[:8] = torch.tensor([0, -1, 1, I64_MIN, I64_MAX, I64_MIN + 1, I64_MAX - 1, 1 << 32])
lines += ["## Correctness (GPU kernel vs CPU reference)", "",
          f"{n_rows} x 26 keys (random + extremes), d = 16, M = 1,000,003.", "",
          "| mode | Z | aligned | indices identical | max abs diff fwd | max abs diff grad | ok |",
          "|---|---|---|---|---|---|---|"]
m = 1_000_003
for mode in ("lma", "robez"):
    for z in (1, 4, 16):
        for aligned in (False, True):
            cfg = HashedGatherConfig(dim=16, z=z, mode=mode, aligned=aligned, m=m, seed=11)
            a, b, w = cfg.param_tensors()
            want_idx = slot_indices_torch(keys_cpu.view(-1), (a, b, w), cfg)
            spec_idx = hashspec.slot_indices(keys_cpu.view(-1).numpy(), cfg.params(), m, z, mode, aligned)
            keys = keys_cpu.to(dev)
            idx = tk.slot_indices(keys, (a, b, w), cfg).cpu()
            same = torch.equal(idx, want_idx) and bool((idx.numpy() == spec_idx).all())
            mem_cpu = torch.randn(m, generator=g)
            out = tk.forward(mem_cpu.to(dev), keys, (a, b, w), cfg).cpu()
            ref = hashed_gather_reference(mem_cpu, keys_cpu, (a, b, w), cfg)
            fwd = (out - ref).abs().max().item()
            grad_out = torch.randn(ref.shape, generator=g)
            gk = tk.backward(grad_out.to(dev), keys, (a, b, w), cfg).cpu()
            gr = hashed_gather_backward_reference(grad_out, keys_cpu, (a, b, w), cfg)
            bwd = (gk - gr).abs().max().item()
            ok = same and fwd <= 1e-6 and bwd <= 1e-5
            if not ok:
                failures.append(f"{mode} Z={z} aligned={aligned}")
            lines.append(f"| {mode} | {z} | {aligned} | {'yes' if same else 'NO'} | {fwd:.2g} | "
                         f"{bwd:.2g} | {'yes' if ok else 'NO'} |")
            print(lines[-1], flush=True)

# Autograd and torch.compile through the op on the device.
cfg = HashedGatherConfig(dim=16, z=4, mode="lma", aligned=False, m=1 << 16, seed=3)
a, b, w = (t.to(dev) for t in cfg.param_tensors())
mem = torch.randn(cfg.m, device=dev, requires_grad=True)
keys = keys_cpu[:32].to(dev)
out = hashed_gather(mem, keys, (a, b, w), cfg)
(out * out).sum().backward()
g_eager = mem.grad.clone()
ref_mem = mem.detach().cpu().requires_grad_()
ref = hashed_gather_reference(ref_mem, keys.cpu(), (a.cpu(), b.cpu(), w.cpu()), cfg)
(ref * ref).sum().backward()
auto_ok = torch.allclose(g_eager.cpu(), ref_mem.grad, atol=1e-5)
compile_ok = "skipped (dry run)"
if dev.type == "cuda":
    try:
        mem.grad = None
        f = torch.compile(lambda mm, kk: (hashed_gather(mm, kk, (a, b, w), cfg) ** 2).sum(),
                          fullgraph=True)
        f(mem, keys).backward()
        compile_ok = "yes" if torch.allclose(mem.grad, g_eager, atol=1e-5) else "NO (gradients differ)"
    except Exception as exc:  # noqa: BLE001
        compile_ok = f"NO ({type(exc).__name__}: {str(exc)[:120]})"
if not auto_ok or compile_ok.startswith("NO"):
    failures.append("autograd/compile")
lines += ["", f"Autograd through the op on {dev.type} (backend {backend_for(dev)}): "
          f"{'yes' if auto_ok else 'NO'}; torch.compile(fullgraph) fwd+bwd: {compile_ok}", ""]
print(lines[-2], flush=True)

# lma::hot_gather (the LMA hot serving form): on CUDA the cold tokens go through the Triton
# gather and the hot rows are indexed; both must be bit for bit the CPU reference's.
from lma.ops import hot_gather, hot_gather_reference  # noqa: E402

lines += ["## lma::hot_gather (device vs CPU reference)", "",
          "| mode | Z | aligned | dtype | hot rows | hot share | identical |",
          "|---|---|---|---|---|---|---|"]
for mode in ("lma", "robez"):
    for z, aligned in ((1, False), (4, False), (4, True), (16, False)):
        for dtype, n_hot in ((torch.float32, 0), (torch.float32, 5000), (torch.float16, 5000)):
            cfg = HashedGatherConfig(dim=16, z=z, mode=mode, aligned=aligned, m=m, seed=11)
            consts = cfg.param_tensors()
            mem_cpu = torch.randn(m, generator=g).to(dtype)
            hot_cpu = torch.randn(n_hot, 16, generator=g).to(dtype)
            index = torch.full(keys_cpu.shape, -1, dtype=torch.int64)
            if n_hot:
                pick = torch.rand(keys_cpu.shape, generator=g) < 0.88
                index[pick] = torch.randint(0, n_hot, (int(pick.sum()),), generator=g)
            want = hot_gather_reference(mem_cpu, hot_cpu, index, keys_cpu, consts, cfg)
            with torch.no_grad():
                got = hot_gather(mem_cpu.to(dev), hot_cpu.to(dev), index.to(dev), keys_cpu.to(dev),
                                 consts, cfg).cpu()
            same = got.dtype == want.dtype and torch.equal(got, want)
            if not same:
                failures.append(f"hot_gather {mode} Z={z} aligned={aligned} {dtype} H={n_hot}")
            share = float((index >= 0).float().mean())
            lines.append(f"| {mode} | {z} | {aligned} | {str(dtype).split('.')[-1]} | {n_hot} | "
                         f"{share:.2f} | {'yes' if same else 'NO'} |")
            print(lines[-1], flush=True)
lines.append("")

# Key table v3 on the device: the Triton lookup against the numpy spec (hashspec), and
# lma::hot_embed (lookup fused into the hot gather) against hot_gather of the looked-up rows.
import numpy as np  # noqa: E402

from lma.ops import hot_embed  # noqa: E402

lines += ["## Key table v3 lookup (device vs numpy reference)", "",
          "| keys in table | queries | absent | identical |", "|---|---|---|---|"]
rng = np.random.default_rng(7)
extreme = np.array([0, -1, 1, I64_MIN, I64_MAX, I64_MIN + 1, I64_MAX - 1, 1 << 32], np.int64)
for n_keys in (0, 1, 5000, 200_000 if quick else 2_000_000):
    keys_np = np.unique(np.concatenate([rng.integers(I64_MIN, I64_MAX, n_keys, dtype=np.int64,
                                                     endpoint=True), extreme[: min(n_keys, 8)]]))
    values = rng.integers(0, 1 << 40, len(keys_np))
    table = hashspec.build_key_table(keys_np, values)
    fillers = np.setdiff1d(np.unique(table.keys), keys_np)
    q = np.concatenate([rng.choice(keys_np, 20_000) if len(keys_np) else np.zeros(0, np.int64),
                        rng.integers(I64_MIN, I64_MAX, 5_000, dtype=np.int64, endpoint=True),
                        extreme, fillers])
    q = np.resize(q, (len(q) // 26 + 1) * 26).reshape(-1, 26)
    default = -1 - np.arange(26, dtype=np.int64)
    want = hashspec.key_table_lookup(table, q, default)
    got = tk.key_lookup(torch.from_numpy(q).to(dev), torch.from_numpy(default).to(dev),
                        torch.from_numpy(table.rows).to(dev)).cpu().numpy()
    same = np.array_equal(got, want)
    if not same:
        failures.append(f"key_lookup n={n_keys}")
    lines.append(f"| {len(keys_np):,} | {q.size:,} | {int((want < 0).sum()):,} | "
                 f"{'yes' if same else 'NO'} |")
    print(lines[-1], flush=True)
cfg = HashedGatherConfig(dim=16, z=4, mode="lma", aligned=False, m=m, seed=11)
consts = cfg.param_tensors()
hot_tokens = np.unique(rng.integers(I64_MIN, I64_MAX, 5000, dtype=np.int64, endpoint=True))
hot_table = hashspec.build_key_table(hot_tokens, np.arange(len(hot_tokens)))
tokens = np.where(rng.random((n_rows, 26)) < 0.88, rng.choice(hot_tokens, (n_rows, 26)),
                  rng.integers(I64_MIN, I64_MAX, (n_rows, 26), dtype=np.int64, endpoint=True))
mem_cpu = torch.randn(m, generator=g)
hot_cpu = torch.randn(len(hot_tokens), 16, generator=g)
index = torch.from_numpy(hashspec.key_table_lookup(hot_table, tokens, -1))
want = hot_gather_reference(mem_cpu, hot_cpu, index, torch.from_numpy(tokens), consts, cfg)
with torch.no_grad():
    got = hot_embed(mem_cpu.to(dev), hot_cpu.to(dev), torch.from_numpy(hot_table.rows).to(dev),
                    torch.from_numpy(tokens).to(dev), consts, cfg).cpu()
same = torch.equal(got, want)
if not same:
    failures.append("hot_embed")
lines += ["", f"lma::hot_embed (key lookup fused into the hot gather) on {dev.type}: identical to "
          f"the CPU reference: {'yes' if same else 'NO'}", ""]
print(lines[-2], flush=True)

# ---------------------------------------------------------------- timings
def timed(fn, reps):
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        if dev.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)

reps = 5 if quick else 30
full_rows = 1 << 18 if quick else 33_762_577
batches = [512] if quick else [512, 4096, 65536]
lines += ["## Timings (median ms; F = 26 lookups per row, d = 16)", "",
          f"Full table: nn.EmbeddingBag({full_rows:,} x 16, mode='sum', bags of one) = "
          f"{full_rows * 64 / 1e9:.2f} GB. LMA op: M = 2^25 floats = 134 MB (1/16), lma mode.", "",
          "| impl | memory | B | forward ms | fwd+bwd ms | lookups/s (fwd) |", "|---|---|---|---|---|---|"]
bag = torch.nn.EmbeddingBag(full_rows, 16, mode="sum", sparse=True, device=dev)
for bsz in batches:
    idx = torch.randint(0, full_rows, (bsz * 26,), device=dev)
    offs = torch.arange(bsz * 26, device=dev)

    def bag_fwd():
        return bag(idx, offs)

    def bag_step():
        bag.weight.grad = None
        bag(idx, offs).sum().backward()

    f_ms = timed(bag_fwd, reps)
    b_ms = timed(bag_step, reps)
    lines.append(f"| EmbeddingBag (sparse grad) | {full_rows * 64 / 1e9:.2f} GB | {bsz} | {f_ms:.3f} | "
                 f"{b_ms:.3f} | {bsz * 26 / f_ms * 1e3:.3g} |")
    print(lines[-1], flush=True)
del bag
torch.cuda.empty_cache() if dev.type == "cuda" else None
m = 1 << (20 if quick else 25)
for z in (1, 4, 16):
    cfg = HashedGatherConfig(dim=16, z=z, mode="lma", aligned=False, m=m, seed=5)
    a, b, w = (t.to(dev) for t in cfg.param_tensors())
    mem = torch.randn(m, device=dev, requires_grad=True)
    for bsz in batches:
        keys = torch.randint(I64_MIN, I64_MAX, (bsz, 26), dtype=torch.int64, device=dev)

        def fwd():
            with torch.no_grad():
                return hashed_gather(mem, keys, (a, b, w), cfg)

        def step():
            mem.grad = None
            hashed_gather(mem, keys, (a, b, w), cfg).sum().backward()

        f_ms = timed(fwd, reps)
        b_ms = timed(step, reps)
        lines.append(f"| LMA op Z={z} (dense grad) | {m * 4 / 1e6:.0f} MB | {bsz} | {f_ms:.3f} | "
                     f"{b_ms:.3f} | {bsz * 26 / f_ms * 1e3:.3g} |")
        print(lines[-1], flush=True)
        if z == 4:
            # The hot serving form at the Kaggle shape: 107k hot rows, 88% of the tokens hot.
            hot_rows = torch.randn(107_000, 16, device=dev)
            index = torch.randint(0, 107_000, (bsz, 26), device=dev)
            index[torch.rand(bsz, 26, device=dev) >= 0.88] = -1

            def hot_fwd():
                with torch.no_grad():
                    return hot_gather(mem, hot_rows, index, keys, (a, b, w), cfg)

            h_ms = timed(hot_fwd, reps)
            lines.append(f"| lma::hot_gather Z=4, 107k hot rows, 88% hot (inference) | "
                         f"{m * 4 / 1e6:.0f} MB + 7 MB | {bsz} | {h_ms:.3f} | - | "
                         f"{bsz * 26 / h_ms * 1e3:.3g} |")
            print(lines[-1], flush=True)

# The key table lookup at the Kaggle vocabulary (33.7M keys; 705 MB table on the device).
n_vocab = 1 << 20 if quick else 33_762_577
vocab = np.unique(rng.integers(I64_MIN, I64_MAX, n_vocab, dtype=np.int64, endpoint=True))
t0 = time.perf_counter()
big = hashspec.build_key_table(vocab, np.arange(len(vocab)))
build_s = time.perf_counter() - t0
big_rows = torch.from_numpy(big.rows).to(dev)
lines += ["", f"Key table lookup, {len(vocab):,} keys ({big.nbytes / 1e6:.0f} MB table, built on "
          f"the host in {build_s:.0f} s), 95% present:", "",
          "| B | lookup ms | lookups/s |", "|---|---|---|"]
for bsz in batches:
    qk = np.where(rng.random((bsz, 26)) < 0.95, rng.choice(vocab, (bsz, 26)),
                  rng.integers(I64_MIN, I64_MAX, (bsz, 26), dtype=np.int64, endpoint=True))
    qd = torch.from_numpy(qk).to(dev)
    dflt = torch.full((), -1, dtype=torch.int64, device=dev)
    k_ms = timed(lambda: tk.key_lookup(qd, dflt, big_rows), reps)  # noqa: B023
    lines.append(f"| {bsz} | {k_ms:.3f} | {bsz * 26 / k_ms * 1e3:.3g} |")
    print(lines[-1], flush=True)
del big_rows

lines += ["", "result: " + ("OK" if not failures else "FAILED: " + "; ".join(failures))]
report = "\n".join(lines) + "\n"
print()
print(report)
out = os.environ.get("OUT")
if out:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpu_check.md"), "w") as fh:
        fh.write(report)
sys.exit(1 if failures else 0)
PYEOF
