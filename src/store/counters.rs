//! Usage counters: one pair per key id (requests, last use), kept outside the
//! snapshots and shared by all of them.
//!
//! A key's slot holds a [`Counter`]: the index of its cell here, and the cell's
//! generation. A new version of the key set hands each key that keeps its id the same
//! `Counter`, so a request that still reads a replaced version counts into the same
//! cell as one that reads the new version, and a writer never waits for readers. A
//! cell whose key is removed gets a new generation and goes back to be reused: a count
//! made late with the old generation is dropped, never given to the next key.
//!
//! A request does not write the cell itself. Each thread keeps, for each store, a
//! *tally*: a small table of the keys it let in within the current second and how
//! many times, which it adds to the cells when the second changes or a key finds no
//! place in it. A hot key used from many cores then writes no cache line another core
//! reads (a shared counter would bounce between them on every request), and a cold
//! lookup in a large set does not stop for a second cache miss: the tally adds its
//! cells in one go, after loading them all at once. Readers ([`Counters::usage`]) add
//! what the tallies hold, so counts are exact once requests return; while a tally is
//! being added, a count can be missing for a moment, never counted twice.

use std::{
    cell::RefCell,
    collections::HashMap,
    hint::black_box,
    sync::{
        Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak,
        atomic::{AtomicU32, AtomicU64, Ordering, fence},
    },
};

/// Request count and last use (Unix seconds, 0 for never) of one key.
pub(crate) type Usage = (u64, u32);

/// Where a key's counts go: a cell, and the generation of the cell the key owns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct Counter {
    index: u32,
    generation: u32,
}

/// Generations have 30 bits: a slot keeps two flags beside them.
const GENERATIONS: u32 = (1 << 30) - 1;

impl Counter {
    pub(crate) fn new(index: u32, generation: u32) -> Self {
        Self {
            index,
            generation: generation & GENERATIONS,
        }
    }

    pub(crate) fn index(self) -> u32 {
        self.index
    }

    pub(crate) fn generation(self) -> u32 {
        self.generation
    }

    /// As a tally holds it: never 0, which marks an empty place.
    fn packed(self) -> u64 {
        (u64::from(self.generation) << 32) | (u64::from(self.index) + 1)
    }

    fn unpacked(packed: u64) -> Self {
        Self {
            index: (packed as u32).wrapping_sub(1),
            generation: (packed >> 32) as u32,
        }
    }
}

/// The cells of the first chunk; chunk `k` has `FIRST << k`, so that 23 chunks cover
/// every `u32` index and a small store allocates 16 KiB.
const FIRST: u32 = 1 << 10;
const CHUNKS: usize = 23;

/// How many keys a tally holds.
const TALLY: usize = 64;

/// The request count's word: generation (its low 16 bits) and count (high 48 bits).
/// The last use's word: generation (high 32 bits) and Unix seconds (low 32 bits). Each
/// word is changed only by a compare-and-swap that checks its generation.
const COUNT_SHIFT: u32 = 16;

/// A store's usage counters.
pub(crate) struct Counters {
    chunks: [OnceLock<Chunk>; CHUNKS],
    /// The cells no key id has.
    free: Mutex<Free>,
    /// The tallies of the threads that counted requests for this store.
    tallies: Mutex<Vec<Arc<Tally>>>,
}

/// Cells no key id has: those taken back (with a new generation), to reuse first, and
/// from `next` on, those never used.
#[derive(Default)]
struct Free {
    taken_back: Vec<u32>,
    next: u32,
}

/// One key id's counts: both words in one cache line, so that adding a tally's
/// requests to it costs one trip to memory.
#[derive(Default)]
#[repr(align(16))]
struct Cell {
    count: AtomicU64,
    stamp: AtomicU64,
}

type Chunk = Box<[Cell]>;

