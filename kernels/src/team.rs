//! A team of threads for the per-op parallelism of a forward pass.
//!
//! A decoded token runs about two hundred ops, each a few to a few hundred microseconds:
//! waking a thread pool per op (a rayon `install`, a futex wake) would cost as much as the
//! work. A [`Team`] keeps its workers spinning for a short while after each job, so the next
//! op starts on all cores within a microsecond or so, and parks them once the team has been
//! idle for [`SPIN`], so an idle process does not burn CPU. The calling thread takes part
//! in every job: a team of `n` threads has `n - 1` workers.
//!
//! Jobs are split into tasks numbered `0..tasks`, handed out in order to whichever
//! participant asks next; a caller that needs a fixed assignment (for reproducible
//! summation) makes the task index, not the thread, decide the work.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker waits for the next job before it parks.
pub const SPIN: Duration = Duration::from_micros(200);
/// Busy-wait iterations before a waiting thread starts yielding its core.
const YIELD_AFTER: u32 = 2000;

/// A job: the task function, erased to a raw pointer while the caller waits for it.
#[derive(Clone, Copy)]
struct Job {
    f: *const (dyn Fn(usize) + Sync),
    tasks: usize,
}

struct Shared {
    /// The current job; written by the caller before `generation` moves, read by workers
    /// after they see it move.
    job: UnsafeCell<Job>,
    /// Bumped once per job.
    generation: AtomicUsize,
    /// The next task index to hand out.
    next: AtomicUsize,
    /// Workers still inside the current job.
    busy: AtomicUsize,
    /// Workers parked (or about to park) on `wake`.
    sleeping: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    stop: AtomicBool,
}

// SAFETY: `job` is written only by the caller holding `Team::calls`, while no worker reads
// it (every worker has finished the previous job: `busy` is 0), and read by workers only
// between the `generation` bump (Release/Acquire) and their `busy` decrement.
unsafe impl Sync for Shared {}
// SAFETY: as above; the pointer in `job` is only dereferenced during a job.
unsafe impl Send for Shared {}

fn noop(_: usize) {}

/// A fixed set of threads running one job at a time (see the module docs).
pub struct Team {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// One job at a time: calls from several threads take turns.
    calls: Mutex<()>,
}

impl std::fmt::Debug for Team {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Team({} threads)", self.threads())
    }
}

