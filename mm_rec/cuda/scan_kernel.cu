// Single-pass log-space scan h_t = exp(clamp(log_a_t)) * h_{t-1} + b_t with decoupled look-back,
// forward and backward (interface and layout: scan_kernel.h; reference: mm_rec/ops/scan/reference.py).
//
// Work split. A block owns one tile: kTileC = 128 channels of one batch row (a warp's 32 lanes
// times 4 channels each, so each row of the tile is one 512-byte (fp32) or 256-byte (bf16)
// coalesced access) and kChunk = kWarps * kSteps consecutive time steps (warp w holds steps
// w*kSteps .. w*kSteps+kSteps-1 of the chunk in registers). The inputs are read once and h written
// once: each warp reduces its steps to an aggregate (P, S) with h_out = P h_in + S (P the product
// of the decays, S the state from a zero start; every exponent <= 0, no cumulative log is ever
// subtracted), the block composes its warps' aggregates, and warp 0 finds the state entering the
// chunk by decoupled look-back (Merrill & Garland, 2016) over the tiles of earlier chunks: it
// publishes the chunk's aggregate at once (flag 1), walks back composing aggregates until it meets
// a published inclusive prefix (flag 2), and publishes its own. Blocks take their tile from an
// atomic counter in launch order, so a block only ever waits on blocks that are already running.
//
// Backward, the same scan run from the last step to the first on the carry x (x = a_{t+1} g_{t+1}):
//     g_t = dh_t + x,   x <- a_t g_t,   db_t = g_t,   d log_a_t = x h_{t-1} (0 where clamped),
// i.e. x <- a_t x + a_t dh_t, starting from x = d final_state; dh0 = x after step 0.
#include "scan_kernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

namespace mmrec_cuda {
namespace {

// Launch shape; the defaults are the best of `benchmarks/bench_scan.py --cuda-variants` on an H200
// (the macros exist for that sweep).
#ifndef MMREC_SCAN_WARPS
#define MMREC_SCAN_WARPS 8
#endif
#ifndef MMREC_SCAN_STEPS
#define MMREC_SCAN_STEPS 8
#endif
#ifndef MMREC_SCAN_MIN_BLOCKS
#define MMREC_SCAN_MIN_BLOCKS 1
#endif
constexpr int kWarps = MMREC_SCAN_WARPS;  // time slices per block
constexpr int kSteps = MMREC_SCAN_STEPS;  // time steps per warp (held in registers)
constexpr int kMinBlocks = MMREC_SCAN_MIN_BLOCKS;  // blocks per multiprocessor the registers must allow
constexpr int kChunk = kWarps * kSteps;  // time steps per block
constexpr int kLanes = 32;
constexpr int kVec = 4;                  // channels per lane
constexpr int kTileC = kLanes * kVec;    // channels per block
constexpr int kThreads = kWarps * kLanes;
constexpr int kAggregate = 1, kInclusive = 2;  // tile flags

struct Plan {
    int64_t tiles_per_row, n_tiles, n_chunks;
};

Plan make_plan(int64_t B, int64_t T, int64_t D) {
    Plan p;
    p.tiles_per_row = (D + kTileC - 1) / kTileC;
    p.n_tiles = B * p.tiles_per_row;
    p.n_chunks = (T + kChunk - 1) / kChunk;
    return p;
}

// ------------------------------------------------------------------ element access
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

__device__ __forceinline__ float2 unpack2(unsigned bits, __nv_bfloat16*) {
    __nv_bfloat162 v = *reinterpret_cast<__nv_bfloat162*>(&bits);
    return __bfloat1622float2(v);
}
__device__ __forceinline__ float2 unpack2(unsigned bits, __half*) {
    __half2 v = *reinterpret_cast<__half2*>(&bits);
    return __half22float2(v);
}
__device__ __forceinline__ unsigned pack2(float a, float b, __nv_bfloat16*) {
    __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<unsigned*>(&v);
}
__device__ __forceinline__ unsigned pack2(float a, float b, __half*) {
    __half2 v = __floats2half2_rn(a, b);
    return *reinterpret_cast<unsigned*>(&v);
}

// Four consecutive channels at p (aligned to 4 elements), streamed (evict-first).
template <typename T>
__device__ __forceinline__ void load4_vec(const T* p, float v[kVec]) {
    if constexpr (std::is_same_v<T, float>) {
        const float4 q = __ldcs(reinterpret_cast<const float4*>(p));
        v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
    } else {
        const uint2 q = __ldcs(reinterpret_cast<const uint2*>(p));
        const float2 lo = unpack2(q.x, static_cast<T*>(nullptr)), hi = unpack2(q.y, static_cast<T*>(nullptr));
        v[0] = lo.x; v[1] = lo.y; v[2] = hi.x; v[3] = hi.y;
    }
}

template <typename T>
__device__ __forceinline__ void store4_vec(T* p, const float v[kVec]) {
    if constexpr (std::is_same_v<T, float>) {
        __stcs(reinterpret_cast<float4*>(p), make_float4(v[0], v[1], v[2], v[3]));
    } else {
        uint2 q;
        q.x = pack2(v[0], v[1], static_cast<T*>(nullptr));
        q.y = pack2(v[2], v[3], static_cast<T*>(nullptr));
        __stcs(reinterpret_cast<uint2*>(p), q);
    }
}

// Channels d0..d0+3 of a contiguous row at p (element d0 at p[0]); `VEC` when D % 4 == 0 and the
// row is 4-element aligned, else element by element with the channels >= D given `fill`.
template <typename T, bool VEC>
__device__ __forceinline__ void load_row(const T* p, int64_t valid, float fill, float v[kVec]) {
    if constexpr (VEC) {
        if (valid > 0) {
            load4_vec(p, v);
        } else {
#pragma unroll
            for (int j = 0; j < kVec; ++j) v[j] = fill;
        }
    } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) v[j] = j < valid ? to_float(p[j]) : fill;
    }
}

