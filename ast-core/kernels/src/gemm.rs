//! A bounds-checked, safe front for `gemm::gemm` (the GEMM burn-flex itself uses), private to
//! the crate: the convolution kernels are its only callers.
//!
//! # Safety argument
//! `gemm::gemm` reads `a` and `b` and writes `c` through raw pointers at `ptr + i·rs + j·cs`
//! for `i < rows`, `j < cols`. [`matmul_strided`] calls it only after checking, for each
//! matrix with at least one element, that `(rows − 1)·rs + (cols − 1)·cs` is computed without
//! overflow and lies inside the matrix's slice, so every element the GEMM touches is inside
//! its slice (the largest offset bounds every other one, strides being unsigned). Strides are
//! handed to the GEMM as `isize`: a stride along an axis of more than one element is below the
//! slice's length and so below `isize::MAX`; along an axis of one element it is never applied
//! and is passed as 1. `c` is a `&mut` slice, so it aliases neither operand. Empty products
//! (`rows`, `cols` or the inner dimension zero) never reach the GEMM.

// The one place of the workspace with `unsafe`.
#![allow(unsafe_code)]

/// A read-only `rows × cols` matrix inside a slice: element `(i, j)` is `data[i·rs + j·cs]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MatRef<'a> {
    /// The storage.
    pub data: &'a [f32],
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Row stride.
    pub rs: usize,
    /// Column stride.
    pub cs: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major matrix (`rs = cols`, `cs = 1`).
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose (a view: strides swapped).
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    fn fits(&self) -> bool {
        fits(self.data.len(), self.rows, self.cols, [self.rs, self.cs])
    }
}

/// Whether every element `(i, j)`, `i < rows`, `j < cols`, at `i·rs + j·cs` lies below `len`,
/// with the largest offset computed without overflow (a wrapped offset would pass).
fn fits(len: usize, rows: usize, cols: usize, [rs, cs]: [usize; 2]) -> bool {
    if rows == 0 || cols == 0 {
        return true;
    }
    let last = (rows - 1)
        .checked_mul(rs)
        .zip((cols - 1).checked_mul(cs))
        .and_then(|(r, c)| r.checked_add(c));
    last.is_some_and(|last| last < len)
}

/// The stride handed to the GEMM for an axis of `n` elements: itself where it is applied
/// (`n > 1`, where [`fits`] bounds it by the slice's length), else 1.
fn gemm_stride(n: usize, stride: usize) -> isize {
    if n <= 1 {
        return 1;
    }
    isize::try_from(stride).expect("a stride checked by `fits` is below the slice length")
}

/// `c = a · b` (or `c += a · b` with `accumulate`), `c` row-major `a.rows × b.cols` in a slice of
/// exactly that size, computed on the calling thread.
///
/// # Panics
/// If the shapes do not chain or a matrix does not lie inside its slice.
pub(crate) fn matmul(c: &mut [f32], a: MatRef<'_>, b: MatRef<'_>, accumulate: bool) {
    check_whole_output(c, a, b);
    matmul_rows(c, b.cols, a, b, accumulate);
}

/// `c` holds exactly the `a.rows × b.cols` product.
fn check_whole_output(c: &[f32], a: MatRef<'_>, b: MatRef<'_>) {
    assert_eq!(
        Some(c.len()),
        a.rows.checked_mul(b.cols),
        "matmul: output holds {} values, not {}×{}",
        c.len(),
        a.rows,
        b.cols
    );
}

/// [`matmul`] into a row-major `c` whose rows are `ldc` apart (a block of a wider matrix).
///
/// # Panics
/// If the shapes do not chain or a matrix does not lie inside its slice.
pub(crate) fn matmul_rows(
    c: &mut [f32],
    ldc: usize,
    a: MatRef<'_>,
    b: MatRef<'_>,
    accumulate: bool,
) {
    assert!(
        ldc >= b.cols,
        "matmul: row stride {ldc} below {} columns",
        b.cols
    );
    matmul_strided(c, [ldc, 1], a, b, accumulate);
}

/// [`matmul`] into a column-major `c` (`a.rows × b.cols`, element `(i, j)` at `c[i + j·a.rows]`):
/// `(a · b)ᵀ` laid out row-major, the orientation in which the GEMM keeps long rows of `a` in
/// its micro-kernel when `b` has few columns.
///
/// # Panics
/// If the shapes do not chain or a matrix does not lie inside its slice.
pub(crate) fn matmul_col_major(c: &mut [f32], a: MatRef<'_>, b: MatRef<'_>, accumulate: bool) {
    check_whole_output(c, a, b);
    matmul_strided(c, [1, a.rows.max(1)], a, b, accumulate);
}

