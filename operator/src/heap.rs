//! Hands freed heap memory back to the system after a pass over the
//! cluster.
//!
//! A NodeFill pass at 5,000 nodes allocates and frees millions of small
//! objects within seconds (every desired spec is built, compared and
//! dropped; the planned peer graph; the snapshot the decisions read),
//! while watch events replace stored objects at the same time. glibc's
//! malloc keeps what is freed in its per-thread arenas and returns only
//! the top of each heap, so the resident set stayed near the high-water
//! mark of the busiest pass plus fragmentation (docs/bench/NOTES-scale.md
//! has the figures). `malloc_trim(0)` releases the free pages of every
//! arena, including those in the middle of a heap; it costs milliseconds
//! and runs once per pass (at most every few seconds in a large cluster).

/// Returns free heap pages to the system (glibc only; a no-op elsewhere).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it has
    // no preconditions and may be called from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
