//! Choosing the next token: greedy, temperature, top-k, top-p, min-p and repetition penalty as `transformers` defines them, each request with its own seeded generator.
//!
//! The logits are processed in `transformers`' order (repetition penalty, then temperature,
//! top-k, top-p, min-p; removed tokens get -inf) and a token is drawn by inverting the
//! cumulative distribution at a uniform number from the request's own generator (SplitMix64),
//! so one request's tokens depend only on its seed, prompt and logits, never on other requests
//! running beside it or on libtorch's global generator.
use crate::config::invalid_config;
use anyhow::Result;
use std::hash::{BuildHasher, Hasher};
use tch::{Kind, Tensor};

/// How one request's tokens are chosen and when its generation stops.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    /// At most this many new tokens.
    pub max_tokens: i64,
    /// Logits are divided by it before sampling; 0 is greedy (the most likely token).
    pub temperature: f64,
    /// Only the `top_k` most likely tokens can be drawn; 0 keeps all.
    pub top_k: i64,
    /// Only the fewest most likely tokens whose probabilities sum to at least `top_p` can be
    /// drawn; 1 keeps all.
    pub top_p: f64,
    /// Tokens less likely than `min_p` times the most likely one are dropped; 0 keeps all.
    pub min_p: f64,
    /// Above 1, tokens already in the prompt or the output are discouraged: their logits are
    /// divided by it when positive, multiplied when negative; 1 is off.
    pub repetition_penalty: f64,
    /// The request's generator's seed; `None`: a random one.
    pub seed: Option<u64>,
    /// Generating one of these ends the request (the token is not part of the output).
    pub stop_token_ids: Vec<i64>,
    /// When the decoded output contains one of these the request ends; its text stops before it.
    pub stop: Vec<String>,
}