/// `c = a · b` (or `+=`) with `c`'s element `(i, j)` at `c[i·rs + j·cs]`.
fn matmul_strided(
    c: &mut [f32],
    [rs, cs]: [usize; 2],
    a: MatRef<'_>,
    b: MatRef<'_>,
    accumulate: bool,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(
        b.rows, k,
        "matmul: inner dimensions {k} and {} differ",
        b.rows
    );
    assert!(
        a.fits() && b.fits(),
        "matmul: an operand lies outside its slice"
    );
    assert!(
        fits(c.len(), m, n, [rs, cs]),
        "matmul: the output lies outside its slice"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    c[i * rs + j * cs] = 0.0;
                }
            }
        }
        return;
    }
    // SAFETY: see the module's safety argument: `a`, `b` and `c` were checked above to hold
    // every element the GEMM addresses (m, n, k ≥ 1 here), the strides it is given are those
    // checked ones or 1 along an axis of one element, and `c` aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            gemm_stride(n, cs),
            gemm_stride(m, rs),
            accumulate,
            a.data.as_ptr(),
            gemm_stride(k, a.cs),
            gemm_stride(m, a.rs),
            b.data.as_ptr(),
            gemm_stride(n, b.cs),
            gemm_stride(k, b.rs),
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_transposes_and_accumulation_by_hand() {
        // a = [[1, 2, 3], [4, 5, 6]], b = [[1, 0], [0, 1], [1, 1]]: a·b = [[4, 5], [10, 11]].
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        let mut c = [9.0; 4];
        matmul(
            &mut c,
            MatRef::row_major(&a, 2, 3),
            MatRef::row_major(&b, 3, 2),
            false,
        );
        assert_eq!(c, [4.0, 5.0, 10.0, 11.0]);
        matmul(
            &mut c,
            MatRef::row_major(&a, 2, 3),
            MatRef::row_major(&b, 3, 2),
            true,
        );
        assert_eq!(c, [8.0, 10.0, 20.0, 22.0]);
        // aᵀ·a (3×3) through a transposed view: row 0 = [1·1+4·4, 1·2+4·5, 1·3+4·6].
        let mut d = [0.0; 9];
        let a = MatRef::row_major(&a, 2, 3);
        matmul(&mut d, a.t(), a, false);
        assert_eq!(&d[..3], &[17.0, 22.0, 27.0]);
    }

    #[test]
    fn a_column_major_output_by_hand() {
        // a·b = [[4, 5], [10, 11]] as above, stored by columns: [4, 10, 5, 11]; then += again.
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        let (a, b) = (MatRef::row_major(&a, 2, 3), MatRef::row_major(&b, 3, 2));
        let mut c = [9.0; 4];
        matmul_col_major(&mut c, a, b, false);
        assert_eq!(c, [4.0, 10.0, 5.0, 11.0]);
        matmul_col_major(&mut c, a, b, true);
        assert_eq!(c, [8.0, 20.0, 10.0, 22.0]);
    }

    #[test]
    fn a_block_of_a_wider_output() {
        // [1, 2]ᵀ·[3, 4] = [[3, 4], [6, 8]] into columns 1..3 of a 2×4 matrix of 9s.
        let (a, b) = ([1.0, 2.0], [3.0, 4.0]);
        let mut c = [9.0; 8];
        matmul_rows(
            &mut c[1..],
            4,
            MatRef::row_major(&a, 2, 1),
            MatRef::row_major(&b, 1, 2),
            false,
        );
        assert_eq!(c, [9.0, 3.0, 4.0, 9.0, 9.0, 6.0, 8.0, 9.0]);
    }

    #[test]
    #[should_panic(expected = "outside its slice")]
    fn an_operand_past_its_slice_is_refused() {
        let a = [1.0; 5];
        let mut c = [0.0; 4];
        matmul(
            &mut c,
            MatRef::row_major(&a, 2, 3),
            MatRef::row_major(&a, 3, 2),
            false,
        );
    }

    /// A matrix of `rows` rows `rs` apart inside a 16-value slice.
    fn strided(data: &[f32], rows: usize, cols: usize, rs: usize, cs: usize) -> MatRef<'_> {
        MatRef {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }

    #[test]
    fn offsets_that_wrap_around_are_refused() {
        let data = [1.0; 16];
        // Three rows 2^63 apart: the last row's offset 2·2^63 wraps to 0, inside the slice,
        // while the second row lies at 2^63.
        let wraps_in_product = strided(&data, 3, 1, 1 << (usize::BITS - 1), 1);
        // Row stride usize::MAX and column stride 1: (2 − 1)·MAX + (2 − 1)·1 wraps to 0.
        let wraps_in_sum = strided(&data, 2, 2, usize::MAX, 1);
        for a in [wraps_in_product, wraps_in_sum] {
            assert!(!a.fits());
            assert!(!a.t().fits());
            let b = MatRef::row_major(&data, a.cols, 1);
            let refused = std::panic::catch_unwind(|| {
                let mut c = vec![0.0; a.rows];
                matmul(&mut c, a, b, false);
            });
            let message = *refused.expect_err("refused").downcast::<&str>().unwrap();
            assert_eq!(message, "matmul: an operand lies outside its slice");
        }
        // The same for an output whose row stride wraps: a 3×1 block with rows 2^63 apart.
        let (a, b) = (
            MatRef::row_major(&data, 3, 1),
            MatRef::row_major(&data, 1, 1),
        );
        let refused = std::panic::catch_unwind(|| {
            let mut c = [0.0; 4];
            matmul_rows(&mut c, 1 << (usize::BITS - 1), a, b, false);
        });
        let message = *refused.expect_err("refused").downcast::<&str>().unwrap();
        assert_eq!(message, "matmul: the output lies outside its slice");
    }

    #[test]
    fn an_output_size_that_overflows_is_refused() {
        let data = [1.0; 4];
        let (a, b) = (
            strided(&data, usize::MAX, 0, 1, 1),
            strided(&data, 0, 2, 1, 1),
        );
        let refused = std::panic::catch_unwind(|| matmul(&mut [0.0; 2], a, b, false));
        assert!(refused.is_err());
    }

    #[test]
    fn the_stride_of_an_axis_of_one_element_is_never_applied() {
        // One row with a row stride far past the slice: [1, 2, 3]·[[1], [1], [1]] = 6.
        let (a, b) = ([1.0, 2.0, 3.0], [1.0; 3]);
        let mut c = [0.0];
        matmul(
            &mut c,
            strided(&a, 1, 3, usize::MAX, 1),
            strided(&b, 3, 1, 1, usize::MAX),
            false,
        );
        assert_eq!(c, [6.0]);
    }
}
