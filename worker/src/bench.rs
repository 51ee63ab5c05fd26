//! `llmops-worker bench`: prompt-processing and decode speed of the engine, beside
//! llama.cpp (through llama-cpp-python) on the same model, prompt, length and threads.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Deserialize;

use crate::engine::model::KvCache;
use crate::engine::sampling::argmax;
use crate::engine::{WeightFormat, load};

/// Arguments of `bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Model to measure (GGUF file or HF directory).
    #[arg(long, value_name = "PATH")]
    model: PathBuf,
    /// Tokens in the prompt.
    #[arg(long, default_value_t = 110)]
    prompt_tokens: usize,
    /// Tokens generated greedily after the prompt (EOS does not stop the count).
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    /// Repetitions; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Threads of both engines.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// as-stored (GGUF stays quantized), dense (dequantized to f32) or hybrid (quantized
    /// for decoding, dense for the prompt).
    #[arg(long, default_value = "hybrid")]
    weights: String,
    /// Python with llama-cpp-python installed (scripts/llamacpp-env prints one); the
    /// comparison is skipped without it.
    #[arg(long, value_name = "PYTHON")]
    llamacpp_python: Option<PathBuf>,
    /// Instead of timing: print the logits of the last position of this text (tokenized
    /// without special tokens, dense f32 weights) as JSON, for comparing with other
    /// implementations (benches/finetune/interop-check).
    #[arg(long, value_name = "TEXT")]
    logits: Option<String>,
    /// A LoRA adapter to apply for --logits.
    #[arg(long, value_name = "DIR", requires = "logits")]
    adapter: Option<PathBuf>,
}

impl BenchArgs {
    /// Threads both engines use.
    pub fn threads(&self) -> usize {
        self.threads
    }
}

/// Speeds of one engine.
#[derive(Debug, Clone, Copy, Deserialize)]
struct Speed {
    prefill_tps: f64,
    decode_tps: f64,
}

const PROMPT_TEXT: &str = "The history of the lighthouse is a story of light, stone and patience. \
Long before electric lamps, keepers climbed narrow stairs every evening to trim wicks and polish lenses, \
so that ships far out at sea could find the harbour mouth. Each tower had its own rhythm of flashes, \
and sailors learned to read them like handwriting. ";

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Prints `{"tokens": [...], "logits_last": [...]}` of `text`, with the adapter if any.
fn print_logits(args: &BenchArgs, text: &str) -> Result<()> {
    let loaded = load(&args.model, &crate::engine::device(), WeightFormat::Dense)?;
    let tokens = loaded.tokenizer.encode(text, false)?;
    let adapter = match &args.adapter {
        Some(dir) => Some(crate::engine::Adapter::load(dir, &loaded.model, None)?),
        None => None,
    };
    let mut cache = KvCache::default();
    let logits = loaded.model.forward_with(&tokens, &mut cache, false, adapter.as_ref())?;
    let last: Vec<f32> = logits.get(0)?.to_dtype(candle_core::DType::F32)?.to_vec1()?;
    println!("{}", serde_json::json!({"tokens": tokens, "logits_last": last}));
    Ok(())
}

