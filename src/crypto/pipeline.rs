//! A bounded, ordered pipeline for chunked AEAD work: the calling thread
//! reads batches, worker threads seal or open them, and one writer thread
//! emits them in order. Reading, crypto and writing overlap, and AES-GCM
//! spreads over the cores, while memory stays at a fixed number of
//! batch buffers whatever the input size.

use std::collections::BTreeMap;
use std::panic::resume_unwind;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};

/// One batch of consecutive chunks in a reusable buffer.
pub(crate) struct Batch {
    /// Position in the stream (batches are written in this order).
    pub seq: u64,
    /// Counter of the first chunk in the batch.
    pub first: u64,
    /// Bytes in use in each chunk slot.
    pub lens: Vec<usize>,
    /// Does the batch end with the final chunk?
    pub last: bool,
    pub buf: Vec<u8>,
}

/// Threads doing crypto: chunks are independent (each has its own nonce).
pub(crate) fn workers() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()).min(4))
}

/// Batch buffers in flight: enough slack that one descheduled thread on a
/// busy machine does not stall the others (about 6 MiB with 512 KiB batches).
pub(crate) fn buffers() -> usize {
    2 * workers() + 8
}

/// Run `produce` (this thread) -> `work` (workers) -> `consume` (writer, in
/// order) until `produce` marks a batch `last` or anything fails. The first
/// error in stream order wins: a failed batch stops everything after it.
pub(crate) fn run<E, P, F, C>(buffers: usize, buf_len: usize, mut produce: P, work: F, consume: C) -> Result<(), E>
where
    E: Send,
    P: FnMut(&mut Batch) -> Result<(), E>,
    F: Fn(&mut Batch) -> Result<(), E> + Sync,
    C: FnMut(&Batch) -> Result<(), E> + Send,
{
    let (free_tx, free_rx) = mpsc::channel::<Batch>();
    for _ in 0..buffers.max(1) {
        // The receiver is alive in this scope, so sending cannot fail.
        let _ = free_tx.send(Batch {
            seq: 0,
            first: 0,
            lens: Vec::new(),
            last: false,
            buf: vec![0; buf_len],
        });
    }
    let (work_tx, work_rx) = mpsc::channel::<Batch>();
    let work_rx = Mutex::new(work_rx);
    let (done_tx, done_rx) = mpsc::channel::<(Batch, Result<(), E>)>();
    let abort = AtomicBool::new(false);
    let (work, work_rx, abort) = (&work, &work_rx, &abort);

    std::thread::scope(|s| {
        for _ in 0..workers() {
            let done_tx = done_tx.clone();
            s.spawn(move || loop {
                // The lock is only held across `recv`, which does not panic.
                let next = work_rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                let Ok(mut b) = next else { break };
                let r = if abort.load(Ordering::Relaxed) {
                    Ok(())
                } else {
                    work(&mut b)
                };
                if done_tx.send((b, r)).is_err() {
                    break;
                }
            });
        }
        drop(done_tx);

        let mut consume = consume;
        let writer = s.spawn(move || {
            let mut pending = BTreeMap::new();
            let mut next = 0u64;
            let mut result = Ok(());
            for (b, r) in done_rx {
                pending.insert(b.seq, (b, r));
                while let Some((b, r)) = pending.remove(&next) {
                    if result.is_ok() {
                        result = r.and_then(|_| consume(&b));
                        if result.is_err() {
                            abort.store(true, Ordering::Relaxed);
                        }
                    }
                    next += 1;
                    let _ = free_tx.send(b);
                }
            }
            result
        });

        let mut produced = Ok(());
        let mut seq = 0;
        while !abort.load(Ordering::Relaxed) {
            let Ok(mut b) = free_rx.recv() else { break };
            b.seq = seq;
            if let Err(e) = produce(&mut b) {
                produced = Err(e);
                break;
            }
            let last = b.last;
            if work_tx.send(b).is_err() || last {
                break;
            }
            seq += 1;
        }
        drop(work_tx);
        let written = writer.join().unwrap_or_else(|e| resume_unwind(e));
        // Everything the writer saw precedes the batch `produce` failed on.
        written.and(produced)
    })
}
