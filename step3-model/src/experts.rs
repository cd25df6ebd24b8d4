//! Expert health: is every routed expert of every MoE layer alive, fed and contributing?
//!
//! StepFun reports vanishing expert output norms among the problems seen while training Step3.
//! This module measures them, in three independent ways:
//!
//! * [`weight_stats`]: from the weights alone, streamed one expert at a time out of the mapped
//!   checkpoint (block-FP8 experts dequantised per expert), so it scales to the 48 × 56 experts of
//!   the real checkpoint without loading the model: the Frobenius norm of each expert's
//!   `gate_proj`, `up_proj` and `down_proj`, their ratios to the layer's median, and the shared
//!   expert's norms for scale.
//! * [`routing_stats`]: from prompts run through a loaded model: per layer × expert the share of
//!   routed token slots, the mean routing weight when chosen, and the mean L2 norm of the expert's
//!   output *before* the routing weight, measured on every token reaching the layer (so experts
//!   the router never picks are measured too), with its ratio to the layer median and the shared
//!   expert's output norm alongside.
//! * [`ExpertLoad`]: a small counter of routed tokens per layer × expert, fed from
//!   [`LayerRouting`] traces, for anything that runs the model anyway (an engine exporting routing
//!   balance, for instance).
//!
//! [`FlagRules`] turns the numbers into flags (dead, starved, vanishing) with the rule spelled out.

use candle_core::{DType, Device, Tensor, D};
use serde::Serialize;
use step3_nn::BlockFp8;

use crate::text::{LayerRouting, Step3TextModel};
use crate::{inventory, Error, Result, Step3Checkpoint};

/// Routed tokens per MoE layer × expert, accumulated from routing traces.
///
/// ```no_run
/// # fn demo(model: &step3_model::Step3TextModel, trace: &[step3_model::LayerRouting]) -> step3_model::Result<()> {
/// let mut load = step3_model::experts::ExpertLoad::for_model(model.config());
/// for r in trace {
///     load.record(r)?;
/// }
/// println!("{:?}", load.counts(4));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExpertLoad {
    /// The MoE layers counted, ascending.
    layers: Vec<usize>,
    num_experts: usize,
    /// `counts[i][e]`: routed slots of expert `e` in `layers[i]`.
    counts: Vec<Vec<u64>>,
    /// Tokens that went through `layers[i]`.
    tokens: Vec<u64>,
}

impl ExpertLoad {
    /// A zeroed counter for `layers` (MoE layer indices) of `num_experts` experts each.
    pub fn new(layers: &[usize], num_experts: usize) -> Self {
        let mut layers = layers.to_vec();
        layers.sort_unstable();
        layers.dedup();
        let n = layers.len();
        Self { layers, num_experts, counts: vec![vec![0; num_experts]; n], tokens: vec![0; n] }
    }

    /// A zeroed counter for every MoE layer of a text config.
    pub fn for_model(cfg: &crate::TextConfig) -> Self {
        Self::new(&cfg.moe_layers_enum, cfg.moe_num_experts)
    }

    fn slot(&self, layer: usize) -> Result<usize> {
        self.layers
            .binary_search(&layer)
            .map_err(|_| Error::Input(format!("layer {layer} is not one of the counted MoE layers {:?}", self.layers)))
    }

    /// Counts every row of one layer's routing (`ids [N, k]`).
    pub fn record(&mut self, r: &LayerRouting) -> Result<()> {
        let rows = r.routing.ids.dim(0)?;
        self.record_rows(r, 0..rows)
    }

    /// Counts only the real tokens of a right-padded batch step: row `i` of sequence `b` is
    /// `b · t + i`, real when `i < lens[b]`.
    pub fn record_padded(&mut self, r: &LayerRouting, lens: &[usize], t: usize) -> Result<()> {
        self.record_rows(r, lens.iter().enumerate().flat_map(|(b, &len)| (0..len.min(t)).map(move |i| b * t + i)))
    }

    fn record_rows(&mut self, r: &LayerRouting, rows: impl Iterator<Item = usize>) -> Result<()> {
        let i = self.slot(r.layer)?;
        let ids = r.routing.ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        for row in rows {
            let Some(chosen) = ids.get(row) else {
                return Err(Error::Input(format!("row {row} is outside the routing of {} rows", ids.len())));
            };
            for &e in chosen {
                let c = self.counts[i].get_mut(e as usize).ok_or_else(|| {
                    Error::Input(format!("layer {} routed to expert {e} of {}", r.layer, self.num_experts))
                })?;
                *c += 1;
            }
            self.tokens[i] += 1;
        }
        Ok(())
    }

