// The CUDA kernel core of the KL-divergence ops: element math, the forward row reduction, the
// gradient pass and host launchers that take a cudaStream_t. No TensorFlow: kld_kernels.cu.cc (the
// TensorFlow functors) and the standalone harness bench/cuda/harness.cu both include it, nvcc only.
// The per-thread work (SegmentSum, GradientItem) is __host__ __device__, so the harness can replay a
// launch's tiling on the CPU where there is no GPU.
//
// Semantics are the CPU core's (kld_cpu_impl.h): clip(x) = max(min(x, 1), eps) with NaN passing
// through, the gradient passes where eps <= x <= 1 (not at NaN), float16/bfloat16 compute in float
// and round once, float64 computes in double with log().
//
// Accuracy (u = 2^-24, the float32 unit roundoff), the CPU core's class for every dtype:
//  * float32 and float16/bfloat16 (computed in float): logf and IEEE division, <= 1 ulp each. The
//    terms of one 16-byte vector are added in float, those sums accumulated in double: |error| <=
//    ~3u sum|term| + 2u sum t_c, so 16-bit results are the float result rounded once, as on the CPU.
//    No __logf by default: its absolute error, 2^-21.41 in [0.5, 2], is ~6x the rounding of t_c/p_c:
//    up to 3.6e-7 sum t_c, over 1e-6 relative on float32 rows whose loss is below ~0.4, several
//    16-bit ulps on rows whose loss is below ~1e-3. fast_math (16-bit only, eps >= FLT_MIN; the
//    harness measures it) uses __fdividef and __logf: under 6e-7 t_c (1 + |log(t_c/p_c)|) per term.
//  * float64: log (1 ulp), IEEE division, double throughout.
// Results are deterministic: a fixed order per thread, fixed reduction trees, no atomics. The launch
// shape depends on the tensor shape only (not on the GPU), the vector/scalar split also on the
// inputs' offsets within 16 bytes.
#ifndef TF_KLD_CC_KERNELS_KLD_GPU_CU_H_
#define TF_KLD_CC_KERNELS_KLD_GPU_CU_H_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#define TF_KLD_HD __host__ __device__ __forceinline__

