//! A Llama-family decoder (Llama 2/3, Mistral, SmolLM2, TinyLlama, Qwen2) with a KV cache
//! per sequence and a batched decode step that advances many sequences at once.

use anyhow::{Result, bail};
use candle_core::quantized::QMatMul;

use super::adapter::{Adapter, AdapterLayer, LoraPair};
use candle_core::{D, DType, Device, Module, Tensor};

/// Architecture of the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama, Mistral, SmolLM2, TinyLlama.
    Llama,
    /// Qwen2: biases on the q/k/v projections.
    Qwen2,
}

/// Shapes and constants of a model.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// The architecture.
    pub arch: Arch,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_layers: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than heads).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Epsilon of RMS normalisation.
    pub rms_norm_eps: f64,
    /// Base of the rotary embedding frequencies.
    pub rope_theta: f32,
    /// Longest sequence the model was trained for.
    pub context_length: usize,
    /// Rows of the embedding.
    pub vocab_size: usize,
    /// Whether q/k are stored for llama.cpp's interleaved rotary layout (GGUF Llama).
    pub interleaved_rope: bool,
    /// Round cached keys and values to f16 as llama.cpp's default cache does, so that
    /// outputs match it; the hybrid CPU layout, which rounds differently anyway, skips it.
    pub f16_kv_rounding: bool,
}

/// A linear layer: its weight as stored (quantized or dense), optionally a dense copy
/// for prompt processing, and a bias.
///
/// Prompt processing multiplies many rows at once and is bound by arithmetic, where dense
/// f32 matrix products are fastest; decoding reads every weight once per token and is
/// bound by memory, where quantized weights are fastest. With a dense copy each phase
/// uses the representation that suits it.
#[derive(Debug)]
pub struct Linear {
    weight: QMatMul,
    dense: Option<Tensor>,
    bias: Option<Tensor>,
}

impl Linear {
    /// A layer from its weight ([out, in]) and bias.
    pub fn new(weight: QMatMul, bias: Option<Tensor>) -> Self {
        Self { weight, dense: None, bias }
    }

    /// The weight as a dense f32 tensor [out, in] (dequantized when stored quantized).
    pub(crate) fn dense_weight(&self) -> Result<Tensor> {
        Ok(match &self.weight {
            QMatMul::QTensor(q) => q.dequantize(&q.device())?,
            QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.to_dtype(DType::F32)?,
        })
    }

