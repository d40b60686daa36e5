// busseg::adjacent_relation_propagation (RA-BUSSeg ARP; docs/ops.md), CUDA kernels on the
// tensors' own NCHW layout. Reading the features bounds the op, so the tiled path (kernel_size 1,
// 3 or 5 in float32, float16 and bfloat16) stages each tile's features and halo through shared
// memory once (a cp.async pipeline), with dilation d split into d×d independent lattices of
// dilation 1; every other case takes the general path, a thread per pixel on global memory.
// docs/kernels.md describes both (tiles, lattices, the shifted halo rows, the thread groups).
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "adjacent_relation_propagation/cuda.h"
#include "common/cuda.cuh"

namespace busseg::cuda {
namespace {

// ---- tiled path: configurations and shared-memory layout ------------------------------------

template <int kR, int kP, int kTYT, int kCPG, int kNST, int kMinBlocks>
struct TileConfig {
  static constexpr int R = kR;  // radius: kernel_size = 2R + 1
  static constexpr int k = 2 * R + 1, taps = k * k;
  static constexpr int P = kP;      // pixels per thread, a column of P lattice rows
  static constexpr int TX = 16;     // tile columns: the lanes of a half warp
  static constexpr int TYT = kTYT;  // thread rows per group
  static constexpr int TY = TYT * P;
  static constexpr int S = P;         // channel groups (group g ends up with pixel g of a column)
  static constexpr int CPG = kCPG;    // channels per group and stage
  static constexpr int CC = S * CPG;  // channels per stage
  static constexpr int NST = kNST;    // pipeline depth in stages
  // Resident blocks per SM the kernels are compiled for (__launch_bounds__): the most that fit
  // without spilling registers.
  static constexpr int min_blocks = kMinBlocks;
  static constexpr int RH = TY + 2 * R, CW = TX + 2 * R;  // halo tile rows and columns
  static constexpr int group_threads = TX * TYT, threads = group_threads * S;
  static_assert(TY * TX == threads, "one pixel per thread after the channel sums");
  static_assert(group_threads % 32 == 0, "groups are whole warps");
};

// One configuration per radius (and element size): tiles of 16×8 pixels, 128 threads, stages of
// 16-byte multiples of channels (8 channels, 4 for k = 5 in float32).
template <int R, int size>
struct ConfigFor;
template <int size>
struct ConfigFor<0, size> {
  using type = TileConfig<0, 4, 2, 2, 3, 4>;
};
template <int size>
struct ConfigFor<1, size> {
  using type = TileConfig<1, 4, 2, 2, 3, 4>;
};
template <>
struct ConfigFor<2, 4> {
  using type = TileConfig<2, 2, 4, 2, 3, 3>;
};
template <>
struct ConfigFor<2, 2> {
  using type = TileConfig<2, 2, 4, 4, 2, 2>;
};

constexpr int round_up(int n, int m) { return (n + m - 1) / m * m; }

// Elements per shared row: at least `need`, a multiple of v, and such that the two half warps of a
// warp, which read rows P apart (P·SW elements of `size` bytes), fall on opposite halves of the 32
// banks.
constexpr int row_stride(int need, int v, int P, int size) {
  for (int sw = round_up(need, v); sw < need + 64 * v; sw += v)
    if (P * sw * size % 128 == 64) return sw;
  return round_up(need, v);
}

// Shared layout of one stage: CC channels × RH halo rows × SW elements. V elements per copy (16
// bytes with d = 1, else one); NQ copies per halo row.
template <typename T, class Cfg, bool kVec>
struct Layout {
  static constexpr int V = kVec ? 16 / int(sizeof(T)) : 1;
  static constexpr int NQ = kVec ? (Cfg::CW + 2 * V - 2) / V : Cfg::CW;
  static constexpr int SW = row_stride(NQ * V, V, Cfg::P, int(sizeof(T)));
  static constexpr int stage_elems = Cfg::CC * Cfg::RH * SW;
  static constexpr int stage_bytes = stage_elems * int(sizeof(T));
  static constexpr int copies = Cfg::CC * Cfg::RH * NQ;
  static constexpr int copies_per_thread = (copies + Cfg::threads - 1) / Cfg::threads;
  static_assert(sizeof(T) == 2 || sizeof(T) == 4, "the tiled path takes 2- and 4-byte types");
  static_assert(stage_bytes % 16 == 0, "stages start on 16-byte boundaries");
};

// What a tiled kernel needs of the problem (the host fills it for a configuration).
struct TileParams {
  long long C, K, H, W, HW;
  int d;                 // dilation (1 for kernel_size 1)
  int Ry, Rx;            // lattices per axis: min(d, H), min(d, W)
  int tiles_y, tiles_x;  // tiles per lattice (of the largest, lattice 0)
  long long tiles;       // B · Ry · Rx · tiles_y · tiles_x
  float scale;
  bool valid;
};

// A tile: image b, lattice (ry, rx) of Hs×Ws pixels, first lattice row Y0 and column X0. lo, hi:
// the halo columns [lo, hi) inside the lattice.
struct Tile {
  long long b;
  int ry, rx, Hs, Ws, Y0, X0, lo, hi;
};

template <class Cfg>
__device__ __forceinline__ Tile tile_at(const TileParams& p, long long i) {
  Tile t;
  const int tx = static_cast<int>(i % p.tiles_x);
  i /= p.tiles_x;
  const int ty = static_cast<int>(i % p.tiles_y);
  i /= p.tiles_y;
  t.rx = static_cast<int>(i % p.Rx);
  i /= p.Rx;
  t.ry = static_cast<int>(i % p.Ry);
  t.b = i / p.Ry;
  t.Hs = static_cast<int>((p.H - t.ry + p.d - 1) / p.d);
  t.Ws = static_cast<int>((p.W - t.rx + p.d - 1) / p.d);
  t.Y0 = ty * Cfg::TY;
  t.X0 = tx * Cfg::TX;
  t.lo = max(0, Cfg::R - t.X0);
  t.hi = min(Cfg::CW, t.Ws - t.X0 + Cfg::R);
  return t;
}

// Offset in an (H, W) plane of lattice pixel (Y, X), which must lie inside the lattice.
__device__ __forceinline__ long long pixel_offset(const TileParams& p, const Tile& t, int Y,
                                                  int X) {
  return (t.ry + static_cast<long long>(p.d) * Y) * p.W + t.rx + static_cast<long long>(p.d) * X;
}

// Offset between lattice neighbours (dy, dx) apart, in an (H, W) plane.
__device__ __forceinline__ long long neighbour_shift(const TileParams& p, int dy, int dx) {
  return static_cast<long long>(p.d) * (dy * p.W + dx);
}

__device__ __forceinline__ bool inside(const Tile& t, int Y, int X) {
  return Y >= 0 && Y < t.Hs && X >= 0 && X < t.Ws;
}

// ---- tiled path: staging the features -------------------------------------------------------

// Low 32 bits of the address of halo row 0, column 0 of channel 0 of the tile (d = 1): halo row j
// of the stage's channel cl lands shifted by row_shift(u + cl·HW·size + j·W·size) elements. The
// shift is the same in every stage, as a stage spans a multiple of 16 bytes of channels.
template <typename T, class Cfg>
__device__ __forceinline__ uint32_t tile_address(const TileParams& p, const Tile& t,
                                                 const T* feat) {
  const long long elem =
      t.b * p.C * p.HW + static_cast<long long>(t.Y0 - Cfg::R) * p.W + t.X0 - Cfg::R;
  return static_cast<uint32_t>(reinterpret_cast<uintptr_t>(feat)) +
         static_cast<uint32_t>(elem * static_cast<long long>(sizeof(T)));
}

template <typename T>
__device__ __forceinline__ int row_shift(uint32_t address) {
  return static_cast<int>(address % 16) / int(sizeof(T));
}

// A thread's share of staging a tile, fixed for the tile: the copies it issues in every stage
// (d = 1: precomputed), and where the rows of its window lie in a stage buffer.
template <typename T, class Cfg, bool kVec>
struct Staging {
  using L = Layout<T, Cfg, kVec>;
  static constexpr int rows = Cfg::P + 2 * Cfg::R;  // window rows
  static constexpr int chunks = kVec ? L::copies_per_thread : 1;
  static_assert(!kVec || Cfg::CC * sizeof(T) % 16 == 0, "a stage spans whole 16-byte chunks");

