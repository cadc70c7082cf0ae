// Fused query x gallery distances and exact ranking counts (ARCHITECTURE.md, "Exact ranking
// metrics without sorting"), for hpc_reid/evaluation/ranking_cuda.py.
//
// Only the ranks of a query's positives matter, and rank(positive k in (distance, index) order)
// = k + 1 + #(kept negatives before it). So, per tile of queries:
//   pass 1  pair_distances(): the distances of the few (query, positive) pairs, which the caller
//           sorts by (distance, gallery index) per query;
//   pass 2  count_negatives(): a tiled GEMM whose epilogue, instead of storing the (B, G)
//           distances, finds for every kept negative how many of its query's sorted positives
//           precede it and adds 1 to hist[query's offset + that count].
// The cumulated histogram of a query gives each positive's rank. Exactness needs the distance of
// a pair to be the same float in both passes: both accumulate the dot product with dot_step() over
// k = 0..D-1 in order, starting from 0 (the GEMM's zero padding past D adds exact zeros), and map
// it to a distance with distance_from_dot(). Explicit _rn intrinsics keep nvcc from contracting
// or reordering that arithmetic differently in the two kernels.
//
// Features arrive float32, contiguous, L2-normalised by torch for the cosine metric, with D padded
// by zeros to a multiple of BK; the squared norms (euclidean) are computed by torch once and read
// by both kernels. Protocol (Market-1501): gallery items of the query's pid are never negatives
// (same camera: junk, removed; other camera: positives), every other pid's item is a negative.

// Narrow headers instead of <torch/extension.h>, which pulls in the whole C++ frontend and makes
// every compile (the JIT build and the nvcc check in tests/evaluation/test_cuda_kernel.py) several
// times slower.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>  // at::Tensor <-> torch.Tensor for PYBIND11_MODULE

#include <cstdint>

namespace {

constexpr int BM = 128;       // queries per block
constexpr int BN = 128;       // gallery items per block
constexpr int BK = 8;         // feature dimensions per shared-memory stage
constexpr int TM = 8;         // queries per thread (consecutive rows)
constexpr int TN = 8;         // gallery items per thread (consecutive columns)
constexpr int PAD = 4;        // keeps the transposed tile stores free of bank conflicts
constexpr int THREADS = (BM / TM) * (BN / TN);  // 256
constexpr int HIST_SMEM = 8192;                  // histogram bins a block keeps in shared memory

// One thread loads one float4 (4 consecutive k) of one row of each tile per stage.
static_assert(BM == BN && THREADS * 4 == BM * BK, "loader mapping: one float4 per thread");
static_assert(TM % 4 == 0 && TN % 4 == 0, "fragments are read as float4");

// The one accumulation step of every dot product: acc + a * b, rounded once.
__device__ __forceinline__ float dot_step(float acc, float a, float b) {
  return __fmaf_rn(a, b, acc);
}

// cosine: 1 - q.g (unit vectors); euclidean: sqrt(max(|q|^2 + |g|^2 - 2 q.g, 0)), the same
// formula, in the same order, as pairwise_distance in hpc_reid/evaluation/distances.py.
__device__ __forceinline__ float distance_from_dot(float dot, float q_sq, float g_sq,
                                                   bool euclidean) {
  if (!euclidean) return __fsub_rn(1.0f, dot);
  const float sq = __fsub_rn(__fadd_rn(q_sq, g_sq), __fmul_rn(2.0f, dot));
  return __fsqrt_rn(fmaxf(sq, 0.0f));
}

// Whether (da, ia) comes before (db, ib) in the ranking order: distance, then gallery index.
__device__ __forceinline__ bool precedes(float da, int ia, float db, int ib) {
  return da < db || (da == db && ia < ib);
}

// How many of the p positives (pd, pg), sorted by (distance, index), precede item (d, g).
__device__ __forceinline__ int positives_before(const float* __restrict__ pd,
                                                const int* __restrict__ pg, int p, float d,
                                                int g) {
  // Most negatives of a reasonable model lie past the last positive: one comparison.
  if (p == 0 || precedes(pd[p - 1], pg[p - 1], d, g)) return p;
  // The answer is the first k in [0, p - 1] whose positive does not precede the item.
  int lo = 0, hi = p - 1;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (precedes(pd[mid], pg[mid], d, g)) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// One thread per (query, gallery) pair: out[t] = distance(qf[qi[t]], gf[gi[t]]), with the
// arithmetic of the GEMM below, bit for bit.
__global__ void pair_distance_kernel(const float* __restrict__ qf, const float* __restrict__ gf,
                                     const float* __restrict__ q_sq,
                                     const float* __restrict__ g_sq,
                                     const int64_t* __restrict__ qi,
                                     const int64_t* __restrict__ gi, int64_t n, int dim,
                                     bool euclidean, float* __restrict__ out) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= n) return;
  const int64_t q = qi[t], g = gi[t];
  const float* a = qf + q * dim;
  const float* b = gf + g * dim;
  float acc = 0.0f;
  for (int k = 0; k < dim; ++k) acc = dot_step(acc, a[k], b[k]);
  out[t] = distance_from_dot(acc, euclidean ? q_sq[q] : 0.0f, euclidean ? g_sq[g] : 0.0f,
                             euclidean);
}

