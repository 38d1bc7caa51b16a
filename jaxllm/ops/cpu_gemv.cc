// Small-batch matrix products for XLA:CPU that stream their weights at memory bandwidth:
// float32, int8 and packed int4 weights (`jaxllm.quant.tensor.QTensor`'s layout), read once
// per call and never dequantized into memory; and a decode step's attention over a contiguous
// or paged KV cache (at the end). Built and registered by `jaxllm.ops.cpu_gemv`.
//
// Two layouts:
//   io_block    y[m, o] = sum_i x[m, i] w[i, o]   (the model's `[in, out]` weights): each task
//               sweeps a contiguous stretch of rows into its own partial y, the inner loop
//               along contiguous columns (vectorized without reassociating any sum); the
//               partials are added at the end.
//   rows_block  y[m, v] = sum_d x[m, d] w[v, d]   (the embedding table as the tied head): each
//               task owns a block of table rows; a row's dot product keeps 16-lane partial sums.
// Quantized weights: w = (q - z) * s per group of `group` input rows and output column; a
// group's integer partial sum is scaled once: s * (sum_k x_k q_k - z * sum_k x_k). int4 bytes
// hold a group's first half of rows in the low nibbles and its second half in the high ones.
//
// Work is split into blocks claimed by the calling thread and the kernel's own helper threads
// (`Team`); the caller keeps claiming blocks until none are left, so a call finishes even when
// no helper joins it (two calls at once cannot deadlock).

#include <algorithm>
#include <cmath>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kMaxRows = 16;  // x rows (the batch) handled in one sweep of the weights
constexpr int kLanes = 16;

struct Problem {
  const float* x;      // [M, I] (I padded to whole groups)
  const void* w;       // io: [I(/2), O]; rows: [O, I(/2)]
  const float* scales; // io: [G, O]; rows: [O, G]; null for float weights
  const float* zeros;  // same shape as scales, or null (symmetric)
  float* y;            // [M, O]
  int64_t M, I, O, group;
  int bits;            // 0 (float32), 8, 4
};

inline float zero_point(const Problem& p, int64_t index) {
  if (p.zeros) return p.zeros[index];
  return p.bits == 4 ? 8.0f : 0.0f;
}

// ---- inner loops: a[o] += sum_r x_r w_r[o] over a few weight rows, and dot products ------
// With AVX-512 each step converts 16 weights straight from memory (int8 -> int32 -> float in
// two instructions); the portable loops are for other CPUs (the compiler's vectorizer
// widens int8 through int16, several shuffles per 16 weights: about half the speed here).

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define JAXLLM_AVX512 1
#else
#define JAXLLM_AVX512 0
#endif

#if JAXLLM_AVX512
#include <immintrin.h>

inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1); }
// Masked loads for a row's last partial vector; the `full` ones for the rest. A masked load
// cannot fold the int8 -> int32 widening into itself and needs its mask set up: with masks
// on every step an int8 row took 40% longer (10.5 against 14-17 Gweights/s on one core).
inline __m512 load(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
inline __m512 load(const int8_t* p, __mmask16 k) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(k, p)));
}
inline __m512i load_bytes(const uint8_t* p, __mmask16 k) {
  return _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, p));
}
inline __m512 load_full(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_full(const int8_t* p) {
  return _mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline __m512i load_bytes_full(const uint8_t* p) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m512 low_nibbles(__m512i b) {
  return _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
}
inline __m512 high_nibbles(__m512i b) { return _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4)); }

// Fetches the next `bytes` of weights into L1 at the pace a row of n columns is swept: by
// column o + 16, the first (o + 16) / n of them (the hardware prefetcher alone leaves a core
// at about half its bandwidth on int8 rows). `pace` is bytes per column in 1/65536ths.
struct Prefetcher {
  Prefetcher(const void* start, int64_t length, int64_t n)
      : next(static_cast<const char*>(start)), bytes(length),
        pace((length << 16) / std::max<int64_t>(1, n)) {}
  void upto(int64_t columns) {
    for (const int64_t until = (columns * pace) >> 16; fetched < until; fetched += 64) {
      _mm_prefetch(next + fetched, _MM_HINT_T0);
    }
  }
  void rest() {
    for (; fetched < bytes; fetched += 64) _mm_prefetch(next + fetched, _MM_HINT_T0);
  }
  const char* next;
  int64_t bytes, pace, fetched = 0;
};

// a[o] += sum_r x[r] w[r * O + o] over N weight rows (N even), two independent chains joined
// once; an accumulator is loaded and stored once per N rows. The N rows that follow are
// fetched meanwhile.
template <int N, typename T>
inline void axpy_rows(float* a, const T* w, int64_t O, const float* x) {
  __m512 v[N];
  for (int r = 0; r < N; ++r) v[r] = _mm512_set1_ps(x[r]);
  Prefetcher fetch(w + N * O, N * O * static_cast<int64_t>(sizeof(T)), O);
  int64_t o = 0;
  for (; o + 16 <= O; o += 16) {
    fetch.upto(o + 16);
    __m512 s0 = _mm512_fmadd_ps(v[0], load_full(w + o), _mm512_loadu_ps(a + o));
    __m512 s1 = _mm512_mul_ps(v[1], load_full(w + O + o));
    for (int r = 2; r < N; r += 2) {
      s0 = _mm512_fmadd_ps(v[r], load_full(w + r * O + o), s0);
      s1 = _mm512_fmadd_ps(v[r + 1], load_full(w + (r + 1) * O + o), s1);
    }
    _mm512_storeu_ps(a + o, _mm512_add_ps(s0, s1));
  }
  fetch.rest();
  if (o < O) {
    const __mmask16 k = tail_mask(O - o);
    __m512 s0 = _mm512_fmadd_ps(v[0], load(w + o, k), _mm512_maskz_loadu_ps(k, a + o));
    __m512 s1 = _mm512_mul_ps(v[1], load(w + O + o, k));
    for (int r = 2; r < N; r += 2) {
      s0 = _mm512_fmadd_ps(v[r], load(w + r * O + o, k), s0);
      s1 = _mm512_fmadd_ps(v[r + 1], load(w + (r + 1) * O + o, k), s1);
    }
    _mm512_mask_storeu_ps(a + o, k, _mm512_add_ps(s0, s1));
  }
}

