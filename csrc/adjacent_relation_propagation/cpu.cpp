// busseg::adjacent_relation_propagation (RA-BUSSeg ARP; docs/ops.md), C++/OpenMP CPU kernels on the
// tensors' own NCHW layout: nothing transposed, nothing of size (B, C*k*k, HW) formed. The two sums
// over channels are the whole cost, so they run over blocks of 16 consecutive pixels (one sweep
// over the features serves every tap), each symmetric affinity is computed once, and the backward
// is a gather with no atomics. docs/kernels.md says how.
#include "common/cpu.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "adjacent_relation_propagation/checks.h"
#include "common/lanes.h"

namespace busseg {
namespace {

struct ArpGeometry {
  int64_t B, C, K, H, W;
  int64_t radius, dilation, taps;  // taps = kernel_size^2, row-major offsets (dy outer)

  int64_t centre() const { return taps / 2; }
  int64_t mirror(int64_t t) const { return taps - 1 - t; }  // tap of offset -o
  int64_t dy(int64_t t) const { return dilation * (t / (2 * radius + 1) - radius); }
  int64_t dx(int64_t t) const { return dilation * (t % (2 * radius + 1) - radius); }
  // The x range [x0, x1) whose tap-t neighbour lies inside the row; empty if the row is outside.
  bool columns(int64_t y, int64_t t, int64_t& x0, int64_t& x1) const {
    x0 = std::max<int64_t>(0, -dx(t));
    x1 = std::min<int64_t>(W, W - dx(t));
    return y + dy(t) >= 0 && y + dy(t) < H && x0 < x1;
  }
  int64_t plane(int64_t b, int64_t channel, int64_t channels) const {  // start of a (H, W) plane
    return (b * channels + channel) * H * W;
  }
};

// Row y of dst (an (H, W) plane) = sum over taps of coef[t] (taps x W) times src's neighbours at
// tap t: the value propagation of the forward and the feature gradient's gather. The sum runs in
// the accumulator type: in dst itself when it has that type, else in `scratch` (W).
template <typename scalar_t, typename acc_t>
void tap_weighted_row(const ArpGeometry& g, int64_t y, const acc_t* coef, const scalar_t* src,
                      acc_t* scratch, scalar_t* dst) {
  accumulate_row(g.W, scratch, dst + y * g.W, [&](acc_t* row) {
    for (int64_t t = 0, x0, x1; t < g.taps; ++t)
      if (g.columns(y, t, x0, x1))
        multiply_add(row + x0, coef + t * g.W + x0, src + (y + g.dy(t)) * g.W + g.dx(t) + x0,
                     x1 - x0);
  });
}

// The channel sums run over blocks of kLanes consecutive pixels of a flat (H, W) plane, one vector
// per tap held in registers across the whole loop over channels (one pass over the channels serves
// a whole group of taps), so a block costs one load and one fused multiply-add per tap and
// channel. The taps are split into groups of the sizes below; the blocks start at 0, kLanes, ...
// and the last one ends at H*W (overlapping its predecessor, whose pixels it recomputes alike), or
// a single block covers a plane smaller than kLanes.
constexpr int kMaxGroup = 9;
// Channels ahead whose cache lines a forward block prefetches: each channel's lie in another page,
// out of the hardware prefetchers' reach.
constexpr int64_t kPrefetchChannels = 32;

inline int group_size(int64_t taps_left) {
  return taps_left >= 9 ? 9 : taps_left >= 5 ? 5 : taps_left >= 3 ? 3 : int(taps_left);
}

template <typename F>
void with_group_size(int n, const F& f) {
  switch (n) {
    case 9:
      return f(std::integral_constant<int, 9>{});
    case 5:
      return f(std::integral_constant<int, 5>{});
    case 3:
      return f(std::integral_constant<int, 3>{});
    case 2:
      return f(std::integral_constant<int, 2>{});
    default:
      return f(std::integral_constant<int, 1>{});
  }
}

int64_t block_count(int64_t n) { return n < kLanes ? 1 : (n + kLanes - 1) / kLanes; }
int64_t block_start(int64_t n, int64_t i) {
  return std::max<int64_t>(0, std::min<int64_t>(i * kLanes, n - kLanes));
}

// How a block may read its taps' neighbours. interior: every lane's neighbour lies in the image.
// edge: some lie outside it (beyond a row's end, above or below the image, or the block is wider
// than the plane): their plain loads still land in the tensor, on other pixels, and are masked
// off. bounded: some plain load would leave the tensor (a block at the very start or end of it):
// lanes are loaded one by one within it, then masked.
enum class Reads { interior, edge, bounded };

// The taps of one group of the forward: their indices, column shifts and shifts in the flat (H, W)
// plane; [lo, hi], the span of shifts a block reads (its own pixels, shift 0, included); and
// `fetch`, shifts that together touch every cache line a block reads in one channel (per tap row,
// every 64 bytes from its first value read to its last, or each tap's first and last value where
// the taps lie far apart).
constexpr int kMaxFetch = 8 * (kMaxGroup + 1);

struct TapGroup {
  int n = 0, fetches = 0;
  int64_t tap[kMaxGroup] = {}, dy[kMaxGroup] = {}, dx[kMaxGroup] = {}, offset[kMaxGroup] = {};
  int64_t lo = 0, hi = 0;
  int64_t fetch[kMaxFetch] = {};
};

TapGroup tap_group(const ArpGeometry& g, const int64_t* taps, int n, int64_t value_bytes) {
  TapGroup group;
  group.n = n;
  for (int j = 0; j < n; ++j) {
    group.tap[j] = taps[j];
    group.dy[j] = g.dy(taps[j]);
    group.dx[j] = g.dx(taps[j]);
    group.offset[j] = g.dy(taps[j]) * g.W + g.dx(taps[j]);
    group.lo = std::min(group.lo, group.offset[j]);
    group.hi = std::max(group.hi, group.offset[j]);
  }
  const int64_t line = std::max<int64_t>(1, 64 / value_bytes);
  const auto fetch_row = [&](int64_t dy, const int64_t* dx, int count) {
    const int64_t first = *std::min_element(dx, dx + count);
    const int64_t last = *std::max_element(dx, dx + count);
    if (last - first <= 2 * kLanes) {
      for (int64_t x = first; x < last + kLanes - 1; x += line)
        group.fetch[group.fetches++] = dy * g.W + x;
      group.fetch[group.fetches++] = dy * g.W + last + kLanes - 1;
    } else {
      for (int k = 0; k < count; ++k) {
        group.fetch[group.fetches++] = dy * g.W + dx[k];
        group.fetch[group.fetches++] = dy * g.W + dx[k] + kLanes - 1;
      }
    }
  };
  bool centre_row = false;
  for (int j = 0; j < n;) {  // taps come row-major: a row's taps are consecutive
    const int64_t dy = g.dy(group.tap[j]);
    int64_t dx[kMaxGroup + 1] = {};
    int count = 0;
    for (; j < n && g.dy(group.tap[j]) == dy; ++j) dx[count++] = group.dx[j];
    if (!centre_row && dy == 0) dx[count++] = 0, centre_row = true;
    fetch_row(dy, dx, count);
  }
  if (!centre_row) {
    const int64_t zero = 0;
    fetch_row(0, &zero, 1);
  }
  return group;
}

// Whether some plain load of a block would leave a (B, C, H, W) tensor of `numel` elements: the
// block's channel-0 pixel has flat index `index` and it reads shifts [lo, hi] of it.
bool reads_outside(const ArpGeometry& g, int64_t lo, int64_t hi, int64_t index, int64_t numel) {
  return index + lo < 0 || index + (g.C - 1) * g.H * g.W + hi + kLanes > numel;
}

// The pixels of the block at flat index p0 of an (H, W) plane: lanes [0, lanes) lie in it, lane l
// at (y[l], x[l]); inside(g, group, j, l): whether lane l's neighbour at the group's tap j does.
struct Block {
  int64_t p0;
  int lanes;
  int64_t y[kLanes], x[kLanes];

