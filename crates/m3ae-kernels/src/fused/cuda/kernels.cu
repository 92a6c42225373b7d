// CUDA kernels of m3ae-kernels (feature `cuda`), compiled at run time with NVRTC.
//
// All tensors are contiguous f32. Reductions run in a fixed order (warp shuffles with fixed
// offsets, then a sequential sum over warps), so results are deterministic run to run.
//
// Attention: one warp per query row (forward, dq) or per key row (dk, dv). A warp keeps its
// score row in shared memory (L floats), so nothing of size [B, H, L, L] is ever stored; the
// forward saves the row maximum and the log of the shifted row sum (kept apart: their sum would
// lose the small term next to the -1e7 padding score in f32). Padding keys get the score
// -1e7 (replaced, as the official code), so a fully padded row attends uniformly; their score
// gradient is zero. Heads are addressed through strides: a head of batch b, head h, row i starts
// at b * bs + h * hs + i * rs, which covers both [B, H, L, Dh] tensors and the packed qkv
// projection [B, L, 3 D].

#define PADDING_SCORE (-1e7f)

// The per-block dynamic shared memory (the CPU emulator of the tests redefines this).
#ifndef M3AE_DYNAMIC_SHARED
#define M3AE_DYNAMIC_SHARED(name) extern __shared__ float name[]
#endif

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block; every thread gets the total. `buf` holds one float per warp.
__device__ float block_sum(float v, float* buf) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();  // a previous call may still be reading buf
    if (lane == 0) buf[warp] = v;
    __syncthreads();
    float t = 0.f;
    for (int w = 0; w < warps; ++w) t += buf[w];
    return t;
}

__device__ __forceinline__ float dot(const float* a, const float* b, int n) {
    float s = 0.f;
    for (int d = 0; d < n; ++d) s = fmaf(a[d], b[d], s);
    return s;
}

// ---------------------------------------------------------------------------------------------
// Attention. Grid (ceil(L / warps), B * H); block warps * 32 threads.

// The head (b, h), row and lane this thread works on (one warp per row).
struct WarpRow {
    int warp, lane, b, h, bh, row;
};

__device__ __forceinline__ WarpRow warp_row(int H) {
    WarpRow w;
    w.warp = threadIdx.x >> 5;
    w.lane = threadIdx.x & 31;
    w.bh = blockIdx.y;
    w.b = w.bh / H;
    w.h = w.bh % H;
    w.row = blockIdx.x * (blockDim.x >> 5) + w.warp;
    return w;
}

// Forward. Shared memory per warp: L + Dh floats.
extern "C" __global__ void m3ae_attn_fwd(
    const float* q, const float* k, const float* v, const float* pad, int has_pad,
    float* o, float* row_max, float* row_log_sum,
    int H, int L, int Dh,
    long long in_bs, long long in_hs, long long in_rs,
    long long out_bs, long long out_hs, long long out_rs,
    float scale) {
    M3AE_DYNAMIC_SHARED(smem);
    const WarpRow w = warp_row(H);
    const int warp = w.warp, lane = w.lane, bh = w.bh, b = w.b, h = w.h, i = w.row;
    if (i >= L) return;  // the whole warp
    float* s = smem + (size_t)warp * (L + Dh);
    float* qs = s + L;
    const long long base = b * in_bs + h * in_hs;
    const float* qi = q + base + i * in_rs;
    const float* kh = k + base;
    const float* vh = v + base;
    const float* pb = pad + (long long)b * L;
    for (int d = lane; d < Dh; d += 32) qs[d] = qi[d];
    __syncwarp();
    float m = -3.4e38f;  // below any score (scores are finite, padding is -1e7)
    for (int j = lane; j < L; j += 32) {
        float x = scale * dot(qs, kh + j * in_rs, Dh);
        if (has_pad && pb[j] > 0.f) x = PADDING_SCORE;
        s[j] = x;
        m = fmaxf(m, x);
    }
    m = warp_max(m);
    float sum = 0.f;
    for (int j = lane; j < L; j += 32) {
        const float p = expf(s[j] - m);
        s[j] = p;
        sum += p;
    }
    sum = warp_sum(sum);
    __syncwarp();
    const float inv = 1.f / sum;
    float* oi = o + b * out_bs + h * out_hs + i * out_rs;
    for (int d = lane; d < Dh; d += 32) {
        float acc = 0.f;
        for (int j = 0; j < L; ++j) acc = fmaf(s[j], vh[j * in_rs + d], acc);
        oi[d] = acc * inv;
    }
    if (lane == 0) {
        const long long r = (long long)bh * L + i;
        row_max[r] = m;
        row_log_sum[r] = logf(sum);
    }
}

