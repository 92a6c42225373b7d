// Runs the CUDA kernels of src/fused/cuda/kernels.cu on the CPU and checks them against a plain
// double-precision reference, so the kernels' logic (indexing, strides, warp reductions, padding)
// is tested on machines without a GPU.
//
// The emulator gives every CUDA thread of a block its own OS thread; the blocks of a grid run one
// after the other on those threads. Warp shuffles and __syncwarp synchronise the 32 threads of a warp with a barrier,
// __syncthreads the whole block. Static __shared__ arrays become function statics (one block runs
// at a time) and dynamic shared memory a buffer sized by the launch. The launches below use the
// same grids, block sizes, shared-memory sizes and argument lists as src/fused/cuda/mod.rs.
//
// Build and run (what tests/cuda_emulated.rs does):
//   c++ -std=c++20 -O1 -pthread -I src/fused/cuda tests/cuda_emulator/emulate.cpp -o emulate
//   ./emulate        (exit code 0 when every check passes)

#include <algorithm>
#include <barrier>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <numbers>
#include <string>
#include <thread>
#include <vector>

struct Dim3 {
    unsigned x = 1, y = 1, z = 1;
};
static thread_local Dim3 threadIdx, blockIdx;
static Dim3 blockDim, gridDim;

struct Warp {
    std::barrier<> bar{32};
    float slots[32];
    int int_slots[32];
};
static thread_local Warp* emu_warp = nullptr;
static thread_local std::barrier<>* emu_block = nullptr;
static std::vector<float> emu_shared;

static void __syncwarp() { emu_warp->bar.arrive_and_wait(); }
static void __syncthreads() { emu_block->arrive_and_wait(); }
static float __shfl_xor_sync(unsigned, float v, int offset) {
    const unsigned lane = threadIdx.x & 31;
    emu_warp->slots[lane] = v;
    emu_warp->bar.arrive_and_wait();
    const float r = emu_warp->slots[lane ^ offset];
    emu_warp->bar.arrive_and_wait();
    return r;
}

static int __shfl_xor_sync(unsigned, int v, int offset) {
    const unsigned lane = threadIdx.x & 31;
    emu_warp->int_slots[lane] = v;
    emu_warp->bar.arrive_and_wait();
    const int r = emu_warp->int_slots[lane ^ offset];
    emu_warp->bar.arrive_and_wait();
    return r;
}
static float __int_as_float(int x) { return std::bit_cast<float>(x); }
using std::min;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define M3AE_DYNAMIC_SHARED(name) float* name = emu_shared.data()
#include "kernels.cu"

template <class F>
static void launch(Dim3 grid, Dim3 block, size_t shared_bytes, F kernel) {
    gridDim = grid;
    blockDim = block;
    // Poison shared memory: a kernel reading what it did not write shows up as NaN.
    emu_shared.assign(shared_bytes / sizeof(float) + 1, NAN);
    std::barrier<> block_bar(block.x);
    std::vector<std::unique_ptr<Warp>> warps;
    for (unsigned w = 0; w < (block.x + 31) / 32; ++w) warps.push_back(std::make_unique<Warp>());
    // One OS thread per CUDA thread of a block, reused for every block of the grid in turn.
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block.x; ++t)
        threads.emplace_back([&, t] {
            threadIdx = Dim3{t, 0, 0};
            emu_warp = warps[t / 32].get();
            emu_block = &block_bar;
            for (unsigned z = 0; z < grid.z; ++z)
                for (unsigned y = 0; y < grid.y; ++y)
                    for (unsigned x = 0; x < grid.x; ++x) {
                        blockIdx = Dim3{x, y, z};
                        kernel();
                        block_bar.arrive_and_wait();
                        if (t == 0) std::fill(emu_shared.begin(), emu_shared.end(), NAN);
                        block_bar.arrive_and_wait();
                    }
        });
    for (auto& th : threads) th.join();
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static float uniform() {  // in [-1, 1)
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (float)((rng_state >> 40) / (double)(1ull << 24)) * 2.f - 1.f;
}
static std::vector<float> random_vec(size_t n, float scale) {
    std::vector<float> v(n);
    for (auto& x : v) x = uniform() * scale;
    return v;
}

static int failures = 0;
static void check(const char* what, const std::vector<float>& got, const std::vector<double>& want,
                  double tol) {
    double err = 0, mag = 0;
    for (size_t i = 0; i < want.size(); ++i) {
        const double d = std::isnan(got[i]) ? INFINITY : std::fabs(got[i] - want[i]);
        err = std::fmax(err, d);
        mag = std::fmax(mag, std::fabs(want[i]));
    }
    const double rel = mag > 0 ? err / mag : err;
    const bool ok = rel <= tol;
    if (!ok) ++failures;
    std::printf("%s %-58s relative error %.2e (tolerance %.0e)\n", ok ? "ok  " : "FAIL", what, rel,
                tol);
}

// ---------------------------------------------------------------------------------------------

constexpr int WARPS = 4;  // as mod.rs

