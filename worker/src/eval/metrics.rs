//! Text metrics of the evaluation worker: exact and normalised match, SQuAD token F1, ROUGE-L,
//! corpus BLEU, judge-score parsing, and percentile-bootstrap confidence intervals.

use std::collections::HashMap;
use std::sync::LazyLock;

use regex::Regex;

use crate::engine::sampling::SplitMix64;

// ---------------------------------------------------------------------------------------------
// Normalisation and match metrics
// ---------------------------------------------------------------------------------------------

/// Whitespace as Python's `str.split()` sees it: Rust's Unicode whitespace plus the ASCII
/// separators U+001C..U+001F, so that tokenisations agree with the Python reference packages.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Punctuation dropped by [`normalize_answer`]: ASCII punctuation (exactly Python's
/// `string.punctuation`, as in the SQuAD script) plus the typographic punctuation models
/// often emit: curly quotes, dashes, ellipsis, guillemets, inverted marks and CJK stops.
fn is_answer_punctuation(c: char) -> bool {
    c.is_ascii_punctuation()
        || ('\u{2010}'..='\u{2027}').contains(&c)
        || matches!(
            c,
            '\u{2039}' | '\u{203A}' | '\u{00A1}' | '\u{00AB}' | '\u{00BB}' | '\u{00BF}' | '\u{3001}' | '\u{3002}'
        )
}

/// A character of a word in the sense of Python's `\w` (letters, digits, underscore).
fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Whether a maximal run of word characters is an English article.
fn is_article(word: &str) -> bool {
    matches!(word, "a" | "an" | "the")
}

/// SQuAD-style normalisation: lowercase, drop punctuation, drop articles a/an/the, collapse whitespace.
///
/// Punctuation is removed without leaving a space (`"don't"` becomes `"dont"`, as in the SQuAD
/// script); see [`is_answer_punctuation`] for the set. An article is a whole word
/// (`\b(a|an|the)\b`), so `"theory"` and `"a1"` are kept. Words are then joined by single spaces.
pub fn normalize_answer(s: &str) -> String {
    let lowered = s.to_lowercase();
    let mut spaced = String::with_capacity(lowered.len());
    let mut word = String::new();
    for c in lowered.chars().filter(|&c| !is_answer_punctuation(c)) {
        if is_word_char(c) {
            word.push(c);
            continue;
        }
        flush_word(&mut word, &mut spaced);
        spaced.push(c);
    }
    flush_word(&mut word, &mut spaced);
    join_words(spaced.split(is_py_space))
}

/// Appends a finished word to `out`, or a space in place of an article, and empties it.
fn flush_word(word: &mut String, out: &mut String) {
    if is_article(word) {
        out.push(' ');
    } else {
        out.push_str(word);
    }
    word.clear();
}

/// Joins the non-empty pieces with single spaces.
fn join_words<'a>(pieces: impl Iterator<Item = &'a str>) -> String {
    let mut out = String::new();
    for piece in pieces.filter(|p| !p.is_empty()) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(piece);
    }
    out
}

/// 1.0 when the strings are equal once surrounding whitespace is trimmed (case and
/// punctuation count), else 0.0.
pub fn exact_match(output: &str, expected: &str) -> f64 {
    bool_score(output.trim() == expected.trim())
}

/// 1.0 when the strings are equal after [`normalize_answer`], else 0.0.
pub fn normalized_exact_match(output: &str, expected: &str) -> f64 {
    bool_score(normalize_answer(output) == normalize_answer(expected))
}

/// 1.0 when the normalised output contains the normalised expected answer, else 0.0.
///
/// Both sides go through [`normalize_answer`] and the match is on whole words: the expected
/// words must appear as a contiguous run of words of the output, so `"4"` is not found in
/// `"14"` nor `"cat"` in `"concatenate"`. An expected answer that normalises to nothing
/// (empty, only punctuation or articles) is contained in everything: 1.0.
pub fn contains(output: &str, expected: &str) -> f64 {
    let expected = normalize_answer(expected);
    if expected.is_empty() {
        return 1.0;
    }
    let output = normalize_answer(output);
    bool_score(format!(" {output} ").contains(&format!(" {expected} ")))
}

/// 1.0 when the pattern matches anywhere in the output (`Regex::is_match`), else 0.0.
pub fn regex_match(pattern: &Regex, output: &str) -> f64 {
    bool_score(pattern.is_match(output))
}

/// 1.0 for true, 0.0 for false.
fn bool_score(b: bool) -> f64 {
    if b { 1.0 } else { 0.0 }
}

/// SQuAD token F1 over the words of [`normalize_answer`]: the harmonic mean of the precision
/// and recall of the multiset of shared words. Both empty: 1.0; exactly one empty: 0.0.
pub fn token_f1(output: &str, expected: &str) -> f64 {
    let output = normalize_answer(output);
    let expected = normalize_answer(expected);
    let out_tokens: Vec<&str> = output.split(' ').filter(|t| !t.is_empty()).collect();
    let exp_tokens: Vec<&str> = expected.split(' ').filter(|t| !t.is_empty()).collect();
    if out_tokens.is_empty() || exp_tokens.is_empty() {
        return bool_score(out_tokens.is_empty() && exp_tokens.is_empty());
    }
    let mut available: HashMap<&str, usize> = HashMap::new();
    for &t in &exp_tokens {
        *available.entry(t).or_insert(0) += 1;
    }
    let mut shared = 0usize;
    for &t in &out_tokens {
        if let Some(n) = available.get_mut(t)
            && *n > 0
        {
            *n -= 1;
            shared += 1;
        }
    }
    if shared == 0 {
        return 0.0;
    }
    let precision = shared as f64 / out_tokens.len() as f64;
    let recall = shared as f64 / exp_tokens.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

// ---------------------------------------------------------------------------------------------
// ROUGE-L
// ---------------------------------------------------------------------------------------------

/// ROUGE-L F-measure (beta = 1: the F1 of LCS precision and recall) of the output against the
/// expected text, tokenised like Google's `rouge-score` package without stemming: lowercase,
/// every character other than `[a-z0-9]` becomes a separator. Either side without tokens: 0.0
/// (as `rouge-score` does, even when both are empty).
pub fn rouge_l(output: &str, expected: &str) -> f64 {
    let output = output.to_lowercase();
    let expected = expected.to_lowercase();
    let mut ids: HashMap<&str, u32> = HashMap::new();
    let out_ids: Vec<u32> = rouge_tokens(&output).map(|t| id_of(&mut ids, t)).collect();
    let exp_ids: Vec<u32> = rouge_tokens(&expected).map(|t| id_of(&mut ids, t)).collect();
    if out_ids.is_empty() || exp_ids.is_empty() {
        return 0.0;
    }
    let lcs = lcs_len(&out_ids, &exp_ids);
    if lcs == 0 {
        return 0.0;
    }
    let precision = lcs as f64 / out_ids.len() as f64;
    let recall = lcs as f64 / exp_ids.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// The id of a token, allocating the next one for a new token.
fn id_of<'t>(ids: &mut HashMap<&'t str, u32>, token: &'t str) -> u32 {
    let next = ids.len() as u32;
    *ids.entry(token).or_insert(next)
}

/// The `rouge-score` tokens of already lowercased text: maximal runs of `[a-z0-9]`.
fn rouge_tokens(lowered: &str) -> impl Iterator<Item = &str> {
    lowered.split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit())).filter(|t| !t.is_empty())
}