    /// Adds another counter over the same layers and experts.
    pub fn merge(&mut self, other: &ExpertLoad) -> Result<()> {
        if other.layers != self.layers || other.num_experts != self.num_experts {
            return Err(Error::Input("expert-load counters over different layers or experts".into()));
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
        }
        self.tokens.iter_mut().zip(&other.tokens).for_each(|(a, b)| *a += b);
        Ok(())
    }

    /// Zeroes every count.
    pub fn reset(&mut self) {
        self.counts.iter_mut().for_each(|c| c.iter_mut().for_each(|v| *v = 0));
        self.tokens.iter_mut().for_each(|v| *v = 0);
    }

    pub fn layers(&self) -> &[usize] {
        &self.layers
    }

    pub fn num_experts(&self) -> usize {
        self.num_experts
    }

    /// Routed slots per expert of `layer` (None if the layer is not counted).
    pub fn counts(&self, layer: usize) -> Option<&[u64]> {
        self.slot(layer).ok().map(|i| self.counts[i].as_slice())
    }

    /// Tokens that went through `layer`.
    pub fn tokens(&self, layer: usize) -> u64 {
        self.slot(layer).map_or(0, |i| self.tokens[i])
    }

    /// Each expert's share of the routed slots of `layer` (sums to 1; 1/E when balanced).
    pub fn shares(&self, layer: usize) -> Option<Vec<f64>> {
        let counts = self.counts(layer)?;
        let total: u64 = counts.iter().sum();
        Some(counts.iter().map(|&c| if total == 0 { 0.0 } else { c as f64 / total as f64 }).collect())
    }
}

/// Frobenius norms of one expert's three projections.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ProjectionNorms {
    pub gate: f64,
    pub up: f64,
    pub down: f64,
}

impl ProjectionNorms {
    fn ratio(&self, median: &ProjectionNorms) -> ProjectionNorms {
        let r = |a: f64, m: f64| if m > 0.0 { a / m } else { f64::NAN };
        ProjectionNorms { gate: r(self.gate, median.gate), up: r(self.up, median.up), down: r(self.down, median.down) }
    }

    /// The smallest of the three.
    pub fn min(&self) -> f64 {
        self.gate.min(self.up).min(self.down)
    }
}

/// Weight norms of one MoE layer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerWeightStats {
    pub layer: usize,
    /// Per expert.
    pub experts: Vec<ProjectionNorms>,
    /// Per expert, each norm divided by the layer median of that projection.
    pub ratios: Vec<ProjectionNorms>,
    pub median: ProjectionNorms,
    /// The shared expert (`share_expert.*`), for scale.
    pub shared: ProjectionNorms,
}

/// [`weight_stats`] of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WeightStats {
    pub num_experts: usize,
    pub layers: Vec<LayerWeightStats>,
}

/// Median of finite values (NaN if none).
fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// `‖W‖_F` of a dense f32 matrix: row sums of squares in f32, then summed in f64.
fn frobenius(w: &Tensor) -> Result<f64> {
    let rows = w.to_dtype(DType::F32)?.sqr()?.sum(D::Minus1)?.to_dtype(DType::F64)?;
    Ok(rows.sum_all()?.to_scalar::<f64>()?.sqrt())
}

/// Norm of slice `index` of a (possibly stacked, possibly block-FP8) weight, streamed from the
/// mapping. `index = None` for an unstacked weight.
fn weight_norm(ckpt: &Step3Checkpoint, name: &str, index: Option<usize>) -> Result<f64> {
    let weights = ckpt.weights();
    let dev = Device::Cpu;
    let load = |n: &str| match index {
        Some(i) => weights.load_index(n, i, &dev),
        None => {
            let info = weights.info(n).ok_or_else(|| Error::MissingTensor { name: n.to_string(), within: None })?;
            let dtype = info.candle_dtype().unwrap_or(DType::F32);
            weights.load(n, None, dtype, &dev)
        }
    };
    let values = load(name)?;
    match (&ckpt.config().quantization, inventory::scale_name(weights, name)) {
        (Some(q), Some(scale)) if values.dtype() == DType::F8E4M3 => {
            let scale = load(&scale)?.to_dtype(DType::F32)?;
            frobenius(&BlockFp8::new(values, scale, q.weight_block_size, DType::F32)?.dequantize()?)
        }
        _ => frobenius(&values),
    }
}

