// Single-pass log-space scan h_t = exp(clamp(log_a_t)) * h_{t-1} + b_t with decoupled look-back,
// forward and backward (interface and layout: scan_kernel.h; reference: mm_rec/ops/scan/reference.py).
//
// Work split. A block owns one tile: kTileC = 128 channels of one batch row (a warp's 32 lanes
// times 4 channels each, so each row of the tile is one 512-byte (fp32) or 256-byte (bf16)
// coalesced access) and kChunk = kWarps * kSteps consecutive time steps (warp w owns steps
// w*kSteps .. w*kSteps+kSteps-1 of the chunk). The inputs are read once and h written once: each
// lane copies its elements of the chunk to shared memory with cp.async (all of a warp's loads in
// flight at once, none holding a register, so that a multiprocessor keeps the loads of several
// blocks in flight while others look back or store; on 2026-12-07 the same kernel holding them in
// registers, 164 a thread, ran one block per multiprocessor at a third of the copy bandwidth),
// then reads them back twice: each warp reduces its steps to an aggregate (P, S) with
// h_out = P h_in + S (P the product
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

#include <atomic>
#include <type_traits>

namespace mmrec_cuda {
namespace {

// Launch shape (the macros exist for `benchmarks/bench_scan.py --cuda-variants`). The default: 8 warps of
// 8 steps, and registers capped for 4 blocks a multiprocessor, as many as the forward's staged inputs
// (48 KB with fp32 log_a and bf16 b, + 8 KB of aggregates) fit in 228 KB of shared memory.
#ifndef MMREC_SCAN_WARPS
#define MMREC_SCAN_WARPS 8
#endif
#ifndef MMREC_SCAN_STEPS
#define MMREC_SCAN_STEPS 8
#endif
#ifndef MMREC_SCAN_MIN_BLOCKS
#define MMREC_SCAN_MIN_BLOCKS 4
#endif
constexpr int kWarps = MMREC_SCAN_WARPS;  // time slices per block
constexpr int kSteps = MMREC_SCAN_STEPS;  // time steps per warp (staged in shared memory)
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
        // Entering state of each warp, in processing order (s_in may be sS: each entry is read first).
#pragma unroll
        for (int i = 0; i < kWarps; ++i) {
            const float4 p = sP[order(i)][lane], s = sS[order(i)][lane];
            s_in[order(i)][lane] = make_float4(in[0], in[1], in[2], in[3]);
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

// ------------------------------------------------------------------ staging
// The block's inputs are copied to shared memory with cp.async (no registers hold them in flight, so a
// multiprocessor keeps several blocks' loads in flight while others look back or store); the block then
// reads them twice from there: once for its warps' aggregates, once to write h (or the gradients).
__device__ __forceinline__ void cp_async(void* smem, const void* gmem, int bytes) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    if (bytes == 16) {
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
    } else {
        asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(s), "l"(gmem) : "memory");
    }
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// Stage channels d0..d0+3 of the contiguous row at g (element d0 at g[0]) into s; channels >= D as 0.
template <typename T, bool VEC>
__device__ __forceinline__ void stage_row(T* s, const T* g, int64_t valid) {
    if constexpr (VEC) {  // 4 elements, 16- or 8-byte aligned (checked on the host)
        if (valid > 0) {
            cp_async(s, g, 4 * sizeof(T));
            return;
        }
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) s[j] = j < valid ? g[j] : from_float<T>(0.f);
}

// log_a of channels d0..d0+3 at (batch, t) through the view's strides; 0 (a = 1) for d >= D.
template <typename TA, bool LA_VEC>
__device__ __forceinline__ void stage_log_a(TA* s, const LogAView& la, int64_t batch, int64_t t, int64_t d0,
                                            int64_t valid) {
    const TA* base = static_cast<const TA*>(la.data) + batch * la.stride_batch + t * la.stride_time;
    if constexpr (LA_VEC) {  // contiguous channels, 4-aligned (checked on the host)
        stage_row<TA, true>(s, base + d0, valid);
    } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
            const int64_t d = d0 + j;
            s[j] = j < valid ? base[(d / la.channel_inner) * la.stride_outer + (d % la.channel_inner) * la.stride_inner]
                             : from_float<TA>(0.f);
        }
    }
}

