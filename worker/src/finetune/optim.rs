//! AdamW with decoupled weight decay, whose state is saved in checkpoints, and the
//! learning-rate schedules.

use anyhow::Result;
use candle_core::{DType, Tensor, Var};

/// AdamW over a fixed list of variables.
#[derive(Debug)]
pub struct AdamW {
    /// First moments, one per variable.
    pub m: Vec<Tensor>,
    /// Second moments.
    pub v: Vec<Tensor>,
    /// Steps taken.
    pub t: u64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
}

impl AdamW {
    /// Fresh state for `vars`.
    pub fn new(vars: &[Var], weight_decay: f64) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        Ok(Self {
            m: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
            v: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
            t: 0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
        })
    }

    /// One update with gradients `grads` (same order as the variables) at rate `lr`.
    pub fn step(&mut self, vars: &[Var], grads: &[Tensor], lr: f64) -> Result<()> {
        self.t += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let c1 = 1.0 - b1.powi(self.t as i32);
        let c2 = 1.0 - b2.powi(self.t as i32);
        for i in 0..vars.len() {
            let g = &grads[i];
            self.m[i] = ((&self.m[i] * b1)? + (g * (1.0 - b1))?)?;
            self.v[i] = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let m_hat = (&self.m[i] / c1)?;
            let v_hat = (&self.v[i] / c2)?;
            let update = (m_hat / (v_hat.sqrt()? + self.eps)?)?;
            let p = vars[i].as_tensor();
            let decayed = if self.weight_decay > 0.0 { (p * (1.0 - lr * self.weight_decay))? } else { p.clone() };
            vars[i].set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }
}

/// Scales `grads` so their global L2 norm is at most `max_norm` (0: no clipping); returns
/// the norm before clipping.
pub fn clip(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.iter() {
        total += f64::from(g.to_dtype(DType::F32)?.sqr()?.sum_all()?.to_scalar::<f32>()?);
    }
    let norm = total.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

/// The learning rate at optimizer step `step` (from 0) of `total`: linear warmup over
/// `warmup` steps to `peak`, then cosine or linear decay to 0, or constant.
pub fn learning_rate(schedule: &str, peak: f64, step: u64, warmup: u64, total: u64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    match schedule {
        "constant" => peak,
        "linear" => peak * (1.0 - progress),
        _ => peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedules_warm_up_then_decay() {
        assert!((learning_rate("cosine", 1.0, 0, 4, 20) - 0.25).abs() < 1e-12);
        assert!((learning_rate("cosine", 1.0, 3, 4, 20) - 1.0).abs() < 1e-12);
        assert!((learning_rate("cosine", 1.0, 4, 4, 20) - 1.0).abs() < 1e-12);
        assert!((learning_rate("cosine", 1.0, 12, 4, 20) - 0.5).abs() < 1e-12);
        assert!((learning_rate("linear", 1.0, 12, 4, 20) - 0.5).abs() < 1e-12);
        assert_eq!(learning_rate("constant", 0.3, 19, 4, 20), 0.3);
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let mut g = vec![Tensor::new(&[3f32, 4.0], &Device::Cpu).expect("t")];
        let norm = clip(&mut g, 1.0).expect("clips");
        assert!((norm - 5.0).abs() < 1e-6);
        let after: Vec<f32> = g[0].to_vec1().expect("v");
        assert!((after[0] - 0.6).abs() < 1e-4 && (after[1] - 0.8).abs() < 1e-4, "{after:?}");
    }

    #[test]
    fn adamw_minimises_a_quadratic() {
        let x = Var::new(&[5f32, -3.0], &Device::Cpu).expect("var");
        let vars = vec![x.clone()];
        let mut opt = AdamW::new(&vars, 0.0).expect("opt");
        for _ in 0..500 {
            let loss = x.as_tensor().sqr().expect("sq").sum_all().expect("sum");
            let grads = loss.backward().expect("backward");
            let g = grads.get(x.as_tensor()).expect("grad").clone();
            opt.step(&vars, &[g], 0.05).expect("step");
        }
        let v: Vec<f32> = x.as_tensor().to_vec1().expect("v");
        assert!(v.iter().all(|x| x.abs() < 0.05), "{v:?}");
    }
}