/// Runs the benchmark and prints the table.
pub fn run(args: &BenchArgs) -> Result<()> {
    if let Some(text) = &args.logits {
        return print_logits(args, text);
    }
    if args.runs == 0 || args.prompt_tokens == 0 || args.gen_tokens == 0 {
        bail!("--runs, --prompt-tokens and --gen-tokens must be at least 1");
    }
    rayon::ThreadPoolBuilder::new().num_threads(args.threads).build_global().ok();
    let weights = match args.weights.as_str() {
        "as-stored" => WeightFormat::AsStored,
        "dense" => WeightFormat::Dense,
        "hybrid" => WeightFormat::Hybrid,
        other => bail!("--weights must be as-stored, dense or hybrid, got {other:?}"),
    };
    let loaded = load(&args.model, &crate::engine::device(), weights)?;
    let mut prompt = loaded.tokenizer.encode_prompt(&PROMPT_TEXT.repeat(1 + args.prompt_tokens / 40))?;
    prompt.truncate(args.prompt_tokens);
    if prompt.len() < args.prompt_tokens {
        bail!("could not build a prompt of {} tokens", args.prompt_tokens);
    }
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    for run in 0..args.runs {
        let mut cache = KvCache::default();
        let start = Instant::now();
        let logits = loaded.model.forward(&prompt, &mut cache, false)?;
        let mut next = argmax(&logits.get(0)?.to_vec1::<f32>()?);
        prefill.push(prompt.len() as f64 / start.elapsed().as_secs_f64());
        let start = Instant::now();
        for _ in 0..args.gen_tokens {
            let logits = loaded.model.forward(&[next], &mut cache, false)?;
            next = argmax(&logits.get(0)?.to_vec1::<f32>()?);
        }
        decode.push(args.gen_tokens as f64 / start.elapsed().as_secs_f64());
        eprintln!("run {}/{}: prefill {:.1} tok/s, decode {:.1} tok/s", run + 1, args.runs, prefill[run], decode[run]);
    }
    let ours = Speed { prefill_tps: median(prefill), decode_tps: median(decode) };
    let peer = match &args.llamacpp_python {
        Some(python) => Some(llamacpp(python, args, &prompt)?),
        None => None,
    };
    println!(
        "model: {}  prompt: {} tokens  generated: {} tokens  threads: {}  runs: {} (median)",
        args.model.display(),
        prompt.len(),
        args.gen_tokens,
        args.threads,
        args.runs
    );
    println!("| engine | prefill tok/s | decode tok/s |");
    println!("|---|---|---|");
    println!("| llmops (candle, weights {}) | {:.1} | {:.1} |", args.weights, ours.prefill_tps, ours.decode_tps);
    if let Some(peer) = peer {
        println!("| llama.cpp (llama-cpp-python) | {:.1} | {:.1} |", peer.prefill_tps, peer.decode_tps);
        println!(
            "| ratio llmops / llama.cpp | {:.2}x | {:.2}x |",
            ours.prefill_tps / peer.prefill_tps,
            ours.decode_tps / peer.decode_tps
        );
    }
    Ok(())
}

/// The same measurement in llama.cpp: the same token ids, evaluated in one batch, then
/// greedy decoding one token at a time.
const LLAMACPP_SCRIPT: &str = r#"
import json, sys, time, statistics
import llama_cpp
req = json.load(sys.stdin)
llm = llama_cpp.Llama(model_path=req["model"], n_ctx=2048, n_threads=req["threads"], n_threads_batch=req["threads"],
                      n_batch=512, verbose=False)
prefill, decode = [], []
for _ in range(req["runs"]):
    llm.reset()
    t = time.perf_counter()
    llm.eval(req["prompt"])
    prefill.append(len(req["prompt"]) / (time.perf_counter() - t))
    t = time.perf_counter()
    for _ in range(req["gen"]):
        logits = llm.scores[llm.n_tokens - 1]
        llm.eval([int(logits.argmax())])
    decode.append(req["gen"] / (time.perf_counter() - t))
print(json.dumps({"prefill_tps": statistics.median(prefill), "decode_tps": statistics.median(decode)}))
"#;

fn llamacpp(python: &PathBuf, args: &BenchArgs, prompt: &[u32]) -> Result<Speed> {
    let model = args.model.canonicalize()?;
    let request = serde_json::json!({
        "model": model, "threads": args.threads, "runs": args.runs, "gen": args.gen_tokens, "prompt": prompt,
    });
    let mut child = Command::new(python)
        .args(["-c", LLAMACPP_SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", python.display()))?;
    child.stdin.take().context("stdin")?.write_all(request.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("llama.cpp benchmark failed ({})", out.status);
    }
    let line = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(line.trim().lines().last().unwrap_or_default())
        .with_context(|| format!("reading llama.cpp's result: {line}"))
}
