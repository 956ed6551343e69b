//! Two encodings of a set of positions below `n`:
//! - packed bits: position `p` is bit `p mod 8` (least significant first) of byte `p / 8`;
//! - gaps: per kept position, in ascending order, one byte holding how many positions are
//!   skipped before it; a byte 255 skips 255 positions and keeps none (so a gap of 300 is
//!   `255, 45`). One byte per kept position: smaller than bits below a density of about 1/8.

/// Packs `bits` into `⌈len / 8⌉` bytes.
pub fn pack(bits: impl ExactSizeIterator<Item = bool>) -> Vec<u8> {
    let mut bytes = vec![0u8; bits.len().div_ceil(8)];
    for (p, bit) in bits.enumerate() {
        bytes[p / 8] |= u8::from(bit) << (p % 8);
    }
    bytes
}

/// The first `len` bits of `bytes`, or `None` when `bytes` is not `⌈len / 8⌉` long or a bit
/// past `len` is set (a corrupted or foreign mask).
pub fn unpack(bytes: &[u8], len: usize) -> Option<Vec<bool>> {
    if bytes.len() != len.div_ceil(8) {
        return None;
    }
    let tail_clear = len.is_multiple_of(8) || bytes.last().is_some_and(|&b| b >> (len % 8) == 0);
    tail_clear.then(|| (0..len).map(|p| bytes[p / 8] >> (p % 8) & 1 == 1).collect())
}

/// The gap bytes of ascending `positions`.
pub fn gaps(positions: &[usize]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(positions.len());
    let mut next = 0;
    for &p in positions {
        let mut gap = p - next;
        while gap >= 255 {
            bytes.push(255);
            gap -= 255;
        }
        bytes.push(gap as u8);
        next = p + 1;
    }
    bytes
}

/// The positions of gap bytes, or `None` when one lies at or past `len` (a corrupted or
/// foreign mask).
pub fn ungap(bytes: &[u8], len: usize) -> Option<Vec<usize>> {
    let mut positions = Vec::new();
    let mut next = 0usize;
    for &b in bytes {
        if b == 255 {
            next += 255;
            continue;
        }
        let p = next + b as usize;
        if p >= len {
            return None;
        }
        positions.push(p);
        next = p + 1;
    }
    Some(positions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_by_hand() {
        // Positions 0, 3 and 9 of 10: bytes 0b0000_1001 and 0b0000_0010.
        let bits = (0..10).map(|p| [0, 3, 9].contains(&p));
        assert_eq!(pack(bits.clone()), vec![0b1001, 0b10]);
        assert_eq!(unpack(&[0b1001, 0b10], 10), Some(bits.collect()));
        // A bit past the end, or the wrong length, is refused.
        assert_eq!(unpack(&[0b1001, 0b110], 10), None);
        assert_eq!(unpack(&[0b1001], 10), None);
        assert_eq!(unpack(&[], 0), Some(vec![]));
    }

    #[test]
    fn gaps_by_hand() {
        // 0, 3, 4 and 600 of 601: gaps 0, 2, 0 and 595 = 255 + 255 + 85.
        let positions = [0, 3, 4, 600];
        let bytes = gaps(&positions);
        assert_eq!(bytes, vec![0, 2, 0, 255, 255, 85]);
        assert_eq!(ungap(&bytes, 601), Some(positions.to_vec()));
        // A gap of exactly 255: the escape, then a zero gap.
        assert_eq!(gaps(&[255]), vec![255, 0]);
        assert_eq!(ungap(&[255, 0], 256), Some(vec![255]));
        // A position past the end is refused.
        assert_eq!(ungap(&bytes, 600), None);
    }
}
