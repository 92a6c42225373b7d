//! `alloc::keep_freed_memory` in a process of its own (it changes process-wide malloc settings),
//! run without the test harness so that the checks run on the main thread, whose heap is where
//! glibc serves blocks of every size once fresh mappings are off.

/// Whether glibc served `v` by a fresh mapping: it marks mapped chunks with bit 1 of the size
/// word right before the pointer (checked against the size, so a wrong layout fails too).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn mapped(v: &Vec<f32>) -> bool {
    // SAFETY: glibc keeps a chunk's size word right before every pointer it returns.
    let size_word = unsafe { std::ptr::read_volatile((v.as_ptr() as *const usize).sub(1)) };
    assert!(size_word >= 4 * v.capacity(), "size word {size_word:#x}");
    size_word & 2 != 0
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn main() {
    assert!(
        m3ae_kernels::alloc::keep_freed_memory(),
        "alloc: malloc is tuned through the environment (GLIBC_TUNABLES / MALLOC_*_), so \
         keep_freed_memory leaves it alone and this test cannot check it: unset them to run it"
    );
    let buffer = |mib: usize| std::hint::black_box(Vec::<f32>::with_capacity(mib << 18));
    // the main thread: every size from the heap, even above glibc's largest mmap threshold (32 MiB)
    for mib in [1, 40, 200] {
        assert!(
            !mapped(&buffer(mib)),
            "main thread: a {mib} MiB buffer was mapped fresh"
        );
    }
    // other threads share the main heap: blocks larger than a thread arena's 64 MiB too
    std::thread::spawn(move || {
        for mib in [1, 40, 200] {
            assert!(
                !mapped(&buffer(mib)),
                "worker thread: a {mib} MiB buffer was mapped fresh"
            );
        }
    })
    .join()
    .unwrap();
    println!("alloc: large buffers come from the heap: ok");
}

/// Elsewhere `keep_freed_memory` does nothing (it is a glibc setting): nothing to check.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn main() {}
