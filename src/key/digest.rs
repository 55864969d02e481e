//! The SHA-256 digest that stands for a key everywhere in memory.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    hash::{BuildHasher as _, BuildHasherDefault, Hash, Hasher},
    sync::OnceLock,
};

use sha2::{Digest as _, Sha256};

/// SHA-256 of a presented or configured key. Only digests are kept in memory.
#[derive(Clone, Copy, Eq)]
pub(crate) struct KeyDigest(pub(crate) [u8; 32]);

impl PartialEq for KeyDigest {
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        same(&self.0, &other.0)
    }
}

/// Whether two digests are equal: two 16-byte compares, where `==` on the arrays
/// calls `memcmp` (a tenth of a large load's time).
#[inline]
pub(crate) fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    halves(a) == halves(b)
}

#[inline]
fn halves(x: &[u8; 32]) -> (u128, u128) {
    let (mut lo, mut hi) = ([0u8; 16], [0u8; 16]);
    lo.copy_from_slice(&x[..16]);
    hi.copy_from_slice(&x[16..]);
    (u128::from_ne_bytes(lo), u128::from_ne_bytes(hi))
}

/// SHA-256's initial hash value (FIPS 180-4, 5.3.3).
const SHA256_INIT: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

/// The longest message that fits one padded SHA-256 block: 64 bytes less the `0x80`
/// marker and the 8-byte length.
const ONE_BLOCK: usize = 55;

impl KeyDigest {
    #[inline]
    pub(crate) fn of(secret: &[u8]) -> Self {
        match secret.len() <= ONE_BLOCK {
            true => Self::of_one_block(secret),
            false => Self(Sha256::digest(secret).into()),
        }
    }

    /// SHA-256 of a message of at most [`ONE_BLOCK`] bytes (every generated key, and
    /// most keys anyone writes): the block padded here (FIPS 180-4, 5.1.1) and
    /// compressed once by `sha2`, without the buffering and length keeping its
    /// streaming `Digest` does for a message of any length.
    #[inline]
    fn of_one_block(secret: &[u8]) -> Self {
        let mut block = [0u8; 64];
        block[..secret.len()].copy_from_slice(secret);
        block[secret.len()] = 0x80;
        let bits = (secret.len() as u64) * 8;
        block[56..].copy_from_slice(&bits.to_be_bytes());
        let mut state = SHA256_INIT;
        sha2::block_api::compress256(&mut state, &[block]);
        let mut out = [0u8; 32];
        for (bytes, word) in out.chunks_exact_mut(4).zip(state) {
            bytes.copy_from_slice(&word.to_be_bytes());
        }
        Self(out)
    }

    /// Parses 64 hex digits (either case).
    pub(crate) fn from_hex(hex: impl AsRef<[u8]>) -> Option<Self> {
        // A million are read when a fleet replica starts: faster-hex decodes one in a
        // quarter of the instructions of the `hex` crate.
        let hex = hex.as_ref();
        let mut out = [0u8; 32];
        (hex.len() == 64 && faster_hex::hex_decode(hex, &mut out).is_ok()).then_some(Self(out))
    }

    /// The 64 lower-case hex digits.
    #[cfg_attr(not(feature = "admin"), allow(dead_code))]
    pub(crate) fn to_hex(self) -> String {
        faster_hex::hex_string(&self.0)
    }

    /// A short, non-reversible name for the key: the first 12 hex digits of its digest.
    pub(crate) fn fingerprint(&self) -> String {
        faster_hex::hex_string(&self.0[..6])
    }

    /// 64 bits of the digest starting at byte `at` (0, 8, 16 or 24), little-endian.
    #[inline]
    pub(crate) fn bits(&self, at: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[at..at + 8]);
        u64::from_le_bytes(b)
    }

    /// Where this digest goes in every table keyed by digest: a hash of all 32 bytes,
    /// keyed with this process's random key (see [`Place`]).
    ///
    /// A digest computed from a presented secret is uniform, but a key file's or a
    /// record's `sha256` is whatever was written there: by a script (`000…001`,
    /// `000…002`, …) or by someone who wants the tables slow. Placed by its own bits,
    /// 200,000 digests that differ only in their last bytes went to one shard, one
    /// slot, one run of 200,000. Keyed, where a digest lands depends on a key no one
    /// writing a file knows, and digests however alike are spread as real ones are.
    ///
    /// Three multiplies, each 64 × 64 → 128 bits folded to 64: the four words XORed
    /// with four key words, two by two, then the two results (XORed with two more key
    /// words) together. The third is needed: with the first two alone, digests alike
    /// but for a counter in one word kept the lattice of a multiplicative hash, and
    /// in a model of the store's shards, over 1,000 random keys, the mean walk of
    /// 20,000 such digests was 15 slots at the 99th percentile and 65 at worst,
    /// against 2.7 for real digests; with it, 2.85 and 2.93, as for random ones.
    /// Computed once per lookup and used for the shard, the slot and the tag.
    #[inline]
    pub(crate) fn place(&self) -> Place {
        let k = process_key();
        let w = |i: usize| self.bits(8 * i) ^ k[i];
        Place(fold(fold(w(0), w(1)) ^ k[4], fold(w(2), w(3)) ^ k[5]))
    }
}