/// Length of the longest common subsequence, in O(len(a)·len(b)) time and O(min) memory.
fn lcs_len(a: &[u32], b: &[u32]) -> usize {
    let (long, short) = if a.len() >= b.len() { (a, b) } else { (b, a) };
    let mut row = vec![0usize; short.len() + 1];
    for &x in long {
        let mut diagonal = 0usize; // row[j - 1] of the previous row
        for (j, &y) in short.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = if x == y { diagonal + 1 } else { above.max(row[j]) };
            diagonal = above;
        }
    }
    row[short.len()]
}

// ---------------------------------------------------------------------------------------------
// BLEU
// ---------------------------------------------------------------------------------------------

/// Sufficient statistics of BLEU for one hypothesis/reference pair, summed over a corpus.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BleuStats {
    /// Clipped n-gram matches for n = 1..=4.
    pub matches: [u64; 4],
    /// Hypothesis n-grams for n = 1..=4.
    pub totals: [u64; 4],
    /// Hypothesis length in tokens.
    pub hyp_len: u64,
    /// Reference length in tokens.
    pub ref_len: u64,
}

impl std::ops::AddAssign for BleuStats {
    /// Adds the counts of another pair (corpus statistics are sums of pair statistics).
    fn add_assign(&mut self, other: Self) {
        for n in 0..4 {
            self.matches[n] += other.matches[n];
            self.totals[n] += other.totals[n];
        }
        self.hyp_len += other.hyp_len;
        self.ref_len += other.ref_len;
    }
}

/// The `13a` tokenisation of sacrebleu (mteval-v13a), written from its documented behaviour:
/// trailing whitespace trimmed; `<skipped>` removed; `-` + newline joined; newlines to spaces;
/// `&quot;`, `&amp;`, `&lt;`, `&gt;` unescaped (in that order); then, in order, each a
/// left-to-right pass with non-overlapping two-character matches:
/// 1. the ASCII symbols `{|}~[\]^_` `` ` `` `!"#$%&()*+:;<=>?@/` (not `'`, `-`, `.`, `,`) are
///    split off;
/// 2. `.` and `,` are split off after a character that is not an ASCII digit;
/// 3. `.` and `,` are split off before a character that is not an ASCII digit;
/// 4. `-` is split off after an ASCII digit;
///
/// and the result is split on whitespace. No lowercasing.
fn tokenize_13a(segment: &str) -> Vec<String> {
    let mut line = segment.trim_end_matches(is_py_space).replace("<skipped>", "").replace("-\n", "").replace('\n', " ");
    if line.contains('&') {
        line = line.replace("&quot;", "\"").replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">");
    }
    let mut chars: Vec<char> = Vec::with_capacity(line.len() + 2);
    chars.push(' ');
    chars.extend(line.chars());
    chars.push(' ');

    let mut padded = Vec::with_capacity(chars.len() * 2);
    for c in chars {
        if is_13a_symbol(c) {
            padded.extend([' ', c, ' ']);
        } else {
            padded.push(c);
        }
    }
    let is_digit = |c: char| c.is_ascii_digit();
    let is_sep = |c: char| c == '.' || c == ',';
    let padded = pair_pass(&padded, |x, y| !is_digit(x) && is_sep(y), |x, y| [x, ' ', y, ' ']);
    let padded = pair_pass(&padded, |x, y| is_sep(x) && !is_digit(y), |x, y| [' ', x, ' ', y]);
    let padded = pair_pass(&padded, |x, y| is_digit(x) && y == '-', |x, y| [x, ' ', y, ' ']);

    let joined: String = padded.into_iter().collect();
    joined.split(is_py_space).filter(|t| !t.is_empty()).map(str::to_owned).collect()
}

/// The ASCII symbols that the first `13a` rule pads with spaces.
fn is_13a_symbol(c: char) -> bool {
    matches!(c, '{'..='~' | '['..='`' | ' '..='&' | '('..='+' | ':'..='@' | '/')
}

/// One left-to-right substitution pass over character pairs: where `hit(x, y)` holds for the
/// next two characters they are replaced by `emit(x, y)` and both are consumed (so matches do
/// not overlap), otherwise one character is copied.
fn pair_pass(input: &[char], hit: impl Fn(char, char) -> bool, emit: impl Fn(char, char) -> [char; 4]) -> Vec<char> {
    let mut out = Vec::with_capacity(input.len() + input.len() / 2);
    let mut i = 0;
    while i < input.len() {
        if let (Some(&x), Some(&y)) = (input.get(i), input.get(i + 1))
            && hit(x, y)
        {
            out.extend(emit(x, y));
            i += 2;
        } else {
            out.push(input[i]);
            i += 1;
        }
    }
    out
}

