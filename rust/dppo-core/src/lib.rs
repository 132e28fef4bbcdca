//! dppo-core: the data-preparation engine of dppo.
//!
//! Pure Rust (no Python): tokenization (a lean byte-level BPE fast path with the `tokenizers`
//! crate as fallback), chat-template rendering, validation of raw rows, truncation that keeps the
//! chat template intact, the memory-mapped shard format, and the packing of examples into
//! token-budgeted micro-batches that the trainer uses. The Python binding lives in `dppo-py`.

pub mod arrow_input;
pub mod error;
pub mod pack;
pub mod prep;
pub mod record;
pub mod shard;
pub mod template;
pub mod tokenizer;
pub mod truncate;

pub use error::{PrepError, Result};
