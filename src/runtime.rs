//! The one place an async runtime is built.
//!
//! Commands are synchronous at the edge and run their async work on a
//! runtime from here: one job, one client or one MCP session needs only the
//! current thread, which starts fast (start-up time matters to cron checks);
//! the coordinator asks for worker threads. Signal handling does not live
//! here: `main`'s edge turns signals into shutdown futures.

use std::io;

use tokio::runtime::{Builder, Runtime};

/// A current-thread runtime with I/O and timers.
pub fn current_thread() -> io::Result<Runtime> {
    Builder::new_current_thread().enable_all().build()
}

/// A runtime with `workers` threads, for the coordinator.
pub fn workers(workers: usize) -> io::Result<Runtime> {
    Builder::new_multi_thread().worker_threads(workers).enable_all().build()
}

/// Completes on the first SIGINT (Ctrl-C) or SIGTERM. Register it before
/// the work starts: from then on these signals no longer kill the process
/// at once, so the work can shut down in order. Call within a runtime.
pub fn shutdown_signal() -> io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}
