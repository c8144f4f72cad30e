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

/// A buffer lent by a pool: goes back to it on drop. Owner of the memory
/// behind the [`Bytes`] made by [`BufPool::freeze`].
struct Lent {
    buf: Vec<u8>,
    pool: &'static BufPool,
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        self.pool.put(std::mem::take(&mut self.buf));
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

    /// An empty buffer with capacity for at least `len` bytes (for reads
    /// into spare capacity).
    pub fn take_empty(&self, len: usize) -> Vec<u8> {
        let mut v = self.take(len);
        v.clear();
        v
    }

    /// A buffer of exactly `len` initialised bytes (contents unspecified:
    /// the caller overwrites them). Zeroes only what a reused buffer never
    /// held, so a reused buffer of the same size costs nothing.
    pub fn take_filled(&self, len: usize) -> Vec<u8> {
        let mut v = self.take(len);
        if v.len() >= len {
            v.truncate(len);
        } else {
            v.resize(len, 0);
        }
        v
    }

    /// A pooled buffer with capacity >= `len`, its length whatever it held
    /// before (<= capacity, initialised), or a fresh empty one.
    fn take(&self, len: usize) -> Vec<u8> {
        if len >= POOL_MIN_LEN {
            let mut free = self.lock();
            // Prefer the smallest buffer that fits, so one large piece size
            // does not pin large buffers for small pieces.
            let best = free
                .bufs
                .iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() >= len)
                .min_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i);
            if let Some(i) = best {
                let v = free.bufs.swap_remove(i);
                free.bytes -= v.capacity();
                return v;
            }
        }
        Vec::with_capacity(len)
    }

    /// Freezes `buf` into [`Bytes`] whose memory returns to this pool when
    /// the last clone drops.
    pub fn freeze(&'static self, buf: Vec<u8>) -> Bytes {
        if buf.capacity() < POOL_MIN_LEN {
            return Bytes::from(buf);
        }
        Bytes::from_owner(Lent { buf, pool: self })
    }

    fn put(&self, buf: Vec<u8>) {
        let cap = buf.capacity();
        if cap < POOL_MIN_LEN {
            return;
        }
        let mut free = self.lock();
        if free.bytes + cap <= self.max_bytes {
            free.bytes += cap;
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

    #[test]
    fn buffers_come_back_and_are_reused() {
        let pool = leak(4 * POOL_MIN_LEN);
        let mut v = pool.take_empty(POOL_MIN_LEN);
        let ptr = v.as_ptr();
        v.extend_from_slice(&vec![7u8; POOL_MIN_LEN]);
        let b = pool.freeze(v);
        let clone = b.slice(10..20);
        drop(b);
        assert_eq!(pool.idle_bytes(), 0, "a slice still holds the buffer");
        assert_eq!(&clone[..], &[7u8; 10]);
        drop(clone);
        assert_eq!(pool.idle_bytes(), POOL_MIN_LEN);
        let again = pool.take_filled(POOL_MIN_LEN);
        assert_eq!(again.as_ptr(), ptr, "the same memory is handed out again");
        assert_eq!(again.len(), POOL_MIN_LEN);
        assert_eq!(pool.idle_bytes(), 0);
    }

    #[test]
    fn idle_bytes_stay_bounded_and_small_buffers_bypass() {
        let pool = leak(2 * POOL_MIN_LEN);
        let held: Vec<Bytes> = (0..5)
            .map(|_| pool.freeze(pool.take_filled(POOL_MIN_LEN)))
            .collect();
        drop(held);
        assert_eq!(pool.idle_bytes(), 2 * POOL_MIN_LEN);
        let small = pool.freeze(pool.take_filled(100));
        drop(small);
        assert_eq!(pool.idle_bytes(), 2 * POOL_MIN_LEN);
        // A larger request than any idle buffer allocates afresh.
        let big = pool.take_empty(4 * POOL_MIN_LEN);
        assert!(big.capacity() >= 4 * POOL_MIN_LEN);
        assert_eq!(pool.idle_bytes(), 2 * POOL_MIN_LEN);
    }
}
