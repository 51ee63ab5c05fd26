//! The per-record transforms: Unicode and whitespace normalisation, filters, and
//! redaction of personal data. Deduplication, which needs state across records, is in
//! the pipeline (prepare/mod.rs) with the MinHash index.

use std::collections::{BTreeMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result, bail};
use regex::Regex;
use unicode_normalization::UnicodeNormalization;

use super::record::Record;
use crate::engine::tokenizer::TextTokenizer;

/// Unicode normalisation form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnicodeForm {
    /// Canonical composition.
    Nfc,
    /// Compatibility composition (full-width letters, ligatures... become plain).
    Nfkc,
    /// Leave as is.
    None,
}

/// Normalises every string of a record.
#[derive(Debug, Clone)]
pub struct Normalize {
    /// Unicode form.
    pub unicode: UnicodeForm,
    /// Collapse runs of spaces and tabs, trim lines, keep at most one blank line.
    pub whitespace: bool,
}

impl Normalize {
    /// Applies to one record.
    pub fn apply(&self, record: &mut Record) {
        for text in record.texts_mut() {
            let mut out: String = match self.unicode {
                UnicodeForm::Nfc => text.nfc().collect(),
                UnicodeForm::Nfkc => text.nfkc().collect(),
                UnicodeForm::None => std::mem::take(text),
            };
            if self.whitespace {
                out = clean_whitespace(&out);
            }
            *text = out;
        }
    }
}

/// Collapses horizontal whitespace to one space, trims each line, turns CRLF into LF,
/// keeps at most one blank line in a row and trims the ends.
pub fn clean_whitespace(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut blank_run = 0;
    for line in text.split('\n') {
        let mut cleaned = String::with_capacity(line.len());
        for word in line.split(|c: char| c.is_whitespace()).filter(|w| !w.is_empty()) {
            if !cleaned.is_empty() {
                cleaned.push(' ');
            }
            cleaned.push_str(word);
        }
        if cleaned.is_empty() {
            blank_run += 1;
            if blank_run > 1 || out.is_empty() {
                continue;
            }
        } else {
            blank_run = 0;
        }
        if !out.is_empty() || !cleaned.is_empty() {
            out.push_str(&cleaned);
            out.push('\n');
        }
    }
    out.trim_end().to_string()
}

/// Keeps records that pass every set bound.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Fewest characters.
    pub min_chars: Option<u64>,
    /// Most characters.
    pub max_chars: Option<u64>,
    /// Fewest tokens (needs a tokenizer).
    pub min_tokens: Option<u64>,
    /// Most tokens (needs a tokenizer).
    pub max_tokens: Option<u64>,
    /// Keep only records matching this.
    pub keep: Option<Regex>,
    /// Drop records matching this.
    pub drop: Option<Regex>,
    /// Most symbols (neither letters, digits nor whitespace) per non-space character.
    pub max_symbol_ratio: Option<f64>,
    /// Most lines that repeat an earlier line, per non-blank line.
    pub max_repeated_line_ratio: Option<f64>,
}

/// Fraction of non-whitespace characters that are neither letters nor digits.
pub fn symbol_ratio(text: &str) -> f64 {
    let (mut symbols, mut total) = (0usize, 0usize);
    for c in text.chars().filter(|c| !c.is_whitespace()) {
        total += 1;
        if !c.is_alphanumeric() {
            symbols += 1;
        }
    }
    if total == 0 { 0.0 } else { symbols as f64 / total as f64 }
}

/// Fraction of non-blank lines that repeat an earlier line.
pub fn repeated_line_ratio(text: &str) -> f64 {
    let mut seen = HashSet::new();
    let (mut repeated, mut total) = (0usize, 0usize);
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        total += 1;
        if !seen.insert(line) {
            repeated += 1;
        }
    }
    if total == 0 { 0.0 } else { repeated as f64 / total as f64 }
}

impl Filter {
    /// Whether the filter counts tokens.
    pub fn needs_tokens(&self) -> bool {
        self.min_tokens.is_some() || self.max_tokens.is_some()
    }