template <typename T, bool VEC>
__device__ __forceinline__ void store_row(T* p, int64_t valid, const float v[kVec]) {
    if constexpr (VEC) {
        if (valid > 0) store4_vec(p, v);
    } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j)
            if (j < valid) p[j] = from_float<T>(v[j]);
    }
}

// log_a of channels d0..d0+3 at (batch, t), through the view's strides; 0 (a = 1) for d >= D.
template <typename TA>
__device__ __forceinline__ void load_log_a(const LogAView& la, bool vec, int64_t batch, int64_t t, int64_t d0,
                                           int64_t valid, float v[kVec]) {
    const TA* base = static_cast<const TA*>(la.data) + batch * la.stride_batch + t * la.stride_time;
    if (vec) {  // contiguous channels, 4-aligned (checked on the host)
        if (valid > 0) {
            load4_vec(base + d0, v);
        } else {
#pragma unroll
            for (int j = 0; j < kVec; ++j) v[j] = 0.f;
        }
        return;
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
        const int64_t d = d0 + j;
        v[j] = j < valid ? to_float(base[(d / la.channel_inner) * la.stride_outer +
                                         (d % la.channel_inner) * la.stride_inner])
                         : 0.f;
    }
}

__device__ __forceinline__ float clamp_log(float x, float lo, float hi) { return fminf(fmaxf(x, lo), hi); }

// ------------------------------------------------------------------ look-back
// Tile status of (processing index k, tile): flag ints[k * n_tiles + tile]; aggregate P, S and
// inclusive prefix H at floats[{0,1,2} * n_slots * kTileC + (k * n_tiles + tile) * kTileC + c].
struct Status {
    int* flags;
    float* P;
    float* S;
    float* H;
    int64_t n_tiles;
};

__device__ __forceinline__ Status make_status(const Workspace& ws, const Plan& plan) {
    const int64_t n_slots = plan.n_tiles * plan.n_chunks;
    Status st;
    st.flags = ws.ints;
    st.P = ws.floats;
    st.S = ws.floats + n_slots * kTileC;
    st.H = ws.floats + 2 * n_slots * kTileC;
    st.n_tiles = plan.n_tiles;
    return st;
}

__device__ __forceinline__ void store_status4(float* p, const float v[kVec]) {
    __stcg(reinterpret_cast<float4*>(p), make_float4(v[0], v[1], v[2], v[3]));
}
__device__ __forceinline__ void load_status4(const float* p, float v[kVec]) {
    const float4 q = __ldcg(reinterpret_cast<const float4*>(p));
    v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
}

