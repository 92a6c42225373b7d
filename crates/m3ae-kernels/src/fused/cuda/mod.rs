//! CUDA implementations of the fused ops (feature `cuda`): masked attention (separate q, k, v and
//! the packed qkv projection), LayerNorm and tanh-GELU, forward and backward; the text-head loss
//! (weighted cross-entropy and accuracy, forward and backward) and the text-head top-k.
//!
//! The kernels live in `kernels.cu` and are compiled once per process with NVRTC (no `nvcc` at
//! build time; PTX is JIT-compiled by the driver for the GPU at hand). Each op is a candle custom
//! op whose `cuda_fwd` launches the kernels on candle's stream; its backward is another custom op
//! on the same stream. Tensors are contiguous f32 (the public functions in [`super`] convert).
//! The dense layer has no CUDA kernel here: on CUDA it runs the reference path (cuBLAS matmul).
//!
//! Attention keeps one score row per warp in shared memory, so the sequence length is bounded:
//! [`attention_fits`] says whether a shape fits; callers fall back to the reference path when not.
//!
//! **Text head.** Like the CPU op (`fused/text_head.rs`), the loss works on the `M` rows of
//! non-zero weight only (their indices, targets and weights are uploaded; the kernels read the
//! hidden rows through the index list) and never stores an `N x V` or `M x V` tensor. Every
//! kernel computes `64 x 64` logit tiles (rows x words) with a shared-memory tiled product
//! (depth steps of 16, 256 threads, 4 x 4 logits per thread):
//! - forward: blocks (vocabulary chunk, row tile) walk their word tiles with an online
//!   log-sum-exp per row (four threads per row), keeping the row's maximum, sum of exp, first
//!   arg-max, target logit and NaN flag per chunk (at most 64 chunks); one thread per row merges
//!   the chunks in vocabulary order and saves the row's maximum and log-sum for the backward; one
//!   block sums `w_r * nll_r` and the weighted hits in double, in a fixed order;
//! - backward: the logit tiles are recomputed and turned into `G = g w_r (softmax - onehot)` in
//!   shared memory; one block per word tile walks every row tile in order and accumulates its
//!   rows of dW (`G^T H`) and its entries of db; blocks (chunk, row tile) accumulate `G W` into
//!   one `M x D` partial of dH per vocabulary chunk (at most 16), which a last kernel sums in
//!   chunk order and scatters to the selected rows.
//!
//! No atomics: every output element is owned by one block and summed in a fixed order, and the
//! split into chunks depends on the shapes alone, so results are deterministic run to run and
//! from GPU to GPU. Accuracy, ties (the lowest word) and NaN (a row with a NaN logit has a NaN
//! loss and NaN gradients and is never correct) follow the CPU op. The top-k runs the same tiles
//! (rows in any order, repeats allowed), one thread per row keeping its best `k` per chunk, merged
//! in vocabulary order; `k` is at most [`TOP_K_MAX`] (above it [`super::text_head_top_k`] uses
//! the reference path). The logits come from the kernels' own summation order, so they differ
//! from the CPU's by rounding, and words whose logits differ by rounding alone may rank
//! differently than on the CPU.

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchArgs, LaunchConfig,
    PushKernelArg, SyncOnDrop,
};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Storage,
    Tensor,
};
use std::sync::{Arc, Mutex, OnceLock};

/// The CUDA source of every kernel.
pub const SOURCE: &str = include_str!("kernels.cu");

/// Entry points `SOURCE` defines.
pub const KERNELS: [&str; 16] = [
    "m3ae_attn_fwd",
    "m3ae_attn_bwd_dq",
    "m3ae_attn_bwd_dkdv",
    "m3ae_ln_fwd",
    "m3ae_ln_bwd_dx",
    "m3ae_ln_bwd_params",
    "m3ae_gelu_fwd",
    "m3ae_gelu_bwd",
    "m3ae_text_head_fwd",
    "m3ae_text_head_fwd_merge",
    "m3ae_text_head_fwd_sum",
    "m3ae_text_head_bwd_dw",
    "m3ae_text_head_bwd_dh",
    "m3ae_text_head_bwd_dh_sum",
    "m3ae_text_top_k",
    "m3ae_text_top_k_merge",
];

const MODULE: &str = "m3ae-kernels";
/// Warps (query or key rows) per attention block.
const WARPS: usize = 4;
/// Shared memory a block may use without opting in to more.
const MAX_SHARED_BYTES: usize = 48 * 1024;
const LN_THREADS: u32 = 128;
const ELEMENTWISE_THREADS: u32 = 256;

/// PTX of [`SOURCE`], compiled with NVRTC on first use (works without a GPU).
pub fn ptx() -> crate::Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    let compiled = PTX.get_or_init(|| {
        candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(SOURCE)
            .map(|p| p.to_src())
            .map_err(|e| format!("{e:?}"))
    });
    match compiled {
        Ok(p) => Ok(p.as_str()),
        Err(e) => Err(candle_core::Error::Msg(format!(
            "m3ae-kernels: NVRTC could not compile the CUDA kernels: {e}"
        ))
        .into()),
    }
}

fn launch_error(e: crate::Error) -> candle_core::Error {
    match e {
        crate::Error::Candle(e) => e,
        other => candle_core::Error::Msg(other.to_string()),
    }
}

fn kernel(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
    let ptx = ptx().map_err(launch_error)?;
    Ok(dev
        .get_or_load_custom_func(name, MODULE, ptx)?
        .into_cuda_function())
}

/// Shared memory bytes per block of the most demanding attention kernel (dk/dv).
fn attention_shared_bytes(l: usize, dh: usize) -> usize {
    WARPS * (2 * l + 2 * dh) * std::mem::size_of::<f32>()
}

/// The first CUDA device, or an error naming why there is none. The GPU tests are
/// `#[ignore]`d (run them on a GPU machine with a Rust toolchain: `cargo test -p m3ae-kernels
/// --features cuda --test cuda -- --ignored`; where there is none, as on the lent GPU machine,
/// `m3ae doctor --device cuda` checks the same kernels) and fail through this when run on a
/// machine without a GPU, instead of passing without checking anything.
pub fn first_gpu() -> candle_core::Result<candle_core::Device> {
    candle_core::Device::new_cuda(0).map_err(|e| {
        let e = e.to_string();
        candle_core::Error::Msg(format!(
            "no CUDA device ({})",
            e.lines().next().unwrap_or("")
        ))
    })
}