// Block (x, y): gallery items [x * BN, +BN) against queries [y * BM, +BM). Thread (ty, tx) owns
// the BM/TM x BN/TN grid's cell: queries ty * TM + i, gallery items tx * TN + j (i < TM, j < TN).
// pos_off (B + 1): query q's sorted positives are pos_d/pos_g[pos_off[q], pos_off[q + 1]), and
// its histogram bins hist[pos_off[q] + c], c = number of positives before a negative (c < p; a
// negative after every positive ranks none and is not counted).
__global__ void __launch_bounds__(THREADS, 2)
    count_negatives_kernel(const float* __restrict__ qf, const float* __restrict__ gf,
                           const float* __restrict__ q_sq, const float* __restrict__ g_sq,
                           const int64_t* __restrict__ q_pids, const int64_t* __restrict__ g_pids,
                           const int64_t* __restrict__ pos_off, const float* __restrict__ pos_d,
                           const int* __restrict__ pos_g, int num_q, int num_g, int dim,
                           bool euclidean, int* __restrict__ hist) {
  __shared__ __align__(16) float As[BK][BM + PAD];  // query tile, transposed: As[k][row]
  __shared__ __align__(16) float Bs[BK][BN + PAD];  // gallery tile, transposed
  __shared__ int hist_s[HIST_SMEM];

  const int tid = threadIdx.x;
  const int tx = tid % (BN / TN);
  const int ty = tid / (BN / TN);
  const int q0 = blockIdx.y * BM;
  const int g0 = blockIdx.x * BN;

  // The block's queries own the contiguous bins [block_off, block_off + block_bins). They are
  // counted in shared memory when they fit, else straight into global memory.
  const int64_t block_off = pos_off[q0];
  const int block_bins = static_cast<int>(pos_off[min(q0 + BM, num_q)] - block_off);
  if (block_bins == 0) return;  // no query of the block has a positive (uniform: before any sync)
  const bool in_smem = block_bins <= HIST_SMEM;
  int* block_hist = in_smem ? hist_s : hist + block_off;
  if (in_smem) {
    for (int t = tid; t < block_bins; t += THREADS) hist_s[t] = 0;
  }
  __syncthreads();

  // Main loop: acc[i][j] accumulates q.g over k = 0, 1, ..., dim - 1 in order, as
  // pair_distance_kernel does. Rows past the end of the query or gallery are clamped to the last
  // one (their results are never used), so the loads need no bounds test.
  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i) {
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;
  }
  const int load_row = tid / (BK / 4);
  const int load_k = (tid % (BK / 4)) * 4;
  const float* a_src = qf + static_cast<int64_t>(min(q0 + load_row, num_q - 1)) * dim + load_k;
  const float* b_src = gf + static_cast<int64_t>(min(g0 + load_row, num_g - 1)) * dim + load_k;
  for (int k0 = 0; k0 < dim; k0 += BK) {
    const float4 a = *reinterpret_cast<const float4*>(a_src + k0);
    const float4 b = *reinterpret_cast<const float4*>(b_src + k0);
    As[load_k + 0][load_row] = a.x;
    As[load_k + 1][load_row] = a.y;
    As[load_k + 2][load_row] = a.z;
    As[load_k + 3][load_row] = a.w;
    Bs[load_k + 0][load_row] = b.x;
    Bs[load_k + 1][load_row] = b.y;
    Bs[load_k + 2][load_row] = b.z;
    Bs[load_k + 3][load_row] = b.w;
    __syncthreads();
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      float a_frag[TM], b_frag[TN];
#pragma unroll
      for (int i = 0; i < TM; i += 4) {
        const float4 v = *reinterpret_cast<const float4*>(&As[k][ty * TM + i]);
        a_frag[i] = v.x;
        a_frag[i + 1] = v.y;
        a_frag[i + 2] = v.z;
        a_frag[i + 3] = v.w;
      }
#pragma unroll
      for (int j = 0; j < TN; j += 4) {
        const float4 v = *reinterpret_cast<const float4*>(&Bs[k][tx * TN + j]);
        b_frag[j] = v.x;
        b_frag[j + 1] = v.y;
        b_frag[j + 2] = v.z;
        b_frag[j + 3] = v.w;
      }
#pragma unroll
      for (int i = 0; i < TM; ++i) {
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = dot_step(acc[i][j], a_frag[i], b_frag[j]);
      }
    }
    __syncthreads();
  }

  // Epilogue: distances in registers, counted into the histogram, never stored.
  int64_t pid_g[TN];
  float sq_g[TN];
