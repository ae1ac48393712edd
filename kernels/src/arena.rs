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
//!
//! A model's weights are written once, at load, and the first touch of fresh huge pages is
//! slow where a VM's host has taken the memory back: the SIMD backend's arena
//! ([`Arena::promoted_later`]) writes them on 4 KiB pages and moves the used 2 MiB stretches
//! onto huge pages afterwards, in the background, once the load is done
//! ([`Arena::promote`]). Benchmarks wait for the move ([`Arena::settle`]).

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The huge page size the regions are aligned to (x86-64's and AArch64's usual 2 MiB).
pub const HUGE_PAGE: usize = 2 << 20;
/// Bytes of a shared region.
pub const REGION: usize = 32 << 20;
/// Alignment of every chunk: a cache line (and so of any vector load the kernels make).
pub const CHUNK_ALIGN: usize = 64;

/// Whether regions ask for huge pages: yes, unless `CHORD_HUGE_PAGES=0`, which asks for
/// none (`MADV_NOHUGEPAGE`, so that a system whose THP setting is `always` keeps 4 KiB pages
/// too). When they get them: [`HugePages`].
///
/// The trade, measured on an AMD EPYC (family 25 model 17), a KVM guest whose balloon hands
/// freed memory back to the host: decode runs faster on huge pages (`chord bench model --pp
/// 128 --tg 128`, medians of 4 alternating rounds, tokens/s with → without: the default model
/// exact 162 → 144 on one thread and 219 → 196 on two, fast 207 → 165 and 235 → 207; Gemma
/// 3 270M exact 72 → 63 and fast 93 → 81 on one thread), but memory the host has taken back
/// costs far more to touch first on huge pages: 136 MiB on two threads took 246-259 ms on
/// huge pages after 45 s idle and 39 ms on 4 KiB pages, and Gemma 3 loaded in 1.6-2.5 s
/// against 0.32-0.54 (`load_seconds`; llama.cpp 0.83-1.08). Right after another process
/// freed memory, both are fast. So a model's weights are written on 4 KiB pages and moved
/// onto huge pages after the load ([`Arena::promoted_later`]).
pub fn huge_pages() -> bool {
    HugePages::chosen() != HugePages::Off
}

/// When an [`Arena::promoted_later`]'s chunks get huge pages, from `CHORD_HUGE_PAGES`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HugePages {
    /// `0`: never.
    Off,
    /// `fault`: as they are first touched, like an [`Arena::new`]'s.
    AtFault,
    /// Unset (or anything else): after [`Arena::promote`] (on Linux; elsewhere as `fault`).
    Promoted,
}

impl HugePages {
    /// The setting of this process, read once.
    pub fn chosen() -> HugePages {
        static CHOSEN: std::sync::LazyLock<HugePages> =
            std::sync::LazyLock::new(|| match std::env::var("CHORD_HUGE_PAGES").as_deref() {
                Ok("0") => HugePages::Off,
                Ok("fault") => HugePages::AtFault,
                _ if cfg!(target_os = "linux") => HugePages::Promoted,
                _ => HugePages::AtFault,
            });
        *CHOSEN
    }
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
    backing: Backing,
    base: *mut u8,
    len: usize,
    /// Bytes handed out so far, from the start.
    used: AtomicUsize,
}

