//! Bytes kept aside in an unlinked temporary file: memory stays constant
//! however big the workspace, and nothing is left behind when we exit.
//! It knows nothing of what the bytes are.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;

/// Where a piece of content lies in a [`Spool`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slice {
    pub offset: u64,
    pub len: u64,
}

/// An append-only unlinked temporary file.
#[derive(Debug)]
pub(crate) struct Spool {
    file: File,
    len: u64,
}

impl Spool {
    pub fn new() -> io::Result<Spool> {
        Ok(Spool {
            file: tempfile::tempfile()?,
            len: 0,
        })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    /// Append bytes.
    pub fn write(&mut self, buf: &[u8]) -> io::Result<()> {
        self.file.write_all_at(buf, self.len)?;
        self.len += buf.len() as u64;
        Ok(())
    }

    /// Forget everything from `offset` on (content we turned out not to need).
    pub fn truncate(&mut self, offset: u64) -> io::Result<()> {
        if offset < self.len {
            self.file.set_len(offset)?;
            self.len = offset;
        }
        Ok(())
    }

    /// A reader over `slice`.
    pub fn reader(&self, slice: Slice) -> SliceReader<'_> {
        SliceReader {
            file: &self.file,
            pos: slice.offset,
            end: slice.offset + slice.len,
        }
    }

    /// The bytes of `slice`, in memory (for one file at a time).
    pub fn read(&self, slice: Slice) -> io::Result<Vec<u8>> {
        let mut v = Vec::with_capacity(usize::try_from(slice.len).unwrap_or(0));
        self.reader(slice).read_to_end(&mut v)?;
        Ok(v)
    }
}

/// Reads one [`Slice`] of a spool (positioned reads: no shared cursor).
pub(crate) struct SliceReader<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for SliceReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end - self.pos;
        if left == 0 {
            return Ok(0);
        }
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "workspace spool is shorter than recorded",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_read_back_and_truncation_forgets() {
        let mut s = Spool::new().unwrap();
        s.write(b"hello ").unwrap();
        let at = s.len();
        s.write(b"world").unwrap();
        let world = Slice { offset: at, len: 5 };
        assert_eq!(s.read(world).unwrap(), b"world");
        assert_eq!(s.read(Slice { offset: 0, len: 6 }).unwrap(), b"hello ");
        s.truncate(at).unwrap();
        assert_eq!(s.len(), 6);
        assert!(s.read(world).is_err(), "a truncated slice is gone");
    }
}
