//! Choosing the next token from one row of logits: repetition penalty, temperature, top-k, top-p,
//! a seeded random generator per request, and log-probabilities.
//!
//! Works on host `f32` slices, one sequence at a time, so every request of a batch keeps its own
//! settings and its own random stream: a seeded request draws the same tokens alone or batched.

use rand::distr::{weighted::WeightedIndex, Distribution};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::generation::SamplingParams;
use crate::{Error, Result};

/// A token with its log-probability under the distribution it was sampled from (after the
/// repetition penalty, before temperature and truncation: the model's own distribution).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
}

/// The chosen token and, when asked for, its log-probability and the most likely alternatives.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Sampled {
    pub token: u32,
    /// `Some` when [`SamplingParams::logprobs`] is set.
    pub logprob: Option<f32>,
    /// The `top_logprobs` most likely tokens, most likely first.
    pub top: Vec<TokenLogprob>,
}

/// The sampler of one request: its settings and its random generator.
#[derive(Debug, Clone)]
pub struct Sampler {
    rng: StdRng,
    temperature: f64,
    top_k: Option<usize>,
    top_p: Option<f64>,
    repetition_penalty: f32,
    repeat_last_n: usize,
    logprobs: Option<usize>,
}

impl Sampler {
    pub fn new(params: &SamplingParams) -> Self {
        Self {
            rng: StdRng::seed_from_u64(params.seed),
            temperature: params.temperature,
            top_k: params.top_k,
            top_p: params.top_p.filter(|p| *p < 1.0),
            repetition_penalty: params.repetition_penalty,
            repeat_last_n: params.repeat_last_n,
            logprobs: params.logprobs,
        }
    }

    /// Picks the next token from `logits` (one row, `[vocab]`); `history` holds the prompt and the
    /// tokens generated so far (for the repetition penalty).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> Result<Sampled> {
        if logits.is_empty() {
            return Err(Error::Input("cannot sample from an empty row of logits".into()));
        }
        // Greedy or sampled alike: a NaN, or no value above -inf, is a model whose numbers broke
        // down (NaN weights, an overflow), never a token to pick.
        if logits.iter().any(|v| v.is_nan()) || !logits.iter().any(|v| *v > f32::NEG_INFINITY) {
            return Err(Error::Input("the logits hold NaN or no finite value: the model's numbers broke down".into()));
        }
        let mut logits = logits.to_vec();
        if self.repetition_penalty != 1.0 {
            let start = history.len().saturating_sub(self.repeat_last_n);
            apply_repetition_penalty(&mut logits, self.repetition_penalty, &history[start..]);
        }
        let token = if self.temperature == 0.0 { argmax(&logits) } else { self.draw(&logits)? };
        let (logprob, top) = match self.logprobs {
            None => (None, Vec::new()),
            Some(n) => {
                let lp = log_softmax(&logits);
                (Some(lp[token as usize]), top_logprobs(&lp, n))
            }
        };
        Ok(Sampled { token, logprob, top })
    }

    /// `token` chosen by the caller instead of sampled (the random stream does not advance), with
    /// its log-probabilities when they were asked for.
    pub fn force(&mut self, logits: &[f32], token: u32) -> Sampled {
        match self.logprobs {
            None => Sampled { token, logprob: None, top: Vec::new() },
            Some(n) => {
                let lp = log_softmax(logits);
                Sampled { token, logprob: lp.get(token as usize).copied(), top: top_logprobs(&lp, n) }
            }
        }
    }

    /// A random draw from `softmax(logits / temperature)`, truncated by top-k then top-p.
    fn draw(&mut self, logits: &[f32]) -> Result<u32> {
        let t = self.temperature as f32;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return Err(Error::Input("the logits hold no finite value to sample from".into()));
        }
        let mut probs: Vec<(u32, f32)> =
            logits.iter().enumerate().map(|(i, &l)| (i as u32, ((l - max) / t).exp())).collect();
        let k = self.top_k.unwrap_or(probs.len()).min(probs.len());
        if k < probs.len() || self.top_p.is_some() {
            // Most likely first; ties keep the lower token id first.
            probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            probs.truncate(k.max(1));
            if let Some(p) = self.top_p {
                let total: f32 = probs.iter().map(|x| x.1).sum();
                let mut cumulative = 0.0;
                let keep = probs
                    .iter()
                    .position(|x| {
                        cumulative += x.1 / total;
                        cumulative as f64 >= p
                    })
                    .map_or(probs.len(), |i| i + 1);
                probs.truncate(keep);
            }
        }
        let dist = WeightedIndex::new(probs.iter().map(|x| x.1))
            .map_err(|e| Error::Input(format!("cannot sample from these logits: {e}")))?;
        Ok(probs[dist.sample(&mut self.rng)].0)
    }
}