struct Geo {
    int b, h, l, dh;
    long long in[3], out[3];
    long long k_off, v_off;  // offsets of k and v from q when packed (else 0)
    bool packed;
};

static Geo separate(int b, int h, int l, int dh) {
    const long long s[3] = {(long long)h * l * dh, (long long)l * dh, dh};
    return Geo{b, h, l, dh, {s[0], s[1], s[2]}, {s[0], s[1], s[2]}, 0, 0, false};
}
static Geo packed(int b, int h, int l, int dh) {
    const long long w = (long long)h * dh;
    return Geo{b, h, l, dh, {l * 3 * w, dh, 3 * w}, {l * w, dh, w}, w, 2 * w, true};
}

// Reference attention in double: output and gradients of sum(O * W).
struct AttnRef {
    std::vector<double> o, dq, dk, dv;
};
static AttnRef reference(const Geo& g, const float* q, const float* k, const float* v,
                         const float* pad, const float* w, float scale, size_t in_len) {
    AttnRef r;
    r.o.assign((size_t)g.b * g.out[0], 0);
    r.dq.assign(in_len, 0);
    r.dk.assign(in_len, 0);
    r.dv.assign(in_len, 0);
    const int L = g.l, D = g.dh;
    for (int b = 0; b < g.b; ++b)
        for (int h = 0; h < g.h; ++h) {
            const long long ib = b * g.in[0] + h * g.in[1], ob = b * g.out[0] + h * g.out[1];
            auto Q = [&](int i, int d) { return (double)q[ib + i * g.in[2] + d]; };
            auto K = [&](int j, int d) { return (double)k[ib + j * g.in[2] + d]; };
            auto V = [&](int j, int d) { return (double)v[ib + j * g.in[2] + d]; };
            auto G = [&](int i, int d) { return (double)w[ob + i * g.out[2] + d]; };
            std::vector<double> P((size_t)L * L), dS((size_t)L * L);
            for (int i = 0; i < L; ++i) {
                double m = -INFINITY;
                for (int j = 0; j < L; ++j) {
                    double s = 0;
                    for (int d = 0; d < D; ++d) s += Q(i, d) * K(j, d);
                    s *= scale;
                    if (pad && pad[b * L + j] > 0) s = -1e7;
                    P[i * L + j] = s;
                    m = std::fmax(m, s);
                }
                double z = 0;
                for (int j = 0; j < L; ++j) z += (P[i * L + j] = std::exp(P[i * L + j] - m));
                for (int j = 0; j < L; ++j) P[i * L + j] /= z;
                for (int d = 0; d < D; ++d) {
                    double acc = 0;
                    for (int j = 0; j < L; ++j) acc += P[i * L + j] * V(j, d);
                    r.o[ob + i * g.out[2] + d] = acc;
                }
                double delta = 0;
                std::vector<double> dp(L);
                for (int j = 0; j < L; ++j) {
                    for (int d = 0; d < D; ++d) dp[j] += G(i, d) * V(j, d);
                    delta += P[i * L + j] * dp[j];
                }
                for (int j = 0; j < L; ++j) {
                    const bool padded = pad && pad[b * L + j] > 0;
                    dS[i * L + j] = padded ? 0 : P[i * L + j] * (dp[j] - delta);
                }
            }
            const long long qo = 0, ko = g.packed ? g.k_off : 0, vo = g.packed ? g.v_off : 0;
            for (int i = 0; i < L; ++i)
                for (int d = 0; d < D; ++d) {
                    double aq = 0, ak = 0, av = 0;
                    for (int j = 0; j < L; ++j) {
                        aq += dS[i * L + j] * K(j, d);
                        ak += dS[j * L + i] * Q(j, d);
                        av += P[j * L + i] * G(j, d);
                    }
                    const long long at = ib + i * g.in[2] + d;
                    r.dq[qo + at] = scale * aq;
                    r.dk[ko + at] = scale * ak;
                    r.dv[vo + at] = av;
                }
        }
    return r;
}

