//! Checks that an Assignment is complete and consistent before a worker acts on it.
//! Every error names the field as it is spelled in the YAML form (camelCase).

use std::collections::BTreeSet;
use std::fmt;

use crate::v1::{
    self, Artifact, Assignment, EvalAssignment, FinetuneAssignment, Model, PrepareAssignment, Redact, ServeAssignment,
    assignment::Mode, data_source, eval_target, transform,
};

/// One thing wrong with an Assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path of the field, e.g. `finetune.hyperparameters.learningRate`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Something that can be checked before use.
pub trait Validate {
    /// Every problem found, or Ok.
    fn validate(&self) -> Result<(), Vec<FieldError>>;
}

/// Collects errors under a field-path prefix.
struct Checker {
    errors: Vec<FieldError>,
}

impl Checker {
    fn fail(&mut self, field: &str, message: impl Into<String>) {
        self.errors.push(FieldError { field: field.to_string(), message: message.into() });
    }

    fn check(&mut self, ok: bool, field: &str, message: &str) {
        if !ok {
            self.fail(field, message);
        }
    }

    fn one_of(&mut self, field: &str, value: &str, allowed: &[&str]) {
        if !allowed.contains(&value) {
            let shown = if value.is_empty() { "nothing".to_string() } else { format!("{value:?}") };
            self.fail(field, format!("must be one of {}, got {shown}", allowed.join(", ")));
        }
    }

    fn present<'a, T>(&mut self, field: &str, value: Option<&'a T>) -> Option<&'a T> {
        if value.is_none() {
            self.fail(field, "is required");
        }
        value
    }

    fn uri(&mut self, field: &str, uri: &str) {
        const SCHEMES: &[&str] = &["store", "s3", "https", "http", "pvc", "file"];
        if uri.trim().is_empty() {
            self.fail(field, "is required");
        } else if let Some((scheme, rest)) = uri.split_once("://") {
            if !SCHEMES.contains(&scheme) {
                self.fail(field, format!("unsupported scheme {scheme:?}; use one of {}", SCHEMES.join(", ")));
            } else if rest.is_empty() {
                self.fail(field, "has a scheme but no location");
            } else if scheme == "store" && !store_key_ok(rest) {
                self.fail(
                    field,
                    "a store:// key must be relative, without empty, . or .. segments (only a trailing / is allowed)",
                );
            }
        }
    }

    /// A regular expression the worker compiles: it must compile with the same engine
    /// (and size limits) here, so that a bad pattern stops the workload before any pod
    /// starts. An empty pattern means none.
    fn regex(&mut self, field: &str, pattern: &str) {
        if pattern.is_empty() {
            return;
        }
        if let Err(err) = regex::Regex::new(pattern) {
            let detail = err.to_string().lines().rfind(|l| !l.trim().is_empty()).unwrap_or_default().trim().to_string();
            self.fail(field, format!("is not a valid regular expression: {detail}"));
        }
    }

    fn sha256(&mut self, field: &str, digest: &str) {
        let ok = digest.is_empty()
            || (digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        self.check(ok, field, "must be 64 lowercase hex digits (sha256)");
    }

    fn artifact(&mut self, field: &str, artifact: Option<&Artifact>) {
        if let Some(a) = self.present(field, artifact) {
            self.uri(&format!("{field}.uri"), &a.uri);
            self.sha256(&format!("{field}.sha256"), &a.sha256);
        }
    }

    fn optional_artifact(&mut self, field: &str, artifact: Option<&Artifact>) {
        if artifact.is_some() {
            self.artifact(field, artifact);
        }
    }

    fn model(&mut self, field: &str, model: Option<&Model>) {
        if let Some(m) = self.present(field, model) {
            self.artifact(&format!("{field}.weights"), m.weights.as_ref());
            self.one_of(&format!("{field}.format"), &m.format, &["", "gguf", "hf"]);
            self.one_of(&format!("{field}.dtype"), &m.dtype, &["", "auto", "f32", "f16", "bf16"]);
        }
    }

    fn fraction(&mut self, field: &str, value: f64) {
        self.check((0.0..=1.0).contains(&value), field, "must be between 0 and 1");
    }

    fn output(&mut self, field: &str, output: Option<&v1::Output>) {
        if let Some(o) = self.present(field, output) {
            self.uri(&format!("{field}.uri"), &o.uri);
        }
    }

    fn generation(&mut self, field: &str, g: Option<&v1::GenerationParameters>) {
        let Some(g) = g else { return };
        if let Some(t) = g.temperature {
            self.check((0.0..=2.0).contains(&t), &format!("{field}.temperature"), "must be between 0 and 2");
        }
        if let Some(p) = g.top_p {
            self.check(p > 0.0 && p <= 1.0, &format!("{field}.topP"), "must be in (0, 1]");
        }
        if let Some(r) = g.repetition_penalty {
            self.check(r > 0.0, &format!("{field}.repetitionPenalty"), "must be greater than 0");
        }
        if let Some(m) = g.max_tokens {
            self.check(m > 0, &format!("{field}.maxTokens"), "must be at least 1");
        }
    }

    fn finish(self) -> Result<(), Vec<FieldError>> {
        if self.errors.is_empty() { Ok(()) } else { Err(self.errors) }
    }
}

