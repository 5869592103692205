//! The login phase's read limits ([`Gate`]): before `hello` every frame is
//! held to the control cap, checked on the frame's header (with
//! tungstenite's parser) before its payload is buffered, and all of them
//! together to a byte budget.
//!
//! It must not decode messages or answer the peer: it only lets bytes
//! through or refuses them, and [`Gate::open`] ends its work.

use std::io::{self, Cursor};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;

/// Largest WebSocket frame header: 2 bytes, 8 of length, 4 of mask.
pub const MAX_HEADER: usize = 14;

/// A frame over its cap, or more bytes before `hello` than the budget.
#[derive(Debug)]
pub struct OverCap(String);

impl std::fmt::Display for OverCap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for OverCap {}

/// Reads a connection's bytes under the pre-authentication limits.
///
/// tungstenite's own caps are set once per connection, for the payload cap;
/// this holds each frame of the login phase to the control cap by reading
/// its header (with tungstenite's parser) as the bytes arrive, so a frame
/// over it is refused before its payload is buffered. [`Gate::open`] ends
/// the login phase.
pub struct Gate<S> {
    inner: S,
    open: bool,
    frame_cap: u64,
    budget: usize,
    header: [u8; MAX_HEADER],
    have: usize,
    skip: u64,
}

impl<S> Gate<S> {
    pub fn new(inner: S, frame_cap: usize, budget: usize) -> Gate<S> {
        Gate {
            inner,
            open: false,
            frame_cap: frame_cap as u64,
            budget,
            header: [0; MAX_HEADER],
            have: 0,
            skip: 0,
        }
    }

    /// Authenticated: let every byte through.
    pub fn open(&mut self) {
        self.open = true;
    }

    fn inspect(&mut self, mut data: &[u8]) -> Result<(), OverCap> {
        if data.len() > self.budget {
            return Err(OverCap(
                "more bytes before authentication than the login allows".to_string(),
            ));
        }
        self.budget -= data.len();
        while !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len() as u64) as usize;
                self.skip -= n as u64;
                data = &data[n..];
                continue;
            }
            let before = self.have;
            let take = (MAX_HEADER - before).min(data.len());
            self.header[before..before + take].copy_from_slice(&data[..take]);
            self.have += take;
            let mut cur = Cursor::new(&self.header[..self.have]);
            match FrameHeader::parse(&mut cur) {
                Ok(Some((_, len))) => {
                    if len > self.frame_cap {
                        return Err(OverCap(format!(
                            "a {len} byte frame before authentication, over the {} byte control cap",
                            self.frame_cap
                        )));
                    }
                    data = &data[cur.position() as usize - before..];
                    self.have = 0;
                    self.skip = len;
                }
                Ok(None) => data = &data[take..],
                // Not a frame header: tungstenite refuses the same bytes.
                Err(_) => {
                    self.open = true;
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Gate<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let start = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if !this.open {
            if let Err(e) = this.inspect(&buf.filled()[start..]) {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Gate<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(len: u64) -> Vec<u8> {
        let mut v = Vec::new();
        let h = FrameHeader {
            mask: Some([1, 2, 3, 4]),
            ..FrameHeader::default()
        };
        h.format(len, &mut v).unwrap();
        v
    }

    #[test]
    fn the_gate_refuses_a_frame_over_the_cap_on_its_header() {
        let mut g = Gate::new((), 100, usize::MAX);
        let mut ok = header(100);
        ok.extend(std::iter::repeat_n(b'x', 100));
        // Split anywhere, including inside the header.
        for cut in 0..ok.len() {
            let mut g2 = Gate::new((), 100, usize::MAX);
            g2.inspect(&ok[..cut]).unwrap();
            g2.inspect(&ok[cut..]).unwrap();
            assert_eq!((g2.have, g2.skip), (0, 0));
        }
        g.inspect(&ok).unwrap();
        let big = header(4 * 1024 * 1024 - 1);
        let e = g.inspect(&big[..3]).and_then(|_| g.inspect(&big[3..])).unwrap_err();
        assert!(e.to_string().contains("over the 100 byte control cap"), "{e}");
    }

    #[test]
    fn the_gate_holds_the_login_to_its_byte_budget_and_opens_after_it() {
        let mut g = Gate::new((), 100, 250);
        let mut f = header(90);
        f.extend(std::iter::repeat_n(b'x', 90));
        g.inspect(&f).unwrap();
        g.inspect(&f).unwrap();
        assert!(g.inspect(&f).is_err(), "a third frame is over the budget");
        let mut g = Gate::new((), 100, 250);
        g.open();
        assert!(g.open);
    }
}
