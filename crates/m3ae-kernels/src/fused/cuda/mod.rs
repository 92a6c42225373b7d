//! CUDA implementations of the fused ops (feature `cuda`): masked attention (separate q, k, v and
//! the packed qkv projection), LayerNorm and tanh-GELU, forward and backward.
//!
//! The kernels live in `kernels.cu` and are compiled once per process with NVRTC (no `nvcc` at
//! build time; PTX is JIT-compiled by the driver for the GPU at hand). Each op is a candle custom
//! op whose `cuda_fwd` launches the kernels on candle's stream; its backward is another custom op
//! on the same stream. Tensors are contiguous f32 (the public functions in [`super`] convert).
//! The dense layer has no CUDA kernel here: on CUDA it runs the reference path (cuBLAS matmul).
//!
//! Attention keeps one score row per warp in shared memory, so the sequence length is bounded:
//! [`attention_fits`] says whether a shape fits; callers fall back to the reference path when not.

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
pub const KERNELS: [&str; 8] = [
    "m3ae_attn_fwd",
    "m3ae_attn_bwd_dq",
    "m3ae_attn_bwd_dkdv",
    "m3ae_ln_fwd",
    "m3ae_ln_bwd_dx",
    "m3ae_ln_bwd_params",
    "m3ae_gelu_fwd",
    "m3ae_gelu_bwd",
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
/// `#[ignore]`d (run by `scripts/gpu-check.sh` with `--ignored`) and fail through this when run
/// on a machine without a GPU, instead of passing without checking anything.
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
