//! The tensors a config implies, and the check of a checkpoint against them: every expected
//! tensor present, with the expected shape and a supported dtype, before anything is built.

use safetensors::tensor::Dtype as StDtype;

use candle_core::DType;

use crate::checkpoint::Checkpoint;
use crate::Error;
use step3_config::{QuantizationConfig, TextConfig};

/// A tensor the config says the checkpoint must hold.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpectedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    /// Another shape the reference also loads (e.g. a 1-D class embedding).
    pub alt_shape: Option<Vec<usize>>,
    /// May be stored block-FP8 (the language model's linear weights; not embeddings, norms, the
    /// router, `lm_head` or anything of the vision tower).
    pub quantizable: bool,
}

impl ExpectedTensor {
    fn new(name: impl Into<String>, shape: &[usize]) -> Self {
        Self { name: name.into(), shape: shape.to_vec(), alt_shape: None, quantizable: false }
    }

    fn linear(name: impl Into<String>, shape: &[usize]) -> Self {
        Self { quantizable: true, ..Self::new(name, shape) }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The language model's tensors, with checkpoint names and shapes (`model.*` and `lm_head`).
pub fn text_tensors(c: &TextConfig) -> Vec<ExpectedTensor> {
    let (h, q, d, n) = (c.hidden_size, c.share_q_dim, c.head_dim, c.num_attention_heads);
    let (e, im, s, i) = (c.moe_num_experts, c.moe_intermediate_size, c.share_expert_dim, c.intermediate_size);
    let mut out = vec![ExpectedTensor::new("model.embed_tokens.weight", &[c.vocab_size, h])];
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        out.push(ExpectedTensor::new(format!("{p}.input_layernorm.weight"), &[h]));
        out.push(ExpectedTensor::new(format!("{p}.post_attention_layernorm.weight"), &[h]));
        out.push(ExpectedTensor::linear(format!("{p}.self_attn.q_proj.weight"), &[q, h]));
        out.push(ExpectedTensor::linear(format!("{p}.self_attn.k_proj.weight"), &[d, h]));
        out.push(ExpectedTensor::linear(format!("{p}.self_attn.v_proj.weight"), &[d, h]));
        out.push(ExpectedTensor::new(format!("{p}.self_attn.inter_norm.weight"), &[q]));
        out.push(ExpectedTensor::linear(format!("{p}.self_attn.wq.weight"), &[n * d, q]));
        out.push(ExpectedTensor::linear(format!("{p}.self_attn.o_proj.weight"), &[h, n * d]));
        if c.is_moe_layer(l) {
            out.push(ExpectedTensor::new(format!("{p}.moe.gate.weight"), &[e, h]));
            out.push(ExpectedTensor::linear(format!("{p}.moe.gate_proj.weight"), &[e, im, h]));
            out.push(ExpectedTensor::linear(format!("{p}.moe.up_proj.weight"), &[e, im, h]));
            out.push(ExpectedTensor::linear(format!("{p}.moe.down_proj.weight"), &[e, h, im]));
            out.push(ExpectedTensor::linear(format!("{p}.share_expert.gate_proj.weight"), &[s, h]));
            out.push(ExpectedTensor::linear(format!("{p}.share_expert.up_proj.weight"), &[s, h]));
            out.push(ExpectedTensor::linear(format!("{p}.share_expert.down_proj.weight"), &[h, s]));
        } else {
            out.push(ExpectedTensor::linear(format!("{p}.mlp.gate_proj.weight"), &[i, h]));
            out.push(ExpectedTensor::linear(format!("{p}.mlp.up_proj.weight"), &[i, h]));
            out.push(ExpectedTensor::linear(format!("{p}.mlp.down_proj.weight"), &[h, i]));
        }
    }
    out.push(ExpectedTensor::new("model.norm.weight", &[h]));
    out.push(ExpectedTensor::new("lm_head.weight", &[c.vocab_size, h]));
    out
}

/// The vision tower's and projector's tensors (`vision_model.*`, `vit_downsampler*`,
/// `vit_large_projector`), for MLP width `intermediate`.
pub fn vision_tensors(v: &step3_config::VisionConfig, intermediate: usize) -> Vec<ExpectedTensor> {
    let text_hidden = v.text_hidden_size;
    let (d, p, c, o) = (v.hidden_size, v.patch_size, v.num_channels, v.output_hidden_size);
    let g = v.image_size / v.patch_size;
    let e = "vision_model.embeddings";
    let mut out = vec![
        ExpectedTensor { alt_shape: Some(vec![d]), ..ExpectedTensor::new(format!("{e}.class_embedding"), &[1, d]) },
        ExpectedTensor::new(format!("{e}.patch_embedding.weight"), &[d, c, p, p]),
        ExpectedTensor::new(format!("{e}.patch_embedding.bias"), &[d]),
        ExpectedTensor::new(format!("{e}.position_embedding.weight"), &[1 + g * g, d]),
    ];
    for i in 0..v.num_hidden_layers {
        let l = format!("vision_model.transformer.layers.{i}");
        out.push(ExpectedTensor::new(format!("{l}.self_attn.qkv_proj.weight"), &[3 * d, d]));
        out.push(ExpectedTensor::new(format!("{l}.self_attn.qkv_proj.bias"), &[3 * d]));
        out.push(ExpectedTensor::new(format!("{l}.self_attn.out_proj.weight"), &[d, d]));
        out.push(ExpectedTensor::new(format!("{l}.self_attn.out_proj.bias"), &[d]));
        for n in ["layer_norm1", "layer_norm2"] {
            out.push(ExpectedTensor::new(format!("{l}.{n}.weight"), &[d]));
            out.push(ExpectedTensor::new(format!("{l}.{n}.bias"), &[d]));
        }
        out.push(ExpectedTensor::new(format!("{l}.mlp.fc1.weight"), &[intermediate, d]));
        out.push(ExpectedTensor::new(format!("{l}.mlp.fc1.bias"), &[intermediate]));
        out.push(ExpectedTensor::new(format!("{l}.mlp.fc2.weight"), &[d, intermediate]));
        out.push(ExpectedTensor::new(format!("{l}.mlp.fc2.bias"), &[d]));
    }
    out.push(ExpectedTensor::new("vit_downsampler.weight", &[o, d, 2, 2]));
    out.push(ExpectedTensor::new("vit_downsampler.bias", &[o]));
    out.push(ExpectedTensor::new("vit_downsampler2.weight", &[2 * o, o, 3, 3]));
    out.push(ExpectedTensor::new("vit_downsampler2.bias", &[2 * o]));
    out.push(ExpectedTensor::new("vit_large_projector.weight", &[text_hidden, 2 * o]));
    if v.projector_bias {
        out.push(ExpectedTensor::new("vit_large_projector.bias", &[text_hidden]));
    }
    out
}

/// Float dtypes a dense weight may be stored in.
pub const FLOAT_DTYPES: [StDtype; 3] = [StDtype::F32, StDtype::BF16, StDtype::F16];

/// The outcome of checking a checkpoint against the expected tensors.
#[derive(Debug, Default)]
pub struct InventoryReport {
    /// Expected tensors checked.
    pub checked: usize,
    /// Every missing tensor, wrong shape or unsupported dtype, in the expected order.
    pub problems: Vec<Error>,
    /// Tensors in the checkpoint that nothing expects (e.g. parts this build does not load).
    pub unexpected: Vec<String>,
}

impl InventoryReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// `Ok` when there are no problems, else an error showing the first and counting the rest.
    pub fn into_result(self) -> crate::Result<()> {
        let mut problems = self.problems.into_iter();
        match problems.next() {
            None => Ok(()),
            Some(first) => Err(Error::Inventory { first: Box::new(first), more: problems.collect() }),
        }
    }
}

