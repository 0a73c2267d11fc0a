// bnfold's native BatchNorm statistics: per-channel shifted sums of a BatchNorm input, accumulated in float64.
//
// x: (N, C, *) on the CPU, float32/float64/float16/bfloat16, contiguous or channels-last (anything else is made
// contiguous first); shift: (C,) float64; m = N·∏(*) values per channel.
//
//   bnfold::channel_sums(Tensor x, Tensor shift) -> Tensor
//       [ Σ (x[:, c] − shift[c]) ;  Σ (x[:, c] − shift[c])² ]  as a (2, C) float64 tensor.
//
//   bnfold::channel_moments_(Tensor x, Tensor shift, Tensor(a!) total, Tensor(b!)? mean, Tensor(c!)? var) -> float
//       the same sums [S; Q] added to `total` ((2, C) float64), and, when `mean` and `var` are given and m ≥ 2,
//       the batch's statistics written into them (any float dtype):
//           mean = shift + S/m,   var = max(Q/m − (S/m)², 0)      (biased, what training-mode BatchNorm uses)
//       Returns max over channels of (mean − shift)² / var: how far the shift is from the batch in variances
//       (inf for a constant channel away from its shift, 0 for an empty input); large values mean the sums
//       cancel.
//
//   bnfold::batch_norm_measured(Tensor x, Tensor? weight, Tensor? bias, Tensor shift, Tensor(a!) total,
//                               float eps) -> (Tensor, float)
//       training-mode BatchNorm that measures its input: the sums added to `total`, and
//           y = (x − mean) / √(var + eps) · weight + bias        (as y = x·α + β, α and β rounded once)
//       with each block of channels normalized right after it is summed, while it is still in cache. Returns
//       (y, the same "how far" as channel_moments_). Needs m ≥ 2.
//
// Every value is converted to float64 before it is shifted, squared and added: the sums carry float64 rounding
// only (~1e-16 per addition; every channel's rows of one chunk of samples go into 32 lanes, added up in a fixed
// tree, and at most 4 chunks are added in order), no float32 accumulation anywhere. Work is split with OpenMP
// (torch's intra-op threads: at::parallel_for, or one parallel region with barriers; built with OpenMP against
// torch's runtime). (N, C, L) inputs whose channels are too large for a block of several of them to stay in
// cache (long rows, over kBlockBytes/4 per channel) are summed row by row in memory order and normalized in a
// second pass, both split over threads as torch splits its own kernels (each thread reads what was just written
// next to it). Every other (N, C, L) input is summed per chunk of samples (at most 4 chunks, set by the shape):
// with several threads each thread sums and then normalizes a contiguous range of samples, as torch splits its
// kernels, so the next op finds its share in its own core's cache; with one thread (or fewer chunks than
// threads) in blocks of channels, each block normalized right after it is summed, while it is in cache. Rows
// are read in vectors of 8 float64 values into 4 independent sets of lanes kept in registers across the rows of
// a chunk, so neither short rows nor long ones pay a reduction per row.
// Every channel's additions happen in an order fixed by the shape alone: the bits do not depend on the number
// of threads. Needs GCC or Clang (vector extensions); elsewhere the build fails and the torch fallback is used.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/tensor.h>
#include <torch/library.h>

#include <algorithm>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <omp.h>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kChannelBlock = 64;        // rows of C values (channels-last, (N, C)): channels one task sums
constexpr int64_t kBlockBytes = 384 * 1024;  // (N, C, L): values summed and normalized while in cache
constexpr int64_t kLanes = 8;                // (N, C, L): partial sums per set (one vector of float64)
constexpr int64_t kLanesMin = 128;           // (N, C, L): rows of at least this many values are "long"

// One vector of kLanes float64 values (GCC/Clang vector extension: a register with AVX-512, two or four
// without), and x[j .. j + 8) − k in it; `rest` < 8 reads only the first `rest` values and sets the others to 0.
typedef double Vec __attribute__((vector_size(kLanes * sizeof(double))));
typedef float VecF __attribute__((vector_size(kLanes * sizeof(float))));