// Called by one whole warp: publish `flag` for slot after the lanes' data writes.
__device__ __forceinline__ void publish(int* flag_ptr, int flag, int lane) {
    __threadfence();
    __syncwarp();
    if (lane == 0) atomicExch(flag_ptr, flag);
}

// Warp 0 of block `k` (processing order, k >= 1): the state entering the block, composed from the
// published aggregates of blocks k-1, k-2, ... until an inclusive prefix is found.
__device__ __forceinline__ void look_back(const Status& st, int64_t k, int64_t tile, int lane, float in[kVec]) {
    float accP[kVec], accS[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) { accP[j] = 1.f; accS[j] = 0.f; }
    for (int64_t k2 = k - 1;; --k2) {
        const int64_t slot = k2 * st.n_tiles + tile;
        int flag = 0;
        if (lane == 0) {
            const volatile int* f = st.flags + slot;
            while ((flag = *f) == 0) __nanosleep(20);
        }
        flag = __shfl_sync(0xffffffffu, flag, 0);
        __threadfence();
        const int64_t at = slot * kTileC + lane * kVec;
        if (flag == kInclusive) {
            float H[kVec];
            load_status4(st.H + at, H);
#pragma unroll
            for (int j = 0; j < kVec; ++j) in[j] = fmaf(accP[j], H[j], accS[j]);
            return;
        }
        float P[kVec], S[kVec];
        load_status4(st.P + at, P);
        load_status4(st.S + at, S);
#pragma unroll
        for (int j = 0; j < kVec; ++j) {  // (chunks after k2) o (chunk k2)
            accS[j] = fmaf(accP[j], S[j], accS[j]);
            accP[j] *= P[j];
        }
    }
}

// The block's part after each warp has its aggregate in sP/sS: warp 0 composes the warps in
// processing order (`order(i)` is the warp processed i-th), finds the entering state (`first`
// for k == 0, else by look-back), publishes the block's prefix and leaves the entering state of
// every warp in s_in. Returns after a __syncthreads.
template <typename Order>
__device__ __forceinline__ void block_prefix(const Status& st, int64_t k, int64_t tile, bool publish_inclusive,
                                             const float4 (*sP)[kLanes], const float4 (*sS)[kLanes],
                                             float4 (*s_in)[kLanes], const float first[kVec], Order order) {
    const int warp = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
    if (warp == 0) {
        float P[kVec], S[kVec];
#pragma unroll
        for (int j = 0; j < kVec; ++j) { P[j] = 1.f; S[j] = 0.f; }
#pragma unroll
        for (int i = 0; i < kWarps; ++i) {
            const float4 p = sP[order(i)][lane], s = sS[order(i)][lane];
            const float pv[kVec] = {p.x, p.y, p.z, p.w}, sv[kVec] = {s.x, s.y, s.z, s.w};
#pragma unroll
            for (int j = 0; j < kVec; ++j) {
                S[j] = fmaf(pv[j], S[j], sv[j]);
                P[j] *= pv[j];
            }
        }
        const int64_t slot = k * st.n_tiles + tile;
        const int64_t at = slot * kTileC + lane * kVec;
        float in[kVec];
        if (k == 0) {
#pragma unroll
            for (int j = 0; j < kVec; ++j) in[j] = first[j];
        } else {
            store_status4(st.P + at, P);
            store_status4(st.S + at, S);
            publish(st.flags + slot, kAggregate, lane);
            look_back(st, k, tile, lane, in);
        }
        if (publish_inclusive) {
            float H[kVec];
#pragma unroll
            for (int j = 0; j < kVec; ++j) H[j] = fmaf(P[j], in[j], S[j]);
            store_status4(st.H + at, H);
            publish(st.flags + slot, kInclusive, lane);
        }
        // Entering state of each warp, in processing order.
#pragma unroll
        for (int i = 0; i < kWarps; ++i) {
            s_in[order(i)][lane] = make_float4(in[0], in[1], in[2], in[3]);
            const float4 p = sP[order(i)][lane], s = sS[order(i)][lane];
            in[0] = fmaf(p.x, in[0], s.x);
            in[1] = fmaf(p.y, in[1], s.y);
            in[2] = fmaf(p.z, in[2], s.z);
            in[3] = fmaf(p.w, in[3], s.w);
        }
    }
    __syncthreads();
}

