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
    /// Unset (or anything else): after [`Arena::promote`] (on Linux where transparent huge
    /// pages are not `never`; elsewhere as `fault`).
    Promoted,
}

impl HugePages {
    /// The setting of this process, read once.
    pub fn chosen() -> HugePages {
        static CHOSEN: std::sync::LazyLock<HugePages> =
            std::sync::LazyLock::new(|| match std::env::var("CHORD_HUGE_PAGES").as_deref() {
                Ok("0") => HugePages::Off,
                Ok("fault") => HugePages::AtFault,
                _ if cfg!(target_os = "linux") && !thp_never() => HugePages::Promoted,
                _ => HugePages::AtFault,
            });
        *CHOSEN
    }
}

/// Whether the system gives no transparent huge pages at all (`never`, or a kernel without
/// them): then moving pages onto huge pages would only copy them onto 4 KiB pages again.
/// (Since Linux 6.8 a per-size setting can give 2 MiB pages under a top-level `never`; chord
/// goes by the top-level one.)
fn thp_never() -> bool {
    // No file: a kernel without transparent huge pages.
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .map_or(true, |s| s.contains("[never]"))
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
    /// Chunks handed out and not yet frozen ([`ChunkMut`]): the region is not moved while
    /// any is being written.
    writing: AtomicUsize,
}

// SAFETY: a region's bytes are only reached through chunks, each owning a disjoint byte
// range of it; the promoting thread holds regions too, and reads and re-maps their bytes
// without changing one, only once no chunk of theirs is writable (`writing` is 0, with no
// chunk left to hand out: `Arena::promote`).
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
                writing: AtomicUsize::new(0),
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
            writing: AtomicUsize::new(0),
        }
    }

    /// Moves the pages of its used 2 MiB stretches onto huge pages, one stretch at a time,
    /// and stops once `region` is the last holder of the region (its chunks dropped). Heap
    /// regions stay as they are. The caller has made sure no chunk of it is written any more.
    ///
    /// Each stretch is copied into a fresh huge page of a staging mapping, then put in place
    /// with `mremap`, which moves the page table entry under the process's memory-map lock.
    /// The kernel's own move (`MADV_COLLAPSE`, Linux 6.1), used before, holds that lock while
    /// it copies, about 7 ms a stretch where the host has taken the memory back (136 MiB in
    /// 475 ms), and every `mmap`, `munmap` and `brk` of the process waits for it: right after
    /// a load, `chord generate -n 1` on the default model spent 46-251 ms between its load
    /// and its exit, against 14-38 ms now (AMD EPYC family 25 model 17, KVM guest; the move
    /// itself takes as long as before, 270-380 ms for the default model's 94 MB).
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
        if span > 0 {
            // SAFETY: `base .. base + span` is whole 2 MiB stretches of this region's live
            // private anonymous mapping, 2 MiB-aligned; the caller guarantees no chunk of the
            // region is written any more, and `region` keeps the mapping alive.
            unsafe {
                move_onto_huge_pages(region.base, span, || Arc::strong_count(region) > 1);
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = span;
    }
}

