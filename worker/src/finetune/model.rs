//! A trainable Llama-family decoder built only from differentiable operations (the
//! inference engine's fused RMS norm, softmax and rotary kernels have no backward pass).
//! Weights are in the HF layout (q/k of a GGUF model are un-permuted on the way in), so
//! LoRA tensors are PEFT's without any conversion. Under LoRA the base weights are plain
//! tensors and only the low-rank factors are variables.

use anyhow::{Result, bail};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, D, DType, Device, Layout, Shape, Tensor, Var};

use crate::engine::adapter::TARGET_MODULES;
use crate::engine::loader::{LoadedModel, gguf_qk_to_hf};
use crate::engine::model::ModelConfig;

/// `x @ w^T` for a frozen `w`: candle's matrix product computes the gradients of both
/// operands, and under LoRA the weight's gradient is wasted work (a third of the
/// arithmetic of a step) and memory. This op's backward computes the input's only.
struct FrozenLinear {
    /// [out, in]
    w: Tensor,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = layout.shape().dims2()?;
        let wt = self.w.t()?;
        let n = wt.dim(1)?;
        let (w_storage, w_layout) = wt.storage_and_layout();
        let candle_core::Storage::Cpu(w_cpu) = &*w_storage else {
            candle_core::bail!("frozen-linear: the weight is not in CPU memory")
        };
        let out = storage.matmul(w_cpu, (1, m, n, k), layout, w_layout)?;
        Ok((out, Shape::from((m, n))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.w)?))
    }
}

/// A projection: a frozen (or, for full fine-tuning, trainable) weight [out, in], an
/// optional bias and an optional LoRA pair.
#[derive(Debug)]
pub struct Proj {
    /// The weight; a variable when fully fine-tuned.
    pub weight: Weight,
    /// Bias (Qwen2's q/k/v), frozen.
    pub bias: Option<Tensor>,
    /// LoRA factors A [r, in] and B [out, r].
    pub lora: Option<(Var, Var)>,
}

/// A weight that is either frozen or trained.
#[derive(Debug)]
pub enum Weight {
    /// Not trained.
    Frozen(Tensor),
    /// Trained.
    Trained(Var),
}

impl Weight {
    /// The tensor.
    pub fn tensor(&self) -> &Tensor {
        match self {
            Weight::Frozen(t) => t,
            Weight::Trained(v) => v.as_tensor(),
        }
    }
}

/// The projections of one block, by PEFT module name order.
#[derive(Debug)]
pub struct TrainBlock {
    attn_norm: Weight,
    ffn_norm: Weight,
    /// q, k, v, o, gate, up, down.
    pub projs: Vec<Proj>,
}

/// The trainable model.
#[derive(Debug)]
pub struct TrainModel {
    /// Shapes.
    pub config: ModelConfig,
    embed: Weight,
    /// Decoder blocks.
    pub blocks: Vec<TrainBlock>,
    norm: Weight,
    /// None when tied to the embedding.
    lm_head: Option<Weight>,
    cos: Tensor,
    sin: Tensor,
    device: Device,
}

/// How the model is trained.
#[derive(Debug, Clone)]
pub enum Method {
    /// LoRA factors of rank `rank` on `targets`, scaled by `alpha / rank`.
    Lora {
        /// Rank.
        rank: usize,
        /// Scaling numerator.
        alpha: f64,
        /// Dropout on the LoRA input.
        dropout: f64,
        /// PEFT module names.
        targets: Vec<String>,
    },
    /// Every weight.
    Full,
}

/// The seeded generator of initialisation and dropout masks.
pub use crate::engine::sampling::SplitMix64 as Rng;

fn split_rows(t: &Tensor, widths: &[usize]) -> Result<Vec<Tensor>> {
    let mut out = Vec::new();
    let mut at = 0;
    for &w in widths {
        out.push(t.narrow(0, at, w)?.contiguous()?);
        at += w;
    }
    Ok(out)
}