  Block(const ArpGeometry& g, int64_t p0)
      : p0(p0), lanes(int(std::min<int64_t>(kLanes, g.H * g.W))) {
    y[0] = p0 / g.W, x[0] = p0 % g.W;
    for (int l = 1; l < kLanes; ++l) {
      const bool wrap = x[l - 1] + 1 == g.W;
      y[l] = y[l - 1] + wrap, x[l] = wrap ? 0 : x[l - 1] + 1;
    }
  }
  bool inside(const ArpGeometry& g, int64_t dy, int64_t dx, int l) const {
    const int64_t qy = y[l] + dy, qx = x[l] + dx;
    return l < lanes && qy >= 0 && qy < g.H && qx >= 0 && qx < g.W;
  }
  bool inside(const ArpGeometry& g, const TapGroup& group, int j, int l) const {
    return inside(g, group.dy[j], group.dx[j], l);
  }
};

// A geometry's taps [first, last) in groups.
std::vector<TapGroup> tap_groups(const ArpGeometry& g, int64_t first, int64_t last,
                                 int64_t value_bytes) {
  std::vector<int64_t> taps;
  for (int64_t t = first; t < last; ++t) taps.push_back(t);
  std::vector<TapGroup> groups;
  for (int64_t i = 0; i < int64_t(taps.size());) {
    groups.push_back(tap_group(g, taps.data() + i, group_size(taps.size() - i), value_bytes));
    i += groups.back().n;
  }
  return groups;
}

template <Reads kReads, typename scalar_t>
[[gnu::always_inline]] inline void read_lanes(const scalar_t* base, int64_t numel, int64_t index,
                                              Lanes<at::opmath_type<scalar_t>>& v) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (kReads == Reads::bounded)
    load_lanes_within<acc_t>(base, index, numel, v);
  else
    load_lanes<acc_t>(base + index, v);
}

// sums[j] (kLanes) = sum over channels c of feat[c, p] * feat[c, p + offset[j]] for the block's
// pixels p, channel 0's first at flat index `index`. Lanes whose neighbour is outside hold
// garbage (even NaN): the caller stores only the others.
template <typename scalar_t, int NT, Reads kReads>
BUSSEG_SIMD_CLONES void affinity_block(const scalar_t* feat, int64_t numel, int64_t index,
                                       int64_t plane, int64_t C, const TapGroup& group,
                                       at::opmath_type<scalar_t>* sums) {
  using acc_t = at::opmath_type<scalar_t>;
  Lanes<acc_t> acc[NT] = {};
  for (int64_t c = 0; c < C; ++c, index += plane) {
    if (c + kPrefetchChannels < C)
      for (int f = 0; f < group.fetches; ++f)
        __builtin_prefetch(feat + index + kPrefetchChannels * plane + group.fetch[f]);
    Lanes<acc_t> centre, neighbour;
    read_lanes<kReads>(feat, numel, index, centre);
#pragma GCC unroll 9
    for (int j = 0; j < NT; ++j) {
      read_lanes<kReads>(feat, numel, index + group.offset[j], neighbour);
      acc[j] += centre * neighbour;
    }
  }
  for (int j = 0; j < NT; ++j) std::memcpy(sums + j * kLanes, &acc[j], sizeof acc[j]);
}

// The feature gradient's gather runs over strips of kStripBlocks blocks (about two image rows),
// channel by channel: each channel's rows under a strip are read as one short run, which the
// hardware prefetchers follow, before the next channel's (a block at a time over all channels
// crossed a page per channel and load). The strip's coefficients (taps x kLanes per block) stay
// in L1; the strip a few channels ahead is prefetched, as it lies in other pages.
constexpr int64_t kStripBlocks = 8;
constexpr int64_t kStripPrefetchChannels = 2;

// A block of a strip: its first pixel, the lanes inside the plane, how it reads its neighbours.
struct StripBlock {
  int64_t p0;
  int lanes;
  Reads reads;
};

// acc += sum over taps t of coef[t] * src[index + offset[t]] (lanes off in inside[t] take nothing
// from tap t, unless every lane's neighbour is inside).
template <Reads kReads, typename scalar_t>
[[gnu::always_inline]] inline void tap_sum(const scalar_t* src, int64_t numel, int64_t index,
                                           const int64_t* offset, int64_t taps,
                                           const at::opmath_type<scalar_t>* coef,
                                           const MaskLane<at::opmath_type<scalar_t>>* inside,
                                           Lanes<at::opmath_type<scalar_t>>& acc) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t t = 0; t < taps; ++t) {
    Lanes<acc_t> neighbour, c;
    read_lanes<kReads>(src, numel, index + offset[t], neighbour);
    if constexpr (kReads != Reads::interior) {
      LaneMask<acc_t> on;
      std::memcpy(&on, inside + t * kLanes, sizeof on);
      neighbour = on ? neighbour : Lanes<acc_t>{};
    }
    std::memcpy(&c, coef + t * kLanes, sizeof c);
    acc += c * neighbour;
  }
}