static void attention_case(const Geo& g, int pad_kind, float magnitude) {
    const size_t in_len = g.packed ? (size_t)g.b * g.in[0] : (size_t)g.b * g.in[0];
    // Separate: three buffers of in_len; packed: one buffer with q, k, v at column offsets.
    std::vector<float> qbuf = random_vec(in_len, magnitude);
    std::vector<float> kbuf = g.packed ? std::vector<float>() : random_vec(in_len, magnitude);
    std::vector<float> vbuf = g.packed ? std::vector<float>() : random_vec(in_len, 1.f);
    const float* q = qbuf.data();
    const float* k = g.packed ? q + g.k_off : kbuf.data();
    const float* v = g.packed ? q + g.v_off : vbuf.data();
    const size_t out_len = (size_t)g.b * g.out[0];
    std::vector<float> w = random_vec(out_len, 1.f);
    std::vector<float> pad((size_t)g.b * g.l, 0.f);
    for (int b = 0; b < g.b; ++b)
        for (int j = 0; j < g.l; ++j) {
            float p = 0;
            if (pad_kind == 1) p = uniform() > 0.3f;
            if (pad_kind == 2) p = j != g.l / 2;
            if (pad_kind == 3) p = b == 0;
            pad[b * g.l + j] = p;
        }
    const float* padp = pad_kind ? pad.data() : q;
    const int has_pad = pad_kind ? 1 : 0;
    const float scale = 1.f / std::sqrt((float)g.dh);
    const int rows = g.b * g.h * g.l;

    std::vector<float> o(out_len, NAN), mx(rows, NAN), ls(rows, NAN);
    const Dim3 grid{(unsigned)((g.l + WARPS - 1) / WARPS), (unsigned)(g.b * g.h), 1};
    const Dim3 block{WARPS * 32, 1, 1};
    launch(grid, block, WARPS * (g.l + g.dh) * 4, [&] {
        m3ae_attn_fwd(q, k, v, padp, has_pad, o.data(), mx.data(), ls.data(), g.h, g.l, g.dh,
                      g.in[0], g.in[1], g.in[2], g.out[0], g.out[1], g.out[2], scale);
    });
    // Gradient buffer in the input layout: separate [3, ...] or packed [B, L, 3 D].
    const size_t grad_len = g.packed ? in_len : 3 * in_len;
    std::vector<float> grads(grad_len, 0.f), delta(rows, NAN);
    float* dq = grads.data();
    float* dk = g.packed ? dq + g.k_off : dq + in_len;
    float* dv = g.packed ? dq + g.v_off : dq + 2 * in_len;
    launch(grid, block, WARPS * (g.l + 2 * g.dh) * 4, [&] {
        m3ae_attn_bwd_dq(q, k, v, padp, has_pad, o.data(), w.data(), mx.data(), ls.data(), dq,
                         delta.data(), g.h, g.l, g.dh, g.in[0], g.in[1], g.in[2], g.out[0],
                         g.out[1], g.out[2], scale);
    });
    launch(grid, block, WARPS * (2 * g.l + 2 * g.dh) * 4, [&] {
        m3ae_attn_bwd_dkdv(q, k, v, padp, has_pad, w.data(), mx.data(), ls.data(), delta.data(),
                           dk, dv, g.h, g.l, g.dh, g.in[0], g.in[1], g.in[2], g.out[0], g.out[1],
                           g.out[2], scale);
    });

    const AttnRef r = reference(g, q, k, v, pad_kind ? pad.data() : nullptr, w.data(), scale,
                                in_len);
    char name[160];
    const char* layout = g.packed ? "packed" : "separate";
    std::snprintf(name, sizeof name, "attention %s b%d h%d l%d dh%d pad%d x%g", layout, g.b, g.h,
                  g.l, g.dh, pad_kind, magnitude);
    std::string base(name);
    check((base + " out").c_str(), o, r.o, 1e-5);
    if (g.packed) {
        // one buffer: q, k, v gradients interleaved by columns
        std::vector<double> want(in_len);
        for (size_t i = 0; i < in_len; ++i) want[i] = r.dq[i] + r.dk[i] + r.dv[i];
        check((base + " dqkv").c_str(), grads, want, 1e-4);
    } else {
        std::vector<float> a(grads.begin(), grads.begin() + in_len);
        std::vector<float> b2(grads.begin() + in_len, grads.begin() + 2 * in_len);
        std::vector<float> c(grads.begin() + 2 * in_len, grads.end());
        check((base + " dq").c_str(), a, r.dq, 1e-4);
        check((base + " dk").c_str(), b2, r.dk, 1e-4);
        check((base + " dv").c_str(), c, r.dv, 1e-4);
    }
}

static void layer_norm_case(int rows, int d) {
    const float eps = 1e-6f;
    std::vector<float> x = random_vec((size_t)rows * d, 3.f), gamma = random_vec(d, 1.f),
                       beta = random_vec(d, 1.f), dy = random_vec((size_t)rows * d, 1.f);
    std::vector<float> y((size_t)rows * d, NAN), out((size_t)rows * d + 2 * d, 0.f),
        stats(2 * rows, NAN);
    const Dim3 block{128, 1, 1};
    launch(Dim3{(unsigned)rows, 1, 1}, block, 0,
           [&] { m3ae_ln_fwd(x.data(), gamma.data(), beta.data(), y.data(), d, eps); });
    launch(Dim3{(unsigned)rows, 1, 1}, block, 0, [&] {
        m3ae_ln_bwd_dx(x.data(), gamma.data(), dy.data(), out.data(), stats.data(), d, eps);
    });
    launch(Dim3{(unsigned)((d + 127) / 128), 1, 1}, block, 0, [&] {
        m3ae_ln_bwd_params(x.data(), dy.data(), stats.data(), out.data() + (size_t)rows * d,
                           out.data() + (size_t)rows * d + d, rows, d);
    });
    std::vector<double> wy((size_t)rows * d), wout((size_t)rows * d + 2 * d, 0);
    for (int r = 0; r < rows; ++r) {
        double mean = 0, var = 0;
        for (int c = 0; c < d; ++c) mean += x[r * d + c];
        mean /= d;
        for (int c = 0; c < d; ++c) var += (x[r * d + c] - mean) * (x[r * d + c] - mean);
        var /= d;
        const double rstd = 1 / std::sqrt(var + eps);
        double a = 0, bx = 0;
        for (int c = 0; c < d; ++c) {
            const double xh = (x[r * d + c] - mean) * rstd, gg = dy[r * d + c] * gamma[c];
            wy[r * d + c] = xh * gamma[c] + beta[c];
            a += gg;
            bx += gg * xh;
            wout[(size_t)rows * d + c] += dy[r * d + c] * xh;
            wout[(size_t)rows * d + d + c] += dy[r * d + c];
        }
        for (int c = 0; c < d; ++c) {
            const double xh = (x[r * d + c] - mean) * rstd;
            wout[r * d + c] = rstd * (dy[r * d + c] * gamma[c] - a / d - xh * bx / d);
        }
    }
    char name[96];
    std::snprintf(name, sizeof name, "layer_norm %dx%d", rows, d);
    check((std::string(name) + " out").c_str(), y, wy, 1e-5);
    check((std::string(name) + " dx|dgamma|dbeta").c_str(), out, wout, 1e-4);
}

