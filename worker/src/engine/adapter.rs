//! LoRA adapters in PEFT's layout (`adapter_config.json` + `adapter_model.safetensors`),
//! applied on top of a loaded base model without changing its weights, so one process
//! serves the base model and any number of adapters at once.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Tensor};
use serde::Deserialize;

use super::model::{LlamaModel, ModelConfig};

/// The projections a LoRA adapter may target, in PEFT's names.
pub const TARGET_MODULES: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// The part of `adapter_config.json` this loader reads.
#[derive(Debug, Clone, Deserialize)]
pub struct AdapterConfig {
    /// Rank.
    pub r: usize,
    /// Scaling numerator: the update is multiplied by `lora_alpha / r`.
    pub lora_alpha: f64,
    /// Modules the adapter changes.
    pub target_modules: TargetModules,
    /// Scale by `lora_alpha / sqrt(r)` instead (rank-stabilised LoRA).
    #[serde(default)]
    pub use_rslora: bool,
    /// The base model it was trained on, as its trainer named it.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// PEFT's adapter type; only "LORA" is understood.
    #[serde(default)]
    pub peft_type: Option<String>,
}

/// PEFT writes target modules as a list or as one regular expression.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Module names.
    List(Vec<String>),
    /// A pattern (not supported: the adapter's tensors name the modules anyway).
    Pattern(String),
}

/// One low-rank update `scale * B A` of a (possibly stacked) projection, with the scale
/// folded into `b`. Stacked projections (q/k/v, gate/up) get their parts' ranks stacked
/// and a block-diagonal `b`, so a step needs two products per projection.
#[derive(Debug)]
pub struct LoraPair {
    /// [rank, in]
    a: Tensor,
    /// [out, rank]
    b: Tensor,
}

impl LoraPair {
    /// The update for rows `x` ([n, in]).
    pub(crate) fn delta(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.a.t()?)?.matmul(&self.b.t()?)?)
    }
}

/// The updates of one decoder block.
#[derive(Debug, Default)]
pub struct AdapterLayer {
    pub(crate) qkv: Option<LoraPair>,
    pub(crate) o: Option<LoraPair>,
    pub(crate) gate_up: Option<LoraPair>,
    pub(crate) down: Option<LoraPair>,
}

/// A loaded adapter, ready to be applied to the base model it was checked against.
#[derive(Debug)]
pub struct Adapter {
    /// Its configuration.
    pub config: AdapterConfig,
    /// sha256 of the base model it was trained on, when its manifest records one.
    pub base_sha256: Option<String>,
    pub(crate) layers: Vec<AdapterLayer>,
}

/// The parts of a finetune output's `manifest.json` an adapter check reads.
#[derive(Debug, Deserialize)]
struct AdapterManifest {
    #[serde(default)]
    inputs: BTreeMap<String, ManifestInput>,
}

#[derive(Debug, Deserialize)]
struct ManifestInput {
    #[serde(default)]
    sha256: Option<String>,
}

impl Adapter {
    /// Loads the adapter in `dir` for `model`. An adapter trained on another base model
    /// is refused: by the base digest its manifest records, when `base_sha256` is known,
    /// and always by the shapes of its tensors.
    pub fn load(dir: &Path, model: &LlamaModel, base_sha256: Option<&str>) -> Result<Self> {
        let config_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("{} is not a LoRA adapter: reading adapter_config.json", dir.display()))?;
        let config: AdapterConfig =
            serde_json::from_str(&text).with_context(|| format!("{} does not parse", config_path.display()))?;
        if let Some(kind) = config.peft_type.as_deref().filter(|k| !k.eq_ignore_ascii_case("lora")) {
            bail!("{}: adapter type {kind} is not supported; only LORA adapters are", dir.display());
        }
        if config.r == 0 {
            bail!("{}: rank r must be at least 1", config_path.display());
        }
        let base_from_manifest = read_base_digest(dir)?;
        if let (Some(theirs), Some(ours)) = (base_from_manifest.as_deref(), base_sha256)
            && !theirs.eq_ignore_ascii_case(ours)
        {
            bail!(
                "adapter {} was trained on base model sha256:{theirs}, but this server's base model is sha256:{ours}",
                dir.display()
            );
        }
        let weights_path = dir.join("adapter_model.safetensors");
        let tensors = candle_core::safetensors::load(&weights_path, &candle_core::Device::Cpu)
            .with_context(|| format!("reading {}", weights_path.display()))?;
        let layers = build_layers(&config, tensors, model).with_context(|| {
            format!("adapter {} does not fit this base model (was it trained for another one?)", dir.display())
        })?;
        Ok(Self { config, base_sha256: base_from_manifest, layers })
    }

    pub(crate) fn layer(&self, index: usize) -> &AdapterLayer {
        &self.layers[index]
    }
}