template <typename T>
inline void axpy1(float* a, const T* w0, float x0, int64_t n) {
  const __m512 v0 = _mm512_set1_ps(x0);
  for (int64_t o = 0; o < n; o += 16) {
    const __mmask16 k = tail_mask(n - o);
    _mm512_mask_storeu_ps(a + o, k, _mm512_fmadd_ps(v0, load(w0 + o, k),
                                                    _mm512_maskz_loadu_ps(k, a + o)));
  }
}

// N packed int4 rows (byte row r at w + r * O): each byte's low nibble multiplies lo[r], its
// high nibble hi[r].
template <int N>
inline void axpy_nibbles(float* a, const uint8_t* w, int64_t O, const float* lo, const float* hi) {
  __m512 vl[N], vh[N];
  for (int r = 0; r < N; ++r) vl[r] = _mm512_set1_ps(lo[r]), vh[r] = _mm512_set1_ps(hi[r]);
  Prefetcher fetch(w + N * O, N * O, O);
  int64_t o = 0;
  for (; o + 16 <= O; o += 16) {
    fetch.upto(o + 16);
    const __m512i b0 = load_bytes_full(w + o);
    __m512 s0 = _mm512_fmadd_ps(vh[0], high_nibbles(b0),
                                _mm512_fmadd_ps(vl[0], low_nibbles(b0), _mm512_loadu_ps(a + o)));
    __m512 s1 = _mm512_setzero_ps();
    for (int r = 1; r < N; ++r) {
      const __m512i b = load_bytes_full(w + r * O + o);
      s1 = _mm512_fmadd_ps(vh[r], high_nibbles(b), _mm512_fmadd_ps(vl[r], low_nibbles(b), s1));
    }
    _mm512_storeu_ps(a + o, _mm512_add_ps(s0, s1));
  }
  fetch.rest();
  for (; o < O; o += 16) {
    const __mmask16 k = tail_mask(O - o);
    __m512 s = _mm512_maskz_loadu_ps(k, a + o);
    for (int r = 0; r < N; ++r) {
      const __m512i b = load_bytes(w + r * O + o, k);
      s = _mm512_fmadd_ps(vh[r], high_nibbles(b), _mm512_fmadd_ps(vl[r], low_nibbles(b), s));
    }
    _mm512_mask_storeu_ps(a + o, k, s);
  }
}

template <typename T>
inline float dot(const float* x, const T* w, int64_t n) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= n; k += 32) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), load_full(w + k), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), load_full(w + k + 16), acc1);
  }
  for (; k < n; k += 16) {
    const __mmask16 m = tail_mask(n - k);
    acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + k), load(w + k, m), acc0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

// A packed int4 group of h bytes: sum_r lo_x[r] lo(w[r]) + hi_x[r] hi(w[r]).
inline float dot_nibbles(const float* lo_x, const float* hi_x, const uint8_t* w, int64_t h) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  for (int64_t k = 0; k < h; k += 16) {
    const __mmask16 m = tail_mask(h - k);
    const __m512i b = load_bytes(w + k, m);
    acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, lo_x + k), low_nibbles(b), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, hi_x + k), high_nibbles(b), acc1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

inline void prefetch(const void* p, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) {
    _mm_prefetch(static_cast<const char*>(p) + b, _MM_HINT_T0);
  }
}

#else  // portable

inline void prefetch(const void*, int64_t) {}

template <int N, typename T>
inline void axpy_rows(float* a, const T* w, int64_t O, const float* x) {
  for (int64_t o = 0; o < O; ++o) {
    float s0 = a[o] + x[0] * static_cast<float>(w[o]), s1 = x[1] * static_cast<float>(w[O + o]);
    for (int r = 2; r < N; r += 2) {
      s0 += x[r] * static_cast<float>(w[r * O + o]);
      s1 += x[r + 1] * static_cast<float>(w[(r + 1) * O + o]);
    }
    a[o] = s0 + s1;
  }
}

template <typename T>
inline void axpy1(float* a, const T* w0, float x0, int64_t n) {
  for (int64_t o = 0; o < n; ++o) a[o] += x0 * static_cast<float>(w0[o]);
}

template <int N>
inline void axpy_nibbles(float* a, const uint8_t* w, int64_t O, const float* lo, const float* hi) {
  for (int64_t o = 0; o < O; ++o) {
    float s = a[o];
    for (int r = 0; r < N; ++r) {
      s += lo[r] * static_cast<float>(w[r * O + o] & 15) +
           hi[r] * static_cast<float>(w[r * O + o] >> 4);
    }
    a[o] = s;
  }
}

template <typename T>
inline float dot(const float* x, const T* w, int64_t n) {
  float lanes[kLanes] = {0};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += x[k + l] * static_cast<float>(w[k + l]);
  }
  float total = 0.0f;
  for (; k < n; ++k) total += x[k] * static_cast<float>(w[k]);
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

inline float dot_nibbles(const float* lo_x, const float* hi_x, const uint8_t* w, int64_t h) {
  float lanes[kLanes] = {0};
  int64_t k = 0;
  for (; k + kLanes <= h; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      lanes[l] += lo_x[k + l] * static_cast<float>(w[k + l] & 15) +
                  hi_x[k + l] * static_cast<float>(w[k + l] >> 4);
    }
  }
  float total = 0.0f;
  for (; k < h; ++k) {
    total += lo_x[k] * static_cast<float>(w[k] & 15) + hi_x[k] * static_cast<float>(w[k] >> 4);
  }
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

#endif

// One weight row range [r0, r0 + n) of a typed matrix with O columns: a += x[r0:] w.
template <typename T>
inline void sweep(float* a, const T* w, const float* x, int64_t n, int64_t O) {
  int64_t r = 0;
  for (; r + 8 <= n; r += 8) axpy_rows<8>(a, w + r * O, O, x + r);
  for (; r + 4 <= n; r += 4) axpy_rows<4>(a, w + r * O, O, x + r);
  for (; r < n; ++r) axpy1(a, w + r * O, x[r], O);
}

