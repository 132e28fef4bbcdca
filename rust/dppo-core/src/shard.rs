//! The on-disk shard format (see `docs/shards.md`).
//!
//! A shard is two files: `NAME.tok`, the token ids as a flat little-endian `u32` array (so
//! `np.memmap(..., dtype=uint32)` reads it as is), and `NAME.idx`, a 128-byte header followed by
//! typed, 8-byte-aligned arrays: the examples, their segments (prompt / response / chosen /
//! rejected / y_gen), source rows, truncation flags, scores and prompt ids. The header carries a
//! version and xxh3 checksums of the `.tok` file and of the index body.
//!
//! Shards hold no packing: the trainer forms its micro-batches under a token budget when it runs
//! (`pack::best_fit_decreasing`, the one packing implementation).

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::Xxh3;

use crate::error::{IoContext, PrepError, Result};

pub const MAGIC: &[u8; 8] = b"DPPOSHRD";
/// Version 2 dropped the packing rows of version 1; version 3 lets an SFT example hold several
/// context and label segments in turn (a whole conversation, every assistant turn a label span).
pub const VERSION: u32 = 3;
pub const HEADER_LEN: usize = 128;

pub const KIND_SFT: u32 = 1;
pub const KIND_PAIRS: u32 = 2;

/// What a segment of an example holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum SegKind {
    /// Context: the rendered prompt (for a whole SFT conversation, each stretch between two
    /// assistant turns), never a label.
    Prompt = 0,
    /// An assistant turn of an SFT example: a label span.
    Response = 1,
    Chosen = 2,
    Rejected = 3,
    Ygen = 4,
}

/// Example flags.
pub const FLAG_PROMPT_TRUNCATED: u32 = 1;
pub const FLAG_RESPONSE_TRUNCATED: u32 = 2;
/// A response whose ids were not a continuation of the prompt's ids (see `prep`).
pub const FLAG_BOUNDARY_RESPLIT: u32 = 4;
/// Whole exchanges were dropped from the start of the conversation (`--turns all`).
pub const FLAG_EXCHANGES_DROPPED: u32 = 8;

/// Header flags.
pub const HAS_YGEN: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    pub kind: u32,
    pub flags: u32,
    pub n_examples: u64,
    pub n_segments: u64,
    pub n_tokens: u64,
    pub n_id_bytes: u64,
    pub tok_checksum: u64,
    pub body_checksum: u64,
}

/// One typed array of the index: where it starts in the `.idx` file and how many items it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub name: &'static str,
    pub dtype: &'static str,
    pub offset: u64,
    pub count: u64,
}

fn size_of(dtype: &str) -> u64 {
    match dtype {
        "u64" => 8,
        "u32" | "f32" => 4,
        "u8" => 1,
        _ => unreachable!("unknown dtype {dtype}"),
    }
}

impl Header {
    /// The index arrays in file order. Shared by the writer and every reader.
    pub fn sections(&self) -> Vec<Section> {
        let spec: [(&'static str, &'static str, u64); 9] = [
            ("ex_seg_off", "u64", self.n_examples + 1),
            ("seg_tok_off", "u64", self.n_segments),
            ("seg_len", "u32", self.n_segments),
            ("seg_kind", "u32", self.n_segments),
            ("ex_row", "u64", self.n_examples),
            ("ex_flags", "u32", self.n_examples),
            ("ex_scores", "f32", 2 * self.n_examples),
            ("id_off", "u64", self.n_examples + 1),
            ("id_bytes", "u8", self.n_id_bytes),
        ];
        let mut offset = HEADER_LEN as u64;
        spec.iter()
            .map(|&(name, dtype, count)| {
                let s = Section { name, dtype, offset, count };
                offset = (offset + count * size_of(dtype)).div_ceil(8) * 8;
                s
            })
            .collect()
    }

