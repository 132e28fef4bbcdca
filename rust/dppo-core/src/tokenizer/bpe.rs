//! Byte-level BPE over raw bytes, with the merge semantics of the `tokenizers`
//! crate and a per-thread cache of pre-token -> ids.
//!
//! HF merges a word by repeatedly applying the adjacent pair with the lowest
//! merge rank, leftmost first, the result being the vocab id of the merged
//! string. Everything here is keyed by ids exactly as HF keys its merge map
//! (`(id_a, id_b) -> (rank, id_ab)`), so even unusual vocabularies behave the
//! same; bytes are only used to find the initial symbols and, with
//! `ignore_merges`, to look a whole pre-token up in the vocabulary.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU64, Ordering};

use rustc_hash::FxHashMap;

use super::bytelevel;

/// Words longer than this use the heap-based merge (O(n log n)) instead of
/// the rescanning one (O(n^2) but branch-light, faster for short words).
const HEAP_THRESHOLD: usize = 96;
/// Longer pre-tokens are not cached: they rarely repeat.
const MAX_CACHED_WORD: usize = 128;
/// Per-thread caches kept at once (one per live tokenizer).
const MAX_CACHES_PER_THREAD: usize = 4;

pub(crate) const DEFAULT_CACHE_CAPACITY: usize = 1 << 16;

/// `rank << 32 | merged_id`; the lowest value is the merge to apply first.
type PackedMerge = u64;
const NO_MERGE: PackedMerge = u64::MAX;