impl TrainModel {
    /// Builds the trainable model from a model loaded with dense weights, initialising
    /// LoRA factors from `seed` (A uniform in ±1/sqrt(in), B zero, as PEFT does).
    pub fn from_loaded(loaded: &LoadedModel, method: &Method, seed: u64) -> Result<Self> {
        let m = &loaded.model;
        let c = m.config().clone();
        let device = m.device().clone();
        let full = matches!(method, Method::Full);
        let wrap = |t: Tensor| -> Result<Weight> {
            let t = t.to_dtype(DType::F32)?.contiguous()?;
            Ok(if full { Weight::Trained(Var::from_tensor(&t)?) } else { Weight::Frozen(t) })
        };
        let (q_w, kv_w) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let mut rng = Rng(seed ^ 0x4c6f_5241);
        let mut blocks = Vec::with_capacity(m.blocks.len());
        for block in &m.blocks {
            let mut qkv = split_rows(&block.qkv.dense_weight()?, &[q_w, kv_w, kv_w])?;
            if c.interleaved_rope {
                qkv[0] = gguf_qk_to_hf(&qkv[0], c.num_heads)?;
                qkv[1] = gguf_qk_to_hf(&qkv[1], c.num_kv_heads)?;
            }
            let qkv_bias = match block.qkv.bias() {
                Some(b) => {
                    let mut parts: Vec<Tensor> = split_rows(&b.to_dtype(DType::F32)?, &[q_w, kv_w, kv_w])?;
                    if c.interleaved_rope {
                        parts[0] = gguf_qk_to_hf(&parts[0].unsqueeze(1)?, c.num_heads)?.squeeze(1)?;
                        parts[1] = gguf_qk_to_hf(&parts[1].unsqueeze(1)?, c.num_kv_heads)?.squeeze(1)?;
                    }
                    parts.into_iter().map(Some).collect()
                }
                None => vec![None, None, None],
            };
            let gate_up = split_rows(&block.gate_up.dense_weight()?, &[c.intermediate_size, c.intermediate_size])?;
            let weights = [
                qkv[0].clone(),
                qkv[1].clone(),
                qkv[2].clone(),
                block.o.dense_weight()?,
                gate_up[0].clone(),
                gate_up[1].clone(),
                block.down.dense_weight()?,
            ];
            let mut projs = Vec::with_capacity(7);
            for (i, (name, w)) in TARGET_MODULES.iter().zip(weights).enumerate() {
                let (out, inp) = w.dims2()?;
                let lora = match method {
                    Method::Lora { rank, targets, .. } if targets.iter().any(|t| t == name) => {
                        let bound = 1.0 / (inp as f32).sqrt();
                        let a: Vec<f32> = (0..rank * inp).map(|_| (rng.uniform() * 2.0 - 1.0) * bound).collect();
                        let a = Var::from_tensor(&Tensor::from_vec(a, (*rank, inp), &device)?)?;
                        let b = Var::from_tensor(&Tensor::zeros((out, *rank), DType::F32, &device)?)?;
                        Some((a, b))
                    }
                    _ => None,
                };
                let bias = if i < 3 { qkv_bias[i].clone() } else { None };
                projs.push(Proj { weight: wrap(w)?, bias, lora });
            }
            blocks.push(TrainBlock {
                attn_norm: wrap(block.attn_norm.clone())?,
                ffn_norm: wrap(block.ffn_norm.clone())?,
                projs,
            });
        }
        let embed_t = m.embed.to_dtype(DType::F32)?;
        let head = m.lm_head.dense_weight()?;
        // A head equal to the embedding is tied (trained once, saved once).
        let tied = head.dims() == embed_t.dims() && (&head - &embed_t)?.abs()?.max_all()?.to_scalar::<f32>()? == 0.0;
        let lm_head = if tied { None } else { Some(wrap(head)?) };
        let half = c.head_dim / 2;
        let inv: Vec<f32> = (0..half).map(|i| 1.0 / c.rope_theta.powf(2.0 * i as f32 / c.head_dim as f32)).collect();
        let inv = Tensor::from_vec(inv, (1, half), &device)?;
        let positions = Tensor::arange(0u32, c.context_length as u32, &device)?
            .to_dtype(DType::F32)?
            .reshape((c.context_length, 1))?;
        let freqs = positions.matmul(&inv)?;
        Ok(Self {
            cos: freqs.cos()?,
            sin: freqs.sin()?,
            embed: wrap(embed_t)?,
            norm: wrap(m.norm.clone())?,
            lm_head,
            blocks,
            config: c,
            device,
        })
    }

