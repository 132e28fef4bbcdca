//! Decoding Arrow record batches (as produced by polars, pyarrow or `datasets`) into raw rows.
//!
//! The same logical column arrives with different physical types depending on the reader:
//! `list<struct>` or `large_list<struct>`, `string`, `large_string` or `string_view`, and, when
//! polars meets ragged JSON (a content that is a number in one row), the whole column as JSON
//! text. All of these decode to the same `RawMessages`, so a bad value is a counted skip of one
//! row, never a failure of the batch.

use arrow_array::{
    cast::AsArray, Array, ArrayRef, GenericListArray, OffsetSizeTrait, RecordBatch, StructArray,
};
use arrow_schema::DataType;

use crate::error::{PrepError, Result};
use crate::prep::{PairIdsRow, YgenRow};
use crate::record::{RawMessage, RawMessages, RawPairRow, RawPromptRow, RawSftRow, RawStr};

/// A column read as strings, whatever its physical string type.
enum StrCol<'a> {
    Utf8(&'a arrow_array::StringArray),
    Large(&'a arrow_array::LargeStringArray),
    View(&'a arrow_array::StringViewArray),
    /// A column of another type: a non-null value is "not a string".
    Other(&'a dyn Array),
    Absent,
}

impl<'a> StrCol<'a> {
    fn new(array: Option<&'a ArrayRef>) -> Self {
        let Some(a) = array else { return StrCol::Absent };
        match a.data_type() {
            DataType::Utf8 => StrCol::Utf8(a.as_string::<i32>()),
            DataType::LargeUtf8 => StrCol::Large(a.as_string::<i64>()),
            DataType::Utf8View => StrCol::View(a.as_string_view()),
            DataType::Null => StrCol::Absent,
            _ => StrCol::Other(a.as_ref()),
        }
    }

    fn get(&self, i: usize) -> RawStr {
        macro_rules! s {
            ($a:expr) => {
                if $a.is_null(i) {
                    RawStr::Missing
                } else {
                    RawStr::Str($a.value(i).to_owned())
                }
            };
        }
        match self {
            StrCol::Utf8(a) => s!(a),
            StrCol::Large(a) => s!(a),
            StrCol::View(a) => s!(a),
            StrCol::Other(a) if a.is_null(i) => RawStr::Missing,
            StrCol::Other(_) => RawStr::NotString,
            StrCol::Absent => RawStr::Missing,
        }
    }

    /// Integer ids (some sources store prompt ids as numbers) are accepted as their decimal text.
    fn get_id(&self, i: usize) -> RawStr {
        if let StrCol::Other(a) = self {
            if !a.is_null(i) && a.data_type().is_integer() {
                let v = arrow_array::cast::AsArray::as_primitive_opt::<arrow_array::types::Int64Type>(*a)
                    .map(|p| p.value(i).to_string())
                    .or_else(|| {
                        arrow_array::cast::AsArray::as_primitive_opt::<arrow_array::types::Int32Type>(*a)
                            .map(|p| p.value(i).to_string())
                    });
                if let Some(v) = v {
                    return RawStr::Str(v);
                }
            }
        }
        self.get(i)
    }
}

/// A column of message lists.
enum MsgCol<'a> {
    List32(&'a GenericListArray<i32>, StructCols<'a>),
    List64(&'a GenericListArray<i64>, StructCols<'a>),
    Json(StrCol<'a>),
    NotList(&'a dyn Array),
    Absent,
}

struct StructCols<'a> {
    items: Option<&'a StructArray>,
    role: StrCol<'a>,
    content: StrCol<'a>,
}

impl<'a> StructCols<'a> {
    fn new(values: &'a ArrayRef) -> Self {
        match values.data_type() {
            DataType::Struct(_) => {
                let s = values.as_struct();
                StructCols {
                    items: Some(s),
                    role: StrCol::new(s.column_by_name("role")),
                    content: StrCol::new(s.column_by_name("content")),
                }
            }
            _ => StructCols { items: None, role: StrCol::Absent, content: StrCol::Absent },
        }
    }

    fn message(&self, j: usize) -> RawMessage {
        match self.items {
            Some(s) if !s.is_null(j) => RawMessage { role: self.role.get(j), content: self.content.get(j) },
            _ => RawMessage { role: RawStr::Missing, content: RawStr::Missing },
        }
    }
}

fn list_messages<O: OffsetSizeTrait>(l: &GenericListArray<O>, cols: &StructCols, i: usize) -> RawMessages {
    if l.is_null(i) {
        return RawMessages::Missing;
    }
    if cols.items.is_none() {
        return RawMessages::NotAList;
    }
    let offs = l.value_offsets();
    let (a, b) = (offs[i].as_usize(), offs[i + 1].as_usize());
    RawMessages::List((a..b).map(|j| cols.message(j)).collect())
}

fn json_messages(text: &str) -> RawMessages {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(v) => value_messages(Some(&v)),
        Err(_) => RawMessages::NotAList,
    }
}

fn value_str(v: Option<&serde_json::Value>) -> RawStr {
    match v {
        None | Some(serde_json::Value::Null) => RawStr::Missing,
        Some(serde_json::Value::String(s)) => RawStr::Str(s.clone()),
        Some(_) => RawStr::NotString,
    }
}

fn value_messages(v: Option<&serde_json::Value>) -> RawMessages {
    let items = match v {
        None | Some(serde_json::Value::Null) => return RawMessages::Missing,
        Some(serde_json::Value::Array(items)) => items,
        Some(_) => return RawMessages::NotAList,
    };
    let field = |m: &serde_json::Map<String, serde_json::Value>, k: &str| value_str(m.get(k));
    RawMessages::List(
        items
            .iter()
            .map(|it| match it {
                serde_json::Value::Object(m) => RawMessage { role: field(m, "role"), content: field(m, "content") },
                _ => RawMessage { role: RawStr::Missing, content: RawStr::Missing },
            })
            .collect(),
    )
}

impl<'a> MsgCol<'a> {
    fn new(array: Option<&'a ArrayRef>) -> Self {
        let Some(a) = array else { return MsgCol::Absent };
        match a.data_type() {
            DataType::List(_) => {
                let l = a.as_list::<i32>();
                MsgCol::List32(l, StructCols::new(l.values()))
            }
            DataType::LargeList(_) => {
                let l = a.as_list::<i64>();
                MsgCol::List64(l, StructCols::new(l.values()))
            }
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => MsgCol::Json(StrCol::new(Some(a))),
            DataType::Null => MsgCol::Absent,
            _ => MsgCol::NotList(a.as_ref()),
        }
    }

    fn get(&self, i: usize) -> RawMessages {
        match self {
            MsgCol::List32(l, c) => list_messages(l, c, i),
            MsgCol::List64(l, c) => list_messages(l, c, i),
            MsgCol::Json(s) => match s.get(i) {
                RawStr::Str(t) => json_messages(&t),
                _ => RawMessages::Missing,
            },
            MsgCol::NotList(a) if a.is_null(i) => RawMessages::Missing,
            MsgCol::NotList(_) => RawMessages::NotAList,
            MsgCol::Absent => RawMessages::Missing,
        }
    }
}

fn require<'a>(batch: &'a RecordBatch, name: &str, what: &str) -> Result<&'a ArrayRef> {
    batch.column_by_name(name).ok_or_else(|| {
        let cols: Vec<String> = batch.schema().fields().iter().map(|f| f.name().clone()).collect();
        PrepError::Input(format!(
            "the source has no column '{name}' ({what} schema); its columns are: {}",
            cols.join(", ")
        ))
    })
}