// dst[c, p] = sum over taps t of coef[i][t] * src[c, p + offset[t]] for every channel c and the
// pixels p of each block i of a strip (channel 0's plane at flat index `index`; lanes [0, lanes)
// stored). [fetch_lo, fetch_hi): the shifts from `index` that the strip reads in one channel.
template <typename scalar_t>
BUSSEG_SIMD_CLONES void gather_strip(const scalar_t* src, int64_t numel, int64_t index,
                                     int64_t plane, int64_t C, const int64_t* offset, int64_t taps,
                                     const StripBlock* blocks, int64_t n,
                                     const at::opmath_type<scalar_t>* coef,
                                     const MaskLane<at::opmath_type<scalar_t>>* inside,
                                     int64_t fetch_lo, int64_t fetch_hi, scalar_t* dst) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t line = std::max<int64_t>(1, 64 / int64_t(sizeof(scalar_t)));
  for (int64_t c = 0; c < C; ++c, index += plane) {
    if (c + kStripPrefetchChannels < C)
      for (int64_t f = fetch_lo; f < fetch_hi; f += line)
        __builtin_prefetch(src + index + kStripPrefetchChannels * plane + f);
    for (int64_t i = 0; i < n; ++i) {
      const StripBlock& block = blocks[i];
      const acc_t* cf = coef + i * taps * kLanes;
      const MaskLane<acc_t>* on = inside + i * taps * kLanes;
      Lanes<acc_t> acc = {};
      if (block.reads == Reads::interior)
        tap_sum<Reads::interior>(src, numel, index + block.p0, offset, taps, cf, on, acc);
      else if (block.reads == Reads::edge)
        tap_sum<Reads::edge>(src, numel, index + block.p0, offset, taps, cf, on, acc);
      else
        tap_sum<Reads::bounded>(src, numel, index + block.p0, offset, taps, cf, on, acc);
      store_lanes<acc_t>(acc, dst + index + block.p0, block.lanes);
    }
  }
}

