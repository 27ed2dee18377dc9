//! Spool unit tests: order, spilling, streaming, budgets, failures.

use super::*;
use crate::config::SpoolConfig;

fn budget(dir: &std::path::Path, per_response: usize, memory: usize, disk: u64) -> Arc<SpoolBudget> {
    SpoolBudget::new(SpoolConfig {
        dir: dir.to_owned(),
        memory_per_response: per_response,
        memory_budget: memory,
        disk_budget: disk,
    })
}

fn chunk(i: usize, len: usize) -> Bytes {
    Bytes::from(vec![(i % 251) as u8; len])
}

/// Push `count` chunks while taking them out; returns what came out.
async fn run(spool: &Spool, count: usize, len: usize) -> Vec<Bytes> {
    let reader = async {
        for i in 0..count {
            spool.push(chunk(i, len)).await.expect("writer present");
        }
        spool.finish(Ok(()));
    };
    let writer = async {
        let mut out = Vec::new();
        loop {
            match spool.next().await {
                Next::Data(b) => out.push(b),
                Next::End(r) => {
                    r.expect("complete");
                    return out;
                }
            }
        }
    };
    tokio::join!(reader, writer).1
}

fn joined(parts: &[Bytes]) -> Vec<u8> {
    parts.iter().flat_map(|b| b.iter().copied()).collect()
}

fn expected(count: usize, len: usize) -> Vec<u8> {
    (0..count).flat_map(|i| chunk(i, len).to_vec()).collect()
}

#[tokio::test]
async fn memory_only_keeps_order_and_releases_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let b = budget(dir.path(), 1 << 20, 1 << 20, 0);
    let spool = Spool::new(b.clone());
    let out = run(&spool, 50, 1000).await;
    assert_eq!(joined(&out), expected(50, 1000));
    assert_eq!(b.usage().memory_used, 0);
    assert_eq!(b.usage().responses_spilled, 0);
}

#[tokio::test]
async fn beyond_the_per_response_limit_data_spills_to_a_file_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let b = budget(dir.path(), 3000, 1 << 20, 1 << 20);
    let spool = Spool::new(b.clone());
    // Fill first (no reader of the other end yet), as with a stalled client.
    for i in 0..20 {
        spool.push(chunk(i, 1000)).await.unwrap();
    }
    spool.finish(Ok(()));
    let usage = b.usage();
    assert_eq!(usage.memory_used, 3000, "three chunks in memory");
    assert_eq!(usage.disk_used, 17_000, "the rest on disk");
    assert_eq!(usage.responses_spilled, 1);
    let mut out = Vec::new();
    loop {
        match spool.next().await {
            Next::Data(d) => out.push(d),
            Next::End(r) => break r.unwrap(),
        }
    }
    assert_eq!(joined(&out), expected(20, 1000));
    let usage = b.usage();
    assert_eq!((usage.memory_used, usage.disk_used), (0, 0), "all given back");
}

#[tokio::test]
async fn with_no_budget_it_streams_one_chunk_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let b = budget(dir.path(), 0, 0, 0);
    let spool = Spool::new(b.clone());
    spool.push(chunk(0, 100)).await.unwrap();
    // The window is full: the next push waits until the writer takes data.
    let second = spool.push(chunk(1, 100));
    tokio::pin!(second);
    assert!(futures_poll_once(second.as_mut()).await.is_none(), "second push must wait");
    spool.wait_complete_or_full().await;
    match spool.next().await {
        Next::Data(d) => assert_eq!(d, chunk(0, 100)),
        Next::End(_) => panic!("data expected"),
    }
    second.await.unwrap();
    let out = run(&spool, 0, 0).await;
    assert_eq!(joined(&out), chunk(1, 100).to_vec());
    assert_eq!(b.usage().responses_streamed, 1);
    let spool = Spool::new(b.clone());
    let out = run(&spool, 300, 4096).await;
    assert_eq!(joined(&out), expected(300, 4096));
}

/// Poll a future once; `Some` if it completed.
async fn futures_poll_once<F: std::future::Future + Unpin>(f: F) -> Option<F::Output> {
    let mut f = f;
    std::future::poll_fn(|cx| match std::pin::Pin::new(&mut f).poll(cx) {
        std::task::Poll::Ready(v) => std::task::Poll::Ready(Some(v)),
        std::task::Poll::Pending => std::task::Poll::Ready(None),
    })
    .await
}

#[tokio::test]
async fn the_global_memory_budget_is_shared_and_never_exceeded() {
    let dir = tempfile::tempdir().unwrap();
    let b = budget(dir.path(), 10_000, 15_000, 0);
    let a = Spool::new(b.clone());
    let c = Spool::new(b.clone());
    for i in 0..10 {
        a.push(chunk(i, 1000)).await.unwrap();
    }
    assert_eq!(b.usage().memory_used, 10_000);
    for i in 0..5 {
        c.push(chunk(i, 1000)).await.unwrap();
    }
    assert_eq!(b.usage().memory_used, 15_000);
    // c is at the budget: the next push waits for room.
    let more = c.push(chunk(5, 1000));
    tokio::pin!(more);
    assert!(futures_poll_once(more.as_mut()).await.is_none());
    drop(a);
    assert_eq!(b.usage().memory_used, 5_000, "a's share given back when it is dropped");
}