template <typename T>
__device__ __forceinline__ void read4(const T* s, float v[kVec]) {  // four staged elements, widened
    if constexpr (std::is_same_v<T, float>) {
        const float4 q = *reinterpret_cast<const float4*>(s);
        v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
    } else {
        const uint2 q = *reinterpret_cast<const uint2*>(s);
        const float2 lo = unpack2(q.x, static_cast<T*>(nullptr)), hi = unpack2(q.y, static_cast<T*>(nullptr));
        v[0] = lo.x; v[1] = lo.y; v[2] = hi.x; v[3] = hi.y;
    }
}

// Bytes of a block's staged inputs: one [kChunk, kTileC] array per type in T (warp w stages rows
// w*kSteps .. w*kSteps+kSteps-1; each lane reads back only the elements it staged).
template <typename... T>
__host__ __device__ constexpr size_t staged_bytes() { return static_cast<size_t>(kChunk) * kTileC * (sizeof(T) + ...); }

// ------------------------------------------------------------------ kernels
template <typename TA, typename TB, bool VEC, bool LA_VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocks) scan_fwd_kernel(ScanFwdArgs args, Workspace ws, Plan plan) {
    __shared__ float4 sP[kWarps][kLanes], sS[kWarps][kLanes];  // the warps' aggregates, then (sS) entering states
    extern __shared__ __align__(16) unsigned char staged[];
    TA* s_la = reinterpret_cast<TA*>(staged);                                    // [kChunk, kTileC]
    TB* s_b = reinterpret_cast<TB*>(staged + staged_bytes<TA>());                // [kChunk, kTileC]
    const int warp = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
    const TileCoord c = claim_tile(ws, plan, lane);
    const int64_t k = c.k, tile = c.tile, batch = c.batch, d0 = c.d0;  // k = chunk
    const ScanShape& sh = args.shape;
    const int64_t valid = sh.D - d0;
    const int64_t t0 = k * kChunk + warp * kSteps;
    const TB* b = static_cast<const TB*>(args.b) + (batch * sh.T) * sh.D + d0;
    const int at0 = (warp * kSteps) * kTileC + lane * kVec;  // this lane's first staged element

    // every load of the warp's rows issued at once (cp.async does not wait: the loop need not unroll, and
    // rolled it keeps few address registers); rows past T stage a = 1, b = 0
#pragma unroll 1
    for (int r = 0; r < kSteps; ++r) {
        const int64_t t = t0 + r;
        const int at = at0 + r * kTileC;
        stage_log_a<TA, LA_VEC>(s_la + at, args.log_a, batch, t < sh.T ? t : 0, d0, t < sh.T ? valid : 0);
        stage_row<TB, VEC>(s_b + at, b + (t < sh.T ? t : 0) * sh.D, t < sh.T ? valid : 0);
    }
    cp_async_wait_all();
    __syncwarp();  // each warp reads back only the rows its own lanes staged

    float P[kVec], S[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) { P[j] = 1.f; S[j] = 0.f; }
#pragma unroll
    for (int r = 0; r < kSteps; ++r) {
        float a[kVec], x[kVec];
        read4(s_la + at0 + r * kTileC, a);
        read4(s_b + at0 + r * kTileC, x);
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
            a[j] = expf(clamp_log(a[j], sh.clamp_min, sh.clamp_max));
            S[j] = fmaf(a[j], S[j], x[j]);
            P[j] *= a[j];
        }
    }
    sP[warp][lane] = make_float4(P[0], P[1], P[2], P[3]);
    sS[warp][lane] = make_float4(S[0], S[1], S[2], S[3]);
    __syncthreads();

    float first[kVec];  // h0 (read by the first chunk only)
    load_state(k == 0 && args.h0 != nullptr ? args.h0 + batch * sh.D + d0 : nullptr, valid, first);
    block_prefix(make_status(ws, plan), k, tile, k + 1 < plan.n_chunks, sP, sS, sS, first, Forward{});

    const float4 in = sS[warp][lane];
    float h[kVec] = {in.x, in.y, in.z, in.w};
    TB* out = static_cast<TB*>(args.h) + (batch * sh.T) * sh.D + d0;
