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