#pragma unroll
  for (int j = 0; j < TN; ++j) {
    const int g = g0 + tx * TN + j;
    pid_g[j] = g < num_g ? g_pids[g] : 0;
    sq_g[j] = (euclidean && g < num_g) ? g_sq[g] : 0.0f;
  }
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int q = q0 + ty * TM + i;
    const int64_t off = q < num_q ? pos_off[q] : 0;
    const int p = q < num_q ? static_cast<int>(pos_off[q + 1] - off) : 0;
    if (p > 0) {
      const int64_t pid_q = q_pids[q];
      const float sq_q = euclidean ? q_sq[q] : 0.0f;
      int* bins = block_hist + (off - block_off);
      // The thread's TN items of one query often fall in the same bin: add runs, not ones.
      int run_bin = 0, run_len = 0;
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        const int g = g0 + tx * TN + j;
        if (g < num_g && pid_g[j] != pid_q) {  // a kept negative
          const float d = distance_from_dot(acc[i][j], sq_q, sq_g[j], euclidean);
          const int bin = positives_before(pos_d + off, pos_g + off, p, d, g);
          if (bin < p) {
            if (run_len > 0 && bin != run_bin) {
              atomicAdd(bins + run_bin, run_len);
              run_len = 0;
            }
            run_bin = bin;
            ++run_len;
          }
        }
      }
      if (run_len > 0) atomicAdd(bins + run_bin, run_len);
    }
  }

  if (in_smem) {  // uniform over the block
    __syncthreads();
    for (int t = tid; t < block_bins; t += THREADS) {
      const int n = hist_s[t];
      if (n != 0) atomicAdd(hist + block_off + t, n);
    }
  }
}

void check_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == at::kFloat && t.dim() == 2 && t.is_contiguous(),
              name, " must be a contiguous 2-D float32 CUDA tensor, got ", t.scalar_type(), " ",
              t.sizes(), t.is_cuda() ? " on CUDA" : " on CPU");
  TORCH_CHECK(reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0, name,
              " must be 16-byte aligned (it is read as float4)");
}

