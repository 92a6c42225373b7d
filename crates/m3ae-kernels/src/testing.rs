//! Deterministic inputs for tests and benchmarks: the same values on every machine and in every
//! run, without a random-number crate. Not for statistics.

/// `n` pseudo-random values in [-1, 1) from `seed`, the same for a seed everywhere.
///
/// A 64-bit linear congruential generator (Knuth's MMIX multiplier and increment) starting
/// from the state `seed`: value `i` is the top 24 bits of the state after `i + 1` steps, as a
/// fraction in [0, 1), mapped to `2 x - 1`. So `(v + 1) / 2` is exactly that fraction, and the
/// values of `uniform(seed, n)` are the first `n` of `uniform(seed, n + k)`.
///
/// ```
/// use m3ae_kernels::testing::uniform;
/// let v = uniform(7, 1000);
/// assert_eq!(v, uniform(7, 1000));
/// assert_eq!(uniform(7, 3)[..], v[..3]);
/// assert!(v.iter().all(|x| (-1.0..1.0).contains(x)));
/// assert_ne!(uniform(8, 3), uniform(7, 3));
/// let mean = v.iter().sum::<f32>() / 1000.0;
/// assert!(mean.abs() < 0.1, "{mean}");
/// ```
pub fn uniform(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// A tensor of `shape` on `device` holding [`uniform`]`(seed, n)` times `scale`: deterministic
/// inputs in `[-scale, scale)` for tests, the same on every machine (candle's `Tensor::randn`
/// draws from an unseeded generator on the CPU).
///
/// ```
/// use candle_core::Device;
/// use m3ae_kernels::testing::tensor;
/// let t = tensor(&[2, 3], 5, 0.5, &Device::Cpu)?;
/// assert_eq!(t.dims(), &[2, 3]);
/// assert_eq!(t.flatten_all()?.to_vec1::<f32>()?, tensor(&[6], 5, 0.5, &Device::Cpu)?.to_vec1::<f32>()?);
/// assert!(t.abs()?.max_all()?.to_scalar::<f32>()? < 0.5);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn tensor(
    shape: &[usize],
    seed: u64,
    scale: f32,
    device: &candle_core::Device,
) -> candle_core::Result<candle_core::Tensor> {
    let v: Vec<f32> = uniform(seed, shape.iter().product())
        .into_iter()
        .map(|x| x * scale)
        .collect();
    candle_core::Tensor::from_vec(v, shape, device)
}