namespace tf_kld {
namespace gpu {

constexpr int kVectorBytes = 16;  // one 128-bit load
constexpr int kMaxBlock = 512;    // threads per block, at most
constexpr int kGradientBlock = 256;
constexpr int64_t kMaxBlocks = 8192;  // grid-stride loops beyond this
// Rows of at most this many vectors are summed by part of a warp (1..32 lanes), wider rows by a block.
constexpr int64_t kWarpRowVectors = 128;
// Fewer than kSplitRows wide rows are split into segments of at least kMinChunkVectors vectors, up
// to kTargetSegments segments in all, summed by a second kernel (no atomics: deterministic).
constexpr int64_t kTargetSegments = 1024;
constexpr int64_t kSplitRows = kTargetSegments / 2;
constexpr int64_t kMinChunkVectors = 1024;
constexpr int64_t kChunkAlign = 1024;  // elements; a multiple of every type's vector width

// ---------------------------------------------------------------------------------------------
// Bits, loads and stores (host versions so the harness can replay kernels on the CPU).

TF_KLD_HD float BitsToFloat(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

TF_KLD_HD uint32_t FloatToBits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

TF_KLD_HD double WordsToDouble(uint32_t lo, uint32_t hi) {
#ifdef __CUDA_ARCH__
  return __hiloint2double(static_cast<int>(hi), static_cast<int>(lo));
#else
  const uint64_t u = (static_cast<uint64_t>(hi) << 32) | lo;
  double d;
  std::memcpy(&d, &u, sizeof(d));
  return d;
#endif
}

TF_KLD_HD void DoubleToWords(double d, uint32_t* lo, uint32_t* hi) {
#ifdef __CUDA_ARCH__
  *lo = static_cast<uint32_t>(__double2loint(d));
  *hi = static_cast<uint32_t>(__double2hiint(d));
#else
  uint64_t u;
  std::memcpy(&u, &d, sizeof(u));
  *lo = static_cast<uint32_t>(u);
  *hi = static_cast<uint32_t>(u >> 32);
#endif
}

// Read-only 16-byte load for the forward pass (inputs never written during the kernel).
TF_KLD_HD uint4 LoadReadOnly(const void* p) {
#ifdef __CUDA_ARCH__
  return __ldg(static_cast<const uint4*>(p));
#else
  uint4 r;
  std::memcpy(&r, p, sizeof(r));
  return r;
#endif
}

// Plain 16-byte load for the gradient, whose output may alias an input.
TF_KLD_HD uint4 Load(const void* p) {
#ifdef __CUDA_ARCH__
  return *static_cast<const uint4*>(p);
#else
  uint4 r;
  std::memcpy(&r, p, sizeof(r));
  return r;
#endif
}

TF_KLD_HD void Store(void* p, const uint4& r) {
#ifdef __CUDA_ARCH__
  *static_cast<uint4*>(p) = r;
#else
  std::memcpy(p, &r, sizeof(r));
#endif
}

TF_KLD_HD uint32_t Word(const uint4& r, int k) { return k == 0 ? r.x : k == 1 ? r.y : k == 2 ? r.z : r.w; }

TF_KLD_HD uint64_t MulHi(uint64_t a, uint64_t b) {
#ifdef __CUDA_ARCH__
  return __umul64hi(a, b);
#else
  return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
#endif
}

// n / d for a fixed d by multiplication (Granlund & Montgomery 1994, fig. 4.1): a 64-bit integer
// division costs ~70 instructions on a GPU, this ~6. Exact for every 64-bit n and d >= 1.
struct Divider {
  uint64_t magic = 0;
  int shift = 0;  // 0: d == 1

  Divider() = default;
  __host__ explicit Divider(uint64_t d) {
    if (d <= 1) return;
    int l = 0;  // ceil(log2(d))
    while (l < 64 && (uint64_t{1} << l) < d) ++l;
    shift = l;
    const unsigned __int128 excess = (static_cast<unsigned __int128>(1) << l) - d;  // < d
    magic = static_cast<uint64_t>((excess << 64) / d + 1);
  }

  TF_KLD_HD uint64_t Div(uint64_t n) const {
    if (shift == 0) return n;
    const uint64_t hi = MulHi(n, magic);
    return (hi + ((n - hi) >> 1)) >> (shift - 1);
  }
};

// ---------------------------------------------------------------------------------------------
// Element types: storage T, the type computed in, and 16-byte vectors of them.

template <typename T>
struct Traits;

template <>
struct Traits<float> {
  using Compute = float;
  static constexpr int kPerVector = 4;
  static TF_KLD_HD float ToCompute(float x) { return x; }
  static TF_KLD_HD float FromCompute(float x) { return x; }
  static TF_KLD_HD float FromSum(double s) { return static_cast<float>(s); }
  static TF_KLD_HD void Unpack(const uint4& r, float* v) {
    for (int j = 0; j < 4; ++j) v[j] = BitsToFloat(Word(r, j));
  }
  static TF_KLD_HD uint4 Pack(const float* v) {
    return make_uint4(FloatToBits(v[0]), FloatToBits(v[1]), FloatToBits(v[2]), FloatToBits(v[3]));
  }
};

template <>
struct Traits<double> {
  using Compute = double;
  static constexpr int kPerVector = 2;
  static TF_KLD_HD double ToCompute(double x) { return x; }
  static TF_KLD_HD double FromCompute(double x) { return x; }
  static TF_KLD_HD double FromSum(double s) { return s; }
  static TF_KLD_HD void Unpack(const uint4& r, double* v) {
    v[0] = WordsToDouble(r.x, r.y);
    v[1] = WordsToDouble(r.z, r.w);
  }
  static TF_KLD_HD uint4 Pack(const double* v) {
    uint4 r;
    DoubleToWords(v[0], &r.x, &r.y);
    DoubleToWords(v[1], &r.z, &r.w);
    return r;
  }
};

// float16 and bfloat16: 8 per vector, element 2k in the low half of 32-bit word k (little endian).
template <typename T, typename Raw>
struct Traits16 {
  using Compute = float;
  static constexpr int kPerVector = 8;
  static TF_KLD_HD T FromBits(uint32_t bits) {
    Raw raw;
    raw.x = static_cast<unsigned short>(bits);
    return T(raw);
  }
  static TF_KLD_HD uint32_t ToBits(T x) { return static_cast<Raw>(x).x; }
  static TF_KLD_HD void Unpack(const uint4& r, float* v) {
    for (int k = 0; k < 4; ++k) {
      const uint32_t w = Word(r, k);
      v[2 * k] = Traits<T>::ToCompute(FromBits(w & 0xffffu));
      v[2 * k + 1] = Traits<T>::ToCompute(FromBits(w >> 16));
    }
  }
  static TF_KLD_HD uint4 Pack(const float* v) {
    uint32_t w[4];
    for (int k = 0; k < 4; ++k) {
      w[k] = ToBits(Traits<T>::FromCompute(v[2 * k])) | (ToBits(Traits<T>::FromCompute(v[2 * k + 1])) << 16);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
  // Through float, as the CPU core rounds a row's double sum.
  static TF_KLD_HD T FromSum(double s) { return Traits<T>::FromCompute(static_cast<float>(s)); }
};

template <>
struct Traits<__half> : Traits16<__half, __half_raw> {
  static TF_KLD_HD float ToCompute(__half x) { return __half2float(x); }
  static TF_KLD_HD __half FromCompute(float x) { return __float2half_rn(x); }
};

template <>
struct Traits<__nv_bfloat16> : Traits16<__nv_bfloat16, __nv_bfloat16_raw> {
  static TF_KLD_HD float ToCompute(__nv_bfloat16 x) { return __bfloat162float(x); }
  static TF_KLD_HD __nv_bfloat16 FromCompute(float x) { return __float2bfloat16_rn(x); }
};

// ---------------------------------------------------------------------------------------------
// Element math. kFast: __logf/__fdividef (fast_math launches of 16-bit types only, see the top).

template <typename C, bool kFast>
struct Math;

template <bool kFast>
struct Math<float, kFast> {
  static TF_KLD_HD float Log(float x) {
#ifdef __CUDA_ARCH__
    return kFast ? __logf(x) : logf(x);
#else
    return std::log(x);
#endif
  }
  static TF_KLD_HD float Div(float a, float b) {
#ifdef __CUDA_ARCH__
    return kFast ? __fdividef(a, b) : a / b;
#else
    return a / b;
#endif
  }
};

template <>
struct Math<double, false> {
  static TF_KLD_HD double Log(double x) {
#ifdef __CUDA_ARCH__
    return log(x);
#else
    return std::log(x);
#endif
  }
  static TF_KLD_HD double Div(double a, double b) { return a / b; }
};

// max(min(x, 1), eps); NaN passes (both comparisons are false), as tf.clip_by_value.
template <typename C>
TF_KLD_HD C Clip(C x, C eps) {
  const C upper = x > C(1) ? C(1) : x;
  return upper < eps ? eps : upper;
}

// Where the clip passes the gradient: eps <= x <= 1 (false at NaN).
template <typename C>
TF_KLD_HD bool Inside(C x, C eps) {
  return x >= eps && x <= C(1);
}

template <typename C, bool kFast>
TF_KLD_HD C Term(C t, C p, C eps) {
  const C tc = Clip(t, eps);
  return tc * Math<C, kFast>::Log(Math<C, kFast>::Div(tc, Clip(p, eps)));
}

template <typename C, bool kFast, bool kWrtTrue>
TF_KLD_HD C Grad(C g, C t, C p, C eps) {
  using M = Math<C, kFast>;
  if (kWrtTrue) return Inside(t, eps) ? g * (M::Log(M::Div(Clip(t, eps), Clip(p, eps))) + C(1)) : C(0);
  return Inside(p, eps) ? -M::Div(g * Clip(t, eps), p) : C(0);
}

// Elements before the first 16-byte boundary of p (all n when not vectorised).
template <typename T>
TF_KLD_HD int64_t HeadElements(const T* p, int64_t n, bool vectorised) {
  if (!vectorised) return n;
  const int64_t head =
      static_cast<int64_t>((kVectorBytes - (reinterpret_cast<uintptr_t>(p) % kVectorBytes)) % kVectorBytes) /
      static_cast<int64_t>(sizeof(T));
  return head < n ? head : n;
}

// ---------------------------------------------------------------------------------------------
// Forward: each row (or segment of a row) is summed by a group of `lanes` threads.

// Thread `lane`'s share of sum(term) over elements [0, n), in double. When vectorised, t and p have
// the same offset within 16 bytes (the launcher checks), so after a scalar head both are aligned.
template <typename T, bool kFast>
TF_KLD_HD double SegmentSum(const T* t, const T* p, int64_t n, int lane, int lanes, bool vectorised,
                            typename Traits<T>::Compute eps) {
  using Tr = Traits<T>;
  using C = typename Tr::Compute;
  constexpr int V = Tr::kPerVector;
  const int64_t head = HeadElements(p, n, vectorised);
  double acc = 0.0;
  for (int64_t i = lane; i < head; i += lanes) {
    acc += static_cast<double>(Term<C, kFast>(Tr::ToCompute(t[i]), Tr::ToCompute(p[i]), eps));
  }
  const int64_t vectors = (n - head) / V;
  const T* tv = t + head;
  const T* pv = p + head;
  // The V terms of a vector are added in the compute type, pairwise, then once into the double.
  auto vector_sum = [eps](const uint4& traw, const uint4& praw) {
    constexpr int W = Tr::kPerVector;  // == V; clang does not let the lambda use V uncaptured
    C tt[W], pp[W];
    Tr::Unpack(traw, tt);
    Tr::Unpack(praw, pp);
    C s[W];
    for (int j = 0; j < W; ++j) s[j] = Term<C, kFast>(tt[j], pp[j], eps);
    for (int width = W / 2; width > 0; width /= 2) {
      for (int j = 0; j < width; ++j) s[j] = s[2 * j] + s[2 * j + 1];
    }
    return static_cast<double>(s[0]);
  };
  int64_t v = lane;
  for (; v + lanes < vectors; v += 2 * static_cast<int64_t>(lanes)) {  // two loads in flight
    const uint4 t0 = LoadReadOnly(tv + v * V), p0 = LoadReadOnly(pv + v * V);
    const uint4 t1 = LoadReadOnly(tv + (v + lanes) * V), p1 = LoadReadOnly(pv + (v + lanes) * V);
    acc += vector_sum(t0, p0);
    acc += vector_sum(t1, p1);
  }
  if (v < vectors) acc += vector_sum(LoadReadOnly(tv + v * V), LoadReadOnly(pv + v * V));
  for (int64_t i = head + vectors * V + lane; i < n; i += lanes) {
    acc += static_cast<double>(Term<C, kFast>(Tr::ToCompute(t[i]), Tr::ToCompute(p[i]), eps));
  }
  return acc;
}

// How a forward launch tiles the rows; a function of the shape only.
struct ForwardPlan {
  int group = 1;       // threads per segment: 1..32 (part of a warp), or == block
  int block = 256;     // threads per block
  int64_t splits = 1;  // segments per row; > 1 needs rows * splits doubles of scratch
  int64_t chunk = 0;   // elements per segment (the last one of a row may be shorter)
  int64_t blocks = 1;  // grid size
};

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline ForwardPlan PlanForward(int64_t rows, int64_t cols, int element_bytes, bool allow_split = true) {
  ForwardPlan plan;
  const int64_t per_vector = kVectorBytes / element_bytes;
  const int64_t vectors = CeilDiv(cols, per_vector);
  plan.chunk = cols;
  if (vectors <= kWarpRowVectors) {  // narrow rows: 1..32 lanes per row, 256 threads per block
    while (plan.group < 32 && plan.group < vectors) plan.group *= 2;
    plan.block = 256;
    const int64_t per_block = plan.block / plan.group;
    plan.blocks = CeilDiv(rows, per_block) < kMaxBlocks ? CeilDiv(rows, per_block) : kMaxBlocks;
    if (plan.blocks < 1) plan.blocks = 1;
    return plan;
  }
  if (allow_split && rows < kSplitRows) {  // few wide rows: split them so every SM has work
    const int64_t want = CeilDiv(kTargetSegments, rows);
    const int64_t most = vectors / kMinChunkVectors;
    const int64_t splits = want < most ? want : most;
    if (splits >= 2) {
      plan.chunk = CeilDiv(CeilDiv(cols, splits), kChunkAlign) * kChunkAlign;
      plan.splits = CeilDiv(cols, plan.chunk);
    }
  }
  const int64_t segment_vectors = CeilDiv(plan.chunk, per_vector);
  plan.block = segment_vectors >= 16 * 512 ? 512 : segment_vectors >= 16 * 256 ? 256 : 128;
  plan.group = plan.block;
  const int64_t segments = rows * plan.splits;
  plan.blocks = segments < kMaxBlocks ? segments : kMaxBlocks;
  if (plan.blocks < 1) plan.blocks = 1;
  return plan;
}

inline size_t ForwardScratchBytes(const ForwardPlan& plan, int64_t rows) {
  return plan.splits > 1 ? static_cast<size_t>(rows * plan.splits) * sizeof(double) : 0;
}

// Whether a and b can be read with the same 16-byte vector tiling.
template <typename T>
inline bool SameVectorOffset(const T* a, const T* b) {
  const uintptr_t x = reinterpret_cast<uintptr_t>(a), y = reinterpret_cast<uintptr_t>(b);
  return x % sizeof(T) == 0 && x % kVectorBytes == y % kVectorBytes;
}

#ifdef __CUDACC__

// Sum over each aligned group of `width` lanes (a power of two <= 32); every lane gets the sum.
__device__ __forceinline__ double GroupSum(double v, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset, width);
  return v;
}

// Sum over the block (a multiple of 32 threads); valid in thread 0. warp_sums: blockDim / 32 slots.
__device__ __forceinline__ double BlockSum(double v, double* warp_sums) {
  v = GroupSum(v, 32);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x / 32) ? warp_sums[lane] : 0.0;
    v = GroupSum(v, 32);
  }
  __syncthreads();  // warp_sums is reused by the next segment
  return v;
}

template <typename T, bool kFast>
__global__ void __launch_bounds__(kMaxBlock)
    ForwardKernel(const T* __restrict__ t, const T* __restrict__ p, T* __restrict__ loss,
                  double* __restrict__ partial, int64_t rows, int64_t cols, int64_t splits, int64_t chunk,
                  int group, bool vectorised, typename Traits<T>::Compute eps) {
  __shared__ double warp_sums[kMaxBlock / 32];
  const bool in_warp = group <= 32;
  const int per_block = in_warp ? static_cast<int>(blockDim.x) / group : 1;
  const int slot = in_warp ? static_cast<int>(threadIdx.x) / group : 0;
  const int lane = in_warp ? static_cast<int>(threadIdx.x) % group : static_cast<int>(threadIdx.x);
  const int lanes = in_warp ? group : static_cast<int>(blockDim.x);
  const int64_t segments = rows * splits;
  // The loop bound is uniform over the block, so every lane reaches the shuffles and barriers.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * per_block; base < segments;
       base += static_cast<int64_t>(gridDim.x) * per_block) {
    const int64_t segment = base + slot;
    double sum = 0.0;
    if (segment < segments) {
      int64_t row = segment, start = 0, n = cols;
      if (splits > 1) {
        row = segment / splits;
        start = (segment - row * splits) * chunk;
        n = cols - start < chunk ? cols - start : chunk;
      }
      const int64_t offset = row * cols + start;
      sum = SegmentSum<T, kFast>(t + offset, p + offset, n, lane, lanes, vectorised, eps);
    }
    sum = in_warp ? GroupSum(sum, group) : BlockSum(sum, warp_sums);
    if (lane == 0 && segment < segments) {
      if (splits > 1) {
        partial[segment] = sum;
      } else {
        loss[segment] = Traits<T>::FromSum(sum);
      }
    }
  }
}

// loss[row] = the row's segment sums, added in order.
template <typename T>
__global__ void FinishRowsKernel(const double* __restrict__ partial, T* __restrict__ loss, int64_t rows,
                                 int64_t splits) {
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; row < rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double sum = 0.0;
    for (int64_t k = 0; k < splits; ++k) sum += partial[row * splits + k];
    loss[row] = Traits<T>::FromSum(sum);
  }
}