/// The scale tensor stored next to a block-FP8 weight (`<name>_scale_inv`, or `<name>_scale`).
pub fn scale_name(ckpt: &Checkpoint, weight: &str) -> Option<String> {
    [format!("{weight}_scale_inv"), format!("{weight}_scale")].into_iter().find(|n| ckpt.contains(n))
}

/// Checks presence, shape and dtype of every expected tensor, and for block-FP8 weights the
/// presence, shape and dtype of their scales.
pub fn check(ckpt: &Checkpoint, expected: &[ExpectedTensor], quant: Option<&QuantizationConfig>) -> InventoryReport {
    let mut report = InventoryReport { checked: expected.len(), ..Default::default() };
    let mut known: std::collections::HashSet<String> = expected.iter().map(|t| t.name.clone()).collect();
    for t in expected {
        let Some(info) = ckpt.info(&t.name) else {
            report.problems.push(Error::MissingTensor { name: t.name.clone(), within: None });
            continue;
        };
        let file = ckpt.file_of(info).to_path_buf();
        let dtype_error = |expected: &str| Error::TensorDtype {
            name: t.name.clone(),
            file: file.clone(),
            found: format!("{:?}", info.dtype),
            expected: expected.into(),
        };
        if info.shape != t.shape && t.alt_shape.as_ref() != Some(&info.shape) {
            report.problems.push(Error::TensorShape {
                name: t.name.clone(),
                file: file.clone(),
                expected: t.shape.clone(),
                found: info.shape.clone(),
            });
        } else if info.dtype == StDtype::F8_E4M3 {
            match (t.quantizable, quant) {
                (false, _) => report
                    .problems
                    .push(dtype_error("F32, BF16 or F16; only linear weights of the language model may be FP8")),
                (true, None) => report.problems.push(dtype_error(
                    "F32, BF16 or F16: the weight is F8_E4M3 but config.json has no quantization_config",
                )),
                (true, Some(q)) => {
                    if let Some(problem) = check_scale(ckpt, t, q, &mut known) {
                        report.problems.push(problem);
                    }
                }
            }
        } else if !FLOAT_DTYPES.contains(&info.dtype) {
            report.problems.push(dtype_error(if t.quantizable && quant.is_some() {
                "F32, BF16, F16 or F8_E4M3"
            } else {
                "F32, BF16 or F16"
            }));
        }
    }
    report.unexpected = ckpt.names().into_iter().filter(|n| !known.contains(*n)).map(String::from).collect();
    report
}