impl Cell {
    /// Adds `n` requests at `second`, if the key of `counter` still owns this cell.
    fn add(&self, counter: Counter, n: u64, second: u32) {
        let Self { count, stamp } = self;
        let generation = u64::from(counter.generation);
        let mut s = stamp.load(Ordering::Acquire);
        if s >> 32 != generation {
            return;
        }
        let short = u64::from(counter.generation as u16);
        let mut c = count.load(Ordering::Relaxed);
        loop {
            if c & 0xffff != short {
                return;
            }
            match count.compare_exchange_weak(
                c,
                c.wrapping_add(n << COUNT_SHIFT),
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(now) => c = now,
            }
        }
        while s >> 32 == generation && (s as u32) < second {
            match stamp.compare_exchange_weak(
                s,
                (generation << 32) | u64::from(second),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(now) => s = now,
            }
        }
    }
}

/// Chunk and offset of cell `index`.
fn place(index: u32) -> (usize, usize) {
    let i = u64::from(index) + u64::from(FIRST);
    let k = 63 - i.leading_zeros() - FIRST.trailing_zeros();
    (k as usize, (i - (u64::from(FIRST) << k)) as usize)
}

impl Counters {
    pub(crate) fn new() -> Self {
        Self {
            chunks: Default::default(),
            free: Mutex::default(),
            tallies: Mutex::new(Vec::new()),
        }
    }

    /// The two words of the cell `counter` names, if it was ever handed out.
    #[inline]
    fn cell(&self, counter: Counter) -> Option<&Cell> {
        let (k, at) = place(counter.index);
        self.chunks.get(k)?.get()?.get(at)
    }