// Stored weight rows [i0, i1) for x rows [m0, m0 + mc): adds their share of y into
// `out` [mc, O]. A task's rows are one contiguous stretch of the weights, streamed in order;
// each step folds 8 weight rows (4 packed int4 byte rows) into the accumulators, so an
// accumulator is loaded and stored once per step instead of once per row.
void io_block(const Problem& p, int64_t m0, int64_t mc, int64_t i0, int64_t i1, float* out) {
  const int64_t O = p.O;
  if (p.bits == 0) {
    for (int64_t m = 0; m < mc; ++m) {
      sweep(out + m * O, static_cast<const float*>(p.w) + i0 * O, p.x + (m0 + m) * p.I + i0,
            i1 - i0, O);
    }
    return;
  }
  // [i0, i1) are rows of the stored array: x rows for int8, packed byte rows for int4 (byte
  // row r of group g holds x rows g * group + r and g * group + group / 2 + r). A stretch may
  // cut groups: each segment within one group has its partial sum scaled by the group's
  // scales, and the pieces add up to the whole.
  const int64_t stored = p.bits == 4 ? p.group / 2 : p.group;  // stored rows per group
  std::vector<float> part(mc * O);
  for (int64_t s0 = i0; s0 < i1;) {
    const int64_t g = s0 / stored;
    const int64_t s1 = std::min<int64_t>(i1, (g + 1) * stored);
    const int64_t r0 = s0 - g * stored, n = s1 - s0;  // the segment within its group
    std::fill(part.begin(), part.end(), 0.0f);
    for (int64_t m = 0; m < mc; ++m) {
      const float* xg = p.x + (m0 + m) * p.I + g * p.group;
      float* a = part.data() + m * O;
      if (p.bits == 8) {
        sweep(a, static_cast<const int8_t*>(p.w) + s0 * O, xg + r0, n, O);
      } else {
        const int64_t h = stored;
        const uint8_t* w = static_cast<const uint8_t*>(p.w) + s0 * O;
        const float* lo = xg + r0;
        const float* hi = xg + h + r0;
        int64_t r = 0;
        for (; r + 4 <= n; r += 4) axpy_nibbles<4>(a, w + r * O, O, lo + r, hi + r);
        for (; r < n; ++r) axpy_nibbles<1>(a, w + r * O, O, lo + r, hi + r);
      }
    }
    for (int64_t m = 0; m < mc; ++m) {
      const float* xg = p.x + (m0 + m) * p.I + g * p.group;
      float xsum = 0.0f;
      for (int64_t k = r0; k < r0 + n; ++k) xsum += xg[k];
      if (p.bits == 4) {
        for (int64_t k = r0; k < r0 + n; ++k) xsum += xg[stored + k];
      }
      const float* sc = p.scales + g * O;
      const float* pa = part.data() + m * O;
      float* o_m = out + m * O;
      if (p.zeros) {
        const float* z = p.zeros + g * O;
        for (int64_t o = 0; o < O; ++o) o_m[o] += sc[o] * (pa[o] - z[o] * xsum);
      } else {
        const float z = p.bits == 4 ? 8.0f * xsum : 0.0f;
        for (int64_t o = 0; o < O; ++o) o_m[o] += sc[o] * (pa[o] - z);
      }
    }
    s0 = s1;
  }
}

// Rows [v0, v1) of the table: y[:, v0:v1].
void rows_block(const Problem& p, int64_t m0, int64_t mc, int64_t v0, int64_t v1) {
  const int64_t G = p.bits ? p.I / p.group : 1;
  const int64_t h = p.group / 2;
  std::vector<float> xsums(mc * G);  // sum of x over each group, per x row
  for (int64_t m = 0; m < mc; ++m) {
    for (int64_t g = 0; g < G; ++g) {
      float t = 0.0f;
      for (int64_t k = 0; k < p.group; ++k) t += p.x[(m0 + m) * p.I + g * p.group + k];
      xsums[m * G + g] = t;
    }
  }
  const int64_t row_bytes = p.bits == 4 ? p.I / 2 : p.I * (p.bits == 8 ? 1 : 4);
  constexpr int64_t kAhead = 4;  // rows fetched ahead of the one being summed
  for (int64_t v = v0; v < v1; ++v) {
    if (v + kAhead < v1) {
      prefetch(static_cast<const char*>(p.w) + (v + kAhead) * row_bytes, row_bytes);
    }
    for (int64_t m = 0; m < mc; ++m) {
      const float* xm = p.x + (m0 + m) * p.I;
      float total = 0.0f;
      if (p.bits == 0) {
        total = dot(xm, static_cast<const float*>(p.w) + v * p.I, p.I);
      } else {
        for (int64_t g = 0; g < G; ++g) {
          const float* xg = xm + g * p.group;
          float part;
          if (p.bits == 8) {
            part = dot(xg, static_cast<const int8_t*>(p.w) + v * p.I + g * p.group, p.group);
          } else {
            part = dot_nibbles(xg, xg + h, static_cast<const uint8_t*>(p.w) + v * (p.I / 2) + g * h,
                               h);
          }
          total += p.scales[v * G + g] * (part - zero_point(p, v * G + g) * xsums[m * G + g]);
        }
      }
      p.y[(m0 + m) * p.O + v] = total;
    }
  }
}

// The core count, read once: std::thread::hardware_concurrency() reads /sys on every call,
// about 5 us, more than a small product takes.
int64_t Cores() {
  static const int64_t cores = std::max<int64_t>(1, std::thread::hardware_concurrency());
  return cores;
}

// Helper threads of the kernel's own, one per core besides the caller's, which wait for the
// next product by spinning for a while before they sleep. A decode step makes about 200 calls
// of 10-100 us each, back to back; a sleeping thread (XLA's pool wakes its threads through the
// kernel) took longer to wake than half a product, so a product on two threads was no faster
// than on one.
//
// One product at a time uses the team: a caller that finds it taken (XLA may run two
// independent products at once) does all its blocks itself. Blocks are claimed from `state_`,
// the job's generation (high 32 bits) and its next block (low 32): a helper that read a job
// late can only claim a block of that job while it is still running, never of the next one.
class Team {
 public:
  static Team& Get() {
    static Team* team = new Team(Cores() - 1);  // never destroyed: threads outlive exit
    return *team;
  }

