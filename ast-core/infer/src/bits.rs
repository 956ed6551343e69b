//! Two encodings of a set of positions below `n`:
//! - packed bits: position `p` is bit `p mod 8` (least significant first) of byte `p / 8`;
//! - gaps: per kept position, in ascending order, one byte holding how many positions are
//!   skipped before it; a byte 255 skips 255 positions and keeps none (so a gap of 300 is
//!   `255, 45`). One byte per kept position: smaller than bits below a density of about 1/8.
//! - in-group indices (N:M): the weight viewed as `[A, C, B]` splits into groups of `M`
//!   consecutive positions along `C` (`M` input channels at a fixed output channel and kernel
//!   position); groups in order `(a, c / M, b)`; every group keeps `N`, whose indices in the
//!   group (`0..M`, ascending) are written one after the other with `⌈log2 M⌉` bits each,
//!   packed as above (bit `q` of the stream is bit `q mod 8` of byte `q / 8`).

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

/// An N:M view: `[A, C, B]` and the group size `M` (which divides `C`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupView {
    /// `[A, C, B]`.
    pub shape: [usize; 3],
    /// Positions per group along `C`.
    pub m: usize,
}

impl GroupView {
    /// The view, or `None` when `m < 2` or `m` does not divide `C`.
    pub fn new(shape: [usize; 3], m: usize) -> Option<Self> {
        (m >= 2 && shape[1].is_multiple_of(m)).then_some(GroupView { shape, m })
    }

    /// Bits per in-group index: `⌈log2 M⌉`.
    pub fn index_bits(self) -> usize {
        (usize::BITS - (self.m - 1).leading_zeros()) as usize
    }

    /// The flat positions of every group, group after group, each in ascending order.
    fn groups(self) -> impl Iterator<Item = impl Iterator<Item = usize>> {
        let ([a, c, b], m) = (self.shape, self.m);
        (0..a).flat_map(move |ai| {
            (0..c / m).flat_map(move |g| {
                (0..b).map(move |bi| (0..m).map(move |i| (ai * c + g * m + i) * b + bi))
            })
        })
    }
}

/// The in-group indices of `union` (over the `A·C·B` positions of `view`) and `N`, when every
/// group keeps the same `N < M`; else `None`.
pub fn pack_in_group(union: &[bool], view: GroupView) -> Option<(usize, Vec<u8>)> {
    let width = view.index_bits();
    let mut n = None;
    let mut stream = Vec::new();
    for group in view.groups() {
        let kept: Vec<usize> = group
            .enumerate()
            .filter(|&(_, p)| union[p])
            .map(|(i, _)| i)
            .collect();
        if *n.get_or_insert(kept.len()) != kept.len() {
            return None;
        }
        stream.extend(
            kept.iter()
                .flat_map(|&i| (0..width).map(move |q| i >> q & 1 == 1)),
        );
    }
    let n = n.unwrap_or(0);
    (n < view.m).then(|| (n, pack(stream.into_iter())))
}

/// The ascending positions kept by in-group indices `bytes` of `N = n` per group, or `None`
/// when the length is not the groups' `⌈groups·N·⌈log2 M⌉ / 8⌉` bytes, a bit past the stream is
/// set, or a group's indices are not ascending and below `M` (a corrupted or foreign file).
pub fn unpack_in_group(bytes: &[u8], view: GroupView, n: usize) -> Option<Vec<usize>> {
    let width = view.index_bits();
    let [a, c, b] = view.shape;
    let stream = unpack(bytes, a * (c / view.m) * b * n * width)?;
    let mut indices = stream
        .chunks_exact(width.max(1))
        .map(|bits| (0..width).map(|q| usize::from(bits[q]) << q).sum::<usize>());
    let mut positions = Vec::with_capacity(a * c * b / view.m * n);
    for group in view.groups() {
        let group: Vec<usize> = group.collect();
        let mut last = None;
        for _ in 0..n {
            let i = indices.next()?;
            if i >= view.m || last.is_some_and(|l| i <= l) {
                return None;
            }
            last = Some(i);
            positions.push(group[i]);
        }
    }
    positions.sort_unstable();
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

    #[test]
    fn in_group_indices_by_hand() {
        // [A, C, B] = [1, 8, 2], 1:4: groups (c 0..4, b 0), (c 0..4, b 1), (c 4..8, b 0),
        // (c 4..8, b 1) are positions {0,2,4,6}, {1,3,5,7}, {8,10,12,14}, {9,11,13,15}.
        let view = GroupView::new([1, 8, 2], 4).unwrap();
        assert_eq!(view.index_bits(), 2);
        let kept = [4, 1, 8, 15]; // in-group indices 2, 0, 0, 3
        let union: Vec<bool> = (0..16).map(|p| kept.contains(&p)).collect();
        let (n, bytes) = pack_in_group(&union, view).unwrap();
        assert_eq!(n, 1);
        // Two bits each, least significant first: 2 = (0,1), 0 = (0,0), 0 = (0,0), 3 = (1,1).
        assert_eq!(bytes, vec![0b1100_0010]);
        assert_eq!(unpack_in_group(&bytes, view, 1), Some(vec![1, 4, 8, 15]));
        // Groups that keep different counts are not N:M.
        let mut uneven = union.clone();
        uneven[0] = true;
        assert_eq!(pack_in_group(&uneven, view), None);
        // 2:8 over [1, 8, 1]: indices 1 and 6, three bits each.
        let eight = GroupView::new([1, 8, 1], 8).unwrap();
        assert_eq!(eight.index_bits(), 3);
        let union: Vec<bool> = (0..8).map(|p| p == 1 || p == 6).collect();
        let (n, bytes) = pack_in_group(&union, eight).unwrap();
        assert_eq!((n, bytes.clone()), (2, vec![0b110_001]));
        assert_eq!(unpack_in_group(&bytes, eight, 2), Some(vec![1, 6]));
        // Refused: indices not ascending, a bit past the stream, the wrong length.
        assert_eq!(unpack_in_group(&[0b001_110], eight, 2), None);
        assert_eq!(unpack_in_group(&[0b1011_0001], eight, 2), None);
        assert_eq!(unpack_in_group(&[0b110_001, 0], eight, 2), None);
        // M must divide C.
        assert_eq!(GroupView::new([1, 6, 1], 4), None);
    }
}
