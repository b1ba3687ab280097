// Hashed gather (hash spec v1, lma/hashspec.py) on the CPU: forward gather, backward scatter-add,
// and the slot indices alone.
//
// Layout of the work: keys are processed in chunks; for each chunk the block starts of all its
// (key, block) pairs are computed first (integer hashing only), then the chunk's memory blocks are
// copied (gather). Chunks are spread over threads with at::parallel_for.
//
// Spec recap (all exact in int64; see hashspec.py):
//   robez: u_i = (key >> 16 i) & 0xFFFF
//   lma:   bkey_c = sum_p ((sig >> 4 p) & 15) * W[p, c];  u_i = (bkey_c >> 16 i) & 0xFFFF
//   h_j = (B[c, j] + sum_i A[c, j, i] u_i) mod P,  H = h_0 P + h_1
//   start = H mod (M - Z + 1)   or   Z * (H mod floor(M / Z))  (aligned)
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kP = 2147483647LL;  // 2^31 - 1
constexpr int64_t kChunk = 256;       // keys whose starts are computed before their gather

// x mod P for 0 <= x < 2^62 by Mersenne folding (2^31 = 1 mod P); exact, no division.
inline uint64_t mod_p(uint64_t x) {
  x = (x & kP) + (x >> 31);  // < 2^31 + 2^31
  x = (x & kP) + (x >> 31);  // <= P + 1
  return x >= static_cast<uint64_t>(kP) ? x - kP : x;
}

// Exact H mod n for H < 2^63 with a precomputed reciprocal (no division in the hot loop):
// q = floor(H * floor(2^64 / n) / 2^64) is floor(H / n) or one less, so one correction suffices.
struct FastMod {
  uint64_t n = 1;
  uint64_t inv = 0;
  explicit FastMod(uint64_t n_) : n(n_), inv(n_ > 1 ? ~uint64_t{0} / n_ : 0) {
    // ~0 / n = floor((2^64 - 1) / n) = floor(2^64 / n) unless n divides 2^64 (a power of two),
    // where it is one less; the estimate is then still within one of floor(H / n) for H < 2^63.
  }
  inline uint64_t operator()(uint64_t h) const {
    if (n == 1) return 0;
    const uint64_t q = static_cast<uint64_t>((static_cast<unsigned __int128>(h) * inv) >> 64);
    const uint64_t r = h - q * n;
    // One conditional subtraction, written so that it compiles to a conditional move: whether
    // the estimate was one short is data-dependent (a branch here is mispredicted often and
    // cost about half the time of a key table lookup).
    return r >= n ? r - n : r;
  }
};

struct Hasher {
  int64_t nb;
  int64_t z;
  bool lma;
  bool aligned;
  uint64_t n_starts;
  FastMod fmod{1};
  std::vector<int64_t> a;  // (nb, 2, 4)
  std::vector<int64_t> b;  // (nb, 2)
  std::vector<int64_t> w;  // (16, nb)
  // Non-zero entries of W per block (LMA): at most T (<= 8) of 16 positions are used.
  std::vector<int32_t> wpos;   // (nb, 16) positions, wcount[c] of them valid
  std::vector<int64_t> wval;   // (nb, 16) weights
  std::vector<int32_t> wcount; // (nb,)

