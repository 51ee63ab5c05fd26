//! Loading a model, its tokenizer and its chat template from a GGUF file or an HF
//! directory. Every mode (serve, finetune, eval, prepare's token counting) loads here.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::quantized::{QMatMul, QTensor, gguf_file};
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::model::{Arch, Block, Linear, LlamaModel, ModelConfig};
use super::tokenizer::TextTokenizer;

/// How the weights are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// As stored: GGUF weights stay quantized, HF weights are dense.
    #[default]
    AsStored,
    /// Every weight dequantized to dense floating point.
    Dense,
    /// Quantized weights for decoding plus a dense copy for prompt processing (GGUF on
    /// CPU); costs the memory of both.
    Hybrid,
}

/// A loaded model with everything needed to talk to it.
#[derive(Debug)]
pub struct LoadedModel {
    /// The decoder.
    pub model: LlamaModel,
    /// Its tokenizer.
    pub tokenizer: TextTokenizer,
    /// Its chat template (Jinja), when the model ships one.
    pub chat_template: Option<String>,
    /// The file or directory it was loaded from.
    pub path: PathBuf,
}

/// Finds what kind of model `path` holds and loads it.
pub fn load(path: &Path, device: &Device, weights: WeightFormat) -> Result<LoadedModel> {
    let meta = std::fs::metadata(path).with_context(|| format!("model not found: {}", path.display()))?;
    if meta.is_file() {
        return load_gguf(path, device, weights);
    }
    if path.join("config.json").is_file() {
        return load_hf(path, device);
    }
    let ggufs: Vec<PathBuf> = std::fs::read_dir(path)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    match ggufs.as_slice() {
        [one] => load_gguf(one, device, weights),
        [] => bail!("{} holds neither config.json (an HF model) nor a .gguf file", path.display()),
        _ => bail!("{} holds several .gguf files; name the one to load", path.display()),
    }
}

struct Gguf<'a, R> {
    content: gguf_file::Content,
    file: R,
    device: &'a Device,
    path: &'a Path,
}

impl<R: Read + Seek> Gguf<'_, R> {
    fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    fn qtensor(&mut self, name: &str) -> Result<QTensor> {
        self.content
            .tensor(&mut self.file, name, self.device)
            .with_context(|| format!("{}: reading tensor {name}", self.path.display()))
    }

    fn dense(&mut self, name: &str) -> Result<Tensor> {
        Ok(self.qtensor(name)?.dequantize(self.device)?)
    }

    fn linear(&mut self, name: &str, weights: WeightFormat) -> Result<Linear> {
        self.stacked(&[name.to_string()], weights)
    }

    /// Several projections of the same input stacked by rows into one layer. GGUF stores
    /// each row as whole blocks, so stacking the raw bytes stacks the rows exactly.
    fn stacked(&mut self, names: &[String], weights: WeightFormat) -> Result<Linear> {
        let mut parts = Vec::with_capacity(names.len());
        for name in names {
            let mut q = self.qtensor(&format!("{name}.weight"))?;
            if weights == WeightFormat::Hybrid {
                q = for_cpu_decoding(q, self.device)?;
            }
            parts.push(q);
        }
        let mut biases = Vec::new();
        for name in names {
            let bias_name = format!("{name}.bias");
            if self.has(&bias_name) {
                biases.push(self.dense(&bias_name)?);
            }
        }
        let bias = match biases.len() {
            0 => None,
            n if n == names.len() => Some(Tensor::cat(&biases, 0)?),
            _ => bail!("{}: only some of {names:?} have a bias", self.path.display()),
        };
        let stacked = if parts.len() == 1 { parts.remove(0) } else { self.stack_rows(names, &parts)? };
        let weight = match weights {
            WeightFormat::AsStored | WeightFormat::Hybrid => QMatMul::from_qtensor(stacked)?,
            WeightFormat::Dense => QMatMul::Tensor(stacked.dequantize(self.device)?),
        };
        let linear = Linear::new(weight, bias);
        if weights == WeightFormat::Hybrid { linear.with_dense() } else { Ok(linear) }
    }

    fn stack_rows(&self, names: &[String], parts: &[QTensor]) -> Result<QTensor> {
        let dtype = parts[0].dtype();
        let (_, inner) = parts[0].shape().dims2()?;
        let mut rows = 0;
        let mut bytes = Vec::new();
        for (name, part) in names.iter().zip(parts) {
            let (r, k) = part.shape().dims2()?;
            if part.dtype() != dtype || k != inner {
                bail!("{}: {name} cannot be stacked with {}: different type or width", self.path.display(), names[0]);
            }
            rows += r;
            bytes.extend_from_slice(&part.data()?);
        }
        let storage = candle_core::quantized::QStorage::from_data(std::borrow::Cow::Owned(bytes), self.device, dtype)?;
        Ok(QTensor::new(storage, (rows, inner))?)
    }
}