/// A score column: `Ok(value)` per row (None when null or absent), `Err(())` where a value is
/// present but not a number (a column of another type).
fn f64_col(array: Option<&ArrayRef>) -> impl Fn(usize) -> std::result::Result<Option<f64>, ()> + '_ {
    let cast = array.and_then(|a| arrow_cast_f64(a));
    move |i| match (&cast, array) {
        (Some(v), _) => Ok(v.get(i).copied().flatten()),
        (None, Some(a)) if a.data_type() != &DataType::Null && !a.is_null(i) => Err(()),
        _ => Ok(None),
    }
}

fn arrow_cast_f64(a: &ArrayRef) -> Option<Vec<Option<f64>>> {
    use arrow_array::types::*;
    macro_rules! prim {
        ($t:ty) => {
            a.as_primitive_opt::<$t>().map(|p| p.iter().map(|v| v.map(|x| x as f64)).collect())
        };
    }
    match a.data_type() {
        DataType::Float64 => prim!(Float64Type),
        DataType::Float32 => prim!(Float32Type),
        DataType::Int64 => prim!(Int64Type),
        DataType::Int32 => prim!(Int32Type),
        DataType::Int16 => prim!(Int16Type),
        DataType::Int8 => prim!(Int8Type),
        DataType::UInt64 => prim!(UInt64Type),
        DataType::UInt32 => prim!(UInt32Type),
        DataType::UInt16 => prim!(UInt16Type),
        DataType::UInt8 => prim!(UInt8Type),
        _ => None,
    }
}

