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

// ---------------------------------------------------------------------------------------------
// Text head: weighted cross-entropy of `h W^T + b` (loss, accuracy, gradients) and top-k words,
// computed on the selected rows only (`rows` holds their indices into the N rows of `h`), in
// tiles of TH_ROWS rows x TH_WORDS words, so that no N x V (or M x V) tensor exists.
//
// Every text-head kernel runs blocks of TH_THREADS = 256 threads. A logit tile is computed by
// `logit_tile` with a shared-memory tiled product over the depth D (TH_DEPTH at a time, zero
// padded), each thread owning 4 x 4 logits (rows ty + 16 a, words tx + 16 b). Nothing is
// accumulated with atomics: every output element is owned by one block, which adds its terms in
// a fixed order, and cross-block partials are merged in a fixed order, so results are
// deterministic run to run (they depend on the shapes only, never on the GPU).

#define TH_ROWS 64
#define TH_WORDS 64
#define TH_DEPTH 16
#define TH_THREADS 256
// Largest k of the top-k kernels.
#define TOP_K_MAX 32

__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }
__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fffffff); }

// Shared memory of one logit tile: the depth slices of the rows and words (k-major, padded) and
// the tile itself. The kernels keep it at the start of their dynamic shared memory (so the
// emulator of the tests can poison it between blocks), followed in the backward by one
// TH_ROWS x (TH_WORDS + 1) slice (`slice_after`).
struct LogitTile {
    float hs[TH_DEPTH][TH_ROWS + 1];
    float ws[TH_DEPTH][TH_WORDS + 1];
    float s[TH_ROWS][TH_WORDS + 1];
};

typedef float SliceRow[TH_WORDS + 1];

__device__ __forceinline__ SliceRow* slice_after(float* smem) {
    return reinterpret_cast<SliceRow*>(smem + sizeof(LogitTile) / sizeof(float));
}

// s[i][j] = h[rows[r0 + i]] . w[v0 + j] + bias[v0 + j] for the rows below M and the words below V
// (the other entries hold the products of zero padding and must not be used). Ends with a
// barrier: the tile is visible to every thread.
__device__ void logit_tile(const float* h, const int* rows, int M, int r0, const float* w,
                           const float* bias, int V, int v0, int D, LogitTile& t) {
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    float acc[4][4];
    for (int a = 0; a < 4; ++a)
        for (int b = 0; b < 4; ++b) acc[a][b] = 0.f;
    for (int k0 = 0; k0 < D; k0 += TH_DEPTH) {
        for (int e = tid; e < TH_ROWS * TH_DEPTH; e += TH_THREADS) {
            const int i = e / TH_DEPTH, kk = e % TH_DEPTH, k = k0 + kk;
            const int r = r0 + i, word = v0 + i;
            t.hs[kk][i] = (r < M && k < D) ? h[(long long)rows[r] * D + k] : 0.f;
            t.ws[kk][i] = (word < V && k < D) ? w[(long long)word * D + k] : 0.f;
        }
        __syncthreads();
        for (int kk = 0; kk < TH_DEPTH; ++kk) {
            float x[4], y[4];
            for (int a = 0; a < 4; ++a) x[a] = t.hs[kk][ty + 16 * a];
            for (int b = 0; b < 4; ++b) y[b] = t.ws[kk][tx + 16 * b];
            for (int a = 0; a < 4; ++a)
                for (int b = 0; b < 4; ++b) acc[a][b] = fmaf(x[a], y[b], acc[a][b]);
        }
        __syncthreads();
    }
    for (int b = 0; b < 4; ++b) {
        const int j = tx + 16 * b;
        const float bj = v0 + j < V ? bias[v0 + j] : 0.f;
        for (int a = 0; a < 4; ++a) t.s[ty + 16 * a][j] = acc[a][b] + bj;
    }
    __syncthreads();
}

// Adds a block of logits with maximum m and sum s of exp(x - m) to a running (max, sum)
// (online log-sum-exp; a sum of 0 marks an empty block, a non-empty one is at least 1).
__device__ __forceinline__ void add_exp(float& mx, float& sum, float m, float s) {
    if (s == 0.f) return;
    if (sum == 0.f) {
        mx = m;
        sum = s;
    } else if (m > mx) {
        sum = fmaf(sum, expf(mx - m), s);
        mx = m;
    } else {
        sum = fmaf(s, expf(m - mx), sum);
    }
}