  // Runs fn(b) for b in [0, blocks) on the caller, and on the helpers if `helpers`.
  void Run(int64_t blocks, bool helpers, const std::function<void(int64_t)>& fn) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!helpers || threads_ == 0 || blocks < 2 || !busy.owns_lock()) {
      for (int64_t b = 0; b < blocks; ++b) fn(b);
      return;
    }
    job_.store(&fn, std::memory_order_relaxed);
    blocks_.store(blocks, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    const uint64_t gen = (state_.load(std::memory_order_relaxed) >> 32) + 1;
    state_.store(gen << 32, std::memory_order_seq_cst);
    if (sleeping_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(sleep_mu_);
      wake_.notify_all();
    }
    Work(gen, fn, blocks);
    while (done_.load(std::memory_order_acquire) < blocks) Pause();
  }

 private:
  explicit Team(int64_t threads) : threads_(std::max<int64_t>(0, threads)) {
    for (int64_t t = 0; t < threads_; ++t) std::thread([this] { Loop(); }).detach();
  }

  static void Pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#else
    std::this_thread::yield();
#endif
  }

  // Claims and runs blocks of job `gen` until none is left.
  void Work(uint64_t gen, const std::function<void(int64_t)>& fn, int64_t blocks) {
    for (uint64_t s = state_.load(std::memory_order_acquire);;) {
      const uint64_t b = s & 0xFFFFFFFFu;
      if ((s >> 32) != gen || static_cast<int64_t>(b) >= blocks) return;
      if (!state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) continue;
      fn(static_cast<int64_t>(b));
      done_.fetch_add(1, std::memory_order_release);
      s = state_.load(std::memory_order_acquire);
    }
  }

  void Loop() {
    uint64_t seen = 0;
    for (;;) {
      uint64_t s = state_.load(std::memory_order_acquire);
      int64_t spins = 0;
      for (auto start = std::chrono::steady_clock::now(); (s >> 32) == seen;
           s = state_.load(std::memory_order_acquire)) {
        // The first spins only pause; later ones yield the core to any other runnable thread
        // (XLA's own pool multiplying a batch's products between two of ours).
        if (++spins < 256) {
          Pause();
          continue;
        }
        std::this_thread::yield();
        if (spins % 16 == 0 && std::chrono::steady_clock::now() - start > kSpin) {
          std::unique_lock<std::mutex> lock(sleep_mu_);
          sleeping_.fetch_add(1, std::memory_order_seq_cst);
          wake_.wait(lock, [&] { return (state_.load(std::memory_order_seq_cst) >> 32) != seen; });
          sleeping_.fetch_sub(1, std::memory_order_relaxed);
          start = std::chrono::steady_clock::now();
        }
      }
      seen = s >> 32;
      // job_ and blocks_ were written before the generation was: they are this job's or a
      // later one's, and Work claims nothing unless the generation is still `seen`.
      Work(seen, *job_.load(std::memory_order_relaxed), blocks_.load(std::memory_order_relaxed));
    }
  }

  // How long an idle helper spins before it sleeps: longer than the gaps between a decode
  // step's products, short enough not to hold a core through a long idle spell.
  static constexpr std::chrono::microseconds kSpin{2000};

  const int64_t threads_;
  std::mutex busy_;
  std::atomic<uint64_t> state_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<const std::function<void(int64_t)>*> job_{nullptr};
  std::atomic<int64_t> blocks_{0};
  std::mutex sleep_mu_;
  std::condition_variable wake_;
  std::atomic<int> sleeping_{0};
};

// Runs `blocks` calls of fn(block) on the caller and, if `spread`, the team, using helpers
// only when XLA's own pool has threads (a process limited to one thread keeps to one).
template <typename Fn>
void parallel_blocks(ffi::ThreadPool& pool, int64_t blocks, Fn fn, bool spread = true) {
  const std::function<void(int64_t)> job(fn);
  Team::Get().Run(blocks, spread && pool.num_threads() > 0, job);
}

ffi::Error Run(ffi::ThreadPool pool, const Problem& p, bool rows_layout) {
  // The caller and the helpers, one thread per core (none besides the caller when XLA's pool
  // has no threads).
  const int64_t cores = Cores();
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads() + 1, cores));
  const int64_t m_blocks = (p.M + kMaxRows - 1) / kMaxRows;
  if (rows_layout) {
    // Blocks of whole table rows, enough to share among the threads.
    const int64_t want = std::max<int64_t>(1, std::min<int64_t>(4 * threads, p.O / 256));
    const int64_t width = (p.O + want - 1) / want;
    const int64_t blocks = (p.O + width - 1) / width;
    parallel_blocks(pool, blocks * m_blocks, [&p, width, blocks](int64_t b) {
      const int64_t m0 = (b / blocks) * kMaxRows, mc = std::min<int64_t>(kMaxRows, p.M - m0);
      const int64_t v0 = (b % blocks) * width;
      rows_block(p, m0, mc, v0, std::min<int64_t>(p.O, v0 + width));
    });
    return ffi::Error::Success();
  }
  // One contiguous stretch of stored rows per thread, each
  // summing into its own [M, O] partial; the partials are added at the end.
  const int64_t rows = p.bits == 4 ? p.I / 2 : p.I;  // stored rows
  const int64_t unit = 4;
  const int64_t units = (rows + unit - 1) / unit;
  // One stretch per thread: helpers spin between products, so none starts late enough for
  // smaller pieces (and more partials to add up) to pay.
  const int64_t stretches = std::max<int64_t>(1, std::min<int64_t>(threads, units));
  const int64_t per = (units + stretches - 1) / stretches;
  std::vector<float> partial(stretches * p.M * p.O, 0.0f);
  parallel_blocks(pool, stretches * m_blocks, [&](int64_t b) {
    const int64_t t = b % stretches;
    const int64_t m0 = (b / stretches) * kMaxRows, mc = std::min<int64_t>(kMaxRows, p.M - m0);
    const int64_t i0 = t * per * unit;
    const int64_t i1 = std::min<int64_t>(rows, std::min<int64_t>(units, (t + 1) * per) * unit);
    if (i0 < i1) io_block(p, m0, mc, i0, i1, partial.data() + (t * p.M + m0) * p.O);
  });
  for (int64_t k = 0; k < p.M * p.O; ++k) {
    float total = 0.0f;
    for (int64_t t = 0; t < stretches; ++t) total += partial[t * p.M * p.O + k];
    p.y[k] = total;
  }
  return ffi::Error::Success();
}

