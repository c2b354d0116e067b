//! Integration tests of WindowSampler / RankLoader: coverage, epochs, resume and DP changes.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use data_shards::{
    DataCursor, DataError, DatasetWriter, Dtype, ManifestMeta, RankLoader, Split, TokenDataset, WindowSampler,
};

const SEQ: usize = 16;

/// A dataset whose token at global position p is p, in several shards of varied documents.
fn counting_dataset(dir: &Path, total: u32) -> Arc<TokenDataset> {
    let mut w = DatasetWriter::new(dir, Dtype::U32, 700);
    let mut rng = common::Rng(7);
    let mut next = 0u32;
    while next < total {
        let len = (1 + rng.below(90) as u32).min(total - next);
        let doc: Vec<u32> = (next..next + len).collect();
        w.push_document(Split::Train, &doc).unwrap();
        next += len;
    }
    w.finish(ManifestMeta { tokenizer: None, vocab_size: total, eos_token: None, eos_id: None, valid_fraction: 0.0 })
        .unwrap();
    Arc::new(TokenDataset::open(dir, Split::Train).unwrap())
}

fn sampler(ds: &Arc<TokenDataset>, seed: u64) -> WindowSampler {
    WindowSampler::new(ds.clone(), SEQ, seed).unwrap()
}

/// Every window is seq_len+1 consecutive tokens of one shard starting at a multiple of seq_len.
fn window_starts(ds: &TokenDataset) -> HashSet<i64> {
    let mut starts = HashSet::new();
    let mut base = 0u64;
    for n in ds.shard_num_tokens() {
        let mut k = 0;
        while k + (SEQ as u64) < n {
            starts.insert((base + k) as i64);
            k += SEQ as u64;
        }
        base += n;
    }
    starts
}

/// The global stream read through `dp` rank loaders for `steps` global batches, in global order.
fn stream_with_dp(
    ds: &Arc<TokenDataset>,
    dp: usize,
    global_batch: usize,
    steps: usize,
    cursor: DataCursor,
) -> (Vec<Vec<i64>>, DataCursor) {
    let mut loaders: Vec<RankLoader> = (0..dp).map(|r| RankLoader::new(sampler(ds, 99), r, dp, cursor)).collect();
    let mut windows = Vec::new();
    for _ in 0..steps {
        for l in loaders.iter_mut() {
            let flat = l.next_batch(global_batch);
            assert_eq!(flat.len(), global_batch / dp * (SEQ + 1));
            windows.extend(flat.chunks(SEQ + 1).map(|c| c.to_vec()));
        }
    }
    let c = loaders[0].cursor();
    assert!(loaders.iter().all(|l| l.cursor() == c), "ranks agree on the cursor");
    (windows, c)
}

#[test]
fn each_epoch_covers_every_window_exactly_once_for_any_world_size() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = counting_dataset(tmp.path(), 5000);
    assert!(ds.num_shards() > 3);
    let expected = window_starts(&ds);
    let n = sampler(&ds, 99).num_windows() as usize;
    assert_eq!(n, expected.len());
    let mut reference: Option<Vec<Vec<i64>>> = None;
    for dp in [1usize, 2, 3, 4, 8] {
        let gb = dp * 3;
        let steps = (2 * n).div_ceil(gb);
        let (windows, cursor) = stream_with_dp(&ds, dp, gb, steps, DataCursor::default());
        assert_eq!(cursor.consumed, (steps * gb) as u64);
        for w in &windows {
            for (i, &t) in w.iter().enumerate() {
                assert_eq!(t, w[0] + i as i64, "window tokens are contiguous");
            }
        }
        for epoch in 0..2 {
            let firsts: Vec<i64> = windows[epoch * n..(epoch + 1) * n].iter().map(|w| w[0]).collect();
            let set: HashSet<i64> = firsts.iter().copied().collect();
            assert_eq!(set.len(), n, "dp={dp} epoch {epoch}: a window repeated");
            assert_eq!(set, expected, "dp={dp} epoch {epoch}: windows missing");
        }
        // The global stream does not depend on the DP size.
        let prefix: Vec<Vec<i64>> = windows[..2 * n].to_vec();
        match &reference {
            None => reference = Some(prefix),
            Some(r) => assert_eq!(r, &prefix, "dp={dp} changes the global order"),
        }
    }
}