    /// Every trainable variable, in a fixed order (the order of checkpoints and of the
    /// optimizer state), with a name.
    pub fn variables(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        let mut push = |name: String, w: &Weight| {
            if let Weight::Trained(v) = w {
                out.push((name, v.clone()));
            }
        };
        push("model.embed_tokens.weight".into(), &self.embed);
        for (i, b) in self.blocks.iter().enumerate() {
            push(format!("model.layers.{i}.input_layernorm.weight"), &b.attn_norm);
            push(format!("model.layers.{i}.post_attention_layernorm.weight"), &b.ffn_norm);
            for (name, p) in TARGET_MODULES.iter().zip(&b.projs) {
                push(format!("model.layers.{i}.{}.{name}.weight", module_group(name)), &p.weight);
            }
        }
        push("model.norm.weight".into(), &self.norm);
        if let Some(h) = &self.lm_head {
            push("lm_head.weight".into(), h);
        }
        for (i, b) in self.blocks.iter().enumerate() {
            for (name, p) in TARGET_MODULES.iter().zip(&b.projs) {
                if let Some((a, bb)) = &p.lora {
                    let prefix = format!("base_model.model.model.layers.{i}.{}.{name}", module_group(name));
                    out.push((format!("{prefix}.lora_A.weight"), a.clone()));
                    out.push((format!("{prefix}.lora_B.weight"), bb.clone()));
                }
            }
        }
        out
    }