/// Weight-only statistics of every MoE layer, one expert at a time out of the mapped checkpoint
/// (never the whole model in memory). `progress(done, total)` is called after each expert.
pub fn weight_stats(ckpt: &Step3Checkpoint, progress: &mut dyn FnMut(usize, usize)) -> Result<WeightStats> {
    let cfg = &ckpt.config().text;
    let e = cfg.moe_num_experts;
    let total = cfg.moe_layers_enum.len() * (e + 1);
    let mut done = 0;
    let mut layers = Vec::new();
    for &layer in &cfg.moe_layers_enum {
        let p = format!("model.layers.{layer}");
        let mut experts = Vec::with_capacity(e);
        for i in 0..e {
            let norm = |proj: &str| weight_norm(ckpt, &format!("{p}.moe.{proj}.weight"), Some(i));
            experts.push(ProjectionNorms { gate: norm("gate_proj")?, up: norm("up_proj")?, down: norm("down_proj")? });
            done += 1;
            progress(done, total);
        }
        let shared = |proj: &str| weight_norm(ckpt, &format!("{p}.share_expert.{proj}.weight"), None);
        let shared = ProjectionNorms { gate: shared("gate_proj")?, up: shared("up_proj")?, down: shared("down_proj")? };
        done += 1;
        progress(done, total);
        let median = ProjectionNorms {
            gate: median(experts.iter().map(|n| n.gate)),
            up: median(experts.iter().map(|n| n.up)),
            down: median(experts.iter().map(|n| n.down)),
        };
        let ratios = experts.iter().map(|n| n.ratio(&median)).collect();
        layers.push(LayerWeightStats { layer, experts, ratios, median, shared });
    }
    Ok(WeightStats { num_experts: e, layers })
}

/// What the prompts showed of one expert.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ExpertActivity {
    /// Routed token slots.
    pub routed: u64,
    /// `routed` over all routed slots of the layer (1/E when balanced).
    pub share: f64,
    /// Mean routing weight applied when the expert was chosen (None if never chosen).
    pub mean_gate_weight: Option<f64>,
    /// Mean L2 norm of the expert's output before the routing weight, over every token that
    /// reached the layer.
    pub mean_out_norm: f64,
    /// `mean_out_norm` over the layer median.
    pub out_norm_ratio: f64,
}

/// [`ExpertActivity`] of every expert of one MoE layer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerRoutingStats {
    pub layer: usize,
    pub experts: Vec<ExpertActivity>,
    /// Median of the experts' `mean_out_norm`.
    pub median_out_norm: f64,
    /// Mean L2 norm of the shared expert's output, for scale.
    pub shared_out_norm: f64,
}

/// [`routing_stats`] over a set of prompts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoutingStats {
    pub num_experts: usize,
    pub top_k: usize,
    /// Tokens that went through each MoE layer (all prompts together).
    pub tokens: u64,
    pub layers: Vec<LayerRoutingStats>,
    /// The raw routed-token counts.
    pub load: ExpertLoad,
}

