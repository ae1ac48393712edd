//! Memory for prepared weights, on transparent huge pages where the OS gives them.
//!
//! A decoded token streams every weight from memory once, a few hundred KiB to a few MiB
//! per matmul. On 4 KiB pages that stream crosses a page boundary every 64 cache lines, and
//! each crossing costs a TLB walk and restarts the hardware prefetcher, which does not follow
//! a stream into the next physical page. On Zen 4, a plain read over many buffers of 256 KiB to 32 MiB (probe's `sum_probe`
//! split over a `Team`, 96 MiB in all, runs alternated) ran 1.5-1.9x faster on one thread and
//! 1.1-1.6x on two when the buffers sat on 2 MiB pages; fast-mode decode of the default
//! model, 1.3-1.45x on one thread (1.25x with the kernels of [`huge_pages`]' measurement).
//! Linux gives an anonymous
//! mapping huge pages when it is asked (`madvise(MADV_HUGEPAGE)`, honoured unless
//! `/sys/kernel/mm/transparent_hugepage/enabled` is `never`) for each 2 MiB-aligned 2 MiB of
//! it, so small weights only get them when many share one mapping.
//!
//! An [`Arena`] is that mapping: weights prepared through it are [`Chunk`]s cut one after
//! another from 2 MiB-aligned regions of [`REGION`] bytes (a chunk larger than a quarter of
//! that gets a region of its own, on huge pages up to its last whole 2 MiB, 4 KiB pages past
//! it). A region is freed when its last chunk is and the arena has moved on from it. Only the
//! pages a chunk touches become resident: a shared region costs at most the rest of the huge
//! page its last chunk ends in, a region of its own nothing. Where anonymous mappings are
//! unavailable, regions are plain heap allocations.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};

/// The huge page size the regions are aligned to (x86-64's and AArch64's usual 2 MiB).
pub const HUGE_PAGE: usize = 2 << 20;
/// Bytes of a shared region.
pub const REGION: usize = 32 << 20;
/// Alignment of every chunk: a cache line (and so of any vector load the kernels make).
pub const CHUNK_ALIGN: usize = 64;

/// Whether regions ask for huge pages: yes, unless `CHORD_HUGE_PAGES=0`, which asks for
/// none (`MADV_NOHUGEPAGE`, so that a system whose THP setting is `always` keeps 4 KiB pages
/// too).
///
/// The trade, measured on an AMD EPYC (family 25 model 17), a KVM guest whose balloon hands
/// freed memory back to the host: decode runs faster on huge pages (`chord bench model --pp
/// 128 --tg 128`, medians of 4 alternating rounds, tokens/s with → without: the default model
/// exact 162 → 144 on one thread and 219 → 196 on two, fast 207 → 165 and 235 → 207; Gemma
/// 3 270M exact 72 → 63 and fast 93 → 81 on one thread), but memory the host has taken back
/// costs far more to touch first on huge pages: 136 MiB on two threads took 246-259 ms on
/// huge pages after 45 s idle and 39 ms on 4 KiB pages, and Gemma 3 loaded in 1.6-2.5 s
/// against 0.32-0.54 (`load_seconds`; llama.cpp 0.83-1.08). Right after another process
/// freed memory, both are fast. `CHORD_HUGE_PAGES=0` suits short runs after long pauses.
pub fn huge_pages() -> bool {
    static ON: std::sync::LazyLock<bool> =
        std::sync::LazyLock::new(|| std::env::var("CHORD_HUGE_PAGES").as_deref() != Ok("0"));
    *ON
}