/// The most positions a model may declare: its rotary tables are computed for every one
/// when it loads, so a header's number must not be able to ask for unbounded memory. The
/// Llama and Qwen2 families ship at most 128k (some fine-tunes 1M).
pub const MAX_CONTEXT_LENGTH: usize = 1 << 21;

/// What a GGUF file's header says, read and checked without reading any weights.
#[derive(Debug)]
pub struct GgufHeader {
    /// The raw header: metadata and where each tensor lies.
    pub content: gguf_file::Content,
    /// The model's shapes and constants (its `f16_kv_rounding` is the default for
    /// [`WeightFormat::AsStored`]).
    pub config: ModelConfig,
    /// Its tokenizer.
    pub tokenizer: TextTokenizer,
    /// Its chat template, when it ships one.
    pub chat_template: Option<String>,
}

/// Reads a GGUF header from `reader` (`name` names the file in errors) and checks that
/// the model it describes can be loaded: a supported architecture, shapes that fit
/// together, a tokenizer no larger than the embedding, and every tensor's bytes inside
/// the file. Never panics and never allocates more than the file's size on its behalf.
pub fn read_gguf_header<R: Read + Seek>(reader: &mut R, name: &Path) -> Result<GgufHeader> {
    let content = read_content(reader, name)?;
    let file_size = reader.seek(SeekFrom::End(0)).with_context(|| format!("reading {}", name.display()))?;
    check_tensor_extents(&content, file_size, name)?;
    let arch_name = match content.metadata.get("general.architecture") {
        Some(v) => {
            v.to_string().with_context(|| format!("{}: general.architecture is not a string", name.display()))?
        }
        None => bail!("{}: GGUF metadata general.architecture is missing", name.display()),
    };
    let arch = match arch_name.as_str() {
        "llama" | "mistral" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        other => bail!(
            "{}: architecture {other:?} is not supported; supported are Llama-family (llama, mistral) and qwen2",
            name.display()
        ),
    };
    let a = arch_name.as_str();
    let meta = |key: &str| metadata_usize(&content, &format!("{a}.{key}"), name);
    let hidden_size = meta("embedding_length")?.context("GGUF metadata embedding_length is missing")?;
    let num_heads = meta("attention.head_count")?.context("GGUF metadata attention.head_count is missing")?;
    let num_kv_heads = meta("attention.head_count_kv")?.unwrap_or(num_heads);
    if num_heads == 0 || num_kv_heads == 0 || hidden_size == 0 {
        bail!(
            "{}: {a}.embedding_length ({hidden_size}), {a}.attention.head_count ({num_heads}) and \
             {a}.attention.head_count_kv ({num_kv_heads}) must all be above 0",
            name.display()
        );
    }
    if !num_heads.is_multiple_of(num_kv_heads) {
        bail!(
            "{}: {a}.attention.head_count ({num_heads}) is not a multiple of {a}.attention.head_count_kv ({num_kv_heads})",
            name.display()
        );
    }
    let head_dim = meta("rope.dimension_count")?.unwrap_or(hidden_size / num_heads);
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        bail!("{}: the attention head width {head_dim} must be even and above 0", name.display());
    }
    let context_length = meta("context_length")?.unwrap_or(4096);
    if context_length == 0 || context_length > MAX_CONTEXT_LENGTH {
        bail!("{}: {a}.context_length {context_length} is not within 1..={MAX_CONTEXT_LENGTH}", name.display());
    }
    let num_layers = meta("block_count")?.context("GGUF metadata block_count is missing")?;
    // Each layer needs its own tensors, so a count beyond them is refused before anything
    // is sized by it.
    if num_layers == 0 || num_layers > content.tensor_infos.len() {
        bail!(
            "{}: {a}.block_count {num_layers} does not fit the {} tensors in the file",
            name.display(),
            content.tensor_infos.len()
        );
    }
    let intermediate_size = meta("feed_forward_length")?.context("GGUF metadata feed_forward_length is missing")?;
    let vocab_size = match content.tensor_infos.get("token_embd.weight").map(|t| t.shape.dims()) {
        Some([rows, width]) if *width == hidden_size => *rows,
        Some(dims) => {
            bail!("{}: token_embd.weight has shape {dims:?}, expected [vocabulary, {hidden_size}]", name.display())
        }
        None => bail!("{}: tensor token_embd.weight is missing", name.display()),
    };
    let tokenizer = TextTokenizer::from_gguf(&content).with_context(|| format!("{}: the tokenizer", name.display()))?;
    let config = ModelConfig {
        arch,
        hidden_size,
        intermediate_size,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: f64::from(metadata_f32(&content, &format!("{a}.attention.layer_norm_rms_epsilon"), 1e-5, name)?),
        rope_theta: metadata_f32(&content, &format!("{a}.rope.freq_base"), 10_000.0, name)?,
        context_length,
        vocab_size,
        // llama.cpp permutes Llama q/k weights for its interleaved rotary layout; Qwen2
        // GGUF files keep the HF layout.
        interleaved_rope: arch == Arch::Llama,
        f16_kv_rounding: true,
    };
    check_tokenizer(&tokenizer, config.vocab_size)?;
    check_shapes(&content, &config, name)?;
    let chat_template = content.metadata.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned();
    Ok(GgufHeader { content, config, tokenizer, chat_template })
}