fn check_scale(
    ckpt: &Checkpoint,
    t: &ExpectedTensor,
    q: &QuantizationConfig,
    known: &mut std::collections::HashSet<String>,
) -> Option<Error> {
    let Some(name) = scale_name(ckpt, &t.name) else {
        return Some(Error::MissingScale { weight: t.name.clone() });
    };
    known.insert(name.clone());
    let info = ckpt.info(&name)?;
    let want = match step3_nn::BlockFp8::scale_dims(&t.shape, q.weight_block_size) {
        Ok(want) => want,
        Err(e) => return Some(e.into()),
    };
    if info.shape != want {
        return Some(Error::TensorShape {
            name,
            file: ckpt.file_of(info).to_path_buf(),
            expected: want,
            found: info.shape.clone(),
        });
    }
    if !FLOAT_DTYPES.contains(&info.dtype) {
        return Some(Error::TensorDtype {
            name,
            file: ckpt.file_of(info).to_path_buf(),
            found: format!("{:?}", info.dtype),
            expected: "F32, BF16 or F16".into(),
        });
    }
    None
}

/// Expected tensors stored as block-FP8.
pub fn fp8_tensors<'a>(ckpt: &Checkpoint, expected: &'a [ExpectedTensor]) -> Vec<&'a ExpectedTensor> {
    expected.iter().filter(|t| ckpt.info(&t.name).is_some_and(|i| i.dtype == StDtype::F8_E4M3)).collect()
}

/// Bytes the loaded weights will occupy: FP8 weights kept compact count their stored bytes plus
/// f32 scales; everything else `numel × size(dtype)`.
pub fn resident_bytes(ckpt: &Checkpoint, expected: &[ExpectedTensor], dtype: DType, fp8_compact: bool) -> usize {
    expected
        .iter()
        .map(|t| match ckpt.info(&t.name) {
            Some(info) if info.dtype == StDtype::F8_E4M3 && fp8_compact => {
                let scales =
                    scale_name(ckpt, &t.name).and_then(|n| ckpt.info(&n).map(|i| i.shape.iter().product::<usize>()));
                info.nbytes() + scales.unwrap_or(0) * 4
            }
            _ => t.numel() * dtype.size_in_bytes(),
        })
        .sum()
}
