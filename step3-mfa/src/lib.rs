//! Step3's MFA attention (multi-matrix factorization attention).
//!
//! This crate owns everything about attention in the Step3 decoder: the low-rank query path
//! (`q_proj` → `inter_norm` → `wq` → heads), the single K head and single V head shared by every
//! query head, NeoX ("rotate half") rotary embeddings over the full head dimension, the KV cache
//! (one K and one V vector per token per layer, never replicated per query head) with its capacity
//! rules, both contiguous per batch ([`KvCache`]) and paged ([`PagedKvCache`]: a pool of fixed-size
//! blocks read through per-sequence block tables), and the per-step bookkeeping that lets sequences
//! of different lengths share a batch (positions, slots, attention masks). It does not know about
//! the whole model's configuration, files or the feed-forward blocks, nor which sequence owns which
//! block (the engine does): the model crate hands it an [`MfaConfig`] and a
//! [`candle_nn::VarBuilder`] positioned at `model.layers.{i}.self_attn`.
//!
//! Data flow of one layer, for `x: [B, T, hidden]`:
//!
//! ```text
//! q = wq(inter_norm(q_proj(x)))            [B, T, heads·head_dim]  → RoPE per head
//! k = k_proj(x), v = v_proj(x)             [B, T, head_dim]        → RoPE on k, append to cache
//! scores = q · kᵀ / sqrt(head_dim)         all heads of a sequence in one matmul (one new token
//!                                          on the CPU: one pass over the context, `decode`)
//! out = o_proj(softmax(scores + mask) · v)
//! ```

mod attention;
mod cache;
mod decode;
mod paged;
mod rope;

pub use attention::{MfaAttention, MfaConfig};
pub use cache::{AttentionStep, CacheError, KvCache, SequenceTable};
pub use paged::{AttentionGroup, PagedError, PagedKvCache, PagedSequence, PagedStep};
pub use rope::RotaryEmbedding;