  // d = 1: the thread's chunks (copies threadIdx.x + l · threads): source address in stage 0,
  // shared address in stage buffer 0, and channel of the stage (INT_MAX: the chunk holds no pixel
  // of the lattice, or there is no such copy).
  uint64_t src[chunks];
  uint32_t dst[chunks];
  int channel[chunks];
  // Shared address in stage buffer 0 of row jj of the window of channel slot i (stage channel
  // g + S·i), at column tx.
  uint32_t window[Cfg::CPG][rows];

  __device__ __forceinline__ Staging(const TileParams& p, const Tile& t, const T* feat,
                                     uint32_t stages, int g, int ty, int tx) {
    const uint32_t u = tile_address<T, Cfg>(p, t, feat);
    const uint32_t row_bytes = static_cast<uint32_t>(p.W * static_cast<long long>(sizeof(T)));
    const uint32_t plane_bytes = static_cast<uint32_t>(p.HW * static_cast<long long>(sizeof(T)));
#pragma unroll
    for (int i = 0; i < Cfg::CPG; ++i)
#pragma unroll
      for (int jj = 0; jj < rows; ++jj) {
        const int cl = g + Cfg::S * i, j = ty * Cfg::P + jj;
        const int s = kVec ? row_shift<T>(u + cl * plane_bytes + j * row_bytes) : 0;
        window[i][jj] =
            stages + ((cl * Cfg::RH + j) * L::SW + s + tx) * static_cast<uint32_t>(sizeof(T));
      }
    if constexpr (kVec) {
#pragma unroll
      for (int l = 0; l < chunks; ++l) {
        const int idx = threadIdx.x + l * Cfg::threads;
        const int q = idx % L::NQ, j = idx / L::NQ % Cfg::RH, cl = idx / (L::NQ * Cfg::RH);
        const int Y = t.Y0 - Cfg::R + j;
        const long long elem =
            (t.b * p.C + cl) * p.HW + static_cast<long long>(Y) * p.W + t.X0 - Cfg::R;
        const uint64_t row = reinterpret_cast<uintptr_t>(feat) +
                             static_cast<uint64_t>(elem * static_cast<long long>(sizeof(T)));
        const int first = q * L::V - row_shift<T>(static_cast<uint32_t>(row));  // halo column
        const bool some = idx < L::copies && Y >= 0 && Y < t.Hs && first < t.hi &&
                          first + L::V > t.lo;  // holds one of the row's pixels inside
        src[l] = row - row % 16 + 16 * q;
        dst[l] =
            stages + ((cl * Cfg::RH + j) * L::SW + q * L::V) * static_cast<uint32_t>(sizeof(T));
        channel[l] = some ? cl : INT_MAX;
      }
    }
  }