// w, scales and zeros carry a leading axis of L stacked layers (a model's `[L, ...]` params,
// passed whole so that XLA does not copy a layer out of the stack for every call: a copy
// costs more than the product); `layer` picks one.
ffi::Error Gemv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                ffi::Buffer<ffi::F32> scales, ffi::Buffer<ffi::F32> zeros,
                ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> y, int64_t bits,
                int64_t group, bool has_zeros, bool rows_layout) {
  auto xd = x.dimensions();
  auto yd = y->dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 2 || yd.size() != 2 || wd.size() < 2) {
    return ffi::Error::InvalidArgument("gemv: x and y must be 2-D, w stacked [L, ...]");
  }
  const int64_t L = wd[0];
  const int64_t l = *layer.typed_data();
  if (l < 0 || l >= L) return ffi::Error::InvalidArgument("gemv: layer index out of range");
  Problem p;
  p.x = x.typed_data();
  p.w = static_cast<const char*>(w.untyped_data()) + l * (w.size_bytes() / L);
  p.scales = bits ? scales.typed_data() + l * (scales.element_count() / L) : nullptr;
  p.zeros = has_zeros ? zeros.typed_data() + l * (zeros.element_count() / L) : nullptr;
  p.y = y->typed_data();
  p.M = xd[0];
  p.I = xd[1];
  p.O = yd[1];
  p.bits = static_cast<int>(bits);
  p.group = bits ? group : p.I;
  if ((bits == 4 && group % 2) || (bits && p.I % group)) {
    return ffi::Error::InvalidArgument("gemv: x's width must be whole groups (even for int4)");
  }
  return Run(pool, p, rows_layout);
}

// ---- decode attention over a contiguous cache -------------------------------------------
// XLA:CPU spends about 50 us a layer on a decode step's attention (two batched dots with
// their transposes, the mask and the softmax as separate loops), ten times the arithmetic.
// Each query exactly as `jaxllm.ops.attention.attention` defines it: masked logits take the
// same finite mask value, so a query that sees no key averages all of them as XLA's softmax
// does.

constexpr float kMaskValue = -0.7f * 3.4028234663852886e38f;

struct AttentionProblem {
  const float* q;          // [B, T, H, Dh]
  const void* k;           // this layer's rows of [K, Dh]: [B, S] (contiguous) or [N, P] (pages)
  const void* v;
  const float* k_scales;   // int8 caches: a scale per row and kv head ([rows, K]); else null
  const float* v_scales;
  const int32_t* q_index;  // [B, T]
  const int32_t* kv_index; // [B, S] (contiguous); paged: [S], position s is slot s
  const int32_t* table;    // [B, M] page table (paged); null when contiguous
  float* out;              // [B, T, H, Dh]
  int64_t B, T, H, K, S, Dh;  // S: positions per sequence (paged: M * P)
  int64_t M, P, N;         // paged: table width, page size, pages in the layer's pool
  int64_t window;          // 0: none
  float scale;
};

// The cache row (of [K, Dh]) that holds position s of sequence b. A page number outside the
// pool (table entries past a sequence's length may name any page) is clamped: its positions
// are seen by no query that counts, and the read stays inside the pool.
inline int64_t row_of(const AttentionProblem& p, int64_t b, int64_t s) {
  if (!p.table) return b * p.S + s;
  const int64_t page = std::min<int64_t>(std::max<int32_t>(p.table[b * p.M + s / p.P], 0),
                                         p.N - 1);
  return page * p.P + s % p.P;
}

inline bool visible(int32_t ki, int32_t qi, int64_t window) {
  return ki <= qi && (window == 0 || ki > static_cast<int64_t>(qi) - window);
}

#if JAXLLM_AVX512
// Blocks of 16 cache positions: a block's logits for one head come out as one vector (one
// reduction for 16 dot products instead of one each), its softmax weights are exponentiated
// 16 at a time, and its values are summed into registers, all heads of a kv head at once.
constexpr int64_t kBlock = 16;
// The largest head an int8 cache's blocks convert into floats on the stack (larger ones go
// one position at a time).
constexpr int64_t kMaxBlockDh = 256;

// Lane j: the sum of v[j]'s 16 lanes. Pairs of vectors are folded into each other's halves,
// quarters, then pairs of lanes (15 folds for 16 sums); a last permute puts sums in order.
inline __m512 sum_each(const __m512 (&v)[16]) {
  __m512 w[8], x[4], y[2];
  for (int j = 0; j < 8; ++j) {
    w[j] = _mm512_add_ps(_mm512_shuffle_f32x4(v[j], v[j + 8], 0x44),
                         _mm512_shuffle_f32x4(v[j], v[j + 8], 0xEE));
  }
  for (int j = 0; j < 4; ++j) {
    x[j] = _mm512_add_ps(_mm512_shuffle_f32x4(w[j], w[j + 4], 0x88),
                         _mm512_shuffle_f32x4(w[j], w[j + 4], 0xDD));
  }
  for (int j = 0; j < 2; ++j) {
    y[j] = _mm512_add_ps(_mm512_shuffle_ps(x[j], x[j + 2], 0x44),
                         _mm512_shuffle_ps(x[j], x[j + 2], 0xEE));
  }
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], 0x88),
                                 _mm512_shuffle_ps(y[0], y[1], 0xDD));
  const __m512i order = _mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15);
  return _mm512_permutexvar_ps(order, r);
}