/// Every weight the loader reads has the shape the header's numbers give it, so a
/// model that loads has layers that fit together.
fn check_shapes(content: &gguf_file::Content, c: &ModelConfig, name: &Path) -> Result<()> {
    // Saturating: the header's numbers are unchecked here, and a product that does not
    // fit matches no tensor anyway.
    let (q, kv) = (c.num_heads.saturating_mul(c.head_dim), c.num_kv_heads.saturating_mul(c.head_dim));
    let (hidden, inter) = (c.hidden_size, c.intermediate_size);
    let mut expected: Vec<(String, Vec<usize>, bool)> = vec![
        ("output_norm.weight".into(), vec![hidden], true),
        ("output.weight".into(), vec![c.vocab_size, hidden], false),
    ];
    for i in 0..c.num_layers {
        let p = format!("blk.{i}");
        for (tensor, shape, required) in [
            ("attn_norm.weight", vec![hidden], true),
            ("attn_q.weight", vec![q, hidden], true),
            ("attn_k.weight", vec![kv, hidden], true),
            ("attn_v.weight", vec![kv, hidden], true),
            ("attn_q.bias", vec![q], false),
            ("attn_k.bias", vec![kv], false),
            ("attn_v.bias", vec![kv], false),
            ("attn_output.weight", vec![hidden, q], true),
            ("attn_output.bias", vec![hidden], false),
            ("ffn_norm.weight", vec![hidden], true),
            ("ffn_gate.weight", vec![inter, hidden], true),
            ("ffn_up.weight", vec![inter, hidden], true),
            ("ffn_gate.bias", vec![inter], false),
            ("ffn_up.bias", vec![inter], false),
            ("ffn_down.weight", vec![hidden, inter], true),
            ("ffn_down.bias", vec![hidden], false),
        ] {
            expected.push((format!("{p}.{tensor}"), shape, required));
        }
    }
    for (tensor, shape, required) in expected {
        match content.tensor_infos.get(&tensor) {
            Some(info) if info.shape.dims() != shape.as_slice() => bail!(
                "{}: tensor {tensor} has shape {:?}, but the header's sizes give {shape:?}",
                name.display(),
                info.shape.dims()
            ),
            None if required => bail!("{}: tensor {tensor} is missing", name.display()),
            _ => {}
        }
    }
    Ok(())
}