/// Replaces the `span` bytes at `base`, stretch by stretch while `go_on()` says so, with the
/// same bytes on huge pages (where the kernel has them to give: else on 4 KiB pages, as
/// before).
///
/// The stretches go through one staging mapping, so that the moved pieces (same anonymous
/// memory object, consecutive offsets, same flags) merge into one mapping of the process
/// instead of adding one each.
///
/// # Safety
///
/// `base .. base + span` is whole 2 MiB stretches, 2 MiB-aligned, of a private anonymous
/// mapping of this process that nothing writes during the call. Readers may run throughout:
/// they see the old pages or the new ones, the same bytes.
#[cfg(target_os = "linux")]
unsafe fn move_onto_huge_pages(base: *mut u8, span: usize, go_on: impl Fn() -> bool) {
    debug_assert!((base as usize).is_multiple_of(HUGE_PAGE) && span.is_multiple_of(HUGE_PAGE));
    let len = span + HUGE_PAGE;
    // SAFETY (the block): `staging` is a fresh mapping of `len` bytes holding an aligned
    // `span` (`staged`); each copy reads a live stretch of `base` (not written) into the
    // staged stretch at the same offset; `mremap` moves that staged stretch over it; after
    // the loop, only the parts of `staging` still mapped by it are unmapped (the moved
    // stretches' addresses may hold other mappings by then).
    unsafe {
        let staging = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if staging == libc::MAP_FAILED {
            return;
        }
        let staging = staging.cast::<u8>();
        let skip = staging.align_offset(HUGE_PAGE);
        let staged = staging.add(skip);
        libc::madvise(staged.cast(), span, libc::MADV_HUGEPAGE);
        let mut moved = 0;
        while moved < span && go_on() {
            let (from, to) = (staged.add(moved), base.add(moved));
            std::ptr::copy_nonoverlapping(to, from, HUGE_PAGE);
            if !remap_stretch(from, to) {
                restore_after_failed_move(to, from);
                break;
            }
            moved += HUGE_PAGE;
        }
        if skip > 0 {
            libc::munmap(staging.cast(), skip);
        }
        libc::munmap(staged.add(moved).cast(), len - skip - moved);
    }
}

/// Moves the 2 MiB mapped at `from` over the 2 MiB at `to` (`mremap` with `MREMAP_FIXED`,
/// which unmaps what was at `to` first). Whether it moved.
///
/// # Safety
///
/// Both are 2 MiB-aligned stretches of this process's private anonymous memory; what was at
/// `to` is given up.
#[cfg(target_os = "linux")]
unsafe fn remap_stretch(from: *mut u8, to: *mut u8) -> bool {
    let flags = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
    // SAFETY: the caller's contract; the call changes mappings only, never a byte.
    let at = unsafe {
        libc::mremap(
            from.cast(),
            HUGE_PAGE,
            HUGE_PAGE,
            flags,
            to.cast::<libc::c_void>(),
        )
    };
    at != libc::MAP_FAILED
}

/// After a failed `mremap` of the staged stretch `from` over `to`: Linux unmaps the
/// destination before it moves the source, and a move can still fail after that (out of
/// memory), so `to` may be a hole. Reserves the hole without showing readers zeros and moves
/// `from` into it again; where `to` is still mapped, checks that it still holds the weights.
/// Aborts if neither holds: the weights would be gone. A reader that reaches the hole before
/// it is filled crashes; nothing can prevent that.
///
/// # Safety
///
/// `to` is the 2 MiB-aligned stretch `mremap` was asked to replace, `from` a live stretch
/// with its bytes.
#[cfg(target_os = "linux")]
unsafe fn restore_after_failed_move(to: *mut u8, from: *mut u8) {
    // SAFETY (the block): `MAP_FIXED_NOREPLACE` maps `to` only where nothing is mapped (else
    // EEXIST, or on kernels before 4.17 another address, unmapped again here); the `mremap`
    // replaces that reservation with the live `from`; `to` is otherwise only read through
    // `same_bytes`, which cannot fault.
    unsafe {
        let at = libc::mmap(
            to.cast(),
            HUGE_PAGE,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        );
        let restored = if at == to.cast() {
            remap_stretch(from, to)
        } else if at != libc::MAP_FAILED {
            libc::munmap(at, HUGE_PAGE);
            same_bytes(to, from)
        } else {
            std::io::Error::last_os_error().raw_os_error() == Some(libc::EEXIST)
                && same_bytes(to, from)
        };
        if !restored {
            eprintln!("chord: weights lost while moving them onto huge pages; aborting");
            std::process::abort();
        }
    }
}