#[inline(always)]
fn pair_key(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

pub(crate) struct BpeModel {
    byte_ids: [u32; 256],
    merges: FxHashMap<u64, PackedMerge>,
    /// With `ignore_merges`: every vocab entry that is a byte-level string.
    whole_words: Option<FxHashMap<Box<[u8]>, u32>>,
    /// Distinguishes this model's entries in the thread-local caches.
    instance: u64,
    cache_capacity: usize,
}

impl BpeModel {
    /// `merges` are in rank order, as in `tokenizer.json`.
    pub(crate) fn new(
        vocab: &FxHashMap<String, u32>,
        merges: &[(String, String)],
        ignore_merges: bool,
        cache_capacity: usize,
    ) -> Result<Self, String> {
        if vocab.values().any(|&id| id == u32::MAX) {
            // `u32::MAX` marks merged-away symbols in `merge_with_heap`.
            return Err("vocab uses id u32::MAX".into());
        }
        let mut byte_ids = [0u32; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            let token = bytelevel::byte_token(b as u8);
            // HF silently drops bytes missing from the vocab (or maps them to
            // unk); the fast path only handles complete byte alphabets.
            *slot = *vocab
                .get(&token)
                .ok_or_else(|| format!("vocab has no token for byte {b:#04x} ({token:?})"))?;
        }
        let mut map = FxHashMap::default();
        map.reserve(merges.len());
        let mut buf = String::new();
        for (rank, (a, b)) in merges.iter().enumerate() {
            let missing = |t: &str| format!("merge token {t:?} is not in the vocab");
            let ia = *vocab.get(a).ok_or_else(|| missing(a))?;
            let ib = *vocab.get(b).ok_or_else(|| missing(b))?;
            buf.clear();
            buf.push_str(a);
            buf.push_str(b);
            let merged = *vocab.get(&buf).ok_or_else(|| missing(&buf))?;
            // Later duplicates overwrite earlier ones, as in HF's map.
            map.insert(pair_key(ia, ib), ((rank as u64) << 32) | merged as u64);
        }
        let whole_words = ignore_merges.then(|| {
            vocab
                .iter()
                .filter_map(|(s, &id)| Some((bytelevel::decode_token(s)?.into_boxed_slice(), id)))
                .collect()
        });
        static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);
        Ok(Self {
            byte_ids,
            merges: map,
            whole_words,
            instance: NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed),
            cache_capacity,
        })
    }

    #[inline(always)]
    fn merge_of(&self, a: u32, b: u32) -> PackedMerge {
        self.merges
            .get(&pair_key(a, b))
            .copied()
            .unwrap_or(NO_MERGE)
    }

    /// Runs `f` with this thread's cache for this model.
    pub(crate) fn with_session<R>(&self, f: impl FnOnce(&mut Session<'_>) -> R) -> R {
        thread_local! {
            static CACHES: RefCell<Vec<WordCache>> = const { RefCell::new(Vec::new()) };
        }
        CACHES.with(|caches| {
            let mut caches = caches.borrow_mut();
            let pos = match caches.iter().position(|c| c.owner == self.instance) {
                Some(p) => p,
                None => {
                    if caches.len() >= MAX_CACHES_PER_THREAD {
                        caches.pop();
                    }
                    caches.push(WordCache::new(self.instance));
                    caches.len() - 1
                }
            };
            // Most recently used first, so eviction drops the stalest model.
            if pos != 0 {
                let c = caches.remove(pos);
                caches.insert(0, c);
            }
            let mut session = Session {
                model: self,
                cache: &mut caches[0],
            };
            f(&mut session)
        })
    }

    /// Applies the merges to `word` (at least two bytes), appending the ids.
    fn merge_word(&self, word: &[u8], scratch: &mut Scratch, out: &mut Vec<u32>) {
        let syms = &mut scratch.syms;
        syms.clear();
        syms.extend(word.iter().map(|&b| self.byte_ids[b as usize]));
        if syms.len() > HEAP_THRESHOLD {
            self.merge_with_heap(scratch);
            out.extend(scratch.syms.iter().copied().filter(|&id| id != u32::MAX));
        } else {
            self.merge_by_rescanning(scratch);
            out.extend_from_slice(&scratch.syms);
        }
    }

    /// Keeps the merge of every adjacent pair and applies the smallest one
    /// (first occurrence on ties) until none is left.
    fn merge_by_rescanning(&self, scratch: &mut Scratch) {
        let Scratch { syms, ranks, .. } = scratch;
        ranks.clear();
        ranks.extend(syms.windows(2).map(|w| self.merge_of(w[0], w[1])));
        loop {
            let mut best = NO_MERGE;
            let mut at = 0;
            for (i, &r) in ranks.iter().enumerate() {
                if r < best {
                    best = r;
                    at = i;
                }
            }
            if best == NO_MERGE {
                break;
            }
            syms[at] = best as u32;
            syms.remove(at + 1);
            ranks.remove(at);
            if at > 0 {
                ranks[at - 1] = self.merge_of(syms[at - 1], syms[at]);
            }
            if at + 1 < syms.len() {
                ranks[at] = self.merge_of(syms[at], syms[at + 1]);
            }
        }
    }

    /// HF's own algorithm (`Word::merge_all`): a min-heap of (rank, position)
    /// over a linked list of symbols, skipping entries made stale by earlier
    /// merges. Merged-away symbols are set to `u32::MAX`.
    fn merge_with_heap(&self, scratch: &mut Scratch) {
        let Scratch {
            syms,
            prev,
            next,
            heap,
            ..
        } = scratch;
        let n = syms.len();
        prev.clear();
        next.clear();
        prev.extend((0..n).map(|i| i as u32 as i64 - 1));
        next.extend((1..=n).map(|i| i as u32));
        heap.clear();
        for i in 0..n - 1 {
            let m = self.merge_of(syms[i], syms[i + 1]);
            if m != NO_MERGE {
                heap.push(Reverse(((m >> 32) as u32, i as u32, m as u32)));
            }
        }
        while let Some(Reverse((_, pos, new_id))) = heap.pop() {
            let pos = pos as usize;
            let right = next[pos] as usize;
            if syms[pos] == u32::MAX || right >= n {
                continue;
            }
            let m = self.merge_of(syms[pos], syms[right]);
            if m == NO_MERGE || m as u32 != new_id {
                continue;
            }
            syms[pos] = new_id;
            syms[right] = u32::MAX;
            let after = next[right];
            next[pos] = after;
            if (after as usize) < n {
                prev[after as usize] = pos as i64;
            }
            if prev[pos] >= 0 {
                let p = prev[pos] as usize;
                let m = self.merge_of(syms[p], new_id);
                if m != NO_MERGE {
                    heap.push(Reverse(((m >> 32) as u32, p as u32, m as u32)));
                }
            }
            if (after as usize) < n {
                let m = self.merge_of(new_id, syms[after as usize]);
                if m != NO_MERGE {
                    heap.push(Reverse(((m >> 32) as u32, pos as u32, m as u32)));
                }
            }
        }
    }
}

#[derive(Default)]
struct Scratch {
    syms: Vec<u32>,
    ranks: Vec<PackedMerge>,
    prev: Vec<i64>,
    next: Vec<u32>,
    heap: BinaryHeap<Reverse<(u32, u32, u32)>>,
}

