//! Loading: clear errors for what cannot be loaded, HF directories, and the GGUF and HF
//! paths computing the same model.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::{QTensor, gguf_file};
use candle_core::{DType, Device, IndexOp, Tensor};
use common::test_model;
use llmops_worker::engine::loader::gguf_qk_to_hf;
use llmops_worker::engine::model::KvCache;
use llmops_worker::engine::{GenerateRequest, SamplingParams, WeightFormat, generate, generate_batch, load};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("llmops-loader-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn load_error(path: &Path) -> String {
    format!("{:#}", load(path, &Device::Cpu, WeightFormat::AsStored).expect_err("must not load"))
}

#[test]
fn missing_corrupt_and_unsupported_models_are_clear_errors() {
    let dir = scratch("errors");
    assert!(load_error(&dir.join("nope.gguf")).contains("model not found"));
    assert!(load_error(&dir).contains("neither config.json"));

    let corrupt = dir.join("corrupt.gguf");
    std::fs::write(&corrupt, b"GGUF\x03\x00\x00\x00garbage").expect("write");
    let err = load_error(&corrupt);
    assert!(err.contains("is not a valid GGUF file"), "{err}");

    let gpt2 = dir.join("gpt2.gguf");
    let arch = gguf_file::Value::String("gpt2".into());
    let tensor = QTensor::quantize(
        &Tensor::zeros((4, 32), DType::F32, &Device::Cpu).expect("t"),
        candle_core::quantized::GgmlDType::F32,
    )
    .expect("q");
    let mut file = std::fs::File::create(&gpt2).expect("create");
    gguf_file::write(&mut file, &[("general.architecture", &arch)], &[("token_embd.weight", &tensor)])
        .expect("write gguf");
    drop(file);
    let err = load_error(&gpt2);
    assert!(err.contains("architecture \"gpt2\" is not supported"), "{err}");

    std::fs::write(dir.join("config.json"), r#"{"model_type": "bert"}"#).expect("write");
    assert!(load_error(&dir).contains("parsing"), "a config.json without the Llama fields is refused");
    std::fs::remove_dir_all(&dir).ok();
}

/// Writes an HF directory holding `tensors` with the SmolLM2 tokenizer.
fn write_hf(dir: &Path, config: serde_json::Value, tensors: &HashMap<String, Tensor>) {
    std::fs::write(dir.join("config.json"), config.to_string()).expect("config");
    candle_core::safetensors::save(tensors, dir.join("model.safetensors")).expect("safetensors");
    let gguf = load(&test_model(), &Device::Cpu, WeightFormat::AsStored).expect("test model");
    gguf.tokenizer.save(&dir.join("tokenizer.json")).expect("tokenizer");
    let template = serde_json::json!({"chat_template": gguf.chat_template, "add_bos_token": false});
    std::fs::write(dir.join("tokenizer_config.json"), template.to_string()).expect("tokenizer config");
}

/// A tiny random-initialised HF checkpoint of `model_type` (Qwen2 adds q/k/v biases)
/// loads, generates, and decodes in batches exactly as alone.
fn tiny_random_hf_model(model_type: &str) {
    let dir = scratch(model_type);
    let (hidden, inter, layers, heads, kv, vocab) = (32usize, 64usize, 2usize, 4usize, 2usize, 49152usize);
    let dev = Device::Cpu;
    let randn = |shape: (usize, usize)| Tensor::randn(0f32, 0.2, shape, &dev).expect("randn");
    let mut t = HashMap::new();
    t.insert("model.embed_tokens.weight".to_string(), randn((vocab, hidden)));
    t.insert("model.norm.weight".to_string(), Tensor::ones(hidden, DType::F32, &dev).expect("ones"));
    let hd = hidden / heads;
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        for (name, shape) in [
            ("self_attn.q_proj", (heads * hd, hidden)),
            ("self_attn.k_proj", (kv * hd, hidden)),
            ("self_attn.v_proj", (kv * hd, hidden)),
            ("self_attn.o_proj", (hidden, heads * hd)),
            ("mlp.gate_proj", (inter, hidden)),
            ("mlp.up_proj", (inter, hidden)),
            ("mlp.down_proj", (hidden, inter)),
        ] {
            t.insert(format!("{p}.{name}.weight"), randn(shape));
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            t.insert(format!("{p}.{norm}.weight"), Tensor::ones(hidden, DType::F32, &dev).expect("ones"));
        }
        if model_type == "qwen2" {
            for (name, width) in [("q_proj", heads * hd), ("k_proj", kv * hd), ("v_proj", kv * hd)] {
                let bias = Tensor::randn(0f32, 0.2, width, &dev).expect("randn");
                t.insert(format!("{p}.self_attn.{name}.bias"), bias);
            }
        }
    }
    let config = serde_json::json!({
        "model_type": model_type, "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 256, "vocab_size": vocab, "tie_word_embeddings": true,
        "bos_token_id": 1, "eos_token_id": 2
    });
    write_hf(&dir, config, &t);
    let model = load(&dir, &dev, WeightFormat::AsStored).expect("HF model loads");
    assert_eq!(model.model.config().num_layers, 2);
    assert!(model.chat_template.is_some());
    let requests: Vec<GenerateRequest> = ["Hello", "A longer prompt than the other one"]
        .iter()
        .map(|p| GenerateRequest {
            prompt: model.tokenizer.encode_prompt(p).expect("encodes"),
            max_tokens: 12,
            sampling: SamplingParams::default(),
            stop: vec![],
        })
        .collect();
    let together = generate_batch(&model, &requests).expect("batch");
    for (r, b) in requests.iter().zip(&together) {
        assert_eq!(generate(&model, r).expect("alone").tokens, b.tokens);
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_tiny_random_hf_llama_loads_and_generates() {
    tiny_random_hf_model("llama");
}

#[test]
fn a_tiny_random_hf_qwen2_loads_and_generates() {
    tiny_random_hf_model("qwen2");
}

#[test]
fn a_tokenizer_that_does_not_fit_the_model_is_refused() {
    let dir = scratch("mismatch");
    let dev = Device::Cpu;
    let (hidden, vocab) = (16usize, 1000usize);
    let mut t = HashMap::new();
    let zeros = |shape: (usize, usize)| Tensor::zeros(shape, DType::F32, &dev).expect("zeros");
    t.insert("model.embed_tokens.weight".to_string(), zeros((vocab, hidden)));
    t.insert("model.norm.weight".to_string(), Tensor::ones(hidden, DType::F32, &dev).expect("ones"));
    for (name, shape) in [
        ("self_attn.q_proj", (hidden, hidden)),
        ("self_attn.k_proj", (hidden, hidden)),
        ("self_attn.v_proj", (hidden, hidden)),
        ("self_attn.o_proj", (hidden, hidden)),
        ("mlp.gate_proj", (32, hidden)),
        ("mlp.up_proj", (32, hidden)),
        ("mlp.down_proj", (hidden, 32)),
    ] {
        t.insert(format!("model.layers.0.{name}.weight"), zeros(shape));
    }
    for norm in ["input_layernorm", "post_attention_layernorm"] {
        t.insert(format!("model.layers.0.{norm}.weight"), Tensor::ones(hidden, DType::F32, &dev).expect("ones"));
    }
    let config = serde_json::json!({
        "model_type": "llama", "hidden_size": hidden, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": vocab, "tie_word_embeddings": true
    });
    write_hf(&dir, config, &t);
    let err = load_error(&dir);
    assert!(err.contains("the tokenizer has 49152 tokens but the model's embedding has only 1000 rows"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// SmolLM2's GGUF weights, dequantized and written as an HF checkpoint (q/k un-permuted
/// to the HF layout), give the same logits through the HF path (split-half rotary) as
/// the GGUF file does through the GGUF path (interleaved rotary).
#[test]
fn gguf_and_hf_layouts_compute_the_same_model() {
    let dir = scratch("convert");
    let dev = Device::Cpu;
    let mut file = std::fs::File::open(test_model()).expect("model");
    let content = gguf_file::Content::read(&mut file).expect("gguf");
    let meta_u32 = |k: &str| content.metadata[k].to_u32().expect("u32") as usize;
    let (layers, heads, kv) = (
        meta_u32("llama.block_count"),
        meta_u32("llama.attention.head_count"),
        meta_u32("llama.attention.head_count_kv"),
    );
    let mut read =
        |name: &str| content.tensor(&mut file, name, &dev).expect(name).dequantize(&dev).expect("dequantize");
    let mut t = HashMap::new();
    t.insert("model.embed_tokens.weight".to_string(), read("token_embd.weight"));
    t.insert("model.norm.weight".to_string(), read("output_norm.weight"));
    for i in 0..layers {
        let (g, h) = (format!("blk.{i}"), format!("model.layers.{i}"));
        t.insert(
            format!("{h}.self_attn.q_proj.weight"),
            gguf_qk_to_hf(&read(&format!("{g}.attn_q.weight")), heads).expect("q"),
        );
        t.insert(
            format!("{h}.self_attn.k_proj.weight"),
            gguf_qk_to_hf(&read(&format!("{g}.attn_k.weight")), kv).expect("k"),
        );
        for (gn, hn) in [
            ("attn_v", "self_attn.v_proj"),
            ("attn_output", "self_attn.o_proj"),
            ("ffn_gate", "mlp.gate_proj"),
            ("ffn_up", "mlp.up_proj"),
            ("ffn_down", "mlp.down_proj"),
            ("attn_norm", "input_layernorm"),
            ("ffn_norm", "post_attention_layernorm"),
        ] {
            t.insert(format!("{h}.{hn}.weight"), read(&format!("{g}.{gn}.weight")));
        }
    }
    let hidden = meta_u32("llama.embedding_length");
    let config = serde_json::json!({
        "model_type": "llama", "hidden_size": hidden, "intermediate_size": meta_u32("llama.feed_forward_length"),
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "rms_norm_eps": content.metadata["llama.attention.layer_norm_rms_epsilon"].to_f32().expect("eps"),
        "rope_theta": content.metadata["llama.rope.freq_base"].to_f32().expect("theta"),
        "max_position_embeddings": 2048, "vocab_size": 49152, "tie_word_embeddings": true,
        "bos_token_id": 1, "eos_token_id": 2
    });
    write_hf(&dir, config, &t);
    drop(t);
    let hf = load(&dir, &dev, WeightFormat::AsStored).expect("HF copy loads");
    let gguf = load(&test_model(), &dev, WeightFormat::Dense).expect("GGUF dense");
    let prompt = gguf.tokenizer.encode_prompt("The lighthouse keeper climbed the stairs at dusk").expect("encodes");
    let a = gguf.model.forward(&prompt, &mut KvCache::default(), true).expect("gguf logits");
    let b = hf.model.forward(&prompt, &mut KvCache::default(), true).expect("hf logits");
    let diff = (a - &b).expect("sub").abs().expect("abs").max_all().expect("max").to_scalar::<f32>().expect("scalar");
    let scale = b.abs().expect("abs").max_all().expect("max").to_scalar::<f32>().expect("scalar");
    assert!(diff < 1e-3 * scale.max(1.0), "logits differ by {diff} (scale {scale})");
    assert_eq!(b.i(prompt.len() - 1).expect("row").argmax(0).expect("argmax").to_scalar::<u32>().expect("id"), {
        let a = gguf.model.forward(&prompt, &mut KvCache::default(), false).expect("logits");
        a.i(0).expect("row").argmax(0).expect("argmax").to_scalar::<u32>().expect("id")
    });
    std::fs::remove_dir_all(&dir).ok();
}