    /// The bias, if any.
    pub(crate) fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Adds a dense copy of a quantized weight for multi-row inputs.
    pub(crate) fn with_dense(mut self) -> Result<Self> {
        if let QMatMul::QTensor(q) = &self.weight {
            self.dense = Some(q.dequantize(&q.device())?);
        }
        Ok(self)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.elem_count() / x.dim(D::Minus1)?;
        let y = match &self.dense {
            Some(w) if rows >= DENSE_MIN_ROWS => x.broadcast_matmul(&w.t()?)?,
            _ => self.weight.forward(x)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// From this many rows on, a layer with a dense copy uses it.
const DENSE_MIN_ROWS: usize = 16;

/// One decoder block.
#[derive(Debug)]
pub struct Block {
    pub(crate) attn_norm: Tensor,
    /// q, k and v projections stacked by rows: one product per step instead of three.
    pub(crate) qkv: Linear,
    pub(crate) o: Linear,
    pub(crate) ffn_norm: Tensor,
    /// Gate and up projections stacked by rows.
    pub(crate) gate_up: Linear,
    pub(crate) down: Linear,
}

/// The keys and values one sequence has seen, per layer, in buffers that grow by
/// doubling so a decode step writes one position instead of copying the whole cache.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// For the CPU attention: keys and values per layer as plain rows
    /// [position][kv_heads * head_dim].
    host: Vec<(Vec<f32>, Vec<f32>)>,
    len: usize,
}

/// Positions a cache buffer starts with.
const KV_INITIAL_CAPACITY: usize = 256;

impl KvCache {
    /// Tokens cached so far (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.layers.clear();
        self.host.clear();
        self.len = 0;
    }

    fn host_layer(&mut self, layer: usize) -> &mut (Vec<f32>, Vec<f32>) {
        if self.host.len() <= layer {
            self.host.resize_with(layer + 1, Default::default);
        }
        &mut self.host[layer]
    }

    /// Writes k/v ([1, kv_heads, t, head_dim]) of one layer after the cached positions;
    /// returns views of everything cached.
    fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        if self.layers.len() <= layer {
            self.layers.resize(layer + 1, None);
        }
        let (b, heads, t, dim) = k.dims4()?;
        let total = self.len + t;
        let slot = &mut self.layers[layer];
        let capacity = slot.as_ref().map_or(0, |(k, _)| k.dim(2).unwrap_or(0));
        if total > capacity {
            let new_capacity = total.max(capacity * 2).max(KV_INITIAL_CAPACITY);
            let grow = |old: Option<&Tensor>| -> Result<Tensor> {
                let buffer = Tensor::zeros((b, heads, new_capacity, dim), k.dtype(), k.device())?;
                if let Some(old) = old.filter(|_| self.len > 0) {
                    buffer.slice_set(&old.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
                Ok(buffer)
            };
            let grown = (grow(slot.as_ref().map(|s| &s.0))?, grow(slot.as_ref().map(|s| &s.1))?);
            *slot = Some(grown);
        }
        let (kb, vb) = slot.as_ref().ok_or_else(|| anyhow::anyhow!("cache slot"))?;
        kb.slice_set(&k.contiguous()?, 2, self.len)?;
        vb.slice_set(&v.contiguous()?, 2, self.len)?;
        Ok((kb.narrow(2, 0, total)?, vb.narrow(2, 0, total)?))
    }
}

/// Dot product with eight independent partial sums: a plain running sum must be added in
/// order, which keeps the compiler from using vector instructions.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (chunks_a, chunks_b) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = chunks_a.remainder().iter().zip(chunks_b.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in chunks_a.zip(chunks_b) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Rotates consecutive heads of `row` in place by the angles of one position: pairs
/// (2i, 2i+1) in llama.cpp's interleaved layout, (i, i + head_dim/2) in the HF layout.
fn rope_rows(row: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32], interleaved: bool) {
    let half = head_dim / 2;
    for head in row.chunks_exact_mut(head_dim) {
        for i in 0..half {
            let (a, b) = if interleaved { (2 * i, 2 * i + 1) } else { (i, i + half) };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * cos[i] - x1 * sin[i];
            head[b] = x0 * sin[i] + x1 * cos[i];
        }
    }
}

/// Rounds f32 values to the nearest f16 (no-op for other dtypes).
fn round_f16(x: &Tensor) -> Result<Tensor> {
    Ok(if x.dtype() == DType::F32 { x.to_dtype(DType::F16)?.to_dtype(DType::F32)? } else { x.clone() })
}

/// An adapter and the rows of a step it applies to: None for all rows of one sequence
/// (a prompt), or the rows of a batched decode step, as indices and as a tensor.
type RowAdapter<'a> = (&'a Adapter, Option<(Vec<usize>, Tensor)>);

/// The decoder.
#[derive(Debug)]
pub struct LlamaModel {
    pub(crate) config: ModelConfig,
    pub(crate) embed: Tensor,
    pub(crate) blocks: Vec<Block>,
    pub(crate) norm: Tensor,
    pub(crate) lm_head: Linear,
    cos: Tensor,
    sin: Tensor,
    /// cos/sin as plain rows [position][head_dim / 2] when the CPU attention is used.
    cos_host: Vec<f32>,
    sin_host: Vec<f32>,
    device: Device,
}