void check_vector(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t size,
                  const at::Device& device) {
  TORCH_CHECK(t.device() == device && t.scalar_type() == dtype && t.dim() == 1 &&
                  t.is_contiguous() && (size < 0 || t.numel() == size),
              name, " must be a contiguous 1-D ", dtype, " tensor of ", size, " elements on ",
              device, ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

void check_pair(const at::Tensor& qf, const at::Tensor& gf, const at::Tensor& q_sq,
                const at::Tensor& g_sq, bool euclidean) {
  check_matrix(qf, "qf");
  check_matrix(gf, "gf");
  TORCH_CHECK(qf.device() == gf.device(), "qf and gf must be on the same device");
  TORCH_CHECK(qf.size(1) == gf.size(1) && qf.size(1) % BK == 0,
              "qf and gf must have the same feature dimension, a multiple of ", BK, ", got ",
              qf.sizes(), " and ", gf.sizes());
  TORCH_CHECK(qf.size(0) < INT32_MAX && gf.size(0) < INT32_MAX && qf.size(1) < INT32_MAX,
              "sizes must fit in int32");
  if (euclidean) {
    check_vector(q_sq, "q_sq", at::kFloat, qf.size(0), qf.device());
    check_vector(g_sq, "g_sq", at::kFloat, gf.size(0), qf.device());
  }
}

}  // namespace

// Distances of the pairs (qf[qi[t]], gf[gi[t]]), float32 (n,), bit-identical to the distances
// that count_negatives computes for the same pairs.
at::Tensor pair_distances(const at::Tensor& qf, const at::Tensor& gf, const at::Tensor& q_sq,
                          const at::Tensor& g_sq, const at::Tensor& qi, const at::Tensor& gi,
                          bool euclidean) {
  check_pair(qf, gf, q_sq, g_sq, euclidean);
  check_vector(qi, "qi", at::kLong, -1, qf.device());
  check_vector(gi, "gi", at::kLong, qi.numel(), qf.device());
  const c10::cuda::CUDAGuard guard(qf.device());
  const int64_t n = qi.numel();
  at::Tensor out = at::empty({n}, qf.options());
  if (n == 0) return out;
  constexpr int threads = 256;
  const int64_t blocks = (n + threads - 1) / threads;
  TORCH_CHECK(blocks <= INT32_MAX, "too many pairs: ", n);
  pair_distance_kernel<<<static_cast<unsigned>(blocks), threads, 0,
                         c10::cuda::getCurrentCUDAStream()>>>(
      qf.data_ptr<float>(), gf.data_ptr<float>(), euclidean ? q_sq.data_ptr<float>() : nullptr,
      euclidean ? g_sq.data_ptr<float>() : nullptr, qi.data_ptr<int64_t>(),
      gi.data_ptr<int64_t>(), n, static_cast<int>(qf.size(1)), euclidean,
      out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// Histogram (int32, pos_d.numel()) of the kept negatives of every query over the gaps between
// its sorted positives; see count_negatives_kernel. pos_off[num_q] must equal pos_d.numel().
at::Tensor count_negatives(const at::Tensor& qf, const at::Tensor& gf, const at::Tensor& q_sq,
                           const at::Tensor& g_sq, const at::Tensor& q_pids,
                           const at::Tensor& g_pids, const at::Tensor& pos_off,
                           const at::Tensor& pos_d, const at::Tensor& pos_g, bool euclidean) {
  check_pair(qf, gf, q_sq, g_sq, euclidean);
  const int64_t num_q = qf.size(0), num_g = gf.size(0);
  check_vector(q_pids, "q_pids", at::kLong, num_q, qf.device());
  check_vector(g_pids, "g_pids", at::kLong, num_g, qf.device());
  check_vector(pos_off, "pos_off", at::kLong, num_q + 1, qf.device());
  check_vector(pos_d, "pos_d", at::kFloat, -1, qf.device());
  check_vector(pos_g, "pos_g", at::kInt, pos_d.numel(), qf.device());
  const c10::cuda::CUDAGuard guard(qf.device());
  at::Tensor hist = at::zeros({pos_d.numel()}, q_pids.options().dtype(at::kInt));
  if (pos_d.numel() == 0 || num_q == 0 || num_g == 0) return hist;
  const dim3 grid(static_cast<unsigned>((num_g + BN - 1) / BN),
                  static_cast<unsigned>((num_q + BM - 1) / BM));
  TORCH_CHECK(grid.y <= 65535, "too many queries in one call: ", num_q);
  count_negatives_kernel<<<grid, THREADS, 0, c10::cuda::getCurrentCUDAStream()>>>(
      qf.data_ptr<float>(), gf.data_ptr<float>(), euclidean ? q_sq.data_ptr<float>() : nullptr,
      euclidean ? g_sq.data_ptr<float>() : nullptr, q_pids.data_ptr<int64_t>(),
      g_pids.data_ptr<int64_t>(), pos_off.data_ptr<int64_t>(), pos_d.data_ptr<float>(),
      pos_g.data_ptr<int>(), static_cast<int>(num_q), static_cast<int>(num_g),
      static_cast<int>(qf.size(1)), euclidean, hist.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return hist;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused query x gallery distances and exact ranking counts (kernels/rank_fused.cu)";
  m.def("pair_distances", &pair_distances, "distances of given (query, gallery) pairs");
  m.def("count_negatives", &count_negatives,
        "histogram of kept negatives over the gaps between each query's sorted positives");
}