/// Whether a store key stays under its root: relative, no `.` or `..` segments and no
/// empty segments except after a trailing `/` (a directory).
fn store_key_ok(key: &str) -> bool {
    let key = key.strip_suffix('/').unwrap_or(key);
    !key.is_empty() && key.split('/').all(|part| !part.is_empty() && part != "." && part != "..")
}

/// Metric names an evaluation understands.
pub const METRICS: &[&str] = &[
    "perplexity",
    "exactMatch",
    "normalizedExactMatch",
    "contains",
    "regexMatch",
    "tokenF1",
    "rougeL",
    "bleu",
    "multipleChoice",
    "judge",
];

/// Projection names LoRA can target.
pub const TARGET_MODULES: &[&str] = &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

impl Validate for Assignment {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut c = Checker { errors: Vec::new() };
        if let Some(store) = &self.store {
            match &store.backend {
                Some(v1::store::Backend::Local(l)) => {
                    c.check(l.root.starts_with('/'), "store.local.root", "must be an absolute path")
                }
                Some(v1::store::Backend::S3(s3)) => c.check(!s3.bucket.is_empty(), "store.s3.bucket", "is required"),
                None => c.fail("store", "must set local or s3"),
            }
        }
        match &self.mode {
            None => c.fail("", "exactly one of prepare, finetune, eval, serve or resolve must be set"),
            Some(Mode::Prepare(p)) => prepare(&mut c, p),
            Some(Mode::Finetune(f)) => finetune(&mut c, f),
            Some(Mode::Eval(e)) => eval(&mut c, e),
            Some(Mode::Serve(s)) => serve(&mut c, s),
            Some(Mode::Resolve(r)) => resolve(&mut c, r),
        }
        c.finish()
    }
}

