//! `dppo._native`: the thin Python binding of `dppo-core`.
//!
//! Arguments are extracted while holding the GIL; the work itself (tokenizing a whole batch,
//! writing shards) runs in Rust with the GIL released. Arrow data arrives through the Arrow
//! PyCapsule stream interface (`__arrow_c_stream__`), so polars, pyarrow and `datasets` tables
//! cross the boundary without copies or per-row Python work.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::ffi_stream::{RecordBatchStreamReader, FFI_ArrowArrayStream};
use arrow_array::RecordBatch;
use dppo_core::prep::{encode_prompts as core_encode_prompts, DataKind, Encoder, MaxLen, PrepOptions, Preparer as CorePreparer};
use dppo_core::template::{ChatTemplate, Message};
use dppo_core::tokenizer::Tokenizer as CoreTokenizer;
use dppo_core::record::Turns;
use dppo_core::truncate::KeepPart;
use dppo_core::{arrow_input, pack, shard, PrepError};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyCapsule, PyDict};

create_exception!(_native, DppoError, PyException, "An error of the dppo data engine (one line, names the file or row).");
create_exception!(_native, InputError, DppoError, "Bad input: a row, file, option or data set the user can fix.");
create_exception!(_native, ShardError, DppoError, "A shard folder that is missing, incomplete, corrupt or of another format version.");
create_exception!(_native, TokenizerError, DppoError, "A tokenizer or chat template that cannot be loaded or applied.");
create_exception!(_native, StorageError, DppoError, "A file that cannot be read or written.");

/// The engine's error as the Python exception of its kind.
fn err(e: PrepError) -> PyErr {
    let msg = e.to_string();
    match e {
        PrepError::Io { .. } => StorageError::new_err(msg),
        PrepError::Corrupt { .. } => ShardError::new_err(msg),
        PrepError::Tokenizer(_) | PrepError::Template(_) => TokenizerError::new_err(msg),
        PrepError::Input(_) | PrepError::BadRow { .. } | PrepError::Config(_) | PrepError::Interrupted => InputError::new_err(msg),
    }
}

fn keep_part(name: &str) -> PyResult<KeepPart> {
    KeepPart::parse(name).ok_or_else(|| InputError::new_err(format!("--truncate-prompt must be start or end, got {name:?}")))
}

fn messages(conv: Vec<(String, String)>) -> Vec<Message> {
    conv.into_iter().map(|(r, c)| Message::new(r, c)).collect()
}

/// Import every record batch of an object that implements `__arrow_c_stream__`.
fn record_batches(obj: &Bound<'_, PyAny>) -> PyResult<Vec<RecordBatch>> {
    let capsule = obj.call_method0("__arrow_c_stream__").map_err(|_| {
        InputError::new_err("expected Arrow data (an object with __arrow_c_stream__, e.g. a pyarrow Table or polars DataFrame)")
    })?;
    let capsule = capsule.cast::<PyCapsule>()?;
    let ptr = capsule.pointer_checked(Some(c"arrow_array_stream"))?.as_ptr() as *mut FFI_ArrowArrayStream;
    // SAFETY: the capsule holds a valid stream; from_raw moves it out and leaves a released
    // stream behind, so the capsule's destructor does not release it twice.
    let reader = unsafe { RecordBatchStreamReader::from_raw(ptr) }
        .map_err(|e| InputError::new_err(format!("cannot read Arrow stream: {e}")))?;
    reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| InputError::new_err(format!("cannot read Arrow stream: {e}")))
}

fn load_tokenizer(dir: &Path, force_fallback: bool) -> PyResult<CoreTokenizer> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        return Err(TokenizerError::new_err(format!("{}: no tokenizer.json in this folder", dir.display())));
    }
    let tok = if force_fallback {
        CoreTokenizer::from_file_fallback(&path)
    } else {
        CoreTokenizer::from_file(&path)
    };
    tok.map_err(|e| TokenizerError::new_err(format!("{}: {e}", path.display())))
}

/// The engine's tokenizer, exposed for tests and benchmarks.
#[pyclass(frozen)]
struct Tokenizer {
    inner: Arc<CoreTokenizer>,
}

#[pymethods]
impl Tokenizer {
    /// Load `tokenizer.json` from a folder; `fallback=True` forces the `tokenizers` crate path.
    #[new]
    #[pyo3(signature = (dir, fallback=false))]
    fn new(dir: PathBuf, fallback: bool) -> PyResult<Self> {
        Ok(Self { inner: Arc::new(load_tokenizer(&dir, fallback)?) })
    }

    fn encode(&self, py: Python<'_>, text: &str) -> PyResult<Vec<u32>> {
        let text = text.to_owned();
        let tok = self.inner.clone();
        py.detach(move || tok.encode(&text)).map_err(|e| TokenizerError::new_err(e.to_string()))
    }