    /// The cells to hand out and take back, for the writer making a new version.
    pub(crate) fn cells(&self) -> Cells<'_> {
        Cells {
            counters: self,
            free: lock(&self.free),
        }
    }

    /// Counts one request at `now_secs` (Unix seconds): the request path. No lock and
    /// no allocation, but for a thread's first request to this store.
    #[inline]
    pub(crate) fn record(self: &Arc<Self>, counter: Counter, now_secs: u32) {
        let recorded = TALLIES.try_with(|tallies| {
            let mut tallies = tallies.borrow_mut();
            let tally = match tallies.first() {
                Some((counters, tally)) if counters.as_ptr() == Arc::as_ptr(self) => tally,
                _ => self.tally_of_this_thread(&mut tallies),
            };
            tally.record(counter, now_secs, self);
        });
        // The thread is exiting and its tallies are gone: count at once.
        if recorded.is_err() {
            self.add(counter, 1, now_secs);
        }
    }

    /// This thread's tally for this store, found or made, moved first in `tallies`.
    #[cold]
    fn tally_of_this_thread<'t>(
        self: &Arc<Self>,
        tallies: &'t mut Vec<(Weak<Self>, Arc<Tally>)>,
    ) -> &'t Tally {
        // Tallies of stores that are gone go with them.
        tallies.retain(|(counters, _)| counters.strong_count() > 0);
        let at = match tallies
            .iter()
            .position(|(counters, _)| counters.as_ptr() == Arc::as_ptr(self))
        {
            Some(at) => at,
            None => {
                let tally = Arc::new(Tally::default());
                let mut all = lock(&self.tallies);
                self.fold_orphans(&mut all);
                all.push(tally.clone());
                drop(all);
                tallies.push((Arc::downgrade(self), tally));
                tallies.len() - 1
            }
        };
        tallies.swap(0, at);
        &tallies[0].1
    }

    /// Adds `n` requests at `second` to the cell of `counter`, if the key still owns it.
    fn add(&self, counter: Counter, n: u64, second: u32) {
        if let Some(cell) = self.cell(counter) {
            cell.add(counter, n, second);
        }
    }

    /// Adds a tally's counts (packed counter, requests) to their cells. With more than
    /// a few, every cell is loaded first, so that their cache misses overlap.
    ///
    /// The loads come in a loop of their own, after every cell's place is worked out:
    /// no instruction after a load that waits for memory retires before its line
    /// arrives, and the core holds only a few hundred unretired. A loop that also
    /// worked out each place filled that window after a dozen or so loads; this one
    /// has many more in flight at once, as many as the core takes (25–32 ns less a
    /// request in the cache-cold case, see `benches/README.md`).
    fn add_all(&self, taken: &[(u64, u64)], second: u32) {
        debug_assert!(taken.len() <= TALLY, "a tally's worth at most");
        let mut cells: [Option<&Cell>; TALLY] = [None; TALLY];
        for (cell, &(packed, _)) in cells.iter_mut().zip(taken) {
            *cell = self.cell(Counter::unpacked(packed));
        }
        if taken.len() > 4 {
            let mut loaded = 0;
            for cell in cells.iter().flatten() {
                loaded ^= cell.count.load(Ordering::Relaxed);
            }
            black_box(loaded);
        }
        for (cell, &(packed, n)) in cells.iter().zip(taken) {
            if let Some(cell) = cell {
                cell.add(Counter::unpacked(packed), n, second);
            }
        }
    }

    /// Adds the tallies of threads that have exited, and forgets them.
    fn fold_orphans(&self, all: &mut Vec<Arc<Tally>>) {
        all.retain(|tally| {
            // Only the list holds it: no thread can add to it any more.
            if Arc::strong_count(tally) > 1 {
                return true;
            }
            // What the exited thread wrote before it let go of the tally is seen here
            // (as `Arc`'s own drop does before freeing).
            fence(Ordering::Acquire);
            let mut taken = [(0, 0); TALLY];
            let n = tally.take(&mut taken);
            self.add_all(&taken[..n], tally.second.load(Ordering::Acquire));
            false
        });
    }

    /// The usage of each of `counters`, in order, with what the threads' tallies hold.
    pub(crate) fn usage(&self, counters: impl IntoIterator<Item = Counter>) -> Vec<Usage> {
        let mut all = lock(&self.tallies);
        self.fold_orphans(&mut all);
        // The cells first, then the tallies: a tally is emptied before its requests
        // reach the cells, so in this order none is counted twice.
        let counters: Vec<Counter> = counters.into_iter().collect();
        let mut usage: Vec<Option<Usage>> = counters.iter().map(|&c| self.read(c)).collect();
        let mut held: HashMap<Counter, Usage, foldhash::fast::RandomState> = HashMap::default();
        for tally in all.iter() {
            let mut read = [(0, 0); TALLY];
            let second = tally.second.load(Ordering::Acquire);
            let held_keys = tally.read(&mut read);
            for &(packed, n) in &read[..held_keys] {
                let (requests, last) = held.entry(Counter::unpacked(packed)).or_default();
                *requests += n;
                *last = (*last).max(second);
            }
        }
        drop(all);
        if !held.is_empty() {
            for (counter, usage) in counters.iter().zip(&mut usage) {
                // Held for a key that still owns its cell (not one removed meanwhile).
                if let (Some((n, last)), Some((more, at))) = (usage, held.get(counter)) {
                    *n += more;
                    *last = (*last).max(*at);
                }
            }
        }
        usage.into_iter().map(Option::unwrap_or_default).collect()
    }

    /// The counts in the cell of `counter`, if the key owns it.
    fn read(&self, counter: Counter) -> Option<Usage> {
        let Cell { count, stamp } = self.cell(counter)?;
        let s = stamp.load(Ordering::Acquire);
        let c = count.load(Ordering::Acquire);
        let owned = s >> 32 == u64::from(counter.generation)
            && c & 0xffff == u64::from(counter.generation as u16);
        owned.then_some((c >> COUNT_SHIFT, s as u32))
    }
}

/// The writer's hold on the cells: it hands them to new key ids and takes them back
/// from removed ones.
pub(crate) struct Cells<'a> {
    counters: &'a Counters,
    free: MutexGuard<'a, Free>,
}

