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