    fn encode_batch(&self, py: Python<'_>, texts: Vec<String>) -> PyResult<Vec<Vec<u32>>> {
        let tok = self.inner.clone();
        py.detach(move || {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            tok.encode_batch(&refs)
        })
        .map_err(|e| TokenizerError::new_err(e.to_string()))
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    #[getter]
    fn backend(&self) -> &'static str {
        self.inner.backend_name()
    }

    #[getter]
    fn fingerprint(&self) -> String {
        self.inner.fingerprint()
    }
}

/// Render a tokenizer folder's chat template (tests compare it with `apply_chat_template`).
#[pyfunction]
#[pyo3(signature = (tokenizer_dir, messages, add_generation_prompt=false))]
fn render_chat(tokenizer_dir: PathBuf, messages: Vec<(String, String)>, add_generation_prompt: bool) -> PyResult<String> {
    let t = ChatTemplate::from_dir(&tokenizer_dir).map_err(err)?;
    t.render(&self::messages(messages), add_generation_prompt).map_err(err)
}

/// Render many conversations with a tokenizer folder's chat template, loaded and compiled once.
/// An error names the conversation (its index in `conversations`).
#[pyfunction]
#[pyo3(signature = (tokenizer_dir, conversations, add_generation_prompt=false))]
fn render_chats(
    py: Python<'_>,
    tokenizer_dir: PathBuf,
    conversations: Vec<Vec<(String, String)>>,
    add_generation_prompt: bool,
) -> PyResult<Vec<String>> {
    let t = ChatTemplate::from_dir(&tokenizer_dir).map_err(err)?;
    py.detach(move || {
        conversations
            .into_iter()
            .enumerate()
            .map(|(i, conv)| t.render(&messages(conv), add_generation_prompt).map_err(|e| format!("conversation {i}: {e}")))
            .collect::<Result<Vec<_>, _>>()
    })
    .map_err(TokenizerError::new_err)
}

/// The token ids of many prompts (the chat template with the generation header, tokenized, as
/// `dppo prep` stores them), each shortened to at most `max_prompt_len` tokens by removing content
/// of its user turn, never the template's tokens. An error names the conversation.
#[pyfunction]
#[pyo3(signature = (tokenizer_dir, conversations, max_prompt_len=None, truncate_prompt="start", tokenizer_fallback=false))]
fn encode_prompts(
    py: Python<'_>,
    tokenizer_dir: PathBuf,
    conversations: Vec<Vec<(String, String)>>,
    max_prompt_len: Option<u32>,
    truncate_prompt: &str,
    tokenizer_fallback: bool,
) -> PyResult<Vec<Vec<u32>>> {
    let keep = keep_part(truncate_prompt)?;
    let tok = load_tokenizer(&tokenizer_dir, tokenizer_fallback)?;
    let template = ChatTemplate::from_dir(&tokenizer_dir).map_err(err)?;
    let enc = Encoder::new(Arc::new(tok), template).map_err(err)?;
    let convs: Vec<Vec<Message>> = conversations.into_iter().map(messages).collect();
    py.detach(|| core_encode_prompts(&enc, &convs, max_prompt_len, keep)).map_err(err)
}

/// The prompt of every row of an Arrow table, by the engine's one rule set (see
/// `record::prompt_of`): `(row, prompt_id or None, [(role, content)] or None, skip reason or None)`;
/// a usable row always has an id (its own, else `record::derived_prompt_id` of its prompt).
#[pyfunction]
#[pyo3(signature = (data, first_row=0, turns="first"))]
#[allow(clippy::type_complexity)]
fn prompt_rows(
    py: Python<'_>,
    data: &Bound<'_, PyAny>,
    first_row: u64,
    turns: &str,
) -> PyResult<Vec<(u64, Option<String>, Option<Vec<(String, String)>>, Option<&'static str>)>> {
    let turns = Turns::parse(turns).ok_or_else(|| InputError::new_err(format!("--turns must be first or all, got {turns:?}")))?;
    let batches = record_batches(data)?;
    py.detach(|| -> Result<_, PrepError> {
        let mut out = Vec::new();
        let mut row = first_row;
        for b in &batches {
            for r in arrow_input::prompt_rows(b, row)? {
                out.push(match dppo_core::record::prompt_of(&r, turns) {
                    Ok((id, msgs)) => (r.row, Some(id), Some(msgs.into_iter().map(|m| (m.role, m.content)).collect()), None),
                    Err(skip) => (r.row, None, None, Some(skip.name())),
                });
            }
            row += b.num_rows() as u64;
        }
        Ok(out)
    })
    .map_err(err)
}