fn read_base_digest(dir: &Path) -> Result<Option<String>> {
    let path = dir.join("manifest.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let manifest: AdapterManifest =
        serde_json::from_str(&text).with_context(|| format!("{} does not parse", path.display()))?;
    Ok(manifest.inputs.get("base_model").and_then(|i| i.sha256.clone()))
}

/// Output width of each target module and its input width, in the HF layout.
fn module_shape(c: &ModelConfig, module: &str) -> (usize, usize) {
    let (q, kv) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    match module {
        "q_proj" => (q, c.hidden_size),
        "k_proj" | "v_proj" => (kv, c.hidden_size),
        "o_proj" => (c.hidden_size, q),
        "gate_proj" | "up_proj" => (c.intermediate_size, c.hidden_size),
        _ => (c.hidden_size, c.intermediate_size), // down_proj
    }
}

/// Interleaves the rotary halves of each head's rows ([heads * head_dim, r]): the HF
/// layout a PEFT adapter is in, turned into the GGUF layout of q/k weights loaded from GGUF.
fn hf_qk_to_gguf(b: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, r) = b.dims2()?;
    let head_dim = out / heads;
    Ok(b.reshape((heads, 2, head_dim / 2, r))?.transpose(1, 2)?.contiguous()?.reshape((out, r))?)
}

/// A module's lora_A and lora_B as found in the file.
type ABPair = (Option<Tensor>, Option<Tensor>);
/// Picks the slot of a stacked projection in a layer.
type SlotOf = fn(&mut AdapterLayer) -> &mut Option<LoraPair>;

