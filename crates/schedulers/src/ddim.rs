//! DDIM exactly as diffusers' `schedulers/scheduling_ddim.py` computes it (beta schedules in
//! f32 with torch's linspace and a double-accumulated cumprod, the three timestep spacings,
//! steps_offset, set_alpha_to_one, clip_sample, epsilon/sample/v_prediction, eta with supplied
//! noise), plus the DDIM inversion step of FlipSketch's app.

use std::path::Path;

use candle_core::{DType, Tensor};
use serde::Deserialize;

use crate::{Error, Result};

/// Serde mirror of `scheduler_config.json` with diffusers' `DDIMScheduler` defaults. Keys of
/// other schedulers (e.g. `skip_prk_steps`, `variance_type` of a DDPM config) are ignored.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct DdimConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: String,
    pub trained_betas: Option<Vec<f64>>,
    pub clip_sample: bool,
    pub set_alpha_to_one: bool,
    pub steps_offset: i64,
    pub prediction_type: String,
    pub thresholding: bool,
    pub clip_sample_range: f64,
    pub timestep_spacing: String,
    pub rescale_betas_zero_snr: bool,
}

impl Default for DdimConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".into(),
            trained_betas: None,
            clip_sample: true,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: "epsilon".into(),
            thresholding: false,
            clip_sample_range: 1.0,
            timestep_spacing: "leading".into(),
            rescale_betas_zero_snr: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    Sample,
    VPrediction,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

/// Result of [`DdimScheduler::step`].
#[derive(Clone, Debug)]
pub struct DdimStepOutput {
    pub prev_sample: Tensor,
    pub pred_original_sample: Tensor,
}

#[derive(Clone, Debug)]
pub struct DdimScheduler {
    config: DdimConfig,
    prediction: PredictionType,
    spacing: Spacing,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    timesteps: Vec<i64>,
    num_inference_steps: usize,
}

/// `torch.linspace(start, end, steps, dtype=float32)`: torch's CPU kernel fills the first half
/// from the start and the second half from the end, each value a fused multiply-add.
fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            }
        })
        .collect()
}

/// `torch.cumprod` on CPU accumulates in double and rounds each output to f32.
fn cumprod_f32(xs: &[f32]) -> Vec<f32> {
    let mut acc = 1f64;
    xs.iter()
        .map(|&x| {
            acc *= x as f64;
            acc as f32
        })
        .collect()
}

/// diffusers `betas_for_alpha_bar` with the cosine transform, max_beta 0.999.
fn betas_for_alpha_bar(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// diffusers `rescale_zero_terminal_snr` (arXiv 2305.08891, algorithm 1), in f32.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut sqrt: Vec<f32> = cumprod_f32(&alphas).iter().map(|a| a.sqrt()).collect();
    let a0 = sqrt[0];
    let at = *sqrt.last().expect("non-empty");
    for s in sqrt.iter_mut() {
        *s -= at;
        *s *= a0 / (a0 - at);
    }
    let bar: Vec<f32> = sqrt.iter().map(|s| s * s).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for i in 1..bar.len() {
        out.push(1.0 - bar[i] / bar[i - 1]);
    }
    out
}