impl Team {
    /// A team of `threads` (at least 1): the caller and `threads - 1` workers.
    pub fn new(threads: usize) -> std::io::Result<Team> {
        let shared = Arc::new(Shared {
            job: UnsafeCell::new(Job {
                f: &noop as &(dyn Fn(usize) + Sync),
                tasks: 0,
            }),
            generation: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
            sleeping: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let mut workers = Vec::new();
        for i in 1..threads.max(1) {
            let s = Arc::clone(&shared);
            workers.push(
                std::thread::Builder::new()
                    .name(format!("chord-{i}"))
                    .spawn(move || worker(&s))?,
            );
        }
        Ok(Team {
            shared,
            workers,
            calls: Mutex::new(()),
        })
    }

    /// Threads taking part in each job, the caller included.
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f(t)` for every `t` in `0..tasks`, spread over the team, and returns when all
    /// have run. A panic in a task aborts the process (the tasks borrow the caller's stack).
    pub fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if tasks == 0 {
            return;
        }
        if tasks == 1 || self.workers.is_empty() {
            (0..tasks).for_each(f);
            return;
        }
        let _turn = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // SAFETY: every worker finished the previous job (we waited for `busy` to reach 0
        // under `calls`), so none reads `job` now; the erased borrow of `f` outlives the job
        // because this function waits for `busy` to return to 0 before returning.
        unsafe {
            *s.job.get() = Job {
                f: std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static (dyn Fn(usize) + Sync)>(
                    f,
                ),
                tasks,
            };
        }
        s.next.store(0, Ordering::Relaxed);
        s.busy.store(self.workers.len(), Ordering::Relaxed);
        s.generation.fetch_add(1, Ordering::SeqCst);
        if s.sleeping.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        // The caller's share. A panic here would free `f` while workers run it: abort.
        let guard = AbortOnUnwind;
        take_tasks(s, f, tasks);
        std::mem::forget(guard);
        let mut spins = 0u32;
        while s.busy.load(Ordering::Acquire) > 0 {
            spins = spins.saturating_add(1);
            if spins < YIELD_AFTER {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

impl Team {
    /// Runs of a decode call over `counts` units: [`RUNS_PER_THREAD`] per thread, at most
    /// one per unit.
    pub fn decode_runs(&self, counts: &[usize]) -> usize {
        (self.threads() * RUNS_PER_THREAD).min(counts.iter().sum())
    }

    /// Runs `f(i, units)` over the units of `counts` (weight `i` has `counts[i]`), laid end
    /// to end and cut into `runs` contiguous runs, one task each ([`for_each_part`]).
    pub fn run_parts(
        &self,
        counts: &[usize],
        runs: usize,
        f: &(dyn Fn(usize, std::ops::Range<usize>) + Sync),
    ) {
        self.run(runs, &|t| for_each_part(counts, runs, t, f));
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let _g = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Aborts the process if dropped during unwinding (see [`Team::run`]).
struct AbortOnUnwind;
impl Drop for AbortOnUnwind {
    fn drop(&mut self) {
        eprintln!("chord: a parallel task panicked; aborting");
        std::process::abort();
    }
}

fn take_tasks(s: &Shared, f: &(dyn Fn(usize) + Sync), tasks: usize) {
    loop {
        let t = s.next.fetch_add(1, Ordering::Relaxed);
        if t >= tasks {
            return;
        }
        f(t);
    }
}

fn worker(s: &Shared) {
    // The generation the team was made with: a worker that starts late still takes part in
    // the first job.
    let mut seen = 0;
    loop {
        // Wait for the next job: spin, then park.
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let g = s.generation.load(Ordering::Acquire);
            if g != seen {
                seen = g;
                break;
            }
            if s.stop.load(Ordering::Relaxed) {
                return;
            }
            spins = spins.wrapping_add(1);
            if spins < YIELD_AFTER {
                std::hint::spin_loop();
                continue;
            }
            if start.elapsed() < SPIN {
                // Give the core away when another thread wants it (an oversubscribed machine),
                // while still answering within microseconds when it does not.
                std::thread::yield_now();
                continue;
            }
            s.sleeping.fetch_add(1, Ordering::SeqCst);
            let mut g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            while s.generation.load(Ordering::SeqCst) == seen && !s.stop.load(Ordering::SeqCst) {
                g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            drop(g);
            s.sleeping.fetch_sub(1, Ordering::SeqCst);
        }
        // SAFETY: the caller wrote `job` before bumping `generation` and keeps it (and the
        // closure it points to) alive until `busy` reaches 0.
        let job = unsafe { *s.job.get() };
        let guard = AbortOnUnwind;
        // SAFETY: as above.
        take_tasks(s, unsafe { &*job.f }, job.tasks);
        std::mem::forget(guard);
        s.busy.fetch_sub(1, Ordering::Release);
    }
}

/// Runs of decode work per thread of a team: the units (rows, groups of rows) of the weights
/// one call multiplies, laid end to end, are cut into `threads * RUNS_PER_THREAD` contiguous
/// runs of near-equal length ([`for_each_part`]). Long runs let each core stream its rows in
/// order: on Zen 4, decoding the default model on two threads with runs of 64 rows dealt in
/// turn was 25-45% slower than with one or two runs per thread (`chord bench model`,
/// binaries alternated); one run per thread measured within noise of two, and two leave
/// room for a thread that starts late.
pub const RUNS_PER_THREAD: usize = 2;

/// The part of run `t` of `runs` that falls in each weight, where weight `i` has
/// `counts[i]` units: `f(i, units)` for each non-empty part, in order. No run (`runs` 0)
/// has no parts.
pub fn for_each_part(
    counts: &[usize],
    runs: usize,
    t: usize,
    mut f: impl FnMut(usize, std::ops::Range<usize>),
) {
    if runs == 0 {
        return;
    }
    let total: usize = counts.iter().sum();
    let (g0, g1) = (total * t / runs, total * (t + 1) / runs);
    let mut base = 0;
    for (i, &c) in counts.iter().enumerate() {
        let (lo, hi) = (g0.max(base), g1.min(base + c));
        if lo < hi {
            f(i, lo - base..hi - base);
        }
        base += c;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_task_runs_exactly_once_on_every_team_size() {
        for threads in 1..=4 {
            let team = Team::new(threads).unwrap();
            for tasks in [0, 1, 2, 3, 7, 64] {
                let hits: Vec<AtomicU64> = (0..tasks).map(|_| AtomicU64::new(0)).collect();
                for _ in 0..50 {
                    team.run(tasks, &|t| {
                        hits[t].fetch_add(1, Ordering::Relaxed);
                    });
                }
                assert!(
                    hits.iter().all(|h| h.load(Ordering::Relaxed) == 50),
                    "{threads} threads, {tasks} tasks"
                );
            }
        }
    }

    #[test]
    fn parked_workers_wake_for_the_next_job() {
        let team = Team::new(3).unwrap();
        std::thread::sleep(SPIN * 5);
        let sum = AtomicU64::new(0);
        team.run(100, &|t| {
            sum.fetch_add(t as u64, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 4950);
    }

    #[test]
    fn callers_on_several_threads_take_turns() {
        let team = Team::new(2).unwrap();
        let total = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..200 {
                        team.run(8, &|_| {
                            total.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 4 * 200 * 8);
    }

    /// The runs cover every unit of every weight once, in order, each run contiguous in the
    /// units laid end to end and within one of the others' length.
    #[test]
    fn runs_cover_every_unit_once_in_contiguous_near_equal_parts() {
        for counts in [
            vec![96],
            vec![36, 12, 12],
            vec![1, 0, 5],
            vec![3072],
            vec![0],
        ] {
            let total: usize = counts.iter().sum();
            // More runs than units leaves some runs empty.
            for runs in 1..=total.min(9) + 3 {
                let mut seen = Vec::new();
                let mut lens = Vec::new();
                for t in 0..runs {
                    let mut len = 0;
                    for_each_part(&counts, runs, t, |i, units| {
                        assert!(!units.is_empty() && units.end <= counts[i]);
                        len += units.len();
                        seen.extend(units.map(|u| (i, u)));
                    });
                    lens.push(len);
                }
                let want: Vec<(usize, usize)> = counts
                    .iter()
                    .enumerate()
                    .flat_map(|(i, &c)| (0..c).map(move |u| (i, u)))
                    .collect();
                assert_eq!(seen, want, "{counts:?} in {runs} runs");
                let (lo, hi) = (lens.iter().min().unwrap(), lens.iter().max().unwrap());
                assert!(hi - lo <= 1, "{counts:?} in {runs} runs: {lens:?}");
            }
        }
    }
}
