//! Near-duplicate detection: MinHash signatures of word shingles and an LSH index over
//! signature bands. The index keeps only fixed-size band hashes per kept record, never
//! the text, so memory grows by a few hundred bytes per record whatever its length.

use std::collections::HashMap;

/// Weight of false positives against false negatives (1 minus this) in [`optimal_bands`].
pub const FALSE_POSITIVE_WEIGHT: f64 = 0.2;

/// 2^61 - 1, the Mersenne prime the permutations work modulo.
const MERSENNE: u64 = (1 << 61) - 1;

/// SplitMix64 step: seeds the permutations and mixes hashes.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Hashes of the lower-cased words of `text` (64-bit FNV-1a, mixed), without building
/// the lower-cased text: ASCII letters are folded byte by byte, other characters through
/// their Unicode lower case.
pub fn word_hashes(text: &str) -> Vec<u64> {
    let mut out = Vec::with_capacity(text.len() / 5);
    let mut buf = [0u8; 64];
    for word in text.split_whitespace() {
        let bytes = word.as_bytes();
        if bytes.len() <= buf.len() && word.is_ascii() {
            for (d, s) in buf.iter_mut().zip(bytes) {
                *d = s.to_ascii_lowercase();
            }
            out.push(hash_bytes(&buf[..bytes.len()]));
        } else {
            let lower = word.to_lowercase();
            out.push(hash_bytes(lower.as_bytes()));
        }
    }
    out
}

/// A 64-bit hash of bytes, eight at a time.
fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h = 0x9E37_79B9_7F4A_7C15u64 ^ bytes.len() as u64;
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(c);
        h = (h ^ u64::from_le_bytes(word)).wrapping_mul(0xA076_1D64_78BD_642F).rotate_left(31);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut word = [0u8; 8];
        word[..rest.len()].copy_from_slice(rest);
        h = (h ^ u64::from_le_bytes(word)).wrapping_mul(0xE703_7ED1_A0B4_28DB).rotate_left(31);
    }
    mix(h)
}

/// `(a x + b) mod (2^61 - 1)` for `a`, `x` below 2^32 and `b` below 2^61, without division:
/// a Mersenne modulus reduces by adding the high bits to the low ones.
#[inline]
fn permute(a: u64, x: u64, b: u64) -> u64 {
    let v = a * x;
    let v = (v & MERSENNE) + (v >> 61) + b;
    let v = (v & MERSENNE) + (v >> 61);
    // Branch-free `if v >= p { v - p }` (below p the subtraction wraps to a larger value),
    // so the loop over permutations vectorises.
    v.min(v.wrapping_sub(MERSENNE))
}

/// Computes MinHash signatures with fixed random permutations `(a x + b) mod p`.
#[derive(Debug, Clone)]
pub struct MinHasher {
    shingle: usize,
    a: Vec<u64>,
    b: Vec<u64>,
}

impl MinHasher {
    /// `permutations` hash functions over shingles of `shingle` words, from `seed`.
    pub fn new(shingle: usize, permutations: usize, seed: u64) -> Self {
        let mut state = mix(seed ^ 0x6c6c_6d6f_7073);
        let mut next = || {
            state = mix(state);
            state
        };
        // a below 2^32, so that a x (x below 2^32 too) is exact in 64 bits.
        let a = (0..permutations).map(|_| (next() % 0xFFFF_FFFF) + 1).collect();
        let b = (0..permutations).map(|_| next() % MERSENNE).collect();
        Self { shingle: shingle.max(1), a, b }
    }

    /// Signature length.
    pub fn permutations(&self) -> usize {
        self.a.len()
    }

    /// The signature of `text` (compared case-insensitively, by words): for each
    /// permutation, the least permuted 32-bit shingle hash. A text shorter than a
    /// shingle is one shingle.
    pub fn signature(&self, text: &str) -> Vec<u32> {
        self.signature_of_words(&word_hashes(text))
    }

    /// The signature of a text given as [`word_hashes`].
    pub fn signature_of_words(&self, words: &[u64]) -> Vec<u32> {
        let mut signature = vec![u32::MAX; self.a.len()];
        if words.is_empty() {
            return signature;
        }
        let k = self.shingle.min(words.len());
        for window in words.windows(k) {
            let mut h = 0u64;
            for (i, w) in window.iter().enumerate() {
                h = mix(h ^ w.rotate_left(i as u32 * 7));
            }
            let x = h & 0xFFFF_FFFF;
            for ((s, &a), &b) in signature.iter_mut().zip(&self.a).zip(&self.b) {
                *s = (*s).min(permute(a, x, b) as u32);
            }
        }
        signature
    }
}

/// The (bands, rows) split of a signature that best separates pairs above and below
/// `threshold`: it minimises the area of false positives below the threshold plus false
/// negatives above it under the LSH S-curve `1 - (1 - s^r)^b`. False negatives weigh four
/// times as much: a missed duplicate leaks into training or evaluation data, while a false
/// positive removes one record whose near-twin stays. (At 0.5 and 128 permutations: 30
/// bands of 4 rows, which finds pairs of similarity 0.55 with probability 0.94.)
pub fn optimal_bands(threshold: f64, permutations: usize) -> (usize, usize) {
    let integrate = |f: &dyn Fn(f64) -> f64, lo: f64, hi: f64| -> f64 {
        let steps = 200;
        let dx = (hi - lo) / steps as f64;
        (0..steps).map(|i| f(lo + (i as f64 + 0.5) * dx) * dx).sum()
    };
    let mut best = (1, permutations);
    let mut best_error = f64::INFINITY;
    for bands in 1..=permutations {
        let max_rows = permutations / bands;
        for rows in 1..=max_rows {
            let (b, r) = (bands as f64, rows as f64);
            let fp = integrate(&|s| 1.0 - (1.0 - s.powf(r)).powf(b), 0.0, threshold);
            let fn_ = integrate(&|s| 1.0 - (1.0 - (1.0 - s.powf(r)).powf(b)), threshold, 1.0);
            let error = FALSE_POSITIVE_WEIGHT * fp + (1.0 - FALSE_POSITIVE_WEIGHT) * fn_;
            if error < best_error {
                best_error = error;
                best = (bands, rows);
            }
        }
    }
    best
}

