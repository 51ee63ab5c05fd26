//! A tiny Llama (2 layers, width 64) with seeded random weights in HF layout, carrying a
//! real model's tokenizer and chat template: training, resuming and serving run on it in
//! seconds, so tests and demos of the whole pipeline need no large download.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::json;

use super::LoadedModel;

/// Writes the tiny Llama into `dir` (created) with `tokenizer_of`'s tokenizer, chat
/// template and vocabulary; the same seed writes the same weights. Returns `dir`.
pub fn write_tiny_llama(dir: &Path, tokenizer_of: &LoadedModel, seed: u64) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    tokenizer_of.tokenizer.save(&dir.join("tokenizer.json"))?;
    let mut config = json!({"add_bos_token": false});
    if let Some(template) = &tokenizer_of.chat_template {
        config["chat_template"] = json!(template);
    }
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string())?;
    let vocab = tokenizer_of.tokenizer.vocab_size().max(tokenizer_of.model.config().vocab_size);
    let (hidden, inter, layers, heads, kv, head_dim) = (64, 128, 2, 4, 2, 16);
    let bos = tokenizer_of.tokenizer.bos.unwrap_or(1);
    let eos = tokenizer_of.tokenizer.eos.first().copied().unwrap_or(2);
    std::fs::write(
        dir.join("config.json"),
        json!({
            "model_type": "llama", "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "max_position_embeddings": 512, "vocab_size": vocab, "tie_word_embeddings": true,
            "bos_token_id": bos, "eos_token_id": eos
        })
        .to_string(),
    )?;
    let mut rng = super::sampling::SplitMix64(seed);
    let mut randn = |shape: (usize, usize), std: f32| -> Result<Tensor> {
        let values: Vec<f32> = (0..shape.0 * shape.1).map(|_| (rng.uniform() - 0.5) * 2.0 * std * 1.7).collect();
        Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
    };
    let ones = || Tensor::ones(hidden, DType::F32, &Device::Cpu);
    let mut t = HashMap::new();
    // Embeddings large enough that the tied output head can express confident predictions.
    t.insert("model.embed_tokens.weight".to_string(), randn((vocab, hidden), 0.5)?);
    t.insert("model.norm.weight".to_string(), ones()?);
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for (name, shape) in [
            ("self_attn.q_proj", (heads * head_dim, hidden)),
            ("self_attn.k_proj", (kv * head_dim, hidden)),
            ("self_attn.v_proj", (kv * head_dim, hidden)),
            ("self_attn.o_proj", (hidden, heads * head_dim)),
            ("mlp.gate_proj", (inter, hidden)),
            ("mlp.up_proj", (inter, hidden)),
            ("mlp.down_proj", (hidden, inter)),
        ] {
            t.insert(format!("{p}.{name}.weight"), randn(shape, 0.08)?);
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            t.insert(format!("{p}.{norm}.weight"), ones()?);
        }
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors"))?;
    Ok(dir.to_path_buf())
}

/// The tiny GGUF model's chat template (ChatML).
const TINY_CHAT_TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// The bytes of a complete GGUF Llama (1 layer, width 8, 2 query heads sharing 1 key/value
/// head, 5 tokens of which 2 are ChatML markers), about 4 KB: the smallest file every
/// step of the GGUF loader accepts. Its weights are a fixed ramp, not trained.
pub fn tiny_gguf() -> Result<Vec<u8>> {
    use candle_core::quantized::{GgmlDType, QTensor, gguf_file::Value};
    let (hidden, inter, heads, kv, head_dim) = (8usize, 16usize, 2usize, 1usize, 4usize);
    let tokens = ["a", "b", "ab", "<|im_start|>", "<|im_end|>"];
    let mut next = 0f32;
    let mut tensor = |shape: &[usize]| -> Result<QTensor> {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| {
                next += 1.0;
                (next * 0.37).sin() * 0.1
            })
            .collect();
        Ok(QTensor::quantize(&Tensor::from_vec(values, shape, &Device::Cpu)?, GgmlDType::F32)?)
    };
    let mut tensors = vec![
        ("token_embd.weight".to_string(), tensor(&[tokens.len(), hidden])?),
        ("output_norm.weight".to_string(), tensor(&[hidden])?),
    ];
    for (name, shape) in [
        ("attn_norm.weight", vec![hidden]),
        ("attn_q.weight", vec![heads * head_dim, hidden]),
        ("attn_k.weight", vec![kv * head_dim, hidden]),
        ("attn_v.weight", vec![kv * head_dim, hidden]),
        ("attn_output.weight", vec![hidden, heads * head_dim]),
        ("ffn_norm.weight", vec![hidden]),
        ("ffn_gate.weight", vec![inter, hidden]),
        ("ffn_up.weight", vec![inter, hidden]),
        ("ffn_down.weight", vec![hidden, inter]),
    ] {
        tensors.push((format!("blk.0.{name}"), tensor(&shape)?));
    }
    let u32_of = |n: usize| Value::U32(n as u32);
    let metadata = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.embedding_length", u32_of(hidden)),
        ("llama.feed_forward_length", u32_of(inter)),
        ("llama.block_count", u32_of(1)),
        ("llama.attention.head_count", u32_of(heads)),
        ("llama.attention.head_count_kv", u32_of(kv)),
        ("llama.rope.dimension_count", u32_of(head_dim)),
        ("llama.context_length", u32_of(64)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.rope.freq_base", Value::F32(10_000.0)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("smollm".into())),
        ("tokenizer.ggml.tokens", Value::Array(tokens.iter().map(|t| Value::String((*t).into())).collect())),
        ("tokenizer.ggml.token_type", Value::Array([1, 1, 1, 3, 3].into_iter().map(Value::I32).collect())),
        ("tokenizer.ggml.merges", Value::Array(vec![Value::String("a b".into())])),
        ("tokenizer.ggml.bos_token_id", u32_of(3)),
        ("tokenizer.ggml.eos_token_id", u32_of(4)),
        ("tokenizer.chat_template", Value::String(TINY_CHAT_TEMPLATE.into())),
    ];
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut bytes = std::io::Cursor::new(Vec::new());
    candle_core::quantized::gguf_file::write(&mut bytes, &metadata, &tensors)?;
    Ok(bytes.into_inner())
}
