//! Loading a model, its tokenizer and its chat template from a GGUF file or an HF
//! directory. Every mode (serve, finetune, eval, prepare's token counting) loads here.

use std::collections::HashMap;
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

struct Gguf<'a> {
    content: gguf_file::Content,
    file: std::fs::File,
    device: &'a Device,
    path: &'a Path,
}

impl Gguf<'_> {
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

    fn u32(&self, key: &str) -> Result<usize> {
        let v = self.content.metadata.get(key).with_context(|| format!("GGUF metadata {key} is missing"))?;
        Ok(v.to_u32().or_else(|_| v.to_u64().map(|x| x as u32))? as usize)
    }

    fn f32_or(&self, key: &str, default: f32) -> f32 {
        self.content.metadata.get(key).and_then(|v| v.to_f32().ok()).unwrap_or(default)
    }
}

fn load_gguf(path: &Path, device: &Device, weights: WeightFormat) -> Result<LoadedModel> {
    let mut file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let content = gguf_file::Content::read(&mut file)
        .map_err(|e| anyhow::anyhow!("{} is not a valid GGUF file: {e}", path.display()))?;
    let mut g = Gguf { content, file, device, path };
    let arch_name = g
        .content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .context("GGUF metadata general.architecture is missing")?;
    let arch = match arch_name.as_str() {
        "llama" | "mistral" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        other => bail!(
            "{}: architecture {other:?} is not supported; supported are Llama-family (llama, mistral) and qwen2",
            path.display()
        ),
    };
    let a = arch_name.as_str();
    let hidden_size = g.u32(&format!("{a}.embedding_length"))?;
    let num_heads = g.u32(&format!("{a}.attention.head_count"))?;
    let num_kv_heads = g.u32(&format!("{a}.attention.head_count_kv")).unwrap_or(num_heads);
    let tokenizer = TextTokenizer::from_gguf(&g.content)?;
    let embed_q = g.qtensor("token_embd.weight")?;
    let embed = embed_q.dequantize(device)?;
    let config = ModelConfig {
        arch,
        hidden_size,
        intermediate_size: g.u32(&format!("{a}.feed_forward_length"))?,
        num_layers: g.u32(&format!("{a}.block_count"))?,
        num_heads,
        num_kv_heads,
        head_dim: g.u32(&format!("{a}.rope.dimension_count")).unwrap_or(hidden_size / num_heads),
        rms_norm_eps: f64::from(g.f32_or(&format!("{a}.attention.layer_norm_rms_epsilon"), 1e-5)),
        rope_theta: g.f32_or(&format!("{a}.rope.freq_base"), 10_000.0),
        context_length: g.u32(&format!("{a}.context_length")).unwrap_or(4096),
        vocab_size: embed.dim(0)?,
        // llama.cpp permutes Llama q/k weights for its interleaved rotary layout; Qwen2
        // GGUF files keep the HF layout.
        interleaved_rope: arch == Arch::Llama,
        f16_kv_rounding: weights != WeightFormat::Hybrid,
    };
    check_tokenizer(&tokenizer, config.vocab_size)?;
    let mut blocks = Vec::with_capacity(config.num_layers);
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
    let chat_template = g.content.metadata.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned();
    let model = LlamaModel::new(config, embed, blocks, norm, lm_head, device)?;
    Ok(LoadedModel { model, tokenizer, chat_template, path: path.to_path_buf() })
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
        let mut file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| anyhow::anyhow!("{} is not a valid GGUF file: {e}", path.display()))?;
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
