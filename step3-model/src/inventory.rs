//! The tensors a config implies, and the check of a checkpoint against them: every expected
//! tensor present, with the expected shape and a supported dtype, before anything is built.

use safetensors::tensor::Dtype as StDtype;

use crate::checkpoint::Checkpoint;
use crate::config::TextConfig;
use crate::Error;

/// A tensor the config says the checkpoint must hold.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpectedTensor {
    pub name: String,
    pub shape: Vec<usize>,
}

impl ExpectedTensor {
    fn new(name: impl Into<String>, shape: &[usize]) -> Self {
        Self { name: name.into(), shape: shape.to_vec() }
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
        out.push(ExpectedTensor::new(format!("{p}.self_attn.q_proj.weight"), &[q, h]));
        out.push(ExpectedTensor::new(format!("{p}.self_attn.k_proj.weight"), &[d, h]));
        out.push(ExpectedTensor::new(format!("{p}.self_attn.v_proj.weight"), &[d, h]));
        out.push(ExpectedTensor::new(format!("{p}.self_attn.inter_norm.weight"), &[q]));
        out.push(ExpectedTensor::new(format!("{p}.self_attn.wq.weight"), &[n * d, q]));
        out.push(ExpectedTensor::new(format!("{p}.self_attn.o_proj.weight"), &[h, n * d]));
        if c.is_moe_layer(l) {
            out.push(ExpectedTensor::new(format!("{p}.moe.gate.weight"), &[e, h]));
            out.push(ExpectedTensor::new(format!("{p}.moe.gate_proj.weight"), &[e, im, h]));
            out.push(ExpectedTensor::new(format!("{p}.moe.up_proj.weight"), &[e, im, h]));
            out.push(ExpectedTensor::new(format!("{p}.moe.down_proj.weight"), &[e, h, im]));
            out.push(ExpectedTensor::new(format!("{p}.share_expert.gate_proj.weight"), &[s, h]));
            out.push(ExpectedTensor::new(format!("{p}.share_expert.up_proj.weight"), &[s, h]));
            out.push(ExpectedTensor::new(format!("{p}.share_expert.down_proj.weight"), &[h, s]));
        } else {
            out.push(ExpectedTensor::new(format!("{p}.mlp.gate_proj.weight"), &[i, h]));
            out.push(ExpectedTensor::new(format!("{p}.mlp.up_proj.weight"), &[i, h]));
            out.push(ExpectedTensor::new(format!("{p}.mlp.down_proj.weight"), &[h, i]));
        }
    }
    out.push(ExpectedTensor::new("model.norm.weight", &[h]));
    out.push(ExpectedTensor::new("lm_head.weight", &[c.vocab_size, h]));
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

/// Checks presence, shape and dtype of every expected tensor.
pub fn check(ckpt: &Checkpoint, expected: &[ExpectedTensor]) -> InventoryReport {
    let mut report = InventoryReport { checked: expected.len(), ..Default::default() };
    for t in expected {
        let Some(info) = ckpt.info(&t.name) else {
            report.problems.push(Error::MissingTensor { name: t.name.clone(), within: None });
            continue;
        };
        let file = ckpt.file_of(info).to_path_buf();
        if info.shape != t.shape {
            report.problems.push(Error::TensorShape {
                name: t.name.clone(),
                file,
                expected: t.shape.clone(),
                found: info.shape.clone(),
            });
        } else if !FLOAT_DTYPES.contains(&info.dtype) {
            report.problems.push(Error::TensorDtype {
                name: t.name.clone(),
                file,
                found: format!("{:?}", info.dtype),
                expected: "F32, BF16 or F16".into(),
            });
        }
    }
    let known: std::collections::HashSet<&str> = expected.iter().map(|t| t.name.as_str()).collect();
    report.unexpected = ckpt.names().into_iter().filter(|n| !known.contains(n)).map(String::from).collect();
    report
}