/// Group items of the given lengths into rows (micro-batches) of at most `max_tokens` tokens and
/// at most `max_items` items (0: any number), by best-fit decreasing: the one packing of dppo.
/// Rows list item indices, ascending; an item longer than `max_tokens` gets a row of its own.
#[pyfunction]
#[pyo3(signature = (lengths, max_tokens, max_items=0))]
fn pack_rows(py: Python<'_>, lengths: Vec<u64>, max_tokens: u64, max_items: usize) -> PyResult<Vec<Vec<u32>>> {
    if max_tokens == 0 {
        return Err(InputError::new_err("the token budget of a micro-batch must be positive"));
    }
    let too_long = |what: String| InputError::new_err(format!("{what} is over the packing limit of {} tokens", u32::MAX));
    let budget = u32::try_from(max_tokens).map_err(|_| too_long(format!("the micro-batch token budget {max_tokens}")))?;
    let lens = lengths
        .iter()
        .enumerate()
        .map(|(i, &v)| u32::try_from(v).map_err(|_| too_long(format!("item {i} ({v} tokens)"))))
        .collect::<PyResult<Vec<u32>>>()?;
    Ok(py.detach(|| pack::best_fit_decreasing(&lens, budget, max_items)))
}

/// One preparation run (`dppo prep sft|prefs`): feed Arrow batches, then finish.
#[pyclass]
struct Preparer {
    inner: Option<CorePreparer>,
    kind: DataKind,
}

impl Preparer {
    fn live(&mut self) -> PyResult<&mut CorePreparer> {
        self.inner.as_mut().ok_or_else(|| InputError::new_err("this preparation run is already finished"))
    }
}

#[pymethods]
impl Preparer {
    #[new]
    #[pyo3(signature = (kind, tokenizer_dir, out_dir, *, max_len=None, percentile=95.0, max_prompt_len=None,
                        truncate_prompt="start", strict=false, allow_missing_ygen=false, overwrite=false,
                        shard_max_tokens=256<<20, tokenizer_fallback=false, turns="first", ygen_subset=false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        kind: &str,
        tokenizer_dir: PathBuf,
        out_dir: PathBuf,
        max_len: Option<u32>,
        percentile: f64,
        max_prompt_len: Option<u32>,
        truncate_prompt: &str,
        strict: bool,
        allow_missing_ygen: bool,
        overwrite: bool,
        shard_max_tokens: u64,
        tokenizer_fallback: bool,
        turns: &str,
        ygen_subset: bool,
    ) -> PyResult<Self> {
        let turns = Turns::parse(turns).ok_or_else(|| InputError::new_err(format!("--turns must be first or all, got {turns:?}")))?;
        let kind = match kind {
            "sft" => DataKind::Sft,
            "pairs" | "prefs" => DataKind::Pairs,
            other => return Err(InputError::new_err(format!("unknown data kind {other:?} (sft or prefs)"))),
        };
        let truncate_prompt = keep_part(truncate_prompt)?;
        let tok = load_tokenizer(&tokenizer_dir, tokenizer_fallback)?;
        let template = ChatTemplate::from_dir(&tokenizer_dir).map_err(err)?;
        let opts = PrepOptions {
            kind,
            max_len: match max_len {
                Some(n) => MaxLen::Fixed(n),
                None => MaxLen::Auto { percentile },
            },
            max_prompt_len,
            truncate_prompt,
            strict,
            allow_missing_ygen,
            shard_max_tokens,
            turns,
            ygen_subset,
        };
        let inner = CorePreparer::new(Arc::new(tok), template, opts, &out_dir, overwrite).map_err(err)?;
        Ok(Self { inner: Some(inner), kind })
    }

    /// Prepare the rows of an Arrow table/stream; `first_row` is the source index of its first row.
    /// Returns the number of rows read.
    fn feed(&mut self, py: Python<'_>, data: &Bound<'_, PyAny>, first_row: u64) -> PyResult<u64> {
        let batches = record_batches(data)?;
        let kind = self.kind;
        let prep = self.live()?;
        py.detach(|| -> Result<u64, PrepError> {
            let mut row = first_row;
            for b in &batches {
                match kind {
                    DataKind::Sft => prep.feed_sft(&arrow_input::sft_rows(b, row)?)?,
                    DataKind::Pairs => prep.feed_pairs(&arrow_input::pair_rows(b, row)?)?,
                }
                row += b.num_rows() as u64;
            }
            Ok(row - first_row)
        })
        .map_err(err)
    }

    /// Register y_gen responses from an Arrow table with `prompt_id`, `response` and, optionally,
    /// `response_ids` (the generated ids, used as they are where not null).
    fn add_ygen(&mut self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let batches = record_batches(data)?;
        let prep = self.live()?;
        py.detach(|| -> Result<(), PrepError> {
            for b in &batches {
                prep.add_ygen(arrow_input::ygen_rows(b)?);
            }
            Ok(())
        })
        .map_err(err)
    }

    /// Register the generated ids of pairs' chosen and rejected responses from an Arrow table with
    /// `prompt_id`, `chosen_ids` and `rejected_ids`; those pairs store these ids as they are.
    fn add_pair_ids(&mut self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let batches = record_batches(data)?;
        let prep = self.live()?;
        py.detach(|| -> Result<(), PrepError> {
            for b in &batches {
                prep.add_pair_ids(arrow_input::pair_id_rows(b)?);
            }
            Ok(())
        })
        .map_err(err)
    }

    /// Truncate, pack and write the shards; returns the summary as JSON text.
    /// `progress(done, total)` is called from time to time.
    #[pyo3(signature = (extra_meta_json="{}", progress=None))]
    fn finish(&mut self, py: Python<'_>, extra_meta_json: &str, progress: Option<Py<PyAny>>) -> PyResult<String> {
        let extra: serde_json::Value = serde_json::from_str(extra_meta_json)
            .map_err(|e| InputError::new_err(format!("extra metadata is not JSON: {e}")))?;
        let prep = self.inner.take().ok_or_else(|| InputError::new_err("this preparation run is already finished"))?;
        // An exception raised by the callback, or a signal (Ctrl-C) seen while it runs, stops the
        // run: the engine's progress callback returns false, `finish` removes its working folder
        // and the exception is raised here.
        let mut raised: Option<PyErr> = None;
        let summary = py.detach(|| {
            let mut cb = |done: u64, total: u64| -> bool {
                Python::attach(|py| {
                    let outcome = match &progress {
                        Some(p) => p.call1(py, (done, total)).map(|_| ()),
                        None => Ok(()),
                    };
                    match outcome.and_then(|_| py.check_signals()) {
                        Ok(()) => true,
                        Err(e) => {
                            raised = Some(e);
                            false
                        }
                    }
                })
            };
            prep.finish(extra, &mut cb)
        });
        if let Some(e) = raised {
            return Err(e);
        }
        summary.map(|s| s.to_string()).map_err(err)
    }

    /// Give up: remove the working folder.
    fn abort(&mut self) {
        if let Some(p) = self.inner.take() {
            p.abort();
        }
    }
}