static void gelu_case(long long n) {
    std::vector<float> x = random_vec(n, 4.f), dy = random_vec(n, 1.f), y(n, NAN), dx(n, NAN);
    const unsigned blocks = (unsigned)std::fmin((n + 255) / 256, 65535.0);
    launch(Dim3{blocks, 1, 1}, Dim3{256, 1, 1}, 0, [&] { m3ae_gelu_fwd(x.data(), y.data(), n); });
    launch(Dim3{blocks, 1, 1}, Dim3{256, 1, 1}, 0,
           [&] { m3ae_gelu_bwd(x.data(), dy.data(), dx.data(), n); });
    std::vector<double> wy(n), wdx(n);
    const double c = std::sqrt(2 / std::numbers::pi);
    for (long long i = 0; i < n; ++i) {
        const double v = x[i], t = std::tanh(c * (v + 0.044715 * v * v * v));
        wy[i] = 0.5 * v * (1 + t);
        wdx[i] = dy[i] * (0.5 * (1 + t) + 0.5 * v * (1 - t * t) * c * (1 + 3 * 0.044715 * v * v));
    }
    char name[64];
    std::snprintf(name, sizeof name, "gelu n%lld", n);
    check((std::string(name) + " out").c_str(), y, wy, 1e-5);
    check((std::string(name) + " dx").c_str(), dx, wdx, 1e-4);
}

// ---------------------------------------------------------------------------------------------
// Text head (launch geometry and vocabulary split as mod.rs).

constexpr int TH_TARGET_BLOCKS = 512, TH_FWD_CHUNKS = 64, TH_DH_CHUNKS = 16, TOP_K_CHUNKS = 16;
constexpr size_t TH_TILE_BYTES = sizeof(LogitTile);
constexpr size_t TH_SLICE_BYTES = TH_ROWS * (TH_WORDS + 1) * sizeof(float);

struct Split {
    int per, chunks;
};
// Vocabulary chunks of a grid (chunks, ceil(m / TH_ROWS)): about TH_TARGET_BLOCKS blocks, at most
// max_chunks chunks; a chunk is `per` consecutive word tiles.
static Split vocab_split(int v, int m, int max_chunks) {
    const int tiles = (v + TH_WORDS - 1) / TH_WORDS, row_tiles = (m + TH_ROWS - 1) / TH_ROWS;
    const int want = std::min(
        std::clamp((TH_TARGET_BLOCKS + row_tiles - 1) / row_tiles, 1, max_chunks), tiles);
    const int per = (tiles + want - 1) / want;
    return Split{per, (tiles + per - 1) / per};
}

struct HeadOut {
    float loss, acc;
    std::vector<float> dh, dw, db;
};