    pub fn idx_len(&self) -> u64 {
        let last = self.sections().pop().unwrap();
        (last.offset + last.count).div_ceil(8) * 8
    }

    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(MAGIC);
        let mut put = |at: usize, bytes: &[u8]| h[at..at + bytes.len()].copy_from_slice(bytes);
        put(8, &VERSION.to_le_bytes());
        put(12, &self.kind.to_le_bytes());
        put(16, &self.flags.to_le_bytes());
        put(24, &self.n_examples.to_le_bytes());
        put(32, &self.n_segments.to_le_bytes());
        put(40, &self.n_tokens.to_le_bytes());
        put(64, &self.n_id_bytes.to_le_bytes());
        put(72, &self.tok_checksum.to_le_bytes());
        put(80, &self.body_checksum.to_le_bytes());
        let hc = xxhash_rust::xxh3::xxh3_64(&h[0..88]);
        h[88..96].copy_from_slice(&hc.to_le_bytes());
        h
    }

    fn decode(h: &[u8], path: &Path) -> Result<Self> {
        let bad = |reason: String| PrepError::Corrupt { path: path.to_owned(), reason };
        if h.len() < HEADER_LEN {
            return Err(bad(format!("file is {} bytes, shorter than the {HEADER_LEN}-byte header", h.len())));
        }
        if &h[0..8] != MAGIC {
            return Err(bad("not a dppo shard index (bad magic bytes)".into()));
        }
        let u32_at = |at: usize| u32::from_le_bytes(h[at..at + 4].try_into().unwrap());
        let u64_at = |at: usize| u64::from_le_bytes(h[at..at + 8].try_into().unwrap());
        let version = u32_at(8);
        if version < VERSION {
            return Err(bad(format!(
                "written by an older dppo (shard format version {version}; this dppo reads version {VERSION}): \
                 prepare the data again with `dppo prep ... --overwrite`"
            )));
        }
        if version != VERSION {
            return Err(bad(format!("shard format version {version} is newer than this dppo reads ({VERSION}): upgrade dppo")));
        }
        if u64_at(88) != xxhash_rust::xxh3::xxh3_64(&h[0..88]) {
            return Err(bad("header checksum mismatch".into()));
        }
        Ok(Header {
            kind: u32_at(12),
            flags: u32_at(16),
            n_examples: u64_at(24),
            n_segments: u64_at(32),
            n_tokens: u64_at(40),
            n_id_bytes: u64_at(64),
            tok_checksum: u64_at(72),
            body_checksum: u64_at(80),
        })
    }
}

/// Paths of the two files of shard `name` in `dir`.
pub fn shard_paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (dir.join(format!("{name}.tok")), dir.join(format!("{name}.idx")))
}

/// Writes one shard: tokens stream to disk as examples arrive; the index is kept in memory
/// (a few dozen bytes per example) and written by `finish`.
pub struct ShardWriter {
    name: String,
    tok_path: PathBuf,
    idx_path: PathBuf,
    tok: BufWriter<File>,
    hasher: Xxh3,
    kind: u32,
    flags: u32,
    n_tokens: u64,
    ex_seg_off: Vec<u64>,
    seg_tok_off: Vec<u64>,
    seg_len: Vec<u32>,
    seg_kind: Vec<u32>,
    ex_row: Vec<u64>,
    ex_flags: Vec<u32>,
    ex_scores: Vec<f32>,
    id_off: Vec<u64>,
    id_bytes: Vec<u8>,
    packed_tokens: u64,
}

/// What `ShardWriter::finish` reports.
#[derive(Debug, Clone)]
pub struct ShardStats {
    pub name: String,
    pub examples: u64,
    pub tokens: u64,
    /// Tokens the trainer sees: the prompt counted once per sequence.
    pub packed_tokens: u64,
    pub tok_checksum: u64,
}

impl ShardWriter {
    pub fn create(dir: &Path, name: &str, kind: u32, flags: u32) -> Result<Self> {
        let (tok_path, idx_path) = shard_paths(dir, name);
        let tok = BufWriter::with_capacity(1 << 20, File::create(&tok_path).at(&tok_path)?);
        Ok(Self {
            name: name.to_owned(),
            tok_path,
            idx_path,
            tok,
            hasher: Xxh3::new(),
            kind,
            flags,
            n_tokens: 0,
            ex_seg_off: vec![0],
            seg_tok_off: Vec::new(),
            seg_len: Vec::new(),
            seg_kind: Vec::new(),
            ex_row: Vec::new(),
            ex_flags: Vec::new(),
            ex_scores: Vec::new(),
            id_off: vec![0],
            id_bytes: Vec::new(),
            packed_tokens: 0,
        })
    }

    pub fn len(&self) -> usize {
        self.ex_row.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ex_row.is_empty()
    }

    pub fn tokens(&self) -> u64 {
        self.n_tokens
    }