/// BLEU statistics of one output against one expected text: both tokenised like sacrebleu's
/// default `13a` tokenizer (case kept), n-gram matches for n = 1..=4 clipped by the reference
/// counts.
pub fn bleu_stats(output: &str, expected: &str) -> BleuStats {
    let hyp = tokenize_13a(output);
    let reference = tokenize_13a(expected);
    let mut stats = BleuStats { hyp_len: hyp.len() as u64, ref_len: reference.len() as u64, ..BleuStats::default() };
    for n in 1..=4usize {
        if hyp.len() < n {
            break;
        }
        let mut ref_counts: HashMap<&[String], u64> = HashMap::new();
        for gram in reference.windows(n) {
            *ref_counts.entry(gram).or_insert(0) += 1;
        }
        let mut hyp_counts: HashMap<&[String], u64> = HashMap::new();
        for gram in hyp.windows(n) {
            *hyp_counts.entry(gram).or_insert(0) += 1;
        }
        stats.totals[n - 1] = (hyp.len() + 1 - n) as u64;
        stats.matches[n - 1] =
            hyp_counts.iter().map(|(gram, &count)| count.min(ref_counts.get(gram).copied().unwrap_or(0))).sum();
    }
    stats
}

/// Corpus BLEU-4 in 0..1 from summed statistics (sacrebleu's score / 100): the geometric mean of
/// the four n-gram precisions times the brevity penalty `exp(1 - r/c)` when the hypothesis
/// length `c` is below the reference length `r`. No smoothing: 0 when any precision is 0 (or has
/// no n-grams at all), and 0 when `c` is 0.
pub fn bleu(stats: &BleuStats) -> f64 {
    if stats.hyp_len == 0 {
        return 0.0;
    }
    let mut log_precision = 0.0;
    for n in 0..4 {
        if stats.matches[n] == 0 || stats.totals[n] == 0 {
            return 0.0;
        }
        log_precision += (stats.matches[n] as f64 / stats.totals[n] as f64).ln();
    }
    let brevity =
        if stats.hyp_len < stats.ref_len { (1.0 - stats.ref_len as f64 / stats.hyp_len as f64).exp() } else { 1.0 };
    brevity * (log_precision / 4.0).exp()
}

// ---------------------------------------------------------------------------------------------
// Judge scores
// ---------------------------------------------------------------------------------------------

/// A number as a judge writes a score: optional minus, digits, optional decimals.
const NUMBER: &str = r"(-?\d+(?:\.\d+)?)";

/// `score: 4`, `**Rating:** [[4]]`, `"score": "4"`, `Score (1-5) = 4`, `the score is 4`.
static LABELLED: LazyLock<Option<Regex>> = LazyLock::new(|| {
    let label = r"\b(?:score|rating|grade|overall)\b";
    let gap = r#"[\s*_"'`]*"#;
    let scale = format!(r"(?:\([^)\n]{{0,30}}\){gap})?");
    let separator = r"(?::|=|\bis\b|\bwas\b)";
    let opening = r#"[\s*_"'`\[(]*"#;
    Regex::new(&format!("(?i){label}{gap}{scale}{separator}{opening}{NUMBER}")).ok()
});