// The CUDA op: forward (3 launches) and backward (3 launches) on the rows of non-zero weight,
// incoming gradient g.
static HeadOut head_kernels(int n, int d, int v, const std::vector<float>& h,
                            const std::vector<float>& w, const std::vector<float>& b,
                            const std::vector<int>& targets, const std::vector<float>& weights,
                            float g) {
    std::vector<int> rows, tg;
    std::vector<float> wg;
    for (int i = 0; i < n; ++i)
        if (weights[i] != 0.f) {
            rows.push_back(i);
            tg.push_back(targets[i]);
            wg.push_back(weights[i]);
        }
    const int m = (int)rows.size();
    HeadOut o{0.f, 0.f, std::vector<float>((size_t)n * d, 0.f),
              std::vector<float>((size_t)v * d, 0.f), std::vector<float>(v, 0.f)};
    if (m == 0) return o;
    const Dim3 block{TH_THREADS, 1, 1};
    const unsigned row_tiles = (m + TH_ROWS - 1) / TH_ROWS;
    const unsigned row_blocks = (m + TH_THREADS - 1) / TH_THREADS;
    const Split fs = vocab_split(v, m, TH_FWD_CHUNKS);
    std::vector<float> stats((size_t)m * fs.chunks * 4, NAN), row_max(m, NAN), row_log_sum(m, NAN),
        terms(2 * m, NAN), out(2, NAN);
    std::vector<int> info((size_t)m * fs.chunks * 2, -7);
    launch(Dim3{(unsigned)fs.chunks, row_tiles, 1}, block, TH_TILE_BYTES, [&] {
        m3ae_text_head_fwd(h.data(), rows.data(), tg.data(), m, w.data(), b.data(), v, d, fs.per,
                           stats.data(), info.data());
    });
    launch(Dim3{row_blocks, 1, 1}, block, 0, [&] {
        m3ae_text_head_fwd_merge(stats.data(), info.data(), tg.data(), m, fs.chunks, fs.per,
                                 row_max.data(), row_log_sum.data(), terms.data());
    });
    launch(Dim3{1, 1, 1}, block, 0,
           [&] { m3ae_text_head_fwd_sum(terms.data(), wg.data(), m, out.data()); });
    o.loss = out[0];
    o.acc = out[1];

    const float grad[2] = {g, 0.f};
    const unsigned tiles = (v + TH_WORDS - 1) / TH_WORDS;
    launch(Dim3{tiles, 1, 1}, block, TH_TILE_BYTES + TH_SLICE_BYTES, [&] {
        m3ae_text_head_bwd_dw(h.data(), rows.data(), tg.data(), wg.data(), row_max.data(),
                              row_log_sum.data(), grad, m, w.data(), b.data(), v, d, o.dw.data(),
                              o.db.data());
    });
    const Split hs = vocab_split(v, m, TH_DH_CHUNKS);
    std::vector<float> partials((size_t)hs.chunks * m * d, 0.f);
    launch(Dim3{(unsigned)hs.chunks, row_tiles, 1}, block, TH_TILE_BYTES + TH_SLICE_BYTES, [&] {
        m3ae_text_head_bwd_dh(h.data(), rows.data(), tg.data(), wg.data(), row_max.data(),
                              row_log_sum.data(), grad, m, w.data(), b.data(), v, d, hs.per,
                              partials.data());
    });
    const long long md = (long long)m * d;
    const unsigned blocks = (unsigned)std::min<long long>((md + 255) / 256, 65535);
    launch(Dim3{blocks, 1, 1}, Dim3{256, 1, 1}, 0, [&] {
        m3ae_text_head_bwd_dh_sum(partials.data(), rows.data(), m, d, hs.chunks, o.dh.data());
    });
    return o;
}

struct HeadRef {
    double loss = 0, acc = 0;
    std::vector<double> dh, dw, db;
};

// Double-precision reference over the rows of non-zero weight (a NaN logit makes the loss NaN
// and the row never correct).
static HeadRef head_reference(int n, int d, int v, const std::vector<float>& h,
                              const std::vector<float>& w, const std::vector<float>& b,
                              const std::vector<int>& targets, const std::vector<float>& weights,
                              double g) {
    HeadRef r;
    r.dh.assign((size_t)n * d, 0);
    r.dw.assign((size_t)v * d, 0);
    r.db.assign(v, 0);
    std::vector<double> s(v);
    for (int i = 0; i < n; ++i) {
        if (weights[i] == 0.f) continue;
        double mx = -INFINITY;
        int arg = 0;
        bool bad = false;
        for (int j = 0; j < v; ++j) {
            double x = b[j];
            for (int k = 0; k < d; ++k) x += (double)h[(size_t)i * d + k] * w[(size_t)j * d + k];
            s[j] = x;
            bad |= std::isnan(x);
            if (x > mx) {
                mx = x;
                arg = j;
            }
        }
        double z = 0;
        for (int j = 0; j < v; ++j) z += std::exp(s[j] - mx);
        const int t = targets[i];
        r.loss += weights[i] * (bad ? NAN : mx + std::log(z) - s[t]);
        if (!bad && arg == t) r.acc += weights[i];
        for (int j = 0; j < v; ++j) {
            const double gl = g * weights[i] * (std::exp(s[j] - mx) / z - (j == t));
            r.db[j] += gl;
            for (int k = 0; k < d; ++k) {
                r.dh[(size_t)i * d + k] += gl * w[(size_t)j * d + k];
                r.dw[(size_t)j * d + k] += gl * h[(size_t)i * d + k];
            }
        }
    }
    return r;
}

static void check_scalar(const std::string& what, double got, double want, double tol) {
    const double err = std::fabs(got - want) / std::fmax(std::fabs(want), 1e-3);
    const bool ok = err <= tol || (std::isnan(got) && std::isnan(want));
    if (!ok) ++failures;
    std::printf("%s %-58s got %.9g want %.9g\n", ok ? "ok  " : "FAIL", what.c_str(), got, want);
}

static void expect(const std::string& what, bool ok) {
    if (!ok) ++failures;
    std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
}

static std::vector<int> random_targets(int n, int v) {
    std::vector<int> t(n);
    for (auto& x : t) x = std::min(v - 1, (int)((uniform() + 1.f) * 0.5f * v));
    return t;
}

