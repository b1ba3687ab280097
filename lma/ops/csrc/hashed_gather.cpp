// Hashed gather (hash spec v1, lma/hashspec.py) on the CPU: forward gather, backward scatter-add,
// and the slot indices alone.
//
// Layout of the work: keys are processed in chunks; for each chunk the block starts of all its
// (key, block) pairs are computed first (integer hashing only), then the chunk's memory blocks are
// copied (gather). Chunks are spread over threads with at::parallel_for.
//
// The hashing, gathers and key table lookups themselves are in lma_kernels.h (shared with the
// onnxruntime custom-op library); this file checks tensors, dispatches dtypes and threads.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "lma_kernels.h"

namespace {

using namespace lma_kernels;

at::Tensor flat_keys(const at::Tensor& keys) {
  TORCH_CHECK(keys.scalar_type() == at::kLong, "keys must be int64");
  TORCH_CHECK(keys.device().is_cpu(), "keys must be a CPU tensor");
  return keys.reshape({-1}).contiguous();
}

// The Hasher of a hash spec's coefficient tensors, checked: A (nb, 2, 4), B (nb, 2), and for
// LMA W (16, nb); 1 <= Z <= M.
Hasher make_hasher(const at::Tensor& coef_a, const at::Tensor& coef_b, const at::Tensor& nibble_w,
                   int64_t m, int64_t z, bool lma, bool aligned) {
  TORCH_CHECK(coef_a.dim() == 3 && coef_a.size(1) == 2 && coef_a.size(2) == 4,
              "coef_a must be (n_blocks, 2, 4)");
  const int64_t nb = coef_a.size(0);
  TORCH_CHECK(coef_b.dim() == 2 && coef_b.size(0) == nb && coef_b.size(1) == 2,
              "coef_b must be (n_blocks, 2)");
  TORCH_CHECK(z >= 1 && m >= z, "need 1 <= Z <= M");
  const at::Tensor ca = coef_a.to(at::kCPU, at::kLong).contiguous();
  const at::Tensor cb = coef_b.to(at::kCPU, at::kLong).contiguous();
  at::Tensor cw;
  if (lma) {
    TORCH_CHECK(nibble_w.dim() == 2 && nibble_w.size(0) == 16 && nibble_w.size(1) == nb,
                "nibble_w must be (16, n_blocks)");
    cw = nibble_w.to(at::kCPU, at::kLong).contiguous();
  }
  return Hasher(ca.data_ptr<int64_t>(), cb.data_ptr<int64_t>(),
                lma ? cw.data_ptr<int64_t>() : nullptr, nb, m, z, lma, aligned);
}

}  // namespace

// (N,) int64 keys -> (N, nb * Z) int64 memory indices.
at::Tensor slot_indices(const at::Tensor& keys, const at::Tensor& coef_a, const at::Tensor& coef_b,
                        const at::Tensor& nibble_w, int64_t m, int64_t z, bool lma, bool aligned) {
  const Hasher hs = make_hasher(coef_a, coef_b, nibble_w, m, z, lma, aligned);
  const at::Tensor k = flat_keys(keys);
  const int64_t n = k.numel();
  const int64_t nb = hs.nb;
  at::Tensor out = at::empty({n, nb * z}, k.options());
  const int64_t* kp = k.data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, n, grain_for(nb), [&](int64_t begin, int64_t end) {
    std::vector<int64_t> st(kChunk * nb);
    for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
      const int64_t c1 = std::min(end, c0 + kChunk);
      hs.starts(kp, c0, c1, st.data());
      for (int64_t i = c0; i < c1; ++i)
        for (int64_t c = 0; c < nb; ++c)
          for (int64_t j = 0; j < z; ++j)
            op[(i * nb + c) * z + j] = st[(i - c0) * nb + c] + j;
    }
  });
  return out;
}

