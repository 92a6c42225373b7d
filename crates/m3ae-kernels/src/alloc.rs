//! Process-wide allocator setting for training: keep freed tensor buffers in the heap.
//!
//! candle allocates a fresh buffer for every op result and every gradient. By default glibc hands
//! blocks of a few MiB back to the kernel when they are freed (its mmap threshold adapts upwards,
//! and the top of the heap is trimmed above twice that), so each training step page-faults much
//! of its working set in again. Page faults then dominate ops that compute little: the `floor` of
//! `benches/kernels.rs` (a zero-compute stand-in with attention's inputs and outputs under the
//! same autograd harness) is several times slower with glibc's defaults than with the heap kept
//! (docs/performance.md, "Heap kept").
//!
//! [`keep_freed_memory`] is what the `m3ae` binary calls first thing; a program that embeds the
//! trainer can call it too. It is a process-wide setting, which is why the library never calls it
//! on its own.

/// Makes glibc keep freed memory in the heap: allocations of every thread come from the main
/// heap, not from fresh mappings, and the heap is trimmed only when more than 1 GiB is free at
/// its top. Costs some resident memory (about 10% on the tiny pre-training job) for fewer page
/// faults.
///
/// Buffers of 32 MiB and more (glibc will not raise its mmap threshold above that) are kept too,
/// by turning fresh mappings off altogether (`M_MMAP_MAX = 0`), and every thread allocates from
/// the main heap (`M_ARENA_MAX = 1`): the fused transformer block and the GEMMs allocate on rayon
/// workers, and a worker's own arena holds at most 64 MiB, so larger activations (the `small`
/// preset at batch 32 has several) would be mapped afresh, and page-faulted in, at every step.
/// The shared arena's lock costs little: training allocates few, large blocks. glibc still maps
/// memory where its heap cannot grow, so no allocation fails because of the setting (test
/// `tests/alloc.rs`). docs/performance.md ("Heap kept") has the effect on the `small` preset.
///
/// Does nothing, and returns `false`, where the user already tunes malloc through the
/// environment (`GLIBC_TUNABLES`, `MALLOC_*_`) or the C library is not glibc. Call it before
/// other threads allocate.
///
/// ```
/// // The result depends on the environment (a user's GLIBC_TUNABLES wins); it is never applied
/// // off glibc.
/// let applied: bool = m3ae_kernels::alloc::keep_freed_memory();
/// assert!(!applied || cfg!(all(target_os = "linux", target_env = "gnu")));
/// ```
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let user_tuned = std::env::vars_os().any(|(k, _)| {
            let k = k.to_string_lossy();
            k == "GLIBC_TUNABLES" || (k.starts_with("MALLOC_") && k.ends_with('_'))
        });
        if user_tuned {
            return false;
        }
        // SAFETY: mallopt only changes allocator parameters.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1) == 1
                && libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
                && libc::mallopt(libc::M_MMAP_MAX, 0) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}