// Word tiles [t0, t1) of vocabulary chunk c.
__device__ __forceinline__ void chunk_tiles(int c, int tiles_per_chunk, int V, int* t0, int* t1) {
    const int tiles = (V + TH_WORDS - 1) / TH_WORDS;
    *t0 = c * tiles_per_chunk;
    *t1 = min(*t0 + tiles_per_chunk, tiles);
}

// Forward, pass 1. Grid (chunks, ceil(M / TH_ROWS)). Block (c, y) walks the word tiles of chunk c
// for rows y TH_ROWS..; four consecutive threads share a row of the tile (each scans every fourth
// word, then the four combine with shuffles, so all four hold the same values) and keep the row's
// running maximum and sum of exp, its first arg-max, the target's logit (when the target is in the
// chunk) and whether a logit was NaN. Writes them to
// stats[4 (r chunks + c) + {0: max, 1: sum, 2: best logit, 3: target logit}] and
// info[2 (r chunks + c) + {0: best word, 1: NaN seen}].
extern "C" __global__ void m3ae_text_head_fwd(const float* h, const int* rows, const int* targets,
                                              int M, const float* w, const float* bias, int V,
                                              int D, int tiles_per_chunk, float* stats,
                                              int* info) {
    M3AE_DYNAMIC_SHARED(smem);
    LogitTile& t = *reinterpret_cast<LogitTile*>(smem);
    const int chunks = gridDim.x, c = blockIdx.x, r0 = blockIdx.y * TH_ROWS;
    const int i = threadIdx.x >> 2, part = threadIdx.x & 3, r = r0 + i;
    const int tg = r < M ? targets[r] : -1;
    float rmax = 0.f, rsum = 0.f, best = neg_inf(), target = 0.f;
    int arg = -1, bad = 0;
    int t0, t1;
    chunk_tiles(c, tiles_per_chunk, V, &t0, &t1);
    for (int tile = t0; tile < t1; ++tile) {
        const int v0 = tile * TH_WORDS, l = min(TH_WORDS, V - v0);
        logit_tile(h, rows, M, r0, w, bias, V, v0, D, t);
        // NaN seen, maximum and its first word (larger logit, then lower word: a total order, so
        // the four threads end with the same pair); every lane takes part in the shuffles
        float nan_seen = 0.f, bv = neg_inf();
        int bi = TH_WORDS;
        for (int j = part; j < l; j += 4) {
            const float x = t.s[i][j];
            if (x != x) nan_seen = 1.f;
            else if (x > bv) {
                bv = x;
                bi = j;
            }
        }
        for (int o = 1; o < 4; o <<= 1) {
            nan_seen = fmaxf(nan_seen, __shfl_xor_sync(0xffffffffu, nan_seen, o));
            const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) {
                bv = ov;
                bi = oi;
            }
        }
        float se = 0.f;
        for (int j = part; j < l; j += 4) se += expf(t.s[i][j] - bv);
        se += __shfl_xor_sync(0xffffffffu, se, 1);
        se += __shfl_xor_sync(0xffffffffu, se, 2);
        if (nan_seen > 0.f) {
            bad = 1;  // the row's loss is NaN; nothing else of it matters
        } else {
            add_exp(rmax, rsum, bv, se);
            if (bv > best) {  // strictly: an earlier tile keeps a tie
                best = bv;
                arg = v0 + bi;
            }
            if (tg >= v0 && tg < v0 + l) target = t.s[i][tg - v0];
        }
        __syncthreads();  // the next tile overwrites t
    }
    if (part == 0 && r < M) {
        const long long e = (long long)r * chunks + c;
        stats[4 * e] = rmax;
        stats[4 * e + 1] = rsum;
        stats[4 * e + 2] = best;
        stats[4 * e + 3] = target;
        info[2 * e] = arg;
        info[2 * e + 1] = bad;
    }
}