// exp(x) for x <= 0, within about 1 ulp of std::exp: x = n ln2 + r with |r| <= ln2 / 2,
// exp(r) by its Taylor polynomial to r^7 (error below 1e-8), times 2^n by `scalef` (which
// underflows to 0 the way exp does). Below -104 exp is 0 in float32; clamping first keeps
// n ln2 from cancelling x's digits.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);   // ln2, high bits
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);       // ln2, the rest
  __m512 e = _mm512_set1_ps(1.0f / 5040);
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.0f / 720));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.0f / 120));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.0f / 24));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.0f / 6));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(0.5f));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.0f));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(e, n);
}

// Which of positions [s, s + 16) query position qi sees.
inline __mmask16 visible_block(const int32_t* kv_index, int32_t qi, int64_t window) {
  const __m512i ki = _mm512_loadu_si512(kv_index);
  __mmask16 m = _mm512_cmple_epi32_mask(ki, _mm512_set1_epi32(qi));
  const int64_t low = static_cast<int64_t>(qi) - window;  // keys after it (int64: no overflow)
  if (window && low >= INT32_MIN) {
    m &= _mm512_cmpgt_epi32_mask(ki, _mm512_set1_epi32(static_cast<int32_t>(low)));
  }
  return m;
}
#endif

// Every query head of sequence `b`, every query token. The keys (then the values) are read
// in one sequential pass over the cache positions, all kv heads of a position together (one
// contiguous `[K, Dh]` row): per head, a strided walk left the reads waiting on memory.
// Blocks of positions that no query sees are skipped; a paged sequence is read only up to
// its last query's position (the pages past it are not its own yet). `T` is the cache's
// element type: float, or int8 with a scale per row and kv head (a key's scale multiplies
// its logit, a value's its softmax weight). `logits` has room for H * S floats, `total` for H.
template <typename T>
void attend_sequence(const AttentionProblem& p, int64_t b, float* logits, float* total) {
  const int64_t G = p.H / p.K, Dh = p.Dh, K = p.K, row = K * Dh;
  const T* keys = static_cast<const T*>(p.k);
  const T* values = static_cast<const T*>(p.v);
  const int32_t* kv_index = p.table ? p.kv_index : p.kv_index + b * p.S;
  int64_t S = p.S;
  if (p.table) {
    int64_t last = -1;
    for (int64_t t = 0; t < p.T; ++t) last = std::max<int64_t>(last, p.q_index[b * p.T + t]);
    S = std::min<int64_t>(std::max<int64_t>(last + 1, 1), p.S);
  }
  auto key_row = [&](int64_t s) { return keys + row_of(p, b, s) * row; };
  auto value_row = [&](int64_t s) { return values + row_of(p, b, s) * row; };
  auto k_scale = [&](int64_t s, int64_t kh) {
    return p.k_scales ? p.k_scales[row_of(p, b, s) * K + kh] : 1.0f;
  };
  auto v_scale = [&](int64_t s, int64_t kh) {
    return p.v_scales ? p.v_scales[row_of(p, b, s) * K + kh] : 1.0f;
  };
#if JAXLLM_AVX512
  // Whole blocks go through the vector loops (which hold a head's Dh in whole vectors, and a
  // block's 16 rows contiguous: pages of a multiple of 16 positions); the positions after the
  // last whole block, one at a time.
  const bool whole = Dh % 16 == 0 && (!p.table || p.P % kBlock == 0) &&
                     (std::is_same_v<T, float> || Dh <= kMaxBlockDh);
  alignas(64) float block[std::is_same_v<T, float> ? 1 : kBlock * kMaxBlockDh];
  const int64_t blocked = whole ? S / kBlock * kBlock : 0;
  const __m512i scale_stride = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(static_cast<int32_t>(K)));