// memory (M,), keys (...) int64 -> (..., dim).
at::Tensor forward(const at::Tensor& memory, const at::Tensor& keys, const at::Tensor& coef_a,
                   const at::Tensor& coef_b, const at::Tensor& nibble_w, int64_t dim, int64_t z,
                   bool lma, bool aligned) {
  TORCH_CHECK(memory.dim() == 1 && memory.device().is_cpu(), "memory must be a 1-d CPU tensor");
  TORCH_CHECK(dim % z == 0 && coef_a.size(0) == dim / z, "need n_blocks = dim / Z");
  const at::Tensor mem = memory.contiguous();
  const Hasher hs = make_hasher(coef_a, coef_b, nibble_w, mem.numel(), z, lma, aligned);
  const at::Tensor k = flat_keys(keys);
  const int64_t n = k.numel();
  std::vector<int64_t> shape(keys.sizes().begin(), keys.sizes().end());
  shape.push_back(dim);
  at::Tensor out = at::empty(shape, mem.options());
  const int64_t* kp = k.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mem.scalar_type(), "lma_hashed_gather", [&] {
    const scalar_t* mp = mem.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, grain_for(hs.nb), [&](int64_t begin, int64_t end) {
      gather_range(hs, mp, kp, begin, end, op);
    });
  });
  return out;
}

namespace {

void check_hot(const at::Tensor& memory, const at::Tensor& hot, int64_t dim, int64_t z,
               const at::Tensor& coef_a) {
  TORCH_CHECK(memory.dim() == 1 && memory.device().is_cpu(), "memory must be a 1-d CPU tensor");
  TORCH_CHECK(dim % z == 0 && coef_a.size(0) == dim / z, "need n_blocks = dim / Z");
  TORCH_CHECK(hot.dim() == 2 && hot.size(1) == dim && hot.device().is_cpu(),
              "hot must be a (H, dim) CPU tensor");
  TORCH_CHECK(hot.scalar_type() == memory.scalar_type(), "hot must have the memory's dtype");
}

// A v3 table's shape, checked against its own first rows before any slot is read.
void check_key_table(const at::Tensor& table) {
  TORCH_CHECK(table.dim() == 2 && table.size(1) == 2 && table.size(0) >= 3 &&
                  table.scalar_type() == at::kLong && table.device().is_cpu(),
              "table must be a (rows >= 3, 2) int64 CPU tensor (key table v3)");
  const at::Tensor head = table.narrow(0, 0, 1).contiguous();
  const int64_t m = head.data_ptr<int64_t>()[0];
  const int64_t g = head.data_ptr<int64_t>()[1];
  TORCH_CHECK(key_table_fits(table.size(0), m, g),
              "key table v3 of ", table.size(0), " rows does not fit its own header (", m,
              " slots, ", g, " groups)");
}

}  // namespace

namespace {

// What hot_gather and hot_embed share: the (..., dim) rows of keys (hot_range), where
// chunk_index(c0, c1, flat keys, scratch) gives each chunk's hot rows (-1 = cold).
template <typename ChunkIndex>
at::Tensor hot_rows(const at::Tensor& memory, const at::Tensor& hot, const at::Tensor& keys,
                    const Hasher& hs, int64_t dim, ChunkIndex chunk_index) {
  const at::Tensor mem = memory.contiguous();
  const at::Tensor hr = hot.contiguous();
  const at::Tensor k = flat_keys(keys);
  const int64_t n = k.numel();
  std::vector<int64_t> shape(keys.sizes().begin(), keys.sizes().end());
  shape.push_back(dim);
  at::Tensor out = at::empty(shape, mem.options());
  const int64_t* kp = k.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mem.scalar_type(), "lma_hot_rows", [&] {
    const scalar_t* mp = mem.data_ptr<scalar_t>();
    const scalar_t* hp = hr.size(0) > 0 ? hr.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, grain_for(hs.nb), [&](int64_t begin, int64_t end) {
      hot_range(hs, mp, hp, kp, begin, end, op, chunk_index);
    });
  });
  return out;
}

}  // namespace

// Hot-token serving form: memory (M,), hot (H, dim), index (...) int64 (-1 = cold), keys (...)
// int64 -> (..., dim). Where index >= 0 the output row is hot[index] (a precomputed embedding),
// else exactly forward()'s row for keys[i]; chunks as in hot_chunk.
at::Tensor hot_gather(const at::Tensor& memory, const at::Tensor& hot, const at::Tensor& index,
                      const at::Tensor& keys, const at::Tensor& coef_a, const at::Tensor& coef_b,
                      const at::Tensor& nibble_w, int64_t dim, int64_t z, bool lma, bool aligned) {
  check_hot(memory, hot, dim, z, coef_a);
  TORCH_CHECK(index.scalar_type() == at::kLong, "index must be int64");
  TORCH_CHECK(index.sizes() == keys.sizes(), "index and keys must have the same shape");
  const Hasher hs = make_hasher(coef_a, coef_b, nibble_w, memory.numel(), z, lma, aligned);
  const at::Tensor ix = flat_keys(index);
  const int64_t* ip = ix.data_ptr<int64_t>();
  const int64_t n_hot = hot.size(0);
  // Checked before any row is written: an index past the hot rows would read out of bounds.
  for (int64_t i = 0; i < ix.numel(); ++i)
    TORCH_CHECK(ip[i] < n_hot, "hot index ", ip[i], " at position ", i, " is out of range for ",
                n_hot, " hot rows");
  return hot_rows(memory, hot, keys, hs, dim,
                  [&](int64_t c0, int64_t, const int64_t*, int64_t*) -> const int64_t* {
                    return ip + c0;
                  });
}