// Forward, pass 2: one thread per row merges its chunks in vocabulary order. Saves the row
// maximum and ln(sum exp(x - max)) for the backward (a NaN log-sum for a row with a NaN logit, so
// its gradients are NaN), and the row's terms[2 r] = -log softmax[target] (NaN for such a row) and
// terms[2 r + 1] = 1 when the first arg-max is the target (0 for such a row).
extern "C" __global__ void m3ae_text_head_fwd_merge(const float* stats, const int* info,
                                                    const int* targets, int M, int chunks,
                                                    int tiles_per_chunk, float* row_max,
                                                    float* row_log_sum, float* terms) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= M) return;
    const int tg = targets[r];
    const int target_chunk = tg / TH_WORDS / tiles_per_chunk;
    float mx = 0.f, sum = 0.f, best = neg_inf(), target = 0.f;
    int arg = -1, bad = 0;
    for (int c = 0; c < chunks; ++c) {
        const long long e = (long long)r * chunks + c;
        add_exp(mx, sum, stats[4 * e], stats[4 * e + 1]);
        if (stats[4 * e + 2] > best) {
            best = stats[4 * e + 2];
            arg = info[2 * e];
        }
        if (c == target_chunk) target = stats[4 * e + 3];
        bad |= info[2 * e + 1];
    }
    const float log_sum = logf(sum);
    row_max[r] = mx;
    row_log_sum[r] = bad ? quiet_nan() : log_sum;
    terms[2 * r] = bad ? quiet_nan() : (mx - target) + log_sum;
    terms[2 * r + 1] = (!bad && arg == tg) ? 1.f : 0.f;
}

// Forward, pass 3: one block of TH_THREADS threads; out[0] = sum_r w_r terms[2 r] (the loss),
// out[1] = sum_r w_r terms[2 r + 1] (the accuracy), in double, in a fixed order.
extern "C" __global__ void m3ae_text_head_fwd_sum(const float* terms, const float* weights, int M,
                                                  float* out) {
    __shared__ double buf[2][TH_THREADS];
    const int tid = threadIdx.x;
    double loss = 0.0, acc = 0.0;
    for (int r = tid; r < M; r += TH_THREADS) {
        loss += (double)weights[r] * (double)terms[2 * r];
        acc += (double)weights[r] * (double)terms[2 * r + 1];
    }
    buf[0][tid] = loss;
    buf[1][tid] = acc;
    __syncthreads();
    for (int s = TH_THREADS / 2; s > 0; s >>= 1) {
        if (tid < s) {
            buf[0][tid] += buf[0][tid + s];
            buf[1][tid] += buf[1][tid + s];
        }
        __syncthreads();
    }
    if (tid == 0) {
        out[0] = (float)buf[0][0];
        out[1] = (float)buf[1][0];
    }
}

// Turns the logit tile of rows r0.. and words v0.. into the logit gradient
// g w_r (softmax - onehot(target_r)) (zero outside the M rows and V words); g = grad[0].
__device__ void logit_grad_tile(LogitTile& t, const int* targets, const float* weights,
                                const float* row_max, const float* row_log_sum, float g, int M,
                                int r0, int V, int v0) {
    for (int e = threadIdx.x; e < TH_ROWS * TH_WORDS; e += TH_THREADS) {
        const int i = e / TH_WORDS, j = e % TH_WORDS, r = r0 + i, word = v0 + j;
        float x = 0.f;
        if (r < M && word < V) {
            const float p = expf((t.s[i][j] - row_max[r]) - row_log_sum[r]);
            x = (g * weights[r]) * (word == targets[r] ? p - 1.f : p);
        }
        t.s[i][j] = x;
    }
    __syncthreads();
}

// Backward, dW and db. Grid ceil(V / TH_WORDS): block x owns words x TH_WORDS.. (rows of dw and
// entries of db) and walks every row tile in order: recomputes the logit tile, turns it into the
// logit gradient G, adds colsum(G) to db (in registers) and G^T H to dw in slices of TH_WORDS
// dimensions. dw must be zero on entry.
extern "C" __global__ void m3ae_text_head_bwd_dw(const float* h, const int* rows,
                                                 const int* targets, const float* weights,
                                                 const float* row_max, const float* row_log_sum,
                                                 const float* grad, int M, const float* w,
                                                 const float* bias, int V, int D, float* dw,
                                                 float* db) {
    M3AE_DYNAMIC_SHARED(smem);
    LogitTile& t = *reinterpret_cast<LogitTile*>(smem);
    SliceRow* hd = slice_after(smem);  // hidden: rows x dimensions
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int v0 = blockIdx.x * TH_WORDS;
    const float g = grad[0];
    float dbias = 0.f;  // of word v0 + tid, for tid < TH_WORDS
    for (int r0 = 0; r0 < M; r0 += TH_ROWS) {
        logit_tile(h, rows, M, r0, w, bias, V, v0, D, t);
        logit_grad_tile(t, targets, weights, row_max, row_log_sum, g, M, r0, V, v0);
        if (tid < TH_WORDS)
            for (int i = 0; i < TH_ROWS; ++i) dbias += t.s[i][tid];
        for (int d0 = 0; d0 < D; d0 += TH_WORDS) {
            for (int e = tid; e < TH_ROWS * TH_WORDS; e += TH_THREADS) {
                const int i = e / TH_WORDS, c = e % TH_WORDS, r = r0 + i, d = d0 + c;
                hd[i][c] = (r < M && d < D) ? h[(long long)rows[r] * D + d] : 0.f;
            }
            __syncthreads();
            float acc[4][4];
            for (int a = 0; a < 4; ++a)
                for (int b = 0; b < 4; ++b) acc[a][b] = 0.f;
            for (int i = 0; i < TH_ROWS; ++i) {
                float x[4], y[4];
                for (int a = 0; a < 4; ++a) x[a] = t.s[i][ty + 16 * a];
                for (int b = 0; b < 4; ++b) y[b] = hd[i][tx + 16 * b];
                for (int a = 0; a < 4; ++a)
                    for (int b = 0; b < 4; ++b) acc[a][b] = fmaf(x[a], y[b], acc[a][b]);
            }
            for (int a = 0; a < 4; ++a) {
                const int word = v0 + ty + 16 * a;
                for (int b = 0; b < 4; ++b) {
                    const int d = d0 + tx + 16 * b;
                    if (word < V && d < D) dw[(long long)word * D + d] += acc[a][b];
                }
            }
            __syncthreads();  // hd and t are rewritten next
        }
    }
    if (tid < TH_WORDS && v0 + tid < V) db[v0 + tid] = dbias;
}