/// `a score of 4`, `rating of 4`.
static LABELLED_OF: LazyLock<Option<Regex>> =
    LazyLock::new(|| Regex::new(&format!(r#"(?i)\b(?:score|rating|grade)\s+of\s+[*_"'`\[(]*{NUMBER}"#)).ok());

/// `4/5`, `4 / 5`, `4 out of 5`.
static FRACTION: LazyLock<Option<Regex>> =
    LazyLock::new(|| Regex::new(&format!(r"(?i){NUMBER}[\s*_]*(?:/|\bout\s+of\b)[\s*_]*(\d+(?:\.\d+)?)")).ok());

/// `**4**`, `__4__`, `[[4]]`.
static EMPHASISED: LazyLock<Option<Regex>> =
    LazyLock::new(|| Regex::new(&format!(r"(?:\*\*?|__|\[\[)\s*{NUMBER}\s*(?:\*\*?|__|\]\])")).ok());

/// A scale written as a range: `1-5`, `1 to 5`, `1–5`.
static RANGE: LazyLock<Option<Regex>> = LazyLock::new(|| Regex::new(r"(?i)\b\d+\s*(?:-|–|—|\bto\b)\s*\d+\b").ok());

/// Any number.
static ANY_NUMBER: LazyLock<Option<Regex>> = LazyLock::new(|| Regex::new(NUMBER).ok());

/// A score found in the text: its value and whether a stated scale disagrees with `max_score`.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    value: f64,
    wrong_scale: bool,
}

/// Whether the number spanning `start..end` stands alone rather than being part of a word or
/// an identifier (`GPT4`, `v2`, `4th`, `x_3`, `1.2.3`).
fn stands_alone(text: &str, start: usize, end: usize) -> bool {
    let before = text[..start].chars().next_back();
    let after = text[end..].chars().next();
    !before.is_some_and(|c| is_word_char(c) || c == '.') && !after.is_some_and(is_word_char)
}

/// The denominator written right after a score (`/ 5`, `out of 5`), if any.
fn stated_scale(rest: &str) -> Option<f64> {
    let rest = rest.trim_start_matches(|c: char| c.is_whitespace() || matches!(c, '*' | '_' | '"' | '\'' | '(' | ')'));
    let rest = if let Some(r) = rest.strip_prefix('/') {
        r
    } else {
        let lower = rest.get(..6)?.to_ascii_lowercase();
        if lower != "out of" {
            return None;
        }
        &rest[6..]
    };
    let rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == '*' || c == '_');
    let digits = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
    rest[..digits].trim_end_matches('.').parse().ok()
}

/// The candidates captured (group 1) by `re`, with their stated scale checked.
fn candidates(re: &Option<Regex>, text: &str, max_score: u32) -> Vec<Candidate> {
    let Some(re) = re else { return Vec::new() };
    let mut found = Vec::new();
    for caps in re.captures_iter(text) {
        let Some(number) = caps.get(1) else { continue };
        if !stands_alone(text, number.start(), number.end()) {
            continue;
        }
        let Ok(value) = number.as_str().parse::<f64>() else { continue };
        let wrong_scale = stated_scale(&text[number.end()..]).is_some_and(|d| d != f64::from(max_score));
        found.push(Candidate { value, wrong_scale });
    }
    found
}

/// Whether a candidate is a usable score on a 1..=max_score scale.
fn in_range(c: &Candidate, max_score: u32) -> bool {
    !c.wrong_scale && c.value >= 1.0 && c.value <= f64::from(max_score)
}

/// Reads a judge model's score from its free-text answer, robust to malformed output: accepts
/// "Score: 4", "4/5", "**4**", "Rating: 4 out of 5", a bare "4", JSON like {"score": 4}; prefers
/// an explicitly labelled score over other numbers; rejects numbers outside 1..=max_score;
/// returns None when no valid score is found. Returns the score normalised to 0..1 as
/// (score-1)/(max_score-1) (max_score 1 -> 1.0).
///
/// Evidence is taken in tiers, strongest first, and the first tier with any candidate decides:
/// 1. labelled: `score`, `rating`, `grade` or `overall`, then `:`, `=`, `is` or `was`
///    (`Score: 4`, `**Rating:** [[4]]`, `{"score": "4"}`, `Score (1-5): 4`);
/// 2. `a score of 4`;
/// 3. fractions whose denominator is `max_score`: `4/5`, `4 out of 5` (others are ignored);
/// 4. emphasised numbers: `**4**`, `*4*`, `__4__`, `[[4]]`.
///
/// In tiers 1, 2 and 4 the last candidate that lies in 1..=max_score wins (a judge that
/// corrects itself ends with its final verdict); when the tier has candidates but none is
/// valid, for example `Score: 0` or `Score: 8/10` on a 5-point scale, the answer is None rather
/// than a weaker guess. Failing all tiers, the standalone numbers of the text (not part of a
/// word like `GPT-4`, a fraction, or a range such as `1-5` or `1 to 5`) are used when exactly
/// one distinct value among them lies in 1..=max_score. Decimal scores (`4.5`) are accepted.
pub fn parse_judge_score(text: &str, max_score: u32) -> Option<f64> {
    if max_score == 0 {
        return None;
    }
    let normalise = |score: f64| if max_score == 1 { 1.0 } else { (score - 1.0) / f64::from(max_score - 1) };
    let decide = |found: &[Candidate]| -> Option<Option<f64>> {
        if found.is_empty() {
            return None;
        }
        Some(found.iter().rev().find(|c| in_range(c, max_score)).map(|c| normalise(c.value)))
    };
    for re in [&*LABELLED, &*LABELLED_OF] {
        if let Some(verdict) = decide(&candidates(re, text, max_score)) {
            return verdict;
        }
    }
    let fractions: Vec<Candidate> =
        candidates(&FRACTION, text, max_score).into_iter().filter(|c| !c.wrong_scale).collect();
    if let Some(verdict) = decide(&fractions) {
        return verdict;
    }
    if let Some(verdict) = decide(&candidates(&EMPHASISED, text, max_score)) {
        return verdict;
    }
    unique_bare_number(text, max_score).map(normalise)
}

/// The only in-range value among the standalone numbers that are not part of a fraction or a
/// range; None when there is none or more than one distinct value.
fn unique_bare_number(text: &str, max_score: u32) -> Option<f64> {
    let (Some(any), Some(fraction), Some(range)) = (&*ANY_NUMBER, &*FRACTION, &*RANGE) else { return None };
    let excluded: Vec<(usize, usize)> =
        fraction.find_iter(text).chain(range.find_iter(text)).map(|m| (m.start(), m.end())).collect();
    let mut value: Option<f64> = None;
    for m in any.find_iter(text) {
        if excluded.iter().any(|&(s, e)| m.start() < e && s < m.end()) || !stands_alone(text, m.start(), m.end()) {
            continue;
        }
        let Ok(v) = m.as_str().parse::<f64>() else { continue };
        if v < 1.0 || v > f64::from(max_score) {
            continue;
        }
        match value {
            Some(seen) if seen != v => return None,
            _ => value = Some(v),
        }
    }
    value
}

// ---------------------------------------------------------------------------------------------
// Bootstrap confidence intervals
// ---------------------------------------------------------------------------------------------

/// A uniform index in 0..n (n > 0), by the multiply-high method (bias below n / 2^64).
fn draw_index(rng: &mut SplitMix64, n: usize) -> usize {
    ((u128::from(rng.next_u64()) * n as u128) >> 64) as usize
}

/// The q-quantile of sorted values by linear interpolation between order statistics at the
/// 0-based rank q·(len − 1) (numpy's default `"linear"` method, Hyndman & Fan type 7).
fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    let Some(last) = sorted.len().checked_sub(1) else { return f64::NAN };
    let rank = q.clamp(0.0, 1.0) * last as f64;
    let lower = (rank.floor() as usize).min(last);
    let upper = (lower + 1).min(last);
    let frac = rank - lower as f64;
    if frac == 0.0 || upper == lower { sorted[lower] } else { sorted[lower] + frac * (sorted[upper] - sorted[lower]) }
}

/// The 2.5th and 97.5th percentiles of `resamples` bootstrap statistics computed by `statistic`
/// from a generator seeded with `seed`; `point` for both when `resamples` is 0.
fn percentile_interval(
    point: f64,
    resamples: usize,
    seed: u64,
    mut statistic: impl FnMut(&mut SplitMix64) -> f64,
) -> (f64, f64, f64) {
    if resamples == 0 {
        return (point, point, point);
    }
    let mut rng = SplitMix64(seed);
    let mut stats: Vec<f64> = (0..resamples).map(|_| statistic(&mut rng)).collect();
    stats.sort_unstable_by(f64::total_cmp);
    (point, quantile_sorted(&stats, 0.025), quantile_sorted(&stats, 0.975))
}