// The kernels take float, double, half or bfloat16 tensors (NCHW contiguous, per-tap ones
// (B, taps, H, W)) and compute in the accumulator type (double for double, else float): the
// per-tap buffers are in that type and the narrow inputs are widened as they are read. Row
// r = b * H + y.
template <typename scalar_t>
void arp_forward_kernel(const ArpGeometry& g, const scalar_t* feat, const scalar_t* value,
                        scalar_t* out, scalar_t* weights, double scale, bool valid) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = g.H, W = g.W, taps = g.taps, numel = g.B * g.C * H * W;
  const acc_t outside = valid ? -std::numeric_limits<acc_t>::infinity() : acc_t(0);  // zeros: 0
  // Pass 1: affinities of the taps from the centre on; the others are their mirrors.
  std::vector<acc_t> raw(g.B * taps * H * W);
  const std::vector<TapGroup> groups = tap_groups(g, g.centre(), taps, sizeof(scalar_t));
  const int64_t blocks = block_count(H * W);
  parallel_chunks(g.B * blocks, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sums(kMaxGroup * kLanes);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / blocks;
      const Block block(g, block_start(H * W, unit % blocks));
      const int64_t index = g.plane(b, 0, g.C) + block.p0;
      for (const TapGroup& group : groups) {
        const bool outside = reads_outside(g, group.lo, group.hi, index, numel);
        with_group_size(group.n, [&](auto NT) {
          (outside ? affinity_block<scalar_t, NT, Reads::bounded>
                   : affinity_block<scalar_t, NT, Reads::edge>)(feat, numel, index, H * W, g.C,
                                                                group, sums.data());
        });
        for (int j = 0; j < group.n; ++j) {
          acc_t* row = raw.data() + g.plane(b, group.tap[j], taps) + block.p0;
          for (int l = 0; l < block.lanes; ++l)
            if (block.inside(g, group, j, l)) row[l] = acc_t(scale) * sums[j * kLanes + l];
        }
      }
    }
  });
  // Pass 2: complete the taps from the mirrors, softmax over taps, propagate the values.
  parallel_chunks(g.B * H, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> a(taps * W), amax(W), denom(W), scratch(W);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / H, y = r % H;
      for (int64_t t = 0, x0, x1; t < taps; ++t) {
        acc_t* at = a.data() + t * W;
        std::fill(at, at + W, outside);
        if (!g.columns(y, t, x0, x1)) continue;
        const bool own = t >= g.centre();  // else the neighbour holds it as its mirror tap
        const acc_t* src =
            raw.data() + (own ? g.plane(b, t, taps) + y * W
                              : g.plane(b, g.mirror(t), taps) + (y + g.dy(t)) * W + g.dx(t));
        std::copy(src + x0, src + x1, at + x0);
      }
      std::fill(amax.begin(), amax.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(denom.begin(), denom.end(), acc_t(0));
      for (int64_t t = 0; t < taps; ++t)
        for (int64_t x = 0; x < W; ++x) amax[x] = std::max(amax[x], a[t * W + x]);
      for (int64_t t = 0; t < taps; ++t)
        for (int64_t x = 0; x < W; ++x)
          denom[x] += (a[t * W + x] = std::exp(a[t * W + x] - amax[x]));
      for (int64_t t = 0; t < taps; ++t) {
        scalar_t* w = weights + g.plane(b, t, taps) + y * W;
        for (int64_t x = 0; x < W; ++x) w[x] = scalar_t(a[t * W + x] /= denom[x]);
      }
      for (int64_t k = 0; k < g.K; ++k)
        tap_weighted_row(g, y, a.data(), value + g.plane(b, k, g.K), scratch.data(),
                         out + g.plane(b, k, g.K));
    }
  });
}

