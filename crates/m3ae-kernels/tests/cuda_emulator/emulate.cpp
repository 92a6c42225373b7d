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
    std::printf("%d failure(s)\n", failures);
    return failures ? 1 : 0;
}