template <typename T>
inline Vec shifted(const T* __restrict__ p, Vec k) {
  if constexpr (std::is_same_v<T, float>) {
#if defined(__AVX512F__)
    return (Vec)_mm512_cvtps_pd(_mm256_loadu_ps(p)) - k;  // GCC converts a VecF in two halves, 5 instructions
#else
    VecF f;
    std::memcpy(&f, p, sizeof(f));
    return __builtin_convertvector(f, Vec) - k;
#endif
  } else if constexpr (std::is_same_v<T, double>) {
    Vec d;
    std::memcpy(&d, p, sizeof(d));
    return d - k;
  } else {
    Vec d;
    for (int64_t v = 0; v < kLanes; ++v) {
      d[v] = static_cast<double>(p[v]);
    }
    return d - k;
  }
}

// The first `rest` (< 8) values of p − k, exact zeros after them. Reads p[0 .. 8) when that is before `limit`
// (the end of the tensor), and masks out the values after `rest`.
template <typename T>
inline Vec shifted_part(const T* __restrict__ p, int64_t rest, Vec k, const T* limit) {
  if (limit - p >= kLanes) {  // not p + kLanes <= limit: that pointer may lie past the end
    const Vec d = shifted(p, k);
    const Vec index = {0, 1, 2, 3, 4, 5, 6, 7};
    return index < static_cast<double>(rest) ? d : Vec{};
  }
  Vec d = k;
  for (int64_t v = 0; v < rest; ++v) {
    d[v] = static_cast<double>(p[v]);
  }
  return d - k;
}

// The 8 lanes of s and of q added up, each as ((v0 + v4) + (v2 + v6)) + ((v1 + v5) + (v3 + v7)): under AVX-512 both
// at once, three vector additions (a scalar tree costs ~15 instructions per sum, once per channel and chunk).
inline void lane_sums(Vec s, Vec q, double* out_s, double* out_q) {
#if defined(__AVX512F__)
  const __m512d a = (__m512d)s, b = (__m512d)q;
  const __m512d u = _mm512_add_pd(_mm512_shuffle_f64x2(a, b, 0x44), _mm512_shuffle_f64x2(a, b, 0xEE));
  const __m512d v = _mm512_add_pd(u, _mm512_shuffle_f64x2(u, u, 0xB1));
  const Vec w = (Vec)_mm512_add_pd(v, _mm512_permute_pd(v, 0x55));
  *out_s = w[0];
  *out_q = w[4];
#else
  *out_s = ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
  *out_q = ((q[0] + q[4]) + (q[2] + q[6])) + ((q[1] + q[5]) + (q[3] + q[7]));
#endif
}

// Sums of `rows` rows of l values (row r at x + r·stride, all of one channel) shifted by k: S = Σ d, Q = Σ d²,
// d = x − k in float64. Position j of every row is added to lane j mod 8 of set ⌊j/8⌋ mod 4, except that after
// the last whole 32 positions the remaining whole vectors go to sets 0, 1, 2 and the last l mod 8 positions to
// set 3 (padded with exact zeros): four independent chains of vector additions, no per-row reduction, partial
// sums kept in registers across rows. The sets are added ((0 + 1) + (2 + 3)) and their 8 lanes in a fixed tree
// (lane_sums). The order depends on l and `rows` only.
template <typename T>
inline void add_rows(const T* __restrict__ x, int64_t stride, int64_t rows, int64_t l, double shift, const T* limit,
                     double* out_s, double* out_q) {
  const Vec k = Vec{} + shift;
  Vec s0 = {}, s1 = {}, s2 = {}, s3 = {}, q0 = {}, q1 = {}, q2 = {}, q3 = {};
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict__ row = x + r * stride;
    int64_t j = 0;
    for (; j + 4 * kLanes <= l; j += 4 * kLanes) {
      const Vec d0 = shifted(row + j, k), d1 = shifted(row + j + kLanes, k);
      const Vec d2 = shifted(row + j + 2 * kLanes, k), d3 = shifted(row + j + 3 * kLanes, k);
      s0 += d0;
      q0 += d0 * d0;
      s1 += d1;
      q1 += d1 * d1;
      s2 += d2;
      q2 += d2 * d2;
      s3 += d3;
      q3 += d3 * d3;
    }
    if (j + kLanes <= l) {
      const Vec d = shifted(row + j, k);
      s0 += d;
      q0 += d * d;
      j += kLanes;
    }
    if (j + kLanes <= l) {
      const Vec d = shifted(row + j, k);
      s1 += d;
      q1 += d * d;
      j += kLanes;
    }
    if (j + kLanes <= l) {
      const Vec d = shifted(row + j, k);
      s2 += d;
      q2 += d * d;
      j += kLanes;
    }
    if (j < l) {
      const Vec d = shifted_part(row + j, l - j, k, limit);
      s3 += d;
      q3 += d * d;
    }
  }
  lane_sums((s0 + s1) + (s2 + s3), (q0 + q1) + (q2 + q3), out_s, out_q);
}