/// The 128-bit product of `a` and `b`, its halves XORed: every bit of each input
/// reaches the middle and upper bits of the result.
#[inline]
fn fold(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    (product as u64) ^ ((product >> 64) as u64)
}

/// The key [`KeyDigest::place`] hashes with: six words drawn once per process from
/// the operating system, shared by every table keyed by digest (the store's shards,
/// a [`KeySet`](crate::KeySet)'s digest index, [`DigestMap`]s).
#[inline]
fn process_key() -> &'static [u64; 6] {
    static KEY: OnceLock<[u64; 6]> = OnceLock::new();
    KEY.get_or_init(|| {
        let mut bytes = [0u8; 48];
        if getrandom::fill(&mut bytes).is_err() {
            // No system randomness: foldhash's per-process seed (address-space
            // layout, the clock), which the crate's other hash tables rely on.
            let seed = foldhash::quality::RandomState::default();
            for (i, word) in bytes.chunks_exact_mut(8).enumerate() {
                word.copy_from_slice(&seed.hash_one(i).to_le_bytes());
            }
        }
        std::array::from_fn(|i| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&bytes[8 * i..8 * i + 8]);
            u64::from_le_bytes(word)
        })
    })
}

/// A [`KeyDigest`]'s place: the keyed hash every table keyed by digest uses, cut into
/// parts that do not overlap, so that the shard, the slot and the tag of a key are
/// independent of one another:
///
/// | bits | what |
/// |---|---|
/// | 48..64 | the shard (the top `bits` of them, at most 16) |
/// | 8..48 | the slot where a walk in the shard starts |
/// | 0..8 | the tag a shard keeps of each slot |
///
/// A [`DigestMap`] takes all 64.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Place(pub(crate) u64);

impl Place {
    /// The most shard bits a place has.
    pub(crate) const SHARD_BITS: u32 = 16;

    /// The shard among `1 << bits` (`bits` at most [`Place::SHARD_BITS`]).
    #[inline]
    pub(crate) fn shard(self, bits: u32) -> usize {
        debug_assert!(bits <= Self::SHARD_BITS);
        self.0.checked_shr(64 - bits).unwrap_or(0) as usize
    }

    /// The slot among `len` where a walk starts: multiply-shift of the 40 bits below
    /// the shard's onto `0..len`, without a power-of-two size.
    #[inline]
    pub(crate) fn home(self, len: usize) -> usize {
        let fraction = (self.0 << 16) & !(0xff << 16);
        ((u128::from(fraction) * len as u128) >> 64) as usize
    }

    /// The tag: the low byte, never 0 (a shard's 0 is an empty slot).
    #[inline]
    pub(crate) fn tag(self) -> u8 {
        (self.0 as u8).max(1)
    }
}

impl Hash for KeyDigest {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.place().0);
    }
}

/// Passes a [`KeyDigest`]'s [`place`](KeyDigest::place) through as its hash: keyed
/// already, it needs no more hashing.
#[derive(Default)]
pub(crate) struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached if something other than a digest is hashed: fold it in.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A map keyed by digest, hashed by the digest's [`place`](KeyDigest::place).
pub(crate) type DigestMap<V> = HashMap<KeyDigest, V, BuildHasherDefault<DigestHasher>>;