  Hasher(const at::Tensor& coef_a, const at::Tensor& coef_b, const at::Tensor& nibble_w,
         int64_t m, int64_t z_, bool lma_, bool aligned_)
      : nb(coef_a.size(0)), z(z_), lma(lma_), aligned(aligned_) {
    TORCH_CHECK(coef_a.dim() == 3 && coef_a.size(1) == 2 && coef_a.size(2) == 4,
                "coef_a must be (n_blocks, 2, 4)");
    TORCH_CHECK(coef_b.dim() == 2 && coef_b.size(0) == nb && coef_b.size(1) == 2,
                "coef_b must be (n_blocks, 2)");
    TORCH_CHECK(z >= 1 && m >= z, "need 1 <= Z <= M");
    n_starts = static_cast<uint64_t>(aligned ? m / z : m - z + 1);
    fmod = FastMod(n_starts);
    auto ca = coef_a.to(at::kCPU, at::kLong).contiguous();
    auto cb = coef_b.to(at::kCPU, at::kLong).contiguous();
    a.assign(ca.data_ptr<int64_t>(), ca.data_ptr<int64_t>() + nb * 8);
    b.assign(cb.data_ptr<int64_t>(), cb.data_ptr<int64_t>() + nb * 2);
    if (lma) {
      TORCH_CHECK(nibble_w.dim() == 2 && nibble_w.size(0) == 16 && nibble_w.size(1) == nb,
                  "nibble_w must be (16, n_blocks)");
      auto cw = nibble_w.to(at::kCPU, at::kLong).contiguous();
      w.assign(cw.data_ptr<int64_t>(), cw.data_ptr<int64_t>() + 16 * nb);
      wpos.assign(nb * 16, 0);
      wval.assign(nb * 16, 0);
      wcount.assign(nb, 0);
      for (int64_t c = 0; c < nb; ++c)
        for (int p = 0; p < 16; ++p)
          if (w[p * nb + c] != 0) {
            const int32_t k = wcount[c]++;
            wpos[c * 16 + k] = p;
            wval[c * 16 + k] = w[p * nb + c];
          }
    }
  }

  inline int64_t start_of(const int64_t* u, int64_t c) const {
    const int64_t* a0 = &a[c * 8];
    const int64_t* a1 = a0 + 4;
    if (u[2] == 0 && u[3] == 0) {  // LMA block keys are < 2^32: two limbs
      const uint64_t y0 = static_cast<uint64_t>(b[c * 2] + a0[0] * u[0] + a0[1] * u[1]);
      const uint64_t y1 = static_cast<uint64_t>(b[c * 2 + 1] + a1[0] * u[0] + a1[1] * u[1]);
      const uint64_t s = fmod(mod_p(y0) * static_cast<uint64_t>(kP) + mod_p(y1));
      return static_cast<int64_t>(aligned ? s * static_cast<uint64_t>(z) : s);
    }
    const uint64_t x0 = static_cast<uint64_t>(b[c * 2] + a0[0] * u[0] + a0[1] * u[1] +
                                              a0[2] * u[2] + a0[3] * u[3]);
    const uint64_t x1 = static_cast<uint64_t>(b[c * 2 + 1] + a1[0] * u[0] + a1[1] * u[1] +
                                              a1[2] * u[2] + a1[3] * u[3]);
    const uint64_t h = mod_p(x0) * static_cast<uint64_t>(kP) + mod_p(x1);  // < 2^62
    const uint64_t s = fmod(h);
    return static_cast<int64_t>(aligned ? s * static_cast<uint64_t>(z) : s);
  }

  // starts[(n - begin) * nb + c] for keys[begin:end]. With ``pf`` (the memory, ``pf_elem`` bytes
  // per element) each block is prefetched as soon as its start is known, so the hashing of the
  // following keys hides the memory latency of the gather that comes after.
  void starts(const int64_t* keys, int64_t begin, int64_t end, int64_t* out,
              const char* pf = nullptr, int64_t pf_elem = 0) const {
    int64_t u[4];
    for (int64_t n = begin; n < end; ++n) {
      const int64_t k = keys[n];
      int64_t* row = out + (n - begin) * nb;
      if (!lma) {
        for (int i = 0; i < 4; ++i) u[i] = (k >> (16 * i)) & 0xFFFF;
        for (int64_t c = 0; c < nb; ++c) row[c] = start_of(u, c);
      } else if (nb > 2) {  // many blocks: extract the 16 nibbles once
        int64_t nib[16];
        for (int p = 0; p < 16; ++p) nib[p] = (k >> (4 * p)) & 0xF;
        for (int64_t c = 0; c < nb; ++c) {
          int64_t bkey = 0;
          const int32_t* pos = &wpos[c * 16];
          const int64_t* val = &wval[c * 16];
          for (int32_t j = 0; j < wcount[c]; ++j) bkey += nib[pos[j]] * val[j];
          for (int i = 0; i < 4; ++i) u[i] = (bkey >> (16 * i)) & 0xFFFF;
          row[c] = start_of(u, c);
        }
      } else {  // one or two blocks: only the T nibbles in use
        for (int64_t c = 0; c < nb; ++c) {
          int64_t bkey = 0;
          const int32_t* pos = &wpos[c * 16];
          const int64_t* val = &wval[c * 16];
          for (int32_t j = 0; j < wcount[c]; ++j) bkey += ((k >> (4 * pos[j])) & 0xF) * val[j];
          for (int i = 0; i < 4; ++i) u[i] = (bkey >> (16 * i)) & 0xFFFF;
          row[c] = start_of(u, c);
        }
      }
      if (pf != nullptr) {
        for (int64_t c = 0; c < nb; ++c) {
          const char* first = pf + row[c] * pf_elem;
          const char* last = first + (z * pf_elem - 1);
          __builtin_prefetch(first);
          if (((reinterpret_cast<uintptr_t>(first) ^ reinterpret_cast<uintptr_t>(last)) >> 6) != 0)
            __builtin_prefetch(last);
        }
      }
    }
  }
};