#endif  // __CUDACC__

// ---------------------------------------------------------------------------------------------
// Gradient: one elementwise pass over the flat [rows * cols] elements, 16 bytes per item.

struct GradientLayout {
  int64_t cols = 1;
  int64_t head = 0;     // scalar items before the first 16-byte boundary
  int64_t vectors = 0;  // then this many 16-byte items
  int64_t items = 0;    // head + vectors + the scalar tail
  Divider row_of;       // flat index -> row
};

template <typename T>
inline GradientLayout MakeGradientLayout(const T* t, const T* p, const T* out, int64_t rows, int64_t cols) {
  constexpr int V = Traits<T>::kPerVector;
  GradientLayout layout;
  const int64_t total = rows * cols;
  const bool vectorised = SameVectorOffset(p, t) && SameVectorOffset(p, out);
  layout.cols = cols;
  layout.head = HeadElements(p, total, vectorised);
  layout.vectors = (total - layout.head) / V;
  layout.items = total - layout.vectors * (V - 1);
  layout.row_of = Divider(static_cast<uint64_t>(cols));
  return layout;
}

// Item w: one element of the head or tail, or one 16-byte vector of V elements.
template <typename T, bool kFast, bool kWrtTrue>
TF_KLD_HD void GradientItem(int64_t w, const T* g, const T* t, const T* p, T* out,
                            const GradientLayout& layout, typename Traits<T>::Compute eps) {
  using Tr = Traits<T>;
  using C = typename Tr::Compute;
  constexpr int V = Tr::kPerVector;
  int64_t i;
  bool vector = false;
  if (w < layout.head) {
    i = w;
  } else if (w - layout.head < layout.vectors) {
    i = layout.head + (w - layout.head) * V;
    vector = true;
  } else {
    i = layout.head + layout.vectors * V + (w - layout.head - layout.vectors);
  }
  int64_t row = static_cast<int64_t>(layout.row_of.Div(static_cast<uint64_t>(i)));
  C gv = Tr::ToCompute(g[row]);
  if (!vector) {
    out[i] = Tr::FromCompute(Grad<C, kFast, kWrtTrue>(gv, Tr::ToCompute(t[i]), Tr::ToCompute(p[i]), eps));
    return;
  }
  C tt[V], pp[V], r[V];
  Tr::Unpack(Load(t + i), tt);
  Tr::Unpack(Load(p + i), pp);
  int64_t c = i - row * layout.cols;
  for (int j = 0; j < V; ++j, ++c) {
    if (c == layout.cols) {  // the vector crosses into the next row
      c = 0;
      gv = Tr::ToCompute(g[++row]);
    }
    r[j] = Grad<C, kFast, kWrtTrue>(gv, tt[j], pp[j], eps);
  }
  Store(out + i, Tr::Pack(r));
}