fn prepare(c: &mut Checker, p: &PrepareAssignment) {
    match p.source.as_ref().and_then(|s| s.source.as_ref()) {
        None => c.fail("prepare.source", "must set one of uri, inline or feedback"),
        Some(data_source::Source::Uri(uri)) => c.uri("prepare.source.uri", uri),
        Some(data_source::Source::Inline(inline)) => {
            c.check(!inline.records.is_empty(), "prepare.source.inline.records", "must not be empty")
        }
        Some(data_source::Source::Feedback(f)) => {
            c.uri("prepare.source.feedback.uri", &f.uri);
            c.check((1..=5).contains(&f.min_rating), "prepare.source.feedback.minRating", "must be between 1 and 5");
        }
    }
    c.one_of("prepare.format", &p.format, &["", "jsonl", "csv", "parquet", "text"]);
    c.one_of("prepare.schema", &p.schema, &["chat", "completion", "text"]);
    for (i, t) in p.transforms.iter().enumerate() {
        let field = format!("prepare.transforms[{i}]");
        match &t.transform {
            None => c.fail(&field, "must set one of normalize, filter, redact, exactDedup or nearDedup"),
            Some(transform::Transform::Normalize(n)) => {
                c.one_of(&format!("{field}.normalize.unicode"), &n.unicode, &["NFC", "NFKC", "None"])
            }
            Some(transform::Transform::Filter(f)) => {
                if let (Some(lo), Some(hi)) = (f.min_chars, f.max_chars) {
                    c.check(lo <= hi, &format!("{field}.filter.minChars"), "must not exceed maxChars");
                }
                if let (Some(lo), Some(hi)) = (f.min_tokens, f.max_tokens) {
                    c.check(lo <= hi, &format!("{field}.filter.minTokens"), "must not exceed maxTokens");
                }
                if let Some(r) = f.max_symbol_ratio {
                    c.fraction(&format!("{field}.filter.maxSymbolRatio"), r);
                }
                if let Some(r) = f.max_repeated_line_ratio {
                    c.fraction(&format!("{field}.filter.maxRepeatedLineRatio"), r);
                }
                c.regex(&format!("{field}.filter.keepPattern"), &f.keep_pattern);
                c.regex(&format!("{field}.filter.dropPattern"), &f.drop_pattern);
                let needs_tokenizer = f.min_tokens.is_some() || f.max_tokens.is_some();
                c.check(
                    !needs_tokenizer || p.token_stats.is_some(),
                    &format!("{field}.filter"),
                    "minTokens/maxTokens need tokenStats.tokenizer to count tokens",
                );
            }
            Some(transform::Transform::Redact(r)) => redact(c, &format!("{field}.redact"), r),
            Some(transform::Transform::ExactDedup(_)) => {}
            Some(transform::Transform::NearDedup(n)) => {
                c.check(n.shingle_size >= 1, &format!("{field}.nearDedup.shingleSize"), "must be at least 1");
                c.check(n.permutations >= 16, &format!("{field}.nearDedup.permutations"), "must be at least 16");
                c.check(
                    n.threshold > 0.0 && n.threshold <= 1.0,
                    &format!("{field}.nearDedup.threshold"),
                    "must be in (0, 1]",
                );
            }
        }
    }
    if let Some(split) = c.present("prepare.split", p.split.as_ref()) {
        c.fraction("prepare.split.train", split.train);
        c.fraction("prepare.split.validation", split.validation);
        c.fraction("prepare.split.test", split.test);
        let sum = split.train + split.validation + split.test;
        c.check((sum - 1.0).abs() < 1e-6, "prepare.split", "train + validation + test must add up to 1");
    }
    if let Some(ts) = &p.token_stats {
        c.model("prepare.tokenStats.tokenizer", ts.tokenizer.as_ref());
    }
    c.output("prepare.output", p.output.as_ref());
}

fn finetune(c: &mut Checker, f: &FinetuneAssignment) {
    c.model("finetune.baseModel", f.base_model.as_ref());
    c.artifact("finetune.train", f.train.as_ref());
    c.optional_artifact("finetune.validation", f.validation.as_ref());
    c.one_of("finetune.method", &f.method, &["lora", "full"]);
    match (&f.method[..], &f.lora) {
        ("lora", None) => c.fail("finetune.lora", "is required when method is lora"),
        ("full", Some(_)) => c.fail("finetune.lora", "must not be set when method is full"),
        (_, Some(l)) => {
            c.check(l.rank >= 1, "finetune.lora.rank", "must be at least 1");
            c.check(l.alpha > 0.0, "finetune.lora.alpha", "must be greater than 0");
            c.check((0.0..1.0).contains(&l.dropout), "finetune.lora.dropout", "must be in [0, 1)");
            c.check(!l.target_modules.is_empty(), "finetune.lora.targetModules", "must not be empty");
            for (i, m) in l.target_modules.iter().enumerate() {
                c.one_of(&format!("finetune.lora.targetModules[{i}]"), m, TARGET_MODULES);
            }
        }
        _ => {}
    }
    if let Some(h) = c.present("finetune.hyperparameters", f.hyperparameters.as_ref()) {
        c.check(h.epochs >= 1, "finetune.hyperparameters.epochs", "must be at least 1");
        c.check(h.batch_size >= 1, "finetune.hyperparameters.batchSize", "must be at least 1");
        c.check(
            h.gradient_accumulation_steps >= 1,
            "finetune.hyperparameters.gradientAccumulationSteps",
            "must be at least 1",
        );
        c.check(
            h.learning_rate > 0.0 && h.learning_rate.is_finite(),
            "finetune.hyperparameters.learningRate",
            "must be greater than 0",
        );
        c.one_of("finetune.hyperparameters.lrSchedule", &h.lr_schedule, &["cosine", "linear", "constant"]);
        c.check(h.weight_decay >= 0.0, "finetune.hyperparameters.weightDecay", "must not be negative");
        c.check(h.max_grad_norm >= 0.0, "finetune.hyperparameters.maxGradNorm", "must not be negative");
        c.check(h.max_seq_length >= 8, "finetune.hyperparameters.maxSeqLength", "must be at least 8");
        c.check(h.eval_interval >= 1, "finetune.hyperparameters.evalInterval", "must be at least 1");
        if h.max_steps > 0 {
            c.check(h.warmup_steps <= h.max_steps, "finetune.hyperparameters.warmupSteps", "must not exceed maxSteps");
        }
    }
    if let Some(ck) = &f.checkpoints {
        c.uri("finetune.checkpoints.uri", &ck.uri);
        c.check(ck.interval_steps >= 1, "finetune.checkpoints.intervalSteps", "must be at least 1");
        c.check(ck.keep >= 1, "finetune.checkpoints.keep", "must be at least 1");
    }
    if let Some(es) = &f.early_stopping {
        c.check(es.patience >= 1, "finetune.earlyStopping.patience", "must be at least 1");
        c.check(f.validation.is_some(), "finetune.earlyStopping", "needs a validation split to watch");
    }
    c.output("finetune.output", f.output.as_ref());
}