    /// The frozen or trained tensors of a full model by HF name (for a merged or fully
    /// fine-tuned output), LoRA updates merged in with `scale`.
    pub fn merged_weights(&self, scale: f64) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed.tensor().clone())];
        for (i, b) in self.blocks.iter().enumerate() {
            out.push((format!("model.layers.{i}.input_layernorm.weight"), b.attn_norm.tensor().clone()));
            out.push((format!("model.layers.{i}.post_attention_layernorm.weight"), b.ffn_norm.tensor().clone()));
            for (name, p) in TARGET_MODULES.iter().zip(&b.projs) {
                let mut w = p.weight.tensor().clone();
                if let Some((a, bb)) = &p.lora {
                    w = (w + (bb.as_tensor().matmul(a.as_tensor())? * scale)?)?;
                }
                let prefix = format!("model.layers.{i}.{}.{name}", module_group(name));
                out.push((format!("{prefix}.weight"), w));
                if let Some(bias) = &p.bias {
                    out.push((format!("{prefix}.bias"), bias.clone()));
                }
            }
        }
        out.push(("model.norm.weight".into(), self.norm.tensor().clone()));
        if let Some(h) = &self.lm_head {
            out.push(("lm_head.weight".into(), h.tensor().clone()));
        }
        Ok(out)
    }

    /// Whether the output head is the embedding.
    pub fn tied(&self) -> bool {
        self.lm_head.is_none()
    }

    fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
        let variance = x.sqr()?.mean_keepdim(D::Minus1)?;
        Ok(x.broadcast_div(&(variance + eps)?.sqrt()?)?.broadcast_mul(weight)?)
    }

    /// Rotary embedding in the HF layout (halves rotated) at the given positions; `x` is
    /// [b, heads, t, d], `cos`/`sin` are [b, 1, t, d/2].
    fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let half = x.dim(D::Minus1)? / 2;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let a = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
        let b = (x1.broadcast_mul(sin)? + x2.broadcast_mul(cos)?)?;
        Ok(Tensor::cat(&[a, b], D::Minus1)?)
    }

    /// `x` [b, t, in] times `w` [out, in] transposed, as one 2-D product: a batched
    /// product would broadcast (copy) the weight once per row of the batch.
    fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let (b, t, inp) = x.dims3()?;
        let out = w.dim(0)?;
        Ok(x.reshape((b * t, inp))?.matmul(&w.t()?)?.reshape((b, t, out))?)
    }

    /// [`Self::linear`] with a weight that may be frozen.
    fn linear_weight(x: &Tensor, w: &Weight) -> Result<Tensor> {
        match w {
            Weight::Trained(v) => Self::linear(x, v.as_tensor()),
            Weight::Frozen(t) if x.device().is_cpu() => {
                let (b, t_len, inp) = x.dims3()?;
                let out = t.dim(0)?;
                let x2 = x.reshape((b * t_len, inp))?.contiguous()?;
                Ok(x2.apply_op1(FrozenLinear { w: t.clone() })?.reshape((b, t_len, out))?)
            }
            Weight::Frozen(t) => Self::linear(x, t),
        }
    }

    fn project(p: &Proj, x: &Tensor, scale: f64, dropout: Option<&Tensor>) -> Result<Tensor> {
        let mut y = Self::linear_weight(x, &p.weight)?;
        if let Some(b) = &p.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some((a, b)) = &p.lora {
            let input = match dropout {
                Some(mask) => x.broadcast_mul(mask)?,
                None => x.clone(),
            };
            let delta = Self::linear(&Self::linear(&input, a.as_tensor())?, b.as_tensor())?;
            y = (y + (delta * scale)?)?;
        }
        Ok(y)
    }

    /// Logits [b, t, vocab] of token ids [b, t]. `positions` [b, t] are each token's
    /// position in its own sequence and `segments` [b, t] which packed sequence it belongs
    /// to: a token attends to earlier tokens of its own segment only. `lora_scale` is
    /// alpha / r; `dropout` (probability, rng) masks LoRA inputs while training.
    pub fn forward(
        &self,
        tokens: &Tensor,
        positions: &Tensor,
        segments: &[Vec<u32>],
        lora_scale: f64,
        mut dropout: Option<(f64, &mut Rng)>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, t) = tokens.dims2()?;
        if t > c.context_length {
            bail!("sequence of {t} tokens exceeds the context length {}", c.context_length);
        }
        let mut x = self.embed.tensor().index_select(&tokens.flatten_all()?, 0)?.reshape((b, t, c.hidden_size))?;
        let pos = positions.flatten_all()?;
        let cos = self.cos.index_select(&pos, 0)?.reshape((b, 1, t, c.head_dim / 2))?;
        let sin = self.sin.index_select(&pos, 0)?.reshape((b, 1, t, c.head_dim / 2))?;
        let mut mask = Vec::with_capacity(b * t * t);
        for seg in segments {
            for i in 0..t {
                for j in 0..t {
                    mask.push(if j <= i && seg[j] == seg[i] { 0f32 } else { f32::NEG_INFINITY });
                }
            }
        }
        let mask = Tensor::from_vec(mask, (b, 1, t, t), &self.device)?;
        let group = c.num_heads / c.num_kv_heads;
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        for block in &self.blocks {
            let mut mask_for = |width: usize| -> Result<Option<Tensor>> {
                match dropout.as_mut() {
                    Some((p, rng)) if *p > 0.0 => {
                        let keep = 1.0 - *p as f32;
                        let values: Vec<f32> =
                            (0..b * t * width).map(|_| if rng.uniform() < keep { 1.0 / keep } else { 0.0 }).collect();
                        Ok(Some(Tensor::from_vec(values, (b, t, width), &self.device)?))
                    }
                    _ => Ok(None),
                }
            };
            let h = Self::rms_norm(&x, block.attn_norm.tensor(), c.rms_norm_eps)?;
            let m = mask_for(c.hidden_size)?;
            let q = Self::project(&block.projs[0], &h, lora_scale, m.as_ref())?;
            let k = Self::project(&block.projs[1], &h, lora_scale, m.as_ref())?;
            let v = Self::project(&block.projs[2], &h, lora_scale, m.as_ref())?;
            let q = q.reshape((b, t, c.num_heads, c.head_dim))?.transpose(1, 2)?.contiguous()?;
            let k = k.reshape((b, t, c.num_kv_heads, c.head_dim))?.transpose(1, 2)?.contiguous()?;
            let v = v.reshape((b, t, c.num_kv_heads, c.head_dim))?.transpose(1, 2)?.contiguous()?;
            let q = Self::rope(&q, &cos, &sin)?;
            let k = Self::rope(&k, &cos, &sin)?;
            // Grouped-query attention: each key/value head serves `group` query heads.
            let (k, v) = if group > 1 {
                let expand = |x: &Tensor| -> Result<Tensor> {
                    Ok(x.unsqueeze(2)?
                        .broadcast_as((b, c.num_kv_heads, group, t, c.head_dim))?
                        .contiguous()?
                        .reshape((b, c.num_heads, t, c.head_dim))?)
                };
                (expand(&k)?, expand(&v)?)
            } else {
                (k, v)
            };
            let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(&mask)?;
            let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
            let attn = probs.matmul(&v)?.transpose(1, 2)?.contiguous()?.reshape((b, t, c.num_heads * c.head_dim))?;
            let m = mask_for(c.num_heads * c.head_dim)?;
            x = (x + Self::project(&block.projs[3], &attn, lora_scale, m.as_ref())?)?;
            let h = Self::rms_norm(&x, block.ffn_norm.tensor(), c.rms_norm_eps)?;
            let m = mask_for(c.hidden_size)?;
            let gate = Self::project(&block.projs[4], &h, lora_scale, m.as_ref())?;
            let up = Self::project(&block.projs[5], &h, lora_scale, m.as_ref())?;
            let act = (candle_nn::ops::sigmoid(&gate)?.mul(&gate)? * up)?;
            let m = mask_for(c.intermediate_size)?;
            x = (x + Self::project(&block.projs[6], &act, lora_scale, m.as_ref())?)?;
        }
        let x = Self::rms_norm(&x, self.norm.tensor(), c.rms_norm_eps)?;
        let head = match &self.lm_head {
            Some(h) => h,
            None => &self.embed,
        };
        Self::linear_weight(&x, head)
    }
}