// (N, C, L) contiguous, blocked path: the samples are cut into chunks of `chunk_samples` samples — a number set by
// the shape alone: at most kChunks chunks, each of at least kChunkMinBytes. Every channel's rows are summed per
// chunk (add_rows) and the chunks' sums added in chunk order (combine): the same additions in the same order
// whichever thread does them, so the bits do not depend on the number of threads, nor on which of the two
// orders below reads the tensor.
constexpr int64_t kChunks = 4;
constexpr int64_t kChunkMinBytes = 16 * 1024;

inline int64_t chunk_samples(int64_t n, int64_t sample_bytes) {
  const int64_t k = std::max((n + kChunks - 1) / kChunks,
                             (kChunkMinBytes + sample_bytes - 1) / std::max<int64_t>(1, sample_bytes));
  return std::clamp<int64_t>(k, 1, std::max<int64_t>(1, n));
}

// Sums of channels [lo, hi) over samples [i0, i1) into s[ch] and q[ch].
template <typename T>
void chunk_sums(const T* x, const double* shift, int64_t n, int64_t c, int64_t l, int64_t lo, int64_t hi, int64_t i0,
                int64_t i1, double* s, double* q) {
  for (int64_t ch = lo; ch < hi; ++ch) {
    add_rows(x + (i0 * c + ch) * l, c * l, i1 - i0, l, shift[ch], x + n * c * l, s + ch, q + ch);
  }
}

// Two orders, the same sums (chunk_samples):
// * by samples, with more than one thread and at least as many chunks as threads, in one parallel region: each
//   thread sums a contiguous range of chunks (all channels), as torch splits its own kernels — so each thread
//   reads what its share of the producer just wrote, and the op after the BatchNorm (ReLU, conv), split the same
//   way, finds its share of the output in its own core's cache; after a barrier each thread adds up the chunks
//   of a range of channels, `done(lo, hi)`, and after another each normalizes its own samples:
//   `apply(0, C, i0, i1)`.
// * by channels, otherwise: blocks of channels whose values fill about kBlockBytes, each read channel by
//   channel, chunk by chunk; `done(lo, hi)` and `apply(lo, hi, 0, N)` run right after the block is summed, while
//   its values are still in cache.
template <typename T, typename Done, typename Apply>
void sums_ncl_blocked(const T* x, const double* shift, double* s, double* q, int64_t n, int64_t c, int64_t l,
                      Done done, Apply apply) {
  const int64_t item = static_cast<int64_t>(sizeof(T));
  const int64_t chunk = chunk_samples(n, c * l * item);
  const int64_t chunks = (n + chunk - 1) / chunk;
  std::vector<double> part_(chunks * 2 * c);
  double* part = part_.data();  // chunk k: C sums, then C sums of squares
  auto combine = [=](int64_t lo, int64_t hi) {
    std::copy(part + lo, part + hi, s + lo);
    std::copy(part + c + lo, part + c + hi, q + lo);
    for (int64_t k = 1; k < chunks; ++k) {
      const double* p = part + k * 2 * c;
#pragma omp simd
      for (int64_t ch = lo; ch < hi; ++ch) {
        s[ch] += p[ch];
        q[ch] += p[c + ch];
      }
    }
  };
  const int64_t threads = at::get_num_threads();
  if (threads > 1 && chunks >= threads) {
    at::internal::lazy_init_num_threads();
#pragma omp parallel num_threads(static_cast<int>(threads))
    {
      const int64_t team = omp_get_num_threads(), t = omp_get_thread_num();
      const int64_t per = (chunks + team - 1) / team, k0 = std::min(chunks, t * per);
      const int64_t k1 = std::min(chunks, k0 + per);
      for (int64_t k = k0; k < k1; ++k) {
        chunk_sums(x, shift, n, c, l, 0, c, k * chunk, std::min(n, (k + 1) * chunk), part + k * 2 * c,
                   part + k * 2 * c + c);
      }
#pragma omp barrier
      const int64_t width = (c + team - 1) / team, lo = std::min(c, t * width), hi = std::min(c, lo + width);
      if (lo < hi) {
        combine(lo, hi);
        done(lo, hi);
      }
#pragma omp barrier
      if (k0 < k1) {
        apply(0, c, k0 * chunk, std::min(n, k1 * chunk));
      }
    }
    return;
  }
  int64_t width = std::min<int64_t>(kBlockBytes / std::max<int64_t>(1, n * l * item), c);
  if (threads > 1) {  // at least 4 blocks a thread, so that threads finish together
    width = std::min(width, (c + 4 * threads - 1) / (4 * threads));
  }
  width = std::clamp<int64_t>(width, 1, c);
  const int64_t blocks = (c + width - 1) / width;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t lo = b * width, hi = std::min(c, lo + width);
      for (int64_t k = 0; k < chunks; ++k) {
        chunk_sums(x, shift, n, c, l, lo, hi, k * chunk, std::min(n, (k + 1) * chunk), part + k * 2 * c,
                   part + k * 2 * c + c);
      }
      combine(lo, hi);
      done(lo, hi);
      apply(lo, hi, 0, n);
    }
  });
}