fn build_layers(
    config: &AdapterConfig,
    mut tensors: std::collections::HashMap<String, Tensor>,
    model: &LlamaModel,
) -> Result<Vec<AdapterLayer>> {
    let c = model.config();
    let scale = if config.use_rslora {
        config.lora_alpha / (config.r as f64).sqrt()
    } else {
        config.lora_alpha / config.r as f64
    };
    let dtype = model.dtype();
    let device = model.device();
    // Every tensor must be claimed by a known module of an existing layer.
    let mut parts: BTreeMap<(usize, &'static str), ABPair> = BTreeMap::new();
    for (name, tensor) in std::mem::take(&mut tensors) {
        let (layer, module, which) = parse_name(&name)?;
        if layer >= c.num_layers {
            bail!("{name}: layer {layer} does not exist; the base model has {} layers", c.num_layers);
        }
        let entry = parts.entry((layer, module)).or_default();
        if which == 'A' {
            entry.0 = Some(tensor);
        } else {
            entry.1 = Some(tensor);
        }
    }
    if parts.is_empty() {
        bail!("adapter_model.safetensors holds no LoRA tensors");
    }
    let mut layers: Vec<AdapterLayer> = (0..c.num_layers).map(|_| AdapterLayer::default()).collect();
    // Per layer and stacked group, the (a, b) of each member in order; None when absent.
    let groups: [(&[&str], SlotOf); 4] = [
        (&["q_proj", "k_proj", "v_proj"], |l| &mut l.qkv),
        (&["o_proj"], |l| &mut l.o),
        (&["gate_proj", "up_proj"], |l| &mut l.gate_up),
        (&["down_proj"], |l| &mut l.down),
    ];
    for (index, layer) in layers.iter_mut().enumerate() {
        for (members, slot) in &groups {
            let mut a_parts = Vec::new();
            let mut b_blocks: Vec<(usize, Option<Tensor>)> = Vec::new(); // (out width, b)
            for &module in members.iter() {
                let (out, inp) = module_shape(c, module);
                match parts.remove(&(index, module)) {
                    None => b_blocks.push((out, None)),
                    Some((Some(a), Some(b))) => {
                        let prefix = format!("layers.{index}.{module}");
                        let (ar, ain) = a.dims2().with_context(|| format!("{prefix}.lora_A must be 2-D"))?;
                        let (bout, br) = b.dims2().with_context(|| format!("{prefix}.lora_B must be 2-D"))?;
                        if ain != inp || bout != out || ar != br {
                            bail!(
                                "{prefix}: lora_A is [{ar}, {ain}] and lora_B [{bout}, {br}], \
                                 but this base model needs [r, {inp}] and [{out}, r]"
                            );
                        }
                        let mut b = (b.to_dtype(DType::F32)? * scale)?;
                        if c.interleaved_rope && module == "q_proj" {
                            b = hf_qk_to_gguf(&b, c.num_heads)?;
                        } else if c.interleaved_rope && module == "k_proj" {
                            b = hf_qk_to_gguf(&b, c.num_kv_heads)?;
                        }
                        a_parts.push(a.to_dtype(DType::F32)?);
                        b_blocks.push((out, Some(b)));
                    }
                    Some(_) => bail!("layers.{index}.{module} has lora_A or lora_B but not both"),
                }
            }
            if a_parts.is_empty() {
                continue;
            }
            let a = Tensor::cat(&a_parts, 0)?;
            let rank_total = a.dim(0)?;
            // Block-diagonal b: member i's columns are its own rank slice.
            let mut rows = Vec::new();
            let mut column = 0;
            for (out, b) in b_blocks {
                match b {
                    None => rows.push(Tensor::zeros((out, rank_total), DType::F32, &candle_core::Device::Cpu)?),
                    Some(b) => {
                        let r = b.dim(1)?;
                        let left = Tensor::zeros((out, column), DType::F32, &candle_core::Device::Cpu)?;
                        let right =
                            Tensor::zeros((out, rank_total - column - r), DType::F32, &candle_core::Device::Cpu)?;
                        rows.push(Tensor::cat(&[left, b, right], 1)?);
                        column += r;
                    }
                }
            }
            let b = Tensor::cat(&rows, 0)?;
            *slot(layer) =
                Some(LoraPair { a: a.to_dtype(dtype)?.to_device(device)?, b: b.to_dtype(dtype)?.to_device(device)? });
        }
    }
    Ok(layers)
}

/// Splits a PEFT tensor name such as
/// `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` into (3, "q_proj", 'A').
fn parse_name(name: &str) -> Result<(usize, &'static str, char)> {
    let parts: Vec<&str> = name.split('.').collect();
    let which = if name.contains(".lora_A.") {
        'A'
    } else if name.contains(".lora_B.") {
        'B'
    } else {
        bail!("{name}: not a LoRA tensor (only lora_A/lora_B weights are supported)");
    };
    let layer = parts
        .iter()
        .position(|p| *p == "layers")
        .and_then(|i| parts.get(i + 1))
        .and_then(|n| n.parse::<usize>().ok())
        .with_context(|| format!("{name}: no layer index"))?;
    let module = TARGET_MODULES.iter().find(|m| parts.contains(m)).with_context(|| {
        format!("{name}: targets a module LoRA serving does not support (supported: {TARGET_MODULES:?})")
    })?;
    Ok((layer, module, which))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_names_parse() {
        let (l, m, w) = parse_name("base_model.model.model.layers.12.mlp.down_proj.lora_B.weight").expect("parses");
        assert_eq!((l, m, w), (12, "down_proj", 'B'));
        assert!(parse_name("base_model.model.lm_head.lora_A.weight").is_err());
        assert!(parse_name("base_model.model.model.layers.0.self_attn.q_proj.weight").is_err());
    }

    use crate::engine::model::{Arch, Block, KvCache, Linear};
    use candle_core::quantized::QMatMul;
    use candle_core::{D, Device};

    const HIDDEN: usize = 16;
    const INTER: usize = 32;
    const HEADS: usize = 4;
    const KV_HEADS: usize = 2;
    const HEAD_DIM: usize = 4;
    const VOCAB: usize = 50;

    fn config() -> ModelConfig {
        ModelConfig {
            arch: Arch::Llama,
            hidden_size: HIDDEN,
            intermediate_size: INTER,
            num_layers: 2,
            num_heads: HEADS,
            num_kv_heads: KV_HEADS,
            head_dim: HEAD_DIM,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            context_length: 64,
            vocab_size: VOCAB,
            interleaved_rope: true,
            f16_kv_rounding: false,
        }
    }

    fn randn(shape: (usize, usize)) -> Tensor {
        Tensor::randn(0f32, 0.3, shape, &Device::Cpu).expect("randn")
    }

    /// HF-layout weights of one layer by PEFT module name.
    type LayerWeights = BTreeMap<&'static str, Tensor>;

    fn random_layer() -> LayerWeights {
        TARGET_MODULES
            .iter()
            .map(|&m| {
                let (out, inp) = module_shape(&config(), m);
                (m, randn((out, inp)))
            })
            .collect()
    }

    /// A tiny model in the GGUF layout (q/k rows interleaved) from HF-layout weights.
    fn model(layers: &[LayerWeights], embed: &Tensor, head: &Tensor) -> LlamaModel {
        let linear = |w: Tensor| Linear::new(QMatMul::Tensor(w), None);
        let ones = |n: usize| Tensor::ones(n, DType::F32, &Device::Cpu).expect("ones");
        let blocks = layers
            .iter()
            .map(|l| {
                let q = hf_qk_to_gguf(&l["q_proj"], HEADS).expect("q");
                let k = hf_qk_to_gguf(&l["k_proj"], KV_HEADS).expect("k");
                Block {
                    attn_norm: ones(HIDDEN),
                    qkv: linear(Tensor::cat(&[q, k, l["v_proj"].clone()], 0).expect("qkv")),
                    o: linear(l["o_proj"].clone()),
                    ffn_norm: ones(HIDDEN),
                    gate_up: linear(Tensor::cat(&[&l["gate_proj"], &l["up_proj"]], 0).expect("gate_up")),
                    down: linear(l["down_proj"].clone()),
                }
            })
            .collect();
        LlamaModel::new(config(), embed.clone(), blocks, ones(HIDDEN), linear(head.clone()), &Device::Cpu)
            .expect("model")
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .expect("sub")
            .abs()
            .expect("abs")
            .flatten_all()
            .expect("f")
            .max(D::Minus1)
            .expect("max")
            .to_scalar()
            .expect("s")
    }

    /// Serving with an adapter gives what the merged weights W + (alpha / r) B A give, for
    /// a prompt and for a batched decode step that mixes adapted and plain sequences.
    #[test]
    fn adapter_equals_merged_weights_in_prefill_and_mixed_batches() {
        let layers = vec![random_layer(), random_layer()];
        let (embed, head) = (randn((VOCAB, HIDDEN)), randn((VOCAB, HIDDEN)));
        let base = model(&layers, &embed, &head);
        let (r, alpha) = (2usize, 6.0f64);
        let targets = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"];
        let mut tensors = std::collections::HashMap::new();
        let mut merged_layers = layers.clone();
        for (i, merged) in merged_layers.iter_mut().enumerate() {
            for m in targets {
                let (out, inp) = module_shape(&config(), m);
                let (a, b) = (randn((r, inp)), randn((out, r)));
                let update = (b.matmul(&a).expect("ba") * (alpha / r as f64)).expect("scale");
                merged.insert(m, (&merged[m] + update).expect("merge"));
                let prefix = format!("base_model.model.model.layers.{i}.{m}");
                tensors.insert(format!("{prefix}.lora_A.weight"), a);
                tensors.insert(format!("{prefix}.lora_B.weight"), b);
            }
        }
        let merged = model(&merged_layers, &embed, &head);
        let adapter_config = AdapterConfig {
            r,
            lora_alpha: alpha,
            target_modules: TargetModules::List(targets.iter().map(|t| t.to_string()).collect()),
            use_rslora: false,
            base_model_name_or_path: None,
            peft_type: Some("LORA".into()),
        };
        let layers = build_layers(&adapter_config, tensors, &base).expect("builds");
        let adapter = Adapter { config: adapter_config, base_sha256: None, layers };

        let prompt = [3u32, 14, 15, 9, 2, 6];
        let (mut with, mut reference) = (KvCache::default(), KvCache::default());
        let got = base.forward_with(&prompt, &mut with, true, Some(&adapter)).expect("adapted");
        let want = merged.forward(&prompt, &mut reference, true).expect("merged");
        assert!(max_diff(&got, &want) < 1e-4, "prefill differs by {}", max_diff(&got, &want));

        // Sequence 0 adapted, sequence 1 plain, decoded together.
        let (mut plain, mut plain_reference) = (KvCache::default(), KvCache::default());
        base.forward(&prompt[..4], &mut plain, false).expect("plain prefill");
        base.forward(&prompt[..4], &mut plain_reference, false).expect("plain prefill");
        let got =
            base.decode_batch_with(&[7, 8], &mut [&mut with, &mut plain], &[Some(&adapter), None]).expect("mixed step");
        let want_adapted = merged.forward(&[7], &mut reference, false).expect("merged step");
        let want_plain = base.forward(&[8], &mut plain_reference, false).expect("plain step");
        assert!(max_diff(&got.get(0).expect("row"), &want_adapted.get(0).expect("row")) < 1e-4);
        assert!(max_diff(&got.get(1).expect("row"), &want_plain.get(0).expect("row")) < 1e-5);
    }

    #[test]
    fn gguf_permutation_inverts_the_loader_one() {
        let b = Tensor::arange(0f32, 64.0, &candle_core::Device::Cpu).expect("t").reshape((16, 4)).expect("r");
        let there = hf_qk_to_gguf(&b, 2).expect("permutes");
        let back = super::super::loader::gguf_qk_to_hf(&there, 2).expect("permutes back");
        assert_eq!(back.to_vec2::<f32>().expect("v"), b.to_vec2::<f32>().expect("v"));
    }
}