#[tokio::test]
async fn a_departed_writer_stops_the_reader_and_frees_everything() {
    let dir = tempfile::tempdir().unwrap();
    let b = budget(dir.path(), 1000, 1 << 20, 1 << 20);
    let spool = Spool::new(b.clone());
    for i in 0..5 {
        spool.push(chunk(i, 1000)).await.unwrap();
    }
    assert!(b.usage().disk_used > 0);
    spool.close();
    assert!(matches!(spool.push(chunk(9, 10)).await, Err(WriterGone)));
    assert_eq!((b.usage().memory_used, b.usage().disk_used), (0, 0));
}

#[tokio::test]
async fn an_unusable_spool_dir_falls_back_to_streaming() {
    let dir = tempfile::tempdir().unwrap();
    let b = budget(&dir.path().join("missing"), 1000, 1 << 20, 1 << 20);
    let spool = Spool::new(b.clone());
    let out = run(&spool, 100, 1000).await;
    assert_eq!(joined(&out), expected(100, 1000));
    assert_eq!(b.usage().disk_used, 0);
}

#[tokio::test]
async fn the_end_comes_after_the_data_and_carries_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::new(budget(dir.path(), 1 << 20, 1 << 20, 0));
    spool.push(chunk(0, 10)).await.unwrap();
    spool.finish(Err(QueryError::Spool("test".into())));
    assert!(matches!(spool.next().await, Next::Data(_)));
    assert!(matches!(spool.next().await, Next::End(Err(QueryError::Spool(_)))));
}

#[tokio::test]
async fn a_push_cancelled_while_its_file_is_created_gives_the_disk_budget_back() {
    let dir = tempfile::tempdir().unwrap();
    let b = budget(dir.path(), 1000, 1 << 20, 1 << 20);
    let spool = Spool::new(b.clone());
    spool.push(chunk(0, 1000)).await.unwrap();
    {
        // The next chunk goes to a new file; the push is dropped (as by the
        // relay's deadline) while the file is being created.
        let push = spool.push(chunk(1, 1000));
        tokio::pin!(push);
        assert!(futures_poll_once(push.as_mut()).await.is_none(), "waiting for the file");
    }
    spool.close();
    drop(spool);
    assert_eq!(b.usage().disk_used, 0, "no disk budget left behind");
}

#[tokio::test]
async fn the_disk_budget_counts_what_is_waiting_not_what_was_sent() {
    let dir = tempfile::tempdir().unwrap();
    let b = budget(dir.path(), 10_000, 1 << 20, 1 << 30);
    let spool = Spool::new(b.clone());
    // The site stays ~20 chunks ahead of the client for 2,000 chunks.
    let mut peak = 0;
    let mut taken = 0;
    for i in 0..2000 {
        spool.push(chunk(i, 1000)).await.unwrap();
        if i >= 20 {
            match spool.next().await {
                Next::Data(d) => taken += d.len(),
                other => panic!("expected data, got {other:?}"),
            }
        }
        peak = peak.max(b.usage().disk_used);
    }
    assert_eq!(taken, 1980 * 1000);
    assert!(peak < 300_000, "disk budget in use peaked at {peak} bytes for a backlog of ~20,000");
}

#[tokio::test]
async fn what_the_client_has_read_is_given_back_during_the_drain_disk_blocks_included() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let b = budget(dir.path(), 0, 0, 1 << 30);
    let spool = Spool::new(b.clone());
    // Block-sized chunks, so every range read frees whole blocks.
    for i in 0..64 {
        spool.push(chunk(i, 4096)).await.unwrap();
    }
    spool.finish(Ok(()));
    let on_disk = b.usage().disk_used;
    assert!(on_disk >= 63 * 4096, "spilled: {on_disk}");
    let file = spool.lock().file.clone().expect("a spool file");
    let allocated = |f: &File| f.metadata().map(|m| m.blocks() * 512).unwrap_or(0);
    assert!(allocated(&file) >= on_disk, "the file holds what it is counted for");
    let mut read = 0u64;
    while read < 32 * 4096 {
        match spool.next().await {
            Next::Data(d) => read += d.len() as u64,
            other => panic!("expected data, got {other:?}"),
        }
    }
    // Half read: half given back, to the budget and to the file system.
    let left = b.usage().disk_used;
    assert_eq!(left, 64 * 4096 - read, "the budget counts only what is still waiting (the first chunk was in memory)");
    assert!(allocated(&file) <= left + 4096, "read ranges are punched out of the file: {} allocated", allocated(&file));
    while let Next::Data(_) = spool.next().await {}
    assert_eq!(b.usage().disk_used, 0);
}