// (N, C, L) contiguous with long rows: every row x[i, ch, :] is summed on its own, the rows split over threads in
// memory order — each thread reads what it (or the producer's thread with the same share) most likely has in
// cache, as torch's own kernels split it; then the row results are added per channel in sample order. `done(0, c)`
// runs once at the end. The bits do not depend on the number of threads.
template <typename T, typename Done>
void sums_ncl_rowwise(const T* x, const double* shift, double* s, double* q, int64_t n, int64_t c, int64_t l,
                      Done done) {
  std::vector<double> row_sums(2 * n * c);
  double* rs = row_sums.data();
  at::parallel_for(0, n * c, std::max<int64_t>(1, 32768 / l), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      add_rows(x + r * l, l, 1, l, shift[r % c], x + n * c * l, rs + 2 * r, rs + 2 * r + 1);
    }
  });
  for (int64_t ch = 0; ch < c; ++ch) {
    double total = 0.0, total_sq = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      total += rs[2 * (i * c + ch)];
      total_sq += rs[2 * (i * c + ch) + 1];
    }
    s[ch] = total;
    q[ch] = total_sq;
  }
  done(0, c);
}

// Channels of more than a quarter of kBlockBytes (long rows: L ≥ kLanesMin) are summed row by row
// (sums_ncl_rowwise): a block of channels would hold too few channels to stay in cache until it is normalized.
// Every other input goes in blocks of channels. Both orders are fixed by the shape alone.
template <typename T>
inline bool rowwise(int64_t n, int64_t l) {
  return l >= kLanesMin && 4 * n * l * static_cast<int64_t>(sizeof(T)) > kBlockBytes;
}

template <typename T, typename Done, typename Apply>
void sums_ncl(const T* x, const double* shift, double* s, double* q, int64_t n, int64_t c, int64_t l, Done done,
              Apply apply) {
  if (rowwise<T>(n, l)) {
    sums_ncl_rowwise(x, shift, s, q, n, c, l, done);
  } else {
    sums_ncl_blocked(x, shift, s, q, n, c, l, done, apply);
  }
}