  // Issues the copies of the stage whose first channel is c0 into the stage buffer `offset` bytes
  // after the first; `stages`: the first's shared address.
  __device__ __forceinline__ void issue(const TileParams& p, const Tile& t, const T* feat,
                                        long long c0, uint32_t stages, uint32_t offset) const {
    const int left = p.C - c0 < Cfg::CC ? static_cast<int>(p.C - c0) : Cfg::CC;  // channels
    if constexpr (kVec) {
      const uint64_t shift = static_cast<uint64_t>(c0 * p.HW) * sizeof(T);
#pragma unroll
      for (int l = 0; l < chunks; ++l)
        copy_async_16_if(channel[l] < left, dst[l] + offset,
                         reinterpret_cast<const void*>(src[l] + shift));
    } else {
#pragma unroll 1
      for (int idx = threadIdx.x; idx < L::copies; idx += Cfg::threads) {
        const int q = idx % L::NQ, j = idx / L::NQ % Cfg::RH, cl = idx / (L::NQ * Cfg::RH);
        const int Y = t.Y0 - Cfg::R + j;
        if (cl < left && Y >= 0 && Y < t.Hs && q >= t.lo && q < t.hi)
          copy_async<int(sizeof(T))>(
              stages + offset + ((cl * Cfg::RH + j) * L::SW + q) * sizeof(T),
              feat + (t.b * p.C + c0 + cl) * p.HW + pixel_offset(p, t, Y, t.X0 - Cfg::R + q));
      }
    }
  }