/// PEFT's module path of a projection: `self_attn` or `mlp`.
pub fn module_group(name: &str) -> &'static str {
    if name.ends_with("proj") && ["q_proj", "k_proj", "v_proj", "o_proj"].contains(&name) { "self_attn" } else { "mlp" }
}

/// Token-weighted mean cross-entropy as one operation: the composed log-softmax
/// allocates several tensors the size of the logits (vocabulary x tokens, 100 MB for a
/// batch of 512 tokens) forward and backward; this computes each row in place and its
/// backward writes the gradient `(softmax - one_hot) * weight / count` once.
struct CrossEntropy {
    targets: Vec<u32>,
    weights: Vec<f32>,
    count: f32,
}

impl CrossEntropy {
    fn rows<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<(&'a [f32], usize)> {
        let (_, v) = layout.shape().dims2()?;
        let CpuStorage::F32(data) = storage else { candle_core::bail!("cross-entropy: logits must be f32") };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("cross-entropy: logits must be contiguous")
        };
        Ok((&data[start..end], v))
    }
}

/// log(sum(exp(row))) computed stably.
fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    max + row.iter().map(|x| (x - max).exp()).sum::<f32>().ln()
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "masked-cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (data, v) = Self::rows(storage, layout)?;
        let total: f64 = data
            .par_chunks(v)
            .zip(self.targets.par_iter().zip(self.weights.par_iter()))
            .map(|(row, (&t, &w))| if w == 0.0 { 0.0 } else { f64::from(w * (log_sum_exp(row) - row[t as usize])) })
            .sum();
        Ok((CpuStorage::F32(vec![(total / f64::from(self.count)) as f32]), Shape::from(())))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        use rayon::prelude::*;
        let g = grad.to_dtype(DType::F32)?.to_scalar::<f32>()? / self.count;
        let arg = arg.contiguous()?;
        let (n, v) = arg.dims2()?;
        let mut out = vec![0f32; n * v];
        {
            let (storage, layout) = arg.storage_and_layout();
            let candle_core::Storage::Cpu(cpu) = &*storage else {
                candle_core::bail!("cross-entropy: logits are not in CPU memory")
            };
            let (data, _) = Self::rows(cpu, layout)?;
            out.par_chunks_mut(v)
                .zip(data.par_chunks(v))
                .zip(self.targets.par_iter().zip(self.weights.par_iter()))
                .for_each(|((o, row), (&t, &w))| {
                    if w == 0.0 {
                        return;
                    }
                    let lse = log_sum_exp(row);
                    let scale = w * g;
                    for (o, x) in o.iter_mut().zip(row) {
                        *o = (x - lse).exp() * scale;
                    }
                    o[t as usize] -= scale;
                });
        }
        Ok(Some(Tensor::from_vec(out, (n, v), arg.device())?))
    }
}