/// The column name under which a batch carries raw jsonl lines, decoded here row by row so that
/// a field of the wrong type is seen as such (polars would coerce a number to a string).
pub const JSONL_COLUMN: &str = "__jsonl__";

fn jsonl_objects(batch: &RecordBatch) -> Option<Vec<Option<serde_json::Map<String, serde_json::Value>>>> {
    let col = batch.column_by_name(JSONL_COLUMN)?;
    let parse = |b: &[u8]| serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(b).ok();
    let n = batch.num_rows();
    Some(match col.data_type() {
        DataType::Binary => {
            let a = col.as_binary::<i32>();
            (0..n).map(|i| (!a.is_null(i)).then(|| parse(a.value(i))).flatten()).collect()
        }
        DataType::LargeBinary => {
            let a = col.as_binary::<i64>();
            (0..n).map(|i| (!a.is_null(i)).then(|| parse(a.value(i))).flatten()).collect()
        }
        _ => {
            let s = StrCol::new(Some(col));
            (0..n)
                .map(|i| match s.get(i) {
                    RawStr::Str(t) => parse(t.as_bytes()),
                    _ => None,
                })
                .collect()
        }
    })
}

/// A score of a jsonl row: `Err(())` when present but not a number.
fn value_f64(v: Option<&serde_json::Value>) -> std::result::Result<Option<f64>, ()> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(x) => x.as_f64().map(Some).ok_or(()),
    }
}

fn value_id(v: Option<&serde_json::Value>) -> RawStr {
    match v {
        Some(serde_json::Value::Number(n)) if n.is_i64() || n.is_u64() => RawStr::Str(n.to_string()),
        other => value_str(other),
    }
}

/// The columns each reader below reads (`sft_rows`, `pair_rows`, `prompt_rows`): a source may
/// leave every other column unread.
pub const SFT_COLUMNS: &[&str] = &["messages"];
pub const PAIR_COLUMNS: &[&str] = &["prompt_id", "chosen", "rejected", "score_chosen", "score_rejected"];
pub const PROMPT_COLUMNS: &[&str] = &["prompt_id", "chosen", "messages", "prompt"];

/// Rows of SmolTalk-schema data (`messages`). `first_row` is the source index of row 0.
pub fn sft_rows(batch: &RecordBatch, first_row: u64) -> Result<Vec<RawSftRow>> {
    if let Some(objs) = jsonl_objects(batch) {
        return Ok(objs
            .iter()
            .enumerate()
            .map(|(i, o)| RawSftRow {
                row: first_row + i as u64,
                messages: o.as_ref().map(|m| value_messages(m.get("messages"))).unwrap_or(RawMessages::Missing),
                invalid: o.is_none(),
            })
            .collect());
    }
    let col = MsgCol::new(Some(require(batch, "messages", "SmolTalk")?));
    Ok((0..batch.num_rows()).map(|i| RawSftRow { row: first_row + i as u64, messages: col.get(i), invalid: false }).collect())
}

/// Rows of UltraFeedback-binarized-schema data.
pub fn pair_rows(batch: &RecordBatch, first_row: u64) -> Result<Vec<RawPairRow>> {
    if let Some(objs) = jsonl_objects(batch) {
        return Ok(objs
            .iter()
            .enumerate()
            .map(|(i, o)| {
                let get = |k: &str| o.as_ref().and_then(|m| m.get(k));
                let (sc, sr) = (value_f64(get("score_chosen")), value_f64(get("score_rejected")));
                RawPairRow {
                    row: first_row + i as u64,
                    prompt_id: value_id(get("prompt_id")),
                    chosen: value_messages(get("chosen")),
                    rejected: value_messages(get("rejected")),
                    score_error: sc.is_err() || sr.is_err(),
                    score_chosen: sc.unwrap_or(None),
                    score_rejected: sr.unwrap_or(None),
                    invalid: o.is_none(),
                }
            })
            .collect());
    }
    let schema = "UltraFeedback-binarized";
    // prompt_id is optional: a row without one is named by `record::derived_prompt_id`
    let pid = StrCol::new(batch.column_by_name("prompt_id"));
    let chosen = MsgCol::new(Some(require(batch, "chosen", schema)?));
    let rejected = MsgCol::new(Some(require(batch, "rejected", schema)?));
    let sc = f64_col(batch.column_by_name("score_chosen"));
    let sr = f64_col(batch.column_by_name("score_rejected"));
    Ok((0..batch.num_rows())
        .map(|i| {
            let (c, r) = (sc(i), sr(i));
            RawPairRow {
                row: first_row + i as u64,
                prompt_id: pid.get_id(i),
                chosen: chosen.get(i),
                rejected: rejected.get(i),
                score_error: c.is_err() || r.is_err(),
                score_chosen: c.unwrap_or(None),
                score_rejected: r.unwrap_or(None),
                invalid: false,
            }
        })
        .collect())
}