/// A hasher for keys that are already uniformly distributed hashes: it passes them on.
#[derive(Debug, Default, Clone, Copy)]
pub struct PassThrough(u64);

impl std::hash::Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A map from already-hashed keys.
pub type HashedMap<V> = HashMap<u64, V, std::hash::BuildHasherDefault<PassThrough>>;

/// An LSH index: each band of a signature hashed into its own table, mapping to the
/// first record (by index) that had that band.
#[derive(Debug)]
pub struct LshIndex {
    rows: usize,
    tables: Vec<HashedMap<u32>>,
}

impl LshIndex {
    /// An empty index for signatures of `permutations` values at `threshold`.
    pub fn new(threshold: f64, permutations: usize) -> Self {
        let (bands, rows) = optimal_bands(threshold, permutations);
        Self { rows, tables: (0..bands).map(|_| HashedMap::default()).collect() }
    }

    /// Bands and rows per band.
    pub fn shape(&self) -> (usize, usize) {
        (self.tables.len(), self.rows)
    }

    /// The hash of each band of `signature`: pure, so it can run in parallel ahead of the
    /// (sequential) lookups. Each band's hash starts from its index, so equal bands at
    /// different positions do not collide.
    pub fn band_hashes(&self, signature: &[u32]) -> Vec<u64> {
        signature
            .chunks_exact(self.rows)
            .take(self.tables.len())
            .enumerate()
            .map(|(i, band)| band.iter().fold(mix(i as u64), |h, &v| mix(h ^ u64::from(v))))
            .collect()
    }

    /// The earliest indexed record sharing a band with `signature`, if any; otherwise
    /// `id` is indexed under its bands and None is returned.
    pub fn find_or_insert(&mut self, signature: &[u32], id: u32) -> Option<u32> {
        let hashes = self.band_hashes(signature);
        self.find_or_insert_bands(&hashes, id)
    }

    /// [`Self::find_or_insert`] with the band hashes computed already.
    pub fn find_or_insert_bands(&mut self, hashes: &[u64], id: u32) -> Option<u32> {
        let found = hashes.iter().zip(&self.tables).filter_map(|(h, t)| t.get(h).copied()).min();
        if found.is_none() {
            for (&h, table) in hashes.iter().zip(self.tables.iter_mut()) {
                table.insert(h, id);
            }
        }
        found
    }
}

/// Jaccard similarity estimated from two signatures.
pub fn estimated_jaccard(a: &[u32], b: &[u32]) -> f64 {
    if a.is_empty() {
        return 0.0;
    }
    a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_permutation_is_exact_modular_arithmetic() {
        for (a, x, b) in [(1u64, 0u64, 0u64), (0xFFFF_FFFF, 0xFFFF_FFFF, MERSENNE - 1), (12345, 67890, 1 << 60)] {
            let want = ((u128::from(a) * u128::from(x) + u128::from(b)) % u128::from(MERSENNE)) as u64;
            assert_eq!(permute(a, x, b), want);
        }
    }

    #[test]
    fn bands_follow_the_threshold() {
        // A low threshold needs many short bands, a high one few long bands.
        let (b_low, r_low) = optimal_bands(0.5, 128);
        let (b_high, r_high) = optimal_bands(0.8, 128);
        assert!(b_low > b_high && r_low < r_high, "{b_low}x{r_low} vs {b_high}x{r_high}");
        assert!(b_low * r_low <= 128 && b_high * r_high <= 128);
        assert_eq!((b_low, r_low), (30, 4));
    }

    #[test]
    fn signatures_estimate_jaccard() {
        let h = MinHasher::new(1, 256, 3);
        // Word sets {a..t} and {k..z + ...}: 10 shared of 30 distinct.
        let x: Vec<String> = (0..20).map(|i| format!("w{i}")).collect();
        let y: Vec<String> = (10..30).map(|i| format!("w{i}")).collect();
        let j = estimated_jaccard(&h.signature(&x.join(" ")), &h.signature(&y.join(" ")));
        assert!((j - 1.0 / 3.0).abs() < 0.1, "estimated {j}, true 0.333");
        assert_eq!(h.signature("same words"), h.signature("same words"));
        assert_eq!(MinHasher::new(1, 16, 3).signature("x"), MinHasher::new(1, 16, 3).signature("x"));
        assert_ne!(MinHasher::new(1, 16, 3).signature("x"), MinHasher::new(1, 16, 4).signature("x"));
    }

    #[test]
    fn index_finds_the_first_similar_record() {
        let h = MinHasher::new(2, 128, 0);
        let mut index = LshIndex::new(0.5, 128);
        let base: Vec<String> = (0..60).map(|i| format!("word{i}")).collect();
        let mut near = base.clone();
        near[30] = "changed".into();
        let other: Vec<String> = (100..160).map(|i| format!("word{i}")).collect();
        assert_eq!(index.find_or_insert(&h.signature(&base.join(" ")), 0), None);
        assert_eq!(index.find_or_insert(&h.signature(&other.join(" ")), 1), None);
        assert_eq!(index.find_or_insert(&h.signature(&near.join(" ")), 2), Some(0));
    }
}
