//! A small, byte-bounded pool of piece-sized buffers.
//!
//! Pieces are 256 KiB to 64 MiB: above glibc's mmap threshold (the agent
//! sets it to 256 KiB to keep them out of the heap), so every fresh buffer
//! was an mmap, a page fault per 4 KiB page while it fills (the kernel
//! zeroes each page) and a munmap when dropped. Profiles showed that work
//! per byte received or sent. Buffers handed out here come back when the
//! last [`Bytes`] referring to them drops, and are reused for the next
//! piece, so steady-state transfers allocate nothing.
//!
//! Memory: the pool keeps at most [`POOL_MAX_BYTES`] of *idle* buffers;
//! buffers in use are bounded by their users (download permits, upload
//! slots), exactly as without the pool. A buffer returning to a full pool
//! is freed.

use std::sync::{Mutex, OnceLock, PoisonError};

use bytes::Bytes;

/// Idle bytes the pool may keep for reuse.
pub const POOL_MAX_BYTES: usize = 16 << 20;

/// Buffers smaller than this come from the heap as usual (cheap there, and
/// not worth keeping).
pub const POOL_MIN_LEN: usize = 128 << 10;

/// Alignment of pooled buffers: what `O_DIRECT` writes need (the store
/// writes whole, aligned pieces straight from them).
pub const ALIGN: usize = 4096;

/// A pool of reusable buffers. [`global`] is the one the agent uses.
#[derive(Debug)]
pub struct BufPool {
    max_bytes: usize,
    free: Mutex<Free>,
}

#[derive(Debug, Default)]
struct Free {
    bufs: Vec<Vec<u8>>,
    bytes: usize,
}

/// A buffer of `len` bytes starting at an [`ALIGN`]ed address, for one
/// piece. Its memory is initialised (zeroed when first allocated, then
/// whatever the previous piece left): callers overwrite all of it.
#[derive(Debug)]
pub struct PoolBuf {
    /// Fully initialised (`len() == capacity()`), `ALIGN` bytes longer than
    /// needed so an aligned window of `len` bytes fits.
    vec: Vec<u8>,
    off: usize,
    len: usize,
}

impl PoolBuf {
    fn new(vec: Vec<u8>, len: usize) -> PoolBuf {
        let off = vec.as_ptr().align_offset(ALIGN);
        debug_assert!(off + len <= vec.len());
        PoolBuf { vec, off, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.vec[self.off..self.off + self.len]
    }
}

impl AsRef<[u8]> for PoolBuf {
    fn as_ref(&self) -> &[u8] {
        &self.vec[self.off..self.off + self.len]
    }
}

/// A buffer lent by a pool: goes back to it on drop. Owner of the memory
/// behind the [`Bytes`] made by [`BufPool::freeze`].
struct Lent {
    buf: PoolBuf,
    pool: &'static BufPool,
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        self.buf.as_ref()
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        self.pool.put(std::mem::take(&mut self.buf.vec));
    }
}

/// The process-wide pool.
pub fn global() -> &'static BufPool {
    static POOL: OnceLock<BufPool> = OnceLock::new();
    POOL.get_or_init(|| BufPool::new(POOL_MAX_BYTES))
}

impl BufPool {
    /// A pool keeping at most `max_bytes` of idle buffers.
    pub const fn new(max_bytes: usize) -> BufPool {
        BufPool {
            max_bytes,
            free: Mutex::new(Free {
                bufs: Vec::new(),
                bytes: 0,
            }),
        }
    }

    /// An aligned buffer of `len` bytes: a pooled one that fits, or a fresh
    /// zeroed one.
    pub fn take(&self, len: usize) -> PoolBuf {
        let need = len + ALIGN;
        if len >= POOL_MIN_LEN {
            let mut free = self.lock();
            // Prefer the smallest buffer that fits, so one large piece size
            // does not pin large buffers for small pieces.
            let best = free
                .bufs
                .iter()
                .enumerate()
                .filter(|(_, b)| b.len() >= need)
                .min_by_key(|(_, b)| b.len())
                .map(|(i, _)| i);
            if let Some(i) = best {
                let v = free.bufs.swap_remove(i);
                free.bytes -= v.len();
                return PoolBuf::new(v, len);
            }
        }
        PoolBuf::new(vec![0u8; need], len)
    }

    /// Freezes `buf` into [`Bytes`] whose memory returns to this pool when
    /// the last clone drops.
    pub fn freeze(&'static self, buf: PoolBuf) -> Bytes {
        if buf.vec.len() < POOL_MIN_LEN {
            return Bytes::copy_from_slice(buf.as_ref());
        }
        Bytes::from_owner(Lent { buf, pool: self })
    }

    fn put(&self, buf: Vec<u8>) {
        let size = buf.len();
        if size < POOL_MIN_LEN {
            return;
        }
        let mut free = self.lock();
        if free.bytes + size <= self.max_bytes {
            free.bytes += size;
            free.bufs.push(buf);
        }
    }

    /// Idle bytes kept now.
    pub fn idle_bytes(&self) -> usize {
        self.lock().bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Free> {
        // Push/pop only: the list is consistent at every step.
        self.free.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leak(max: usize) -> &'static BufPool {
        Box::leak(Box::new(BufPool::new(max)))
    }

    const SIZE: usize = POOL_MIN_LEN + ALIGN;

    #[test]
    fn buffers_are_aligned_come_back_and_are_reused() {
        let pool = leak(4 * SIZE);
        let mut v = pool.take(POOL_MIN_LEN);
        assert_eq!(v.len(), POOL_MIN_LEN);
        assert_eq!(v.as_ref().as_ptr() as usize % ALIGN, 0);
        let ptr = v.as_ref().as_ptr();
        v.as_mut_slice().fill(7);
        let b = pool.freeze(v);
        assert_eq!(b.as_ptr(), ptr, "no copy");
        let clone = b.slice(10..20);
        drop(b);
        assert_eq!(pool.idle_bytes(), 0, "a slice still holds the buffer");
        assert_eq!(&clone[..], &[7u8; 10]);
        drop(clone);
        assert_eq!(pool.idle_bytes(), SIZE);
        let again = pool.take(POOL_MIN_LEN);
        assert_eq!(again.as_ref().as_ptr(), ptr, "the same memory again");
        assert_eq!(pool.idle_bytes(), 0);
    }

    #[test]
    fn idle_bytes_stay_bounded_and_small_buffers_bypass() {
        let pool = leak(2 * SIZE);
        let held: Vec<Bytes> = (0..5)
            .map(|_| pool.freeze(pool.take(POOL_MIN_LEN)))
            .collect();
        drop(held);
        assert_eq!(pool.idle_bytes(), 2 * SIZE);
        let small = pool.freeze(pool.take(100));
        assert_eq!(small.len(), 100);
        drop(small);
        assert_eq!(pool.idle_bytes(), 2 * SIZE);
        // A larger request than any idle buffer allocates afresh.
        let big = pool.take(4 * POOL_MIN_LEN);
        assert_eq!(big.len(), 4 * POOL_MIN_LEN);
        assert_eq!(pool.idle_bytes(), 2 * SIZE);
    }
}
