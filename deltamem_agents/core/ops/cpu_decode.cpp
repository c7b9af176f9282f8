// The fused δ-mem decode step of one memory layer (see cpu_decode.py); built with torch's load_inline.
#include <torch/extension.h>
#include <algorithm>
#include <cmath>
#include <vector>

static inline float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int u = 0; u < 8; ++u) acc[u] += a[i + u] * b[i + u];
  float total = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

// x (B, [1,] d); w (nR, d) packed q, k, v, beta[, lambda] rows; b (nR); state (B, H, r, r);
// wd (R, Q) the scaled corrections.
// Returns reads @ wd split by ``sizes`` into (B, 1, out) corrections, then new_state (B, H, r, r); reads come
// from the state before the write.
std::vector<torch::Tensor> decode_step(torch::Tensor x, torch::Tensor w, torch::Tensor b, torch::Tensor state,
                                       torch::Tensor wd, std::vector<int64_t> sizes, int64_t heads, int64_t rank,
                                       bool separate, double eps) {
  x = x.contiguous();  // (B, 1, d) or (B, d)
  state = state.contiguous();
  const int64_t B = x.size(0), d = w.size(1), R = heads * rank, nR = w.size(0), Q = wd.size(1);
  auto z = torch::empty({B, nR}, x.options());
  auto new_state = torch::empty_like(state);
  auto delta = torch::zeros({B, 1, Q}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>(), *bp = b.data_ptr<float>();
  const float *sp = state.data_ptr<float>(), *wdp = wd.data_ptr<float>();
  float *zp = z.data_ptr<float>(), *nsp = new_state.data_ptr<float>(), *dp = delta.data_ptr<float>();
  std::vector<float> read(R), q(rank), k(rank);
  const float feps = static_cast<float>(eps);
  for (int64_t bi = 0; bi < B; ++bi) {
    const float* xb = xp + bi * d;
    float* zb = zp + bi * nR;
    for (int64_t o = 0; o < nR; ++o) zb[o] = dot(wp + o * d, xb, d) + bp[o];
    for (int64_t h = 0; h < heads; ++h) {
      float nq = 0.f, nk = 0.f;
      for (int64_t j = 0; j < rank; ++j) {
        q[j] = std::tanh(zb[h * rank + j]);
        k[j] = std::tanh(zb[R + h * rank + j]);
        nq += q[j] * q[j];
        nk += k[j] * k[j];
      }
      nq = std::max(std::sqrt(nq), feps);
      nk = std::max(std::sqrt(nk), feps);
      for (int64_t j = 0; j < rank; ++j) {
        q[j] /= nq;
        k[j] /= nk;
      }
      const float* s = sp + (bi * heads + h) * rank * rank;
      float* ns = nsp + (bi * heads + h) * rank * rank;
      for (int64_t i = 0; i < rank; ++i) {
        const float* si = s + i * rank;
        float rd = 0.f, rc = 0.f;
        for (int64_t j = 0; j < rank; ++j) {
          rd += si[j] * q[j];
          rc += si[j] * k[j];
        }
        read[h * rank + i] = rd;
        const int64_t c = h * rank + i;
        const float beta = 1.f / (1.f + std::exp(-zb[3 * R + c]));
        const float lam = separate ? 1.f / (1.f + std::exp(-zb[4 * R + c])) : 1.f - beta;
        const float err = beta * (zb[2 * R + c] - rc);
        for (int64_t j = 0; j < rank; ++j) ns[i * rank + j] = lam * si[j] + err * k[j];
      }
    }
    float* db = dp + bi * Q;
    for (int64_t c = 0; c < R; ++c) {
      const float rc = read[c];
      const float* row = wdp + c * Q;
      for (int64_t o = 0; o < Q; ++o) db[o] += rc * row[o];
    }
  }
  std::vector<torch::Tensor> out = delta.split_with_sizes(sizes, 2);  // one (B, 1, out) per corrected projection
  out.push_back(new_state);
  return out;
}