#pragma unroll
    for (int r = 0; r < kSteps; ++r) {
        const int64_t t = t0 + r;
        float a[kVec], x[kVec];
        read4(s_la + at0 + r * kTileC, a);
        read4(s_b + at0 + r * kTileC, x);
#pragma unroll
        for (int j = 0; j < kVec; ++j) h[j] = fmaf(expf(clamp_log(a[j], sh.clamp_min, sh.clamp_max)), h[j], x[j]);
        if (t < sh.T) store_row<TB, VEC>(out + t * sh.D, valid, h);
        if (t == sh.T - 1) {
#pragma unroll
            for (int j = 0; j < kVec; ++j)
                if (j < valid) args.final_state[batch * sh.D + d0 + j] = h[j];
        }
    }
}

template <typename TA, typename TB, bool VEC, bool LA_VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocks) scan_bwd_kernel(ScanBwdArgs args, Workspace ws, Plan plan) {
    __shared__ float4 sP[kWarps][kLanes], sS[kWarps][kLanes];  // the warps' aggregates, then (sS) entering states
    extern __shared__ __align__(16) unsigned char staged[];
    TA* s_la = reinterpret_cast<TA*>(staged);                                          // log_a_t
    TB* s_dh = reinterpret_cast<TB*>(staged + staged_bytes<TA>());                     // dh_t
    TB* s_hp = reinterpret_cast<TB*>(staged + staged_bytes<TA, TB>());                 // h_{t-1} (t >= 1)
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
    const int at0 = (warp * kSteps) * kTileC + lane * kVec;

#pragma unroll 1
    for (int r = 0; r < kSteps; ++r) {
        const int64_t t = t0 + r;
        const int at = at0 + r * kTileC;
        const bool in_range = t < sh.T;
        stage_log_a<TA, LA_VEC>(s_la + at, args.log_a, batch, in_range ? t : 0, d0, in_range ? valid : 0);
        stage_row<TB, VEC>(s_dh + at, dh + (in_range ? t : 0) * sh.D, in_range ? valid : 0);
        // h_{t-1}; at t = 0 it is h0 (fp32, read in the second pass), staged as nothing
        stage_row<TB, VEC>(s_hp + at, h + (in_range && t > 0 ? t - 1 : 0) * sh.D, in_range && t > 0 ? valid : 0);
    }
    cp_async_wait_all();
    __syncwarp();

    float P[kVec], S[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) { P[j] = 1.f; S[j] = 0.f; }
#pragma unroll
    for (int r = kSteps - 1; r >= 0; --r) {
        float la[kVec], g[kVec];
        read4(s_la + at0 + r * kTileC, la);
        read4(s_dh + at0 + r * kTileC, g);
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
            const float a = expf(clamp_log(la[j], sh.clamp_min, sh.clamp_max));
            S[j] = a * (S[j] + g[j]);
            P[j] *= a;
        }
    }
    sP[warp][lane] = make_float4(P[0], P[1], P[2], P[3]);
    sS[warp][lane] = make_float4(S[0], S[1], S[2], S[3]);
    __syncthreads();

    float first[kVec];  // d final_state (read by the last chunk only)
    load_state(k == 0 && args.d_final != nullptr ? args.d_final + batch * sh.D + d0 : nullptr, valid, first);
    block_prefix(make_status(ws, plan), k, tile, k + 1 < plan.n_chunks, sP, sS, sS, first, Backward{});

    const float4 in = sS[warp][lane];
    float carry[kVec] = {in.x, in.y, in.z, in.w};
    TB* db = static_cast<TB*>(args.db) + row0;
    TA* dla = static_cast<TA*>(args.d_log_a) + row0;
    const float* h0 = args.h0 != nullptr ? args.h0 + batch * sh.D + d0 : nullptr;
