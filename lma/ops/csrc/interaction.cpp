// DLRM dot interaction on the CPU (lma/ops/interaction.py): the pairwise dot products of each
// row's vectors, without a batched matrix product and a gather.
//
// torch.bmm on (B, n, d) x (B, d, n) with n ~ 27, d = 16 multiplies B tiny matrices one call at a
// time and writes the whole (B, n, n) result, then a gather picks the upper triangle: about 1 ms
// per 1000 rows on one core, as much as the two MLPs together. Here rows are done eight at a time,
// one per vector lane: the block's vectors are transposed so that each wanted pair is d
// eight-wide multiplies and adds over contiguous memory (the block stays in L1), and only the
// pairs asked for are computed (the upper triangle: half of bmm's products).
//
// Every clone (AVX2 or the baseline) computes each dot product as the same sequence of separate
// float multiplies and adds, k = 0 .. d-1 (no FMA contraction), so the result does not depend on
// the machine the kernel runs on.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kLanes = 8;  // rows computed together, one per vector lane

// Rows [begin, end) in blocks of kLanes: the block's vectors are transposed to (n, d, kLanes), so
// that each pair's products over the d components are kLanes-wide multiplies and adds of
// contiguous lanes (one row per lane), then the block's dot products are stored per row.
__attribute__((target_clones("avx2", "default")))
void interact_rows(const float* prefix, int64_t k, const float* vecs, int64_t f, int64_t d,
                   const int64_t* pi, const int64_t* pj, int64_t n_pairs, float* out,
                   int64_t begin, int64_t end) {
  const int64_t n = f + (k > 0 ? 1 : 0);
  const int64_t off = k > 0 ? 1 : 0;
  const int64_t width = k + n_pairs;
  std::vector<float> t(n * d * kLanes);  // t[(e * d + c) * kLanes + r]: row r, vector e, elem c
  std::vector<float> dots(n_pairs * kLanes);
  for (int64_t b0 = begin; b0 < end; b0 += kLanes) {
    const int64_t rows = std::min<int64_t>(kLanes, end - b0);
    if (rows < kLanes) std::fill(t.begin(), t.end(), 0.0f);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t b = b0 + r;
      if (k > 0)
        for (int64_t c = 0; c < d; ++c) t[c * kLanes + r] = prefix[b * k + c];
      const float* rv = vecs + b * f * d;
      for (int64_t e = 0; e < f; ++e)
        for (int64_t c = 0; c < d; ++c) t[((off + e) * d + c) * kLanes + r] = rv[e * d + c];
    }
    const float* tp = t.data();
    // Four pairs at a time: four independent chains of adds keep the adder busy (one chain
    // would wait on each add's latency).
    int64_t p = 0;
    for (; p + 4 <= n_pairs; p += 4) {
      const float* a0 = tp + pi[p] * d * kLanes;
      const float* b0v = tp + pj[p] * d * kLanes;
      const float* a1 = tp + pi[p + 1] * d * kLanes;
      const float* b1v = tp + pj[p + 1] * d * kLanes;
      const float* a2 = tp + pi[p + 2] * d * kLanes;
      const float* b2v = tp + pj[p + 2] * d * kLanes;
      const float* a3 = tp + pi[p + 3] * d * kLanes;
      const float* b3v = tp + pj[p + 3] * d * kLanes;
      float s0[kLanes] = {}, s1[kLanes] = {}, s2[kLanes] = {}, s3[kLanes] = {};
      for (int64_t c = 0; c < d; ++c) {
        const int64_t q = c * kLanes;
        for (int64_t r = 0; r < kLanes; ++r) {
          const float m0 = a0[q + r] * b0v[q + r];
          const float m1 = a1[q + r] * b1v[q + r];
          const float m2 = a2[q + r] * b2v[q + r];
          const float m3 = a3[q + r] * b3v[q + r];
          s0[r] = s0[r] + m0;
          s1[r] = s1[r] + m1;
          s2[r] = s2[r] + m2;
          s3[r] = s3[r] + m3;
        }
      }
      for (int64_t r = 0; r < kLanes; ++r) {
        dots[p * kLanes + r] = s0[r];
        dots[(p + 1) * kLanes + r] = s1[r];
        dots[(p + 2) * kLanes + r] = s2[r];
        dots[(p + 3) * kLanes + r] = s3[r];
      }
    }
    for (; p < n_pairs; ++p) {
      const float* a = tp + pi[p] * d * kLanes;
      const float* bb = tp + pj[p] * d * kLanes;
      float acc[kLanes] = {};
      for (int64_t c = 0; c < d; ++c) {
        for (int64_t r = 0; r < kLanes; ++r) {
          const float prod = a[c * kLanes + r] * bb[c * kLanes + r];
          acc[r] = acc[r] + prod;
        }
      }
      for (int64_t r = 0; r < kLanes; ++r) dots[p * kLanes + r] = acc[r];
    }
    for (int64_t r = 0; r < rows; ++r) {
      float* o = out + (b0 + r) * width;
      if (k > 0) std::memcpy(o, prefix + (b0 + r) * k, k * sizeof(float));
      for (int64_t p = 0; p < n_pairs; ++p) o[k + p] = dots[p * kLanes + r];
    }
  }
}

}  // namespace

// prefix (B, k) float32 (k = 0: none, else k = d), vecs (B, f, d) float32, pairs (P,) int64 flat
// positions i * n + j of the (n, n) dot products of the n = f + (k > 0) vectors [prefix, vecs]
// -> (B, k + P): the prefix, then the products pairs picks.
at::Tensor dot_interaction(const at::Tensor& prefix, const at::Tensor& vecs, const at::Tensor& pairs) {
  TORCH_CHECK(vecs.dim() == 3 && vecs.scalar_type() == at::kFloat && vecs.device().is_cpu(),
              "vecs must be a (B, f, d) float32 CPU tensor");
  TORCH_CHECK(prefix.dim() == 2 && prefix.scalar_type() == at::kFloat && prefix.device().is_cpu(),
              "prefix must be a (B, k) float32 CPU tensor");
  TORCH_CHECK(pairs.dim() == 1 && pairs.scalar_type() == at::kLong, "pairs must be (P,) int64");
  const int64_t bsz = vecs.size(0), f = vecs.size(1), d = vecs.size(2);
  const int64_t k = prefix.size(1);
  TORCH_CHECK(prefix.size(0) == bsz, "prefix and vecs must have the same rows");
  TORCH_CHECK(k == 0 || k == d, "the prefix must be empty or one d-vector per row");
  const int64_t n = f + (k > 0 ? 1 : 0);
  const at::Tensor v = vecs.contiguous();
  const at::Tensor x = prefix.contiguous();
  const at::Tensor pr = pairs.contiguous();
  const int64_t n_pairs = pr.numel();
  const int64_t* pp = pr.data_ptr<int64_t>();
  std::vector<int64_t> pi(n_pairs), pj(n_pairs);
  for (int64_t p = 0; p < n_pairs; ++p) {
    TORCH_CHECK(pp[p] >= 0 && pp[p] < n * n, "pair position ", pp[p], " at ", p,
                " is out of range for ", n, " vectors");
    pi[p] = pp[p] / n;
    pj[p] = pp[p] % n;
  }
  at::Tensor out = at::empty({bsz, k + n_pairs}, v.options());
  const float* vp = v.data_ptr<float>();
  const float* xp = k > 0 ? x.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, bsz, 64, [&](int64_t begin, int64_t end) {
    interact_rows(xp, k, vp, f, d, pi.data(), pj.data(), n_pairs, op, begin, end);
  });
  return out;
}