/// Check a shard index (and, with `verify`, both checksums) and describe its arrays:
/// `{"header": {...}, "sections": {name: (offset, dtype, count)}}`.
#[pyfunction]
#[pyo3(signature = (idx_path, verify=true))]
fn open_shard_index<'py>(py: Python<'py>, idx_path: PathBuf, verify: bool) -> PyResult<Bound<'py, PyDict>> {
    let h = py.detach(|| shard::open_index(&idx_path, verify)).map_err(err)?;
    let header = PyDict::new(py);
    header.set_item("kind", match h.kind {
        shard::KIND_SFT => "sft",
        shard::KIND_PAIRS => "pairs",
        _ => "unknown",
    })?;
    header.set_item("has_ygen", h.flags & shard::HAS_YGEN != 0)?;
    header.set_item("n_examples", h.n_examples)?;
    header.set_item("n_segments", h.n_segments)?;
    header.set_item("n_tokens", h.n_tokens)?;
    let sections = PyDict::new(py);
    for s in h.sections() {
        sections.set_item(s.name, (s.offset, s.dtype, s.count))?;
    }
    let out = PyDict::new(py);
    out.set_item("header", header)?;
    out.set_item("sections", sections)?;
    Ok(out)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("DppoError", m.py().get_type::<DppoError>())?;
    m.add("InputError", m.py().get_type::<InputError>())?;
    m.add("ShardError", m.py().get_type::<ShardError>())?;
    m.add("TokenizerError", m.py().get_type::<TokenizerError>())?;
    m.add("StorageError", m.py().get_type::<StorageError>())?;
    m.add_class::<Tokenizer>()?;
    m.add_class::<Preparer>()?;
    m.add_function(wrap_pyfunction!(render_chat, m)?)?;
    m.add_function(wrap_pyfunction!(render_chats, m)?)?;
    m.add_function(wrap_pyfunction!(open_shard_index, m)?)?;
    m.add_function(wrap_pyfunction!(encode_prompts, m)?)?;
    m.add_function(wrap_pyfunction!(pack_rows, m)?)?;
    m.add_function(wrap_pyfunction!(prompt_rows, m)?)?;
    let columns: std::collections::BTreeMap<&str, Vec<&str>> = [
        ("sft", arrow_input::SFT_COLUMNS.to_vec()),
        ("prefs", arrow_input::PAIR_COLUMNS.to_vec()),
        ("prompts", arrow_input::PROMPT_COLUMNS.to_vec()),
    ]
    .into();
    m.add("ROW_COLUMNS", columns)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