/// Whether the 2 MiB at `to` can be read and equal those at `from`: `to` is read with
/// `process_vm_readv`, which reports an address it cannot read instead of faulting.
///
/// # Safety
///
/// `from` is 2 MiB of live, readable memory.
#[cfg(target_os = "linux")]
unsafe fn same_bytes(to: *const u8, from: *const u8) -> bool {
    let mut copy = vec![0u8; HUGE_PAGE];
    let local = libc::iovec {
        iov_base: copy.as_mut_ptr().cast(),
        iov_len: HUGE_PAGE,
    };
    let remote = libc::iovec {
        iov_base: to.cast_mut().cast(),
        iov_len: HUGE_PAGE,
    };
    // SAFETY: reads this process's own memory into `copy`, which holds HUGE_PAGE bytes; an
    // unreadable `to` is an error, not a fault. `from` is live (the caller).
    unsafe {
        let read = libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0);
        read == HUGE_PAGE as isize && copy[..] == *std::slice::from_raw_parts(from, HUGE_PAGE)
    }
}

/// Bytes of a region, owned alone and read only (see the module docs): a [`ChunkMut`] from
/// an [`Arena`] once written and [`frozen`](ChunkMut::freeze), or a chunk's clone.
pub struct Chunk {
    /// Keeps the region alive; a [`ChunkMut`]'s counts as being written.
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

impl Clone for Chunk {
    /// A copy in a region of its own, on huge pages for its whole 2 MiB stretches.
    fn clone(&self) -> Chunk {
        let region = Arc::new(Region::new(self.len, false));
        region.used.store(self.len, Ordering::Release);
        region.writing.store(1, Ordering::Relaxed);
        let mut c = ChunkMut(Chunk {
            ptr: region.base,
            region,
            len: self.len,
        });
        c.copy_from_slice(self);
        c.freeze()
    }
}

impl std::fmt::Debug for Chunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Chunk({} bytes)", self.len)
    }
}

/// Zeroed bytes cut from an [`Arena`]'s region, owned alone and writable until
/// [`freeze`](ChunkMut::freeze) makes them a [`Chunk`]. [`Arena::promote`] leaves a region
/// alone while any chunk of it is still a `ChunkMut`.
pub struct ChunkMut(Chunk);

impl ChunkMut {
    /// The chunk, read only from now on: its region may move onto huge pages.
    pub fn freeze(self) -> Chunk {
        let frozen = Chunk {
            region: Arc::clone(&self.0.region),
            ptr: self.0.ptr,
            len: self.0.len,
        };
        drop(self); // no longer writing (Release: the bytes are written before the move)
        frozen
    }
}

impl Drop for ChunkMut {
    fn drop(&mut self) {
        self.0.region.writing.fetch_sub(1, Ordering::Release);
    }
}