/// candle's GGUF reader divides by the header's `general.alignment` unchecked; a zero
/// there (or any other fault of that reader) is a bad file, not a crash of the worker.
fn read_content<R: Read + Seek>(reader: &mut R, name: &Path) -> Result<gguf_file::Content> {
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| gguf_file::Content::read(reader)));
    match read {
        Ok(Ok(content)) => Ok(content),
        Ok(Err(e)) => bail!("{} is not a valid GGUF file: {e}", name.display()),
        Err(_) => {
            bail!("{} is not a valid GGUF file: its header is malformed (check general.alignment)", name.display())
        }
    }
}

/// Every tensor's shape, type and offset must describe bytes inside the file, computed
/// without overflow: candle multiplies the dimensions unchecked and allocates what they
/// say before it reads.
fn check_tensor_extents(content: &gguf_file::Content, file_size: u64, name: &Path) -> Result<()> {
    for (tensor, info) in &content.tensor_infos {
        let dims = info.shape.dims();
        let elements = dims.iter().try_fold(1usize, |n, d| n.checked_mul(*d));
        let block = info.ggml_dtype.block_size();
        let bytes = elements
            .filter(|n| n.is_multiple_of(block))
            .and_then(|n| (n / block).checked_mul(info.ggml_dtype.type_size()))
            .and_then(|b| u64::try_from(b).ok());
        let Some(bytes) = bytes else {
            bail!(
                "{}: tensor {tensor} has shape {dims:?}, which is not a whole number of {:?} blocks of {block}",
                name.display(),
                info.ggml_dtype
            );
        };
        let end = content.tensor_data_offset.checked_add(info.offset).and_then(|start| start.checked_add(bytes));
        if end.is_none_or(|end| end > file_size) {
            bail!(
                "{}: tensor {tensor} ({bytes} bytes at offset {}) lies beyond the end of the file ({file_size} bytes)",
                name.display(),
                info.offset
            );
        }
    }
    Ok(())
}

/// An unsigned integer of the metadata, refused when it has another type or does not
/// fit; `None` when the key is absent.
fn metadata_usize(content: &gguf_file::Content, key: &str, name: &Path) -> Result<Option<usize>> {
    use gguf_file::Value as V;
    let Some(v) = content.metadata.get(key) else { return Ok(None) };
    let n: Option<u64> = match v {
        V::U8(x) => Some(u64::from(*x)),
        V::U16(x) => Some(u64::from(*x)),
        V::U32(x) => Some(u64::from(*x)),
        V::U64(x) => Some(*x),
        V::I8(x) => u64::try_from(*x).ok(),
        V::I16(x) => u64::try_from(*x).ok(),
        V::I32(x) => u64::try_from(*x).ok(),
        V::I64(x) => u64::try_from(*x).ok(),
        _ => None,
    };
    match n.and_then(|n| u32::try_from(n).ok()) {
        Some(n) => Ok(Some(n as usize)),
        None => bail!("{}: GGUF metadata {key} must be an unsigned 32-bit integer, got {v:?}", name.display()),
    }
}

/// A positive finite float of the metadata, `default` when the key is absent.
fn metadata_f32(content: &gguf_file::Content, key: &str, default: f32, name: &Path) -> Result<f32> {
    use gguf_file::Value as V;
    let Some(v) = content.metadata.get(key) else { return Ok(default) };
    match v {
        V::F32(x) if x.is_finite() && *x > 0.0 => Ok(*x),
        V::F64(x) if x.is_finite() && *x > 0.0 && *x <= f64::from(f32::MAX) => Ok(*x as f32),
        _ => bail!("{}: GGUF metadata {key} must be a positive number, got {v:?}", name.display()),
    }
}

