//! Issue 16, defect 3: tar shards whose headers claim gigabytes (GNU long names and long links,
//! pax extended headers, pax `size` records, base-256 sizes) must fail fast as a bad shard, with
//! bounded memory, whatever follows the header. This binary counts the bytes its allocator hands out (all threads, so it
//! holds this one test only) and refuses any allocation above 256 MiB or any growth of the live
//! total above 512 MiB, so a reader that trusts the header fails here without hurting the
//! machine.

mod common;
use common::*;
use m3ae_data::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
const MAX_ONE: usize = 256 << 20;
const MAX_LIVE: usize = 512 << 20;

struct Counting;

impl Counting {
    /// Accounts `n` more live bytes; false (nothing counted) when over the limits.
    fn grow(n: usize) -> bool {
        if n > MAX_ONE {
            return false;
        }
        let now = LIVE.fetch_add(n, Ordering::SeqCst) + n;
        if now > MAX_LIVE {
            LIVE.fetch_sub(n, Ordering::SeqCst);
            return false;
        }
        PEAK.fetch_max(now, Ordering::SeqCst);
        true
    }
}

// SAFETY: every call forwards to the system allocator with the caller's layout; the counters
// are only bookkeeping, and a refused allocation returns null as the trait allows.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if !Self::grow(l.size()) {
            return std::ptr::null_mut();
        }
        let p = System.alloc(l);
        if p.is_null() {
            LIVE.fetch_sub(l.size(), Ordering::SeqCst);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if !Self::grow(l.size()) {
            return std::ptr::null_mut();
        }
        let p = System.alloc_zeroed(l);
        if p.is_null() {
            LIVE.fetch_sub(l.size(), Ordering::SeqCst);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        LIVE.fetch_sub(l.size(), Ordering::SeqCst);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if new > l.size() && !Self::grow(new - l.size()) {
            return std::ptr::null_mut();
        }
        let q = System.realloc(p, l, new);
        if q.is_null() {
            if new > l.size() {
                LIVE.fetch_sub(new - l.size(), Ordering::SeqCst);
            }
        } else if new < l.size() {
            LIVE.fetch_sub(l.size() - new, Ordering::SeqCst);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[test]
fn headers_claiming_gigabytes_are_bad_shards_with_bounded_memory() {
    let dir = TempDir::new("tar-attack");
    for kind in ATTACKS {
        let path = dir.path().join(format!("{kind}.tar"));
        // the 8 KiB attack, then 20 MiB of filler: a reader that believes the claimed size
        // reads all of it into memory (and, on a larger or endless input, gigabytes)
        let mut bytes = attack_shard(kind);
        bytes.resize(20 << 20, b'A');
        std::fs::write(&path, bytes).unwrap();
        let ds = WebDataset::new(vec![path.clone()]).unwrap();
        let base = LIVE.load(Ordering::SeqCst);
        PEAK.store(base, Ordering::SeqCst);
        let recs: Vec<Record> = ds
            .open(&Partition::whole(0, 0))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        let listed = ds.json_values("category", None);
        let peak = PEAK.load(Ordering::SeqCst) - base;
        // the reader's 1 MiB buffer, the channel and a few small records
        assert!(peak < 8 << 20, "{kind}: {peak} bytes at the peak");
        assert_eq!(recs.len(), 1, "{kind}: {recs:?}");
        let Record::Bad(b) = &recs[0] else {
            panic!("{kind}: expected a bad record, got {:?}", recs[0])
        };
        assert_eq!(b.reason, BadReason::TruncatedTar, "{kind}: {b}");
        assert!(b.file.ends_with(&format!("{kind}.tar")), "{kind}: {b}");
        // listing json values reads the shard too: an error naming it
        let err = listed.expect_err(kind).to_string();
        assert!(err.contains(&format!("{kind}.tar")), "{kind}: {err}");
    }
}