#endif
  for (int64_t t = 0; t < p.T; ++t) {
    const int32_t qi = p.q_index[b * p.T + t];
    const float* q = p.q + (b * p.T + t) * p.H * Dh;  // [H, Dh]; head h = kh * G + g
    float* o = p.out + (b * p.T + t) * p.H * Dh;
    bool any = false;  // whether any key is visible to this query
    int64_t s = 0;
#if JAXLLM_AVX512
    for (; s < blocked; s += kBlock) {
      const __mmask16 seen = visible_block(kv_index + s, qi, p.window);
      any |= seen != 0;
      if (!seen) {
        for (int64_t h = 0; h < p.H; ++h) {
          _mm512_storeu_ps(logits + h * S + s, _mm512_set1_ps(kMaskValue));
        }
        continue;
      }
      const int64_t first = row_of(p, b, s);  // the block's 16 rows follow it
      if (s + kBlock < blocked) prefetch(key_row(s + kBlock), kBlock * row * sizeof(T));
      for (int64_t kh = 0; kh < K; ++kh) {
        // The block's keys of this kv head, [16, Dh] with a row stride: in the cache for
        // float32, converted once into `block` for int8 (not once per query head of the group).
        const float* key;
        int64_t stride;
        if constexpr (std::is_same_v<T, float>) {
          key = keys + first * row + kh * Dh;
          stride = row;
        } else {
          for (int64_t j = 0; j < kBlock; ++j) {
            for (int64_t d = 0; d < Dh; d += 16) {
              _mm512_storeu_ps(block + j * Dh + d,
                               load_full(keys + (first + j) * row + kh * Dh + d));
            }
          }
          key = block;
          stride = Dh;
        }
        __m512 factor = _mm512_set1_ps(p.scale);
        if (p.k_scales) {
          factor = _mm512_mul_ps(factor, _mm512_i32gather_ps(
                                             scale_stride, p.k_scales + first * K + kh, sizeof(float)));
        }
        for (int64_t h = kh * G; h < (kh + 1) * G; ++h) {
          __m512 acc[16];
          for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
          for (int64_t d = 0; d < Dh; d += 16) {
            const __m512 qd = _mm512_loadu_ps(q + h * Dh + d);
            for (int j = 0; j < 16; ++j) {
              acc[j] = _mm512_fmadd_ps(qd, _mm512_loadu_ps(key + j * stride + d), acc[j]);
            }
          }
          _mm512_storeu_ps(logits + h * S + s,
                           _mm512_mask_blend_ps(seen, _mm512_set1_ps(kMaskValue),
                                                _mm512_mul_ps(sum_each(acc), factor)));
        }
      }
    }
#endif
    for (; s < S; ++s) {
      const bool seen = visible(kv_index[s], qi, p.window);
      any |= seen;
      if (s + 2 < S) prefetch(key_row(s + 2), row * sizeof(T));
      const T* key = key_row(s);
      for (int64_t h = 0; h < p.H; ++h) {
        logits[h * S + s] = seen ? dot(q + h * Dh, key + (h / G) * Dh, Dh) * p.scale
                                       * k_scale(s, h / G)
                                 : kMaskValue;
      }
    }
    for (int64_t h = 0; h < p.H; ++h) {
      float* l = logits + h * S;
      const float top = *std::max_element(l, l + S);
      float sum = 0.0f;
      int64_t i = 0;
      // A masked key's weight is exactly 0 beside a visible one (exp underflows), and
      // exp(0) = 1 like every other key's when none is visible.
#if JAXLLM_AVX512
      __m512 sums = _mm512_setzero_ps();
      for (; i < blocked; i += kBlock) {
        const __m512 x = _mm512_loadu_ps(l + i);
        const __mmask16 keep =
            any ? _mm512_cmp_ps_mask(x, _mm512_set1_ps(kMaskValue), _CMP_NEQ_OQ) : 0xFFFF;
        const __m512 e =
            _mm512_maskz_mov_ps(keep, exp_nonpositive(_mm512_sub_ps(x, _mm512_set1_ps(top))));
        _mm512_storeu_ps(l + i, e);
        sums = _mm512_add_ps(sums, e);
      }
      sum = _mm512_reduce_add_ps(sums);
#endif
      for (; i < S; ++i) {
        l[i] = (any && l[i] == kMaskValue) ? 0.0f : std::exp(l[i] - top);
        sum += l[i];
      }
      total[h] = sum;
    }
    std::fill(o, o + p.H * Dh, 0.0f);
    s = 0;
#if JAXLLM_AVX512
    // A block's values, each kv head's Dh in registers for its G query heads: G * Dh / 16
    // accumulators, at most 16 (with more the positions go one at a time).
    const bool in_registers = G * Dh / 16 <= 16;
    for (; in_registers && s < blocked; s += kBlock) {
      if (any && !visible_block(kv_index + s, qi, p.window)) continue;
      const int64_t first = row_of(p, b, s);
      if (s + kBlock < blocked) prefetch(value_row(s + kBlock), kBlock * row * sizeof(T));
      for (int64_t kh = 0; kh < p.K; ++kh) {
        __m512 acc[16];
        const int64_t chunks = Dh / 16, n = G * chunks;
        for (int64_t i = 0; i < n; ++i) acc[i] = _mm512_setzero_ps();
        for (int64_t j = 0; j < kBlock; ++j) {
          const T* value = values + (first + j) * row + kh * Dh;
          const float vs = p.v_scales ? p.v_scales[(first + j) * K + kh] : 1.0f;
          for (int64_t c = 0; c < chunks; ++c) {
            const __m512 vc = load_full(value + c * 16);
            for (int64_t g = 0; g < G; ++g) {
              acc[g * chunks + c] = _mm512_fmadd_ps(
                  _mm512_set1_ps(logits[(kh * G + g) * S + s + j] * vs), vc, acc[g * chunks + c]);
            }
          }
        }
        for (int64_t g = 0; g < G; ++g) {
          float* oh = o + (kh * G + g) * Dh;
          for (int64_t c = 0; c < chunks; ++c) {
            _mm512_storeu_ps(oh + c * 16,
                             _mm512_add_ps(_mm512_loadu_ps(oh + c * 16), acc[g * chunks + c]));
          }
        }
      }
    }
#endif
    for (; s < S; ++s) {
      if (s + 2 < S) prefetch(value_row(s + 2), row * sizeof(T));
      const T* value = value_row(s);
      for (int64_t h = 0; h < p.H; ++h) {
        const float weight = logits[h * S + s];
        if (weight != 0.0f) {
          axpy1(o + h * Dh, value + (h / G) * Dh, weight * v_scale(s, h / G), Dh);
        }
      }
    }
    for (int64_t h = 0; h < p.H; ++h) {
      const float inv = 1.0f / total[h];
      for (int64_t d = 0; d < Dh; ++d) o[h * Dh + d] *= inv;
    }
  }
}

// Every sequence of the problem, one block of work each, on the caller and the team.
template <typename T>
void attend(ffi::ThreadPool& pool, const AttentionProblem& p) {
  // Short contexts are a few microseconds of work: waking helpers would cost more.
  const bool spread = p.B * p.S * p.T * p.H * p.Dh >= (1 << 18);
  parallel_blocks(pool, p.B, [&p](int64_t b) {
    std::vector<float> scratch(p.H * (p.S + 1));  // logits [H, S], then totals [H]
    attend_sequence<T>(p, b, scratch.data(), scratch.data() + p.H * p.S);
  }, spread);
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> layer,
                           ffi::Buffer<ffi::S32> q_index, ffi::Buffer<ffi::S32> kv_index,
                           ffi::ResultBuffer<ffi::F32> out, int64_t window, float scale) {
  auto qd = q.dimensions();
  auto kd = k.dimensions();
  auto vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 5 || vd.size() != 5 ||
      !std::equal(kd.begin(), kd.end(), vd.begin())) {
    return ffi::Error::InvalidArgument(
        "decode attention: q [B, T, H, Dh], k and v stacked [L, B, S, K, Dh]");
  }
  AttentionProblem p{};
  p.B = qd[0]; p.T = qd[1]; p.H = qd[2]; p.Dh = qd[3];
  p.S = kd[2]; p.K = kd[3];
  const int64_t L = kd[0];
  const int64_t l = *layer.typed_data();
  if (l < 0 || l >= L || kd[1] != p.B || kd[4] != p.Dh || p.H % p.K) {
    return ffi::Error::InvalidArgument("decode attention: shapes or layer index out of range");
  }
  const int64_t per_layer = p.B * p.S * p.K * p.Dh;
  p.k = k.typed_data() + l * per_layer;
  p.v = v.typed_data() + l * per_layer;
  p.q = q.typed_data();
  p.q_index = q_index.typed_data();
  p.kv_index = kv_index.typed_data();
  p.out = out->typed_data();
  p.window = window;
  p.scale = scale;
  attend<float>(pool, p);
  return ffi::Error::Success();
}