struct Forward {
    __device__ int operator()(int i) const { return i; }
};
struct Backward {
    __device__ int operator()(int i) const { return kWarps - 1 - i; }
};

struct TileCoord {
    int64_t k, tile, batch, d0;  // chunk in scan order, tile, batch row, this lane's first channel
};

// The kernels' common prologue: the block's work item, taken from the workspace counter in launch
// order (so a block only ever waits on blocks that are already running).
__device__ __forceinline__ TileCoord claim_tile(const Workspace& ws, const Plan& plan, int lane) {
    __shared__ int s_block;
    int* counter = ws.ints + plan.n_tiles * plan.n_chunks;
    if (threadIdx.x == 0) s_block = atomicAdd(counter, 1);
    __syncthreads();
    const int64_t k = s_block / plan.n_tiles, tile = s_block % plan.n_tiles;
    return {k, tile, tile / plan.tiles_per_row, (tile % plan.tiles_per_row) * kTileC + lane * kVec};
}

__device__ __forceinline__ void load_state(const float* p, int64_t valid, float v[kVec]) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) v[j] = (p != nullptr && j < valid) ? p[j] : 0.f;
}

// ------------------------------------------------------------------ kernels
template <typename TA, typename TB, bool VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocks) scan_fwd_kernel(ScanFwdArgs args, Workspace ws, Plan plan, bool la_vec) {
    __shared__ float4 sP[kWarps][kLanes], sS[kWarps][kLanes], s_in[kWarps][kLanes];
    const int warp = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
    const TileCoord c = claim_tile(ws, plan, lane);
    const int64_t k = c.k, tile = c.tile, batch = c.batch, d0 = c.d0;  // k = chunk
    const ScanShape& sh = args.shape;
    const int64_t valid = sh.D - d0;
    const int64_t t0 = k * kChunk + warp * kSteps;
    const TB* b = static_cast<const TB*>(args.b) + (batch * sh.T) * sh.D + d0;

    float a[kSteps][kVec], x[kSteps][kVec];
#pragma unroll
    for (int r = 0; r < kSteps; ++r) {
        const int64_t t = t0 + r;
        if (t < sh.T) {
            load_log_a<TA>(args.log_a, la_vec, batch, t, d0, valid, a[r]);
            load_row<TB, VEC>(b + t * sh.D, valid, 0.f, x[r]);
        } else {
#pragma unroll
            for (int j = 0; j < kVec; ++j) { a[r][j] = 0.f; x[r][j] = 0.f; }
        }
    }
    float P[kVec], S[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) { P[j] = 1.f; S[j] = 0.f; }
#pragma unroll
    for (int r = 0; r < kSteps; ++r) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
            a[r][j] = expf(clamp_log(a[r][j], sh.clamp_min, sh.clamp_max));
            S[j] = fmaf(a[r][j], S[j], x[r][j]);
            P[j] *= a[r][j];
        }
    }
    sP[warp][lane] = make_float4(P[0], P[1], P[2], P[3]);
    sS[warp][lane] = make_float4(S[0], S[1], S[2], S[3]);
    __syncthreads();

    float first[kVec];  // h0 (read by the first chunk only)
    load_state(k == 0 && args.h0 != nullptr ? args.h0 + batch * sh.D + d0 : nullptr, valid, first);
    block_prefix(make_status(ws, plan), k, tile, k + 1 < plan.n_chunks, sP, sS, s_in, first, Forward{});

    const float4 in = s_in[warp][lane];
    float h[kVec] = {in.x, in.y, in.z, in.w};
    TB* out = static_cast<TB*>(args.h) + (batch * sh.T) * sh.D + d0;