// The hot serving form with its token -> hot row lookup in the same pass: memory (M,), hot
// (H, dim), table (key table v3: token -> hot row), tokens (...) int64 -> (..., dim) =
// hot_gather(memory, hot, key_lookup(tokens, -1, table), tokens, ...). Per chunk the tokens'
// hot rows are looked up (lookup_range), then hot_chunk; no index tensor is written and read
// back.
at::Tensor hot_embed(const at::Tensor& memory, const at::Tensor& hot, const at::Tensor& table,
                     const at::Tensor& tokens, const at::Tensor& coef_a, const at::Tensor& coef_b,
                     const at::Tensor& nibble_w, int64_t dim, int64_t z, bool lma, bool aligned) {
  check_hot(memory, hot, dim, z, coef_a);
  check_key_table(table);
  const Hasher hs = make_hasher(coef_a, coef_b, nibble_w, memory.numel(), z, lma, aligned);
  const at::Tensor tl = table.contiguous();
  const SlotHash sh(tl.data_ptr<int64_t>());
  const int64_t n_hot = hot.size(0);
  return hot_rows(memory, hot, tokens, hs, dim,
                  [&](int64_t c0, int64_t c1, const int64_t* kp, int64_t* ix) -> const int64_t* {
                    lookup_range(sh, kp, c0, c1, nullptr, -1, ix);
                    for (int64_t i = c0; i < c1; ++i)
                      TORCH_CHECK(ix[i - c0] < n_hot, "the key table maps token ", kp[i],
                                  " to hot row ", ix[i - c0], ", out of range for ", n_hot,
                                  " hot rows");
                    return ix;
                  });
}

