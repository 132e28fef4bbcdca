//! One error type for the engine. Every variant renders as a single line that names the file,
//! row or option at fault, because the CLI shows it to the user as is.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum PrepError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Template(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{0}")]
    Input(String),
    /// `row` is the 0-based index of the row in the source; the message counts from 1 (the file's
    /// line for jsonl), as editors and `sed -n Np` do.
    #[error("row {n}{id}: {reason}", n = .row + 1, id = .prompt_id.as_ref().map(|p| format!(" (prompt_id {p})")).unwrap_or_default())]
    BadRow { row: u64, prompt_id: Option<String>, reason: String },
    #[error("{path}: corrupt shard: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{0}")]
    Config(String),
    #[error("interrupted")]
    Interrupted,
}

pub type Result<T> = std::result::Result<T, PrepError>;

pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| PrepError::Io { path: path.into(), source })
    }
}