// Backward, dH in partials. Grid (chunks, ceil(M / TH_ROWS)): block (c, y) owns rows y TH_ROWS..
// of part c (part = partials + c M D, zero on entry) and walks the word tiles of chunk c in
// order: recomputes the logit tile, turns it into G and adds G W to its rows, in slices of
// TH_WORDS dimensions.
extern "C" __global__ void m3ae_text_head_bwd_dh(const float* h, const int* rows,
                                                 const int* targets, const float* weights,
                                                 const float* row_max, const float* row_log_sum,
                                                 const float* grad, int M, const float* w,
                                                 const float* bias, int V, int D,
                                                 int tiles_per_chunk, float* partials) {
    M3AE_DYNAMIC_SHARED(smem);
    LogitTile& t = *reinterpret_cast<LogitTile*>(smem);
    SliceRow* wd = slice_after(smem);  // weight: words x dimensions
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int c = blockIdx.x, r0 = blockIdx.y * TH_ROWS;
    const float g = grad[0];
    float* part = partials + (long long)c * M * D;
    int t0, t1;
    chunk_tiles(c, tiles_per_chunk, V, &t0, &t1);
    for (int tile = t0; tile < t1; ++tile) {
        const int v0 = tile * TH_WORDS;
        logit_tile(h, rows, M, r0, w, bias, V, v0, D, t);
        logit_grad_tile(t, targets, weights, row_max, row_log_sum, g, M, r0, V, v0);
        for (int d0 = 0; d0 < D; d0 += TH_WORDS) {
            for (int e = tid; e < TH_WORDS * TH_WORDS; e += TH_THREADS) {
                const int j = e / TH_WORDS, cc = e % TH_WORDS, word = v0 + j, d = d0 + cc;
                wd[j][cc] = (word < V && d < D) ? w[(long long)word * D + d] : 0.f;
            }
            __syncthreads();
            float acc[4][4];
            for (int a = 0; a < 4; ++a)
                for (int b = 0; b < 4; ++b) acc[a][b] = 0.f;
            for (int j = 0; j < TH_WORDS; ++j) {
                float x[4], y[4];
                for (int a = 0; a < 4; ++a) x[a] = t.s[ty + 16 * a][j];
                for (int b = 0; b < 4; ++b) y[b] = wd[j][tx + 16 * b];
                for (int a = 0; a < 4; ++a)
                    for (int b = 0; b < 4; ++b) acc[a][b] = fmaf(x[a], y[b], acc[a][b]);
            }
            for (int a = 0; a < 4; ++a) {
                const int r = r0 + ty + 16 * a;
                for (int b = 0; b < 4; ++b) {
                    const int d = d0 + tx + 16 * b;
                    if (r < M && d < D) part[(long long)r * D + d] += acc[a][b];
                }
            }
            __syncthreads();  // wd and t are rewritten next
        }
    }
}