impl Deref for ChunkMut {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl DerefMut for ChunkMut {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr..ptr + len` lies in the live region and belongs to this chunk alone;
        // `&mut self` makes the access exclusive, and the region is not moved while a
        // `ChunkMut` of it lives (`writing`).
        unsafe { std::slice::from_raw_parts_mut(self.0.ptr, self.0.len) }
    }
}

impl std::fmt::Debug for ChunkMut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChunkMut({} bytes)", self.0.len)
    }
}

/// Hands out [`ChunkMut`]s, to write and freeze, from shared huge-page regions (see the
/// module docs).
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

    /// Starts moving the frozen chunks handed out so far onto huge pages, in the background,
    /// on a thread of the lowest priority (nice 19), so it runs on the cores the work leaves
    /// idle; [`settle`](Arena::settle) waits for it. Chunks stay readable throughout. A
    /// region with a chunk still being written ([`ChunkMut`]) waits for the next call, and
    /// chunks handed out later come from new regions, on 4 KiB pages until the next call:
    /// prepare every weight first. Nothing for an arena made by [`Arena::new`].
    pub fn promote(&self) {
        let Some(later) = &self.later else { return };
        // Held until the regions are chosen: no chunk is cut from a shared region meanwhile,
        // and none later from a region being moved.
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        *current = None;
        let mut later = later.lock().unwrap_or_else(|e| e.into_inner());
        let mut regions = Vec::new();
        later.waiting.retain(|r| match r.upgrade() {
            None => false,
            Some(r) if r.writing.load(Ordering::Acquire) > 0 => true,
            Some(r) => {
                regions.push(r);
                false
            }
        });
        drop(current);
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

    /// A new region of `len` bytes, on huge pages now or on promotion, for a chunk about to
    /// be handed out from its start (counted as being written).
    fn region(&self, len: usize) -> Arc<Region> {
        let region = Arc::new(Region::new(len, self.later.is_some()));
        region.writing.store(1, Ordering::Relaxed);
        if let Some(later) = &self.later {
            let mut later = later.lock().unwrap_or_else(|e| e.into_inner());
            later.waiting.retain(|r| r.strong_count() > 0);
            later.waiting.push(Arc::downgrade(&region));
        }
        region
    }

    /// `len` zeroed bytes, aligned to [`CHUNK_ALIGN`], to write and then
    /// [`freeze`](ChunkMut::freeze).
    pub fn alloc(&self, len: usize) -> ChunkMut {
        if len > REGION / 4 {
            // A region of its own (huge pages for its whole 2 MiB stretches only).
            let region = self.region(len);
            region.used.store(len, Ordering::Release);
            return ChunkMut(Chunk {
                ptr: region.base,
                region,
                len,
            });
        }
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let fits = |r: &Arc<Region>| {
            r.used.load(Ordering::Relaxed).next_multiple_of(CHUNK_ALIGN) + len <= r.len
        };
        let region = match current.as_ref() {
            Some(r) if fits(r) => {
                r.writing.fetch_add(1, Ordering::Relaxed);
                Arc::clone(r)
            }
            _ => Arc::clone(current.insert(self.region(REGION))),
        };
        let at = region
            .used
            .load(Ordering::Relaxed)
            .next_multiple_of(CHUNK_ALIGN);
        region.used.store(at + len, Ordering::Release);
        ChunkMut(Chunk {
            // SAFETY: `at + len <= region.len` (checked by `fits`; a new region starts at 0
            // and `len <= REGION / 4`).
            ptr: unsafe { region.base.add(at) },
            region,
            len,
        })
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
        let mut chunks: Vec<ChunkMut> = sizes.iter().map(|&n| arena.alloc(n)).collect();
        drop(arena);
        for (i, (c, &n)) in chunks.iter_mut().zip(&sizes).enumerate() {
            assert_eq!(c.len(), n);
            assert_eq!(c.as_ptr() as usize % CHUNK_ALIGN, 0, "chunk {i}");
            assert!(c.iter().all(|&b| b == 0), "chunk {i} starts zeroed");
            c.fill(i as u8 + 1);
        }
        let chunks: Vec<Chunk> = chunks.into_iter().map(ChunkMut::freeze).collect();
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
        let mut chunks: Vec<ChunkMut> = sizes.iter().map(|&n| arena.alloc(n)).collect();
        let pattern = |i: usize, j: usize| (i * 31 + j * 7 + j / 4096) as u8;
        for (i, c) in chunks.iter_mut().enumerate() {
            c.iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = pattern(i, j));
        }
        let chunks: Vec<Chunk> = chunks.into_iter().map(ChunkMut::freeze).collect();
        let before: Vec<usize> = chunks.iter().map(|c| c.as_ptr() as usize).collect();
        arena.promote();
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
        assert!(
            !chunks
                .iter()
                .any(|c| Arc::ptr_eq(&c.region, &late.0.region))
        );
        assert!(late.iter().all(|&b| b == 0));
        late.fill(9);
        let late = late.freeze();
        arena.promote();
        arena.settle();
        for (i, c) in chunks.iter().enumerate() {
            assert_eq!(c.as_ptr() as usize, before[i], "chunk {i} kept its address");
            for (j, &b) in c.iter().enumerate() {
                assert_eq!(b, pattern(i, j), "chunk {i} byte {j}");
            }
        }
        assert!(late.iter().all(|&b| b == 9));
    }

    /// `AnonHugePages` of the mapping holding `at`, in KiB, from `/proc/self/smaps`.
    #[cfg(target_os = "linux")]
    fn huge_kb(at: *const u8) -> Option<u64> {
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
    }

    /// A region moves onto huge pages once none of its chunks is still being written, its
    /// moved stretches as one mapping, where the kernel hands huge pages out on request
    /// (transparent huge pages `always` or `madvise`; with `never`, nothing moves).
    #[cfg(target_os = "linux")]
    #[test]
    fn a_region_moves_onto_huge_pages_once_its_chunks_are_frozen() {
        if HugePages::chosen() != HugePages::Promoted && !thp_never() {
            eprintln!("CHORD_HUGE_PAGES is set: this test checks the default");
            return;
        }
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        let on = thp.contains("[always]") || thp.contains("[madvise]");
        let kb = |mib: u64| Some(if on { mib * 1024 } else { 0 });
        let arena = Arena::promoted_later();
        // A region of its own (4 whole stretches), and 4 MiB + 1 of a shared one (3).
        let mut open = arena.alloc(REGION / 4 + 1);
        let mut done = arena.alloc(2 * HUGE_PAGE + 1);
        open.fill(7);
        done.fill(8);
        let done = done.freeze();
        arena.promote();
        arena.settle();
        assert_eq!(huge_kb(open.as_ptr()), Some(0), "still written: not moved");
        assert_eq!(huge_kb(done.as_ptr()), kb(6), "THP setting {thp:?}");
        let open = open.freeze();
        arena.promote();
        arena.settle();
        assert_eq!(huge_kb(open.as_ptr()), kb(8), "THP setting {thp:?}");
        assert!(open.iter().all(|&b| b == 7) && done.iter().all(|&b| b == 8));
    }

    /// After a failed move, a stretch left unmapped gets the staged bytes back, and one still
    /// mapped is checked and kept.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_failed_move_puts_the_bytes_back() {
        let fill = |r: &Region, v: u8| {
            // SAFETY: inside the region's mapping, which nothing else reaches.
            unsafe { std::ptr::write_bytes(r.base, v, HUGE_PAGE) };
        };
        // SAFETY: inside the region's mapping; only read while no `&mut` to it lives.
        let bytes = |r: &Region| unsafe { std::slice::from_raw_parts(r.base, HUGE_PAGE) };
        let (to, from) = (Region::new(HUGE_PAGE, true), Region::new(HUGE_PAGE, true));
        fill(&to, 5);
        fill(&from, 5);
        // Still mapped, same bytes: kept as it is.
        // SAFETY: both are live 2 MiB stretches of this test's own mappings.
        unsafe { restore_after_failed_move(to.base, from.base) };
        assert!(bytes(&to).iter().all(|&b| b == 5));
        // Unmapped, as a move failing after Linux unmapped the destination leaves it.
        fill(&from, 6);
        // SAFETY: `to.base` is this test's own stretch; nothing reads it until refilled.
        assert_eq!(unsafe { libc::munmap(to.base.cast(), HUGE_PAGE) }, 0);
        // SAFETY: as above.
        unsafe { restore_after_failed_move(to.base, from.base) };
        assert!(bytes(&to).iter().all(|&b| b == 6));
    }

    #[test]
    fn small_chunks_share_a_huge_page_aligned_region() {
        let arena = Arena::new();
        let a = arena.alloc(1000).freeze();
        let b = arena.alloc(1000).freeze();
        assert!(Arc::ptr_eq(&a.region, &b.region));
        assert_eq!(b.as_ptr() as usize - a.as_ptr() as usize, 1024);
        assert_eq!(a.region.base as usize % HUGE_PAGE, 0);
        let big = arena.alloc(REGION / 2).freeze();
        assert!(!Arc::ptr_eq(&a.region, &big.region));
        // A chunk that does not fit the rest of the region starts a new one.
        let c = arena.alloc(REGION / 4).freeze();
        let d = arena.alloc(REGION / 4).freeze();
        let e = arena.alloc(REGION / 4).freeze();
        let f = arena.alloc(REGION / 4).freeze();
        assert!(Arc::ptr_eq(&a.region, &e.region) && !Arc::ptr_eq(&a.region, &f.region));
        drop((c, d));
    }
}