// grad (..., dim), keys (...) -> dense (M,) gradient of memory (scatter-add).
//
// Thread safety without atomics: the starts of all (key, block) pairs are computed in parallel
// first. Then, with "owner" partitioning, each thread owns a contiguous range of memory and scans
// all starts, adding the elements that fall into its range (deterministic; costs one extra scan
// of the starts per thread). With "partials", each thread scatters its keys into a private dense
// (M,) buffer and the buffers are summed (cheap only when M is small). "auto" picks partials when
// threads * M is small compared with the number of gradient elements, else owner.
at::Tensor backward(const at::Tensor& grad, const at::Tensor& keys, const at::Tensor& coef_a,
                    const at::Tensor& coef_b, const at::Tensor& nibble_w, int64_t m, int64_t dim,
                    int64_t z, bool lma, bool aligned, const std::string& strategy) {
  TORCH_CHECK(grad.device().is_cpu(), "grad must be a CPU tensor");
  TORCH_CHECK(dim % z == 0 && coef_a.size(0) == dim / z, "need n_blocks = dim / Z");
  const Hasher hs = make_hasher(coef_a, coef_b, nibble_w, m, z, lma, aligned);
  const at::Tensor k = flat_keys(keys);
  const int64_t n = k.numel();
  const int64_t nb = hs.nb;
  TORCH_CHECK(grad.numel() == n * dim, "grad must have keys.numel() * dim elements");
  const at::Tensor g = grad.reshape({-1}).contiguous();
  at::Tensor out = at::zeros({m}, g.options());
  if (n == 0) return out;
  at::Tensor starts = at::empty({n * nb}, k.options());
  const int64_t* kp = k.data_ptr<int64_t>();
  int64_t* sp = starts.data_ptr<int64_t>();
  at::parallel_for(0, n, grain_for(nb), [&](int64_t begin, int64_t end) {
    hs.starts(kp, begin, end, sp + begin * nb);
  });
  const int64_t threads = at::get_num_threads();
  const int64_t pairs = n * nb;
  std::string mode = strategy;
  if (mode == "auto") {
    if (threads <= 1 || pairs * z < 16384) mode = "serial";
    else mode = (threads * m <= 2 * pairs * z) ? "partials" : "owner";
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "lma_hashed_gather_bwd", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* outp = out.data_ptr<scalar_t>();
    if (mode == "serial") {
      for (int64_t i = 0; i < pairs; ++i) {
        scalar_t* dst = outp + sp[i];
        const scalar_t* src = gp + i * z;
        for (int64_t j = 0; j < z; ++j) dst[j] += src[j];
      }
    } else if (mode == "owner") {
      at::parallel_for(0, m, std::max<int64_t>(4096, m / (4 * threads)), [&](int64_t lo, int64_t hi) {
        for (int64_t i = 0; i < pairs; ++i) {
          const int64_t s = sp[i];
          if (s + z <= lo || s >= hi) continue;
          const int64_t j0 = std::max<int64_t>(0, lo - s);
          const int64_t j1 = std::min<int64_t>(z, hi - s);
          const scalar_t* src = gp + i * z;
          for (int64_t j = j0; j < j1; ++j) outp[s + j] += src[j];
        }
      });
    } else if (mode == "partials") {
      const int64_t parts = std::min<int64_t>(threads, (pairs + 1023) / 1024);
      std::vector<at::Tensor> bufs(parts);
      for (int64_t t = 1; t < parts; ++t) bufs[t] = at::zeros({m}, g.options());
      bufs[0] = out;
      at::parallel_for(0, parts, 1, [&](int64_t tb, int64_t te) {
        for (int64_t t = tb; t < te; ++t) {
          scalar_t* dst = bufs[t].data_ptr<scalar_t>();
          const int64_t i0 = pairs * t / parts;
          const int64_t i1 = pairs * (t + 1) / parts;
          for (int64_t i = i0; i < i1; ++i) {
            const scalar_t* src = gp + i * z;
            scalar_t* d = dst + sp[i];
            for (int64_t j = 0; j < z; ++j) d[j] += src[j];
          }
        }
      });
      if (parts > 1) {
        at::parallel_for(0, m, 16384, [&](int64_t lo, int64_t hi) {
          for (int64_t t = 1; t < parts; ++t) {
            const scalar_t* src = bufs[t].data_ptr<scalar_t>();
            for (int64_t i = lo; i < hi; ++i) outp[i] += src[i];
          }
        });
      }
    } else {
      TORCH_CHECK(false, "unknown backward strategy ", strategy);
    }
  });
  return out;
}

// Key table lookup (lma/hashspec.py, "Key tables", v3): keys (N,) int64 -> values, or the
// default where a key is absent: per key its group's displacement, then its one slot (key and
// value side by side), each pass over a chunk of keys prefetched before it is read.
at::Tensor key_lookup(const at::Tensor& keys, const at::Tensor& fallback, const at::Tensor& table) {
  check_key_table(table);
  const at::Tensor k = flat_keys(keys);
  const at::Tensor d = fallback.to(at::kLong).expand(keys.sizes()).reshape({-1}).contiguous();
  const at::Tensor tl = table.contiguous();
  const SlotHash sh(tl.data_ptr<int64_t>());
  const int64_t n = k.numel();
  at::Tensor out = at::empty({n}, k.options());
  const int64_t* kp = k.data_ptr<int64_t>();
  const int64_t* dp = d.data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    lookup_range(sh, kp, begin, end, dp, 0, op + begin);
  });
  return out.reshape(keys.sizes());
}

// interaction.cpp
at::Tensor dot_interaction(const at::Tensor& prefix, const at::Tensor& vecs, const at::Tensor& pairs);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "LMA hashed gather (hash spec v1) CPU kernels";
  mod.def("slot_indices", &slot_indices, "(N,) keys -> (N, dim) slot indices");
  mod.def("forward", &forward, "hashed gather forward");
  mod.def("backward", &backward, "hashed gather backward (dense scatter-add)");
  mod.def("hot_gather", &hot_gather, "hot rows where index >= 0, else the hashed gather of keys");
  mod.def("hot_embed", &hot_embed, "hot_gather with its token -> hot row key table lookup fused");
  mod.def("key_lookup", &key_lookup, "key table v3 lookup (keys -> values or default)");
  mod.def("dot_interaction", &dot_interaction, "DLRM pairwise dot products behind a prefix");
  mod.attr("KEY_TABLE_VERSION") = 3;
  mod.attr("SPEC_VERSION") = 1;
}