/// Mean and 95% percentile-bootstrap CI of per-sample values (resamples with replacement,
/// `resamples` times, seeded). Empty -> None. One value -> (v, v, v).
///
/// Returns `(mean, low, high)`. Each resample draws `values.len()` values with replacement from
/// a [`SplitMix64`] seeded with `seed`; low and high are the 2.5th and 97.5th percentiles of the
/// resampled means, linearly interpolated between order statistics at rank q·(resamples − 1)
/// (numpy's default). `resamples` 0 gives `(mean, mean, mean)`. The interval is not forced to
/// contain the mean. NaN values propagate.
pub fn mean_with_ci(values: &[f64], resamples: usize, seed: u64) -> Option<(f64, f64, f64)> {
    let n = values.len();
    if n == 0 {
        return None;
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return Some((mean, mean, mean));
    }
    Some(percentile_interval(mean, resamples, seed, |rng| {
        let mut sum = 0.0;
        for _ in 0..n {
            sum += values[draw_index(rng, n)];
        }
        sum / n as f64
    }))
}

/// Corpus BLEU and its bootstrap CI over samples (resample the per-sample BleuStats).
///
/// Returns `(bleu, low, high)` where `bleu` is [`bleu`] of the summed statistics and each
/// resample sums `stats.len()` per-sample statistics drawn with replacement; percentiles as in
/// [`mean_with_ci`]. Empty -> None.
pub fn bleu_with_ci(stats: &[BleuStats], resamples: usize, seed: u64) -> Option<(f64, f64, f64)> {
    let n = stats.len();
    if n == 0 {
        return None;
    }
    let mut total = BleuStats::default();
    for s in stats {
        total += *s;
    }
    Some(percentile_interval(bleu(&total), resamples, seed, |rng| {
        let mut sum = BleuStats::default();
        for _ in 0..n {
            sum += stats[draw_index(rng, n)];
        }
        bleu(&sum)
    }))
}