template <typename scalar_t>
void arp_backward_kernel(const ArpGeometry& g, const scalar_t* grad_out, const scalar_t* feat,
                         const scalar_t* value, const scalar_t* weights, scalar_t* grad_feat,
                         scalar_t* grad_value, double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = g.H, W = g.W, taps = g.taps, numel = g.B * g.C * H * W;
  // Pass 1: da[p, t] = scale * w (dw - <w, dw>), with dw[p, t] = <grad_out[:, p], value[:, q]>.
  std::vector<acc_t> da;
  if (grad_feat) {
    da.assign(g.B * taps * H * W, acc_t(0));
    parallel_chunks(g.B * H, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> wdw(W);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / H, y = r % H;
        std::fill(wdw.begin(), wdw.end(), acc_t(0));
        for (int64_t t = 0, x0, x1; t < taps; ++t) {
          if (!g.columns(y, t, x0, x1)) continue;
          acc_t* dw = da.data() + g.plane(b, t, taps) + y * W;
          for (int64_t k = 0; k < g.K; ++k) {
            const scalar_t* go = grad_out + g.plane(b, k, g.K) + y * W;
            const scalar_t* v = value + g.plane(b, k, g.K) + (y + g.dy(t)) * W + g.dx(t);
            multiply_add(dw + x0, go + x0, v + x0, x1 - x0);
          }
          multiply_add(wdw.data() + x0, weights + g.plane(b, t, taps) + y * W + x0, dw + x0,
                       x1 - x0);
        }
        for (int64_t t = 0; t < taps; ++t) {
          acc_t* dw = da.data() + g.plane(b, t, taps) + y * W;
          const scalar_t* w = weights + g.plane(b, t, taps) + y * W;
          for (int64_t x = 0; x < W; ++x) dw[x] = acc_t(scale) * acc_t(w[x]) * (dw[x] - wdw[x]);
        }
      }
    });
  }
  // Pass 2: pixel p gathers from each neighbour q = p + d*o with one coefficient, da[p, o]
  // (p as query) plus da[q, -o] (p as key of q), all its taps in one sweep over the features (a
  // strip of blocks at a time); grad_value gathers w[q, -o] * grad_out[q].
  if (grad_feat) {
    std::vector<int64_t> offset(taps);
    for (int64_t t = 0; t < taps; ++t) offset[t] = g.dy(t) * W + g.dx(t);
    const int64_t lo = *std::min_element(offset.begin(), offset.end());
    const int64_t hi = *std::max_element(offset.begin(), offset.end());
    const int64_t blocks = block_count(H * W), strips = (blocks + kStripBlocks - 1) / kStripBlocks;
    parallel_chunks(g.B * strips, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> coef(kStripBlocks * taps * kLanes);
      std::vector<MaskLane<acc_t>> inside(kStripBlocks * taps * kLanes);
      StripBlock strip[kStripBlocks];
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t b = unit / strips, first = (unit % strips) * kStripBlocks;
        const int64_t n = std::min(kStripBlocks, blocks - first);
        const int64_t index = g.plane(b, 0, g.C);
        for (int64_t i = 0; i < n; ++i) {
          const Block block(g, block_start(H * W, first + i));
          bool interior = true;
          for (int64_t t = 0; t < taps; ++t) {
            const acc_t* own = da.data() + g.plane(b, t, taps) + block.p0;
            const acc_t* key = da.data() + g.plane(b, g.mirror(t), taps) + block.p0;
            acc_t* cf = coef.data() + (i * taps + t) * kLanes;
            MaskLane<acc_t>* on = inside.data() + (i * taps + t) * kLanes;
            for (int l = 0; l < kLanes; ++l) {
              const bool in = block.inside(g, g.dy(t), g.dx(t), l);
              cf[l] = in ? own[l] + key[l + offset[t]] : acc_t(0);
              on[l] = in ? -1 : 0;
              interior &= in;
            }
          }
          const bool bounded = reads_outside(g, lo, hi, index + block.p0, numel);
          strip[i] = {block.p0, block.lanes,
                      bounded    ? Reads::bounded
                      : interior ? Reads::interior
                                 : Reads::edge};
        }
        gather_strip<scalar_t>(feat, numel, index, H * W, g.C, offset.data(), taps, strip, n,
                               coef.data(), inside.data(), strip[0].p0 + lo,
                               strip[n - 1].p0 + hi + kLanes, grad_feat);
      }
    });
  }
  if (grad_value)
    parallel_chunks(g.B * H, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch(W);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / H, y = r % H;
        for (int64_t k = 0; k < g.K; ++k)
          accumulate_row(
              W, scratch.data(), grad_value + g.plane(b, k, g.K) + y * W, [&](acc_t* gv) {
                for (int64_t t = 0, x0, x1; t < taps; ++t)
                  if (g.columns(y, t, x0, x1)) {
                    const int64_t shift = (y + g.dy(t)) * W + g.dx(t);
                    multiply_add(gv + x0, weights + g.plane(b, g.mirror(t), taps) + shift + x0,
                                 grad_out + g.plane(b, k, g.K) + shift + x0, x1 - x0);
                  }
              });
      }
    });
}