fn endpoint(c: &mut Checker, field: &str, e: &v1::EndpointTarget) {
    let http = e.url.starts_with("http://") || e.url.starts_with("https://");
    c.check(http, &format!("{field}.url"), "must be an http:// or https:// URL");
    c.check(!e.model.is_empty(), &format!("{field}.model"), "is required");
}

fn eval(c: &mut Checker, e: &EvalAssignment) {
    let local = match e.target.as_ref().and_then(|t| t.target.as_ref()) {
        None => {
            c.fail("eval.target", "must set local or endpoint");
            false
        }
        Some(eval_target::Target::Local(l)) => {
            c.model("eval.target.local.model", l.model.as_ref());
            c.optional_artifact("eval.target.local.adapter", l.adapter.as_ref());
            true
        }
        Some(eval_target::Target::Endpoint(ep)) => {
            endpoint(c, "eval.target.endpoint", ep);
            false
        }
    };
    c.artifact("eval.data", e.data.as_ref());
    c.check(!e.metrics.is_empty(), "eval.metrics", "must list at least one metric");
    let mut seen = BTreeSet::new();
    for (i, m) in e.metrics.iter().enumerate() {
        let field = format!("eval.metrics[{i}]");
        c.one_of(&field, m, METRICS);
        c.check(seen.insert(m.as_str()), &field, "is listed twice");
        if m == "perplexity" || m == "multipleChoice" {
            c.check(local, &field, "needs a local model target (log-likelihoods are not available from an endpoint)");
        }
    }
    for (i, t) in e.thresholds.iter().enumerate() {
        let field = format!("eval.thresholds[{i}]");
        c.check(e.metrics.contains(&t.metric), &format!("{field}.metric"), "must be listed in metrics");
        c.check(t.min.is_some() || t.max.is_some(), &field, "needs min or max");
        if let (Some(min), Some(max)) = (t.min, t.max) {
            c.check(min <= max, &format!("{field}.min"), "must not exceed max");
        }
        let (low, high) = if t.metric == "perplexity" { (1.0, f64::INFINITY) } else { (0.0, 1.0) };
        for (name, bound) in [("min", t.min), ("max", t.max)] {
            if let Some(b) = bound {
                c.check(
                    b.is_finite() && (low..=high).contains(&b),
                    &format!("{field}.{name}"),
                    if t.metric == "perplexity" { "must be at least 1 (perplexity is)" } else { "must lie in 0..1" },
                );
            }
        }
        if t.metric == "judge" {
            c.check(
                t.min.is_some_and(|m| m > 0.0) || t.max.is_some_and(|m| m < 1.0),
                &field,
                "passes every answer: judge scores lie in 0..1, so set min above 0 or max below 1",
            );
        }
    }
    if seen.contains("judge") {
        match &e.judge {
            None => c.fail("eval.judge", "is required when metrics lists judge"),
            Some(j) => {
                match &j.endpoint {
                    Some(ep) => endpoint(c, "eval.judge.endpoint", ep),
                    None => c.fail("eval.judge.endpoint", "is required"),
                }
                c.check(!j.rubric.trim().is_empty(), "eval.judge.rubric", "is required");
                c.check(
                    (2..=100).contains(&j.max_score),
                    "eval.judge.maxScore",
                    "must be between 2 and 100 (a scale of one score passes every answer)",
                );
            }
        }
    }
    c.check(
        !seen.contains("regexMatch") || !e.regex.is_empty(),
        "eval.regex",
        "is required when metrics lists regexMatch",
    );
    c.regex("eval.regex", &e.regex);
    if let Some(b) = &e.baseline {
        c.check(b.max_regression >= 0.0, "eval.baseline.maxRegression", "must not be negative");
    }
    c.fraction("eval.maxErrorFraction", e.max_error_fraction);
    c.check(e.concurrency >= 1, "eval.concurrency", "must be at least 1");
    c.generation("eval.generation", e.generation.as_ref());
    c.output("eval.output", e.output.as_ref());
}

