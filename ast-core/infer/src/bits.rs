//! Packed bit masks: position `p` is bit `p mod 8` (least significant first) of byte `p / 8`.

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
}