  // v[jj][dx]: the thread's window of channel slot i in the stage buffer `offset` bytes after the
  // first: rows ty·P + jj, columns tx + dx.
  __device__ __forceinline__ void load_window(uint32_t offset, int i,
                                              float (&v)[rows][Cfg::k]) const {
#pragma unroll
    for (int jj = 0; jj < rows; ++jj)
#pragma unroll
      for (int dx = 0; dx < Cfg::k; ++dx)
        v[jj][dx] = load_shared<T>(window[i][jj] + offset + dx * static_cast<uint32_t>(sizeof(T)));
  }
};

// Zeroes, in every row of a stage, the halo columns outside the lattice that pixels inside it
// read ([0, lo) and [hi, hi + R)): the chunks copied there bring other rows' elements, and
// columns no chunk reaches keep stale ones (d = 1; the backward's coefficients of those columns
// are zero, and 0 · NaN is not).
template <typename T, class Cfg>
__device__ __forceinline__ void zero_outside_columns(const TileParams& p, const Tile& t,
                                                     const T* feat, unsigned char* buf) {
  using L = Layout<T, Cfg, true>;
  const uint32_t u = tile_address<T, Cfg>(p, t, feat);
  const uint32_t row_bytes = static_cast<uint32_t>(p.W * static_cast<long long>(sizeof(T)));
  const uint32_t plane_bytes = static_cast<uint32_t>(p.HW * static_cast<long long>(sizeof(T)));
  const int right = min(t.hi + Cfg::R, Cfg::CW);
  for (int r = threadIdx.x; r < Cfg::CC * Cfg::RH; r += Cfg::threads) {
    const int cl = r / Cfg::RH, j = r % Cfg::RH;
    T* row =
        reinterpret_cast<T*>(buf) + r * L::SW + row_shift<T>(u + cl * plane_bytes + j * row_bytes);
    for (int col = 0; col < t.lo; ++col) row[col] = T(0.f);
    for (int col = t.hi; col < right; ++col) row[col] = T(0.f);
  }
}

// ---- tiled path: forward --------------------------------------------------------------------

template <typename T, class Cfg, bool kVec>
__global__ void __launch_bounds__(Cfg::threads, Cfg::min_blocks)
    arp_forward_tiled(TileParams p, const T* __restrict__ feat, const T* __restrict__ value,
                      T* __restrict__ out, T* __restrict__ weights) {
  using L = Layout<T, Cfg, kVec>;
  constexpr int R = Cfg::R, k = Cfg::k, taps = Cfg::taps, P = Cfg::P, NST = Cfg::NST;
  constexpr int red_bytes = Cfg::S * taps * Cfg::group_threads * int(sizeof(float));
  constexpr int smem_bytes = NST * L::stage_bytes > red_bytes ? NST * L::stage_bytes : red_bytes;
  __shared__ __align__(16) unsigned char smem[smem_bytes];
  float* const red = reinterpret_cast<float*>(smem);  // after the last stage
  const uint32_t stages = shared_address(smem);

  const int tx = threadIdx.x % Cfg::TX, ty = threadIdx.x / Cfg::TX % Cfg::TYT;
  const int g = threadIdx.x / Cfg::group_threads, gt = threadIdx.x % Cfg::group_threads;
  const long long stage_count = (p.C + Cfg::CC - 1) / Cfg::CC;

  for (long long tile = blockIdx.x; tile < p.tiles; tile += gridDim.x) {
    const Tile t = tile_at<Cfg>(p, tile);
    if (t.Y0 >= t.Hs || t.X0 >= t.Ws) continue;  // past the end of a smaller lattice
    const Staging<T, Cfg, kVec> staging(p, t, feat, stages, g, ty, tx);
#pragma unroll
    for (int st = 0; st < NST - 1; ++st) {
      if (st < stage_count) staging.issue(p, t, feat, st * Cfg::CC, stages, st * L::stage_bytes);
      async_commit();
    }
    float acc[P][taps] = {};
    int slot = 0;  // stage st's buffer: st mod NST
    for (long long st = 0; st < stage_count; ++st) {
      async_wait<NST - 2>();
      __syncthreads();  // stage st visible to all; stage st - 1 read by all
      if (st + NST - 1 < stage_count)
        staging.issue(p, t, feat, (st + NST - 1) * Cfg::CC, stages,
                      (slot == 0 ? NST - 1 : slot - 1) * L::stage_bytes);
      async_commit();
#pragma unroll
      for (int i = 0; i < Cfg::CPG; ++i) {
        if (st * Cfg::CC + g + Cfg::S * i >= p.C) break;
        float v[P + 2 * R][k];
        staging.load_window(slot * L::stage_bytes, i, v);
#pragma unroll
        for (int px = 0; px < P; ++px)
#pragma unroll
          for (int dy = 0; dy < k; ++dy)
#pragma unroll
            for (int dx = 0; dx < k; ++dx)
              acc[px][dy * k + dx] = fmaf(v[px + R][R], v[px + dy][dx], acc[px][dy * k + dx]);
      }
      slot = slot == NST - 1 ? 0 : slot + 1;
    }
    __syncthreads();  // every stage read: `red` reuses the stage buffers

    // Sum the groups' partial affinities: in round px every group hands in pixel px of its
    // columns and group px adds them up, in group order. The last round's barrier is the last
    // use of shared memory in the tile: the next tile's stages may come.
    float a[taps] = {};
#pragma unroll
    for (int px = 0; px < P; ++px) {
#pragma unroll
      for (int o = 0; o < taps; ++o) red[(g * taps + o) * Cfg::group_threads + gt] = acc[px][o];
      __syncthreads();
      if (g == px)
#pragma unroll
        for (int o = 0; o < taps; ++o) {
          float sum = 0.f;
#pragma unroll
          for (int h = 0; h < Cfg::S; ++h) sum += red[(h * taps + o) * Cfg::group_threads + gt];
          a[o] = sum;
        }
      __syncthreads();
    }

    const int Y = t.Y0 + ty * P + g, X = t.X0 + tx;
    if (Y < t.Hs && X < t.Ws) {
      const long long pix = pixel_offset(p, t, Y, X);
      float amax = -INFINITY, denom = 0.f;
#pragma unroll
      for (int o = 0; o < taps; ++o) {
        const bool in = inside(t, Y + o / k - R, X + o % k - R);
        a[o] = in ? p.scale * a[o] : (p.valid ? -INFINITY : 0.f);
        amax = fmaxf(amax, a[o]);
      }
#pragma unroll
      for (int o = 0; o < taps; ++o) denom += (a[o] = expf(a[o] - amax));
#pragma unroll
      for (int o = 0; o < taps; ++o) {
        a[o] /= denom;
        store(weights + (t.b * taps + o) * p.HW + pix, a[o]);
      }
      for (long long kk = 0; kk < p.K; ++kk) {
        const long long plane = (t.b * p.K + kk) * p.HW;
        float sum = 0.f;
#pragma unroll
        for (int o = 0; o < taps; ++o)
          if (inside(t, Y + o / k - R, X + o % k - R))
            sum = fmaf(a[o], load(value + plane + pix + neighbour_shift(p, o / k - R, o % k - R)),
                       sum);
        store(out + plane + pix, sum);
      }
    }
  }
}

// ---- tiled path: backward -------------------------------------------------------------------

template <typename T, class Cfg, bool kVec>
__global__ void __launch_bounds__(Cfg::threads, Cfg::min_blocks)
    arp_backward_tiled(TileParams p, const T* __restrict__ grad_out, const T* __restrict__ feat,
                       const T* __restrict__ value, const T* __restrict__ weights,
                       T* __restrict__ grad_feat, T* __restrict__ grad_value) {
  using L = Layout<T, Cfg, kVec>;
  constexpr int R = Cfg::R, k = Cfg::k, taps = Cfg::taps, P = Cfg::P, NST = Cfg::NST;
  constexpr int halo = Cfg::RH * Cfg::CW;  // pixels of the tile and its halo
  __shared__ __align__(16) unsigned char smem[NST * L::stage_bytes];
  __shared__ float da[taps * halo];  // da[o][hy][hx]: scale · w (dw - <w, dw>)
  const uint32_t stages = shared_address(smem);

  const int tx = threadIdx.x % Cfg::TX, ty = threadIdx.x / Cfg::TX % Cfg::TYT;
  const int g = threadIdx.x / Cfg::group_threads;
  const long long stage_count = grad_feat != nullptr ? (p.C + Cfg::CC - 1) / Cfg::CC : 0;

  for (long long tile = blockIdx.x; tile < p.tiles; tile += gridDim.x) {
    const Tile t = tile_at<Cfg>(p, tile);
    if (t.Y0 >= t.Hs || t.X0 >= t.Ws) continue;  // past the end of a smaller lattice
    const bool rows_outside = t.Y0 < R || t.Y0 + Cfg::TY + R > t.Hs;
    const bool columns_outside = t.lo > 0 || t.hi < Cfg::CW;
    // Shared elements no copy writes (halo rows outside the lattice; with d > 1 also its columns
    // outside) must read as zero in every stage.
    if (stage_count > 0 && (rows_outside || (!kVec && columns_outside))) {
      for (int i = threadIdx.x; i < NST * L::stage_bytes / 16; i += Cfg::threads)
        reinterpret_cast<uint4*>(smem)[i] = make_uint4(0, 0, 0, 0);
      __syncthreads();
    }
    const Staging<T, Cfg, kVec> staging(p, t, feat, stages, g, ty, tx);
#pragma unroll
    for (int st = 0; st < NST - 1; ++st) {
      if (st < stage_count) staging.issue(p, t, feat, st * Cfg::CC, stages, st * L::stage_bytes);
      async_commit();
    }

    // While they load: da of the tile and its halo (zero outside the lattice) ...
    if (stage_count > 0)
      for (int h = threadIdx.x; h < halo; h += Cfg::threads) {
        const int Y = t.Y0 - R + h / Cfg::CW, X = t.X0 - R + h % Cfg::CW;
        if (!inside(t, Y, X)) {
#pragma unroll
          for (int o = 0; o < taps; ++o) da[o * halo + h] = 0.f;
          continue;
        }
        const long long pix = pixel_offset(p, t, Y, X);
        float dw[taps] = {};
        for (long long kk = 0; kk < p.K; ++kk) {
          const long long plane = (t.b * p.K + kk) * p.HW + pix;
          const float go = load(grad_out + plane);
#pragma unroll
          for (int o = 0; o < taps; ++o)
            if (inside(t, Y + o / k - R, X + o % k - R))
              dw[o] =
                  fmaf(go, load(value + plane + neighbour_shift(p, o / k - R, o % k - R)), dw[o]);
        }
        float w[taps], wdw = 0.f;
#pragma unroll
        for (int o = 0; o < taps; ++o) {
          w[o] = load(weights + (t.b * taps + o) * p.HW + pix);
          wdw = fmaf(w[o], dw[o], wdw);
        }
#pragma unroll
        for (int o = 0; o < taps; ++o) da[o * halo + h] = p.scale * w[o] * (dw[o] - wdw);
      }
    // ... and the value gradient of the tile, a pixel per thread: the pixels p whose tap o lands
    // here give w[p, o] · grad_out[:, p].
    if (grad_value != nullptr) {
      const int Y = t.Y0 + threadIdx.x / Cfg::TX, X = t.X0 + threadIdx.x % Cfg::TX;
      if (Y < t.Hs && X < t.Ws) {
        const long long pix = pixel_offset(p, t, Y, X);
        for (long long kk = 0; kk < p.K; ++kk) {
          const long long plane = (t.b * p.K + kk) * p.HW;
          float sum = 0.f;
#pragma unroll
          for (int o = 0; o < taps; ++o) {
            const int dy = o / k - R, dx = o % k - R;  // the source pixel is (Y - dy, X - dx)
            if (inside(t, Y - dy, X - dx)) {
              const long long src = pix - neighbour_shift(p, dy, dx);
              sum = fmaf(load(weights + (t.b * taps + o) * p.HW + src),
                         load(grad_out + plane + src), sum);
            }
          }
          store(grad_value + plane + pix, sum);
        }
      }
    }
    if (stage_count == 0) continue;  // uniform: no feature gradient wanted (or C = 0)
    __syncthreads();                 // da complete

    // Pixel px's coefficient of its tap-o neighbour q: da[p, o] (p as query) + da[q, -o] (p as
    // key of q); zero where q lies outside.
    float coef[P][taps];
    long long target[P];  // grad_feat offset of the pixel in channel 0; -1 outside the lattice
#pragma unroll
    for (int px = 0; px < P; ++px) {
      const int Y = t.Y0 + ty * P + px, X = t.X0 + tx;
      const int h = (ty * P + px + R) * Cfg::CW + tx + R;
      target[px] = Y < t.Hs && X < t.Ws ? t.b * p.C * p.HW + pixel_offset(p, t, Y, X) : -1;
#pragma unroll
      for (int o = 0; o < taps; ++o) {
        const int dy = o / k - R, dx = o % k - R;
        coef[px][o] = inside(t, Y + dy, X + dx)
                          ? da[o * halo + h] + da[(taps - 1 - o) * halo + h + dy * Cfg::CW + dx]
                          : 0.f;
      }
    }

    int slot = 0;
    for (long long st = 0; st < stage_count; ++st) {
      async_wait<NST - 2>();
      __syncthreads();
      if (st + NST - 1 < stage_count)
        staging.issue(p, t, feat, (st + NST - 1) * Cfg::CC, stages,
                      (slot == 0 ? NST - 1 : slot - 1) * L::stage_bytes);
      async_commit();
      unsigned char* const buf = smem + slot * L::stage_bytes;
      if constexpr (kVec) {
        if (columns_outside) {
          zero_outside_columns<T, Cfg>(p, t, feat, buf);
          __syncthreads();
        }
      }
#pragma unroll
      for (int i = 0; i < Cfg::CPG; ++i) {
        const long long c = st * Cfg::CC + g + Cfg::S * i;
        if (c >= p.C) break;
        float v[P + 2 * R][k];
        staging.load_window(slot * L::stage_bytes, i, v);
#pragma unroll
        for (int px = 0; px < P; ++px) {
          float sum = 0.f;
#pragma unroll
          for (int dy = 0; dy < k; ++dy)
#pragma unroll
            for (int dx = 0; dx < k; ++dx) sum = fmaf(coef[px][dy * k + dx], v[px + dy][dx], sum);
          if (target[px] >= 0) store(grad_feat + target[px] + c * p.HW, sum);
        }
      }
      slot = slot == NST - 1 ? 0 : slot + 1;
    }
    __syncthreads();  // stages and da read: the next tile may overwrite them
  }
}

template <class Cfg>
TileParams tile_params(const ArpShape& s, double scale) {
  constexpr int R = Cfg::R;
  TileParams p;
  p.C = s.C, p.K = s.K, p.H = s.H, p.W = s.W, p.HW = s.H * s.W;
  p.d = R == 0 ? 1 : s.dilation;  // a 1×1 kernel has no neighbours to dilate
  p.Ry = static_cast<int>(std::min<long long>(p.d, s.H));
  p.Rx = static_cast<int>(std::min<long long>(p.d, s.W));
  p.tiles_y = ceil_div((s.H + p.d - 1) / p.d, Cfg::TY);
  p.tiles_x = ceil_div((s.W + p.d - 1) / p.d, Cfg::TX);
  p.tiles = s.B * p.Ry * p.Rx * p.tiles_y * p.tiles_x;
  p.scale = static_cast<float>(scale);
  p.valid = s.valid_padding;
  return p;
}

dim3 tile_grid(const TileParams& p) {
  return dim3(static_cast<unsigned>(std::min<long long>(p.tiles, (1LL << 31) - 1)));
}

// ---- general path ---------------------------------------------------------------------------

// Blocks of 32×8 pixels; the grid covers (W, H, B) with strides where it cannot reach.
constexpr int kGeneralX = 32, kGeneralY = 8, kGeneralThreads = kGeneralX * kGeneralY;

struct GeneralParams {
  long long B, C, K, H, W, HW;
  int kernel_size, radius, taps;
  long long dilation;
  double scale;
  bool valid;
};

GeneralParams general_params(const ArpShape& s, double scale) {
  return {s.B,
          s.C,
          s.K,
          s.H,
          s.W,
          s.H * s.W,
          s.kernel_size,
          s.kernel_size / 2,
          s.kernel_size * s.kernel_size,
          s.dilation,
          scale,
          s.valid_padding};
}

dim3 general_grid(const GeneralParams& p) {
  return dim3(static_cast<unsigned>(std::min<long long>(ceil_div(p.W, kGeneralX), (1LL << 31) - 1)),
              static_cast<unsigned>(std::min<long long>(ceil_div(p.H, kGeneralY), 65535)),
              static_cast<unsigned>(std::min<long long>(p.B, 65535)));
}
const dim3 kGeneralBlock(kGeneralX, kGeneralY);

// Calls f(b, y, x) for every pixel of the batch.
template <typename F>
__device__ __forceinline__ void for_each_pixel(const GeneralParams& p, F&& f) {
  for (long long b = blockIdx.z; b < p.B; b += gridDim.z)
    for (long long y = blockIdx.y * static_cast<long long>(kGeneralY) + threadIdx.y; y < p.H;
         y += static_cast<long long>(kGeneralY) * gridDim.y)
      for (long long x = blockIdx.x * static_cast<long long>(kGeneralX) + threadIdx.x; x < p.W;
           x += static_cast<long long>(kGeneralX) * gridDim.x)
        f(b, y, x);
}

// Tap o's neighbour of pixel (y, x) (sign +1), or the pixel whose tap o lands on (y, x) (sign -1):
// its offset in the plane, -1 outside the image.
__device__ __forceinline__ long long general_neighbour(const GeneralParams& p, long long y,
                                                       long long x, int o, int sign) {
  const long long qy = y + sign * p.dilation * (o / p.kernel_size - p.radius);
  const long long qx = x + sign * p.dilation * (o % p.kernel_size - p.radius);
  return qy >= 0 && qy < p.H && qx >= 0 && qx < p.W ? qy * p.W + qx : -1;
}

// `a` (B, taps, H, W) in the accumulator type holds the affinities, then the weights (it may be
// `weights` itself when T is the accumulator type).
template <typename T>
__global__ void __launch_bounds__(kGeneralThreads, 1)
    arp_forward_general(GeneralParams p, const T* __restrict__ feat, const T* __restrict__ value,
                        T* __restrict__ out, T* weights, acc_t<T>* a) {
  using A = acc_t<T>;
  for_each_pixel(p, [&](long long b, long long y, long long x) {
    const long long pix = y * p.W + x;
    const T* f = feat + b * p.C * p.HW;
    A* ap = a + b * p.taps * p.HW + pix;
    A amax = -INFINITY, denom = 0;
    for (int o = 0; o < p.taps; ++o) {
      const long long q = general_neighbour(p, y, x, o, +1);
      A dot = 0;
      if (q >= 0)
        for (long long c = 0; c < p.C; ++c)
          dot += load(f + c * p.HW + pix) * load(f + c * p.HW + q);
      const A v = q >= 0 ? static_cast<A>(p.scale) * dot : (p.valid ? A(-INFINITY) : A(0));
      ap[o * p.HW] = v;
      amax = max(amax, v);
    }
    for (int o = 0; o < p.taps; ++o) denom += (ap[o * p.HW] = exp(ap[o * p.HW] - amax));
    for (int o = 0; o < p.taps; ++o) {
      const A w = ap[o * p.HW] / denom;
      ap[o * p.HW] = w;
      store(weights + (b * p.taps + o) * p.HW + pix, w);
    }
    for (long long kk = 0; kk < p.K; ++kk) {
      const T* v = value + (b * p.K + kk) * p.HW;
      A sum = 0;
      for (int o = 0; o < p.taps; ++o) {
        const long long q = general_neighbour(p, y, x, o, +1);
        if (q >= 0) sum += ap[o * p.HW] * load(v + q);
      }
      store(out + (b * p.K + kk) * p.HW + pix, sum);
    }
  });
}

// da (B, taps, H, W) = scale · w (dw - <w, dw>), dw[p, o] = <grad_out[:, p], value[:, q]>, when
// `da` is given; grad_value[:, p] = Σ_o w[p - d·o, o] · grad_out[:, p - d·o] when given.
template <typename T>
__global__ void __launch_bounds__(kGeneralThreads, 1)
    arp_affinity_grad_general(GeneralParams p, const T* __restrict__ grad_out,
                              const T* __restrict__ value, const T* __restrict__ weights,
                              acc_t<T>* __restrict__ da, T* __restrict__ grad_value) {
  using A = acc_t<T>;
  for_each_pixel(p, [&](long long b, long long y, long long x) {
    const long long pix = y * p.W + x;
    const T* w = weights + b * p.taps * p.HW + pix;
    if (da != nullptr) {
      A* dp = da + b * p.taps * p.HW + pix;
      A wdw = 0;
      for (int o = 0; o < p.taps; ++o) {
        const long long q = general_neighbour(p, y, x, o, +1);
        A dw = 0;
        if (q >= 0)
          for (long long kk = 0; kk < p.K; ++kk) {
            const long long plane = (b * p.K + kk) * p.HW;
            dw += load(grad_out + plane + pix) * load(value + plane + q);
          }
        dp[o * p.HW] = dw;
        wdw += load(w + o * p.HW) * dw;
      }
      for (int o = 0; o < p.taps; ++o)
        dp[o * p.HW] = static_cast<A>(p.scale) * load(w + o * p.HW) * (dp[o * p.HW] - wdw);
    }
    if (grad_value != nullptr)
      for (long long kk = 0; kk < p.K; ++kk) {
        const long long plane = (b * p.K + kk) * p.HW;
        A sum = 0;
        for (int o = 0; o < p.taps; ++o) {
          const long long src = general_neighbour(p, y, x, o, -1);
          if (src >= 0)
            sum += load(weights + (b * p.taps + o) * p.HW + src) * load(grad_out + plane + src);
        }
        store(grad_value + plane + pix, sum);
      }
  });
}

// grad_feat[:, p] = Σ_o (da[p, o] + da[q, -o]) · feat[:, q] over the neighbours q = p + d·o inside.
template <typename T>
__global__ void __launch_bounds__(kGeneralThreads, 1)
    arp_feature_grad_general(GeneralParams p, const T* __restrict__ feat,
                             const acc_t<T>* __restrict__ da, T* __restrict__ grad_feat) {
  using A = acc_t<T>;
  for_each_pixel(p, [&](long long b, long long y, long long x) {
    const long long pix = y * p.W + x;
    const A* dp = da + b * p.taps * p.HW;
    const T* f = feat + b * p.C * p.HW;
    for (long long c = 0; c < p.C; ++c) {
      A sum = 0;
      for (int o = 0; o < p.taps; ++o) {
        const long long q = general_neighbour(p, y, x, o, +1);
        if (q >= 0)
          sum += (dp[o * p.HW + pix] + dp[(p.taps - 1 - o) * p.HW + q]) * load(f + c * p.HW + q);
      }
      store(grad_feat + (b * p.C + c) * p.HW + pix, sum);
    }
  });
}

// ---- dispatch -------------------------------------------------------------------------------

// The tiled path takes kernel sizes 1, 3 and 5 in float32, float16 and bfloat16.
template <typename T>
bool tiled(const ArpShape& s) {
  return !std::is_same_v<T, double> &&
         (s.kernel_size == 1 || s.kernel_size == 3 || s.kernel_size == 5);
}

template <typename F>
void with_radius(int kernel_size, F&& f) {
  switch (kernel_size) {
    case 1:
      return f(std::integral_constant<int, 0>{});
    case 3:
      return f(std::integral_constant<int, 1>{});
    default:
      return f(std::integral_constant<int, 2>{});
  }
}

// Calls f(std::true_type) where rows are copied in 16-byte chunks (d = 1), else
// f(std::false_type) (element by element; a 1×1 kernel never needs it).
template <int R, typename F>
void with_layout(const TileParams& p, F&& f) {
  if constexpr (R == 0)
    f(std::true_type{});
  else if (p.d == 1)
    f(std::true_type{});
  else
    f(std::false_type{});
}

}  // namespace

size_t adjacent_relation_propagation_scratch_bytes(DType dtype, const ArpShape& s) {
  if (dtype != DType::f16 && dtype != DType::bf16) return 0;  // float32: in weights, if at all
  if (s.kernel_size == 1 || s.kernel_size == 3 || s.kernel_size == 5) return 0;
  return static_cast<size_t>(s.B * s.kernel_size * s.kernel_size * s.H * s.W) * sizeof(float);
}

cudaError_t adjacent_relation_propagation(DType dtype, const ArpShape& s, const void* feat,
                                          const void* value, void* out, void* weights,
                                          void* scratch, double scale, cudaStream_t stream) {
  if (s.B * s.H * s.W == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* f = static_cast<const T*>(feat);
    const T* v = static_cast<const T*>(value);
    if constexpr (!std::is_same_v<T, double>) {
      if (tiled<T>(s)) {
        with_radius(s.kernel_size, [&](auto radius) {
          constexpr int R = decltype(radius)::value;
          using Cfg = typename ConfigFor<R, int(sizeof(T))>::type;
          const TileParams p = tile_params<Cfg>(s, scale);
          with_layout<R>(p, [&](auto vec) {
            arp_forward_tiled<T, Cfg, decltype(vec)::value>
                <<<tile_grid(p), Cfg::threads, 0, stream>>>(p, f, v, static_cast<T*>(out),
                                                            static_cast<T*>(weights));
          });
        });
        return;
      }
    }
    const GeneralParams p = general_params(s, scale);
    acc_t<T>* a = std::is_same_v<T, acc_t<T>> ? static_cast<acc_t<T>*>(weights)
                                              : static_cast<acc_t<T>*>(scratch);
    arp_forward_general<T><<<general_grid(p), kGeneralBlock, 0, stream>>>(
        p, f, v, static_cast<T*>(out), static_cast<T*>(weights), a);
  });
}