/// Rows read for their prompts: `chosen`, `messages` or `prompt`, and `prompt_id` where present.
pub fn prompt_rows(batch: &RecordBatch, first_row: u64) -> Result<Vec<RawPromptRow>> {
    if let Some(objs) = jsonl_objects(batch) {
        return Ok(objs
            .iter()
            .enumerate()
            .map(|(i, o)| {
                let get = |k: &str| o.as_ref().and_then(|m| m.get(k));
                RawPromptRow {
                    row: first_row + i as u64,
                    prompt_id: value_id(get("prompt_id")),
                    chosen: value_messages(get("chosen")),
                    messages: value_messages(get("messages")),
                    prompt: value_str(get("prompt")),
                    invalid: o.is_none(),
                }
            })
            .collect());
    }
    if ["chosen", "messages", "prompt"].iter().all(|c| batch.column_by_name(c).is_none()) {
        let cols: Vec<String> = batch.schema().fields().iter().map(|f| f.name().clone()).collect();
        return Err(PrepError::Input(format!(
            "the source has no prompts: no column 'chosen', 'messages' or 'prompt'; its columns are: {}",
            cols.join(", ")
        )));
    }
    let pid = StrCol::new(batch.column_by_name("prompt_id"));
    let chosen = MsgCol::new(batch.column_by_name("chosen"));
    let messages = MsgCol::new(batch.column_by_name("messages"));
    let prompt = StrCol::new(batch.column_by_name("prompt"));
    Ok((0..batch.num_rows())
        .map(|i| RawPromptRow {
            row: first_row + i as u64,
            prompt_id: pid.get_id(i),
            chosen: chosen.get(i),
            messages: messages.get(i),
            prompt: prompt.get(i),
            invalid: false,
        })
        .collect())
}

/// `(prompt_id, response)` rows of a y_gen file. Rows with a null id or response are returned
/// as errors counted by the caller.
pub fn ygen_rows(batch: &RecordBatch) -> Result<Vec<Option<YgenRow>>> {
    let pid = StrCol::new(Some(require(batch, "prompt_id", "y_gen: prompt_id, response")?));
    let resp = StrCol::new(Some(require(batch, "response", "y_gen: prompt_id, response")?));
    let ids = match batch.column_by_name("response_ids") {
        Some(col) => Some(id_lists(col)?),
        None => None,
    };
    Ok((0..batch.num_rows())
        .map(|i| match (pid.get_id(i), resp.get(i)) {
            (RawStr::Str(p), RawStr::Str(r)) => {
                let ids = ids.as_ref().and_then(|col| col[i].clone());
                Some(YgenRow { prompt_id: p, response: r, ids })
            }
            _ => None,
        })
        .collect())
}

/// `(prompt_id, chosen_ids, rejected_ids)` rows: the generated ids of pairs' responses. Rows
/// with a null in any of them are returned as None (counted by the caller).
pub fn pair_id_rows(batch: &RecordBatch) -> Result<Vec<Option<PairIdsRow>>> {
    let what = "pair ids: prompt_id, chosen_ids, rejected_ids";
    let pid = StrCol::new(Some(require(batch, "prompt_id", what)?));
    let chosen = id_lists(require(batch, "chosen_ids", what)?)?;
    let rejected = id_lists(require(batch, "rejected_ids", what)?)?;
    Ok((0..batch.num_rows())
        .map(|i| match (pid.get_id(i), &chosen[i], &rejected[i]) {
            (RawStr::Str(p), Some(c), Some(r)) => Some(PairIdsRow { prompt_id: p, chosen: c.clone(), rejected: r.clone() }),
            _ => None,
        })
        .collect())
}