// Copy of blocks of Z elements; fixed sizes compile to a few vector moves instead of a call.
template <typename T>
inline void gather_blocks(T* dst, const T* mem, const int64_t* starts, int64_t count, int64_t z) {
  if (z == 1) {
    for (int64_t i = 0; i < count; ++i) dst[i] = mem[starts[i]];
    return;
  }
  switch (z) {
#define LMA_CASE(ZZ)                                                                   \
  case ZZ:                                                                             \
    for (int64_t i = 0; i < count; ++i) {                                              \
      const T* src = mem + starts[i];                                                  \
      T* d = dst + i * ZZ;                                                             \
      for (int j = 0; j < ZZ; ++j) d[j] = src[j];                                      \
    }                                                                                  \
    return;
    LMA_CASE(2)
    LMA_CASE(4)
    LMA_CASE(8)
    LMA_CASE(16)
    LMA_CASE(32)
#undef LMA_CASE
    default:
      for (int64_t i = 0; i < count; ++i) std::memcpy(dst + i * z, mem + starts[i], z * sizeof(T));
  }
}

// Keys per task: enough work (tens of microseconds) that spreading small batches over threads
// does not cost more in wake-ups than it saves.
int64_t grain_for(int64_t nb) { return std::max<int64_t>(256, 8192 / std::max<int64_t>(nb, 1)); }

at::Tensor flat_keys(const at::Tensor& keys) {
  TORCH_CHECK(keys.scalar_type() == at::kLong, "keys must be int64");
  TORCH_CHECK(keys.device().is_cpu(), "keys must be a CPU tensor");
  return keys.reshape({-1}).contiguous();
}

}  // namespace

// (N,) int64 keys -> (N, nb * Z) int64 memory indices.
at::Tensor slot_indices(const at::Tensor& keys, const at::Tensor& coef_a, const at::Tensor& coef_b,
                        const at::Tensor& nibble_w, int64_t m, int64_t z, bool lma, bool aligned) {
  const Hasher hs(coef_a, coef_b, nibble_w, m, z, lma, aligned);
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
  const Hasher hs(coef_a, coef_b, nibble_w, mem.numel(), z, lma, aligned);
  const at::Tensor k = flat_keys(keys);
  const int64_t n = k.numel();
  const int64_t nb = hs.nb;
  std::vector<int64_t> shape(keys.sizes().begin(), keys.sizes().end());
  shape.push_back(dim);
  at::Tensor out = at::empty(shape, mem.options());
  const int64_t* kp = k.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mem.scalar_type(), "lma_hashed_gather", [&] {
    const scalar_t* mp = mem.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, grain_for(nb), [&](int64_t begin, int64_t end) {
      std::vector<int64_t> st(kChunk * nb);
      for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
        const int64_t c1 = std::min(end, c0 + kChunk);
        // A block of indices (prefetching the memory they point at) ...
        // (Prefetching pays for blocks of 4+ elements; for single elements it costs more than
        // the latency it hides.)
        hs.starts(kp, c0, c1, st.data(), z >= 4 ? reinterpret_cast<const char*>(mp) : nullptr,
                  sizeof(scalar_t));
        // ... then the gather.
        gather_blocks(op + c0 * dim, mp, st.data(), (c1 - c0) * nb, z);
      }
    });
  });
  return out;
}