size_t adjacent_relation_propagation_backward_scratch_bytes(DType dtype, const ArpShape& s,
                                                            bool grad_feat) {
  if (!grad_feat) return 0;
  if (dtype != DType::f64 && (s.kernel_size == 1 || s.kernel_size == 3 || s.kernel_size == 5))
    return 0;
  const size_t acc = dtype == DType::f64 ? sizeof(double) : sizeof(float);
  return static_cast<size_t>(s.B * s.kernel_size * s.kernel_size * s.H * s.W) * acc;
}

cudaError_t adjacent_relation_propagation_backward(DType dtype, const ArpShape& s,
                                                   const void* grad_out, const void* feat,
                                                   const void* value, const void* weights,
                                                   void* grad_feat, void* grad_value, void* scratch,
                                                   double scale, cudaStream_t stream) {
  if (s.B * s.H * s.W == 0 || (grad_feat == nullptr && grad_value == nullptr)) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* go = static_cast<const T*>(grad_out);
    const T* f = static_cast<const T*>(feat);
    const T* v = static_cast<const T*>(value);
    const T* w = static_cast<const T*>(weights);
    T* gf = static_cast<T*>(grad_feat);
    T* gv = static_cast<T*>(grad_value);
    if constexpr (!std::is_same_v<T, double>) {
      if (tiled<T>(s)) {
        with_radius(s.kernel_size, [&](auto radius) {
          constexpr int R = decltype(radius)::value;
          using Cfg = typename ConfigFor<R, int(sizeof(T))>::type;
          const TileParams p = tile_params<Cfg>(s, scale);
          with_layout<R>(p, [&](auto vec) {
            arp_backward_tiled<T, Cfg, decltype(vec)::value>
                <<<tile_grid(p), Cfg::threads, 0, stream>>>(p, go, f, v, w, gf, gv);
          });
        });
        return;
      }
    }
    const GeneralParams p = general_params(s, scale);
    acc_t<T>* da = gf != nullptr ? static_cast<acc_t<T>*>(scratch) : nullptr;
    arp_affinity_grad_general<T>
        <<<general_grid(p), kGeneralBlock, 0, stream>>>(p, go, v, w, da, gv);
    if (gf != nullptr)
      arp_feature_grad_general<T><<<general_grid(p), kGeneralBlock, 0, stream>>>(p, f, da, gf);
  });
}

}  // namespace busseg::cuda