/// Token-weighted perplexity exp(sum nll / sum tokens) from per-sample (nll_sum, tokens), and its
/// bootstrap CI (resample samples, recompute the ratio).
///
/// Returns `(perplexity, low, high)`; `nll_sum` is the summed negative log-likelihood (natural
/// log) of a sample's `tokens` tokens. Samples with zero tokens carry no information and are
/// left out, so that every resample has tokens; None when no sample has any token. Percentiles
/// as in [`mean_with_ci`].
pub fn perplexity_with_ci(samples: &[(f64, u64)], resamples: usize, seed: u64) -> Option<(f64, f64, f64)> {
    let kept: Vec<(f64, f64)> = samples.iter().filter(|s| s.1 > 0).map(|&(nll, tokens)| (nll, tokens as f64)).collect();
    let n = kept.len();
    if n == 0 {
        return None;
    }
    let (nll, tokens) = kept.iter().fold((0.0, 0.0), |acc, s| (acc.0 + s.0, acc.1 + s.1));
    Some(percentile_interval((nll / tokens).exp(), resamples, seed, |rng| {
        let (mut nll, mut tokens) = (0.0, 0.0);
        for _ in 0..n {
            let s = kept[draw_index(rng, n)];
            nll += s.0;
            tokens += s.1;
        }
        (nll / tokens).exp()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Asserts `a` and `b` agree to `rel` relative (or absolute, near 0) error.
    fn close(a: f64, b: f64, rel: f64) {
        assert!((a - b).abs() <= rel * a.abs().max(b.abs()).max(1e-300) || a == b, "{a} != {b} (rel {rel})");
    }

    // ---- normalisation and match metrics (hand-computed) ----

    #[test]
    fn normalize_answer_squad_rules() {
        assert_eq!(normalize_answer("The Cat, sat on a mat!"), "cat sat on mat");
        assert_eq!(normalize_answer("  An   apple\tand\nthe  pear "), "apple and pear");
        assert_eq!(normalize_answer("theory anthem a1 A.B."), "theory anthem a1 ab");
        // Punctuation is removed without a space, so the article inside "the-end" survives as a word part.
        assert_eq!(normalize_answer("the-end, don't"), "theend dont");
        assert_eq!(normalize_answer("“It’s” — a test…"), "its test");
        assert_eq!(normalize_answer(""), "");
        assert_eq!(normalize_answer("the a an ."), "");
        assert_eq!(normalize_answer("ÉCOLE Niño"), "école niño");
    }

    #[test]
    fn exact_and_normalized_match() {
        assert_eq!(exact_match("  Paris\n", "Paris"), 1.0);
        assert_eq!(exact_match("paris", "Paris"), 0.0);
        assert_eq!(exact_match("Paris.", "Paris"), 0.0);
        assert_eq!(exact_match("", "  "), 1.0);
        assert_eq!(normalized_exact_match("The Paris.", "paris"), 1.0);
        assert_eq!(normalized_exact_match("Paris, France", "paris"), 0.0);
        assert_eq!(normalized_exact_match("", "the"), 1.0);
    }

    #[test]
    fn contains_whole_words() {
        assert_eq!(contains("The answer is Paris, France.", "paris"), 1.0);
        assert_eq!(contains("The answer is Paris, France.", "Paris France"), 1.0);
        assert_eq!(contains("The answer is 14.", "4"), 0.0);
        assert_eq!(contains("concatenate", "cat"), 0.0);
        assert_eq!(contains("France, Paris", "paris france"), 0.0);
        assert_eq!(contains("anything", ""), 1.0);
        assert_eq!(contains("", "the"), 1.0);
        assert_eq!(contains("", "x"), 0.0);
    }

    #[test]
    fn regex_match_is_match() {
        let re = Regex::new(r"(?i)answer:\s*\(?b\)?").expect("valid test regex");
        assert_eq!(regex_match(&re, "Reasoning...\nAnswer: (B)"), 1.0);
        assert_eq!(regex_match(&re, "Answer: C"), 0.0);
        assert_eq!(regex_match(&Regex::new("").expect("valid test regex"), ""), 1.0);
    }

    #[test]
    fn token_f1_squad_hand_checked() {
        // pred [cat sat on mat], gold [cat is on mat]: 3 shared, P = R = 3/4.
        close(token_f1("The cat sat on the mat.", "the cat is on the mat"), 0.75, 1e-15);
        // pred [paris], gold [paris france]: P = 1, R = 1/2, F1 = 2/3.
        close(token_f1("Paris", "Paris, France"), 2.0 / 3.0, 1e-15);
        // Repeated tokens count as a multiset: pred [a1 a1 a1] (not articles), gold [a1 b]: 1 shared,
        // P = 1/3, R = 1/2, F1 = 0.4.
        close(token_f1("a1 a1 a1", "a1 b"), 0.4, 1e-15);
        assert_eq!(token_f1("dog", "cat"), 0.0);
        assert_eq!(token_f1("", ""), 1.0);
        assert_eq!(token_f1("the", "a ."), 1.0);
        assert_eq!(token_f1("", "cat"), 0.0);
        assert_eq!(token_f1("cat", "the"), 0.0);
        assert_eq!(token_f1("Cat!", "cat"), 1.0);
    }

    // ---- ROUGE-L ----

    #[test]
    fn rouge_l_hand_computed() {
        // LCS of [a b c d e] and [a x c y e z] is [a c e] (non-contiguous): P = 3/5, R = 3/6.
        close(rouge_l("a b c d e", "a x c y e z"), 2.0 * 3.0 / 11.0, 1e-15);
        assert_eq!(rouge_l("same words here", "Same, words: here!"), 1.0);
        assert_eq!(rouge_l("", "something"), 0.0);
        assert_eq!(rouge_l("", ""), 0.0);
        assert_eq!(rouge_l("!!!", "..."), 0.0);
        assert_eq!(rouge_l("x y", "z"), 0.0);
        assert_eq!(lcs_len(&[1, 2, 3, 4, 1], &[3, 4, 1, 2, 1, 3]), 3);
    }

    /// fmeasure of `rouge_score.rouge_scorer.RougeScorer(['rougeL'], use_stemmer=False)
    /// .score(expected, output)['rougeL']`, rouge-score 0.1.2 on Python 3.11.7.
    const ROUGE_REFERENCE: [(&str, &str, f64); 9] = [
        ("the cat was found under the bed", "the cat was under the bed", 0.923076923076923),
        ("police killed the gunman", "the gunman killed police", 0.5),
        ("A B C D E", "a x c y e z", 0.5454545454545454),
        ("Hello, World! It's 2024.", "hello world its 2024", 0.6666666666666665),
        ("The café's naïve résumé", "the caf s na ve r sum", 1.0),
        ("the the the", "the", 0.5),
        ("completely different words", "nothing shared here", 0.0),
        (
            "I'm going to the store to buy milk and eggs.",
            "She went to the store and bought eggs, milk, and bread.",
            0.45454545454545453,
        ),
        ("", "something", 0.0),
    ];

    #[test]
    fn rouge_l_matches_rouge_score() {
        for (output, expected, reference) in ROUGE_REFERENCE {
            close(rouge_l(output, expected), reference, 1e-12);
        }
    }

    // ---- BLEU ----

    /// Tokens of sacrebleu 2.6.0's `Tokenizer13a()(s.rstrip()).split()` on Python 3.11.7.
    const TOKENIZE_13A_REFERENCE: [(&str, &[&str]); 14] = [
        ("Hello, world!", &["Hello", ",", "world", "!"]),
        ("3.5 and 1,000 or 1.", &["3.5", "and", "1,000", "or", "1", "."]),
        ("x..5", &["x", ".", ".5"]),
        ("a-b 3-4 -5", &["a-b", "3", "-", "4", "-5"]),
        ("&amp;lt; &quot;hi&quot;", &["<", "\"", "hi", "\""]),
        ("U.S.A.", &["U", ".", "S", ".", "A", "."]),
        ("don't e-mail", &["don't", "e-mail"]),
        ("$5.00.", &["$", "5.00", "."]),
        ("(a) [b] {c}", &["(", "a", ")", "[", "b", "]", "{", "c", "}"]),
        ("end-\nline<skipped> tab\there ", &["endline", "tab", "here"]),
        ("a.,b", &["a", ".", ",", "b"]),
        ("5..a", &["5", ".", ".", "a"]),
        ("1,2,3, go", &["1,2,3", ",", "go"]),
        ("«café» naïve 1.5e-3", &["«café»", "naïve", "1.5e-3"]),
    ];

    #[test]
    fn tokenize_13a_matches_sacrebleu() {
        for (input, tokens) in TOKENIZE_13A_REFERENCE {
            assert_eq!(tokenize_13a(input), tokens, "{input:?}");
        }
        assert!(tokenize_13a("").is_empty());
        assert!(tokenize_13a(" \n ").is_empty());
    }

    #[test]
    fn bleu_stats_clip_repeated_tokens() {
        // Papineni et al.'s example: "the" appears twice in the reference, so 2 of 7 unigrams match.
        let s = bleu_stats("the the the the the the the", "the cat is on the mat");
        assert_eq!(s.matches, [2, 0, 0, 0]);
        assert_eq!(s.totals, [7, 6, 5, 4]);
        assert_eq!((s.hyp_len, s.ref_len), (7, 6));
        assert_eq!(bleu(&s), 0.0);
    }

    #[test]
    fn bleu_hand_computed() {
        let same = bleu_stats("the cat is on the mat", "the cat is on the mat");
        close(bleu(&same), 1.0, 1e-15);
        // 5 of 6 reference tokens, all n-grams match: BLEU = exp(1 - 6/5).
        let short = bleu_stats("the cat is on the", "the cat is on the mat");
        assert_eq!(short.matches, short.totals);
        close(bleu(&short), (-0.2f64).exp(), 1e-15);
        assert_eq!(bleu(&bleu_stats("", "the cat")), 0.0);
        assert_eq!(bleu(&bleu_stats("", "")), 0.0);
        // Fewer than 4 tokens: no 4-grams, so BLEU-4 is 0 without smoothing.
        assert_eq!(bleu(&bleu_stats("a b c", "a b c")), 0.0);
        assert_eq!(bleu(&BleuStats::default()), 0.0);
        let mut sum = BleuStats::default();
        sum += short;
        sum += same;
        assert_eq!(sum.matches, [11, 9, 7, 5]);
        assert_eq!((sum.hyp_len, sum.ref_len), (11, 12));
    }

    /// `sacrebleu.corpus_bleu(hyps, [refs], smooth_method='none')`, sacrebleu 2.6.0 on Python
    /// 3.11.7: (hyps, refs, .score / 100, .counts, .totals, .sys_len, .ref_len).
    type BleuReference = (&'static [&'static str], &'static [&'static str], f64, [u64; 4], [u64; 4], u64, u64);
    const BLEU_REFERENCE: [BleuReference; 9] = [
        (&["the cat is on the mat"], &["the cat is on the mat"], 1.0000000000000004, [6, 5, 4, 3], [6, 5, 4, 3], 6, 6),
        (&["the the the the the the the"], &["the cat is on the mat"], 0.0, [2, 0, 0, 0], [7, 6, 5, 4], 7, 6),
        (&["the cat sat on the mat"], &["the cat is on the mat"], 0.0, [5, 3, 1, 0], [6, 5, 4, 3], 6, 6),
        (&["the cat is on the"], &["the cat is on the mat"], 0.8187307530779823, [5, 4, 3, 2], [5, 4, 3, 2], 5, 6),
        (
            &["there is a cat on the mat and the cat is on the mat"],
            &["the cat is on the mat"],
            0.3498761149110957,
            [6, 5, 4, 3],
            [14, 13, 12, 11],
            14,
            6,
        ),
        (
            &["Hello, world! This is a test.", "The price is 3.5 dollars, not 4.", "It's a nice day today, isn't it?"],
            &[
                "Hello, world! This is the test.",
                "The price is 3.5 dollars, not 4.00.",
                "It's a really nice day today, isn't it?",
            ],
            0.7123638958764323,
            [25, 19, 14, 11],
            [27, 24, 21, 18],
            27,
            28,
        ),
        (
            &[
                "In 2023-24, revenue grew by 12.5% to $1,200,000.",
                "See section 3.2 (page 14) for details.",
                "Dr. Smith arrived at 10:30 a.m.",
            ],
            &[
                "In 2023-24, revenue rose by 12.5% to $1,200,000.",
                "See section 3.2 (page 14) for more details.",
                "Dr. Smith arrived at 10:30 a.m. sharp.",
            ],
            0.8004248788018403,
            [35, 30, 25, 21],
            [36, 33, 30, 27],
            36,
            39,
        ),
        (
            &["He said \"yes\" & she said \"no\".", "Use x<y && y>z; e.g. [a, b].", "U.S.A. won 3-1 in the final!"],
            &[
                "He said &quot;yes&quot; &amp; she said \"no\".",
                "Use x<y && y>z; i.e. [a, b].",
                "The U.S.A. won 3-1 in the final.",
            ],
            0.8604312571790648,
            [44, 39, 34, 30],
            [46, 43, 40, 37],
            46,
            47,
        ),
        (
            &[
                "The quick brown fox jumps over the lazy dog.",
                "A stitch in time saves nine.",
                "All that glitters is not gold, they say.",
                "Well begun is half done.",
            ],
            &[
                "The quick brown fox jumped over the lazy dog.",
                "A stitch in time saves nine.",
                "All that glitters is not gold.",
                "Well begun is half done!",
            ],
            0.7071880438186062,
            [28, 22, 17, 12],
            [33, 29, 25, 21],
            33,
            30,
        ),
    ];

    #[test]
    fn bleu_matches_sacrebleu() {
        for (hyps, refs, score, matches, totals, hyp_len, ref_len) in BLEU_REFERENCE {
            let mut stats = BleuStats::default();
            for (h, r) in hyps.iter().zip(refs) {
                stats += bleu_stats(h, r);
            }
            assert_eq!(stats, BleuStats { matches, totals, hyp_len, ref_len }, "{hyps:?}");
            close(bleu(&stats), score, 1e-12);
        }
    }

    // ---- judge scores ----

    #[test]
    fn judge_patterns_compile() {
        for re in [&*LABELLED, &*LABELLED_OF, &*FRACTION, &*EMPHASISED, &*RANGE, &*ANY_NUMBER] {
            assert!(re.is_some());
        }
    }

    #[test]
    fn judge_scores_on_five_point_scale() {
        let cases: [(&str, Option<f64>); 26] = [
            ("Score: 4", Some(0.75)),
            ("4/5", Some(0.75)),
            ("**4**", Some(0.75)),
            ("Rating: 4 out of 5", Some(0.75)),
            ("4", Some(0.75)),
            (" 5.\n", Some(1.0)),
            ("{\"score\": 4, \"reason\": \"mostly correct\"}", Some(0.75)),
            ("```json\n{\"reasoning\": \"2 errors\", \"score\": \"1\"}\n```", Some(0.0)),
            ("The answer has 3 errors and misses 2 facts. Score: 5", Some(1.0)),
            ("**Score:** 2\n\nThe response is wrong in 4 places.", Some(0.25)),
            ("Rating: [[3]]", Some(0.5)),
            ("Score (1-5): 2", Some(0.25)),
            ("Score: 3\nOn reflection, my final score: 4", Some(0.75)),
            ("I would give this response a score of 4 because it covers 3 points.", Some(0.75)),
            ("On a scale of 1 to 5, I would give this a 3.", Some(0.5)),
            ("4 out of 5 stars, with 2 minor issues", Some(0.75)),
            ("The overall score is 4.5", Some(0.875)),
            ("Score: 7", None),
            ("Score: 0. The response mentions 3 facts.", None),
            ("score:-1", None),
            ("Score: 8/10", None),
            ("GPT-4 did well; 8/10", None),
            ("Score: N/A", None),
            ("The response mentions 2 facts and 3 dates.", None),
            ("I cannot evaluate this response.", None),
            ("", None),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_judge_score(text, 5), expected, "{text:?}");
        }
    }

    #[test]
    fn judge_scores_other_scales() {
        assert_eq!(parse_judge_score("Score: 1", 1), Some(1.0));
        assert_eq!(parse_judge_score("Score: 2", 1), None);
        assert_eq!(parse_judge_score("Score: 1", 0), None);
        assert_eq!(parse_judge_score("Score: 8/10", 10), Some(7.0 / 9.0));
        assert_eq!(parse_judge_score("Rating: 4 out of 5", 10), None);
        assert_eq!(parse_judge_score("[[10]]", 10), Some(1.0));
        assert_eq!(parse_judge_score("Verdict: 7 (scale 1-10)", 10), Some(6.0 / 9.0));
    }

    // ---- bootstrap ----

    /// Deterministic pseudo-random values in [0, 1).
    fn uniform_values(n: usize, seed: u64) -> Vec<f64> {
        let mut rng = SplitMix64(seed);
        (0..n).map(|_| rng.next_f64()).collect()
    }

    #[test]
    fn quantiles_interpolate_linearly() {
        let sorted = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(quantile_sorted(&sorted, 0.0), 1.0);
        assert_eq!(quantile_sorted(&sorted, 1.0), 5.0);
        assert_eq!(quantile_sorted(&sorted, 0.5), 3.0);
        close(quantile_sorted(&sorted, 0.025), 1.1, 1e-12);
        close(quantile_sorted(&sorted, 0.975), 4.9, 1e-12);
        assert_eq!(quantile_sorted(&[7.0], 0.3), 7.0);
        assert!(quantile_sorted(&[], 0.5).is_nan());
    }

    #[test]
    fn mean_ci_basics() {
        assert_eq!(mean_with_ci(&[], 100, 1), None);
        assert_eq!(mean_with_ci(&[0.25], 100, 1), Some((0.25, 0.25, 0.25)));
        assert_eq!(mean_with_ci(&[2.0, 2.0, 2.0], 100, 1), Some((2.0, 2.0, 2.0)));
        assert_eq!(mean_with_ci(&[1.0, 3.0], 0, 1), Some((2.0, 2.0, 2.0)));
        let values = uniform_values(200, 7);
        let (mean, low, high) = mean_with_ci(&values, 1000, 42).expect("non-empty");
        close(mean, values.iter().sum::<f64>() / 200.0, 1e-15);
        assert!(low < mean && mean < high, "{low} {mean} {high}");
        // Standard error of a U(0,1) mean over 200 values is about 0.0204: the 95% interval is about ±0.04.
        assert!((0.06..0.10).contains(&(high - low)), "{}", high - low);
        assert_eq!(mean_with_ci(&values, 1000, 42), Some((mean, low, high)));
        assert_ne!(mean_with_ci(&values, 1000, 43), Some((mean, low, high)));
    }

    #[test]
    fn mean_ci_narrows_with_more_samples() {
        let width = |n: usize| {
            let (_, low, high) = mean_with_ci(&uniform_values(n, 3), 500, 9).expect("non-empty");
            high - low
        };
        let (small, large) = (width(50), width(5000));
        // The width shrinks like 1/sqrt(n): a factor of about 10 here.
        assert!(large < small / 5.0, "{small} {large}");
    }

    #[test]
    fn mean_ci_of_binary_scores() {
        let values: Vec<f64> = (0..1000).map(|i| if i % 4 == 0 { 1.0 } else { 0.0 }).collect();
        let (mean, low, high) = mean_with_ci(&values, 2000, 5).expect("non-empty");
        assert_eq!(mean, 0.25);
        // Normal approximation: 0.25 ± 1.96 · sqrt(0.25 · 0.75 / 1000) = 0.25 ± 0.0268.
        assert!((low - 0.2232).abs() < 0.006 && (high - 0.2768).abs() < 0.006, "{low} {high}");
    }

    #[test]
    fn large_bootstrap_runs() {
        let values = uniform_values(10_000, 11);
        let (mean, low, high) = mean_with_ci(&values, 1000, 1).expect("non-empty");
        assert!(low < mean && mean < high && high - low < 0.02);
    }

    #[test]
    fn bleu_ci() {
        assert_eq!(bleu_with_ci(&[], 100, 1), None);
        let (hyps, refs) = (BLEU_REFERENCE[8].0, BLEU_REFERENCE[8].1);
        let stats: Vec<BleuStats> = hyps.iter().zip(refs).map(|(h, r)| bleu_stats(h, r)).collect();
        let (score, low, high) = bleu_with_ci(&stats, 1000, 3).expect("non-empty");
        close(score, BLEU_REFERENCE[8].2, 1e-12);
        assert!(low <= score && score <= high && low < high, "{low} {score} {high}");
        assert!((0.0..=1.0).contains(&low) && high <= 1.0);
        assert_eq!(bleu_with_ci(&stats, 1000, 3), Some((score, low, high)));
        let one = [bleu_stats("the cat is on the", "the cat is on the mat")];
        let (s, l, h) = bleu_with_ci(&one, 100, 3).expect("non-empty");
        assert_eq!((s, l, h), (bleu(&one[0]), s, s));
    }

    #[test]
    fn perplexity_ci() {
        assert_eq!(perplexity_with_ci(&[], 100, 1), None);
        assert_eq!(perplexity_with_ci(&[(0.0, 0)], 100, 1), None);
        // Equal per-token NLL everywhere: every resample gives exp(nll) exactly, up to rounding.
        let nll = 2.3_f64;
        let samples: Vec<(f64, u64)> = (1..=50u64).map(|t| (nll * t as f64, t)).collect();
        let (ppl, low, high) = perplexity_with_ci(&samples, 500, 8).expect("non-empty");
        for v in [ppl, low, high] {
            close(v, nll.exp(), 1e-12);
        }
        // Token weighting: (10 + 2) / (10 + 1), not the mean of per-sample ratios.
        let (ppl, low, high) = perplexity_with_ci(&[(10.0, 10), (2.0, 1), (5.0, 0)], 500, 8).expect("non-empty");
        close(ppl, (12.0f64 / 11.0).exp(), 1e-15);
        assert!(low <= ppl && ppl <= high && low >= 1.0f64.exp() - 1e-12 && high <= 2.0f64.exp() + 1e-12);
        let varied: Vec<(f64, u64)> = uniform_values(300, 4).iter().map(|u| (20.0 * (1.0 + u), 10)).collect();
        let (ppl, low, high) = perplexity_with_ci(&varied, 1000, 2).expect("non-empty");
        assert!(low < ppl && ppl < high, "{low} {ppl} {high}");
        assert_eq!(perplexity_with_ci(&varied, 1000, 2), Some((ppl, low, high)));
    }
}