/// The index of the largest value (the first one on ties).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// Divides the positive logits (multiplies the negative ones) of every token in `seen` by
/// `penalty`, once per distinct token.
pub fn apply_repetition_penalty(logits: &mut [f32], penalty: f32, seen: &[u32]) {
    let mut done = std::collections::HashSet::new();
    for &t in seen {
        if let Some(l) = logits.get_mut(t as usize) {
            if done.insert(t) {
                *l = if *l >= 0.0 { *l / penalty } else { *l * penalty };
            }
        }
    }
}

/// `log(softmax(logits))`, computed stably in f64.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    let log_sum = sum.ln() + max;
    logits.iter().map(|&l| (l as f64 - log_sum) as f32).collect()
}

/// The `n` most likely tokens of a row of log-probabilities, most likely first (ties: lower id).
pub fn top_logprobs(logprobs: &[f32], n: usize) -> Vec<TokenLogprob> {
    let mut idx: Vec<u32> = (0..logprobs.len() as u32).collect();
    let n = n.min(idx.len());
    let by = |a: &u32, b: &u32| logprobs[*b as usize].total_cmp(&logprobs[*a as usize]).then(a.cmp(b));
    if n < idx.len() && n > 0 {
        idx.select_nth_unstable_by(n - 1, by);
    }
    idx.truncate(n);
    idx.sort_by(by);
    idx.into_iter().map(|token| TokenLogprob { token, logprob: logprobs[token as usize] }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f64, top_k: Option<usize>, top_p: Option<f64>, seed: u64) -> SamplingParams {
        SamplingParams { temperature, top_k, top_p, seed, ..Default::default() }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(&params(0.0, None, None, 1));
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0], &[]).unwrap().token, 1);
    }

    /// NaN logits (or none above -inf) are an error, greedy or sampled: never token 0.
    #[test]
    fn broken_logits_are_an_error_not_a_token() {
        for t in [0.0, 0.7] {
            for logits in [vec![f32::NAN; 4], vec![0.5, f32::NAN, 1.0], vec![f32::NEG_INFINITY; 3]] {
                let mut s = Sampler::new(&params(t, None, None, 1));
                assert!(s.sample(&logits, &[]).is_err(), "t={t} {logits:?}");
            }
            let mut s = Sampler::new(&params(t, None, None, 1));
            assert_eq!(s.sample(&[f32::NEG_INFINITY, 2.0, f32::NEG_INFINITY], &[]).unwrap().token, 1);
        }
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_keeps_the_nucleus() {
        let logits = [0.0, 2.0, 1.0, 1.9];
        for seed in 0..50 {
            let mut s = Sampler::new(&params(1.0, Some(1), None, seed));
            assert_eq!(s.sample(&logits, &[]).unwrap().token, 1);
            // A tiny p keeps only the most likely token.
            let mut s = Sampler::new(&params(1.0, None, Some(0.01), seed));
            assert_eq!(s.sample(&logits, &[]).unwrap().token, 1);
            // top-k 2: only tokens 1 and 3 can come out.
            let mut s = Sampler::new(&params(1.0, Some(2), None, seed));
            assert!([1, 3].contains(&s.sample(&logits, &[]).unwrap().token));
        }
    }

    #[test]
    fn draws_follow_the_distribution_and_the_seed() {
        let logits = [0.0f32, (3.0f32).ln()]; // probabilities 1/4 and 3/4
        let mut s = Sampler::new(&params(1.0, None, None, 7));
        let ones = (0..4000).filter(|_| s.sample(&logits, &[]).unwrap().token == 1).count();
        assert!((2850..3150).contains(&ones), "{ones}");
        let draw = |seed| {
            let mut s = Sampler::new(&params(0.8, None, None, seed));
            (0..32).map(|_| s.sample(&[0.0, 0.5, 0.2, 0.1], &[]).unwrap().token).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }

    #[test]
    fn repetition_penalty_and_logprobs() {
        let mut l = vec![2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut l, 2.0, &[0, 1, 0]);
        assert_eq!(l, vec![1.0, -4.0, 1.0]);
        let lp = log_softmax(&[1.0, 2.0, 3.0]);
        let total: f64 = lp.iter().map(|&x| (x as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        let top = top_logprobs(&lp, 2);
        assert_eq!(top.iter().map(|t| t.token).collect::<Vec<_>>(), vec![2, 1]);
        let mut s = Sampler::new(&SamplingParams { logprobs: Some(2), ..params(0.0, None, None, 0) });
        let out = s.sample(&[1.0, 2.0, 3.0], &[]).unwrap();
        assert_eq!((out.token, out.logprob, out.top.len()), (2, Some(lp[2]), 2));
    }
}