    /// Append an example. The first segment must be the prompt. The tokens the trainer sees of a
    /// pair are the sum over its other segments of (prompt length + segment length); of an SFT
    /// example, all of its tokens (one sequence).
    pub fn add(
        &mut self,
        row: u64,
        id: &str,
        segments: &[(SegKind, &[u32])],
        flags: u32,
        scores: [f32; 2],
    ) -> Result<()> {
        debug_assert!(matches!(segments.first(), Some((SegKind::Prompt, _))));
        let prompt_len = segments[0].1.len() as u32;
        let mut unit = 0u32;
        for (i, (kind, ids)) in segments.iter().enumerate() {
            self.seg_tok_off.push(self.n_tokens);
            self.seg_len.push(ids.len() as u32);
            self.seg_kind.push(*kind as u32);
            let bytes: &[u8] = bytemuck::cast_slice(ids);
            self.tok.write_all(bytes).at(&self.tok_path)?;
            self.hasher.update(bytes);
            self.n_tokens += ids.len() as u64;
            if self.kind == KIND_SFT {
                unit += ids.len() as u32;
            } else if i > 0 {
                unit += prompt_len + ids.len() as u32;
            }
        }
        self.ex_seg_off.push(self.seg_tok_off.len() as u64);
        self.ex_row.push(row);
        self.ex_flags.push(flags);
        self.ex_scores.extend_from_slice(&scores);
        self.id_bytes.extend_from_slice(id.as_bytes());
        self.id_off.push(self.id_bytes.len() as u64);
        self.packed_tokens += unit as u64;
        Ok(())
    }

    /// Write the index.
    pub fn finish(self) -> Result<ShardStats> {
        let mut tok = self.tok;
        tok.flush().at(&self.tok_path)?;
        tok.get_ref().sync_all().at(&self.tok_path)?;
        let mut header = Header {
            kind: self.kind,
            flags: self.flags,
            n_examples: self.ex_row.len() as u64,
            n_segments: self.seg_len.len() as u64,
            n_tokens: self.n_tokens,
            n_id_bytes: self.id_bytes.len() as u64,
            tok_checksum: self.hasher.digest(),
            body_checksum: 0,
        };
        let mut body: Vec<u8> = Vec::with_capacity((header.idx_len() as usize).saturating_sub(HEADER_LEN));
        let arrays: [&[u8]; 9] = [
            bytemuck::cast_slice(&self.ex_seg_off),
            bytemuck::cast_slice(&self.seg_tok_off),
            bytemuck::cast_slice(&self.seg_len),
            bytemuck::cast_slice(&self.seg_kind),
            bytemuck::cast_slice(&self.ex_row),
            bytemuck::cast_slice(&self.ex_flags),
            bytemuck::cast_slice(&self.ex_scores),
            bytemuck::cast_slice(&self.id_off),
            &self.id_bytes,
        ];
        for (section, bytes) in header.sections().iter().zip(arrays) {
            debug_assert_eq!(section.offset as usize, HEADER_LEN + body.len());
            body.extend_from_slice(bytes);
            body.resize(body.len().div_ceil(8) * 8, 0);
        }
        header.body_checksum = xxhash_rust::xxh3::xxh3_64(&body);
        let mut f = BufWriter::new(File::create(&self.idx_path).at(&self.idx_path)?);
        f.write_all(&header.encode()).at(&self.idx_path)?;
        f.write_all(&body).at(&self.idx_path)?;
        f.flush().at(&self.idx_path)?;
        f.get_ref().sync_all().at(&self.idx_path)?;
        Ok(ShardStats {
            name: self.name,
            examples: header.n_examples,
            tokens: header.n_tokens,
            packed_tokens: self.packed_tokens,
            tok_checksum: header.tok_checksum,
        })
    }
}

// The arrays are written as their in-memory bytes (bytemuck's checked casts): little-endian only.
#[cfg(not(target_endian = "little"))]
compile_error!("the shard format is little-endian and is written by memory copy");