namespace {

// One chunk [c0, c1) of the hot serving form: where ip[i] >= 0 the output row is hot[ip[i]],
// else the hashed gather of kp[i]. The chunk's hot rows are prefetched and its cold keys
// collected, the cold keys' block starts computed (prefetching their blocks), then the hot rows
// are copied and the cold blocks gathered. Scratch buffers hold kChunk entries.
template <typename T>
inline void hot_chunk(const Hasher& hs, const T* mp, const T* hp, const int64_t* ip,
                      const int64_t* kp, T* op, int64_t c0, int64_t c1, int64_t dim, const char* pf,
                      int64_t* cold_pos, int64_t* cold_key, int64_t* st) {
  const int64_t row_bytes = dim * static_cast<int64_t>(sizeof(T));
  int64_t n_cold = 0;
  for (int64_t i = c0; i < c1; ++i) {
    const int64_t h = ip[i - c0];
    if (h >= 0) {
      const char* row = reinterpret_cast<const char*>(hp + h * dim);
      for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(row + b);
    } else {
      cold_pos[n_cold] = i;
      cold_key[n_cold++] = kp[i];
    }
  }
  hs.starts(cold_key, 0, n_cold, st, pf, sizeof(T));
  for (int64_t i = c0; i < c1; ++i) {
    const int64_t h = ip[i - c0];
    if (h >= 0) std::memcpy(op + i * dim, hp + h * dim, row_bytes);
  }
  for (int64_t j = 0; j < n_cold; ++j) gather_blocks(op + cold_pos[j] * dim, mp, st + j * hs.nb, hs.nb, hs.z);
}

void check_hot(const at::Tensor& memory, const at::Tensor& hot, int64_t dim, int64_t z,
               const at::Tensor& coef_a) {
  TORCH_CHECK(memory.dim() == 1 && memory.device().is_cpu(), "memory must be a 1-d CPU tensor");
  TORCH_CHECK(dim % z == 0 && coef_a.size(0) == dim / z, "need n_blocks = dim / Z");
  TORCH_CHECK(hot.dim() == 2 && hot.size(1) == dim && hot.device().is_cpu(),
              "hot must be a (H, dim) CPU tensor");
  TORCH_CHECK(hot.scalar_type() == memory.scalar_type(), "hot must have the memory's dtype");
}

// Key table v3 (lma/hashspec.py, "Key tables"): a table describes itself in its first two rows,
// (M, G) and (A, n_keys); then come M (key, value) slots and G displacements. Slot of key u:
// with y = u * A mod 2^64, (s0 + disp[g] * s1) mod M where g = (y >> 32) mod G,
// s0 = (y mod 2^32) mod M and s1 = 1 + (y >> 32) mod (M - 1); s0 + disp * s1 < 2^49, inside
// FastMod's range.
struct SlotHash {
  const int64_t* slots;  // (M, 2): key, value
  const int64_t* disp;   // (G,)
  uint64_t mult;
  FastMod mod_g;
  FastMod mod_m;
  FastMod mod_m1;
  explicit SlotHash(const int64_t* tp)
      : slots(tp + 4),
        disp(tp + 4 + 2 * tp[0]),
        mult(static_cast<uint64_t>(tp[2])),
        mod_g(static_cast<uint64_t>(tp[1])),
        mod_m(static_cast<uint64_t>(tp[0])),
        mod_m1(static_cast<uint64_t>(tp[0]) - 1) {}
  inline uint64_t group(uint64_t u) const { return mod_g((u * mult) >> 32); }
  inline uint64_t slot(uint64_t u, int64_t d) const {
    const uint64_t y = u * mult;
    const uint64_t s0 = mod_m(y & 0xFFFFFFFFull);
    const uint64_t s1 = 1 + mod_m1(y >> 32);
    return mod_m(s0 + static_cast<uint64_t>(d) * s1);
  }
};

// A v3 table's shape, checked against its own first rows before any slot is read.
void check_key_table(const at::Tensor& table) {
  TORCH_CHECK(table.dim() == 2 && table.size(1) == 2 && table.size(0) >= 3 &&
                  table.scalar_type() == at::kLong && table.device().is_cpu(),
              "table must be a (rows >= 3, 2) int64 CPU tensor (key table v3)");
  const at::Tensor head = table.narrow(0, 0, 1).contiguous();
  const int64_t m = head.data_ptr<int64_t>()[0];
  const int64_t g = head.data_ptr<int64_t>()[1];
  TORCH_CHECK(m >= 2 && m < (int64_t{1} << 32) && g >= 1 && table.size(0) == 2 + m + (g + 1) / 2,
              "key table v3 of ", table.size(0), " rows does not fit its own header (", m,
              " slots, ", g, " groups)");
}

// Key table lookups of keys[begin, end) into out[0, end - begin), per chunk of 64 keys in three
// passes so that the cache misses of a pass overlap: groups (displacements prefetched), slots
// (slot rows prefetched), then the compare. The default is dflt[i] where dflt is given, else
// dconst. Masks, not conditionals: whether a key is present is data, and a mispredicted branch
// costs about what the lookup does.
inline void lookup_range(const SlotHash& sh, const int64_t* kp, int64_t begin, int64_t end,
                         const int64_t* dflt, int64_t dconst, int64_t* out) {
  constexpr int64_t kLookupChunk = 64;
  uint64_t at[kLookupChunk];
  for (int64_t c0 = begin; c0 < end; c0 += kLookupChunk) {
    const int64_t c1 = std::min(end, c0 + kLookupChunk);
    for (int64_t i = c0; i < c1; ++i) {
      at[i - c0] = sh.group(static_cast<uint64_t>(kp[i]));
      __builtin_prefetch(sh.disp + at[i - c0]);
    }
    for (int64_t i = c0; i < c1; ++i) {
      at[i - c0] = sh.slot(static_cast<uint64_t>(kp[i]), sh.disp[at[i - c0]]);
      __builtin_prefetch(sh.slots + 2 * at[i - c0]);
    }
    for (int64_t i = c0; i < c1; ++i) {
      const int64_t* pair = sh.slots + 2 * at[i - c0];
      const uint64_t hit = -static_cast<uint64_t>(pair[0] == kp[i]);
      const uint64_t d = static_cast<uint64_t>(dflt != nullptr ? dflt[i] : dconst);
      out[i - begin] = static_cast<int64_t>((static_cast<uint64_t>(pair[1]) & hit) | (d & ~hit));
    }
  }
}

}  // namespace