// M3AE's weights: sample s of `len` tokens has s % (len / 2) padding tokens at its end; with
// `masked_only` only the positions i % 4 != 0 count; each sample's weights sum to 1 / samples.
static std::vector<float> m3ae_weights(int samples, int len, bool masked_only) {
    std::vector<float> out((size_t)samples * len);
    for (int s = 0; s < samples; ++s) {
        int count = 0;
        for (int i = 0; i < len; ++i) {
            const bool pad = i >= len - s % std::max(len / 2, 1);
            const bool sel = !masked_only || i % 4 != 0;
            out[s * len + i] = (sel && !pad) ? 1.f : 0.f;
            count += sel && !pad;
        }
        for (int i = 0; i < len; ++i)
            out[s * len + i] /= std::max((float)count, 1e-5f) * samples;
    }
    return out;
}

static void text_head_case(const char* name, int n, int d, int v, const std::vector<float>& h,
                           const std::vector<float>& w, const std::vector<float>& b,
                           const std::vector<int>& t, const std::vector<float>& rw,
                           double grad_tol = 1e-4) {
    const float g = 1.5f;
    const HeadOut o = head_kernels(n, d, v, h, w, b, t, rw, g);
    const HeadRef r = head_reference(n, d, v, h, w, b, t, rw, g);
    char buf[160];
    std::snprintf(buf, sizeof buf, "text_head %s n%d d%d v%d", name, n, d, v);
    const std::string base(buf);
    check_scalar(base + " loss", o.loss, r.loss, 1e-5);
    check_scalar(base + " accuracy", o.acc, r.acc, 1e-6);
    check((base + " dh").c_str(), o.dh, r.dh, grad_tol);
    check((base + " dw").c_str(), o.dw, r.dw, grad_tol);
    check((base + " db").c_str(), o.db, r.db, grad_tol);
    // rows of weight 0 get exactly zero gradients
    bool zero = true;
    for (int i = 0; i < n; ++i)
        if (rw[i] == 0.f)
            for (int k = 0; k < d; ++k) zero &= o.dh[(size_t)i * d + k] == 0.f;
    expect(base + " rows of weight 0: zero dh", zero);
}

// Random inputs; the targets of every third row are its arg-max, so the accuracy is not 0.
static void text_head_random(const char* name, int n, int d, int v, std::vector<float> rw,
                             float scale = 1.f, float bias_scale = 0.5f, double tol = 1e-4) {
    const auto h = random_vec((size_t)n * d, scale), w = random_vec((size_t)v * d, scale * 0.5f),
               b = random_vec(v, bias_scale);
    auto t = random_targets(n, v);
    for (int i = 0; i < n; i += 3) {
        double mx = -INFINITY;
        for (int j = 0; j < v; ++j) {
            double x = b[j];
            for (int k = 0; k < d; ++k) x += (double)h[(size_t)i * d + k] * w[(size_t)j * d + k];
            if (x > mx) {
                mx = x;
                t[i] = j;
            }
        }
    }
    text_head_case(name, n, d, v, h, w, b, t, rw, tol);
}

// Zero hidden states and equal biases of the words `tied` (2 above all others): every row's
// arg-max is the first of them (rows targeting another tied word miss).
static void text_head_ties(int v, std::vector<int> tied, std::vector<int> t) {
    const int n = 4, d = 8;
    std::vector<float> b(v, 0.f);
    for (int j : tied) b[j] = 2.f;
    const std::vector<float> h(n * d, 0.f), w = random_vec(v * d, 1.f), rw(n, 0.25f);
    const HeadOut o = head_kernels(n, d, v, h, w, b, t, rw, 1.f);
    char buf[96];
    std::snprintf(buf, sizeof buf, "text_head ties v%d: accuracy (word %d wins)", v, tied[0]);
    check_scalar(buf, o.acc, 0.25 * std::count(t.begin(), t.end(), tied[0]), 1e-7);
    std::snprintf(buf, sizeof buf, "ties-v%d", v);
    text_head_case(buf, n, d, v, h, w, b, t, rw);
}