// Backward, query side: dq and delta = rowsum(dO * O). Shared memory per warp: L + 2 Dh floats.
// The gradients use the input strides; dO and O the output strides.
extern "C" __global__ void m3ae_attn_bwd_dq(
    const float* q, const float* k, const float* v, const float* pad, int has_pad,
    const float* o, const float* dout, const float* row_max, const float* row_log_sum,
    float* dq, float* delta,
    int H, int L, int Dh,
    long long in_bs, long long in_hs, long long in_rs,
    long long out_bs, long long out_hs, long long out_rs,
    float scale) {
    M3AE_DYNAMIC_SHARED(smem);
    const WarpRow w = warp_row(H);
    const int warp = w.warp, lane = w.lane, bh = w.bh, b = w.b, h = w.h, i = w.row;
    if (i >= L) return;  // the whole warp
    float* s = smem + (size_t)warp * (L + 2 * Dh);
    float* qs = s + L;
    float* gs = qs + Dh;
    const long long base = b * in_bs + h * in_hs;
    const long long obase = b * out_bs + h * out_hs + i * out_rs;
    const float* kh = k + base;
    const float* vh = v + base;
    const float* pb = pad + (long long)b * L;
    float part = 0.f;
    for (int d = lane; d < Dh; d += 32) {
        qs[d] = q[base + i * in_rs + d];
        const float g = dout[obase + d];
        gs[d] = g;
        part = fmaf(g, o[obase + d], part);
    }
    const float di = warp_sum(part);
    __syncwarp();
    const long long r = (long long)bh * L + i;
    const float m = row_max[r], ls = row_log_sum[r];
    for (int j = lane; j < L; j += 32) {
        const bool padded = has_pad && pb[j] > 0.f;
        float x = scale * dot(qs, kh + j * in_rs, Dh);
        if (padded) x = PADDING_SCORE;
        const float p = expf((x - m) - ls);
        const float dp = dot(gs, vh + j * in_rs, Dh);
        s[j] = padded ? 0.f : p * (dp - di);
    }
    __syncwarp();
    float* dqi = dq + base + i * in_rs;
    for (int d = lane; d < Dh; d += 32) {
        float acc = 0.f;
        for (int j = 0; j < L; ++j) acc = fmaf(s[j], kh[j * in_rs + d], acc);
        dqi[d] = scale * acc;
    }
    if (lane == 0) delta[r] = di;
}

// Backward, key side: dk and dv of key row j. Needs `delta` from m3ae_attn_bwd_dq. Shared memory
// per warp: 2 L + 2 Dh floats.
extern "C" __global__ void m3ae_attn_bwd_dkdv(
    const float* q, const float* k, const float* v, const float* pad, int has_pad,
    const float* dout, const float* row_max, const float* row_log_sum, const float* delta,
    float* dk, float* dv,
    int H, int L, int Dh,
    long long in_bs, long long in_hs, long long in_rs,
    long long out_bs, long long out_hs, long long out_rs,
    float scale) {
    M3AE_DYNAMIC_SHARED(smem);
    const WarpRow w = warp_row(H);
    const int warp = w.warp, lane = w.lane, bh = w.bh, b = w.b, h = w.h, j = w.row;
    if (j >= L) return;  // the whole warp
    float* ps = smem + (size_t)warp * (2 * L + 2 * Dh);
    float* dss = ps + L;
    float* ks = dss + L;
    float* vs = ks + Dh;
    const long long base = b * in_bs + h * in_hs;
    const long long obase = b * out_bs + h * out_hs;
    for (int d = lane; d < Dh; d += 32) {
        ks[d] = k[base + j * in_rs + d];
        vs[d] = v[base + j * in_rs + d];
    }
    __syncwarp();
    const bool padded = has_pad && pad[(long long)b * L + j] > 0.f;
    const float* qh = q + base;
    const float* gh = dout + obase;
    const long long rows = (long long)bh * L;
    for (int i = lane; i < L; i += 32) {
        float x = scale * dot(qh + i * in_rs, ks, Dh);
        if (padded) x = PADDING_SCORE;
        const float p = expf((x - row_max[rows + i]) - row_log_sum[rows + i]);
        const float dp = dot(gh + i * out_rs, vs, Dh);
        ps[i] = p;
        dss[i] = padded ? 0.f : p * (dp - delta[rows + i]);
    }
    __syncwarp();
    for (int d = lane; d < Dh; d += 32) {
        float gv = 0.f, gk = 0.f;
        for (int i = 0; i < L; ++i) {
            gv = fmaf(ps[i], gh[i * out_rs + d], gv);
            gk = fmaf(dss[i], qh[i * in_rs + d], gk);
        }
        dv[base + j * in_rs + d] = gv;
        dk[base + j * in_rs + d] = scale * gk;
    }
}