#ifdef __CUDACC__

template <typename T, bool kFast, bool kWrtTrue>
__global__ void __launch_bounds__(kGradientBlock)
    GradientKernel(const T* g, const T* t, const T* p, T* out, GradientLayout layout,
                   typename Traits<T>::Compute eps) {
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; w < layout.items;
       w += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    GradientItem<T, kFast, kWrtTrue>(w, g, t, p, out, layout, eps);
  }
}

// ---------------------------------------------------------------------------------------------
// Host launchers. T: float, double, __half or __nv_bfloat16. Errors: the launch's own cudaError_t.

// Launches kernel<<<grid, block, 0, stream>>>(args...) and returns that launch's own error: the
// per-thread "last error" slot is shared with every other CUDA user on the thread (TensorFlow's
// libcudart included), so reading it could report someone else's failure as ours. A failed launch
// also sets that slot; it is cleared again so that nobody else reports ours.
template <typename Tuple, size_t... I>
cudaError_t LaunchWith(const void* kernel, dim3 grid, dim3 block, cudaStream_t stream, Tuple& values,
                       std::index_sequence<I...>) {
  void* args[] = {static_cast<void*>(&std::get<I>(values))..., nullptr};
  const cudaError_t err = cudaLaunchKernel(kernel, grid, block, args, 0, stream);
  if (err != cudaSuccess) (void)cudaGetLastError();
  return err;
}