static void text_head_cases() {
    text_head_random("masked-only", 50, 40, 300, m3ae_weights(5, 10, true));
    text_head_random("all-token", 50, 40, 300, m3ae_weights(5, 10, false));
    text_head_random("one-tile", 7, 16, 64, std::vector<float>(7, 1.f));
    text_head_random("single-word", 3, 5, 1, std::vector<float>(3, 0.5f));
    {
        // two row tiles, two slices of 64 dimensions in the backward
        std::vector<float> rw(90);
        for (auto& x : rw) x = uniform() > -0.6f ? 0.01f : 0.f;  // about 20% of weight 0
        text_head_random("two-row-tiles", 90, 70, 300, rw);
    }
    {
        // 67 word tiles: forward chunks of 2 tiles (the last of 1), dh chunks of 5 (the last of 2)
        std::vector<float> rw(12, 0.1f);
        rw[3] = rw[7] = 0.f;
        text_head_random("chunks-of-tiles", 12, 16, 4250, rw);
    }
    // logits of order 1e3-1e4: exp overflows without the running maximum
    text_head_random("large-logits", 10, 16, 600, std::vector<float>(10, 0.1f), 30.f, 1e3f, 1e-3);
    {
        // all rows of weight 0: nothing runs, zero loss, accuracy and gradients
        const int n = 10, d = 8, v = 100;
        const HeadOut o = head_kernels(n, d, v, random_vec(n * d, 1.f), random_vec(v * d, 1.f),
                                       random_vec(v, 1.f), random_targets(n, v),
                                       std::vector<float>(n, 0.f), 1.5f);
        bool zero = o.loss == 0.f && o.acc == 0.f;
        for (auto* g : {&o.dh, &o.dw, &o.db})
            for (float x : *g) zero &= x == 0.f;
        expect("text_head all rows of weight 0: zero loss, accuracy, gradients", zero);
    }
    // argmax ties go to the lower word: inside a tile (words 3 and 6, scanned by different
    // threads), across the tiles of one chunk (69: tile 1 of forward chunk 0 when V = 4250) and
    // across chunks (600, 4200)
    text_head_ties(700, {3, 6, 600}, {3, 600, 6, 3});
    text_head_ties(4250, {3, 6, 69, 4200}, {3, 69, 4200, 3});
    {
        // NaN: a NaN row of weight 0 changes nothing; a NaN row that counts makes the loss and
        // the weight gradients NaN and is never correct; a NaN word makes every row NaN
        const int n = 6, d = 8, v = 300;
        auto h = random_vec(n * d, 1.f);
        const auto w = random_vec(v * d, 0.5f), b = random_vec(v, 0.5f);
        auto t = random_targets(n, v);
        std::vector<float> rw(n, 0.2f);
        rw[2] = 0.f;
        auto clean = h;
        for (int k = 0; k < d; ++k) {
            h[2 * d + k] = NAN;
            clean[2 * d + k] = 0.f;
        }
        const HeadOut o = head_kernels(n, d, v, h, w, b, t, rw, 1.5f);
        const HeadRef r = head_reference(n, d, v, clean, w, b, t, rw, 1.5);
        check_scalar("text_head NaN row of weight 0: loss", o.loss, r.loss, 1e-5);
        check("text_head NaN row of weight 0: dw", o.dw, r.dw, 1e-4);
        check("text_head NaN row of weight 0: dh", o.dh, r.dh, 1e-4);

        // row 2 counts with row 4; row 4's target is its arg-max, so the accuracy is its weight
        {
            double mx = -INFINITY;
            for (int j = 0; j < v; ++j) {
                double x = b[j];
                for (int k = 0; k < d; ++k) x += (double)h[4 * d + k] * w[(size_t)j * d + k];
                if (x > mx) {
                    mx = x;
                    t[4] = j;
                }
            }
        }
        std::vector<float> rw2(n, 0.f);
        rw2[2] = 1.f;
        rw2[4] = 0.5f;
        std::vector<float> rw4(n, 0.f);
        rw4[4] = 0.5f;
        const HeadRef r4 = head_reference(n, d, v, clean, w, b, t, rw4, 1.5);
        const HeadOut o2 = head_kernels(n, d, v, h, w, b, t, rw2, 1.5f);
        bool nan_w = true;
        for (float x : o2.dw) nan_w &= std::isnan(x);
        for (float x : o2.db) nan_w &= std::isnan(x);
        expect("text_head NaN row that counts: NaN loss, NaN dw and db",
               std::isnan(o2.loss) && nan_w);
        check_scalar("text_head NaN row that counts: accuracy of the other row", o2.acc, r4.acc,
                     1e-7);
        expect("text_head NaN row that counts: the other row is a hit", r4.acc == 0.5);
        std::vector<float> dh4(o2.dh.begin() + 4 * d, o2.dh.begin() + 5 * d);
        std::vector<double> want4(r4.dh.begin() + 4 * d, r4.dh.begin() + 5 * d);
        check("text_head NaN row that counts: dh of another row", dh4, want4, 1e-4);

        auto wn = w;
        wn[5 * d] = NAN;
        const HeadOut o3 = head_kernels(n, d, v, clean, wn, b, t, std::vector<float>(n, 1.f), 1.f);
        expect("text_head NaN word: NaN loss, accuracy 0", std::isnan(o3.loss) && o3.acc == 0.f);
    }
}