#pragma unroll
    for (int r = 0; r < kSteps; ++r) {
        const int64_t t = t0 + r;
#pragma unroll
        for (int j = 0; j < kVec; ++j) h[j] = fmaf(a[r][j], h[j], x[r][j]);
        if (t < sh.T) store_row<TB, VEC>(out + t * sh.D, valid, h);
        if (t == sh.T - 1) {
#pragma unroll
            for (int j = 0; j < kVec; ++j)
                if (j < valid) args.final_state[batch * sh.D + d0 + j] = h[j];
        }
    }
}

template <typename TA, typename TB, bool VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocks) scan_bwd_kernel(ScanBwdArgs args, Workspace ws, Plan plan, bool la_vec) {
    __shared__ float4 sP[kWarps][kLanes], sS[kWarps][kLanes], s_in[kWarps][kLanes];
    const int warp = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
    const TileCoord c = claim_tile(ws, plan, lane);
    const int64_t k = c.k, tile = c.tile, batch = c.batch, d0 = c.d0;  // k: chunks from the end
    const int64_t chunk = plan.n_chunks - 1 - k;
    const ScanShape& sh = args.shape;
    const int64_t valid = sh.D - d0;
    const int64_t t0 = chunk * kChunk + warp * kSteps;
    const int64_t row0 = (batch * sh.T) * sh.D + d0;
    const TB* dh = static_cast<const TB*>(args.dh) + row0;
    const TB* h = static_cast<const TB*>(args.h) + row0;
    const float* h0 = args.h0 != nullptr ? args.h0 + batch * sh.D + d0 : nullptr;

    float la[kSteps][kVec], g[kSteps][kVec], hp[kSteps][kVec];  // log_a, dh, h_{t-1}
#pragma unroll
    for (int r = 0; r < kSteps; ++r) {
        const int64_t t = t0 + r;
        if (t < sh.T) {
            load_log_a<TA>(args.log_a, la_vec, batch, t, d0, valid, la[r]);
            load_row<TB, VEC>(dh + t * sh.D, valid, 0.f, g[r]);
            if (t > 0) {
                load_row<TB, VEC>(h + (t - 1) * sh.D, valid, 0.f, hp[r]);
            } else {
                load_state(h0, valid, hp[r]);
            }
        } else {
#pragma unroll
            for (int j = 0; j < kVec; ++j) { la[r][j] = 0.f; g[r][j] = 0.f; hp[r][j] = 0.f; }
        }
    }
    float P[kVec], S[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) { P[j] = 1.f; S[j] = 0.f; }
#pragma unroll
    for (int r = kSteps - 1; r >= 0; --r) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
            const float a = expf(clamp_log(la[r][j], sh.clamp_min, sh.clamp_max));
            S[j] = a * (S[j] + g[r][j]);
            P[j] *= a;
        }
    }
    sP[warp][lane] = make_float4(P[0], P[1], P[2], P[3]);
    sS[warp][lane] = make_float4(S[0], S[1], S[2], S[3]);
    __syncthreads();

    float first[kVec];  // d final_state (read by the last chunk only)
    load_state(k == 0 && args.d_final != nullptr ? args.d_final + batch * sh.D + d0 : nullptr, valid, first);
    block_prefix(make_status(ws, plan), k, tile, k + 1 < plan.n_chunks, sP, sS, s_in, first, Backward{});

    const float4 in = s_in[warp][lane];
    float carry[kVec] = {in.x, in.y, in.z, in.w};
    TB* db = static_cast<TB*>(args.db) + row0;
    TA* dla = static_cast<TA*>(args.d_log_a) + row0;
#pragma unroll
    for (int r = kSteps - 1; r >= 0; --r) {
        const int64_t t = t0 + r;
        float dlog[kVec];
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
            const float l = la[r][j];
            const float a = expf(clamp_log(l, sh.clamp_min, sh.clamp_max));
            g[r][j] += carry[j];         // g_t = dh_t + a_{t+1} g_{t+1}
            carry[j] = a * g[r][j];      // a_t g_t
            // clamp's gradient: passed where clamp_min <= log_a <= clamp_max, as torch.clamp's
            dlog[j] = (l >= sh.clamp_min && l <= sh.clamp_max) ? carry[j] * hp[r][j] : 0.f;
        }
        if (t < sh.T) {
            store_row<TB, VEC>(db + t * sh.D, valid, g[r]);
            store_row<TA, VEC>(dla + t * sh.D, valid, dlog);
        }
        if (t == 0) {
#pragma unroll
            for (int j = 0; j < kVec; ++j)
                if (j < valid) args.dh0[batch * sh.D + d0 + j] = carry[j];
        }
    }
}