// Backward, dH: dh[rows[r]] = sum over the chunks, in order, of the partials of row r (grid-stride
// over the M D elements; the selected rows are distinct and dh is zero elsewhere).
extern "C" __global__ void m3ae_text_head_bwd_dh_sum(const float* partials, const int* rows,
                                                     int M, int D, int chunks, float* dh) {
    const long long n = (long long)M * D;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n;
         e += (long long)gridDim.x * blockDim.x) {
        float s = 0.f;
        for (int c = 0; c < chunks; ++c) s += partials[c * n + e];
        const long long r = e / D, d = e % D;
        dh[(long long)rows[r] * D + d] = s;
    }
}

// Whether logit x ranks strictly before y: NaN after every number, equal values tie.
__device__ __forceinline__ bool ranks_before(float x, float y) {
    return x == x && (y != y || x > y);
}

// Offers word `id` (above every word in the list) with logit x to a sorted list of n <= k entries.
__device__ void offer(float* vals, int* ids, int& n, int k, float x, int id) {
    if (n == k && !ranks_before(x, vals[k - 1])) return;  // a later word needs a better logit
    int p = 0;
    while (p < n && !ranks_before(x, vals[p])) ++p;
    for (int q = n < k ? n : k - 1; q > p; --q) {
        vals[q] = vals[q - 1];
        ids[q] = ids[q - 1];
    }
    vals[p] = x;
    ids[p] = id;
    if (n < k) ++n;
}

// Top-k, pass 1. Grid (chunks, ceil(M / TH_ROWS)): block (c, y) walks the word tiles of chunk c
// for rows y TH_ROWS..; thread i < TH_ROWS keeps the running top-k list of row i (best first;
// equal logits by the lower word; NaN last). Writes the list to vals / ids at (r chunks + c) k,
// padded with id -1.
extern "C" __global__ void m3ae_text_top_k(const float* h, const int* rows, int M, const float* w,
                                           const float* bias, int V, int D, int k,
                                           int tiles_per_chunk, float* vals, int* ids) {
    M3AE_DYNAMIC_SHARED(smem);
    LogitTile& t = *reinterpret_cast<LogitTile*>(smem);
    const int chunks = gridDim.x, c = blockIdx.x, r0 = blockIdx.y * TH_ROWS;
    const int i = threadIdx.x;
    const bool owner = i < TH_ROWS && r0 + i < M;
    float lv[TOP_K_MAX];
    int li[TOP_K_MAX];
    int n = 0;
    int t0, t1;
    chunk_tiles(c, tiles_per_chunk, V, &t0, &t1);
    for (int tile = t0; tile < t1; ++tile) {
        const int v0 = tile * TH_WORDS, l = min(TH_WORDS, V - v0);
        logit_tile(h, rows, M, r0, w, bias, V, v0, D, t);
        if (owner)
            for (int j = 0; j < l; ++j) offer(lv, li, n, k, t.s[i][j], v0 + j);
        __syncthreads();  // the next tile overwrites t
    }
    if (owner) {
        const long long base = ((long long)(r0 + i) * chunks + c) * k;
        for (int q = 0; q < k; ++q) {
            vals[base + q] = q < n ? lv[q] : 0.f;
            ids[base + q] = q < n ? li[q] : -1;
        }
    }
}

// Top-k, pass 2: one thread per row merges its chunks' lists in vocabulary order (on equal
// logits the earlier chunk's lower words first) into out_vals / out_ids at r k (id -1 pads).
extern "C" __global__ void m3ae_text_top_k_merge(const float* vals, const int* ids, int M,
                                                 int chunks, int k, float* out_vals,
                                                 int* out_ids) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= M) return;
    float av[TOP_K_MAX], bv[TOP_K_MAX];
    int ai[TOP_K_MAX], bi[TOP_K_MAX];
    int an = 0;
    for (int c = 0; c < chunks; ++c) {
        const long long base = ((long long)r * chunks + c) * k;
        int i = 0, j = 0, on = 0;
        while (on < k) {
            const bool later = j < k && ids[base + j] >= 0;
            if (i == an && !later) break;
            if (i == an || (later && ranks_before(vals[base + j], av[i]))) {
                bv[on] = vals[base + j];
                bi[on] = ids[base + j];
                ++j;
            } else {
                bv[on] = av[i];
                bi[on] = ai[i];
                ++i;
            }
            ++on;
        }
        for (int q = 0; q < on; ++q) {
            av[q] = bv[q];
            ai[q] = bi[q];
        }
        an = on;
    }
    for (int q = 0; q < k; ++q) {
        out_vals[(long long)r * k + q] = q < an ? av[q] : 0.f;
        out_ids[(long long)r * k + q] = q < an ? ai[q] : -1;
    }
}
