//! Helpers for the crate's own unit tests.

/// A xorshift generator from `seed` (any value; 0 is made odd): the randomized tests'
/// source of cases, the same on every machine for one seed.
pub(crate) fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed | 1;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}
