"""Memory of ``lma verify``'s engine steps on a bundle, one by one: load the bundle, build the
torch eager model (weights memory-mapped), its forward on the sample rows, the onnxruntime
session and its run. After each step: VmHWM (peak since the step began), VmRSS, RssAnon and
RssFile in MiB; at the end the proportional set size from /proc/self/smaps_rollup, which counts
a page of the weights file once even when two mappings of it (torch's and onnxruntime's) are
resident, where RSS counts it per mapping. ``--release-eager`` drops the bundle's cached eager
model (and with it torch's mapping of the weights) before the onnxruntime session, to show the
peak a verify that released it would have.

    python scripts/memprof/verify_steps.py BUNDLE [--release-eager]

docs/RESULTS.md "Full tables and LMA 16x at the Kaggle vocabulary" ran it on the full bundle of
the 20M-row run (runs/fullrun-B_full_bb7).
"""

from __future__ import annotations

import argparse
import gc

import numpy as np
import torch
from _mem import Steps

from lma.bundle import load_bundle


def rollup_mib() -> dict[str, int]:
    """Rss, Pss, Pss_Anon and Pss_File of this process (/proc/self/smaps_rollup), in MiB."""
    out: dict[str, int] = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Rss", "Pss", "Pss_Anon", "Pss_File"):
                out[key] = int(value.split()[0]) // 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--release-eager", action="store_true",
                    help="drop the eager model before the onnxruntime session")
    args = ap.parse_args()
    import onnxruntime as ort

    steps = Steps(unit=1024.0, label="MiB")
    bundle = steps.run("load_bundle", lambda: load_bundle(args.bundle))
    sample = bundle.sample()
    dense = np.ascontiguousarray(sample["dense"], np.float32)
    tokens = np.ascontiguousarray(sample["tokens"], np.int64)
    eager = steps.run("eager_model (weights mapped)", bundle.eager_model)
    with torch.no_grad():
        ref = steps.run("eager forward",
                        lambda: eager(torch.from_numpy(dense), torch.from_numpy(tokens)).numpy())
    if args.release_eager:
        del eager
        # The bundle caches its eager model: clearing the cache unmaps torch's weights.
        steps.run("release the eager model", lambda: (bundle._cache.clear(), gc.collect()))
    sess = steps.run("onnxruntime session", lambda: ort.InferenceSession(
        str(bundle.onnx_path), providers=["CPUExecutionProvider"]))
    (got,) = steps.run("onnxruntime run",
                       lambda: sess.run(None, {"dense": dense, "tokens": tokens}))
    print("max |logit diff| onnxruntime vs eager",
          float(np.abs(np.asarray(got).reshape(-1) - ref.reshape(-1)).max()))
    print("smaps_rollup (MiB)", rollup_mib())


if __name__ == "__main__":
    main()