fn redact(c: &mut Checker, field: &str, r: &Redact) {
    for (k, kind) in r.kinds.iter().enumerate() {
        c.one_of(&format!("{field}.kinds[{k}]"), kind, &["email", "phone", "ipAddress", "creditCard"]);
    }
    for (k, custom) in r.custom.iter().enumerate() {
        c.check(!custom.name.is_empty(), &format!("{field}.custom[{k}].name"), "is required");
        c.check(!custom.pattern.is_empty(), &format!("{field}.custom[{k}].pattern"), "is required");
        c.regex(&format!("{field}.custom[{k}].pattern"), &custom.pattern);
    }
}

fn serve(c: &mut Checker, s: &ServeAssignment) {
    c.model("serve.model", s.model.as_ref());
    c.check(!s.model_name.is_empty(), "serve.modelName", "is required");
    let mut names = BTreeSet::new();
    for (i, a) in s.adapters.iter().enumerate() {
        let field = format!("serve.adapters[{i}]");
        c.check(!a.name.is_empty(), &format!("{field}.name"), "is required");
        c.check(a.name != s.model_name, &format!("{field}.name"), "must differ from modelName");
        c.check(names.insert(a.name.as_str()), &format!("{field}.name"), "is used twice");
        c.artifact(&format!("{field}.adapter"), a.adapter.as_ref());
    }
    if let Some(sv) = c.present("serve.serving", s.serving.as_ref()) {
        c.check((1..=65535).contains(&sv.port), "serve.serving.port", "must be between 1 and 65535");
        c.check(sv.max_batch_size >= 1, "serve.serving.maxBatchSize", "must be at least 1");
        c.check(sv.max_request_bytes >= 1024, "serve.serving.maxRequestBytes", "must be at least 1024");
    }
    if let Some(t) = &s.traffic {
        c.uri("serve.traffic.uri", &t.uri);
        if let Some(r) = &t.redact {
            redact(c, "serve.traffic.redact", r);
        }
    }
    if let Some(p) = &s.prompt {
        c.generation("serve.prompt.parameters", p.parameters.as_ref());
    }
}

fn resolve(c: &mut Checker, r: &v1::ResolveAssignment) {
    c.artifact("resolve.source", r.source.as_ref());
    let cache_ok = !r.cache.is_empty()
        && !r.cache.starts_with('/')
        && r.cache.split('/').all(|part| !part.is_empty() && part != "." && part != "..");
    c.check(cache_ok, "resolve.cache", "must be a relative store key without empty, . or .. segments");
}