// (R, C) contiguous rows (channels-last maps, and (N, C) inputs): every row holds one value of each channel.
// Split over blocks of kChannelBlock channels; `done(lo, hi)` runs in the task after the block is summed.
template <typename T, typename Done>
void sums_rows(const T* x, const double* shift, double* s, double* q, int64_t rows, int64_t c, Done done) {
  const int64_t blocks = (c + kChannelBlock - 1) / kChannelBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t lo = b * kChannelBlock, width = std::min(c, lo + kChannelBlock) - lo;
      double k[kChannelBlock] = {}, sum[kChannelBlock] = {}, sum_sq[kChannelBlock] = {};
      std::copy(shift + lo, shift + lo + width, k);
      for (int64_t r = 0; r < rows; ++r) {
        const T* row = x + r * c + lo;
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) {
          const double d = static_cast<double>(row[j]) - k[j];
          sum[j] += d;
          sum_sq[j] += d * d;
        }
      }
      std::copy(sum, sum + width, s + lo);
      std::copy(sum_sq, sum_sq + width, q + lo);
      done(lo, lo + width);
    }
  });
}

// The layout of a BatchNorm input: (N, C, L) contiguous, or rows of C values (channels-last, or L == 1).
struct Layout {
  at::Tensor x;  // `input` itself, or a contiguous copy
  int64_t n, c, l;
  bool rows;
};

Layout layout_of(const at::Tensor& input, const at::Tensor& shift) {
  TORCH_CHECK(input.device().is_cpu() && shift.device().is_cpu(), "bnfold: CPU tensors only");
  TORCH_CHECK(input.dim() >= 2, "bnfold: input must be (N, C, ...), got ", input.sizes());
  const int64_t n = input.size(0), c = input.size(1);
  TORCH_CHECK(shift.scalar_type() == at::kDouble && shift.dim() == 1 && shift.size(0) == c && shift.is_contiguous(),
              "bnfold: shift must be a contiguous float64 vector of ", c, " values");
  const int64_t l = n * c == 0 ? 0 : input.numel() / (n * c);
  const bool channels_last = !input.is_contiguous() && input.dim() >= 4 &&
      input.is_contiguous(input.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d);
  return {channels_last ? input : input.contiguous(), n, c, l, channels_last || l == 1};
}

// Sums of every channel into s[0..C) and s[C..2C), then `done` per channel or block (see sums_ncl, sums_rows), and
// in the blocked (N, C, L) path `apply(lo, hi, i0, i1)` for channels [lo, hi) of samples [i0, i1).
template <typename T, typename Done, typename Apply>
void sums_of(const Layout& in, const double* shift, double* s, Done done, Apply apply) {
  const T* x = in.x.const_data_ptr<T>();
  if (in.rows) {
    sums_rows<T>(x, shift, s, s + in.c, in.n * in.l, in.c, done);
  } else {
    sums_ncl<T>(x, shift, s, s + in.c, in.n, in.c, in.l, done, apply);
  }
}

// [S; Q] of `input` into s[0..C) and s[C..2C).
void sums_into(const at::Tensor& input, const at::Tensor& shift, double* s) {
  const Layout in = layout_of(input, shift);
  std::fill(s, s + 2 * in.c, 0.0);
  if (input.numel() == 0) {
    return;
  }
  const double* k = shift.const_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "bnfold_channel_sums", [&] {
    sums_of<scalar_t>(in, k, s, [](int64_t, int64_t) {}, [](int64_t, int64_t, int64_t, int64_t) {});
  });
}

at::Tensor channel_sums(const at::Tensor& input, const at::Tensor& shift) {
  at::Tensor out = at::empty({2, input.dim() >= 2 ? input.size(1) : 0}, shift.options());
  sums_into(input, shift, out.data_ptr<double>());
  return out;
}

// A contiguous vector of C values of any float dtype, written from float64.
void write_vector(const at::Tensor& out, const std::vector<double>& values) {
  const int64_t c = static_cast<int64_t>(values.size());
  TORCH_CHECK(out.device().is_cpu() && out.numel() == c, "bnfold: statistics must be CPU vectors of ", c, " values");
  if (!out.is_contiguous()) {
    out.copy_(at::tensor(values, out.options().dtype(at::kDouble)));
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "bnfold_write_vector", [&] {
    scalar_t* p = out.data_ptr<scalar_t>();
    for (int64_t i = 0; i < c; ++i) {
      p[i] = static_cast<scalar_t>(values[i]);
    }
  });
}