fn load_gguf(path: &Path, device: &Device, weights: WeightFormat) -> Result<LoadedModel> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    load_gguf_from(std::io::BufReader::new(file), path, device, weights)
}

/// Loads a model from GGUF bytes (`name` names them in errors and becomes the model's
/// path).
pub fn load_gguf_from<R: Read + Seek>(
    mut reader: R,
    name: &Path,
    device: &Device,
    weights: WeightFormat,
) -> Result<LoadedModel> {
    let header = read_gguf_header(&mut reader, name)?;
    let GgufHeader { content, mut config, tokenizer, chat_template } = header;
    config.f16_kv_rounding = weights != WeightFormat::Hybrid;
    let mut g = Gguf { content, file: reader, device, path: name };
    let embed_q = g.qtensor("token_embd.weight")?;
    let embed = embed_q.dequantize(device)?;
    let mut blocks = Vec::new();
    for i in 0..config.num_layers {
        let p = format!("blk.{i}");
        blocks.push(Block {
            attn_norm: g.dense(&format!("{p}.attn_norm.weight"))?,
            qkv: g.stacked(&[format!("{p}.attn_q"), format!("{p}.attn_k"), format!("{p}.attn_v")], weights)?,
            o: g.linear(&format!("{p}.attn_output"), weights)?,
            ffn_norm: g.dense(&format!("{p}.ffn_norm.weight"))?,
            gate_up: g.stacked(&[format!("{p}.ffn_gate"), format!("{p}.ffn_up")], weights)?,
            down: g.linear(&format!("{p}.ffn_down"), weights)?,
        });
    }
    let norm = g.dense("output_norm.weight")?;
    let lm_head = if g.has("output.weight") {
        g.linear("output", weights)?
    } else {
        // Tied embeddings: the output projection is the embedding matrix.
        match weights {
            WeightFormat::AsStored => Linear::new(QMatMul::from_qtensor(embed_q)?, None),
            WeightFormat::Hybrid => {
                Linear::new(QMatMul::from_qtensor(for_cpu_decoding(embed_q, device)?)?, None).with_dense()?
            }
            WeightFormat::Dense => Linear::new(QMatMul::Tensor(embed.clone()), None),
        }
    };
    let model = LlamaModel::new(config, embed, blocks, norm, lm_head, device)?;
    Ok(LoadedModel { model, tokenizer, chat_template, path: name.to_path_buf() })
}

/// Quantized types whose CPU dot products have no vectorised kernel in candle are
/// requantized to Q8_0 for decoding: its step is a fraction of theirs (it adds about 1/17
/// of a Q4_1 step of rounding) and its kernel is several times faster.
fn for_cpu_decoding(q: QTensor, device: &Device) -> Result<QTensor> {
    use candle_core::quantized::GgmlDType;
    Ok(match q.dtype() {
        GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 if device.is_cpu() => {
            QTensor::quantize(&q.dequantize(device)?, GgmlDType::Q8_0)?
        }
        _ => q,
    })
}

/// Undoes llama.cpp's reordering of a Llama q or k projection ([heads * head_dim, in]):
/// GGUF files store each head's rows interleaved for its rotary layout; HF (and PEFT)
/// keep the two rotary halves apart.
pub fn gguf_qk_to_hf(weight: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = weight.dims2()?;
    let head_dim = out / heads;
    Ok(weight.reshape((heads, head_dim / 2, 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))?)
}

fn check_tokenizer(tokenizer: &TextTokenizer, vocab_size: usize) -> Result<()> {
    let n = tokenizer.vocab_size();
    if n > vocab_size {
        bail!(
            "the tokenizer has {n} tokens but the model's embedding has only {vocab_size} rows: they do not belong together"
        );
    }
    Ok(())
}

/// The fields of an HF config.json this loader reads.
#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: f64,
    rope_theta: Option<f32>,
    max_position_embeddings: Option<usize>,
    vocab_size: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
}