#[test]
fn permutation_changes_each_epoch_and_with_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = counting_dataset(tmp.path(), 5000);
    let s = sampler(&ds, 99);
    let n = s.num_windows();
    let order = |s: &WindowSampler, epoch: u64| -> Vec<u64> { (0..n).map(|i| s.window_id(epoch * n + i)).collect() };
    let e0 = order(&s, 0);
    let e1 = order(&s, 1);
    let e2 = order(&s, 2);
    assert_ne!(e0, e1);
    assert_ne!(e1, e2);
    assert_ne!(e0, (0..n).collect::<Vec<_>>(), "not shuffled");
    assert_ne!(e0, order(&sampler(&ds, 100), 0), "seed has no effect");
    assert_eq!(e0, order(&sampler(&ds, 99), 0), "not deterministic");
    let mut window = vec![0i64; SEQ + 1];
    s.window_into(n + 5, &mut window);
    let (shard, start) = s.window_location(e1[5]);
    let mut direct = vec![0i64; SEQ + 1];
    ds.read_shard_tokens(shard, start, &mut direct);
    assert_eq!(window, direct);
}

#[test]
fn resume_from_cursor_equals_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = counting_dataset(tmp.path(), 3000);
    let (full, end) = stream_with_dp(&ds, 2, 8, 30, DataCursor::default());
    let (first, cursor) = stream_with_dp(&ds, 2, 8, 11, DataCursor::default());
    // The cursor survives a checkpoint round trip.
    let saved = serde_json::to_string(&cursor).unwrap();
    let restored: DataCursor = serde_json::from_str(&saved).unwrap();
    assert_eq!(restored, DataCursor { consumed: 88 });
    let (rest, end2) = stream_with_dp(&ds, 2, 8, 19, restored);
    assert_eq!([first, rest].concat(), full);
    assert_eq!(end, end2);
}

#[test]
fn cursor_from_dp4_resumes_under_dp2_and_dp3_without_repeats_or_gaps() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = counting_dataset(tmp.path(), 3000);
    let gb = 12;
    let (reference, _) = stream_with_dp(&ds, 1, gb, 25, DataCursor::default());
    let (head, cursor) = stream_with_dp(&ds, 4, gb, 7, DataCursor::default());
    assert_eq!(cursor.consumed, 84);
    for dp in [2usize, 3] {
        let (tail, _) = stream_with_dp(&ds, dp, gb, 18, cursor);
        assert_eq!([head.clone(), tail].concat(), reference, "dp 4 -> {dp}");
    }
    // And this rank's slice is where the documentation says it is.
    let l = RankLoader::new(sampler(&ds, 99), 1, 3, cursor);
    assert_eq!(l.next_indices(gb), 88..92);
}

#[test]
#[should_panic(expected = "must be a positive multiple of dp_size 4")]
fn global_batch_must_divide_by_dp() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = counting_dataset(tmp.path(), 1000);
    let mut l = RankLoader::new(sampler(&ds, 1), 0, 4, DataCursor::default());
    l.next_batch(6);
}

#[test]
fn seq_len_longer_than_data_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = counting_dataset(tmp.path(), 1000);
    let err = WindowSampler::new(ds.clone(), 5000, 0).unwrap_err();
    assert!(matches!(err, DataError::SeqLenTooLong { .. }));
    let msg = err.to_string();
    assert!(msg.starts_with("seq_len 5000 is longer than the data (1000 tokens in "), "{msg}");
    assert!(msg.contains(&tmp.path().display().to_string()), "{msg}");
    // A window needs seq_len + 1 tokens inside one shard: the largest shard decides.
    let largest = *ds.shard_num_tokens().iter().max().unwrap() as usize;
    assert!(WindowSampler::new(ds.clone(), largest - 1, 0).is_ok());
    assert!(WindowSampler::new(ds.clone(), largest, 0).is_err());
}