// ------------------------------------------------------------------ dispatch
bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

bool log_a_vectorizable(const LogAView& la, int64_t D) {
    const int elem = la.dtype == DType::kFloat32 ? 4 : 2;
    return la.channel_inner == D && la.stride_inner == 1 && la.stride_time % 4 == 0 && la.stride_batch % 4 == 0 &&
           reinterpret_cast<uintptr_t>(la.data) % (4 * elem) == 0;
}

template <typename TA, typename TB, typename Args>
cudaError_t launch(const Args& args, const Workspace& ws, cudaStream_t stream, bool vec, bool la_vec, bool forward) {
    const Plan plan = make_plan(args.shape.B, args.shape.T, args.shape.D);
    const int64_t blocks = plan.n_tiles * plan.n_chunks;
    if (blocks <= 0) return cudaSuccess;
    if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
    if constexpr (std::is_same_v<Args, ScanFwdArgs>) {
        if (vec) scan_fwd_kernel<TA, TB, true><<<blocks, kThreads, 0, stream>>>(args, ws, plan, la_vec);
        else scan_fwd_kernel<TA, TB, false><<<blocks, kThreads, 0, stream>>>(args, ws, plan, la_vec);
    } else {
        if (vec) scan_bwd_kernel<TA, TB, true><<<blocks, kThreads, 0, stream>>>(args, ws, plan, la_vec);
        else scan_bwd_kernel<TA, TB, false><<<blocks, kThreads, 0, stream>>>(args, ws, plan, la_vec);
    }
    (void)forward;
    return cudaGetLastError();
}

// The dtype pairs built: log_a fp32 with any b, or log_a in b's dtype.
template <typename Args>
cudaError_t dispatch(const Args& args, DType b_dtype, const Workspace& ws, cudaStream_t stream, bool vec) {
    const bool la_vec = vec && log_a_vectorizable(args.log_a, args.shape.D);
    const DType la = args.log_a.dtype;
    const bool fwd = std::is_same_v<Args, ScanFwdArgs>;
    if (la == DType::kFloat32) {
        switch (b_dtype) {
            case DType::kFloat32: return launch<float, float>(args, ws, stream, vec, la_vec, fwd);
            case DType::kBFloat16: return launch<float, __nv_bfloat16>(args, ws, stream, vec, la_vec, fwd);
            case DType::kFloat16: return launch<float, __half>(args, ws, stream, vec, la_vec, fwd);
        }
    } else if (la == b_dtype) {
        if (la == DType::kBFloat16) return launch<__nv_bfloat16, __nv_bfloat16>(args, ws, stream, vec, la_vec, fwd);
        return launch<__half, __half>(args, ws, stream, vec, la_vec, fwd);
    }
    return cudaErrorInvalidValue;
}

}  // namespace

size_t workspace_ints(int64_t B, int64_t T, int64_t D) {
    const Plan p = make_plan(B, T, D);
    return static_cast<size_t>(p.n_tiles * p.n_chunks) + 1;  // flags + the block counter
}

size_t workspace_floats(int64_t B, int64_t T, int64_t D) {
    const Plan p = make_plan(B, T, D);
    return static_cast<size_t>(3 * p.n_tiles * p.n_chunks * kTileC);
}

cudaError_t scan_forward(const ScanFwdArgs& args, const Workspace& ws, cudaStream_t stream) {
    const bool vec = args.shape.D % kVec == 0 && aligned16(args.b) && aligned16(args.h);
    return dispatch(args, args.b_dtype, ws, stream, vec);
}

cudaError_t scan_backward(const ScanBwdArgs& args, const Workspace& ws, cudaStream_t stream) {
    const bool vec = args.shape.D % kVec == 0 && aligned16(args.dh) && aligned16(args.h) && aligned16(args.db) &&
                     aligned16(args.d_log_a);
    return dispatch(args, args.h_dtype, ws, stream, vec);
}

}  // namespace mmrec_cuda