impl Default for SamplingParams {
    /// vLLM's defaults: plain sampling at temperature 1, no stops.
    fn default() -> Self {
        SamplingParams {
            max_tokens: 16,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: None,
            stop_token_ids: Vec::new(),
            stop: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// The most likely token at every step, for at most `max_tokens` tokens.
    pub fn greedy(max_tokens: i64) -> SamplingParams {
        SamplingParams { max_tokens, temperature: 0.0, ..SamplingParams::default() }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Refuses values without a meaning, naming the option and its range.
    pub fn validate(&self) -> Result<()> {
        let refuse = |what: String| Err(invalid_config(what));
        if self.max_tokens < 1 {
            return refuse(format!("max_tokens = {} must be at least 1", self.max_tokens));
        }
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return refuse(format!("temperature = {} must be >= 0 (0 is greedy)", self.temperature));
        }
        if self.top_k < 0 {
            return refuse(format!("top_k = {} must be >= 0 (0 keeps every token)", self.top_k));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return refuse(format!("top_p = {} must be in (0, 1] (1 keeps every token)", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return refuse(format!("min_p = {} must be in [0, 1] (0 keeps every token)", self.min_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return refuse(format!("repetition_penalty = {} must be > 0 (1 is off)", self.repetition_penalty));
        }
        if self.stop.iter().any(String::is_empty) {
            return refuse("a stop string must not be empty".to_string());
        }
        Ok(())
    }
}

/// SplitMix64 (Steele, Lea and Flood 2014): a small generator of one request's uniform numbers.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1], 53 bits.
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }
}

/// One request's token chooser: its parameters and its generator.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
}

impl Sampler {
    pub fn new(params: &SamplingParams) -> Sampler {
        let seed =
            params.seed.unwrap_or_else(|| std::collections::hash_map::RandomState::new().build_hasher().finish());
        Sampler { params: params.clone(), rng: SplitMix64(seed) }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The next token from `logits` [vocab] (the whole vocabulary) of a sequence whose prompt
    /// and output so far are `history`. Reads one number back from the device.
    pub fn sample(&mut self, logits: &Tensor, history: &[i64]) -> i64 {
        let scores = process_logits(logits, history, &self.params);
        if self.params.is_greedy() {
            return scores.argmax(0, false).int64_value(&[]);
        }
        let cumulative = scores.softmax(-1, Kind::Double).cumsum(0, Kind::Double);
        // Scaled by the total so that rounding can never put the draw past the last token.
        let draw = cumulative.select(0, -1) * self.rng.uniform();
        let vocab = cumulative.size()[0];
        cumulative.lt_tensor(&draw).sum(Kind::Int64).clamp_max(vocab - 1).int64_value(&[])
    }
}

/// `logits` [vocab] after the processors `params` turns on, in `transformers`' order:
/// repetition penalty, then (unless greedy) temperature, top-k, top-p and min-p. Removed tokens
/// are at -inf; half-precision logits come back in f32.
pub fn process_logits(logits: &Tensor, history: &[i64], params: &SamplingParams) -> Tensor {
    let mut scores = if logits.kind() == Kind::BFloat16 { logits.to_kind(Kind::Float) } else { logits.shallow_clone() };
    if params.repetition_penalty != 1.0 {
        scores = repetition_penalty(&scores, history, params.repetition_penalty);
    }
    if params.is_greedy() {
        return scores;
    }
    if params.temperature != 1.0 {
        scores = scores.g_div_scalar(params.temperature);
    }
    let vocab = scores.size()[0];
    if params.top_k > 0 && params.top_k < vocab {
        let (kept, _) = scores.topk(params.top_k, 0, true, true);
        scores = scores.masked_fill(&scores.lt_tensor(&kept.select(0, -1)), f64::NEG_INFINITY);
    }
    if params.top_p < 1.0 {
        let (sorted, order) = scores.sort(0, false);
        let cumulative = sorted.softmax(-1, sorted.kind()).cumsum(0, sorted.kind());
        let remove = cumulative.le(1.0 - params.top_p);
        // The most likely token always stays.
        let _ = remove.narrow(0, vocab - 1, 1).fill_(0);
        scores = scores.masked_fill(&remove.zeros_like().scatter(0, &order, &remove), f64::NEG_INFINITY);
    }
    if params.min_p > 0.0 {
        let probabilities = scores.softmax(-1, scores.kind());
        let threshold = probabilities.max() * params.min_p;
        scores = scores.masked_fill(&probabilities.lt_tensor(&threshold), f64::NEG_INFINITY);
    }
    scores
}

/// `transformers`' `RepetitionPenaltyLogitsProcessor`: the logits of the tokens in `history`
/// divided by `penalty` where positive, multiplied by it where negative.
pub fn repetition_penalty(logits: &Tensor, history: &[i64], penalty: f64) -> Tensor {
    let mut tokens = history.to_vec();
    tokens.sort_unstable();
    tokens.dedup();
    if tokens.is_empty() {
        return logits.shallow_clone();
    }
    let index = Tensor::from_slice(&tokens).to_device(logits.device());
    let seen = logits.gather(0, &index, false);
    let penalized = (&seen * penalty).where_self(&seen.lt(0.0), &(&seen / penalty));
    logits.scatter(0, &index, &penalized)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Tensor {
        Tensor::from_slice(&[1.0f32, 3.0, -2.0, 0.5, 2.9, -0.1, 0.0, 2.0])
    }

    #[test]
    fn greedy_is_the_argmax_after_the_penalty() {
        let mut sampler = Sampler::new(&SamplingParams::greedy(4));
        assert_eq!(sampler.sample(&logits(), &[]), 1);
        let penalized = SamplingParams { repetition_penalty: 2.0, ..SamplingParams::greedy(4) };
        assert_eq!(Sampler::new(&penalized).sample(&logits(), &[1, 1, 2]), 4);
    }

    #[test]
    fn the_same_seed_draws_the_same_tokens_and_top_k_1_is_greedy() {
        let params = SamplingParams { seed: Some(7), temperature: 1.5, ..SamplingParams::default() };
        let draws = |params: &SamplingParams| {
            let mut sampler = Sampler::new(params);
            (0..200).map(|_| sampler.sample(&logits(), &[])).collect::<Vec<_>>()
        };
        let first = draws(&params);
        assert_eq!(first, draws(&params));
        assert_ne!(first, draws(&SamplingParams { seed: Some(8), ..params.clone() }));
        let distinct: std::collections::BTreeSet<_> = first.iter().collect();
        assert!(distinct.len() >= 6, "temperature 1.5 reaches most tokens: {distinct:?}");
        let top1 = draws(&SamplingParams { top_k: 1, ..params.clone() });
        assert!(top1.iter().all(|&t| t == 1));
        let top2 = draws(&SamplingParams { top_k: 2, ..params });
        assert!(top2.iter().all(|&t| t == 1 || t == 4) && top2.contains(&4));
    }

    #[test]
    fn top_p_and_min_p_keep_the_likely_tokens() {
        let kept = |params: SamplingParams| -> Vec<bool> {
            let scores = process_logits(&logits(), &[], &SamplingParams { temperature: 1.0, ..params });
            Vec::<bool>::try_from(scores.isfinite()).unwrap()
        };
        // Probabilities ~ 0.06 0.34 0.003 0.03 0.31 0.02 0.02 0.13 (descending: 1, 4, 7, 0, ...).
        let tiny = SamplingParams { top_p: 1e-6, ..SamplingParams::default() };
        assert_eq!(kept(tiny), [false, true, false, false, false, false, false, false]);
        let most = SamplingParams { top_p: 0.7, ..SamplingParams::default() };
        assert_eq!(kept(most), [false, true, false, false, true, false, false, false]);
        let more = SamplingParams { top_p: 0.8, ..SamplingParams::default() };
        assert_eq!(kept(more), [false, true, false, false, true, false, false, true]);
        let half = SamplingParams { min_p: 0.5, ..SamplingParams::default() };
        assert_eq!(kept(half), [false, true, false, false, true, false, false, false]);
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        let refused = |params: SamplingParams| params.validate().unwrap_err().to_string();
        assert!(refused(SamplingParams { temperature: -0.5, ..Default::default() }).contains("temperature = -0.5"));
        assert!(refused(SamplingParams { top_p: 0.0, ..Default::default() }).contains("top_p = 0 must be in (0, 1]"));
        assert!(refused(SamplingParams { top_p: 1.5, ..Default::default() }).contains("top_p = 1.5"));
        assert!(refused(SamplingParams { min_p: 2.0, ..Default::default() }).contains("min_p = 2"));
        assert!(refused(SamplingParams { max_tokens: 0, ..Default::default() }).contains("max_tokens = 0"));
        assert!(
            refused(SamplingParams { repetition_penalty: 0.0, ..Default::default() }).contains("repetition_penalty")
        );
        assert!(refused(SamplingParams { stop: vec![String::new()], ..Default::default() }).contains("stop string"));
        assert!(SamplingParams::default().validate().is_ok());
    }
}
