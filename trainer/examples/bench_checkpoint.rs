//! Benchmark (not a test): checkpoint save/load throughput against a raw write/read of the same bytes, and the training stall of an async save against a plain in-memory copy and a synchronous save.
use anyhow::Result;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Instant;
use trainer::checkpoint::{load_optimizer, load_params, Checkpointer, Reader};
use trainer::comm::Comm;
use trainer::config::Config;
use trainer::train::build_engine;
use trainer::zero::DistOptimizer;

fn seconds<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    let start = Instant::now();
    let value = f()?;
    Ok((value, start.elapsed().as_secs_f64()))
}

fn main() -> Result<()> {
    let dir = std::env::args().nth(1).expect("usage: bench_checkpoint DIR [dim] [layers]");
    let dim: i64 = std::env::args().nth(2).map_or(Ok(512), |s| s.parse())?;
    let layers: i64 = std::env::args().nth(3).map_or(Ok(8), |s| s.parse())?;
    let root = std::path::PathBuf::from(dir);
    let overrides = [
        format!("model.dim={dim}"),
        format!("model.ffn_dim={}", dim * 8 / 3 / 64 * 64),
        format!("model.n_layers={layers}"),
        "model.vocab_size=32000".to_string(),
    ];
    let config = Config::parse(include_str!("../../configs/tiny.toml"), &overrides)?;
    let comm = Arc::new(Comm::single());
    let engine = build_engine(&config, comm.clone())?;
    let optimizer = DistOptimizer::new(comm.clone(), &engine.params, &config.optim, true);
    let cursor = data_shards::DataCursor::default();
    let mut sync = Checkpointer::new(root.join("sync"), 1, false, None);
    let report = sync.save(&comm, &engine.params, &optimizer, &config, 1, cursor)?.expect("a synchronous save commits");
    let bytes = report.bytes as usize;
    println!(
        "model: {} parameters; checkpoint {:.1} MB (weights + Adam moments)",
        config.model.num_params(),
        bytes as f64 / 1e6
    );

    // Raw sequential write (with fsync) and read of the same number of bytes, same disk.
    let buffer = vec![7u8; bytes];
    let raw = root.join("raw.bin");
    let ((), raw_write) = seconds(|| {
        let mut file = std::fs::File::create(&raw)?;
        file.write_all(&buffer)?;
        Ok(file.sync_all()?)
    })?;
    let (_, raw_read) = seconds(|| {
        let mut back = Vec::with_capacity(bytes);
        std::fs::File::open(&raw)?.read_to_end(&mut back)?;
        Ok(back)
    })?;
    let (_, save) = seconds(|| sync.save(&comm, &engine.params, &optimizer, &config, 2, cursor))?;
    let step_dir = root.join("sync/step-00000002");
    let (_, load) = seconds(|| {
        let mut reader = Reader::open(&step_dir)?;
        load_params(&mut reader, &engine.params)?;
        let mut fresh = DistOptimizer::new(comm.clone(), &engine.params, &config.optim, true);
        load_optimizer(&mut reader, &engine.params, &mut fresh)
    })?;
    let mb = bytes as f64 / 1e6;
    println!(
        "save (sync, fsync'd, committed): {:8.1} MB/s   raw write+fsync: {:8.1} MB/s   ratio {:.2} (target >= 0.8)",
        mb / save,
        mb / raw_write,
        raw_write / save
    );
    println!(
        "load (checksummed):              {:8.1} MB/s   raw read:        {:8.1} MB/s   ratio {:.2} (target >= 0.8)",
        mb / load,
        mb / raw_read,
        raw_read / load
    );

    // What training waits for: an async save returns after the copy to host memory.
    let (_, copy) = seconds(|| {
        let copies: Vec<_> = optimizer.state(&engine.params).iter().map(|(_, t)| t.copy()).collect();
        Ok((engine.params.values().copy(), copies))
    })?;
    let mut background = Checkpointer::new(root.join("async"), 1, true, None);
    let (_, stall) = seconds(|| background.save(&comm, &engine.params, &optimizer, &config, 3, cursor))?;
    background.finish(&comm)?;
    println!("training stall: async save {:.1} ms, in-memory copy of the same tensors {:.1} ms (ratio {:.2}, target <= 1.5), synchronous save {:.1} ms", stall * 1e3, copy * 1e3, stall / copy, save * 1e3);
    Ok(())
}