struct WordCache {
    owner: u64,
    words: FxHashMap<Box<[u8]>, Box<[u32]>>,
    scratch: Scratch,
}

impl WordCache {
    fn new(owner: u64) -> Self {
        Self {
            owner,
            words: FxHashMap::default(),
            scratch: Scratch::default(),
        }
    }
}

/// A model plus this thread's cache, for the duration of one encode call.
pub(crate) struct Session<'a> {
    model: &'a BpeModel,
    cache: &'a mut WordCache,
}

impl Session<'_> {
    /// Appends the ids of one pre-token (raw bytes).
    #[inline]
    pub(crate) fn encode_word(&mut self, word: &[u8], out: &mut Vec<u32>) {
        let model = self.model;
        if word.len() == 1 {
            out.push(model.byte_ids[word[0] as usize]);
            return;
        }
        if let Some(words) = &model.whole_words {
            if let Some(&id) = words.get(word) {
                out.push(id);
                return;
            }
        }
        if word.len() > MAX_CACHED_WORD || model.cache_capacity == 0 {
            model.merge_word(word, &mut self.cache.scratch, out);
            return;
        }
        if let Some(ids) = self.cache.words.get(word) {
            out.extend_from_slice(ids);
            return;
        }
        let start = out.len();
        model.merge_word(word, &mut self.cache.scratch, out);
        let words = &mut self.cache.words;
        // A full cache is emptied rather than frozen so that it follows the
        // vocabulary of the text currently being encoded.
        if words.len() >= model.cache_capacity {
            words.clear();
        }
        words.insert(word.into(), out[start..].into());
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A tiny vocabulary: all bytes, then merges chosen to create ties,
    /// stale heap entries and merges that change neighbouring pairs.
    pub(crate) fn toy_model(ignore_merges: bool) -> BpeModel {
        let mut vocab: FxHashMap<String, u32> = FxHashMap::default();
        for b in 0..=255u8 {
            vocab.insert(bytelevel::byte_token(b), b as u32);
        }
        let merges: Vec<(String, String)> = [
            ("a", "a"),
            ("b", "c"),
            ("a", "b"),
            ("aa", "a"),
            ("ab", "c"),
            ("a", "bc"),
            ("aa", "aa"),
            ("c", "c"),
            ("abc", "abc"),
            ("Ġ", "a"),
            ("Ġa", "bc"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        for (a, b) in &merges {
            let next = vocab.len() as u32;
            vocab.entry(format!("{a}{b}")).or_insert(next);
        }
        // Only reachable through `ignore_merges`.
        let next = vocab.len() as u32;
        vocab.insert("cab".into(), next);
        BpeModel::new(&vocab, &merges, ignore_merges, DEFAULT_CACHE_CAPACITY).unwrap()
    }

    #[test]
    fn heap_and_rescanning_merges_agree() {
        let model = toy_model(false);
        let mut scratch = Scratch::default();
        let mut state = 0x9E3779B97F4A7C15u64;
        for len in 2..200 {
            for _ in 0..20 {
                let word: Vec<u8> = (0..len)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        b"aabc c "[(state % 7) as usize]
                    })
                    .collect();
                scratch.syms.clear();
                scratch
                    .syms
                    .extend(word.iter().map(|&b| model.byte_ids[b as usize]));
                model.merge_by_rescanning(&mut scratch);
                let a = scratch.syms.clone();
                scratch.syms.clear();
                scratch
                    .syms
                    .extend(word.iter().map(|&b| model.byte_ids[b as usize]));
                model.merge_with_heap(&mut scratch);
                let b: Vec<u32> = scratch
                    .syms
                    .iter()
                    .copied()
                    .filter(|&i| i != u32::MAX)
                    .collect();
                assert_eq!(a, b, "word {:?}", String::from_utf8_lossy(&word));
            }
        }
    }

    #[test]
    fn cache_returns_what_was_computed() {
        let model = toy_model(true);
        let mut first = Vec::new();
        let mut second = Vec::new();
        model.with_session(|s| {
            for w in [&b"aaab"[..], b"abcabc", b"cab", b" abc", b"aaab"] {
                s.encode_word(w, &mut first);
            }
        });
        model.with_session(|s| {
            for w in [&b"aaab"[..], b"abcabc", b"cab", b" abc", b"aaab"] {
                s.encode_word(w, &mut second);
            }
        });
        assert_eq!(first, second);
        assert_eq!(first.len(), 2 + 1 + 1 + 1 + 2);
    }
}