// ---------------------------------------------------------------------------------------------
// LayerNorm over rows of length D. Grid N blocks (one row each).

__device__ void row_moments(const float* xr, int D, float eps, float* buf, float* mean,
                            float* rstd) {
    float s = 0.f;
    for (int c = threadIdx.x; c < D; c += blockDim.x) s += xr[c];
    const float mu = block_sum(s, buf) / D;
    float var = 0.f;
    for (int c = threadIdx.x; c < D; c += blockDim.x) {
        const float t = xr[c] - mu;
        var = fmaf(t, t, var);
    }
    var = block_sum(var, buf) / D;
    *mean = mu;
    *rstd = 1.f / sqrtf(var + eps);
}

extern "C" __global__ void m3ae_ln_fwd(const float* x, const float* gamma, const float* beta,
                                       float* y, int D, float eps) {
    __shared__ float buf[32];
    const long long r = blockIdx.x;
    const float* xr = x + r * D;
    float mean, rstd;
    row_moments(xr, D, eps, buf, &mean, &rstd);
    for (int c = threadIdx.x; c < D; c += blockDim.x)
        y[r * D + c] = (xr[c] - mean) * rstd * gamma[c] + beta[c];
}

// dx of each row; writes (mean, rstd) of the row to stats[2 r], stats[2 r + 1].
extern "C" __global__ void m3ae_ln_bwd_dx(const float* x, const float* gamma, const float* dy,
                                          float* dx, float* stats, int D, float eps) {
    __shared__ float buf[32];
    const long long r = blockIdx.x;
    const float* xr = x + r * D;
    const float* gr = dy + r * D;
    float mean, rstd;
    row_moments(xr, D, eps, buf, &mean, &rstd);
    float a = 0.f, bx = 0.f;
    for (int c = threadIdx.x; c < D; c += blockDim.x) {
        const float g = gr[c] * gamma[c];
        a += g;
        bx = fmaf(g, (xr[c] - mean) * rstd, bx);
    }
    a = block_sum(a, buf) / D;
    bx = block_sum(bx, buf) / D;
    for (int c = threadIdx.x; c < D; c += blockDim.x) {
        const float xh = (xr[c] - mean) * rstd;
        dx[r * D + c] = rstd * (gr[c] * gamma[c] - a - xh * bx);
    }
    if (threadIdx.x == 0) {
        stats[2 * r] = mean;
        stats[2 * r + 1] = rstd;
    }
}

// dgamma and dbeta: one thread per column, rows summed in order.
extern "C" __global__ void m3ae_ln_bwd_params(const float* x, const float* dy, const float* stats,
                                              float* dgamma, float* dbeta, int N, int D) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= D) return;
    float g = 0.f, b = 0.f;
    for (long long r = 0; r < N; ++r) {
        const float d = dy[r * D + c];
        g = fmaf(d, (x[r * D + c] - stats[2 * r]) * stats[2 * r + 1], g);
        b += d;
    }
    dgamma[c] = g;
    dbeta[c] = b;
}

// ---------------------------------------------------------------------------------------------
// tanh-GELU, elementwise (grid-stride loops).

#define GELU_C 0.7978845608028654f
#define GELU_A 0.044715f

extern "C" __global__ void m3ae_gelu_fwd(const float* x, float* y, long long n) {
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n;
         e += (long long)gridDim.x * blockDim.x) {
        const float v = x[e];
        const float t = tanhf(GELU_C * (v + GELU_A * v * v * v));
        y[e] = 0.5f * v * (1.f + t);
    }
}

extern "C" __global__ void m3ae_gelu_bwd(const float* x, const float* dy, float* dx,
                                         long long n) {
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n;
         e += (long long)gridDim.x * blockDim.x) {
        const float v = x[e];
        const float t = tanhf(GELU_C * (v + GELU_A * v * v * v));
        const float du = GELU_C * (1.f + 3.f * GELU_A * v * v);
        dx[e] = dy[e] * (0.5f * (1.f + t) + 0.5f * v * (1.f - t * t) * du);
    }
}