impl LlamaModel {
    /// Assembles a model from loaded weights and precomputes the rotary tables.
    pub(crate) fn new(
        config: ModelConfig,
        embed: Tensor,
        blocks: Vec<Block>,
        norm: Tensor,
        lm_head: Linear,
        device: &Device,
    ) -> Result<Self> {
        if blocks.len() != config.num_layers {
            bail!("the model declares {} layers but {} were loaded", config.num_layers, blocks.len());
        }
        let half = config.head_dim / 2;
        let inv_freq: Vec<f32> =
            (0..half).map(|i| 1.0 / config.rope_theta.powf(2.0 * i as f32 / config.head_dim as f32)).collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let positions = Tensor::arange(0u32, config.context_length as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((config.context_length, 1))?;
        let freqs = positions.matmul(&inv_freq)?;
        let (cos, sin) = (freqs.cos()?, freqs.sin()?);
        let (cos_host, sin_host) = if device.is_cpu() && !config.f16_kv_rounding {
            (cos.flatten_all()?.to_vec1()?, sin.flatten_all()?.to_vec1()?)
        } else {
            (Vec::new(), Vec::new())
        };
        Ok(Self { cos, sin, cos_host, sin_host, config, embed, blocks, norm, lm_head, device: device.clone() })
    }

    /// Shapes and constants.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype activations are computed in.
    pub fn dtype(&self) -> DType {
        self.embed.dtype()
    }

    fn rope(&self, x: &Tensor, offset: usize, len: usize) -> Result<Tensor> {
        let cos = self.cos.narrow(0, offset, len)?;
        let sin = self.sin.narrow(0, offset, len)?;
        let x = x.contiguous()?;
        Ok(if self.config.interleaved_rope {
            candle_nn::rotary_emb::rope_i(&x, &cos, &sin)?
        } else {
            candle_nn::rotary_emb::rope(&x, &cos, &sin)?
        })
    }

    /// Attention of `t` new positions of one sequence; `qkv` is [t, (heads + 2 * kv_heads)
    /// * head_dim] as the stacked projection gives it.
    fn attend(&self, layer: usize, qkv: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        if !self.cos_host.is_empty() {
            return self.attend_host(layer, qkv, cache);
        }
        let (q, k, v) = self.split_qkv(qkv)?;
        let c = &self.config;
        let (t, _) = q.dims2()?;
        let offset = cache.len;
        if offset + t > c.context_length {
            bail!("sequence of {} tokens exceeds the context length {}", offset + t, c.context_length);
        }
        let q = q.reshape((1, t, c.num_heads, c.head_dim))?.transpose(1, 2)?;
        let k = k.reshape((1, t, c.num_kv_heads, c.head_dim))?.transpose(1, 2)?;
        let v = v.reshape((1, t, c.num_kv_heads, c.head_dim))?.transpose(1, 2)?.contiguous()?;
        let q = self.rope(&q, offset, t)?;
        let k = self.rope(&k, offset, t)?;
        // Keys, values and the operands of the attention products are rounded to f16,
        // as in llama.cpp's default f16 KV cache, so near-tie tokens resolve alike.
        let (k, v) = if c.f16_kv_rounding {
            cache.append(layer, &round_f16(&k)?, &round_f16(&v)?)?
        } else {
            cache.append(layer, &k, &v)?
        };
        let total = offset + t;
        // Grouped-query attention without copying keys: the query heads that share a key
        // head are stacked along the row axis.
        let group = c.num_heads / c.num_kv_heads;
        let q = q.reshape((1, c.num_kv_heads, group * t, c.head_dim))?;
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let mut scores = (q.matmul(&k.t()?)? * scale)?;
        if t > 1 {
            let mask: Vec<f32> = (0..t)
                .flat_map(|i| (0..total).map(move |j| if j > offset + i { f32::NEG_INFINITY } else { 0.0 }))
                .collect();
            let mask = Tensor::from_vec(mask, (t, total), &self.device)?.repeat((group, 1))?;
            scores = scores.broadcast_add(&mask)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v)?; // [1, kv_heads, group * t, head_dim]
        let out = out.reshape((1, c.num_heads, t, c.head_dim))?.transpose(1, 2)?;
        Ok(out.reshape((t, c.num_heads * c.head_dim))?)
    }

    /// Attention on a CPU over a plain-row cache, for the hybrid layout. One new position
    /// (a decode step) is computed with loops over the cached rows, which replaces about
    /// a dozen small tensor operations per layer; a prompt uses matrix products.
    fn attend_host(&self, layer: usize, qkv: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let c = &self.config;
        let (hd, half) = (c.head_dim, c.head_dim / 2);
        let (qw, kvw) = (c.num_heads * hd, c.num_kv_heads * hd);
        let rows: Vec<f32> = qkv.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let width = qw + 2 * kvw;
        let t = rows.len() / width;
        let offset = cache.len;
        if offset + t > c.context_length {
            bail!("sequence of {} tokens exceeds the context length {}", offset + t, c.context_length);
        }
        let mut queries = Vec::with_capacity(t * qw);
        let (keys, values) = cache.host_layer(layer);
        for (i, row) in rows.chunks_exact(width).enumerate() {
            let pos = offset + i;
            let cos = &self.cos_host[pos * half..(pos + 1) * half];
            let sin = &self.sin_host[pos * half..(pos + 1) * half];
            let start = queries.len();
            queries.extend_from_slice(&row[..qw]);
            rope_rows(&mut queries[start..], hd, cos, sin, c.interleaved_rope);
            let start = keys.len();
            keys.extend_from_slice(&row[qw..qw + kvw]);
            rope_rows(&mut keys[start..], hd, cos, sin, c.interleaved_rope);
            values.extend_from_slice(&row[qw + kvw..]);
        }
        let total = offset + t;
        let group = c.num_heads / c.num_kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        if t > 1 {
            let q = Tensor::from_vec(queries, (t, c.num_heads, hd), &self.device)?.transpose(0, 1)?;
            let q = q.contiguous()?.reshape((c.num_kv_heads, group * t, hd))?;
            let k = Tensor::from_slice(&keys[..total * kvw], (total, c.num_kv_heads, hd), &self.device)?;
            let v = Tensor::from_slice(&values[..total * kvw], (total, c.num_kv_heads, hd), &self.device)?;
            let (k, v) = (k.transpose(0, 1)?.contiguous()?, v.transpose(0, 1)?.contiguous()?);
            let mask: Vec<f32> = (0..t)
                .flat_map(|i| (0..total).map(move |j| if j > offset + i { f32::NEG_INFINITY } else { 0.0 }))
                .collect();
            let mask = Tensor::from_vec(mask, (t, total), &self.device)?.repeat((group, 1))?;
            let scores = (q.matmul(&k.t()?)? * f64::from(scale))?.broadcast_add(&mask)?;
            let out = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?; // [kv, group * t, hd]
            let out = out.reshape((c.num_heads, t, hd))?.transpose(0, 1)?;
            return Ok(out.contiguous()?.reshape((t, qw))?);
        }
        let mut out = vec![0f32; qw];
        let mut scores = vec![0f32; total];
        for h in 0..c.num_heads {
            let kv_offset = (h / group) * hd;
            let q = &queries[h * hd..(h + 1) * hd];
            for (p, score) in scores.iter_mut().enumerate() {
                let k = &keys[p * kvw + kv_offset..p * kvw + kv_offset + hd];
                *score = dot(q, k) * scale;
            }
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let o = &mut out[h * hd..(h + 1) * hd];
            for (p, s) in scores.iter().enumerate() {
                let w = s / sum;
                let v = &values[p * kvw + kv_offset..p * kvw + kv_offset + hd];
                o.iter_mut().zip(v).for_each(|(o, v)| *o += w * v);
            }
        }
        Ok(Tensor::from_vec(out, (1, qw), &self.device)?)
    }

    fn split_qkv(&self, qkv: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let c = &self.config;
        let (q_width, kv_width) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        Ok((
            qkv.narrow(D::Minus1, 0, q_width)?,
            qkv.narrow(D::Minus1, q_width, kv_width)?,
            qkv.narrow(D::Minus1, q_width + kv_width, kv_width)?,
        ))
    }

    /// Adds the LoRA updates of `adapters` to `y = layer(x)`: each adapter's update
    /// goes to its rows (all rows when it names none).
    fn with_lora(
        y: Tensor,
        x: &Tensor,
        adapters: &[RowAdapter<'_>],
        layer: usize,
        pick: fn(&AdapterLayer) -> Option<&LoraPair>,
    ) -> Result<Tensor> {
        let mut y = y;
        for (adapter, rows) in adapters {
            let Some(pair) = pick(adapter.layer(layer)) else { continue };
            y = match rows {
                None => (y + pair.delta(x)?)?,
                // One product per sequence, as when it decodes alone: a product over several
                // rows may round differently, and greedy choices would then depend on
                // which other requests share the batch.
                Some((indices, rows)) => {
                    let deltas =
                        indices.iter().map(|&i| pair.delta(&x.narrow(0, i, 1)?)).collect::<Result<Vec<_>>>()?;
                    y.index_add(rows, &Tensor::cat(&deltas, 0)?, 0)?
                }
            };
        }
        Ok(y)
    }

    /// The decoder blocks over the embeddings of `tokens`, with `attention(layer, qkv)`
    /// computing each layer's attention output; returns the final hidden states.
    fn blocks(
        &self,
        tokens: &[u32],
        adapters: &[RowAdapter<'_>],
        mut attention: impl FnMut(usize, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        let eps = self.config.rms_norm_eps as f32;
        for (layer, block) in self.blocks.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &block.attn_norm, eps)?;
            let qkv = Self::with_lora(block.qkv.forward(&h)?, &h, adapters, layer, |l| l.qkv.as_ref())?;
            let attn = attention(layer, &qkv)?;
            let o = Self::with_lora(block.o.forward(&attn)?, &attn, adapters, layer, |l| l.o.as_ref())?;
            x = (x + o)?;
            let h = candle_nn::ops::rms_norm(&x, &block.ffn_norm, eps)?;
            let gate_up = Self::with_lora(block.gate_up.forward(&h)?, &h, adapters, layer, |l| l.gate_up.as_ref())?;
            let half = gate_up.dim(D::Minus1)? / 2;
            let gate = candle_nn::ops::silu(&gate_up.narrow(D::Minus1, 0, half)?)?;
            let act = (gate * gate_up.narrow(D::Minus1, half, half)?)?;
            let down = Self::with_lora(block.down.forward(&act)?, &act, adapters, layer, |l| l.down.as_ref())?;
            x = (&x + down)?;
        }
        Ok(x)
    }

    /// Logits of hidden states.
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let x = candle_nn::ops::rms_norm(x, &self.norm, self.config.rms_norm_eps as f32)?;
        self.lm_head.forward(&x)
    }

    /// Runs `tokens` of one sequence through the model, appending them to its cache.
    /// Returns logits [n, vocab] of the last position, or of every position when
    /// `all_positions` (for perplexity).
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, all_positions: bool) -> Result<Tensor> {
        self.forward_with(tokens, cache, all_positions, None)
    }

