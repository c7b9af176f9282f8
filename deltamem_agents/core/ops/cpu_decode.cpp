// The fused δ-mem decode steps of one memory layer (see cpu_decode.py). Plain C ABI on raw float32 pointers,
// no torch headers: it compiles in about a second with any C++ compiler and does not depend on torch's version.
// Called through ctypes; every pointer is a contiguous float32 CPU buffer of the shape written beside it.
#include <cmath>
#include <cstdint>

namespace {

constexpr int64_t kMaxRank = 64;  // r; the Python side refuses larger ranks (it falls back to pure torch)

inline float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int u = 0; u < 8; ++u) acc[u] += a[i + u] * b[i + u];
  float total = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

// q[j] = tanh(z[j]) / max(||tanh(z)||, eps), j < rank
inline void unit_tanh(const float* z, float* q, int64_t rank, float eps) {
  float norm = 0.f;
  for (int64_t j = 0; j < rank; ++j) {
    q[j] = std::tanh(z[j]);
    norm += q[j] * q[j];
  }
  norm = std::sqrt(norm);
  const float inv = 1.f / (norm > eps ? norm : eps);
  for (int64_t j = 0; j < rank; ++j) q[j] *= inv;
}

// delta (Q) = reads (R) @ wd (R, Q); with ``out_first`` its first ``first`` columns are ADDED into out_first
// instead (the first corrected projection's output, in place) and only columns first.. are written to delta.
inline void corrections(const float* reads, const float* wd, int64_t R, int64_t Q, float* delta, float* out_first,
                        int64_t first) {
  const int64_t start = out_first ? first : 0;
  for (int64_t o = start; o < Q; ++o) delta[o] = 0.f;
  for (int64_t c = 0; c < R; ++c) {
    const float rc = reads[c];
    const float* row = wd + c * Q;
    for (int64_t o = start; o < Q; ++o) delta[o] += rc * row[o];
    if (out_first)
      for (int64_t o = 0; o < first; ++o) out_first[o] += rc * row[o];
  }
}

}  // namespace

extern "C" {

// Bumped whenever a signature below changes; the loader refuses a library reporting another number.
int64_t deltamem_cpu_decode_abi() { return 4; }

// One token, writes on (token and multi strategies). Shapes, with R = heads * rank:
//   x (B, d); w (nR, d) packed memory q, k, v, beta [, lambda] rows; b (nR); state, new_state (B, heads, r, r);
//   wd (R, Q) the pre-scaled corrections; delta (B, Q) out. Reads come from the state before the write.
//   out_first (B, first) or NULL: see ``corrections``.
void deltamem_decode_step(const float* x, const float* w, const float* b, const float* state, const float* wd,
                          float* new_state, float* delta, float* out_first, int64_t B, int64_t d, int64_t nR,
                          int64_t heads, int64_t rank, int64_t Q, int64_t first, int64_t separate, double eps) {
  const int64_t R = heads * rank, rr = rank * rank;
  const float feps = static_cast<float>(eps);
  float z[5 * kMaxRank * 16], reads[kMaxRank * 16], q[kMaxRank], k[kMaxRank];
  for (int64_t bi = 0; bi < B; ++bi) {
    const float* xb = x + bi * d;
    for (int64_t o = 0; o < nR; ++o) z[o] = dot(w + o * d, xb, d) + b[o];
    for (int64_t h = 0; h < heads; ++h) {
      unit_tanh(z + h * rank, q, rank, feps);
      unit_tanh(z + R + h * rank, k, rank, feps);
      const float* s = state + (bi * heads + h) * rr;
      float* ns = new_state + (bi * heads + h) * rr;
      for (int64_t i = 0; i < rank; ++i) {
        const float* si = s + i * rank;
        float rd = 0.f, rc = 0.f;
        for (int64_t j = 0; j < rank; ++j) {
          rd += si[j] * q[j];
          rc += si[j] * k[j];
        }
        const int64_t c = h * rank + i;
        reads[c] = rd;
        const float beta = 1.f / (1.f + std::exp(-z[3 * R + c]));
        const float lam = separate ? 1.f / (1.f + std::exp(-z[4 * R + c])) : 1.f - beta;
        const float err = beta * (z[2 * R + c] - rc);
        for (int64_t j = 0; j < rank; ++j) ns[i * rank + j] = lam * si[j] + err * k[j];
      }
    }
    corrections(reads, wd, R, Q, delta + bi * Q, out_first ? out_first + bi * first : nullptr, first);
  }
}

// One token, writes off (the chat's decode): reads of the state, no write. Shapes:
//   x (B, d); wq (R, d) the memory query weight; state (B or 1, heads, r, r) (``state_batch`` says which: a
//   batch-1 state serves every example); wd (R, Q); delta (B, Q) out; out_first (B, first) or NULL.
void deltamem_read_step(const float* x, const float* wq, const float* state, const float* wd, float* delta,
                        float* out_first, int64_t B, int64_t d, int64_t heads, int64_t rank, int64_t Q,
                        int64_t first, int64_t state_batch, double eps) {
  const int64_t R = heads * rank, rr = rank * rank;
  const float feps = static_cast<float>(eps);
  float z[kMaxRank * 16], reads[kMaxRank * 16], q[kMaxRank];
  for (int64_t bi = 0; bi < B; ++bi) {
    const float* xb = x + bi * d;
    for (int64_t o = 0; o < R; ++o) z[o] = dot(wq + o * d, xb, d);
    const float* sb = state + (state_batch == 1 ? 0 : bi) * heads * rr;
    for (int64_t h = 0; h < heads; ++h) {
      unit_tanh(z + h * rank, q, rank, feps);
      const float* s = sb + h * rr;
      for (int64_t i = 0; i < rank; ++i) reads[h * rank + i] = dot(s + i * rank, q, rank);
    }
    corrections(reads, wd, R, Q, delta + bi * Q, out_first ? out_first + bi * first : nullptr, first);
  }
}

// out[i, :n] += src[i, :n] for ``rows`` rows (strides in floats): a correction added into its projection's
// output in place, without creating a tensor view for the column block.
void deltamem_add_rows(float* out, int64_t out_stride, const float* src, int64_t src_stride, int64_t rows,
                       int64_t n) {
  for (int64_t i = 0; i < rows; ++i) {
    float* o = out + i * out_stride;
    const float* a = src + i * src_stride;
    for (int64_t j = 0; j < n; ++j) o[j] += a[j];
  }
}

}  // extern "C"