impl DdimScheduler {
    pub fn new(config: DdimConfig) -> Result<Self> {
        let n = config.num_train_timesteps;
        if n == 0 {
            return Err(Error::Invalid(
                "num_train_timesteps must be positive".into(),
            ));
        }
        if config.thresholding {
            return Err(Error::Invalid(
                "thresholding (dynamic thresholding) is not supported".into(),
            ));
        }
        let prediction = match config.prediction_type.as_str() {
            "epsilon" => PredictionType::Epsilon,
            "sample" => PredictionType::Sample,
            "v_prediction" => PredictionType::VPrediction,
            other => {
                return Err(Error::Invalid(format!(
                    "prediction_type {other:?} is not supported"
                )))
            }
        };
        let spacing = match config.timestep_spacing.as_str() {
            "leading" => Spacing::Leading,
            "trailing" => Spacing::Trailing,
            "linspace" => Spacing::Linspace,
            other => {
                return Err(Error::Invalid(format!(
                    "timestep_spacing {other:?} is not supported"
                )))
            }
        };
        let mut betas = if let Some(tb) = &config.trained_betas {
            if tb.len() != n {
                return Err(Error::Invalid(format!(
                    "trained_betas has {} values for {n} timesteps",
                    tb.len()
                )));
            }
            tb.iter().map(|&b| b as f32).collect()
        } else {
            match config.beta_schedule.as_str() {
                "linear" => torch_linspace_f32(config.beta_start as f32, config.beta_end as f32, n),
                "scaled_linear" => torch_linspace_f32(
                    config.beta_start.sqrt() as f32,
                    config.beta_end.sqrt() as f32,
                    n,
                )
                .into_iter()
                .map(|b| b * b)
                .collect(),
                "squaredcos_cap_v2" => betas_for_alpha_bar(n),
                other => {
                    return Err(Error::Invalid(format!(
                        "beta_schedule {other:?} is not supported"
                    )))
                }
            }
        };
        if config.rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        let mut alphas_cumprod = cumprod_f32(&alphas);
        if config.rescale_betas_zero_snr {
            // diffusers: close to 0 without being 0 so the first step does not divide by zero
            *alphas_cumprod.last_mut().expect("non-empty") = 2f32.powi(-24);
        }
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        // diffusers' initial timesteps before set_timesteps: all training steps, descending
        let timesteps = (0..n as i64).rev().collect();
        Ok(Self {
            config,
            prediction,
            spacing,
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps,
            num_inference_steps: 0,
        })
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        let config: DdimConfig = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        Self::new(config).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })
    }

    pub fn config(&self) -> &DdimConfig {
        &self.config
    }

    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    pub fn final_alpha_cumprod(&self) -> f32 {
        self.final_alpha_cumprod
    }

    pub fn timesteps(&self) -> &[i64] {
        &self.timesteps
    }

    pub fn num_inference_steps(&self) -> usize {
        self.num_inference_steps
    }

    /// diffusers `set_timesteps`.
    pub fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let n = self.config.num_train_timesteps;
        if num_inference_steps == 0 || num_inference_steps > n {
            return Err(Error::Invalid(format!(
                "num_inference_steps must be between 1 and num_train_timesteps ({n}), got {num_inference_steps}"
            )));
        }
        let s = num_inference_steps;
        let ts: Vec<i64> = match self.spacing {
            Spacing::Linspace => {
                // np.linspace(0, n - 1, s).round()[::-1]
                let stop = (n - 1) as f64;
                let step = if s > 1 { stop / (s - 1) as f64 } else { 0.0 };
                let mut v: Vec<i64> = (0..s)
                    .map(|i| {
                        let x = if s > 1 && i == s - 1 {
                            stop
                        } else {
                            i as f64 * step
                        };
                        x.round_ties_even() as i64
                    })
                    .collect();
                v.reverse();
                v
            }
            Spacing::Leading => {
                let ratio = (n / s) as i64;
                (0..s as i64)
                    .rev()
                    .map(|i| i * ratio + self.config.steps_offset)
                    .collect()
            }
            Spacing::Trailing => {
                // np.round(np.arange(n, 0, -n / s)) - 1
                let ratio = n as f64 / s as f64;
                let len = ((0.0 - n as f64) / -ratio).ceil() as usize;
                (0..len)
                    .map(|i| (n as f64 - i as f64 * ratio).round_ties_even() as i64 - 1)
                    .collect()
            }
        };
        self.timesteps = ts;
        self.num_inference_steps = s;
        Ok(())
    }

    fn step_ratio(&self) -> i64 {
        (self.config.num_train_timesteps / self.num_inference_steps.max(1)) as i64
    }

    fn alpha(&self, t: i64) -> Result<f32> {
        usize::try_from(t)
            .ok()
            .and_then(|i| self.alphas_cumprod.get(i).copied())
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "timestep {t} is outside 0..{}",
                    self.alphas_cumprod.len()
                ))
            })
    }

    /// diffusers `DDIMScheduler.step` (use_clipped_model_output=False). With `eta > 0` the
    /// variance noise must be supplied.
    pub fn step(
        &self,
        model_output: &Tensor,
        timestep: i64,
        sample: &Tensor,
        eta: f64,
        variance_noise: Option<&Tensor>,
    ) -> Result<DdimStepOutput> {
        if self.num_inference_steps == 0 {
            return Err(Error::Invalid(
                "set_timesteps must be called before step".into(),
            ));
        }
        let prev_t = timestep - self.step_ratio();
        let a_t = self.alpha(timestep)?;
        let a_prev = if prev_t >= 0 {
            self.alpha(prev_t)?
        } else {
            self.final_alpha_cumprod
        };
        let b_t = 1.0 - a_t;
        let dtype = sample.dtype();
        let x = sample.to_dtype(DType::F32)?;
        let e = model_output.to_dtype(DType::F32)?;

        // 1. predicted x_0 and epsilon
        let (pred_x0, pred_eps) = match self.prediction {
            PredictionType::Epsilon => {
                let x0 = ((&x - (&e * b_t.sqrt() as f64)?)? / a_t.sqrt() as f64)?;
                (x0, e)
            }
            PredictionType::Sample => {
                let eps = ((&x - (&e * a_t.sqrt() as f64)?)? / b_t.sqrt() as f64)?;
                (e, eps)
            }
            PredictionType::VPrediction => {
                let x0 = ((&x * a_t.sqrt() as f64)? - (&e * b_t.sqrt() as f64)?)?;
                let eps = ((&e * a_t.sqrt() as f64)? + (&x * b_t.sqrt() as f64)?)?;
                (x0, eps)
            }
        };
        // 2. clipping
        let pred_x0 = if self.config.clip_sample {
            let r = self.config.clip_sample_range as f32;
            pred_x0.clamp(-r, r)?
        } else {
            pred_x0
        };
        // 3. variance and direction
        let b_prev = 1.0 - a_prev;
        let variance = (b_prev / b_t) * (1.0 - a_t / a_prev);
        let std_dev_t = eta as f32 * variance.sqrt();
        let dir = (&pred_eps * (1.0 - a_prev - std_dev_t * std_dev_t).sqrt() as f64)?;
        let mut prev = ((&pred_x0 * a_prev.sqrt() as f64)? + dir)?;
        if eta > 0.0 {
            let noise = variance_noise
                .ok_or_else(|| Error::Invalid("eta > 0 needs variance noise".into()))?
                .to_dtype(DType::F32)?;
            prev = (prev + (noise * std_dev_t as f64)?)?;
        }
        Ok(DdimStepOutput {
            prev_sample: prev.to_dtype(dtype)?,
            pred_original_sample: pred_x0.to_dtype(dtype)?,
        })
    }

    /// The DDIM inversion step of FlipSketch's app: from timestep `t - 1000/S` (or the final
    /// alpha when that is negative) up to `t`, for an epsilon prediction:
    /// x0 = (x - sqrt(1-a) e) / sqrt(a), x' = sqrt(a_next) x0 + sqrt(1-a_next) e.
    pub fn inversion_step(
        &self,
        model_output: &Tensor,
        timestep: i64,
        sample: &Tensor,
    ) -> Result<Tensor> {
        if self.num_inference_steps == 0 {
            return Err(Error::Invalid(
                "set_timesteps must be called before inversion_step".into(),
            ));
        }
        let last = self.config.num_train_timesteps as i64 - 1;
        let cur = (timestep - self.step_ratio()).min(last);
        let a = if cur >= 0 {
            self.alpha(cur)?
        } else {
            self.final_alpha_cumprod
        };
        let a_next = self.alpha(timestep)?;
        let dtype = sample.dtype();
        let x = sample.to_dtype(DType::F32)?;
        let e = model_output.to_dtype(DType::F32)?;
        let x0 = ((&x - (&e * (1.0 - a).sqrt() as f64)?)? / a.sqrt() as f64)?;
        let next = ((x0 * a_next.sqrt() as f64)? + (&e * (1.0 - a_next).sqrt() as f64)?)?;
        Ok(next.to_dtype(dtype)?)
    }
}