// Batch mean (shift + S/m) and biased variance (max(Q/m − (S/m)², 0)) of channels [lo, hi) from the sums of m
// values each (sums: C values of S, then C of Q).
void batch_stats(const double* sums, const double* shift, int64_t c, int64_t m, int64_t lo, int64_t hi,
                 double* mean, double* var) {
  for (int64_t ch = lo; ch < hi; ++ch) {
    const double d = sums[ch] / static_cast<double>(m);
    mean[ch] = shift[ch] + d;
    var[ch] = std::max(sums[c + ch] / static_cast<double>(m) - d * d, 0.0);
  }
}

// max over channels of (mean − shift)² / var: inf for a constant channel off its shift, NaN-free.
double farthest(const double* mean, const double* var, const double* shift, int64_t c) {
  double worst = 0.0;
  for (int64_t ch = 0; ch < c; ++ch) {
    const double d = mean[ch] - shift[ch];
    const double ratio = d * d / var[ch];  // 0/0 → NaN: a constant channel at its shift, skipped
    if (ratio > worst || (ratio != ratio && d != 0.0)) {
      worst = ratio != ratio ? std::numeric_limits<double>::infinity() : ratio;
    }
  }
  return worst;
}

void check_total(const at::Tensor& total, int64_t c) {
  TORCH_CHECK(total.device().is_cpu() && total.scalar_type() == at::kDouble && total.dim() == 2 &&
                  total.size(0) == 2 && total.size(1) == c && total.is_contiguous(),
              "bnfold: total must be a contiguous float64 tensor of shape (2, ", c, ")");
}

void accumulate(at::Tensor& total, const std::vector<double>& sums) {
  double* acc = total.data_ptr<double>();
  for (size_t i = 0; i < sums.size(); ++i) {
    acc[i] += sums[i];
  }
}

double channel_moments_(const at::Tensor& input, const at::Tensor& shift, at::Tensor& total,
                        const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& var) {
  TORCH_CHECK(input.dim() >= 2, "bnfold: input must be (N, C, ...), got ", input.sizes());
  const int64_t c = input.size(1);
  check_total(total, c);
  std::vector<double> sums(2 * c);
  sums_into(input, shift, sums.data());
  accumulate(total, sums);
  const int64_t m = input.numel() / std::max<int64_t>(1, c);
  if (m == 0) {
    return 0.0;
  }
  std::vector<double> mu(c), v(c);
  batch_stats(sums.data(), shift.const_data_ptr<double>(), c, m, 0, c, mu.data(), v.data());
  if (mean.has_value() && var.has_value() && m >= 2) {
    write_vector(*mean, mu);
    write_vector(*var, v);
  }
  return farthest(mu.data(), v.data(), shift.const_data_ptr<double>(), c);
}

// y = x·α + β over one row, in T's opmath type.
template <typename T, typename U>
inline void normalize_row(const T* __restrict__ row, T* __restrict__ dst, int64_t l, U alpha, U beta) {
#pragma omp simd
  for (int64_t j = 0; j < l; ++j) {
    dst[j] = static_cast<T>(static_cast<U>(row[j]) * alpha + beta);
  }
}