ArpGeometry geometry(const at::Tensor& feat, const at::Tensor& value, int64_t kernel_size,
                     int64_t dilation) {
  return {feat.size(0), feat.size(1),          value.size(1), feat.size(2),
          feat.size(3), (kernel_size - 1) / 2, dilation,      kernel_size * kernel_size};
}

std::tuple<at::Tensor, at::Tensor> adjacent_relation_propagation_cpu(const at::Tensor& feat,
                                                                     const at::Tensor& value,
                                                                     int64_t kernel_size,
                                                                     int64_t dilation, double scale,
                                                                     bool valid_padding) {
  check_adjacent_relation_propagation_args(feat, value, kernel_size, dilation);
  const ArpGeometry g = geometry(feat, value, kernel_size, dilation);
  const at::Tensor f = feat.contiguous(), v = value.contiguous();
  at::Tensor out = at::empty({g.B, g.K, g.H, g.W}, feat.options());
  at::Tensor weights = at::empty({g.B, g.taps, g.H, g.W}, feat.options());
  if (g.B * g.H * g.W == 0) return {out, weights};  // no pixels (the kernels divide by W)
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, feat.scalar_type(), "adjacent_relation_propagation_cpu", [&] {
        arp_forward_kernel<scalar_t>(g, f.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                                     out.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(), scale,
                                     valid_padding);
      });
  return {out, weights};
}

