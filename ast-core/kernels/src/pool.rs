//! Recycled activation buffers. A training step allocates every large activation afresh
//! (a convolution's or batch norm's output, a residual's gradient), and a fresh `vec![0.0; n]`
//! clears memory that the kernel then overwrites: on 2 cores that clearing was ≈ 5 % of a
//! ResNet-32 step at density 0.05, where the step is bound by memory traffic. The backward
//! pass frees as many buffers of the same sizes as the forward pass takes (the saved inputs
//! once their gradients are computed), so the Flex backend hands those here ([`give`]) and
//! the kernels take their outputs from here ([`take_overwritten`]) without clearing them.
//!
//! A taken buffer holds stale values (initialised `f32`s, never uninitialised memory): only
//! code that overwrites every value may take one. The pool is process-wide, keeps buffers of
//! at least [`MIN_LEN`] values, and at most [`MAX_BYTES`] in all (beyond that, given buffers
//! are freed as usual). A buffer nobody took within [`WINDOW`] takes is freed: a training step
//! takes back what the step before gave within about a hundred takes, and buffers of sizes no
//! longer asked for (training's, during an evaluation) do not stay on top of what the
//! process needs (with a 512 MiB bound and no window the quickstart's peak memory grew from
//! 2.5 to 3.1 GiB).

use std::sync::Mutex;

/// Buffers shorter than this are not kept (allocating and clearing them is cheap).
pub const MIN_LEN: usize = 1 << 16;

/// The most the pool keeps, in bytes.
pub const MAX_BYTES: usize = 512 << 20;

/// Takes (of any length) after which a buffer nobody took is freed.
pub const WINDOW: u64 = 256;

struct Pool {
    /// Each buffer with the take count when it was given.
    buffers: Vec<(Vec<f32>, u64)>,
    bytes: usize,
    takes: u64,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    buffers: Vec::new(),
    bytes: 0,
    takes: 0,
});

fn pool() -> std::sync::MutexGuard<'static, Pool> {
    // A panic while holding the lock leaves the pool consistent (each operation is one push
    // or removal), so a poisoned lock is still usable.
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A buffer of `len` values whose contents are unspecified (stale values of an earlier
/// activation, or zeros): the caller must overwrite every value before reading any.
pub fn take_overwritten(len: usize) -> Vec<f32> {
    if len >= MIN_LEN {
        let mut pool = pool();
        pool.takes += 1;
        let now = pool.takes;
        let before = pool.buffers.len();
        pool.buffers.retain(|(_, given)| now - given <= WINDOW);
        if pool.buffers.len() < before {
            pool.bytes = pool
                .buffers
                .iter()
                .map(|(b, _)| b.len() * size_of::<f32>())
                .sum();
        }
        if let Some(i) = pool.buffers.iter().position(|(b, _)| b.len() == len) {
            let (buffer, _) = pool.buffers.swap_remove(i);
            pool.bytes -= len * size_of::<f32>();
            return buffer;
        }
    }
    vec![0.0; len]
}

/// Hands `buffer` over for a later [`take_overwritten`] of its length (or frees it: too short,
/// or the pool is full).
pub fn give(buffer: Vec<f32>) {
    let bytes = buffer.len() * size_of::<f32>();
    if buffer.len() < MIN_LEN {
        return;
    }
    let mut pool = pool();
    if pool.bytes + bytes <= MAX_BYTES {
        pool.bytes += bytes;
        let now = pool.takes;
        pool.buffers.push((buffer, now));
    }
}

/// Frees every kept buffer.
pub fn clear() {
    let mut pool = pool();
    pool.buffers.clear();
    pool.bytes = 0;
}

/// Bytes kept now.
pub fn kept_bytes() -> usize {
    pool().bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serialises the tests that count on a buffer staying until they take it back (the
    /// window test makes hundreds of takes).
    static ORDER: Mutex<()> = Mutex::new(());

    /// The pool is process-wide and tests run in parallel: lengths here are unusual enough
    /// (odd, above `MIN_LEN`) that no other test takes or gives them.
    #[test]
    fn a_given_buffer_is_taken_back_by_its_length_only() {
        let _order = ORDER.lock().unwrap_or_else(|e| e.into_inner());
        let len = MIN_LEN + 12_345;
        let mut buffer = vec![7.0f32; len];
        buffer[0] = 3.0;
        let at = buffer.as_ptr();
        give(buffer);
        // Another length gets a fresh, zeroed buffer.
        let other = take_overwritten(len + 1);
        assert!(other.iter().all(|&v| v == 0.0));
        let back = take_overwritten(len);
        assert_eq!((back.as_ptr(), back[0], back[1]), (at, 3.0, 7.0));
        // Taken once only.
        let again = take_overwritten(len);
        assert_ne!(again.as_ptr(), at);
    }

    #[test]
    fn a_buffer_nobody_takes_is_freed_after_the_window() {
        let _order = ORDER.lock().unwrap_or_else(|e| e.into_inner());
        let len = MIN_LEN + 23_456;
        let buffer = vec![1.0f32; len];
        let at = buffer.as_ptr();
        give(buffer);
        // Takes of another length (other tests' takes only bring the end nearer).
        let others: Vec<Vec<f32>> = (0..=WINDOW)
            .map(|_| take_overwritten(MIN_LEN + 7))
            .collect();
        let again = take_overwritten(len);
        assert_ne!(again.as_ptr(), at);
        assert!(again.iter().all(|&v| v == 0.0));
        drop(others);
    }

    #[test]
    fn short_buffers_and_buffers_past_the_limit_are_freed() {
        let before = kept_bytes();
        give(vec![1.0; MIN_LEN - 1]);
        assert_eq!(take_overwritten(MIN_LEN - 1), vec![0.0; MIN_LEN - 1]);
        let huge = MAX_BYTES / size_of::<f32>() + 1;
        give(vec![0.0; huge]);
        assert!(kept_bytes() <= MAX_BYTES);
        assert!(kept_bytes() < before + huge * size_of::<f32>());
    }
}