// Top-k: the kernels against a sort of the double-precision logits (larger first, equal logits
// by the lower word, NaN last).
static void top_k_case(const char* name, int n, int d, int v, const std::vector<float>& h,
                       const std::vector<float>& w, const std::vector<float>& b,
                       const std::vector<int>& rows, int k) {
    const int m = (int)rows.size();
    const Split sp = vocab_split(v, m, TOP_K_CHUNKS);
    std::vector<float> pv((size_t)m * sp.chunks * k, NAN), ov((size_t)m * k, NAN);
    std::vector<int> pi((size_t)m * sp.chunks * k, -7), oi((size_t)m * k, -7);
    const Dim3 block{TH_THREADS, 1, 1};
    launch(Dim3{(unsigned)sp.chunks, (unsigned)((m + TH_ROWS - 1) / TH_ROWS), 1}, block,
           TH_TILE_BYTES, [&] {
               m3ae_text_top_k(h.data(), rows.data(), m, w.data(), b.data(), v, d, k, sp.per,
                               pv.data(), pi.data());
           });
    launch(Dim3{(unsigned)((m + TH_THREADS - 1) / TH_THREADS), 1, 1}, block, 0, [&] {
        m3ae_text_top_k_merge(pv.data(), pi.data(), m, sp.chunks, k, ov.data(), oi.data());
    });
    bool ids_ok = true, vals_ok = true;
    double worst = 0;
    for (int q = 0; q < m; ++q) {
        std::vector<double> s(v);
        std::vector<int> order(v);
        for (int j = 0; j < v; ++j) {
            double x = b[j];
            for (int c = 0; c < d; ++c)
                x += (double)h[(size_t)rows[q] * d + c] * w[(size_t)j * d + c];
            s[j] = x;
            order[j] = j;
        }
        std::stable_sort(order.begin(), order.end(), [&](int a, int c) {
            return !std::isnan(s[a]) && (std::isnan(s[c]) || s[a] > s[c]);
        });
        const int kk = std::min(k, v);
        for (int p = 0; p < k; ++p) {
            const int got = oi[(size_t)q * k + p];
            if (p >= kk) {
                ids_ok &= got == -1;
                continue;
            }
            ids_ok &= got == order[p];
            const double want = s[order[p]], gv = ov[(size_t)q * k + p];
            if (std::isnan(want)) {
                vals_ok &= std::isnan(gv);
            } else {
                const double e = std::fabs(gv - want) / std::fmax(1.0, std::fabs(want));
                worst = std::fmax(worst, e);
                vals_ok &= e <= 1e-5;
            }
        }
    }
    char buf[200];
    std::snprintf(buf, sizeof buf, "text_top_k %s n%d d%d v%d rows%d k%d: ids; values (err %.1e)",
                  name, n, d, v, m, k, worst);
    expect(buf, ids_ok && vals_ok);
}

static void top_k_cases() {
    {
        // three words with equal logits above every other (same weight row and bias): lower first
        const int n = 20, d = 24, v = 300;
        const auto h = random_vec(n * d, 1.f);
        auto w = random_vec(v * d, 0.5f);
        auto b = random_vec(v, 0.5f);
        for (int j : {200, 250})
            for (int c = 0; c < d; ++c) w[j * d + c] = w[10 * d + c];
        b[10] = b[200] = b[250] = 50.f;
        top_k_case("ties", n, d, v, h, w, b, {3, 0, 19, 3, 7}, 5);
        top_k_case("k1", n, d, v, h, w, b, {5, 6}, 1);
        top_k_case("random", n, d, v, random_vec(n * d, 2.f), w, random_vec(v, 0.5f),
                   {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11}, TOP_K_MAX);
    }
    {
        // a NaN row yields NaN logits, lowest words first; a NaN word comes after every number;
        // k above V returns V words
        const int n = 4, d = 8, v = 6;
        auto h = random_vec(n * d, 1.f);
        for (int c = 0; c < d; ++c) h[2 * d + c] = NAN;
        auto w = random_vec(v * d, 1.f);
        w[5 * d + 3] = NAN;
        top_k_case("NaN", n, d, v, h, w, random_vec(v, 0.5f), {0, 2, 3, 2}, 8);
    }
    {
        // many tiles per chunk; a tie between words of different chunks; 70 rows (two row tiles)
        const int n = 70, d = 20, v = 5000;
        const auto h = random_vec(n * d, 1.f);
        auto w = random_vec(v * d, 0.5f);
        auto b = random_vec(v, 0.5f);
        for (int c = 0; c < d; ++c) w[4900 * d + c] = w[3 * d + c];
        b[3] = b[4900] = 40.f;
        std::vector<int> rows(n);
        for (int i = 0; i < n; ++i) rows[i] = n - 1 - i;
        top_k_case("chunks", n, d, v, h, w, b, rows, 3);
    }
}

int main() {
    for (int pad = 0; pad < 4; ++pad) {
        attention_case(separate(2, 3, 37, 8), pad, 1.f);
        attention_case(separate(1, 2, 1, 32), pad, 1.f);
        attention_case(separate(1, 1, 45, 80), pad, 1.f);
        attention_case(packed(2, 2, 19, 16), pad, 1.f);
        attention_case(packed(1, 3, 1, 8), pad, 1.f);
    }
    attention_case(separate(2, 2, 33, 16), 1, 30.f);  // scores of order 1e2-1e3
    attention_case(packed(1, 2, 70, 64), 1, 1.f);
    layer_norm_case(5, 384);
    layer_norm_case(3, 100);
    layer_norm_case(1, 1);
    layer_norm_case(2, 1000);
    gelu_case(1000);
    gelu_case(1);
    text_head_cases();
    top_k_cases();
    std::printf("%d failure(s)\n", failures);
    return failures ? 1 : 0;
}