    /// Whether `content` passes; `tokens` counts its tokens when needed.
    pub fn keeps(&self, content: &str, tokens: Option<&TextTokenizer>) -> Result<bool> {
        let chars = content.chars().count() as u64;
        if self.min_chars.is_some_and(|m| chars < m) || self.max_chars.is_some_and(|m| chars > m) {
            return Ok(false);
        }
        if self.keep.as_ref().is_some_and(|r| !r.is_match(content)) {
            return Ok(false);
        }
        if self.drop.as_ref().is_some_and(|r| r.is_match(content)) {
            return Ok(false);
        }
        if self.max_symbol_ratio.is_some_and(|m| symbol_ratio(content) > m) {
            return Ok(false);
        }
        if self.max_repeated_line_ratio.is_some_and(|m| repeated_line_ratio(content) > m) {
            return Ok(false);
        }
        if self.needs_tokens() {
            let tokenizer = tokens.context("a token filter needs tokenStats.tokenizer")?;
            let n = tokenizer.encode(content, false)?.len() as u64;
            if self.min_tokens.is_some_and(|m| n < m) || self.max_tokens.is_some_and(|m| n > m) {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// A kind of personal data and how to find it.
#[derive(Debug, Clone)]
struct Detector {
    /// Name in counts (`email`, `phone`, ..., or a custom pattern's name).
    name: String,
    /// What replaces a finding.
    placeholder: String,
    pattern: Regex,
    check: fn(&str, &str, usize, usize) -> bool,
}

/// Accepts every match.
fn any(_: &str, _: &str, _: usize, _: usize) -> bool {
    true
}

/// The characters just before and after a match are not `bad`.
fn bounded(text: &str, start: usize, end: usize, bad: impl Fn(char) -> bool) -> bool {
    !text[..start].chars().next_back().is_some_and(&bad) && !text[end..].chars().next().is_some_and(&bad)
}

/// Luhn checksum of the digits of `s`.
pub fn luhn(s: &str) -> bool {
    let digits: Vec<u32> = s.chars().filter_map(|c| c.to_digit(10)).collect();
    if digits.len() < 13 || digits.len() > 19 {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| if i % 2 == 1 { if d * 2 > 9 { d * 2 - 9 } else { d * 2 } } else { d })
        .sum();
    sum.is_multiple_of(10)
}

fn card(found: &str, text: &str, start: usize, end: usize) -> bool {
    luhn(found) && bounded(text, start, end, |c| c.is_ascii_alphanumeric())
}

fn ipv4(found: &str, text: &str, start: usize, end: usize) -> bool {
    // Part of a longer dotted number (a version such as 1.2.3.4.5) is not an address.
    let continues = text[end..].starts_with('.') && text[end + 1..].starts_with(|c: char| c.is_ascii_digit());
    found.parse::<Ipv4Addr>().is_ok()
        && bounded(text, start, end, |c| c.is_ascii_alphanumeric())
        && !text[..start].ends_with('.')
        && !continues
}

fn ipv6(found: &str, text: &str, start: usize, end: usize) -> bool {
    // At least three groups, so that "a::b" in code and times like 12:30:45 survive.
    found.parse::<Ipv6Addr>().is_ok()
        && found.split(':').filter(|g| !g.is_empty()).count() >= 3
        && bounded(text, start, end, |c| c.is_ascii_alphanumeric() || c == ':')
}

/// Dates such as 2024-01-15 or 15.01.2024 (perhaps followed by a time) look like phone
/// numbers.
fn looks_like_date(found: &str) -> bool {
    let parts: Vec<usize> = found.split(['-', '.', '/', ' ']).map(str::len).collect();
    matches!(parts.as_slice(), [4, 2, 2, ..] | [1 | 2, 1 | 2, 2 | 4, ..])
}

fn phone(found: &str, text: &str, start: usize, end: usize) -> bool {
    let digits = found.chars().filter(char::is_ascii_digit).count();
    // A sentence may end right after the number; a separator followed by a digit means
    // the number goes on and is something longer.
    let mut after = text[end..].chars();
    let continues = match after.next() {
        Some(c) if c.is_ascii_alphanumeric() => true,
        Some('-' | '.') => after.next().is_some_and(|c| c.is_ascii_digit()),
        _ => false,
    };
    (7..=15).contains(&digits)
        && !looks_like_date(found)
        && !continues
        && !text[..start].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '-' || c == '.')
}

fn email(_: &str, text: &str, start: usize, end: usize) -> bool {
    bounded(text, start, end, |c| c.is_ascii_alphanumeric() || c == '@')
}

/// Replaces personal data with placeholders such as `[EMAIL]`, counting per kind.
#[derive(Debug, Clone)]
pub struct Redact {
    detectors: Vec<Detector>,
}

impl Redact {
    /// Detectors for `kinds` (email, phone, ipAddress, creditCard), then the custom
    /// (name, pattern) pairs, applied in that order.
    pub fn new(kinds: &[String], custom: &[(String, String)]) -> Result<Self> {
        let mut detectors = Vec::new();
        let re = |p: &str| Regex::new(p).expect("built-in pattern");
        // Cards first: their digit runs would otherwise be taken for phone numbers.
        let order = ["email", "creditCard", "ipAddress", "phone"];
        for kind in kinds {
            if !order.contains(&kind.as_str()) {
                bail!("unknown kind of personal data {kind:?}; known: {order:?}");
            }
        }
        for kind in order.iter().filter(|k| kinds.iter().any(|x| x == *k)) {
            match *kind {
                "email" => detectors.push(Detector {
                    name: "email".into(),
                    placeholder: "[EMAIL]".into(),
                    pattern: re(r"[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,}"),
                    check: email,
                }),
                "creditCard" => detectors.push(Detector {
                    name: "creditCard".into(),
                    placeholder: "[CREDIT_CARD]".into(),
                    pattern: re(r"\d(?:[ -]?\d){12,18}"),
                    check: card,
                }),
                "ipAddress" => {
                    detectors.push(Detector {
                        name: "ipAddress".into(),
                        placeholder: "[IP_ADDRESS]".into(),
                        pattern: re(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}"),
                        check: ipv4,
                    });
                    detectors.push(Detector {
                        name: "ipAddress".into(),
                        placeholder: "[IP_ADDRESS]".into(),
                        pattern: re(r"[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}"),
                        check: ipv6,
                    });
                }
                _ => detectors.push(Detector {
                    name: "phone".into(),
                    placeholder: "[PHONE]".into(),
                    pattern: re(r"(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}|\+\d{7,15}"),
                    check: phone,
                }),
            }
        }
        for (name, pattern) in custom {
            let pattern = Regex::new(pattern).with_context(|| format!("custom pattern {name}: {pattern:?}"))?;
            detectors.push(Detector {
                name: name.clone(),
                placeholder: format!("[{}]", name.to_uppercase()),
                pattern,
                check: any,
            });
        }
        Ok(Self { detectors })
    }

    /// Redacts every string of a record, adding to `counts`.
    pub fn apply(&self, record: &mut Record, counts: &mut BTreeMap<String, u64>) {
        for text in record.texts_mut() {
            self.apply_text(text, counts);
        }
    }

    /// Redacts one text, adding to `counts` (the traffic log redacts with this too).
    pub fn apply_text(&self, text: &mut String, counts: &mut BTreeMap<String, u64>) {
        for d in &self.detectors {
            if !d.pattern.is_match(text) {
                continue;
            }
            let mut out = String::with_capacity(text.len());
            let mut last = 0;
            let mut found = 0;
            for m in d.pattern.find_iter(text) {
                if (d.check)(m.as_str(), text, m.start(), m.end()) {
                    out.push_str(&text[last..m.start()]);
                    out.push_str(&d.placeholder);
                    last = m.end();
                    found += 1;
                }
            }
            if found > 0 {
                out.push_str(&text[last..]);
                *text = out;
                *counts.entry(d.name.clone()).or_default() += found;
            }
        }
    }
}

/// The exact-duplicate key of a record's content: 128 bits over its words, lower-cased
/// unless case matters, so spacing and (by default) case do not count.
pub fn exact_key(content: &str, case_sensitive: bool) -> u128 {
    let words = if case_sensitive {
        content
            .split_whitespace()
            .map(|w| super::minhash::word_hashes(w).first().copied().unwrap_or(0) ^ case_mark(w))
            .collect()
    } else {
        super::minhash::word_hashes(content)
    };
    key_of_words(&words)
}

/// Keeps case-sensitive keys of words differing only in case apart.
fn case_mark(word: &str) -> u64 {
    word.bytes()
        .fold(0u64, |h, b| h.rotate_left(5) ^ u64::from(b.is_ascii_uppercase()) ^ u64::from(b))
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Two independent 64-bit hashes of a word-hash sequence, as one 128-bit key.
pub fn key_of_words(words: &[u64]) -> u128 {
    let (mut a, mut b) = (0x243F_6A88_85A3_08D3u64, 0x1319_8A2E_0370_7344u64);
    for &w in words {
        a = (a ^ w).wrapping_mul(0xA076_1D64_78BD_642F).rotate_left(29);
        b = (b.rotate_left(17) ^ w.rotate_right(7)).wrapping_mul(0xE703_7ED1_A0B4_28DB);
    }
    (u128::from(a) << 64) | u128::from(b ^ words.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redact(text: &str) -> (String, BTreeMap<String, u64>) {
        let kinds: Vec<String> = ["email", "phone", "ipAddress", "creditCard"].iter().map(|s| s.to_string()).collect();
        let r = Redact::new(&kinds, &[("order_id".into(), r"ORD-[0-9]{8}".into())]).expect("builds");
        let mut record = Record::Text { text: text.into() };
        let mut counts = BTreeMap::new();
        r.apply(&mut record, &mut counts);
        (record.content().into_owned(), counts)
    }

    #[test]
    fn personal_data_is_replaced_and_counted() {
        let (out, counts) = redact(
            "Mail jane.doe+x@example.co.uk or call +1 415-555-0134 / (020) 7946 0958. \
             Card 4111 1111 1111 1111, host 192.168.10.4, v6 2001:db8::8a2e:370:7334, order ORD-12345678.",
        );
        assert_eq!(
            out,
            "Mail [EMAIL] or call [PHONE] / [PHONE]. Card [CREDIT_CARD], host [IP_ADDRESS], \
             v6 [IP_ADDRESS], order [ORDER_ID]."
        );
        let want: BTreeMap<String, u64> =
            [("creditCard", 1), ("email", 1), ("ipAddress", 2), ("order_id", 1), ("phone", 2)]
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect();
        assert_eq!(counts, want);
    }

    #[test]
    fn look_alikes_survive() {
        for text in [
            "Card 4111 1111 1111 1112 fails the Luhn check.",
            "Version 1.2.3.4.5 and address 999.1.1.1 are not IPs.",
            "Released on 2024-01-15 at 12:30:45, build 20240115.",
            "Use std::vec::Vec and a::b in code.",
            "An @handle and user@localhost are not addresses.",
            "ISBN 978-3-16 and the year 1999.",
        ] {
            let (out, counts) = redact(text);
            assert_eq!(out, text, "{counts:?}");
        }
    }

    #[test]
    fn whitespace_cleanup() {
        assert_eq!(clean_whitespace("  a \t b  \r\n\r\n\r\n\n c \u{a0}d \n"), "a b\n\nc d");
    }

    #[test]
    fn filters_measure_symbols_and_repeats() {
        assert!((symbol_ratio("ab!!") - 0.5).abs() < 1e-9);
        assert!((repeated_line_ratio("x\ny\nx\nx") - 0.5).abs() < 1e-9);
        let f = Filter { min_chars: Some(3), drop: Some(Regex::new("spam").expect("re")), ..Default::default() };
        assert!(!f.keeps("ab", None).expect("ok"));
        assert!(!f.keeps("buy spam", None).expect("ok"));
        assert!(f.keeps("hello", None).expect("ok"));
        let t = Filter { min_tokens: Some(1), ..Default::default() };
        assert!(t.keeps("x", None).is_err(), "a token filter without a tokenizer is an error");
    }

    #[test]
    fn exact_keys_ignore_case_and_spacing_unless_asked() {
        assert_eq!(exact_key("Hello  World", false), exact_key("hello world", false));
        assert_ne!(exact_key("Hello World", true), exact_key("hello world", true));
    }

    #[test]
    fn nfkc_folds_compatibility_characters() {
        let n = Normalize { unicode: UnicodeForm::Nfkc, whitespace: true };
        let mut r = Record::Text { text: "ﬁne  ＡＢＣ".into() };
        n.apply(&mut r);
        assert_eq!(r.content(), "fine ABC");
    }
}