/// Only the tokenizer of a GGUF file or an HF directory, without reading any weights
/// (for counting tokens).
pub fn load_tokenizer(path: &Path) -> Result<TextTokenizer> {
    let meta = std::fs::metadata(path).with_context(|| format!("model not found: {}", path.display()))?;
    if meta.is_file() {
        let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let content = read_content(&mut std::io::BufReader::new(file), path)?;
        return TextTokenizer::from_gguf(&content);
    }
    let tokenizer_path = path.join("tokenizer.json");
    if !tokenizer_path.is_file() {
        bail!("{} has no tokenizer.json", path.display());
    }
    let config: serde_json::Value = match std::fs::read_to_string(path.join("config.json")) {
        Ok(text) => serde_json::from_str(&text).with_context(|| format!("parsing {}/config.json", path.display()))?,
        Err(_) => serde_json::Value::Null,
    };
    let (tokenizer_config, _) = read_tokenizer_config(path)?;
    let add_bos = tokenizer_config.get("add_bos_token").and_then(|v| v.as_bool()).unwrap_or(false);
    let bos = ids(&config.get("bos_token_id").cloned()).first().copied();
    TextTokenizer::from_file(&tokenizer_path, bos, ids(&config.get("eos_token_id").cloned()), add_bos)
}

fn ids(value: &Option<serde_json::Value>) -> Vec<u32> {
    match value {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|v| v as u32).into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32).collect(),
        _ => Vec::new(),
    }
}