/// Mean cross-entropy of `logits` [b, t, v] against `targets` [b, t], counting only
/// positions where `weights` [b, t] is 1. Returns (loss, number of counted tokens).
pub fn masked_loss(logits: &Tensor, targets: &Tensor, weights: &Tensor) -> Result<(Tensor, f64)> {
    let (b, t, v) = logits.dims3()?;
    let flat_weights: Vec<f32> = weights.flatten_all()?.to_vec1()?;
    let count: f32 = flat_weights.iter().sum();
    if count == 0.0 {
        bail!("a batch without any token to learn from");
    }
    let logits = logits.reshape((b * t, v))?;
    if logits.device().is_cpu() && logits.dtype() == DType::F32 {
        let op = CrossEntropy { targets: targets.flatten_all()?.to_vec1()?, weights: flat_weights, count };
        return Ok((logits.contiguous()?.apply_op1(op)?, f64::from(count)));
    }
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let picked = log_probs.gather(&targets.reshape((b * t, 1))?, 1)?.reshape((b * t,))?;
    let weights = weights.reshape((b * t,))?;
    let loss = ((picked * &weights)?.sum_all()?.neg()? / f64::from(count))?;
    Ok((loss, f64::from(count)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused loss and its gradient equal the composed log-softmax version.
    #[test]
    fn fused_cross_entropy_matches_the_composed_one() {
        let device = Device::Cpu;
        let logits = Var::from_tensor(&Tensor::randn(0f32, 2.0, (2, 3, 7), &device).expect("randn")).expect("var");
        let targets = Tensor::new(&[[1u32, 6, 0], [3, 3, 5]], &device).expect("targets");
        let weights = Tensor::new(&[[1f32, 0.0, 1.0], [1.0, 1.0, 0.0]], &device).expect("weights");
        let (fused, n) = masked_loss(logits.as_tensor(), &targets, &weights).expect("fused");
        assert_eq!(n, 4.0);
        let log_probs =
            candle_nn::ops::log_softmax(&logits.as_tensor().reshape((6, 7)).expect("r"), D::Minus1).expect("ls");
        let picked = log_probs.gather(&targets.reshape((6, 1)).expect("r"), 1).expect("g").reshape(6).expect("r");
        let composed = ((picked * weights.reshape(6).expect("r")).expect("m").sum_all().expect("s").neg().expect("n")
            / 4.0)
            .expect("d");
        let (a, b) = (fused.to_scalar::<f32>().expect("f"), composed.to_scalar::<f32>().expect("f"));
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        let ga = fused.backward().expect("bwd").get(logits.as_tensor()).expect("grad").clone();
        let gb = composed.backward().expect("bwd").get(logits.as_tensor()).expect("grad").clone();
        let diff = (ga - gb).expect("sub").abs().expect("abs").max_all().expect("max").to_scalar::<f32>().expect("f");
        assert!(diff < 1e-5, "gradients differ by {diff}");
    }
}
