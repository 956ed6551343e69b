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

/// Buffers by length, with the bounds above as fields (tests use small ones).
struct Pool<T> {
    /// Each buffer with the take count when it was given.
    buffers: Vec<(Vec<T>, u64)>,
    bytes: usize,
    takes: u64,
    min_len: usize,
    max_bytes: usize,
    window: u64,
}

impl<T> Pool<T> {
    const fn new(min_len: usize, max_bytes: usize, window: u64) -> Self {
        Self {
            buffers: Vec::new(),
            bytes: 0,
            takes: 0,
            min_len,
            max_bytes,
            window,
        }
    }

    /// A kept buffer of `len` values, or `None`; frees the buffers older than the window.
    fn take(&mut self, len: usize) -> Option<Vec<T>> {
        if len < self.min_len {
            return None;
        }
        self.takes += 1;
        let (now, window) = (self.takes, self.window);
        let before = self.buffers.len();
        self.buffers.retain(|(_, given)| now - given <= window);
        if self.buffers.len() < before {
            self.bytes = self
                .buffers
                .iter()
                .map(|(b, _)| b.len() * size_of::<T>())
                .sum();
        }
        let i = self.buffers.iter().position(|(b, _)| b.len() == len)?;
        let (buffer, _) = self.buffers.swap_remove(i);
        self.bytes -= len * size_of::<T>();
        Some(buffer)
    }

    /// Keeps `buffer` unless it is too short or would take the pool past its bound.
    fn give(&mut self, buffer: Vec<T>) {
        let bytes = buffer.len() * size_of::<T>();
        if buffer.len() >= self.min_len && self.bytes + bytes <= self.max_bytes {
            self.bytes += bytes;
            self.buffers.push((buffer, self.takes));
        }
    }

    fn clear(&mut self) {
        self.buffers.clear();
        self.bytes = 0;
    }
}

static POOL: Mutex<Pool<f32>> = Mutex::new(Pool::new(MIN_LEN, MAX_BYTES, WINDOW));

/// The same for byte buffers (the gates of ReLUs, [`crate::norm::forward_masked`]), with its
/// own count of takes.
static BYTE_POOL: Mutex<Pool<u8>> = Mutex::new(Pool::new(MIN_LEN, MAX_BYTES / 4, WINDOW));

fn byte_pool() -> std::sync::MutexGuard<'static, Pool<u8>> {
    BYTE_POOL.lock().unwrap_or_else(|e| e.into_inner())
}

fn pool() -> std::sync::MutexGuard<'static, Pool<f32>> {
    // A panic while holding the lock leaves the pool consistent (each operation is one push
    // or removal), so a poisoned lock is still usable.
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A buffer of `len` values whose contents are unspecified (stale values of an earlier
/// activation, or zeros): the caller must overwrite every value before reading any.
pub fn take_overwritten(len: usize) -> Vec<f32> {
    let kept = if len >= MIN_LEN {
        pool().take(len)
    } else {
        None
    };
    kept.unwrap_or_else(|| vec![0.0; len])
}

/// Hands `buffer` over for a later [`take_overwritten`] of its length (or frees it: too short,
/// or the pool is full).
pub fn give(buffer: Vec<f32>) {
    if buffer.len() >= MIN_LEN {
        pool().give(buffer);
    }
}

/// [`take_overwritten`] for bytes.
pub fn take_overwritten_bytes(len: usize) -> Vec<u8> {
    let kept = byte_pool().take(len);
    kept.unwrap_or_else(|| vec![0; len])
}

/// [`give`] for bytes.
pub fn give_bytes(buffer: Vec<u8>) {
    if buffer.len() >= MIN_LEN {
        byte_pool().give(buffer);
    }
}

/// Frees every kept buffer.
pub fn clear() {
    pool().clear();
    byte_pool().clear();
}

/// Bytes kept now.
pub fn kept_bytes() -> usize {
    pool().bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool of buffers of at least 4 values, 64 bytes (16 values) in all, a window of 3 takes.
    fn small() -> Pool<f32> {
        Pool::new(4, 64, 3)
    }

    #[test]
    fn a_given_buffer_is_taken_back_by_its_length_only() {
        let mut pool = small();
        let mut buffer = vec![7.0f32; 5];
        buffer[0] = 3.0;
        let at = buffer.as_ptr();
        pool.give(buffer);
        assert_eq!(pool.bytes, 20);
        assert!(pool.take(6).is_none());
        let back = pool.take(5).expect("kept");
        assert_eq!((back.as_ptr(), back[0], back[1]), (at, 3.0, 7.0));
        assert_eq!(pool.bytes, 0);
        // Taken once only.
        assert!(pool.take(5).is_none());
    }

    #[test]
    fn a_buffer_nobody_takes_is_freed_after_the_window() {
        let mut pool = small();
        pool.give(vec![1.0; 5]);
        pool.give(vec![1.0; 6]);
        // Three takes of other lengths keep it; the fourth frees both.
        for _ in 0..3 {
            assert!(pool.take(4).is_none());
        }
        assert_eq!(pool.bytes, 44);
        assert!(pool.take(4).is_none());
        assert_eq!(pool.bytes, 0);
        assert!(pool.take(5).is_none());
    }

    #[test]
    fn short_buffers_and_buffers_past_the_bound_are_not_kept() {
        let mut pool = small();
        pool.give(vec![1.0; 3]);
        assert_eq!((pool.bytes, pool.buffers.len()), (0, 0));
        pool.give(vec![1.0; 12]);
        pool.give(vec![2.0; 5]);
        assert_eq!((pool.bytes, pool.buffers.len()), (48, 1));
        pool.give(vec![2.0; 4]);
        assert_eq!((pool.bytes, pool.buffers.len()), (64, 2));
        pool.clear();
        assert_eq!((pool.bytes, pool.buffers.len()), (0, 0));
    }

    #[test]
    fn the_process_pool_hands_back_what_it_was_given() {
        // An odd length above `MIN_LEN` that no other test of the process takes or gives.
        let len = MIN_LEN + 12_345;
        let mut buffer = vec![7.0f32; len];
        buffer[0] = 3.0;
        give(buffer);
        let back = take_overwritten(len);
        assert_eq!((back[0], back[1]), (3.0, 7.0));
        // Short lengths never reach it: a fresh, zeroed buffer.
        give(vec![5.0; 8]);
        assert_eq!(take_overwritten(8), vec![0.0; 8]);
    }

    #[test]
    fn the_byte_pool_hands_back_bytes_and_keeps_them_apart_from_floats() {
        let len = MIN_LEN + 23_456;
        let mut bytes = vec![1u8; len];
        bytes[0] = 9;
        give_bytes(bytes);
        // A float buffer of that length does not come from the bytes.
        assert_eq!(take_overwritten(len)[0], 0.0);
        let back = take_overwritten_bytes(len);
        assert_eq!((back[0], back[1]), (9, 1));
        assert_eq!(take_overwritten_bytes(len)[0], 0);
    }
}