/// A column of token-id lists (`list` or `large_list` of any integer type), None where null.
/// Negative ids become `u32::MAX`, which the vocabulary check rejects.
fn id_lists(col: &ArrayRef) -> Result<Vec<Option<Vec<u32>>>> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Int32Type, Int64Type, UInt32Type, UInt64Type};
    fn values(a: &ArrayRef) -> Option<Vec<u32>> {
        let to_u32 = |v: i64| u32::try_from(v).unwrap_or(u32::MAX);
        if let Some(p) = a.as_primitive_opt::<Int32Type>() {
            return Some(p.values().iter().map(|&v| to_u32(v as i64)).collect());
        }
        if let Some(p) = a.as_primitive_opt::<Int64Type>() {
            return Some(p.values().iter().map(|&v| to_u32(v)).collect());
        }
        if let Some(p) = a.as_primitive_opt::<UInt32Type>() {
            return Some(p.values().to_vec());
        }
        if let Some(p) = a.as_primitive_opt::<UInt64Type>() {
            return Some(p.values().iter().map(|&v| u32::try_from(v).unwrap_or(u32::MAX)).collect());
        }
        None
    }
    let bad = || PrepError::Input(format!("y_gen: response_ids must be lists of integers, got {}", col.data_type()));
    let n = col.len();
    let mut out = Vec::with_capacity(n);
    macro_rules! lists {
        ($l:expr) => {
            for i in 0..n {
                if $l.is_null(i) {
                    out.push(None);
                } else {
                    let v = $l.value(i);
                    if v.null_count() > 0 {
                        out.push(Some(vec![u32::MAX]));
                    } else {
                        out.push(Some(values(&v).ok_or_else(bad)?));
                    }
                }
            }
        };
    }
    match col.data_type() {
        DataType::List(_) => lists!(col.as_list::<i32>()),
        DataType::LargeList(_) => lists!(col.as_list::<i64>()),
        DataType::Null => out.resize(n, None),
        _ => return Err(bad()),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::builder::{ListBuilder, StringBuilder, StructBuilder};
    use arrow_array::{Int64Array, StringArray};
    use arrow_schema::{Field, Fields};
    use std::sync::Arc;

    fn messages_array(rows: &[Option<Vec<(&str, Option<&str>)>>]) -> ArrayRef {
        let fields = Fields::from(vec![
            Field::new("content", DataType::Utf8, true),
            Field::new("role", DataType::Utf8, true),
        ]);
        let sb = StructBuilder::new(
            fields.clone(),
            vec![Box::new(StringBuilder::new()), Box::new(StringBuilder::new())],
        );
        let mut lb = ListBuilder::new(sb).with_field(Arc::new(Field::new("item", DataType::Struct(fields), true)));
        for r in rows {
            match r {
                None => lb.append(false),
                Some(msgs) => {
                    for (role, content) in msgs {
                        let s = lb.values();
                        s.field_builder::<StringBuilder>(0).unwrap().append_option(*content);
                        s.field_builder::<StringBuilder>(1).unwrap().append_value(role);
                        s.append(true);
                    }
                    lb.append(true);
                }
            }
        }
        Arc::new(lb.finish())
    }

    #[test]
    fn decodes_list_of_struct_and_nulls() {
        let arr = messages_array(&[
            Some(vec![("user", Some("hi")), ("assistant", Some("yo"))]),
            None,
            Some(vec![("user", None)]),
        ]);
        let batch = RecordBatch::try_from_iter(vec![("messages", arr)]).unwrap();
        let rows = sft_rows(&batch, 10).unwrap();
        assert_eq!(rows[0].row, 10);
        assert!(matches!(&rows[0].messages, RawMessages::List(l) if l.len() == 2));
        assert_eq!(rows[1].messages, RawMessages::Missing);
        match &rows[2].messages {
            RawMessages::List(l) => assert_eq!(l[0].content, RawStr::Missing),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn decodes_json_text_fallback() {
        let arr: ArrayRef = Arc::new(StringArray::from(vec![
            Some(r#"[{"role":"user","content":5},{"role":"assistant","content":"a"}]"#),
            Some("oops"),
            None,
        ]));
        let batch = RecordBatch::try_from_iter(vec![("messages", arr)]).unwrap();
        let rows = sft_rows(&batch, 0).unwrap();
        match &rows[0].messages {
            RawMessages::List(l) => assert_eq!(l[0].content, RawStr::NotString),
            other => panic!("{other:?}"),
        }
        assert_eq!(rows[1].messages, RawMessages::NotAList);
        assert_eq!(rows[2].messages, RawMessages::Missing);
    }

    #[test]
    fn missing_column_names_the_schema() {
        let arr: ArrayRef = Arc::new(Int64Array::from(vec![1]));
        let batch = RecordBatch::try_from_iter(vec![("text", arr)]).unwrap();
        let err = sft_rows(&batch, 0).unwrap_err().to_string();
        assert!(err.contains("'messages'") && err.contains("text"), "{err}");
    }
}