/// Whether the CUDA attention kernels take a sequence of `l` keys with heads of size `dh`
/// (one score row per warp must fit in shared memory: `l` up to about 1,500 at `dh = 64`).
pub fn attention_fits(l: usize, dh: usize) -> bool {
    attention_shared_bytes(l, dh) <= MAX_SHARED_BYTES
}

/// The device pointer of a contiguous f32 input, with the guard that records its use.
fn input<'a>(
    s: &'a CudaStorage,
    l: &Layout,
    stream: &'a CudaStream,
    what: &str,
) -> Result<(u64, SyncOnDrop<'a>)> {
    let Some((start, _)) = l.contiguous_offsets() else {
        candle_core::bail!(
            "m3ae CUDA kernel: {what} is not contiguous ({:?})",
            l.shape()
        );
    };
    let (p, guard) = s.as_cuda_slice::<f32>()?.device_ptr(stream);
    Ok((p + (start * std::mem::size_of::<f32>()) as u64, guard))
}

fn cuda_storage<'a>(s: &'a Storage, what: &str) -> Result<&'a CudaStorage> {
    match s {
        Storage::Cuda(c) => Ok(c),
        _ => candle_core::bail!("m3ae CUDA kernel: {what} is not on a CUDA device"),
    }
}

fn f32_bytes(n: usize) -> u64 {
    (n * std::mem::size_of::<f32>()) as u64
}

fn cpu_refused(name: &str) -> Result<(CpuStorage, Shape)> {
    candle_core::bail!("{name}: the CUDA op was given a CPU tensor")
}

// ---------------------------------------------------------------------------------------------
// GELU

/// tanh-GELU on CUDA.
pub(crate) struct CudaGelu;

struct CudaGeluBwd;