/// Open a shard index, checking its header, sizes and (when `verify`) both checksums.
/// Every failure names the file.
pub fn open_index(idx_path: &Path, verify: bool) -> Result<Header> {
    let mut f = File::open(idx_path).at(idx_path)?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes).at(idx_path)?;
    let header = Header::decode(&bytes, idx_path)?;
    let want = header.idx_len();
    if bytes.len() as u64 != want {
        return Err(PrepError::Corrupt {
            path: idx_path.to_owned(),
            reason: format!("index is {} bytes, the header says {want} (truncated?)", bytes.len()),
        });
    }
    if verify && xxhash_rust::xxh3::xxh3_64(&bytes[HEADER_LEN..]) != header.body_checksum {
        return Err(PrepError::Corrupt { path: idx_path.to_owned(), reason: "index checksum mismatch".into() });
    }
    let tok_path = idx_path.with_extension("tok");
    let tok_len = std::fs::metadata(&tok_path).at(&tok_path)?.len();
    if tok_len != header.n_tokens * 4 {
        return Err(PrepError::Corrupt {
            path: tok_path,
            reason: format!("token file is {tok_len} bytes, the index says {} (truncated?)", header.n_tokens * 4),
        });
    }
    if verify {
        // SAFETY: the map is read-only, lives only for this checksum and is dropped before we
        // return; dppo never writes a shard in place (a folder is assembled under a `.partial`
        // name and renamed), so no other process of ours changes the file while it is mapped. A
        // foreign writer truncating the file under us could fault the read (SIGBUS): that is the
        // documented hazard of any memory map, accepted here as numpy's `memmap` accepts it.
        let map = unsafe { memmap2::Mmap::map(&File::open(&tok_path).at(&tok_path)?) }.at(&tok_path)?;
        if xxhash_rust::xxh3::xxh3_64(&map) != header.tok_checksum {
            return Err(PrepError::Corrupt { path: tok_path, reason: "token checksum mismatch".into() });
        }
    }
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_two(dir: &Path) -> ShardStats {
        let mut w = ShardWriter::create(dir, "shard-00000", KIND_PAIRS, 0).unwrap();
        w.add(0, "a", &[(SegKind::Prompt, &[1, 2]), (SegKind::Chosen, &[3]), (SegKind::Rejected, &[4, 5])], 0, [9.0, 1.0])
            .unwrap();
        w.add(7, "bb", &[(SegKind::Prompt, &[6]), (SegKind::Chosen, &[7, 8]), (SegKind::Rejected, &[9])], 2, [f32::NAN; 2])
            .unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn round_trip_header_and_layout() {
        let dir = tempfile::tempdir().unwrap();
        let stats = write_two(dir.path());
        assert_eq!((stats.examples, stats.tokens, stats.packed_tokens), (2, 9, 12));
        let h = open_index(&dir.path().join("shard-00000.idx"), true).unwrap();
        assert_eq!((h.n_examples, h.n_segments, h.n_tokens, h.n_id_bytes), (2, 6, 9, 3));
        let bytes = std::fs::read(dir.path().join("shard-00000.idx")).unwrap();
        let s = h.sections();
        let seg_len = &s[2];
        let at = seg_len.offset as usize;
        let lens: Vec<u32> =
            (0..6).map(|i| u32::from_le_bytes(bytes[at + 4 * i..at + 4 * i + 4].try_into().unwrap())).collect();
        assert_eq!(lens, vec![2, 1, 2, 1, 2, 1]);
    }

    #[test]
    fn corruption_is_detected_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        write_two(dir.path());
        let idx = dir.path().join("shard-00000.idx");
        let tok = dir.path().join("shard-00000.tok");
        // flip a token
        let mut t = std::fs::read(&tok).unwrap();
        t[5] ^= 1;
        std::fs::write(&tok, &t).unwrap();
        let e = open_index(&idx, true).unwrap_err().to_string();
        assert!(e.contains("shard-00000.tok") && e.contains("checksum"), "{e}");
        // truncate the index
        let b = std::fs::read(&idx).unwrap();
        std::fs::write(&idx, &b[..b.len() - 8]).unwrap();
        let e = open_index(&idx, false).unwrap_err().to_string();
        assert!(e.contains("shard-00000.idx") && e.contains("truncated"), "{e}");
        std::fs::write(&idx, b"garbage").unwrap();
        assert!(open_index(&idx, false).unwrap_err().to_string().contains("shorter than"));
    }

    #[test]
    fn an_older_format_version_asks_to_prepare_again() {
        let dir = tempfile::tempdir().unwrap();
        write_two(dir.path());
        let idx = dir.path().join("shard-00000.idx");
        for old in 1..VERSION {
            let mut b = std::fs::read(&idx).unwrap();
            b[8..12].copy_from_slice(&old.to_le_bytes());
            let hc = xxhash_rust::xxh3::xxh3_64(&b[0..88]);
            b[88..96].copy_from_slice(&hc.to_le_bytes());
            let copy = dir.path().join(format!("old-{old}.idx"));
            std::fs::write(&copy, &b).unwrap();
            std::fs::copy(dir.path().join("shard-00000.tok"), copy.with_extension("tok")).unwrap();
            let e = open_index(&copy, false).unwrap_err().to_string();
            assert!(e.contains(&format!("old-{old}.idx")) && e.contains(&format!("version {old}")) && e.contains("dppo prep"), "{e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }
}