/// Runs each prompt (token ids, each on its own from position 0) through `model` and measures,
/// at every MoE layer, how tokens are routed and how large each expert's output is on the
/// layer's real inputs. `progress(done, total)` is called after each prompt.
pub fn routing_stats(
    model: &Step3TextModel,
    prompts: &[Vec<u32>],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<RoutingStats> {
    let cfg = model.config();
    let (e, k) = (cfg.moe_num_experts, cfg.moe_top_k);
    let mut load = ExpertLoad::for_model(cfg);
    let n_layers = load.layers().len();
    // Per layer: Σ routing weight per expert, Σ output norm per expert, Σ shared output norm.
    let mut weight_sums = vec![vec![0f64; e]; n_layers];
    let mut norm_sums = vec![vec![0f64; e]; n_layers];
    let mut shared_sums = vec![0f64; n_layers];
    let row_norms = |y: &Tensor| -> Result<f64> {
        Ok(y.to_dtype(DType::F32)?
            .sqr()?
            .sum(D::Minus1)?
            .sqrt()?
            .to_dtype(DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?)
    };
    for (n, ids) in prompts.iter().enumerate() {
        model.check_ids(ids)?;
        if ids.is_empty() {
            return Err(Error::Input(format!("prompt {} is empty", n + 1)));
        }
        let input = Tensor::new(ids.as_slice(), model.device())?.unsqueeze(0)?;
        let mut cache = model.new_cache(1, ids.len())?;
        model.forward_observed(&model.embed(&input)?, &[ids.len()], &mut cache, &mut |layer, z, routing| {
            let r = LayerRouting { layer, routing: routing.clone() };
            load.record(&r)?;
            let i = load.layers().binary_search(&layer).map_err(|_| Error::Input(format!("layer {layer}")))?;
            let ids = routing.ids.to_vec2::<u32>()?;
            let ws = routing.weights.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            for (row, w) in ids.iter().zip(&ws) {
                for (&x, &w) in row.iter().zip(w) {
                    weight_sums[i][x as usize] += w as f64;
                }
            }
            let block = model.moe_block(layer).ok_or_else(|| Error::Input(format!("layer {layer} is not MoE")))?;
            for (x, sum) in norm_sums[i].iter_mut().enumerate() {
                *sum += row_norms(&block.experts().expert_forward(x, z)?)?;
            }
            let shared = block
                .shared_expert()
                .ok_or_else(|| Error::Input(format!("layer {layer}: the shared expert is on another rank")))?;
            shared_sums[i] += row_norms(&candle_core::Module::forward(shared, z)?)?;
            Ok(())
        })?;
        progress(n + 1, prompts.len());
    }
    let mut layers = Vec::with_capacity(n_layers);
    for (i, &layer) in load.layers().iter().enumerate() {
        let tokens = load.tokens(layer).max(1) as f64;
        let counts = load.counts(layer).unwrap_or_default();
        let shares = load.shares(layer).unwrap_or_default();
        let norms: Vec<f64> = norm_sums[i].iter().map(|s| s / tokens).collect();
        let median_out_norm = median(norms.iter().copied());
        let experts = (0..e)
            .map(|x| ExpertActivity {
                routed: counts[x],
                share: shares[x],
                mean_gate_weight: (counts[x] > 0).then(|| weight_sums[i][x] / counts[x] as f64),
                mean_out_norm: norms[x],
                out_norm_ratio: if median_out_norm > 0.0 { norms[x] / median_out_norm } else { f64::NAN },
            })
            .collect();
        layers.push(LayerRoutingStats { layer, experts, median_out_norm, shared_out_norm: shared_sums[i] / tokens });
    }
    let tokens = prompts.iter().map(|p| p.len() as u64).sum();
    Ok(RoutingStats { num_experts: e, top_k: k, tokens, layers, load })
}

/// Why an expert is flagged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FlagKind {
    /// Never routed over the prompts.
    Dead,
    /// Routed, but far below the balanced share 1/E.
    Starved,
    /// Output norm far below the layer median (on the prompts).
    Vanishing,
    /// A projection's weight norm far below the layer median (weights only).
    VanishingWeights,
    /// A weight norm (NaN or infinite weights) or the output norm on the prompts is not finite.
    NonFinite,
}

/// One flagged expert.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExpertFlag {
    pub layer: usize,
    pub expert: usize,
    pub kind: FlagKind,
    /// The measured value the rule compared (share, norm ratio).
    pub value: f64,
}

/// The thresholds of the flags. Defaults: starved below a tenth of the balanced share, vanishing
/// below a tenth of the layer median.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct FlagRules {
    /// Starved: `0 < share < starved_fraction / E`.
    pub starved_fraction: f64,
    /// Vanishing: output norm (or weight norm) ratio to the layer median `< vanishing_fraction`.
    pub vanishing_fraction: f64,
}

impl Default for FlagRules {
    fn default() -> Self {
        Self { starved_fraction: 0.1, vanishing_fraction: 0.1 }
    }
}

impl FlagRules {
    /// The rules in words, for printing next to the flags.
    pub fn describe(&self, num_experts: usize) -> Vec<String> {
        vec![
            "dead: never routed over the prompts".to_string(),
            format!(
                "starved: routed, but share of routed slots < {} x 1/E = {:.4} (E = {num_experts})",
                self.starved_fraction,
                self.starved_fraction / num_experts as f64
            ),
            format!(
                "vanishing: mean output norm before gating < {} x the layer median (every token of the prompts \
                 through every expert)",
                self.vanishing_fraction
            ),
            format!(
                "vanishing_weights: a gate/up/down projection's Frobenius norm < {} x the layer median of that \
                 projection",
                self.vanishing_fraction
            ),
            "non_finite: a projection's norm or the output norm is NaN or infinite (broken weights)".to_string(),
        ]
    }