std::tuple<at::Tensor, at::Tensor> adjacent_relation_propagation_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& feat, const at::Tensor& value,
    const at::Tensor& weights, int64_t kernel_size, int64_t dilation, double scale,
    bool valid_padding, bool need_grad_feat, bool need_grad_value) {
  (void)valid_padding;  // encoded in `weights` (zero for excluded taps)
  check_adjacent_relation_propagation_backward_args(grad_out, feat, value, weights, kernel_size,
                                                    dilation);
  const ArpGeometry g = geometry(feat, value, kernel_size, dilation);
  const at::Tensor f = feat.contiguous(), v = value.contiguous();
  const at::Tensor go = grad_out.contiguous(), w = weights.contiguous();
  at::Tensor grad_feat = need_grad_feat ? empty_on_huge_pages({g.B, g.C, g.H, g.W}, feat.options())
                                        : at::empty({0}, feat.options());
  at::Tensor grad_value = need_grad_value ? at::empty({g.B, g.K, g.H, g.W}, value.options())
                                          : at::empty({0}, value.options());
  if (g.B * g.H * g.W == 0) return {grad_feat, grad_value};  // no pixels: empty gradients
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, feat.scalar_type(), "adjacent_relation_propagation_backward_cpu",
      [&] {
        arp_backward_kernel<scalar_t>(
            g, go.data_ptr<scalar_t>(), f.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
            w.data_ptr<scalar_t>(), need_grad_feat ? grad_feat.data_ptr<scalar_t>() : nullptr,
            need_grad_value ? grad_value.data_ptr<scalar_t>() : nullptr, scale);
      });
  return {grad_feat, grad_value};
}

}  // namespace

TORCH_LIBRARY_IMPL(busseg, CPU, m) {
  m.impl("adjacent_relation_propagation", &adjacent_relation_propagation_cpu);
  m.impl("adjacent_relation_propagation_backward", &adjacent_relation_propagation_backward_cpu);
}

}  // namespace busseg