/// Memory the regions are cut from.
enum Backing {
    /// An anonymous mapping, over-allocated by a huge page so that its base can be aligned.
    Map(#[allow(dead_code)] memmap2::MmapMut),
    /// The fallback: heap bytes, aligned to a cache line.
    Heap(#[allow(dead_code)] Vec<u8>),
}

/// One region: `len` zeroed bytes at `base`, kept alive by its chunks.
struct Region {
    _backing: Backing,
    base: *mut u8,
    len: usize,
}

// SAFETY: a region is only reached through chunks, each owning a disjoint byte range of it.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    /// `len` zeroed bytes, 2 MiB-aligned, its first `huge` bytes advised onto huge pages
    /// where possible.
    fn new(len: usize, huge: usize) -> Region {
        let len = len.max(1);
        if let Ok(mut map) = memmap2::MmapOptions::new().len(len + HUGE_PAGE).map_anon() {
            let start = map.as_mut_ptr();
            let skip = start.align_offset(HUGE_PAGE).min(HUGE_PAGE);
            #[cfg(target_os = "linux")]
            {
                // Advice only: a kernel without transparent huge pages keeps 4 KiB pages.
                if !huge_pages() {
                    let _ = map.advise_range(memmap2::Advice::NoHugePage, skip, len);
                } else if huge > 0 {
                    let _ = map.advise_range(memmap2::Advice::HugePage, skip, huge.min(len));
                }
            }
            // SAFETY: `skip + len <= len + HUGE_PAGE`, inside the mapping.
            let base = unsafe { start.add(skip) };
            return Region {
                _backing: Backing::Map(map),
                base,
                len,
            };
        }
        let mut heap = vec![0u8; len + CHUNK_ALIGN];
        let start = heap.as_mut_ptr();
        let skip = start.align_offset(CHUNK_ALIGN).min(CHUNK_ALIGN);
        // SAFETY: `skip + len <= len + CHUNK_ALIGN`, inside the allocation.
        let base = unsafe { start.add(skip) };
        Region {
            _backing: Backing::Heap(heap),
            base,
            len,
        }
    }
}

/// Zeroed bytes cut from an [`Arena`]'s region, owned alone (see the module docs).
pub struct Chunk {
    /// Keeps the region alive (read only by its drop).
    #[allow(dead_code)]
    region: Arc<Region>,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a chunk's bytes belong to it alone; the region outlives it through the `Arc`.
unsafe impl Send for Chunk {}
// SAFETY: shared access only reads.
unsafe impl Sync for Chunk {}

impl Deref for Chunk {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr..ptr + len` lies in the live region and belongs to this chunk.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl DerefMut for Chunk {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above; `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Clone for Chunk {
    /// A copy in a region of its own, on huge pages for its whole 2 MiB stretches.
    fn clone(&self) -> Chunk {
        let region = Arc::new(Region::new(self.len, self.len / HUGE_PAGE * HUGE_PAGE));
        let mut c = Chunk {
            ptr: region.base,
            region,
            len: self.len,
        };
        c.copy_from_slice(self);
        c
    }
}

impl std::fmt::Debug for Chunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Chunk({} bytes)", self.len)
    }
}

/// Hands out [`Chunk`]s from shared huge-page regions (see the module docs).
#[derive(Default)]
pub struct Arena {
    /// The region being filled and the bytes of it already handed out.
    current: Mutex<Option<(Arc<Region>, usize)>>,
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Arena")
    }
}

impl Arena {
    pub fn new() -> Arena {
        Arena::default()
    }

    /// `len` zeroed bytes, aligned to [`CHUNK_ALIGN`].
    pub fn alloc(&self, len: usize) -> Chunk {
        if len > REGION / 4 {
            // Huge pages for the whole 2 MiB stretches only: a last, partly used huge page
            // would be resident in full.
            let region = Arc::new(Region::new(len, len / HUGE_PAGE * HUGE_PAGE));
            return Chunk {
                ptr: region.base,
                region,
                len,
            };
        }
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let fits =
            |(r, used): &(Arc<Region>, usize)| used.next_multiple_of(CHUNK_ALIGN) + len <= r.len;
        if !current.as_ref().is_some_and(fits) {
            *current = Some((Arc::new(Region::new(REGION, REGION)), 0));
        }
        let (region, used) = current.as_mut().expect("a region was just made");
        let at = used.next_multiple_of(CHUNK_ALIGN);
        *used = at + len;
        Chunk {
            region: Arc::clone(region),
            // SAFETY: `at + len <= region.len` (checked by `fits`).
            ptr: unsafe { region.base.add(at) },
            len,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_zeroed_aligned_disjoint_and_outlive_their_arena() {
        let arena = Arena::new();
        let sizes = [
            1,
            100,
            64,
            4096,
            REGION / 4,
            REGION / 4 + 1,
            3 << 20,
            0,
            777,
        ];
        let mut chunks: Vec<Chunk> = sizes.iter().map(|&n| arena.alloc(n)).collect();
        drop(arena);
        for (i, (c, &n)) in chunks.iter_mut().zip(&sizes).enumerate() {
            assert_eq!(c.len(), n);
            assert_eq!(c.as_ptr() as usize % CHUNK_ALIGN, 0, "chunk {i}");
            assert!(c.iter().all(|&b| b == 0), "chunk {i} starts zeroed");
            c.fill(i as u8 + 1);
        }
        // Writing one chunk never touched another.
        for (i, c) in chunks.iter().enumerate() {
            assert!(c.iter().all(|&b| b == i as u8 + 1), "chunk {i}");
        }
        let copy = chunks[2].clone();
        assert_eq!(&copy[..], &chunks[2][..]);
    }

    #[test]
    fn small_chunks_share_a_huge_page_aligned_region() {
        let arena = Arena::new();
        let a = arena.alloc(1000);
        let b = arena.alloc(1000);
        assert!(Arc::ptr_eq(&a.region, &b.region));
        assert_eq!(b.as_ptr() as usize - a.as_ptr() as usize, 1024);
        assert_eq!(a.region.base as usize % HUGE_PAGE, 0);
        let big = arena.alloc(REGION / 2);
        assert!(!Arc::ptr_eq(&a.region, &big.region));
        // A chunk that does not fit the rest of the region starts a new one.
        let c = arena.alloc(REGION / 4);
        let d = arena.alloc(REGION / 4);
        let e = arena.alloc(REGION / 4);
        let f = arena.alloc(REGION / 4);
        assert!(Arc::ptr_eq(&a.region, &e.region) && !Arc::ptr_eq(&a.region, &f.region));
        drop((c, d));
    }
}