    /// Flags from the weight norms.
    pub fn weight_flags(&self, stats: &WeightStats) -> Vec<ExpertFlag> {
        let mut out = Vec::new();
        for l in &stats.layers {
            for (expert, (r, n)) in l.ratios.iter().zip(&l.experts).enumerate() {
                if let Some(bad) = [n.gate, n.up, n.down].into_iter().find(|v| !v.is_finite()) {
                    out.push(ExpertFlag { layer: l.layer, expert, kind: FlagKind::NonFinite, value: bad });
                } else if r.min() < self.vanishing_fraction {
                    out.push(ExpertFlag { layer: l.layer, expert, kind: FlagKind::VanishingWeights, value: r.min() });
                }
            }
        }
        out
    }

    /// Flags from the prompts: dead, starved, vanishing.
    pub fn routing_flags(&self, stats: &RoutingStats) -> Vec<ExpertFlag> {
        let mut out = Vec::new();
        let balanced = 1.0 / stats.num_experts as f64;
        for l in &stats.layers {
            for (expert, a) in l.experts.iter().enumerate() {
                let flag = |kind, value| ExpertFlag { layer: l.layer, expert, kind, value };
                if a.routed == 0 {
                    out.push(flag(FlagKind::Dead, 0.0));
                } else if a.share < self.starved_fraction * balanced {
                    out.push(flag(FlagKind::Starved, a.share));
                }
                if !a.mean_out_norm.is_finite() {
                    out.push(flag(FlagKind::NonFinite, a.mean_out_norm));
                } else if a.out_norm_ratio < self.vanishing_fraction {
                    out.push(flag(FlagKind::Vanishing, a.out_norm_ratio));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Routing;

    fn routing(layer: usize, ids: &[[u32; 2]]) -> LayerRouting {
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let ids = Tensor::from_vec(flat, (ids.len(), 2), &Device::Cpu).unwrap();
        let weights = Tensor::ones(ids.dims(), DType::F32, &Device::Cpu).unwrap();
        LayerRouting { layer, routing: Routing { ids, weights } }
    }

    #[test]
    fn counts_routed_slots_per_layer_and_expert() -> Result<()> {
        let mut load = ExpertLoad::new(&[4, 2], 4);
        assert_eq!(load.layers(), &[2, 4]);
        load.record(&routing(2, &[[0, 1], [1, 3], [1, 0]]))?;
        load.record(&routing(4, &[[2, 3]]))?;
        assert_eq!(load.counts(2), Some(&[2, 3, 0, 1][..]));
        assert_eq!(load.tokens(2), 3);
        assert_eq!(load.shares(4), Some(vec![0.0, 0.0, 0.5, 0.5]));
        // Padded batch of two sequences (lens 1 and 2) over t = 2 columns: row 1 is padding.
        let mut padded = ExpertLoad::new(&[2, 4], 4);
        padded.record_padded(&routing(2, &[[0, 1], [3, 3], [2, 1], [0, 2]]), &[1, 2], 2)?;
        assert_eq!(padded.counts(2), Some(&[2, 2, 2, 0][..]));
        load.merge(&padded)?;
        assert_eq!(load.counts(2), Some(&[4, 5, 2, 1][..]));
        assert!(load.record(&routing(3, &[[0, 1]])).is_err());
        assert!(load.record(&routing(2, &[[0, 9]])).unwrap_err().to_string().contains("expert 9 of 4"));
        load.reset();
        assert_eq!(load.counts(4), Some(&[0, 0, 0, 0][..]));
        Ok(())
    }

    /// NaN or infinite weights are flagged as such (never hidden by a NaN ratio that compares
    /// false).
    #[test]
    fn non_finite_weights_are_flagged() {
        let n = |d: f64| ProjectionNorms { gate: 1.0, up: 1.0, down: d };
        let experts = vec![n(1.0), n(f64::NAN), n(f64::INFINITY), n(1e-3)];
        let median = n(1.0);
        let ratios = experts.iter().map(|e| e.ratio(&median)).collect();
        let stats = WeightStats {
            num_experts: 4,
            layers: vec![LayerWeightStats { layer: 3, experts, ratios, median, shared: n(1.0) }],
        };
        let kinds: Vec<(usize, FlagKind)> =
            FlagRules::default().weight_flags(&stats).iter().map(|f| (f.expert, f.kind)).collect();
        assert_eq!(kinds, vec![(1, FlagKind::NonFinite), (2, FlagKind::NonFinite), (3, FlagKind::VanishingWeights)]);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median([3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median([4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median([]).is_nan());
    }
}
