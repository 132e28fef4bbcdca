//! Packing examples into token-budgeted rows (micro-batches) by best-fit decreasing.
//!
//! The one packing implementation of dppo: the trainer, its reference pass and its evaluation form
//! their micro-batches with it (through the binding's `pack`). An example is never split: all of
//! its sequences (for a pair: prompt+chosen, prompt+rejected and prompt+y_gen) land in the same
//! row, so one row holds everything a loss term needs.

use std::collections::BTreeMap;

/// Pack items of the given lengths into rows of at most `pack_len` tokens and (when `max_items`
/// is not 0) at most `max_items` items.
///
/// Returns rows as lists of item indices, ascending within a row, rows in the order they were
/// opened. Items are placed longest first (ties in index order), each into the open row whose
/// remaining space is the smallest that still fits it (best fit), opening a new row when none
/// fits. An item longer than `pack_len` gets a row of its own.
pub fn best_fit_decreasing(lengths: &[u32], pack_len: u32, max_items: usize) -> Vec<Vec<u32>> {
    let mut order: Vec<u32> = (0..lengths.len() as u32).collect();
    // Stable sort: equal lengths keep source order, so packing is deterministic.
    order.sort_by(|&a, &b| lengths[b as usize].cmp(&lengths[a as usize]));
    let mut rows: Vec<Vec<u32>> = Vec::new();
    // remaining space -> rows with exactly that much space left
    let mut free: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for i in order {
        let len = lengths[i as usize];
        let slot = free.range(len..).next().map(|(&space, _)| space);
        let row = match slot {
            Some(space) => {
                let bucket = free.get_mut(&space).unwrap();
                let r = bucket.pop().unwrap();
                if bucket.is_empty() {
                    free.remove(&space);
                }
                let left = space - len;
                if left > 0 {
                    free.entry(left).or_default().push(r);
                }
                r
            }
            None => {
                rows.push(Vec::new());
                let r = rows.len() - 1;
                let left = pack_len.saturating_sub(len);
                if left > 0 {
                    free.entry(left).or_default().push(r);
                }
                r
            }
        };
        rows[row].push(i);
        if max_items > 0 && rows[row].len() >= max_items {
            // full by count: no longer open, whatever space it has left
            let left = pack_len.saturating_sub(rows[row].iter().map(|&j| lengths[j as usize]).sum::<u32>());
            if let Some(bucket) = free.get_mut(&left) {
                bucket.retain(|&r| r != row);
                if bucket.is_empty() {
                    free.remove(&left);
                }
            }
        }
    }
    for row in rows.iter_mut() {
        row.sort_unstable();
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hand_case() {
        // 6 and 4 fill a row of 10; 5 and 3 share the next (best fit puts 3 beside 5, not 2).
        let rows = best_fit_decreasing(&[5, 6, 3, 4, 2], 10, 0);
        assert_eq!(rows, vec![vec![1, 3], vec![0, 2, 4]]);
        // at most two items a row: 2 opens a third row
        let rows = best_fit_decreasing(&[5, 6, 3, 4, 2], 10, 2);
        assert_eq!(rows, vec![vec![1, 3], vec![0, 2], vec![4]]);
        // an item longer than the budget gets its own row
        assert_eq!(best_fit_decreasing(&[30, 2], 10, 0), vec![vec![0], vec![1]]);
    }

    proptest! {
        #[test]
        fn invariants(lengths in prop::collection::vec(1u32..=64, 0..300), pack_len in 64u32..200, max_items in 0usize..6) {
            let rows = best_fit_decreasing(&lengths, pack_len, max_items);
            let mut seen = vec![0u32; lengths.len()];
            for row in &rows {
                prop_assert!(!row.is_empty());
                let total: u32 = row.iter().map(|&i| lengths[i as usize]).sum();
                prop_assert!(total <= pack_len);
                prop_assert!(max_items == 0 || row.len() <= max_items);
                prop_assert!(row.windows(2).all(|w| w[0] < w[1]));
                for &i in row { seen[i as usize] += 1; }
            }
            // every item placed exactly once: nothing lost, nothing duplicated
            prop_assert!(seen.iter().all(|&c| c == 1));
            // best fit never needs more rows than twice the lower bound
            let sum: u64 = lengths.iter().map(|&l| l as u64).sum();
            let mut lower = sum.div_ceil(pack_len as u64);
            if max_items > 0 {
                lower = lower.max((lengths.len() as u64).div_ceil(max_items as u64));
            }
            prop_assert!((rows.len() as u64) <= 2 * lower + 1);
        }
    }
}