template <typename... Params, typename... Args>
cudaError_t Launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream, Args... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "wrong number of kernel arguments");
  std::tuple<std::decay_t<Params>...> values(args...);  // converted to the parameters' exact types
  return LaunchWith(reinterpret_cast<const void*>(kernel), grid, block, stream, values,
                    std::index_sequence_for<Params...>());
}

// Whether a launch asked for fast_math may use the fast intrinsics: 16-bit types with an eps that
// keeps t_c / p_c a normal float (__logf and __fdividef flush subnormals).
template <typename T>
inline bool UseFastMath(double eps, bool fast_math) {
  return fast_math && sizeof(T) == 2 && static_cast<float>(eps) >= FLT_MIN;
}

// loss[rows] of [rows, cols] inputs. scratch: ForwardScratchBytes(plan, rows) bytes of device memory
// when plan.splits > 1 (plan from PlanForward(rows, cols, sizeof(T))), else unused. kFastMath: the
// fast_math kernels of 16-bit types (where UseFastMath allows) are compiled in only when asked for.
template <typename T, bool kFastMath = false>
cudaError_t LaunchForward(cudaStream_t stream, const T* t, const T* p, T* loss, int64_t rows, int64_t cols,
                          double eps, const ForwardPlan& plan, double* scratch) {
  using C = typename Traits<T>::Compute;
  constexpr bool kFast = kFastMath && sizeof(T) == 2;
  if (rows <= 0) return cudaSuccess;
  if (plan.splits > 1 && scratch == nullptr) return cudaErrorInvalidValue;
  const bool vectorised = SameVectorOffset(p, t);
  const C e = static_cast<C>(eps);
  const dim3 grid(static_cast<unsigned>(plan.blocks)), block(static_cast<unsigned>(plan.block));
  cudaError_t err;
  if (kFast && UseFastMath<T>(eps, true)) {
    err = Launch(ForwardKernel<T, kFast>, grid, block, stream, t, p, loss, scratch, rows, cols, plan.splits,
                 plan.chunk, plan.group, vectorised, e);
  } else {
    err = Launch(ForwardKernel<T, false>, grid, block, stream, t, p, loss, scratch, rows, cols, plan.splits,
                 plan.chunk, plan.group, vectorised, e);
  }
  if (err != cudaSuccess || plan.splits <= 1) return err;
  const int64_t blocks = CeilDiv(rows, 256) < kMaxBlocks ? CeilDiv(rows, 256) : kMaxBlocks;
  return Launch(FinishRowsKernel<T>, dim3(static_cast<unsigned>(blocks)), dim3(256), stream,
                static_cast<const double*>(scratch), loss, rows, plan.splits);
}