    /// [`Self::forward`] with a LoRA adapter applied.
    pub fn forward_with(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        all_positions: bool,
        adapter: Option<&Adapter>,
    ) -> Result<Tensor> {
        if tokens.is_empty() {
            bail!("no tokens to run");
        }
        let adapters: Vec<RowAdapter<'_>> = adapter.map(|a| (a, None)).into_iter().collect();
        let mut x = self.blocks(tokens, &adapters, |layer, qkv| self.attend(layer, qkv, cache))?;
        cache.len += tokens.len();
        if !all_positions {
            x = x.narrow(0, tokens.len() - 1, 1)?;
        }
        self.logits(&x)
    }

    /// One decode step of several sequences at once: `tokens[i]` is the next token of
    /// the sequence cached in `caches[i]`. The projections and the MLP run as one batch;
    /// attention runs per sequence over its own cache. Returns logits [batch, vocab].
    pub fn decode_batch(&self, tokens: &[u32], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        self.decode_batch_with(tokens, caches, &vec![None; tokens.len()])
    }

    /// [`Self::decode_batch`] where sequence i uses `adapters[i]`.
    pub fn decode_batch_with(
        &self,
        tokens: &[u32],
        caches: &mut [&mut KvCache],
        adapters: &[Option<&Adapter>],
    ) -> Result<Tensor> {
        if tokens.len() != caches.len() || tokens.len() != adapters.len() || tokens.is_empty() {
            bail!(
                "decode_batch needs one token and adapter per cache, got {}, {} and {}",
                tokens.len(),
                adapters.len(),
                caches.len()
            );
        }
        // Rows grouped by adapter (by identity), so each adapter runs once per projection.
        let mut groups: Vec<(&Adapter, Vec<u32>)> = Vec::new();
        for (row, adapter) in adapters.iter().enumerate() {
            let Some(adapter) = adapter else { continue };
            match groups.iter_mut().find(|(a, _)| std::ptr::eq(*a, *adapter)) {
                Some((_, rows)) => rows.push(row as u32),
                None => groups.push((adapter, vec![row as u32])),
            }
        }
        let row_adapters = groups
            .into_iter()
            .map(|(a, rows)| -> Result<RowAdapter<'_>> {
                let tensor = Tensor::new(rows.as_slice(), &self.device)?;
                Ok((a, Some((rows.iter().map(|&r| r as usize).collect(), tensor))))
            })
            .collect::<Result<Vec<_>>>()?;
        let x = self.blocks(tokens, &row_adapters, |layer, qkv| {
            let mut outs = Vec::with_capacity(caches.len());
            for (i, cache) in caches.iter_mut().enumerate() {
                outs.push(self.attend(layer, &qkv.narrow(0, i, 1)?, cache)?);
            }
            Ok(Tensor::cat(&outs, 0)?)
        })?;
        for cache in caches.iter_mut() {
            cache.len += 1;
        }
        self.logits(&x)
    }

    /// Log-probabilities of each next token given the previous ones, for `tokens` in a
    /// fresh context: element i is log p(tokens[i + 1] | tokens[..=i]).
    pub fn token_log_probs(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.token_log_probs_with(tokens, None)
    }

    /// [`Self::token_log_probs`] with a LoRA adapter applied.
    pub fn token_log_probs_with(&self, tokens: &[u32], adapter: Option<&Adapter>) -> Result<Vec<f32>> {
        if tokens.len() < 2 {
            return Ok(Vec::new());
        }
        let mut cache = KvCache::default();
        let logits = self.forward_with(&tokens[..tokens.len() - 1], &mut cache, true, adapter)?;
        let log_probs = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
        let targets = Tensor::new(&tokens[1..], &self.device)?.unsqueeze(1)?;
        Ok(log_probs.gather(&targets, 1)?.squeeze(1)?.to_vec1()?)
    }
}
