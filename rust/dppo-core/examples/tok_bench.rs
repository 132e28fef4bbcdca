//! Throughput of the dppo tokenizer against the `tokenizers` crate.
//!
//! ```text
//! cargo run --release -p dppo-core --example tok_bench -- TOKENIZER_JSON TEXT_FILE [--iters N] [--repeat R]
//! ```
//!
//! TEXT_FILE holds one document per line; a `.jsonl` file holds one JSON string
//! (or an object with a `"text"` field) per line, so documents may contain
//! newlines. Both sides encode the whole batch in parallel on the rayon pool
//! (`RAYON_NUM_THREADS` to change it); the ids of the first pass are compared.
//! Each pass is timed separately; the best pass is reported (the first pass
//! also fills the per-thread BPE caches of both implementations).
//! `tests/data` fixtures or `examples/tok_bench_data.py` provide inputs.

use std::path::PathBuf;
use std::time::Instant;

use dppo_core::tokenizer::Tokenizer;

fn read_docs(path: &PathBuf) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let jsonl = path.extension().is_some_and(|e| e == "jsonl");
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|line| {
            if !jsonl {
                return line.to_string();
            }
            match serde_json::from_str::<serde_json::Value>(line).expect("bad JSON line") {
                serde_json::Value::String(s) => s,
                v => v["text"]
                    .as_str()
                    .expect("JSON line without a text field")
                    .to_string(),
            }
        })
        .collect()
}

struct Pass {
    seconds: f64,
    tokens: usize,
}

fn report(name: &str, passes: &[Pass], docs: usize, bytes: usize) -> f64 {
    let best = passes
        .iter()
        .map(|p| p.seconds)
        .fold(f64::INFINITY, f64::min);
    let tokens = passes[0].tokens;
    let all: Vec<String> = passes
        .iter()
        .map(|p| format!("{:.3}s", p.seconds))
        .collect();
    println!(
        "{name:<22} {:>10.0} docs/s {:>12.0} tokens/s {:>8.1} MB/s   passes [{}]",
        docs as f64 / best,
        tokens as f64 / best,
        bytes as f64 / best / 1e6,
        all.join(", ")
    );
    best
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut positional = Vec::new();
    let mut iters = 5usize;
    let mut repeat = 1usize;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--iters" => iters = args.next().and_then(|v| v.parse().ok()).expect("--iters N"),
            "--repeat" => {
                repeat = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--repeat R")
            }
            _ => positional.push(PathBuf::from(a)),
        }
    }
    let [tok_path, text_path] = positional.as_slice() else {
        eprintln!("usage: tok_bench TOKENIZER_JSON TEXT_FILE [--iters N] [--repeat R]");
        std::process::exit(2);
    };

    let mut docs = read_docs(text_path);
    let n = docs.len();
    for _ in 1..repeat {
        docs.extend_from_within(..n);
    }
    let refs: Vec<&str> = docs.iter().map(String::as_str).collect();
    let bytes: usize = refs.iter().map(|d| d.len()).sum();

    let t0 = Instant::now();
    let ours = Tokenizer::from_file(tok_path).expect("cannot load tokenizer");
    let load_ours = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let hf = tokenizers::Tokenizer::from_file(tok_path).expect("tokenizers cannot load it");
    let load_hf = t0.elapsed().as_secs_f64();

    println!(
        "{} docs, {:.1} MB, {} threads; backend {} (load {:.2}s, tokenizers load {:.2}s){}",
        refs.len(),
        bytes as f64 / 1e6,
        rayon::current_num_threads(),
        ours.backend_name(),
        load_ours,
        load_hf,
        ours.fallback_reason()
            .map(|r| format!("; fallback because {r}"))
            .unwrap_or_default(),
    );

    let mut ours_passes = Vec::new();
    let mut first_ours = None;
    for _ in 0..iters {
        let t = Instant::now();
        let ids = ours.encode_batch(&refs).expect("encode");
        let seconds = t.elapsed().as_secs_f64();
        ours_passes.push(Pass {
            seconds,
            tokens: ids.iter().map(Vec::len).sum(),
        });
        first_ours.get_or_insert(ids);
    }

    let mut hf_passes = Vec::new();
    let mut first_hf = None;
    for _ in 0..iters {
        let t = Instant::now();
        let encodings = hf
            .encode_batch(refs.clone(), false)
            .expect("tokenizers failed");
        let seconds = t.elapsed().as_secs_f64();
        hf_passes.push(Pass {
            seconds,
            tokens: encodings.iter().map(|e| e.len()).sum(),
        });
        first_hf.get_or_insert(encodings);
    }

    let ours_ids = first_ours.unwrap();
    let hf_encodings = first_hf.unwrap();
    let mismatches: Vec<usize> = (0..refs.len())
        .filter(|&i| ours_ids[i].as_slice() != hf_encodings[i].get_ids())
        .collect();

    let best_ours = report(
        &format!("dppo ({})", ours.backend_name()),
        &ours_passes,
        refs.len(),
        bytes,
    );
    let best_hf = report("tokenizers encode_batch", &hf_passes, refs.len(), bytes);
    println!("speedup {:.2}x", best_hf / best_ours);
    if mismatches.is_empty() {
        println!("ids identical on all {} docs", refs.len());
    } else {
        let i = mismatches[0];
        println!(
            "IDS DIFFER on {} docs; first: doc {i} {:?}",
            mismatches.len(),
            refs[i].chars().take(200).collect::<String>()
        );
        std::process::exit(1);
    }
}