fn load_hf(dir: &Path, device: &Device) -> Result<LoadedModel> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path)?;
    let hf: HfConfig = serde_json::from_str(&text).with_context(|| format!("parsing {}", config_path.display()))?;
    let kind = hf
        .model_type
        .clone()
        .or_else(|| hf.architectures.as_ref().and_then(|a| a.first().cloned()))
        .unwrap_or_default();
    let arch = match kind.as_str() {
        "llama" | "mistral" | "LlamaForCausalLM" | "MistralForCausalLM" => Arch::Llama,
        "qwen2" | "Qwen2ForCausalLM" => Arch::Qwen2,
        other => bail!(
            "{}: model_type {other:?} is not supported; supported are llama, mistral and qwen2",
            config_path.display()
        ),
    };
    let dtype = if device.is_cuda() { DType::BF16 } else { DType::F32 };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{} has no *.safetensors weights", dir.display());
    }
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for file in &files {
        let loaded = candle_core::safetensors::load(file, device)
            .map_err(|e| anyhow::anyhow!("{} is not a valid safetensors file: {e}", file.display()))?;
        tensors.extend(loaded);
    }
    let mut take = |name: &str| -> Result<Tensor> {
        let t = tensors.remove(name).with_context(|| format!("{}: weight {name} is missing", dir.display()))?;
        Ok(t.to_dtype(dtype)?)
    };
    let head_dim = hf.head_dim.unwrap_or(hf.hidden_size / hf.num_attention_heads);
    let config = ModelConfig {
        arch,
        hidden_size: hf.hidden_size,
        intermediate_size: hf.intermediate_size,
        num_layers: hf.num_hidden_layers,
        num_heads: hf.num_attention_heads,
        num_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
        head_dim,
        rms_norm_eps: hf.rms_norm_eps,
        rope_theta: hf.rope_theta.unwrap_or(10_000.0),
        context_length: hf.max_position_embeddings.unwrap_or(4096),
        vocab_size: hf.vocab_size,
        interleaved_rope: false,
        f16_kv_rounding: true,
    };
    let embed = take("model.embed_tokens.weight")?;
    let mut blocks = Vec::with_capacity(config.num_layers);
    for i in 0..config.num_layers {
        let p = format!("model.layers.{i}");
        // Projections of the same input are stacked by rows (see Block).
        let mut linear = |names: &[&str], bias: bool| -> Result<Linear> {
            let weights: Vec<Tensor> = names.iter().map(|n| take(&format!("{p}.{n}.weight"))).collect::<Result<_>>()?;
            let bias = if bias {
                let biases: Vec<Tensor> =
                    names.iter().map(|n| take(&format!("{p}.{n}.bias"))).collect::<Result<_>>()?;
                Some(Tensor::cat(&biases, 0)?)
            } else {
                None
            };
            Ok(Linear::new(QMatMul::Tensor(Tensor::cat(&weights, 0)?), bias))
        };
        let qkv = linear(&["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], arch == Arch::Qwen2)?;
        let o = linear(&["self_attn.o_proj"], false)?;
        let gate_up = linear(&["mlp.gate_proj", "mlp.up_proj"], false)?;
        let down = linear(&["mlp.down_proj"], false)?;
        blocks.push(Block {
            attn_norm: take(&format!("{p}.input_layernorm.weight"))?,
            qkv,
            o,
            ffn_norm: take(&format!("{p}.post_attention_layernorm.weight"))?,
            gate_up,
            down,
        });
    }
    let norm = take("model.norm.weight")?;
    let lm_head = if hf.tie_word_embeddings {
        Linear::new(QMatMul::Tensor(embed.clone()), None)
    } else {
        Linear::new(QMatMul::Tensor(take("lm_head.weight")?), None)
    };
    let tokenizer_path = dir.join("tokenizer.json");
    if !tokenizer_path.is_file() {
        bail!("{} has no tokenizer.json", dir.display());
    }
    let (tokenizer_config, chat_template) = read_tokenizer_config(dir)?;
    let add_bos = tokenizer_config.get("add_bos_token").and_then(|v| v.as_bool()).unwrap_or(arch == Arch::Llama);
    let bos = ids(&hf.bos_token_id).first().copied();
    let tokenizer = TextTokenizer::from_file(&tokenizer_path, bos, ids(&hf.eos_token_id), add_bos)?;
    check_tokenizer(&tokenizer, config.vocab_size)?;
    let model = LlamaModel::new(config, embed, blocks, norm, lm_head, device)?;
    Ok(LoadedModel { model, tokenizer, chat_template, path: dir.to_path_buf() })
}

fn read_tokenizer_config(dir: &Path) -> Result<(serde_json::Map<String, serde_json::Value>, Option<String>)> {
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok((serde_json::Map::new(), None));
    }
    let value: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
        .with_context(|| format!("parsing {}", path.display()))?;
    let map = value.as_object().cloned().unwrap_or_default();
    let template = match map.get("chat_template") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        // A list of named templates: use the default one.
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .find(|t| t["name"] == "default")
            .or_else(|| list.first())
            .and_then(|t| t["template"].as_str().map(str::to_string)),
        _ => None,
    };
    Ok((map, template))
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use candle_core::quantized::gguf_file::Value;

    use super::*;
    use crate::engine::tiny::tiny_gguf;

    fn load_bytes(bytes: Vec<u8>) -> Result<LoadedModel> {
        load_gguf_from(Cursor::new(bytes), Path::new("fuzz.gguf"), &Device::Cpu, WeightFormat::AsStored)
    }

    fn refused(bytes: Vec<u8>) -> String {
        format!("{:#}", load_bytes(bytes).expect_err("must be refused"))
    }

    /// The tiny model with one metadata value replaced (or added).
    fn with_metadata(key: &str, value: Value) -> Vec<u8> {
        let bytes = tiny_gguf().expect("tiny gguf");
        let content = gguf_file::Content::read(&mut Cursor::new(&bytes)).expect("reads");
        let mut metadata: Vec<(String, Value)> =
            content.metadata.into_iter().filter(|(k, _)| k != key).collect::<Vec<_>>();
        metadata.push((key.to_string(), value));
        let mut reader = Cursor::new(&bytes);
        let tensors: Vec<(String, QTensor)> = content_tensors(&bytes, &mut reader);
        let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        let mut out = Cursor::new(Vec::new());
        gguf_file::write(&mut out, &metadata, &tensors).expect("writes");
        out.into_inner()
    }

    fn content_tensors(bytes: &[u8], reader: &mut Cursor<&Vec<u8>>) -> Vec<(String, QTensor)> {
        let content = gguf_file::Content::read(&mut Cursor::new(bytes)).expect("reads");
        let mut names: Vec<&String> = content.tensor_infos.keys().collect();
        names.sort();
        names.into_iter().map(|n| (n.clone(), content.tensor(reader, n, &Device::Cpu).expect("tensor"))).collect()
    }

    #[test]
    fn the_tiny_gguf_model_loads_from_memory() {
        let model = load_bytes(tiny_gguf().expect("tiny gguf")).expect("loads");
        let c = model.model.config();
        assert_eq!((c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.vocab_size), (8, 1, 2, 1, 5));
        assert!(model.chat_template.is_some());
    }

    /// A head count of 0 must not divide by zero (a panic) while sizing the heads.
    #[test]
    fn zero_heads_are_refused_not_divided_by() {
        let err = refused(with_metadata("llama.attention.head_count", Value::U32(0)));
        assert!(err.contains("must all be above 0"), "{err}");
        let err = refused(with_metadata("llama.attention.head_count_kv", Value::U32(0)));
        assert!(err.contains("must all be above 0"), "{err}");
    }

    /// candle's reader divides by `general.alignment` unchecked: a zero is a bad file.
    #[test]
    fn a_zero_alignment_is_a_bad_file_not_a_panic() {
        let err = refused(with_metadata("general.alignment", Value::U32(0)));
        assert!(err.contains("is not a valid GGUF file"), "{err}");
    }

    /// A block count of 4 billion must not reserve memory for every layer before
    /// reading the first.
    #[test]
    fn a_block_count_beyond_the_tensors_is_refused_before_sizing_anything() {
        let err = refused(with_metadata("llama.block_count", Value::U32(u32::MAX)));
        assert!(err.contains("block_count 4294967295 does not fit"), "{err}");
    }

    #[test]
    fn numbers_that_do_not_fit_or_have_the_wrong_type_are_refused() {
        let err = refused(with_metadata("llama.embedding_length", Value::U64(1 << 32 | 8)));
        assert!(err.contains("llama.embedding_length must be an unsigned 32-bit integer"), "{err}");
        let err = refused(with_metadata("llama.embedding_length", Value::String("8".into())));
        assert!(err.contains("llama.embedding_length must be an unsigned 32-bit integer"), "{err}");
        let err = refused(with_metadata("llama.context_length", Value::U32(u32::MAX)));
        assert!(err.contains("llama.context_length 4294967295 is not within"), "{err}");
        let err = refused(with_metadata("llama.rope.dimension_count", Value::U32(3)));
        assert!(err.contains("head width 3 must be even"), "{err}");
        let err = refused(with_metadata("llama.rope.freq_base", Value::F32(f32::NAN)));
        assert!(err.contains("llama.rope.freq_base must be a positive number"), "{err}");
    }

    #[test]
    fn sizes_that_do_not_match_the_tensors_are_refused() {
        let err = refused(with_metadata("llama.feed_forward_length", Value::U32(17)));
        assert!(err.contains("blk.0.ffn_gate.weight has shape [16, 8], but the header's sizes give [17, 8]"), "{err}");
        let err = refused(with_metadata("llama.embedding_length", Value::U32(16)));
        assert!(err.contains("token_embd.weight has shape [5, 8]"), "{err}");
    }

    /// A tensor whose declared shape and offset reach past the end of the file, or whose
    /// element count overflows, is refused before anything is allocated for it.
    #[test]
    fn tensors_beyond_the_file_are_refused() {
        let bytes = tiny_gguf().expect("tiny gguf");
        let truncated = bytes[..bytes.len() - 16].to_vec();
        let err = refused(truncated);
        assert!(err.contains("lies beyond the end of the file"), "{err}");
        // The last tensor's first dimension (v3: u64 per dimension) patched to 2^62.
        let content = gguf_file::Content::read(&mut Cursor::new(&bytes)).expect("reads");
        let info = content.tensor_infos.get("blk.0.ffn_down.weight").expect("tensor");
        let inner = (info.shape.dims()[1] as u64).to_le_bytes();
        let at = bytes.windows(8).position(|w| w == inner).expect("a dimension");
        let mut huge = bytes.clone();
        huge[at..at + 8].copy_from_slice(&(1u64 << 62).to_le_bytes());
        assert!(load_bytes(huge).is_err());
    }
}