impl Cells<'_> {
    /// A cell for a new key id, counting from zero.
    ///
    /// # Panics
    ///
    /// Never in practice: only if more than 4,294,967,294 key ids were live at once.
    pub(crate) fn assign(&mut self) -> Counter {
        let counters = self.counters;
        let free = &mut *self.free;
        let index = free.taken_back.pop().unwrap_or_else(|| {
            assert!(free.next != u32::MAX, "at most u32::MAX - 1 key ids");
            free.next += 1;
            free.next - 1
        });
        let (k, _) = place(index);
        counters.chunks[k].get_or_init(|| (0..FIRST << k).map(|_| Cell::default()).collect());
        let generation = counters
            .cell(Counter::new(index, 0))
            .map_or(0, |c| (c.stamp.load(Ordering::Relaxed) >> 32) as u32);
        Counter::new(index, generation)
    }

    /// Takes back the cell of a removed key id: counts made with it from now on are
    /// dropped, and its next owner starts from zero.
    pub(crate) fn release(&mut self, counter: Counter) {
        if let Some(cell) = self.counters.cell(counter) {
            let next = counter.generation.wrapping_add(1) & GENERATIONS;
            cell.stamp.store(u64::from(next) << 32, Ordering::Release);
            cell.count.store(u64::from(next as u16), Ordering::Release);
            self.free.taken_back.push(counter.index);
        }
    }
}

/// One thread's requests to one store not yet added to their cells: the keys it let in
/// within one second, each with how many times. Written by that thread only, read by
/// anyone. Aligned so that it shares no cache line with what other threads write.
#[repr(align(64))]
struct Tally {
    /// Packed counters, 0 for an empty place. A key has two places it may take (see
    /// [`Tally::places`]).
    keys: [AtomicU64; TALLY],
    /// The requests counted for the key in the same place.
    counts: [AtomicU64; TALLY],
    /// Bumped each time the tally is emptied or one key leaves it, before the counts
    /// reach their cells: a reader that sees it change while it reads drops what it
    /// read.
    round: AtomicU64,
    /// The second (Unix) in which this round's requests were made.
    second: AtomicU32,
    /// How many places hold a key: kept by the owning thread, exact for it (readers
    /// empty only the tallies of threads that have exited).
    held: AtomicU32,
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            keys: std::array::from_fn(|_| AtomicU64::new(0)),
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            round: AtomicU64::new(0),
            second: AtomicU32::new(0),
            held: AtomicU32::new(0),
        }
    }
}

impl Tally {
    /// The two places `counter` may take: from its index's low bits and the next ones,
    /// so that two keys that share one rarely share both.
    #[inline]
    fn places(counter: Counter) -> [usize; 2] {
        let index = counter.index as usize;
        [index % TALLY, (index / TALLY) % TALLY]
    }

