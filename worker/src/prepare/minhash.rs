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

/// 64-bit FNV-1a of bytes, then mixed: the hash of one word.
fn word_hash(word: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in word.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
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
    if v >= MERSENNE { v - MERSENNE } else { v }
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

    /// The signature of `text` (already normalised): for each permutation, the least
    /// permuted 32-bit shingle hash. A text shorter than a shingle is one shingle.
    pub fn signature(&self, text: &str) -> Vec<u32> {
        let words: Vec<u64> = text.split_whitespace().map(word_hash).collect();
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

/// An LSH index: each band of a signature hashed into its own table, mapping to the
/// first record (by index) that had that band.
#[derive(Debug)]
pub struct LshIndex {
    rows: usize,
    tables: Vec<HashMap<u64, u32>>,
}

impl LshIndex {
    /// An empty index for signatures of `permutations` values at `threshold`.
    pub fn new(threshold: f64, permutations: usize) -> Self {
        let (bands, rows) = optimal_bands(threshold, permutations);
        Self { rows, tables: (0..bands).map(|_| HashMap::new()).collect() }
    }

    /// Bands and rows per band.
    pub fn shape(&self) -> (usize, usize) {
        (self.tables.len(), self.rows)
    }

    fn band_hashes<'a>(&'a self, signature: &'a [u32]) -> impl Iterator<Item = u64> + 'a {
        signature
            .chunks_exact(self.rows)
            .take(self.tables.len())
            .map(|band| band.iter().fold(0x2545_F491_4F6C_DD1Du64, |h, &v| mix(h ^ u64::from(v))))
    }

    /// The earliest indexed record sharing a band with `signature`, if any; otherwise
    /// `id` is indexed under its bands and None is returned.
    pub fn find_or_insert(&mut self, signature: &[u32], id: u32) -> Option<u32> {
        let hashes: Vec<u64> = self.band_hashes(signature).collect();
        let found = hashes.iter().zip(&self.tables).filter_map(|(h, t)| t.get(h).copied()).min();
        if found.is_none() {
            for (h, table) in hashes.into_iter().zip(self.tables.iter_mut()) {
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