/// Joins errors into one message, one per line.
pub fn describe(errors: &[FieldError]) -> String {
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors_of(yaml: &str) -> Vec<String> {
        let a = crate::parse_assignment(yaml).unwrap_or_else(|e| panic!("parses: {e}"));
        a.validate().expect_err("must be invalid").iter().map(ToString::to_string).collect()
    }

    fn assert_error(yaml: &str, expected: &str) {
        let errors = errors_of(yaml);
        assert!(errors.iter().any(|e| e.contains(expected)), "expected {expected:?} in {errors:#?}");
    }

    const SOURCE: &str = "  source: {uri: \"store://ns/data.jsonl\"}\n  schema: chat\n  split: {train: 1}\n  output: {uri: \"store://ns/out/\"}\n";

    #[test]
    fn bad_regular_expressions_are_refused_naming_the_field() {
        assert_error(
            &format!("prepare:\n{SOURCE}  transforms: [{{filter: {{keepPattern: \"(abc\"}}}}]\n"),
            "prepare.transforms[0].filter.keepPattern: is not a valid regular expression: error: unclosed group",
        );
        assert_error(
            &format!("prepare:\n{SOURCE}  transforms: [{{filter: {{dropPattern: \"(?<=a)b\"}}}}]\n"),
            "prepare.transforms[0].filter.dropPattern: is not a valid regular expression",
        );
        assert_error(
            &format!("prepare:\n{SOURCE}  transforms: [{{redact: {{custom: [{{name: ID, pattern: \"[z-a]\"}}]}}}}]\n"),
            "prepare.transforms[0].redact.custom[0].pattern: is not a valid regular expression",
        );
        // Valid RE2 that is too big for the worker's engine is caught here too.
        assert_error(
            &format!(
                "prepare:\n{SOURCE}  transforms: [{{filter: {{keepPattern: \"\\\\w{{1000}}\\\\w{{1000}}\\\\w{{1000}}\"}}}}]\n"
            ),
            "prepare.transforms[0].filter.keepPattern: is not a valid regular expression",
        );
        assert_error(
            "eval:\n  metrics: [regexMatch]\n  regex: \"a)\"\n",
            "eval.regex: is not a valid regular expression",
        );
        assert_error(
            "serve:\n  modelName: m\n  traffic: {uri: \"store://ns/t/\", redact: {custom: [{name: X, pattern: \"*\"}]}}\n",
            "serve.traffic.redact.custom[0].pattern: is not a valid regular expression",
        );
    }

    #[test]
    fn good_regular_expressions_pass() {
        let a = crate::parse_assignment(&format!(
            "prepare:\n{SOURCE}  transforms: [{{filter: {{keepPattern: \"(?i)order [0-9]+\", dropPattern: \"lorem\"}}}}, {{redact: {{custom: [{{name: ID, pattern: \"ORD-[0-9]{{8}}\"}}]}}}}]\n"
        ))
        .expect("parses");
        let errors = a.validate().err().unwrap_or_default();
        assert!(!errors.iter().any(|e| e.field.contains("Pattern") || e.field.contains("pattern")), "{errors:#?}");
    }

    #[test]
    fn store_keys_stay_under_their_root() {
        for uri in ["store://../x", "store://ns/./x", "store:///abs", "store://ns//x", "store://ns/a/.."] {
            assert_error(
                &format!("prepare:\n  source: {{uri: \"{uri}\"}}\n  schema: chat\n"),
                "prepare.source.uri: a store:// key must be relative",
            );
        }
        for uri in ["store://ns/data.jsonl", "store://ns/dir/"] {
            let a = crate::parse_assignment(&format!("prepare:\n  source: {{uri: \"{uri}\"}}\n  schema: chat\n"))
                .expect("parses");
            let errors = a.validate().err().unwrap_or_default();
            assert!(!errors.iter().any(|e| e.field == "prepare.source.uri"), "{uri}: {errors:#?}");
        }
    }

    #[test]
    fn thresholds_lie_in_the_metric_range_and_judges_can_fail() {
        assert_error(
            "eval:\n  metrics: [tokenF1]\n  thresholds: [{metric: tokenF1, min: 0.8, max: 0.2}]\n",
            "eval.thresholds[0].min: must not exceed max",
        );
        assert_error(
            "eval:\n  metrics: [rougeL]\n  thresholds: [{metric: rougeL, min: 40}]\n",
            "eval.thresholds[0].min: must lie in 0..1",
        );
        assert_error(
            "eval:\n  metrics: [perplexity]\n  thresholds: [{metric: perplexity, max: 0.5}]\n",
            "eval.thresholds[0].max: must be at least 1",
        );
        assert_error(
            "eval:\n  metrics: [judge]\n  thresholds: [{metric: judge, min: 0}]\n",
            "eval.thresholds[0]: passes every answer",
        );
        assert_error(
            "eval:\n  metrics: [judge]\n  judge: {endpoint: {url: \"http://j:8000/v1\", model: j}, rubric: r, maxScore: 1}\n",
            "eval.judge.maxScore: must be between 2 and 100",
        );
    }
}