#pragma unroll
    for (int r = kSteps - 1; r >= 0; --r) {
        const int64_t t = t0 + r;
        float la[kVec], g[kVec], hp[kVec], dlog[kVec];
        read4(s_la + at0 + r * kTileC, la);
        read4(s_dh + at0 + r * kTileC, g);
        if (t > 0) {
            read4(s_hp + at0 + r * kTileC, hp);
        } else {
            load_state(h0, valid, hp);
        }
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
            const float l = la[j];
            const float a = expf(clamp_log(l, sh.clamp_min, sh.clamp_max));
            g[j] += carry[j];         // g_t = dh_t + a_{t+1} g_{t+1}
            carry[j] = a * g[j];      // a_t g_t
            // clamp's gradient: passed where clamp_min <= log_a <= clamp_max, as torch.clamp's
            dlog[j] = (l >= sh.clamp_min && l <= sh.clamp_max) ? carry[j] * hp[j] : 0.f;
        }
        if (t < sh.T) {
            store_row<TB, VEC>(db + t * sh.D, valid, g);
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

// Launch one kernel instantiation with `smem` bytes of staged inputs. Its attributes are set once per device
// (a template on the kernel itself, so each instantiation keeps its own record): dynamic shared memory above
// the 48 KB default, and all of the unified L1 as shared memory, so that as many blocks fit as the staging
// allows (the kernel reads nothing twice from global memory: L1 has little to cache).
template <auto kernel, typename Args>
cudaError_t launch_kernel(size_t smem, int64_t blocks, cudaStream_t stream, const Args& args, const Workspace& ws,
                          const Plan& plan) {
    static std::atomic<uint64_t> configured{0};  // bit d: device d done (devices >= 64 are set at every launch)
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return err;
    const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;
    if (!(configured.load(std::memory_order_relaxed) & bit)) {
        if (smem > 48 * 1024) {
            err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
            if (err != cudaSuccess) return err;
        }
        err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                   cudaSharedmemCarveoutMaxShared);
        if (err != cudaSuccess) return err;
        configured.fetch_or(bit, std::memory_order_relaxed);
    }
    kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(args, ws, plan);
    return cudaGetLastError();
}

template <typename TA, typename TB, typename Args>
cudaError_t launch(const Args& args, const Workspace& ws, cudaStream_t stream, bool vec, bool la_vec) {
    const Plan plan = make_plan(args.shape.B, args.shape.T, args.shape.D);
    const int64_t blocks = plan.n_tiles * plan.n_chunks;
    if (blocks <= 0) return cudaSuccess;
    if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
    // the contiguous, aligned case (every model call) without the strided paths' index arithmetic
    if constexpr (std::is_same_v<Args, ScanFwdArgs>) {
        const size_t smem = staged_bytes<TA, TB>();
        if (vec && la_vec) return launch_kernel<scan_fwd_kernel<TA, TB, true, true>>(smem, blocks, stream, args, ws, plan);
        if (vec) return launch_kernel<scan_fwd_kernel<TA, TB, true, false>>(smem, blocks, stream, args, ws, plan);
        return launch_kernel<scan_fwd_kernel<TA, TB, false, false>>(smem, blocks, stream, args, ws, plan);
    } else {
        const size_t smem = staged_bytes<TA, TB, TB>();
        if (vec && la_vec) return launch_kernel<scan_bwd_kernel<TA, TB, true, true>>(smem, blocks, stream, args, ws, plan);
        if (vec) return launch_kernel<scan_bwd_kernel<TA, TB, true, false>>(smem, blocks, stream, args, ws, plan);
        return launch_kernel<scan_bwd_kernel<TA, TB, false, false>>(smem, blocks, stream, args, ws, plan);
    }
}

// The dtype pairs built: log_a fp32 with any b, or log_a in b's dtype.
template <typename Args>
cudaError_t dispatch(const Args& args, DType b_dtype, const Workspace& ws, cudaStream_t stream, bool vec) {
    const bool la_vec = vec && log_a_vectorizable(args.log_a, args.shape.D);
    const DType la = args.log_a.dtype;
    if (la == DType::kFloat32) {
        switch (b_dtype) {
            case DType::kFloat32: return launch<float, float>(args, ws, stream, vec, la_vec);
            case DType::kBFloat16: return launch<float, __nv_bfloat16>(args, ws, stream, vec, la_vec);
            case DType::kFloat16: return launch<float, __half>(args, ws, stream, vec, la_vec);
        }
    } else if (la == b_dtype) {
        if (la == DType::kBFloat16) return launch<__nv_bfloat16, __nv_bfloat16>(args, ws, stream, vec, la_vec);
        return launch<__half, __half>(args, ws, stream, vec, la_vec);
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