// out[rows, cols] = the gradient w.r.t. y_true (wrt_true) or y_pred; out may alias t or p.
template <typename T, bool kFastMath = false>
cudaError_t LaunchGradient(cudaStream_t stream, const T* g, const T* t, const T* p, T* out, int64_t rows,
                           int64_t cols, double eps, bool wrt_true) {
  using C = typename Traits<T>::Compute;
  constexpr bool kFast = kFastMath && sizeof(T) == 2;
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  const GradientLayout layout = MakeGradientLayout(t, p, out, rows, cols);
  const int64_t blocks =
      CeilDiv(layout.items, kGradientBlock) < kMaxBlocks ? CeilDiv(layout.items, kGradientBlock) : kMaxBlocks;
  const dim3 grid(static_cast<unsigned>(blocks)), block(kGradientBlock);
  const C e = static_cast<C>(eps);
  const bool fast = kFast && UseFastMath<T>(eps, true);
  auto kernel = wrt_true ? (fast ? GradientKernel<T, kFast, true> : GradientKernel<T, false, true>)
                         : (fast ? GradientKernel<T, kFast, false> : GradientKernel<T, false, false>);
  return Launch(kernel, grid, block, stream, g, t, p, out, layout, e);
}

#endif  // __CUDACC__

}  // namespace gpu
}  // namespace tf_kld

#endif  // TF_KLD_CC_KERNELS_KLD_GPU_CU_H_