/// A set of digests, hashed by their [`place`](KeyDigest::place).
pub(crate) type DigestSet = HashSet<KeyDigest, BuildHasherDefault<DigestHasher>>;

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyDigest({}…)", self.fingerprint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_sha_256_at_every_length_around_one_block() {
        // FIPS 180-4's examples, "" and "abc", then every length up to two blocks:
        // the one-block path up to 55 bytes, `sha2`'s whole `Digest` from 56 on.
        assert_eq!(
            KeyDigest::of(b"").to_hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            KeyDigest::of(b"abc").to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let bytes: Vec<u8> = (0..128u32).map(|i| (i * 37 + 11) as u8).collect();
        for len in 0..=bytes.len() {
            let message = &bytes[..len];
            let expected: [u8; 32] = Sha256::digest(message).into();
            assert_eq!(KeyDigest::of(message).0, expected, "{len} bytes");
        }
    }

    #[test]
    fn hex_round_trip_and_rejects() {
        let d = KeyDigest::of(b"s3cr3t");
        let hex = d.to_hex();
        assert_eq!(
            hex,
            "4e738ca5563c06cfd0018299933d58db1dd8bf97f6973dc99bf6cdc64b5550bd"
        );
        assert_eq!(KeyDigest::from_hex(&hex), Some(d));
        assert_eq!(KeyDigest::from_hex(hex.to_uppercase()), Some(d));
        assert_eq!(KeyDigest::from_hex(&hex[..63]), None);
        assert_eq!(KeyDigest::from_hex(format!("{}g", &hex[..63])), None);
        assert_eq!(KeyDigest::from_hex("é"), None);
    }

    /// Digests alike but for their last four bytes, hashed as a [`DigestMap`] hashes
    /// them: the map's buckets (the low bits) and control bytes (the top seven) are
    /// as full as for random keys. By the digest's own bits every one had the same
    /// hash, and each insert compared the digest with all before it.
    #[test]
    fn a_digest_map_spreads_digests_alike_but_for_a_few_bytes() {
        const N: u32 = 100_000;
        const BUCKETS: usize = 1 << 17;
        let alike = |i: u32| {
            let mut d = KeyDigest::of(b"base");
            d.0[28..].copy_from_slice(&i.to_le_bytes());
            d
        };
        let hasher = BuildHasherDefault::<DigestHasher>::default();
        let mut buckets = vec![0u32; BUCKETS];
        let mut controls = [0u32; 128];
        for i in 0..N {
            let hash = hasher.hash_one(alike(i));
            buckets[hash as usize % BUCKETS] += 1;
            controls[(hash >> 57) as usize] += 1;
        }
        // 0.76 a bucket on average: nine or more in one of 131,072 is rare for random
        // hashes, sixteen never seen.
        let fullest = buckets.iter().copied().max().unwrap_or(0);
        assert!(fullest <= 16, "{fullest} digests in one bucket");
        let mean = N / 128;
        let control = controls.iter().copied().max().unwrap_or(0);
        assert!(
            control < 2 * mean,
            "{control} share a control byte, {mean} on average"
        );
        // And a set of them finds each.
        let set: DigestSet = (0..N).map(alike).collect();
        assert_eq!(set.len(), N as usize);
        assert!((0..N).all(|i| set.contains(&alike(i))));
        assert!(!set.contains(&alike(N)));
    }

    /// The three parts of a place come from bits that do not overlap: the shard from
    /// the top, the walk's start from the middle, the tag from the bottom.
    #[test]
    fn a_place_s_parts_are_its_own_bits() {
        let top = Place(0xffff_0000_0000_0000);
        assert_eq!((top.shard(16), top.home(1000), top.tag()), (0xffff, 0, 1));
        let middle = Place(0x0000_ffff_ffff_ff00);
        assert_eq!(
            (middle.shard(16), middle.home(1000), middle.tag()),
            (0, 999, 1)
        );
        let bottom = Place(0x0000_0000_0000_00ab);
        assert_eq!(
            (bottom.shard(16), bottom.home(1000), bottom.tag()),
            (0, 0, 0xab)
        );
        assert_eq!(Place(u64::MAX).shard(0), 0);
        assert_eq!(Place(u64::MAX).shard(3), 7);
        // Halfway through the middle bits is halfway through the shard.
        assert_eq!(Place(0x0000_8000_0000_0000).home(1000), 500);
    }

    /// The same digest has the same place; one bit changed anywhere moves about half
    /// of the place's bits.
    #[test]
    fn every_bit_of_a_digest_moves_its_place() {
        let d = KeyDigest::of(b"s3cr3t");
        assert_eq!(d.place(), KeyDigest(d.0).place());
        let mut moved = 0;
        for bit in 0..256 {
            let mut e = d;
            e.0[bit / 8] ^= 1 << (bit % 8);
            let changed = (d.place().0 ^ e.place().0).count_ones();
            assert!(
                (8..=56).contains(&changed),
                "bit {bit}: {changed} bits moved"
            );
            moved += changed;
        }
        let average = f64::from(moved) / 256.0;
        assert!(
            (28.0..=36.0).contains(&average),
            "{average} bits on average"
        );
    }

    #[test]
    fn debug_shows_a_fingerprint_only() {
        let d = KeyDigest::of(b"s3cr3t");
        let dbg = format!("{d:?}");
        assert!(dbg.contains("4e738ca5563c"));
        assert!(!dbg.contains(&d.to_hex()));
    }
}