namespace {

// What hot_gather and hot_embed share: the (..., dim) rows of keys, chunk by chunk (hot_chunk),
// where chunk_index(c0, c1, flat keys, scratch) gives the chunk's hot rows (-1 = cold), in its
// kChunk-entry scratch buffer or elsewhere.
template <typename ChunkIndex>
at::Tensor hot_rows(const at::Tensor& memory, const at::Tensor& hot, const at::Tensor& keys,
                    const Hasher& hs, int64_t dim, int64_t z, ChunkIndex chunk_index) {
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
    const char* pf = z >= 4 ? reinterpret_cast<const char*>(mp) : nullptr;
    at::parallel_for(0, n, grain_for(hs.nb), [&](int64_t begin, int64_t end) {
      std::vector<int64_t> cold_pos(kChunk), cold_key(kChunk), st(kChunk * hs.nb), ix(kChunk);
      for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
        const int64_t c1 = std::min(end, c0 + kChunk);
        const int64_t* ip = chunk_index(c0, c1, kp, ix.data());
        hot_chunk(hs, mp, hp, ip, kp, op, c0, c1, dim, pf, cold_pos.data(), cold_key.data(),
                  st.data());
      }
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
  const Hasher hs(coef_a, coef_b, nibble_w, memory.numel(), z, lma, aligned);
  const at::Tensor ix = flat_keys(index);
  const int64_t* ip = ix.data_ptr<int64_t>();
  const int64_t n_hot = hot.size(0);
  // Checked before any row is written: an index past the hot rows would read out of bounds.
  for (int64_t i = 0; i < ix.numel(); ++i)
    TORCH_CHECK(ip[i] < n_hot, "hot index ", ip[i], " at position ", i, " is out of range for ",
                n_hot, " hot rows");
  return hot_rows(memory, hot, keys, hs, dim, z,
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
  const Hasher hs(coef_a, coef_b, nibble_w, memory.numel(), z, lma, aligned);
  const at::Tensor tl = table.contiguous();
  const SlotHash sh(tl.data_ptr<int64_t>());
  const int64_t n_hot = hot.size(0);
  return hot_rows(memory, hot, tokens, hs, dim, z,
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
  const Hasher hs(coef_a, coef_b, nibble_w, m, z, lma, aligned);
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