// SAFETY: a region's bytes are only reached through chunks, each owning a disjoint byte
// range of it; the promoting thread holds regions too, and reads and re-maps their bytes
// without changing one, only after their chunks' last write (`Arena::promote`'s contract).
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    /// `len` zeroed bytes, 2 MiB-aligned, its whole 2 MiB stretches advised onto huge pages
    /// where possible (a last, partly used huge page would be resident in full): at once,
    /// or (`later`) only once [`Arena::promote`] moves them.
    fn new(len: usize, later: bool) -> Region {
        let len = len.max(1);
        let huge = len / HUGE_PAGE * HUGE_PAGE;
        #[cfg(not(target_os = "linux"))]
        let _ = later;
        if let Ok(mut map) = memmap2::MmapOptions::new().len(len + HUGE_PAGE).map_anon() {
            let start = map.as_mut_ptr();
            let skip = start.align_offset(HUGE_PAGE).min(HUGE_PAGE);
            #[cfg(target_os = "linux")]
            {
                // Advice only: a kernel without transparent huge pages keeps 4 KiB pages.
                if !huge_pages() || later {
                    let _ = map.advise_range(memmap2::Advice::NoHugePage, skip, len);
                } else if huge > 0 {
                    let _ = map.advise_range(memmap2::Advice::HugePage, skip, huge);
                }
            }
            // SAFETY: `skip + len <= len + HUGE_PAGE`, inside the mapping.
            let base = unsafe { start.add(skip) };
            return Region {
                backing: Backing::Map(map),
                base,
                len,
                used: AtomicUsize::new(0),
            };
        }
        let mut heap = vec![0u8; len + CHUNK_ALIGN];
        let start = heap.as_mut_ptr();
        let skip = start.align_offset(CHUNK_ALIGN).min(CHUNK_ALIGN);
        // SAFETY: `skip + len <= len + CHUNK_ALIGN`, inside the allocation.
        let base = unsafe { start.add(skip) };
        Region {
            backing: Backing::Heap(heap),
            base,
            len,
            used: AtomicUsize::new(0),
        }
    }

    /// Moves the pages of its used 2 MiB stretches onto huge pages, one stretch at a time,
    /// and stops once `region` is the last holder of the region (its chunks dropped). Heap
    /// regions stay as they are.
    ///
    /// Each stretch is copied into a fresh huge page of a mapping of its own, then put in
    /// place with `mremap`, which moves the page table entry under the process's memory-map
    /// lock. The kernel's own move (`MADV_COLLAPSE`, Linux 6.1), used before, holds that lock
    /// while it copies, about 7 ms a stretch where the host has taken the memory back (136
    /// MiB in 475 ms), and every `mmap`, `munmap` and `brk` of the process waits for it: right
    /// after a load, `chord generate -n 1` on the default model spent 18-153 ms generating and
    /// 28-115 ms freeing, against 12-36 and 2 ms now (AMD EPYC family 25 model 17, KVM guest;
    /// the move itself takes the same time, 270-380 ms for the default model's 94 MB).
    fn promote(region: &Arc<Region>) {
        if !matches!(region.backing, Backing::Map(_)) {
            return;
        }
        let span = region
            .used
            .load(Ordering::Acquire)
            .next_multiple_of(HUGE_PAGE)
            .min(region.len / HUGE_PAGE * HUGE_PAGE);
        #[cfg(target_os = "linux")]
        for at in (0..span).step_by(HUGE_PAGE) {
            if Arc::strong_count(region) == 1 {
                return;
            }
            // SAFETY: `base + at .. + HUGE_PAGE` lies in this region's live mapping (`span` is
            // within its whole stretches), 2 MiB-aligned; its chunks are no longer written.
            if !unsafe { move_onto_huge_page(region.base.add(at)) } {
                return;
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = span;
    }
}

/// Replaces the 2 MiB at `stretch` with the same bytes on a huge page (where the kernel has
/// one to give: else on 4 KiB pages, as before). Whether the move was made.
///
/// # Safety
///
/// `stretch` is 2 MiB-aligned and starts 2 MiB of a private anonymous mapping of this
/// process that nothing writes during the call. Readers may run throughout: they see the old
/// pages or the new ones, the same bytes.
#[cfg(target_os = "linux")]
unsafe fn move_onto_huge_page(stretch: *mut u8) -> bool {
    use std::ptr::null_mut;
    // SAFETY (the block): a fresh mapping of twice the stretch holds one aligned stretch
    // (`staged`); the copy reads `stretch` (live, not written) into it; `mremap` moves the
    // staged pages over `stretch`, or fails and changes nothing; the rest of the fresh
    // mapping is unmapped.
    unsafe {
        let fresh = libc::mmap(
            null_mut(),
            2 * HUGE_PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if fresh == libc::MAP_FAILED {
            return false;
        }
        let fresh = fresh.cast::<u8>();
        let skip = fresh.align_offset(HUGE_PAGE);
        let staged = fresh.add(skip);
        libc::madvise(staged.cast(), HUGE_PAGE, libc::MADV_HUGEPAGE);
        std::ptr::copy_nonoverlapping(stretch, staged, HUGE_PAGE);
        let moved = libc::mremap(
            staged.cast(),
            HUGE_PAGE,
            HUGE_PAGE,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            stretch.cast::<libc::c_void>(),
        ) != libc::MAP_FAILED;
        if !moved {
            libc::munmap(fresh.cast(), 2 * HUGE_PAGE);
            return false;
        }
        if skip > 0 {
            libc::munmap(fresh.cast(), skip);
        }
        if skip < HUGE_PAGE {
            libc::munmap(staged.add(HUGE_PAGE).cast(), HUGE_PAGE - skip);
        }
        true
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
        let region = Arc::new(Region::new(self.len, false));
        region.used.store(self.len, Ordering::Release);
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
    /// The region being filled.
    current: Mutex<Option<Arc<Region>>>,
    /// For an arena made by [`Arena::promoted_later`]: its regions not yet promoted, and the
    /// threads promoting the others.
    later: Option<Mutex<Later>>,
}

#[derive(Default)]
struct Later {
    waiting: Vec<std::sync::Weak<Region>>,
    promoting: Vec<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Arena")
    }
}

impl Arena {
    /// An arena whose chunks go on huge pages as they are first touched (unless
    /// [`huge_pages`] is off).
    pub fn new() -> Arena {
        Arena::default()
    }

    /// An arena whose chunks start on 4 KiB pages and move onto huge pages when
    /// [`promote`](Arena::promote) is called, on a thread of its own, so that filling them
    /// does not wait for the first touch of fresh huge pages. That touch is what a model load
    /// on a VM spends most of its time on when the host has taken the memory back: on an AMD
    /// EPYC (family 25 model 17) KVM guest after 45 s idle, 136 MiB took 215 ms to touch on
    /// two threads on huge pages and 42-50 ms on 4 KiB pages; moving them later takes a few
    /// hundred ms on one thread. Unless [`HugePages::chosen`] is [`HugePages::Promoted`], this
    /// is [`Arena::new`].
    pub fn promoted_later() -> Arena {
        Arena {
            later: (HugePages::chosen() == HugePages::Promoted).then(Mutex::default),
            ..Arena::default()
        }
    }

    /// Starts moving the chunks handed out so far onto huge pages, in the background, on a
    /// thread of the lowest priority (nice 19), so it runs on the cores the work leaves
    /// idle; [`settle`](Arena::settle) waits for it. Chunks stay readable throughout. Chunks
    /// handed out later come from new regions, on 4 KiB pages until the next call: prepare
    /// every weight first. Nothing for an arena made by [`Arena::new`].
    ///
    /// # Safety
    ///
    /// No chunk handed out before this call is written after it (a write made while its
    /// stretch moves could be lost): call it once the chunks hold their final bytes.
    pub unsafe fn promote(&self) {
        let Some(later) = &self.later else { return };
        // Later chunks must not land in a stretch being copied.
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let mut later = later.lock().unwrap_or_else(|e| e.into_inner());
        let regions: Vec<Arc<Region>> = later
            .waiting
            .drain(..)
            .filter_map(|r| r.upgrade())
            .collect();
        if regions.is_empty() {
            return;
        }
        let promoting = std::thread::Builder::new()
            .name("chord-promote".into())
            .spawn(move || {
                #[cfg(target_os = "linux")]
                // SAFETY: sets this thread's own nice value; no memory is involved.
                unsafe {
                    libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19);
                }
                for r in regions {
                    Region::promote(&r);
                }
            });
        // A thread that cannot be made leaves those regions on 4 KiB pages.
        later.promoting.extend(promoting.ok());
    }

    /// Waits until the chunks [`promote`](Arena::promote) was asked to move are on huge
    /// pages (or the kernel declined).
    pub fn settle(&self) {
        let Some(later) = &self.later else { return };
        let promoting =
            std::mem::take(&mut later.lock().unwrap_or_else(|e| e.into_inner()).promoting);
        for p in promoting {
            let _ = p.join();
        }
    }

    /// A new region of `len` bytes, on huge pages now or on promotion.
    fn region(&self, len: usize) -> Arc<Region> {
        let region = Arc::new(Region::new(len, self.later.is_some()));
        if let Some(later) = &self.later {
            let mut later = later.lock().unwrap_or_else(|e| e.into_inner());
            later.waiting.retain(|r| r.strong_count() > 0);
            later.waiting.push(Arc::downgrade(&region));
        }
        region
    }

    /// `len` zeroed bytes, aligned to [`CHUNK_ALIGN`].
    pub fn alloc(&self, len: usize) -> Chunk {
        if len > REGION / 4 {
            // A region of its own (huge pages for its whole 2 MiB stretches only).
            let region = self.region(len);
            region.used.store(len, Ordering::Release);
            return Chunk {
                ptr: region.base,
                region,
                len,
            };
        }
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let fits = |r: &Arc<Region>| {
            r.used.load(Ordering::Relaxed).next_multiple_of(CHUNK_ALIGN) + len <= r.len
        };
        if !current.as_ref().is_some_and(fits) {
            *current = Some(self.region(REGION));
        }
        let region = current.as_ref().expect("a region was just made");
        let at = region
            .used
            .load(Ordering::Relaxed)
            .next_multiple_of(CHUNK_ALIGN);
        region.used.store(at + len, Ordering::Release);
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
    fn promoted_chunks_keep_their_bytes_while_and_after_they_move() {
        let arena = Arena::promoted_later();
        let sizes = [3 * HUGE_PAGE + 100, 1000, HUGE_PAGE, REGION / 4 + 1];
        let mut chunks: Vec<Chunk> = sizes.iter().map(|&n| arena.alloc(n)).collect();
        let pattern = |i: usize, j: usize| (i * 31 + j * 7 + j / 4096) as u8;
        for (i, c) in chunks.iter_mut().enumerate() {
            c.iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = pattern(i, j));
        }
        let before: Vec<usize> = chunks.iter().map(|c| c.as_ptr() as usize).collect();
        // SAFETY: the chunks are only read from here on.
        unsafe { arena.promote() };
        // Read while the promotion may be moving them: never a byte out of place.
        for _ in 0..3 {
            for (i, c) in chunks.iter().enumerate() {
                for j in (0..c.len()).step_by(4093) {
                    assert_eq!(c[j], pattern(i, j), "chunk {i} byte {j} while moving");
                }
            }
        }
        // A chunk handed out after the call comes from a new region, not a moving stretch.
        let mut late = arena.alloc(5000);
        assert!(!chunks.iter().any(|c| Arc::ptr_eq(&c.region, &late.region)));
        assert!(late.iter().all(|&b| b == 0));
        late.fill(9);
        // SAFETY: `late` is not written again; the others were covered above.
        unsafe { arena.promote() };
        arena.settle();
        for (i, c) in chunks.iter().enumerate() {
            assert_eq!(c.as_ptr() as usize, before[i], "chunk {i} kept its address");
            for (j, &b) in c.iter().enumerate() {
                assert_eq!(b, pattern(i, j), "chunk {i} byte {j}");
            }
        }
        assert!(late.iter().all(|&b| b == 9));
    }

    /// The move puts the bytes of a stretch on a huge page where the kernel hands them out
    /// on request (transparent huge pages `always` or `madvise`; else they stay on 4 KiB
    /// pages), as `/proc/self/smaps` counts them.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_moved_stretch_is_on_a_huge_page() {
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        let want_kb = match thp.contains("[always]") || thp.contains("[madvise]") {
            true => 2048,
            false => 0,
        };
        let region = Arc::new(Region::new(2 * HUGE_PAGE, true));
        {
            // SAFETY: inside the region's mapping, which nothing else reaches.
            let bytes = unsafe { std::slice::from_raw_parts_mut(region.base, 2 * HUGE_PAGE) };
            bytes
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = (i % 251) as u8);
        }
        let huge_kb = |at: *const u8| -> Option<u64> {
            let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
            let mut inside = false;
            for line in smaps.lines() {
                if let Some((range, _)) = line.split_once(' ')
                    && let Some((lo, hi)) = range.split_once('-')
                    && let (Ok(lo), Ok(hi)) =
                        (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                {
                    inside = (lo..hi).contains(&(at as usize));
                } else if inside && let Some(kb) = line.strip_prefix("AnonHugePages:") {
                    return kb.trim().trim_end_matches(" kB").trim().parse().ok();
                }
            }
            None
        };
        assert_eq!(huge_kb(region.base), Some(0), "written on 4 KiB pages");
        // SAFETY: 2 MiB-aligned, inside the region's mapping, not written during the call.
        assert!(unsafe { move_onto_huge_page(region.base) });
        assert_eq!(huge_kb(region.base), Some(want_kb), "THP setting {thp:?}");
        // SAFETY: as above; only read from here on.
        let bytes = unsafe { std::slice::from_raw_parts(region.base, 2 * HUGE_PAGE) };
        assert!(bytes.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
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
