// The LMA CPU kernels' core, free of any framework: hash spec v1 block starts (Hasher), block
// gathers, the hot serving form's chunk, and key table v3 lookups (SlotHash, lookup_range).
// Included by the torch extension (hashed_gather.cpp) and the onnxruntime custom-op library
// (ort_ops.cpp), so that both run the same code; callers check shapes and arguments first.
//
// Spec recap (all exact in int64; see lma/hashspec.py):
//   robez: u_i = (key >> 16 i) & 0xFFFF
//   lma:   bkey_c = sum_p ((sig >> 4 p) & 15) * W[p, c];  u_i = (bkey_c >> 16 i) & 0xFFFF
//   h_j = (B[c, j] + sum_i A[c, j, i] u_i) mod P,  H = h_0 P + h_1
//   start = H mod (M - Z + 1)   or   Z * (H mod floor(M / Z))  (aligned)
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace lma_kernels {

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

  // a (nb, 2, 4), b (nb, 2) and, for LMA, w (16, nb): row-major int64 arrays the caller has
  // checked (shapes, 1 <= Z <= M); they are copied.
  Hasher(const int64_t* a_, const int64_t* b_, const int64_t* w_, int64_t nb_, int64_t m,
         int64_t z_, bool lma_, bool aligned_)
      : nb(nb_), z(z_), lma(lma_), aligned(aligned_) {
    n_starts = static_cast<uint64_t>(aligned ? m / z : m - z + 1);
    fmod = FastMod(n_starts);
    a.assign(a_, a_ + nb * 8);
    b.assign(b_, b_ + nb * 2);
    if (lma) {
      w.assign(w_, w_ + 16 * nb);
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

// Keys per task: enough work (tens of microseconds) that spreading small batches over threads
// does not cost more in wake-ups than it saves.
inline int64_t grain_for(int64_t nb) { return std::max<int64_t>(256, 8192 / std::max<int64_t>(nb, 1)); }

// Blocks of Z >= 4 elements are prefetched as soon as their start is known; for single elements
// prefetching costs more than the latency it hides.
template <typename T>
inline const char* prefetch_base(const T* mp, int64_t z) {
  return z >= 4 ? reinterpret_cast<const char*>(mp) : nullptr;
}

// The hashed gather of keys[begin, end) into their (nb * Z)-element output rows, chunk by chunk:
// a chunk's block starts first (prefetching the blocks), then its blocks copied.
template <typename T>
inline void gather_range(const Hasher& hs, const T* mp, const int64_t* kp, int64_t begin,
                         int64_t end, T* op) {
  const int64_t dim = hs.nb * hs.z;
  const char* pf = prefetch_base(mp, hs.z);
  std::vector<int64_t> st(kChunk * hs.nb);
  for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
    const int64_t c1 = std::min(end, c0 + kChunk);
    hs.starts(kp, c0, c1, st.data(), pf, sizeof(T));
    gather_blocks(op + c0 * dim, mp, st.data(), (c1 - c0) * hs.nb, hs.z);
  }
}

// The hot serving form over keys[begin, end) (hot_chunk per chunk), where chunk_index(c0, c1,
// kp, scratch) gives the chunk's hot rows (-1 = cold), in its kChunk-entry scratch buffer or
// elsewhere.
template <typename T, typename ChunkIndex>
inline void hot_range(const Hasher& hs, const T* mp, const T* hp, const int64_t* kp, int64_t begin,
                      int64_t end, T* op, ChunkIndex chunk_index) {
  const char* pf = prefetch_base(mp, hs.z);
  std::vector<int64_t> cold_pos(kChunk), cold_key(kChunk), st(kChunk * hs.nb), ix(kChunk);
  for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
    const int64_t c1 = std::min(end, c0 + kChunk);
    const int64_t* ip = chunk_index(c0, c1, kp, ix.data());
    hot_chunk(hs, mp, hp, ip, kp, op, c0, c1, hs.nb * hs.z, pf, cold_pos.data(), cold_key.data(),
              st.data());
  }
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


// Whether a key table of ``rows`` rows fits its own header (M slots, G groups): v3's
// 2 + M + ceil(G / 2) rows, 2 <= M < 2^32, G >= 1. Checked before any slot is read.
inline bool key_table_fits(int64_t rows, int64_t m, int64_t g) {
  return m >= 2 && m < (int64_t{1} << 32) && g >= 1 && rows == 2 + m + (g + 1) / 2;
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


}  // namespace lma_kernels