    /// The owning thread counts one request.
    #[inline]
    fn record(&self, counter: Counter, now_secs: u32, counters: &Counters) {
        if self.second.load(Ordering::Relaxed) != now_secs {
            self.flush(counters);
            self.second.store(now_secs, Ordering::Release);
        }
        let packed = counter.packed();
        let places = Self::places(counter);
        for at in places {
            if self.keys[at].load(Ordering::Relaxed) == packed {
                let n = self.counts[at].load(Ordering::Relaxed);
                self.counts[at].store(n + 1, Ordering::Relaxed);
                return;
            }
        }
        let at = match places
            .into_iter()
            .find(|&at| self.keys[at].load(Ordering::Relaxed) == 0)
        {
            Some(at) => {
                self.held
                    .store(self.held.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
                at
            }
            // Both places taken by other keys.
            None => self.make_room(places[0], counters),
        };
        self.counts[at].store(1, Ordering::Relaxed);
        // After its count: a reader that sees the key sees the count with it.
        self.keys[at].store(packed, Ordering::Release);
    }

    /// Frees place `at` for another key. When the tally is half full or more (many
    /// keys within a second, as in a large set used evenly), it is emptied whole, so
    /// that the cache misses of many cells overlap. Otherwise only the key in `at`
    /// goes to its cell: a few hot keys that happen to share places then cost one cell
    /// update now and then, not the whole tally's every time one of them comes round.
    #[cold]
    fn make_room(&self, at: usize, counters: &Counters) -> usize {
        if self.held.load(Ordering::Relaxed) as usize >= TALLY / 2 {
            self.flush(counters);
            self.held.store(1, Ordering::Relaxed);
            return at;
        }
        self.next_round();
        let packed = self.keys[at].load(Ordering::Relaxed);
        let n = self.counts[at].load(Ordering::Relaxed);
        self.keys[at].store(0, Ordering::Relaxed);
        counters.add(
            Counter::unpacked(packed),
            n,
            self.second.load(Ordering::Relaxed),
        );
        at
    }

    /// Starts a new round: readers that overlap what follows drop what they read.
    fn next_round(&self) {
        let round = self.round.load(Ordering::Relaxed);
        self.round.store(round.wrapping_add(1), Ordering::Relaxed);
        // A reader that sees any place the owner changes after this (with its acquire
        // fence before checking the round) sees the new round.
        fence(Ordering::Release);
    }

    /// The owning thread adds this round's counts to their cells.
    #[cold]
    fn flush(&self, counters: &Counters) {
        let mut taken = [(0, 0); TALLY];
        let n = self.take(&mut taken);
        self.held.store(0, Ordering::Relaxed);
        counters.add_all(&taken[..n], self.second.load(Ordering::Relaxed));
    }

    /// Empties the tally into `taken` and returns how many keys it held: by the
    /// owning thread, or by anyone once it is gone. The round changes first, then the
    /// places are emptied, and only then may the counts reach their cells (`add`
    /// releases): a reader that sees a cell with them sees the new round here.
    fn take(&self, taken: &mut [(u64, u64); TALLY]) -> usize {
        self.next_round();
        let mut n = 0;
        for (key, count) in self.keys.iter().zip(&self.counts) {
            let packed = key.load(Ordering::Relaxed);
            if packed != 0 {
                taken[n] = (packed, count.load(Ordering::Relaxed));
                n += 1;
                key.store(0, Ordering::Relaxed);
            }
        }
        n
    }

    /// Reads the tally into `read` without changing it, and returns how many keys it
    /// holds; none if it was emptied meanwhile (its counts are then in their cells, or
    /// about to be).
    fn read(&self, read: &mut [(u64, u64); TALLY]) -> usize {
        let round = self.round.load(Ordering::Acquire);
        let mut n = 0;
        for (key, count) in self.keys.iter().zip(&self.counts) {
            let packed = key.load(Ordering::Acquire);
            if packed != 0 {
                read[n] = (packed, count.load(Ordering::Relaxed));
                n += 1;
            }
        }
        // Every load above, counts included, before the round is checked again.
        fence(Ordering::Acquire);
        match self.round.load(Ordering::Relaxed) == round {
            true => n,
            false => 0,
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves its data consistent at each step.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

thread_local! {
    /// This thread's tallies, the one it used last first.
    static TALLIES: RefCell<Vec<(Weak<Counters>, Arc<Tally>)>> = const { RefCell::new(Vec::new()) };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` keys whose two places are both place 0, and a key of other places.
    fn sharing_one_place(counters: &Counters, n: usize) -> (Vec<Counter>, Counter) {
        let mut cells = counters.cells();
        let all: Vec<Counter> = (0..=(n - 1) * TALLY * TALLY)
            .map(|_| cells.assign())
            .collect();
        let sharing: Vec<Counter> = (0..n).map(|k| all[k * TALLY * TALLY]).collect();
        assert!(sharing.iter().all(|&c| Tally::places(c) == [0, 0]));
        (sharing, all[1])
    }

    #[test]
    fn hot_keys_sharing_places_send_only_themselves_to_their_cells() {
        let counters = Arc::new(Counters::new());
        let (sharing, other) = sharing_one_place(&counters, 3);
        counters.record(other, 100);
        for _ in 0..1_000 {
            for &counter in &sharing {
                counters.record(counter, 100);
            }
        }
        assert_eq!(
            counters.read(other),
            Some((0, 0)),
            "a key of its own places stays in the tally"
        );
        assert_eq!(
            counters.usage(sharing.into_iter().chain([other])),
            [(1_000, 100), (1_000, 100), (1_000, 100), (1, 100)],
            "every request counted once"
        );
    }

    #[test]
    fn cells_are_placed_in_growing_chunks() {
        assert_eq!(place(0), (0, 0));
        assert_eq!(place(FIRST - 1), (0, FIRST as usize - 1));
        assert_eq!(place(FIRST), (1, 0));
        assert_eq!(place(3 * FIRST - 1), (1, 2 * FIRST as usize - 1));
        assert_eq!(place(3 * FIRST), (2, 0));
        assert_eq!(place(u32::MAX - 1).0, CHUNKS - 1);
        for packed in [Counter::default(), Counter::new(u32::MAX - 1, u32::MAX)] {
            assert_ne!(packed.packed(), 0);
            assert_eq!(Counter::unpacked(packed.packed()), packed);
        }
    }

    #[test]
    fn a_released_cell_drops_late_counts_and_starts_afresh() {
        let counters = Arc::new(Counters::new());
        let old = counters.cells().assign();
        counters.record(old, 100);
        counters.add(old, 2, 101);
        assert_eq!(counters.usage([old]), [(3, 101)]);
        counters.cells().release(old);
        // A count made late, by a request that read the key before it went.
        counters.record(old, 102);
        counters.add(old, 5, 102);
        let new = counters.cells().assign();
        assert_eq!(new.index, old.index, "reused");
        assert_ne!(new, old);
        assert_eq!(counters.usage([old, new]), [(0, 0), (0, 0)]);
        counters.record(new, 103);
        assert_eq!(counters.usage([new]), [(1, 103)]);
    }

    #[test]
    fn concurrent_counts_are_never_read_twice_and_all_arrive() {
        let counters = Arc::new(Counters::new());
        let mut cells = counters.cells();
        let hot = cells.assign();
        let cold: Vec<Counter> = (0..500).map(|_| cells.assign()).collect();
        drop(cells);
        // Many keys: the tallies fill and are emptied whole.
        counted_once_while_read(&counters, hot, &cold);
    }

    /// Keys whose places are all the same one: each request of one sends another
    /// key's count to its cell, while readers read.
    #[test]
    fn counts_sent_one_key_at_a_time_are_never_read_twice_and_all_arrive() {
        let counters = Arc::new(Counters::new());
        let (sharing, _) = sharing_one_place(&counters, 4);
        counted_once_while_read(&counters, sharing[0], &sharing[1..]);
    }

    /// Three threads count 100,000 requests each, two of three for `hot` and the rest
    /// for `others` in turn, while this one reads: a reader never sees more than was
    /// made, and at the end every request is counted, in its last second.
    fn counted_once_while_read(counters: &Arc<Counters>, hot: Counter, others: &[Counter]) {
        let made = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..3)
            .map(|t| {
                let (counters, made, others) = (counters.clone(), made.clone(), others.to_vec());
                std::thread::spawn(move || {
                    for i in 0..100_000u32 {
                        // Made before it is recorded: a reader never sees more.
                        made.fetch_add(1, Ordering::SeqCst);
                        let counter = if (i + t) % 3 == 0 {
                            others[i as usize % others.len()]
                        } else {
                            hot
                        };
                        // Seconds that change now and then, as a clock's do.
                        counters.record(counter, 1_000 + i / 25_000);
                    }
                })
            })
            .collect();
        let all: Vec<Counter> = std::iter::once(hot).chain(others.iter().copied()).collect();
        while threads.iter().any(|t| !t.is_finished()) {
            let seen: u64 = counters
                .usage(all.iter().copied())
                .iter()
                .map(|u| u.0)
                .sum();
            assert!(seen <= made.load(Ordering::SeqCst), "counted twice");
        }
        for thread in threads {
            thread.join().unwrap();
        }
        let usage = counters.usage(all.iter().copied());
        assert_eq!(usage.iter().map(|u| u.0).sum::<u64>(), 300_000);
        assert!(usage.iter().all(|u| u.1 == 1_003), "{usage:?}");
    }
}