fn elementwise_config(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(ELEMENTWISE_THREADS as usize).clamp(1, 65_535) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (ELEMENTWISE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl CustomOp1 for CudaGelu {
    fn name(&self) -> &'static str {
        "m3ae-cuda-gelu-tanh"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_refused(self.name())
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = s.device.clone();
        let stream = dev.cuda_stream();
        let n = l.shape().elem_count();
        let (x, _gx) = input(s, l, &stream, "gelu input")?;
        let mut y = alloc(&dev, n)?;
        {
            let (yp, _gy) = y.device_ptr_mut(&stream);
            let f = kernel(&dev, "m3ae_gelu_fwd")?;
            let mut b = stream.launch_builder(&f);
            let n64 = n as i64;
            b.arg(&x).arg(&yp).arg(&n64);
            // SAFETY: pointers and length describe live buffers of n f32 each.
            unsafe { b.launch(elementwise_config(n)) }.w()?;
        }
        Ok((CudaStorage::wrap_cuda_slice(y, dev), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op2_no_bwd(x, &CudaGeluBwd)?))
    }
}

impl CustomOp2 for CudaGeluBwd {
    fn name(&self) -> &'static str {
        "m3ae-cuda-gelu-tanh-bwd"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_refused(self.name())
    }

    fn cuda_fwd(
        &self,
        gs: &CudaStorage,
        gl: &Layout,
        xs: &CudaStorage,
        xl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        if gl.shape() != xl.shape() {
            candle_core::bail!("{}: {:?} vs {:?}", self.name(), gl.shape(), xl.shape());
        }
        let dev = xs.device.clone();
        let stream = dev.cuda_stream();
        let n = xl.shape().elem_count();
        let (x, _gx) = input(xs, xl, &stream, "gelu input")?;
        let (dy, _gd) = input(gs, gl, &stream, "gelu output gradient")?;
        let mut dx = alloc(&dev, n)?;
        {
            let (dxp, _g) = dx.device_ptr_mut(&stream);
            let f = kernel(&dev, "m3ae_gelu_bwd")?;
            let mut b = stream.launch_builder(&f);
            let n64 = n as i64;
            b.arg(&x).arg(&dy).arg(&dxp).arg(&n64);
            // SAFETY: as in the forward.
            unsafe { b.launch(elementwise_config(n)) }.w()?;
        }
        Ok((CudaStorage::wrap_cuda_slice(dx, dev), xl.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// LayerNorm

/// LayerNorm over the last axis on CUDA (statistics recomputed in the backward). The forward op
/// takes `x, gamma, beta` and returns `y`; the backward op (`backward: true`) takes
/// `x, gamma, dy` and returns `[dx (N D) | dgamma (D) | dbeta (D)]` flat.
pub(crate) struct CudaLayerNorm {
    pub(crate) eps: f32,
    pub(crate) backward: bool,
}

fn row_config(rows: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (u32::try_from(rows).map_err(candle_core::Error::wrap)?, 1, 1),
        block_dim: (LN_THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

impl CudaLayerNorm {
    /// Forward launch: `y = layer_norm(x) * gamma + beta`.
    fn forward(
        &self,
        dev: &CudaDevice,
        rows: usize,
        d: usize,
        (x, g, b): (u64, u64, u64),
    ) -> Result<CudaSlice<f32>> {
        let stream = dev.cuda_stream();
        let mut y = alloc(dev, rows * d)?;
        if rows > 0 {
            let (yp, _g) = y.device_ptr_mut(&stream);
            let d32 = i32::try_from(d).map_err(candle_core::Error::wrap)?;
            let f = kernel(dev, "m3ae_ln_fwd")?;
            let mut l = stream.launch_builder(&f);
            l.arg(&x).arg(&g).arg(&b).arg(&yp).arg(&d32).arg(&self.eps);
            // SAFETY: x, y hold rows x d floats, gamma and beta d.
            unsafe { l.launch(row_config(rows)?) }.w()?;
        }
        Ok(y)
    }

    /// Backward launches: dx per row (saving mean and rstd), then dgamma, dbeta per column.
    fn backward(
        &self,
        dev: &CudaDevice,
        rows: usize,
        d: usize,
        (x, g, dy): (u64, u64, u64),
    ) -> Result<CudaSlice<f32>> {
        let stream = dev.cuda_stream();
        let mut out = dev.alloc_zeros::<f32>((rows * d + 2 * d).max(1))?;
        let mut stats = dev.alloc_zeros::<f32>(2 * rows.max(1))?;
        if rows > 0 {
            let (op, _g1) = out.device_ptr_mut(&stream);
            let (sp, _g2) = stats.device_ptr_mut(&stream);
            let d32 = i32::try_from(d).map_err(candle_core::Error::wrap)?;
            let rows32 = i32::try_from(rows).map_err(candle_core::Error::wrap)?;
            let f = kernel(dev, "m3ae_ln_bwd_dx")?;
            let mut l = stream.launch_builder(&f);
            l.arg(&x)
                .arg(&g)
                .arg(&dy)
                .arg(&op)
                .arg(&sp)
                .arg(&d32)
                .arg(&self.eps);
            // SAFETY: x, dy, dx hold rows x d floats; stats 2 rows.
            unsafe { l.launch(row_config(rows)?) }.w()?;
            let dgamma = op + f32_bytes(rows * d);
            let dbeta = dgamma + f32_bytes(d);
            let f = kernel(dev, "m3ae_ln_bwd_params")?;
            let mut l = stream.launch_builder(&f);
            l.arg(&x)
                .arg(&dy)
                .arg(&sp)
                .arg(&dgamma)
                .arg(&dbeta)
                .arg(&rows32)
                .arg(&d32);
            let cfg = LaunchConfig {
                grid_dim: (d.div_ceil(LN_THREADS as usize) as u32, 1, 1),
                block_dim: (LN_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: dgamma, dbeta are the last 2 d floats of `out`.
            unsafe { l.launch(cfg) }.w()?;
        }
        Ok(out)
    }
}

impl CustomOp3 for CudaLayerNorm {
    fn name(&self) -> &'static str {
        if self.backward {
            "m3ae-cuda-layer-norm-bwd"
        } else {
            "m3ae-cuda-layer-norm"
        }
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_refused(self.name())
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
        ts: &CudaStorage,
        tl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let d = gl.shape().elem_count();
        let n = xl.shape().elem_count();
        let third_len = if self.backward { n } else { d };
        if d == 0 || !n.is_multiple_of(d) || tl.shape().elem_count() != third_len {
            candle_core::bail!(
                "{}: x {:?}, gamma {:?}, third input {:?} do not agree",
                self.name(),
                xl.shape(),
                gl.shape(),
                tl.shape()
            );
        }
        let dev = xs.device.clone();
        let stream = dev.cuda_stream();
        let (x, _g1) = input(xs, xl, &stream, "layer_norm x")?;
        let (g, _g2) = input(gs, gl, &stream, "layer_norm gamma")?;
        let (t, _g3) = input(ts, tl, &stream, "layer_norm beta / output gradient")?;
        if self.backward {
            let out = self.backward(&dev, n / d, d, (x, g, t))?;
            Ok((
                CudaStorage::wrap_cuda_slice(out, dev),
                Shape::from(n + 2 * d),
            ))
        } else {
            let y = self.forward(&dev, n / d, d, (x, g, t))?;
            Ok((CudaStorage::wrap_cuda_slice(y, dev), xl.shape().clone()))
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = gamma.elem_count();
        let n = x.elem_count();
        let op = CudaLayerNorm {
            eps: self.eps,
            backward: true,
        };
        let out = x.apply_op3_no_bwd(gamma, &grad.contiguous()?, &op)?;
        let dx = out.narrow(0, 0, n)?.reshape(x.shape())?;
        let dgamma = out.narrow(0, n, d)?.reshape(gamma.shape())?;
        let dbeta = out.narrow(0, n + d, d)?.reshape(gamma.shape())?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

// ---------------------------------------------------------------------------------------------
// Attention

/// Where the heads live: element strides of batch, head and row for the inputs (and their
/// gradients) and for the output, and the element offsets of k and v from q.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    b: usize,
    h: usize,
    l: usize,
    dh: usize,
    input: [i64; 3],
    output: [i64; 3],
    /// Offsets of k and v from q inside one buffer (packed qkv), or `None` (three buffers).
    packed: Option<(usize, usize)>,
}

impl Geometry {
    fn separate(b: usize, h: usize, l: usize, dh: usize) -> Self {
        let s = [(h * l * dh) as i64, (l * dh) as i64, dh as i64];
        Self {
            b,
            h,
            l,
            dh,
            input: s,
            output: s,
            packed: None,
        }
    }

    fn packed(b: usize, h: usize, l: usize, dh: usize) -> Self {
        let w = h * dh;
        Self {
            b,
            h,
            l,
            dh,
            input: [(l * 3 * w) as i64, dh as i64, (3 * w) as i64],
            output: [(l * w) as i64, dh as i64, w as i64],
            packed: Some((w, 2 * w)),
        }
    }

    fn rows(&self) -> usize {
        self.b * self.h * self.l
    }

    fn out_len(&self) -> usize {
        self.rows() * self.dh
    }

    fn config(&self, floats_per_warp: usize) -> Result<LaunchConfig> {
        let heads = u32::try_from(self.b * self.h).map_err(candle_core::Error::wrap)?;
        if heads > 65_535 {
            candle_core::bail!(
                "m3ae CUDA attention: batch x heads = {heads} exceeds the grid limit 65535"
            );
        }
        Ok(LaunchConfig {
            grid_dim: (self.l.div_ceil(WARPS) as u32, heads, 1),
            block_dim: ((WARPS * 32) as u32, 1, 1),
            shared_mem_bytes: (WARPS * floats_per_warp * std::mem::size_of::<f32>()) as u32,
        })
    }

    fn ints(&self) -> Result<[i32; 3]> {
        let c = |x: usize| i32::try_from(x).map_err(candle_core::Error::wrap);
        Ok([c(self.h)?, c(self.l)?, c(self.dh)?])
    }
}

/// Pushes the trailing kernel arguments every attention kernel shares:
/// `H, L, Dh, in_bs, in_hs, in_rs, out_bs, out_hs, out_rs, scale`.
fn push_geometry<'a>(b: &mut LaunchArgs<'a>, ints: &'a [i32; 3], g: &'a Geometry, scale: &'a f32) {
    b.arg(&ints[0]).arg(&ints[1]).arg(&ints[2]);
    b.arg(&g.input[0]).arg(&g.input[1]).arg(&g.input[2]);
    b.arg(&g.output[0]).arg(&g.output[1]).arg(&g.output[2]);
    b.arg(scale);
}

/// Allocates `len` floats (at least one: the driver refuses empty allocations); the caller's
/// kernel writes every element it reads.
fn alloc(dev: &CudaDevice, len: usize) -> Result<CudaSlice<f32>> {
    // SAFETY: callers write every element before it is read.
    unsafe { dev.alloc::<f32>(len.max(1)) }
}

/// Per-row softmax statistics of one forward pass.
struct Stats {
    max: CudaSlice<f32>,
    log_sum: CudaSlice<f32>,
}

/// What the forward and backward of one attention call share.
struct AttentionCore {
    scale: f32,
    /// `[B, L]` f32 on the device, 1 = padding key.
    padding: Option<Tensor>,
    stats: Mutex<Option<Arc<Stats>>>,
}

impl AttentionCore {
    fn new(scale: f64, padding: Option<Tensor>) -> Self {
        Self {
            scale: scale as f32,
            padding,
            stats: Mutex::new(None),
        }
    }

    /// Launches the forward on device pointers `q, k, v`; returns the output.
    fn forward(
        &self,
        dev: &CudaDevice,
        g: Geometry,
        (q, k, v): (u64, u64, u64),
    ) -> Result<CudaSlice<f32>> {
        let stream = dev.cuda_stream();
        let pad_guard = self.padding.as_ref().map(|p| p.storage_and_layout());
        let pad = match &pad_guard {
            Some((s, l)) => Some(input(
                cuda_storage(s, "key padding")?,
                l,
                &stream,
                "key padding",
            )?),
            None => None,
        };
        let (pad_ptr, has_pad) = match &pad {
            Some((p, _)) => (*p, 1i32),
            None => (q, 0i32),
        };
        let mut o = alloc(dev, g.out_len())?;
        let mut max = alloc(dev, g.rows())?;
        let mut log_sum = alloc(dev, g.rows())?;
        if g.rows() > 0 {
            let (op, _g1) = o.device_ptr_mut(&stream);
            let (mp, _g2) = max.device_ptr_mut(&stream);
            let (lp, _g3) = log_sum.device_ptr_mut(&stream);
            let ints = g.ints()?;
            let f = kernel(dev, "m3ae_attn_fwd")?;
            let mut b = stream.launch_builder(&f);
            b.arg(&q).arg(&k).arg(&v).arg(&pad_ptr).arg(&has_pad);
            b.arg(&op).arg(&mp).arg(&lp);
            push_geometry(&mut b, &ints, &g, &self.scale);
            // SAFETY: the geometry describes the buffers; shared memory sized per warp.
            unsafe { b.launch(g.config(g.l + g.dh)?) }.w()?;
        }
        *self.stats.lock().expect("stats lock") = Some(Arc::new(Stats { max, log_sum }));
        Ok(o)
    }

    fn stats(&self) -> Result<Arc<Stats>> {
        self.stats
            .lock()
            .expect("stats lock")
            .clone()
            .ok_or_else(|| {
                candle_core::Error::Msg("m3ae CUDA attention: backward before forward".into())
            })
    }
}

/// Attention on separate `[B, H, L, Dh]` q, k, v.
pub(crate) struct CudaAttention(AttentionCore);

/// Attention on the packed qkv projection `[B, L, 3 D]` -> `[B, L, D]`.
pub(crate) struct CudaQkvAttention {
    heads: usize,
    core: AttentionCore,
}

impl CudaAttention {
    pub(crate) fn new(scale: f64, padding: Option<Tensor>) -> Self {
        Self(AttentionCore::new(scale, padding))
    }
}

impl CudaQkvAttention {
    pub(crate) fn new(heads: usize, scale: f64, padding: Option<Tensor>) -> Self {
        Self {
            heads,
            core: AttentionCore::new(scale, padding),
        }
    }

    /// The packed geometry of a `[B, L, 3 D]` input (its width was checked by the caller).
    fn geometry(&self, shape: &Shape) -> Result<Geometry> {
        let (b, l, c3) = shape.dims3()?;
        Ok(Geometry::packed(
            b,
            self.heads,
            l,
            c3 / (3 * self.heads).max(1),
        ))
    }
}

impl CustomOp3 for CudaAttention {
    fn name(&self) -> &'static str {
        "m3ae-cuda-masked-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_refused(self.name())
    }

    fn cuda_fwd(
        &self,
        qs: &CudaStorage,
        ql: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
        vs: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        // q, k, v have one shape: `fused::masked_attention` checked it before building this op
        let (b, h, l, dh) = ql.shape().dims4()?;
        let dev = qs.device.clone();
        let stream = dev.cuda_stream();
        let (q, _g1) = input(qs, ql, &stream, "q")?;
        let (k, _g2) = input(ks, kl, &stream, "k")?;
        let (v, _g3) = input(vs, vl, &stream, "v")?;
        let o = self
            .0
            .forward(&dev, Geometry::separate(b, h, l, dh), (q, k, v))?;
        Ok((CudaStorage::wrap_cuda_slice(o, dev), ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, h, l, dh) = q.dims4()?;
        let op = AttentionBwd {
            inputs: vec![q.clone(), k.clone(), v.clone()],
            output: res.clone(),
            geometry: Geometry::separate(b, h, l, dh),
            scale: self.0.scale,
            padding: self.0.padding.clone(),
            stats: self.0.stats()?,
        };
        let g = grad.contiguous()?.apply_op1_no_bwd(&op)?;
        Ok((Some(g.get(0)?), Some(g.get(1)?), Some(g.get(2)?)))
    }
}

impl CustomOp1 for CudaQkvAttention {
    fn name(&self) -> &'static str {
        "m3ae-cuda-qkv-attention"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_refused(self.name())
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let g = self.geometry(l.shape())?;
        let (ko, vo) = g.packed.expect("packed geometry");
        let dev = s.device.clone();
        let stream = dev.cuda_stream();
        let (q, _g) = input(s, l, &stream, "qkv")?;
        let ptrs = (q, q + f32_bytes(ko), q + f32_bytes(vo));
        let o = self.core.forward(&dev, g, ptrs)?;
        Ok((
            CudaStorage::wrap_cuda_slice(o, dev),
            Shape::from((g.b, g.l, g.h * g.dh)),
        ))
    }

    fn bwd(&self, qkv: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = AttentionBwd {
            inputs: vec![qkv.clone()],
            output: res.clone(),
            geometry: self.geometry(qkv.shape())?,
            scale: self.core.scale,
            padding: self.core.padding.clone(),
            stats: self.core.stats()?,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

/// Backward of attention, applied to the output gradient. Output: `[3, B, H, L, Dh]` (separate)
/// or `[B, L, 3 D]` (packed), i.e. the gradients in the layout of the inputs.
struct AttentionBwd {
    /// q, k, v; or the packed qkv tensor alone (locked once).
    inputs: Vec<Tensor>,
    output: Tensor,
    geometry: Geometry,
    scale: f32,
    padding: Option<Tensor>,
    stats: Arc<Stats>,
}

impl CustomOp1 for AttentionBwd {
    fn name(&self) -> &'static str {
        "m3ae-cuda-attention-bwd"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_refused(self.name())
    }

    fn cuda_fwd(&self, ds: &CudaStorage, dl: &Layout) -> Result<(CudaStorage, Shape)> {
        let g = self.geometry;
        let dev = ds.device.clone();
        let stream = dev.cuda_stream();
        let guards: Vec<_> = self.inputs.iter().map(|t| t.storage_and_layout()).collect();
        let og = self.output.storage_and_layout();
        let pg = self.padding.as_ref().map(|p| p.storage_and_layout());
        let (dout, _g0) = input(ds, dl, &stream, "attention output gradient")?;
        let (o, _g1) = input(
            cuda_storage(&og.0, "attention output")?,
            og.1,
            &stream,
            "output",
        )?;
        let mut ptrs = Vec::with_capacity(3);
        let mut keep = Vec::with_capacity(3);
        let names: &[&str] = if guards.len() == 1 {
            &["qkv"]
        } else {
            &["q", "k", "v"]
        };
        for ((s, l), what) in guards.iter().zip(names) {
            let (p, guard) = input(cuda_storage(s, what)?, l, &stream, what)?;
            ptrs.push(p);
            keep.push(guard);
        }
        let (q, k, v) = match g.packed {
            Some((ko, vo)) => (ptrs[0], ptrs[0] + f32_bytes(ko), ptrs[0] + f32_bytes(vo)),
            None => (ptrs[0], ptrs[1], ptrs[2]),
        };
        let pad = match &pg {
            Some((s, l)) => Some(input(
                cuda_storage(s, "key padding")?,
                l,
                &stream,
                "key padding",
            )?),
            None => None,
        };
        let (pad_ptr, has_pad) = match &pad {
            Some((p, _)) => (*p, 1i32),
            None => (q, 0i32),
        };
        let (mp, _g2) = self.stats.max.device_ptr(&stream);
        let (lp, _g3) = self.stats.log_sum.device_ptr(&stream);
        let n = g.out_len();
        let mut grads = dev.alloc_zeros::<f32>((3 * n).max(1))?;
        let mut delta = dev.alloc_zeros::<f32>(g.rows().max(1))?;
        if g.rows() > 0 {
            let (gp, _g4) = grads.device_ptr_mut(&stream);
            let (dp, _g5) = delta.device_ptr_mut(&stream);
            let (dq, dk, dv) = match g.packed {
                Some((ko, vo)) => (gp, gp + f32_bytes(ko), gp + f32_bytes(vo)),
                None => (gp, gp + f32_bytes(n), gp + f32_bytes(2 * n)),
            };
            let ints = g.ints()?;
            let f = kernel(&dev, "m3ae_attn_bwd_dq")?;
            let mut b = stream.launch_builder(&f);
            b.arg(&q).arg(&k).arg(&v).arg(&pad_ptr).arg(&has_pad);
            b.arg(&o).arg(&dout).arg(&mp).arg(&lp).arg(&dq).arg(&dp);
            push_geometry(&mut b, &ints, &g, &self.scale);
            // SAFETY: the geometry describes every buffer; delta has one float per row.
            unsafe { b.launch(g.config(g.l + 2 * g.dh)?) }.w()?;
            let f = kernel(&dev, "m3ae_attn_bwd_dkdv")?;
            let mut b = stream.launch_builder(&f);
            b.arg(&q).arg(&k).arg(&v).arg(&pad_ptr).arg(&has_pad);
            b.arg(&dout).arg(&mp).arg(&lp).arg(&dp).arg(&dk).arg(&dv);
            push_geometry(&mut b, &ints, &g, &self.scale);
            // SAFETY: as above; runs after the dq kernel on the same stream (needs delta).
            unsafe { b.launch(g.config(2 * g.l + 2 * g.dh)?) }.w()?;
        }
        let shape = match g.packed {
            Some(_) => Shape::from((g.b, g.l, 3 * g.h * g.dh)),
            None => Shape::from((3, g.b, g.h, g.l, g.dh)),
        };
        Ok((CudaStorage::wrap_cuda_slice(grads, dev), shape))
    }
}

// ---------------------------------------------------------------------------------------------
// Text head

/// Rows and words of one logit tile, and threads per block, of the text-head kernels (as
/// `TH_ROWS`, `TH_WORDS`, `TH_THREADS` in `kernels.cu`).
const TH_ROWS: usize = 64;
const TH_WORDS: usize = 64;
const TH_THREADS: u32 = 256;
/// Depth of one step of the logit-tile product (`TH_DEPTH`).
const TH_DEPTH: usize = 16;
/// Shared memory of a logit tile (`struct LogitTile`: two `TH_DEPTH x 65` slices and the
/// `64 x 65` tile) and of the backward's extra `64 x 65` slice.
const TH_TILE_BYTES: usize = (2 * TH_DEPTH + TH_ROWS) * (TH_WORDS + 1) * std::mem::size_of::<f32>();
const TH_SLICE_BYTES: usize = TH_ROWS * (TH_WORDS + 1) * std::mem::size_of::<f32>();
/// Blocks a grid of the text-head kernels aims for (a few per SM of a large GPU). The split
/// depends on the shapes alone, so results do not depend on the GPU.
const TH_TARGET_BLOCKS: usize = 512;
/// Most vocabulary chunks of the forward's per-row partials, of the dH partials (each chunk
/// holds an `M x D` partial) and of the top-k partial lists.
const TH_FWD_CHUNKS: usize = 64;
const TH_DH_CHUNKS: usize = 16;
const TOP_K_CHUNKS: usize = 16;
/// Largest `k` of the CUDA top-k kernels (`TOP_K_MAX` in `kernels.cu`); `fused::text_head_top_k`
/// uses the reference path above it.
pub const TOP_K_MAX: usize = 32;

/// Consecutive word tiles per chunk and the number of chunks of a grid
/// `(chunks, ceil(M / TH_ROWS))`: about [`TH_TARGET_BLOCKS`] blocks, at most `max_chunks` chunks.
#[derive(Debug, Clone, Copy)]
struct VocabSplit {
    per: usize,
    chunks: usize,
}

impl VocabSplit {
    fn new(v: usize, m: usize, max_chunks: usize) -> Self {
        let tiles = v.div_ceil(TH_WORDS).max(1);
        let row_tiles = m.div_ceil(TH_ROWS).max(1);
        let want = TH_TARGET_BLOCKS
            .div_ceil(row_tiles)
            .clamp(1, max_chunks)
            .min(tiles);
        let per = tiles.div_ceil(want);
        Self {
            per,
            chunks: tiles.div_ceil(per),
        }
    }
}

fn to_i32(x: usize) -> Result<i32> {
    i32::try_from(x).map_err(candle_core::Error::wrap)
}

/// Launch of a text-head kernel on a grid `(x, y)` of [`TH_THREADS`]-thread blocks.
fn text_head_config(x: usize, y: usize, shared_bytes: usize) -> Result<LaunchConfig> {
    let (gx, gy) = (
        u32::try_from(x).map_err(candle_core::Error::wrap)?,
        u32::try_from(y).map_err(candle_core::Error::wrap)?,
    );
    if gy > 65_535 {
        candle_core::bail!("m3ae CUDA text head: {gy} row tiles exceed the grid limit 65535");
    }
    Ok(LaunchConfig {
        grid_dim: (gx, gy, 1),
        block_dim: (TH_THREADS, 1, 1),
        shared_mem_bytes: shared_bytes as u32,
    })
}

/// One thread per row (the merge kernels).
fn per_row_config(m: usize) -> Result<LaunchConfig> {
    text_head_config(m.div_ceil(TH_THREADS as usize), 1, 0)
}

/// Host values on the device (one zero when empty: the driver refuses empty allocations).
fn upload_i32(dev: &CudaDevice, v: &[i32]) -> Result<CudaSlice<i32>> {
    let v: Vec<i32> = if v.is_empty() { vec![0] } else { v.to_vec() };
    dev.clone_htod(&v)
}

fn upload_f32(dev: &CudaDevice, v: &[f32]) -> Result<CudaSlice<f32>> {
    let v: Vec<f32> = if v.is_empty() { vec![0.0] } else { v.to_vec() };
    dev.clone_htod(&v)
}

/// Allocates `len` i32 (at least one); the caller's kernel writes every element it reads.
fn alloc_i32(dev: &CudaDevice, len: usize) -> Result<CudaSlice<i32>> {
    // SAFETY: callers write every element before it is read.
    unsafe { dev.alloc::<i32>(len.max(1)) }
}

/// The selected rows of a text-head loss on the device, with what the forward keeps for the
/// backward: per row its maximum logit and `ln(sum exp(s - max))` (NaN for a row with a NaN
/// logit).
struct HeadSaved {
    m: usize,
    rows: CudaSlice<i32>,
    targets: CudaSlice<i32>,
    weights: CudaSlice<f32>,
    max: CudaSlice<f32>,
    log_sum: CudaSlice<f32>,
}

/// The text-head loss on CUDA: `(hidden [N, D], weight [V, D], bias [V])` -> `[loss, accuracy]`
/// over the rows of non-zero weight (their indices, targets and weights are given), as
/// `fused::text_head::FusedTextHeadLoss` on the CPU. One instance per call: it keeps the
/// statistics of its own forward pass. Memory beyond inputs and outputs: the forward's per-row
/// partials (`M x chunks x 6` values, at most 64 chunks) and, in the backward, at most 16 `M x D`
/// partials of dH; never anything of size `N x V` or `M x V`.
pub(crate) struct CudaTextHeadLoss {
    rows: Vec<i32>,
    targets: Vec<i32>,
    weights: Vec<f32>,
    saved: Mutex<Option<Arc<HeadSaved>>>,
}

impl CudaTextHeadLoss {
    /// The op for the rows `rows` (distinct indices into the `N` rows) with their targets and
    /// (non-zero) weights.
    pub(crate) fn new(rows: &[u32], targets: &[u32], weights: Vec<f32>) -> Result<Self> {
        let as_i32 = |v: &[u32]| -> Result<Vec<i32>> {
            v.iter()
                .map(|&x| i32::try_from(x).map_err(candle_core::Error::wrap))
                .collect()
        };
        Ok(Self {
            rows: as_i32(rows)?,
            targets: as_i32(targets)?,
            weights,
            saved: Mutex::new(None),
        })
    }

    /// Launches the three forward kernels; writes `[loss, accuracy]` to `out`.
    fn forward(
        &self,
        dev: &CudaDevice,
        (d, v): (usize, usize),
        (h, w, b): (u64, u64, u64),
        saved: &mut HeadSaved,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let stream = dev.cuda_stream();
        let m = saved.m;
        let split = VocabSplit::new(v, m, TH_FWD_CHUNKS);
        let mut stats = alloc(dev, m * split.chunks * 4)?;
        let mut info = alloc_i32(dev, m * split.chunks * 2)?;
        let mut terms = alloc(dev, 2 * m)?;
        let (m32, d32, v32) = (to_i32(m)?, to_i32(d)?, to_i32(v)?);
        let (per, chunks) = (to_i32(split.per)?, to_i32(split.chunks)?);
        let (rows, _g1) = saved.rows.device_ptr(&stream);
        let (targets, _g2) = saved.targets.device_ptr(&stream);
        let (weights, _g3) = saved.weights.device_ptr(&stream);
        let (mp, _g4) = saved.max.device_ptr_mut(&stream);
        let (lp, _g5) = saved.log_sum.device_ptr_mut(&stream);
        let (sp, _g6) = stats.device_ptr_mut(&stream);
        let (ip, _g7) = info.device_ptr_mut(&stream);
        let (tp, _g8) = terms.device_ptr_mut(&stream);
        let (op, _g9) = out.device_ptr_mut(&stream);

        let f = kernel(dev, "m3ae_text_head_fwd")?;
        let mut l = stream.launch_builder(&f);
        l.arg(&h).arg(&rows).arg(&targets).arg(&m32);
        l.arg(&w)
            .arg(&b)
            .arg(&v32)
            .arg(&d32)
            .arg(&per)
            .arg(&sp)
            .arg(&ip);
        let cfg = text_head_config(split.chunks, m.div_ceil(TH_ROWS), TH_TILE_BYTES)?;
        // SAFETY: hidden N x D (rows index it), weight V x D, bias V; stats and info hold
        // M x chunks x 4 and x 2 values; the tile fits the default shared memory.
        unsafe { l.launch(cfg) }.w()?;

        let f = kernel(dev, "m3ae_text_head_fwd_merge")?;
        let mut l = stream.launch_builder(&f);
        l.arg(&sp)
            .arg(&ip)
            .arg(&targets)
            .arg(&m32)
            .arg(&chunks)
            .arg(&per);
        l.arg(&mp).arg(&lp).arg(&tp);
        // SAFETY: one thread per row; max, log_sum hold M floats, terms 2 M.
        unsafe { l.launch(per_row_config(m)?) }.w()?;

        let f = kernel(dev, "m3ae_text_head_fwd_sum")?;
        let mut l = stream.launch_builder(&f);
        l.arg(&tp).arg(&weights).arg(&m32).arg(&op);
        // SAFETY: one block; out holds 2 floats.
        unsafe { l.launch(text_head_config(1, 1, 0)?) }.w()?;
        Ok(())
    }
}

impl CustomOp3 for CudaTextHeadLoss {
    fn name(&self) -> &'static str {
        "m3ae-cuda-text-head-loss"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_refused(self.name())
    }

    fn cuda_fwd(
        &self,
        hs: &CudaStorage,
        hl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (n, d) = hl.shape().dims2()?;
        let (v, d2) = wl.shape().dims2()?;
        if d != d2 || bl.shape().dims() != [v] {
            candle_core::bail!(
                "{}: hidden {:?}, weight {:?}, bias {:?} do not agree",
                self.name(),
                hl.shape(),
                wl.shape(),
                bl.shape()
            );
        }
        if self.rows.iter().any(|&r| r < 0 || r as usize >= n)
            || self.targets.iter().any(|&t| t < 0 || t as usize >= v)
        {
            candle_core::bail!("{}: a row or target index is out of range", self.name());
        }
        let dev = hs.device.clone();
        let stream = dev.cuda_stream();
        let m = self.rows.len();
        let mut saved = HeadSaved {
            m,
            rows: upload_i32(&dev, &self.rows)?,
            targets: upload_i32(&dev, &self.targets)?,
            weights: upload_f32(&dev, &self.weights)?,
            max: alloc(&dev, m)?,
            log_sum: alloc(&dev, m)?,
        };
        // no selected row: loss and accuracy 0
        let mut out = dev.alloc_zeros::<f32>(2)?;
        if m > 0 {
            let (h, _g1) = input(hs, hl, &stream, "text head hidden")?;
            let (w, _g2) = input(ws, wl, &stream, "text head weight")?;
            let (b, _g3) = input(bs, bl, &stream, "text head bias")?;
            self.forward(&dev, (d, v), (h, w, b), &mut saved, &mut out)?;
        }
        *self.saved.lock().expect("saved lock") = Some(Arc::new(saved));
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(2)))
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self
            .saved
            .lock()
            .expect("saved lock")
            .clone()
            .ok_or_else(|| {
                candle_core::Error::Msg("m3ae CUDA text head: backward before forward".into())
            })?;
        let (n, d) = hidden.dims2()?;
        let v = weight.dim(0)?;
        let op = TextHeadBwd {
            inputs: [hidden.clone(), weight.clone(), bias.clone()],
            saved,
        };
        let g = grad
            .to_dtype(candle_core::DType::F32)?
            .contiguous()?
            .apply_op1_no_bwd(&op)?;
        let dh = g.narrow(0, 0, n * d)?.reshape((n, d))?;
        let dw = g.narrow(0, n * d, v * d)?.reshape((v, d))?;
        let db = g.narrow(0, n * d + v * d, v)?.reshape(bias.shape())?;
        Ok((Some(dh), Some(dw), Some(db)))
    }
}

/// Backward of the text-head loss, applied to the output gradient `[2]` (only its first value,
/// the loss's, is read, on the device). Output: `[dH (N D) | dW (V D) | db (V)]` flat.
struct TextHeadBwd {
    /// hidden, weight, bias.
    inputs: [Tensor; 3],
    saved: Arc<HeadSaved>,
}

impl CustomOp1 for TextHeadBwd {
    fn name(&self) -> &'static str {
        "m3ae-cuda-text-head-loss-bwd"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_refused(self.name())
    }

    fn cuda_fwd(&self, gs: &CudaStorage, gl: &Layout) -> Result<(CudaStorage, Shape)> {
        let (n, d) = self.inputs[0].dims2()?;
        let v = self.inputs[1].dim(0)?;
        let total = n * d + v * d + v;
        let dev = gs.device.clone();
        let stream = dev.cuda_stream();
        let mut grads = dev.alloc_zeros::<f32>(total.max(1))?;
        let s = &*self.saved;
        let m = s.m;
        if m > 0 {
            let guards: Vec<_> = self.inputs.iter().map(|t| t.storage_and_layout()).collect();
            let mut ptrs = [0u64; 3];
            let mut keep = Vec::with_capacity(3);
            for (((st, l), what), p) in guards
                .iter()
                .zip(["text head hidden", "text head weight", "text head bias"])
                .zip(ptrs.iter_mut())
            {
                let (ptr, guard) = input(cuda_storage(st, what)?, l, &stream, what)?;
                *p = ptr;
                keep.push(guard);
            }
            let [h, w, b] = ptrs;
            let (g, _g0) = input(gs, gl, &stream, "text head output gradient")?;
            let (m32, d32, v32) = (to_i32(m)?, to_i32(d)?, to_i32(v)?);
            let split = VocabSplit::new(v, m, TH_DH_CHUNKS);
            let (per, chunks) = (to_i32(split.per)?, to_i32(split.chunks)?);
            let mut partials = dev.alloc_zeros::<f32>((split.chunks * m * d).max(1))?;
            let (rows, _g1) = s.rows.device_ptr(&stream);
            let (targets, _g2) = s.targets.device_ptr(&stream);
            let (weights, _g3) = s.weights.device_ptr(&stream);
            let (mp, _g4) = s.max.device_ptr(&stream);
            let (lp, _g5) = s.log_sum.device_ptr(&stream);
            let (gp, _g6) = grads.device_ptr_mut(&stream);
            let (pp, _g7) = partials.device_ptr_mut(&stream);
            let dh = gp;
            let dw = gp + f32_bytes(n * d);
            let db = dw + f32_bytes(v * d);

            let f = kernel(&dev, "m3ae_text_head_bwd_dw")?;
            let mut l = stream.launch_builder(&f);
            l.arg(&h)
                .arg(&rows)
                .arg(&targets)
                .arg(&weights)
                .arg(&mp)
                .arg(&lp);
            l.arg(&g)
                .arg(&m32)
                .arg(&w)
                .arg(&b)
                .arg(&v32)
                .arg(&d32)
                .arg(&dw)
                .arg(&db);
            let cfg = text_head_config(v.div_ceil(TH_WORDS), 1, TH_TILE_BYTES + TH_SLICE_BYTES)?;
            // SAFETY: as the forward; dw (zeroed) holds V x D floats, db V; one block per word
            // tile owns its rows of dw and entries of db.
            unsafe { l.launch(cfg) }.w()?;

            let f = kernel(&dev, "m3ae_text_head_bwd_dh")?;
            let mut l = stream.launch_builder(&f);
            l.arg(&h)
                .arg(&rows)
                .arg(&targets)
                .arg(&weights)
                .arg(&mp)
                .arg(&lp);
            l.arg(&g)
                .arg(&m32)
                .arg(&w)
                .arg(&b)
                .arg(&v32)
                .arg(&d32)
                .arg(&per)
                .arg(&pp);
            let cfg = text_head_config(
                split.chunks,
                m.div_ceil(TH_ROWS),
                TH_TILE_BYTES + TH_SLICE_BYTES,
            )?;
            // SAFETY: partials (zeroed) hold chunks x M x D floats; block (c, y) owns its rows of
            // partial c.
            unsafe { l.launch(cfg) }.w()?;

            let f = kernel(&dev, "m3ae_text_head_bwd_dh_sum")?;
            let mut l = stream.launch_builder(&f);
            l.arg(&pp)
                .arg(&rows)
                .arg(&m32)
                .arg(&d32)
                .arg(&chunks)
                .arg(&dh);
            // SAFETY: dh (zeroed) holds N x D floats; the selected rows are distinct.
            unsafe { l.launch(elementwise_config(m * d)) }.w()?;
        }
        Ok((CudaStorage::wrap_cuda_slice(grads, dev), Shape::from(total)))
    }
}

/// Top-k words of `h W^T + b` at the requested rows on CUDA (same contract and order as
/// `fused::text_head_top_k`): `hidden` `[N, D]`, `weight` `[V, D]`, `bias` `[V]`, contiguous
/// f32 on one CUDA device, rows below `N`, `k` at most [`TOP_K_MAX`]. Only the requested rows
/// are multiplied, tile by tile; each row's running list is kept per vocabulary chunk (at most 16
/// chunks of `k` entries) and the lists are merged in vocabulary order. The logits come from the
/// kernels' own tiled product (summation order unlike the CPU's), so words whose logits differ by
/// rounding alone may rank differently than on the CPU.
pub(crate) fn text_head_top_k(
    hidden: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    rows: &[usize],
    k: usize,
) -> Result<crate::TextTopK> {
    let (_, d) = hidden.dims2()?;
    let v = weight.dim(0)?;
    let m = rows.len();
    if k > TOP_K_MAX {
        candle_core::bail!("m3ae CUDA top-k: k = {k} exceeds {TOP_K_MAX}");
    }
    if m == 0 || k == 0 || v == 0 {
        return Ok(crate::TextTopK::from_lists(vec![Vec::new(); m]));
    }
    let rows: Vec<i32> = rows.iter().map(|&r| to_i32(r)).collect::<Result<_>>()?;
    let (vals, ids) = {
        let (hs, hl) = hidden.storage_and_layout();
        let (ws, wl) = weight.storage_and_layout();
        let (bs, bl) = bias.storage_and_layout();
        let hc = cuda_storage(&hs, "text head hidden")?;
        let dev = hc.device.clone();
        let stream = dev.cuda_stream();
        let (h, _g1) = input(hc, hl, &stream, "text head hidden")?;
        let (w, _g2) = input(
            cuda_storage(&ws, "text head weight")?,
            wl,
            &stream,
            "text head weight",
        )?;
        let (b, _g3) = input(
            cuda_storage(&bs, "text head bias")?,
            bl,
            &stream,
            "text head bias",
        )?;
        let split = VocabSplit::new(v, m, TOP_K_CHUNKS);
        let rows_dev = upload_i32(&dev, &rows)?;
        let mut pv = alloc(&dev, m * split.chunks * k)?;
        let mut pi = alloc_i32(&dev, m * split.chunks * k)?;
        let mut ov = alloc(&dev, m * k)?;
        let mut oi = alloc_i32(&dev, m * k)?;
        {
            let (m32, d32, v32, k32) = (to_i32(m)?, to_i32(d)?, to_i32(v)?, to_i32(k)?);
            let (per, chunks) = (to_i32(split.per)?, to_i32(split.chunks)?);
            let (rp, _g4) = rows_dev.device_ptr(&stream);
            let (pvp, _g5) = pv.device_ptr_mut(&stream);
            let (pip, _g6) = pi.device_ptr_mut(&stream);
            let (ovp, _g7) = ov.device_ptr_mut(&stream);
            let (oip, _g8) = oi.device_ptr_mut(&stream);

            let f = kernel(&dev, "m3ae_text_top_k")?;
            let mut l = stream.launch_builder(&f);
            l.arg(&h)
                .arg(&rp)
                .arg(&m32)
                .arg(&w)
                .arg(&b)
                .arg(&v32)
                .arg(&d32);
            l.arg(&k32).arg(&per).arg(&pvp).arg(&pip);
            let cfg = text_head_config(split.chunks, m.div_ceil(TH_ROWS), TH_TILE_BYTES)?;
            // SAFETY: hidden N x D (rows index it), weight V x D, bias V; the partial lists
            // hold M x chunks x k entries.
            unsafe { l.launch(cfg) }.w()?;

            let f = kernel(&dev, "m3ae_text_top_k_merge")?;
            let mut l = stream.launch_builder(&f);
            l.arg(&pvp).arg(&pip).arg(&m32).arg(&chunks).arg(&k32);
            l.arg(&ovp).arg(&oip);
            // SAFETY: one thread per row; the outputs hold M x k entries.
            unsafe { l.launch(per_row_config(m)?) }.w()?;
        }
        (dev.clone_dtoh(&ov)?, dev.clone_dtoh(&oi)?)
    };
    let lists = (0..m)
        .map(|r| {
            (0..k)
                .filter(|&q| ids[r * k + q] >= 0)
                .map(|q| (ids[r * k + q] as u32, vals[r * k + q]))
                .collect()
        })
        .collect();
    Ok(crate::TextTopK::from_lists(lists))
}
