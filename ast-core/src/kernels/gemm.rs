//! A bounds-checked, safe front for `gemm::gemm` (the GEMM burn-flex itself uses).

// The one place of the workspace with `unsafe`: `gemm::gemm` takes raw pointers and strides.
// Every call goes through `matmul`, which checks that each matrix lies inside its slice.
#![allow(unsafe_code)]

/// A read-only `rows × cols` matrix inside a slice: element `(i, j)` is `data[i·rs + j·cs]`.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
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
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `c = a · b` (or `c += a · b` with `accumulate`), `c` row-major `a.rows × b.cols` in a slice of
/// exactly that size, computed on the calling thread.
///
/// # Panics
/// If the shapes do not chain or a matrix does not lie inside its slice.
pub fn matmul(c: &mut [f32], a: MatRef<'_>, b: MatRef<'_>, accumulate: bool) {
    check_whole_output(c, a, b);
    matmul_rows(c, b.cols, a, b, accumulate);
}

/// `c` holds exactly the `a.rows × b.cols` product.
fn check_whole_output(c: &[f32], a: MatRef<'_>, b: MatRef<'_>) {
    assert_eq!(
        c.len(),
        a.rows * b.cols,
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
pub fn matmul_rows(c: &mut [f32], ldc: usize, a: MatRef<'_>, b: MatRef<'_>, accumulate: bool) {
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
pub fn matmul_col_major(c: &mut [f32], a: MatRef<'_>, b: MatRef<'_>, accumulate: bool) {
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
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        (m - 1) * rs + (n - 1) * cs < c.len(),
        "matmul: the output lies outside its slice"
    );
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
    // SAFETY: `c` holds the m×n matrix with strides (rs, cs) and `a`, `b` address only
    // elements inside their slices (all checked above); `c` does not alias them (it is `&mut`).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            cs as isize,
            rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
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
}