// ---- decode attention over a paged cache -------------------------------------------------
// The same attention reading a layer's page pool in place through the page table, where
// XLA's path first gathers each sequence's pages into a contiguous copy (for SmolLM2 at 512
// positions a copy of every layer's keys and values at every step). Float32 pages, or int8
// pages with their scales.
ffi::Error PagedDecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k,
                                ffi::AnyBuffer v, ffi::Buffer<ffi::F32> k_scales,
                                ffi::Buffer<ffi::F32> v_scales, ffi::Buffer<ffi::S32> layer,
                                ffi::Buffer<ffi::S32> table, ffi::Buffer<ffi::S32> q_index,
                                ffi::ResultBuffer<ffi::F32> out, int64_t window, float scale) {
  auto qd = q.dimensions();
  auto kd = k.dimensions();
  auto vd = v.dimensions();
  auto td = table.dimensions();
  if (qd.size() != 4 || kd.size() != 5 || vd.size() != 5 || td.size() != 2 ||
      !std::equal(kd.begin(), kd.end(), vd.begin()) || k.element_type() != v.element_type()) {
    return ffi::Error::InvalidArgument(
        "paged decode attention: q [B, T, H, Dh], k and v pages [L, N, P, K, Dh], table [B, M]");
  }
  const bool int8 = k.element_type() == ffi::DataType::S8;
  if (!int8 && k.element_type() != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument("paged decode attention: float32 or int8 pages");
  }
  AttentionProblem p{};
  p.B = qd[0]; p.T = qd[1]; p.H = qd[2]; p.Dh = qd[3];
  const int64_t L = kd[0];
  p.N = kd[1]; p.P = kd[2]; p.K = kd[3];
  p.M = td[1];
  p.S = p.M * p.P;
  const int64_t l = *layer.typed_data();
  const int64_t rows = p.N * p.P;  // a layer's rows of [K, Dh]
  if (l < 0 || l >= L || td[0] != p.B || kd[4] != p.Dh || p.H % p.K || p.N < 1 ||
      (int8 && (static_cast<int64_t>(k_scales.element_count()) != L * rows * p.K ||
                static_cast<int64_t>(v_scales.element_count()) != L * rows * p.K))) {
    return ffi::Error::InvalidArgument(
        "paged decode attention: shapes, scales or layer index out of range");
  }
  const int64_t bytes = int8 ? 1 : 4;
  p.k = static_cast<const char*>(k.untyped_data()) + l * rows * p.K * p.Dh * bytes;
  p.v = static_cast<const char*>(v.untyped_data()) + l * rows * p.K * p.Dh * bytes;
  p.k_scales = int8 ? k_scales.typed_data() + l * rows * p.K : nullptr;
  p.v_scales = int8 ? v_scales.typed_data() + l * rows * p.K : nullptr;
  p.table = table.typed_data();
  p.q = q.typed_data();
  p.q_index = q_index.typed_data();
  std::vector<int32_t> positions(p.S);  // slot s holds position s
  for (int64_t s = 0; s < p.S; ++s) positions[s] = static_cast<int32_t>(s);
  p.kv_index = positions.data();
  p.out = out->typed_data();
  p.window = window;
  p.scale = scale;
  if (int8) {
    attend<int8_t>(pool, p);
  } else {
    attend<float>(pool, p);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxllmGemv, Gemv,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::Buffer<ffi::F32>>()  // x [M, I]
        .Arg<ffi::AnyBuffer>()         // w
        .Arg<ffi::Buffer<ffi::F32>>()  // scales
        .Arg<ffi::Buffer<ffi::F32>>()  // zeros (a [0] placeholder when symmetric)
        .Arg<ffi::Buffer<ffi::S32>>()  // layer [] (of w's leading axis)
        .Ret<ffi::Buffer<ffi::F32>>()  // y [M, O]
        .Attr<int64_t>("bits")
        .Attr<int64_t>("group")
        .Attr<bool>("has_zeros")
        .Attr<bool>("rows_layout"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxllmDecodeAttention, DecodeAttention,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::Buffer<ffi::F32>>()  // q [B, T, H, Dh]
        .Arg<ffi::Buffer<ffi::F32>>()  // k cache [L, B, S, K, Dh]
        .Arg<ffi::Buffer<ffi::F32>>()  // v cache
        .Arg<ffi::Buffer<ffi::S32>>()  // layer []
        .Arg<ffi::Buffer<ffi::S32>>()  // q_index [B, T]
        .Arg<ffi::Buffer<ffi::S32>>()  // kv_index [B, S]
        .Ret<ffi::Buffer<ffi::F32>>()  // out [B, T, H, Dh]
        .Attr<int64_t>("window")
        .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxllmPagedDecodeAttention, PagedDecodeAttention,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::Buffer<ffi::F32>>()  // q [B, T, H, Dh]
        .Arg<ffi::AnyBuffer>()         // k pages [L, N, P, K, Dh], float32 or int8
        .Arg<ffi::AnyBuffer>()         // v pages
        .Arg<ffi::Buffer<ffi::F32>>()  // k scales [L, N, P, K] (int8; else a [0] placeholder)
        .Arg<ffi::Buffer<ffi::F32>>()  // v scales
        .Arg<ffi::Buffer<ffi::S32>>()  // layer []
        .Arg<ffi::Buffer<ffi::S32>>()  // page table [B, M]
        .Arg<ffi::Buffer<ffi::S32>>()  // q_index [B, T]
        .Ret<ffi::Buffer<ffi::F32>>()  // out [B, T, H, Dh]
        .Attr<int64_t>("window")
        .Attr<float>("scale"));