// The body of batch_norm_measured for one dtype: sums, then per channel (block) α, β and y = x·α + β.
template <typename T>
void normalize_measured(const Layout& in, const double* k, const double* wp, const double* bp, double eps, double* s,
                        double* mu, double* v, at::Tensor& y) {
  using opmath_t = at::opmath_type<T>;
  const int64_t n = in.n, c = in.c, l = in.l, m = n * l;
  const T* x = in.x.const_data_ptr<T>();
  T* out = y.data_ptr<T>();
  std::vector<opmath_t> alpha_(c), beta_(c);
  opmath_t* alpha = alpha_.data();
  opmath_t* beta = beta_.data();
  const bool rows = in.rows;
  sums_of<T>(in, k, s, [=](int64_t lo, int64_t hi) {
    batch_stats(s, k, c, m, lo, hi, mu, v);
    for (int64_t ch = lo; ch < hi; ++ch) {
      const double a = (wp ? wp[ch] : 1.0) / std::sqrt(v[ch] + eps);
      alpha[ch] = static_cast<opmath_t>(a);
      beta[ch] = static_cast<opmath_t>((bp ? bp[ch] : 0.0) - mu[ch] * a);
    }
    if (rows) {
      for (int64_t r = 0; r < m; ++r) {
        const T* row = x + r * c;
        T* dst = out + r * c;
#pragma omp simd
        for (int64_t ch = lo; ch < hi; ++ch) {
          dst[ch] = static_cast<T>(static_cast<opmath_t>(row[ch]) * alpha[ch] + beta[ch]);
        }
      }
    }
  }, [=](int64_t lo, int64_t hi, int64_t i0, int64_t i1) {  // the blocked path; row by row: below
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t ch = lo; ch < hi; ++ch) {
        normalize_row(x + (i * c + ch) * l, out + (i * c + ch) * l, l, alpha[ch], beta[ch]);
      }
    }
  });
  if (!rows && rowwise<T>(n, l)) {
    at::parallel_for(0, n * c, std::max<int64_t>(1, 32768 / l), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        normalize_row(x + r * l, out + r * l, l, alpha[r % c], beta[r % c]);
      }
    });
  }
}

// An affine parameter (C values of any float dtype on the CPU) as float64 — exact — without a tensor allocation
// (a conversion in torch costs more than the whole kernel on a small layer); empty when not given.
std::vector<double> read_vector(const std::optional<at::Tensor>& t, int64_t c, const char* what) {
  if (!t.has_value()) {
    return {};
  }
  TORCH_CHECK(t->device().is_cpu() && t->numel() == c, "bnfold: ", what, " must be a CPU tensor of ", c, " values");
  const at::Tensor v = t->contiguous();
  std::vector<double> out(c);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "bnfold_read_vector", [&] {
    const scalar_t* p = v.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < c; ++i) {
      out[i] = static_cast<double>(p[i]);
    }
  });
  return out;
}

// Training-mode BatchNorm in one pass over memory: every channel (block) is summed, its batch mean and biased
// variance computed, and normalized while its values are still in cache:
//
//   y = (x − mean) / √(var + eps) · weight + bias      (computed as y = x·α + β, α and β rounded once from float64)
//
// The sums are added to `total`; returns (y, farthest) as channel_moments_ does. Needs ≥ 2 values per channel.
std::tuple<at::Tensor, double> batch_norm_measured(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                                   const std::optional<at::Tensor>& bias, const at::Tensor& shift,
                                                   at::Tensor& total, double eps) {
  const Layout in = layout_of(input, shift);
  check_total(total, in.c);
  const int64_t c = in.c, m = in.n * in.l;
  TORCH_CHECK(m >= 2, "bnfold::batch_norm_measured: needs at least 2 values per channel, got ", m);
  const std::vector<double> w = read_vector(weight, c, "weight"), b = read_vector(bias, c, "bias");
  const double* k = shift.const_data_ptr<double>();
  const double* wp = weight.has_value() ? w.data() : nullptr;
  const double* bp = bias.has_value() ? b.data() : nullptr;
  at::Tensor y = at::empty_like(in.x);
  std::vector<double> sums(2 * c), mu(c), v(c);
  double* s = sums.data();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "bnfold_batch_norm_measured", [&] {
    normalize_measured<scalar_t>(in, k, wp, bp, eps, s, mu.data(), v.data(), y);
  });
  accumulate(total, sums);
  return {y, farthest(mu.data(), v.data(), k, c)};
}

}  // namespace

TORCH_LIBRARY(bnfold, m) {
  m.def("channel_sums(Tensor input, Tensor shift) -> Tensor", channel_sums);
  m.def("channel_moments_(Tensor input, Tensor shift, Tensor(a!) total, Tensor(b!)? mean, Tensor(c!)? var) -> float",
        channel_moments_);
  m.def("batch_norm_measured(Tensor input, Tensor? weight, Tensor? bias, Tensor shift, Tensor(a!) total, float eps) "
        "-> (Tensor, float)",
        batch_norm_measured);
}
