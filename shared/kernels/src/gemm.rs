//! Matrix multiplication behind one bounds-checked, safe function, [`matmul`].
//!
//! On CPUs with AVX-512 it runs our own cache-blocked GEMM ([`packed`]) around an AVX-512
//! register tile ([`microkernel`]): the `gemm` crate measured 28 GFLOP/s on a 1024^3 product
//! on this project's 2-core Xeon where ours measured 60-98, and 5-30 GFLOP/s on the CNN's
//! skinny shapes where ours measured 30-98 (`examples/gemm_shapes.rs`, docs/benchmarks.md). Elsewhere it calls the `gemm`
//! crate, which dispatches to AVX2/FMA or NEON at run time.
//!
//! `unsafe` lives in this module (the `gemm` crate's raw-pointer entry point) and in
//! [`microkernel`] (the intrinsics); every block says why it is sound. [`matmul`] checks every
//! shape, stride and slice length first, so nothing reads outside the slices it was given; the
//! borrow checker guarantees the destination does not alias the operands. Tested against a
//! plain triple loop ([`matmul_reference`]) for every transpose combination, accumulation mode,
//! ragged edge and thread count, on both paths.
#![allow(unsafe_code)]

mod microkernel;
mod packed;

use rayon::prelude::*;
use thiserror::Error;

/// A read-only matrix view over a slice: element `(i, j)` is `data[i * row_stride + j * col_stride]`.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major `rows x cols` matrix stored densely at the start of `data`.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self { data, rows, cols, row_stride: cols, col_stride: 1 }
    }

    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// Columns `start..start + len` of the matrix (no copy).
    ///
    /// # Panics
    /// If they are not all columns of it.
    pub fn columns(self, start: usize, len: usize) -> Self {
        assert!(start + len <= self.cols, "columns {start}..{} of a {}-column matrix", start + len, self.cols);
        let offset = if len == 0 || self.rows == 0 { 0 } else { start * self.col_stride };
        Self { data: &self.data[offset.min(self.data.len())..], cols: len, ..self }
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    fn get(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.row_stride + j * self.col_stride]
    }

    fn fits(&self) -> bool {
        fits(self.data.len(), self.rows, self.cols, self.row_stride, self.col_stride)
    }
}

/// A mutable row-major matrix view: the destination of [`matmul`].
#[derive(Debug)]
pub struct MatMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
}

impl<'a> MatMut<'a> {
    /// A row-major `rows x cols` matrix stored densely at the start of `data`.
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self { data, rows, cols }
    }
}

/// Whether the product is added to the destination or replaces it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Accumulate {
    /// `dst = beta * lhs * rhs`.
    Overwrite,
    /// `dst = alpha * dst + beta * lhs * rhs`.
    Scaled(f32),
}

/// How many threads a multiplication may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Threads {
    /// On the calling thread only (deterministic; what simulator workers use).
    #[default]
    One,
    /// Split over up to this many threads of the global rayon pool (0: as many as it has).
    Rayon(usize),
}

/// Shapes that do not multiply, or a view that overruns its slice.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MatmulError {
    /// Inner or outer dimensions disagree.
    #[error("shapes do not multiply: dst {dst:?} = lhs {lhs:?} x rhs {rhs:?}")]
    Shape {
        /// Destination rows and columns.
        dst: (usize, usize),
        /// Left operand rows and columns.
        lhs: (usize, usize),
        /// Right operand rows and columns.
        rhs: (usize, usize),
    },
    /// A view reaches past the end of its slice.
    #[error("the {0} view reaches past the end of its slice")]
    OutOfBounds(&'static str),
}

fn fits(len: usize, rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> bool {
    if rows == 0 || cols == 0 {
        return true;
    }
    let last = (rows - 1)
        .checked_mul(row_stride)
        .and_then(|r| (cols - 1).checked_mul(col_stride).and_then(|c| r.checked_add(c)));
    // Strides must also fit in isize, the type gemm takes them as.
    matches!(last, Some(l) if l < len && l <= isize::MAX as usize)
}

/// `dst = alpha * dst + beta * lhs * rhs` (or `beta * lhs * rhs` with [`Accumulate::Overwrite`]).
pub fn matmul(
    dst: MatMut<'_>,
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
    accumulate: Accumulate,
    beta: f32,
    threads: Threads,
) -> Result<(), MatmulError> {
    let (m, n, k) = (dst.rows, dst.cols, lhs.cols);
    if lhs.rows != m || rhs.cols != n || rhs.rows != k {
        return Err(MatmulError::Shape { dst: (m, n), lhs: (lhs.rows, lhs.cols), rhs: (rhs.rows, rhs.cols) });
    }
    if !fits(dst.data.len(), m, n, n, 1) {
        return Err(MatmulError::OutOfBounds("destination"));
    }
    if !lhs.fits() {
        return Err(MatmulError::OutOfBounds("left"));
    }
    if !rhs.fits() {
        return Err(MatmulError::OutOfBounds("right"));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        let dst = &mut dst.data[..m * n];
        match accumulate {
            Accumulate::Overwrite => dst.fill(0.0),
            Accumulate::Scaled(alpha) => dst.iter_mut().for_each(|x| *x *= alpha),
        }
        return Ok(());
    }
    if microkernel::available() && !force_fallback() {
        let alpha = match accumulate {
            Accumulate::Overwrite => None,
            Accumulate::Scaled(alpha) => Some(alpha),
        };
        let threads = match threads {
            Threads::One => 1,
            Threads::Rayon(0) => rayon::current_num_threads(),
            Threads::Rayon(t) => t,
        };
        // Split C's rows over threads when each gets real work (a few MFLOP and 2 row panels).
        let chunk = m.div_ceil(threads.max(1)).next_multiple_of(2 * microkernel::MR);
        if packed::dot_suits(lhs, rhs) {
            packed::dot(&mut dst.data[..m * n], lhs, rhs, alpha, beta);
        } else if threads > 1 && m > chunk && 2 * m * n * k >= 4_000_000 {
            dst.data[..m * n].par_chunks_mut(chunk * n).enumerate().for_each(|(c, d)| {
                let lhs = MatRef { data: &lhs.data[c * chunk * lhs.row_stride..], rows: d.len() / n, ..lhs };
                packed::sgemm(d, lhs, rhs, alpha, beta);
            });
        } else {
            packed::sgemm(&mut dst.data[..m * n], lhs, rhs, alpha, beta);
        }
        return Ok(());
    }
    let (read_dst, alpha) = match accumulate {
        Accumulate::Overwrite => (false, 0.0),
        Accumulate::Scaled(alpha) => (true, alpha),
    };
    let parallelism = match threads {
        Threads::One => gemm::Parallelism::None,
        Threads::Rayon(n) => gemm::Parallelism::Rayon(n),
    };
    // SAFETY: `fits` checked above that for every view the largest offset it can reach,
    // (rows - 1) * row_stride + (cols - 1) * col_stride, lies inside its slice (and within
    // isize), and the dimensions agree (lhs m x k, rhs k x n, dst m x n, all non-zero), so gemm
    // reads and writes only inside the three slices. The destination is a `&mut` slice and the
    // operands `&` slices, so it cannot alias either operand. Strides are non-negative, and T is
    // f32, which gemm supports (it panics on nothing else here).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            1,
            n as isize,
            read_dst,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            alpha,
            beta,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

/// Tests run the fallback path too, on any CPU.
#[cfg(test)]
fn force_fallback() -> bool {
    tests::FALLBACK.with(|f| f.get())
}

#[cfg(not(test))]
fn force_fallback() -> bool {
    false
}

/// The same product as [`matmul`] by a plain triple loop with f64 sums: the safe reference the
/// tests compare against.
pub fn matmul_reference(dst: MatMut<'_>, lhs: MatRef<'_>, rhs: MatRef<'_>, accumulate: Accumulate, beta: f32) {
    for i in 0..dst.rows {
        for j in 0..dst.cols {
            let dot: f64 = (0..lhs.cols).map(|p| lhs.get(i, p) as f64 * rhs.get(p, j) as f64).sum();
            let d = &mut dst.data[i * dst.cols + j];
            *d = match accumulate {
                Accumulate::Overwrite => beta as f64 * dot,
                Accumulate::Scaled(alpha) => alpha as f64 * *d as f64 + beta as f64 * dot,
            } as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};
    use std::cell::Cell;

    thread_local! {
        pub(super) static FALLBACK: Cell<bool> = const { Cell::new(false) };
    }

    /// Runs `f` on the default path and, if that is our own GEMM, on the fallback too.
    fn both_paths(f: impl Fn()) {
        f();
        FALLBACK.with(|x| x.set(true));
        f();
        FALLBACK.with(|x| x.set(false));
    }

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    #[test]
    fn matches_the_reference_for_every_transpose_and_mode() {
        both_paths(matches_the_reference);
    }

    fn matches_the_reference() {
        let shapes = [
            (1, 1, 1),
            (3, 5, 7),
            (64, 33, 17),
            (196, 64, 800),
            (10, 512, 3136),
            (10, 3136, 512),
            (16, 7, 200),
            (9, 2, 65),
            (64, 3136, 512),
            (40, 300, 70),
            (400, 24, 3000),
            (7, 1, 300),
            (131, 97, 513),
        ];
        for &(m, n, k) in &shapes {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                for acc in [Accumulate::Overwrite, Accumulate::Scaled(1.0), Accumulate::Scaled(0.5)] {
                    let a = random(m * k, 1);
                    let b = random(k * n, 2);
                    let lhs = if ta { MatRef::new(&a, k, m).t() } else { MatRef::new(&a, m, k) };
                    let rhs = if tb { MatRef::new(&b, n, k).t() } else { MatRef::new(&b, k, n) };
                    let mut fast = random(m * n, 3);
                    let mut slow = fast.clone();
                    matmul(MatMut::new(&mut fast, m, n), lhs, rhs, acc, -0.25, Threads::One).unwrap();
                    matmul_reference(MatMut::new(&mut slow, m, n), lhs, rhs, acc, -0.25);
                    for (x, y) in fast.iter().zip(&slow) {
                        assert!(
                            (x - y).abs() <= 1e-5 * (1.0 + k as f32).sqrt() * 4.0,
                            "{m}x{n}x{k} {ta} {tb}: {x} vs {y}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn threaded_matches_one_thread() {
        both_paths(threaded_matches);
    }

    fn threaded_matches() {
        let (m, n, k) = (300, 70, 200);
        let (a, b) = (random(m * k, 4), random(k * n, 5));
        let mut one = vec![0.0; m * n];
        let mut two = vec![0.0; m * n];
        let (lhs, rhs) = (MatRef::new(&a, m, k), MatRef::new(&b, k, n));
        matmul(MatMut::new(&mut one, m, n), lhs, rhs, Accumulate::Overwrite, 1.0, Threads::One).unwrap();
        matmul(MatMut::new(&mut two, m, n), lhs, rhs, Accumulate::Overwrite, 1.0, Threads::Rayon(2)).unwrap();
        for (x, y) in one.iter().zip(&two) {
            assert!((x - y).abs() < 1e-4);
        }
    }

    #[test]
    fn bad_shapes_and_short_slices_are_errors_not_reads() {
        let a = vec![1.0; 6];
        let b = vec![1.0; 6];
        let mut d = vec![0.0; 4];
        let err = matmul(
            MatMut::new(&mut d, 2, 2),
            MatRef::new(&a, 2, 3),
            MatRef::new(&b, 2, 3),
            Accumulate::Overwrite,
            1.0,
            Threads::One,
        );
        assert!(matches!(err, Err(MatmulError::Shape { .. })));
        let err = matmul(
            MatMut::new(&mut d, 2, 2),
            MatRef::new(&a[..5], 2, 3),
            MatRef::new(&b, 3, 2),
            Accumulate::Overwrite,
            1.0,
            Threads::One,
        );
        assert_eq!(err, Err(MatmulError::OutOfBounds("left")));
        let err = matmul(
            MatMut::new(&mut d[..3], 2, 2),
            MatRef::new(&a, 2, 3),
            MatRef::new(&b, 3, 2),
            Accumulate::Overwrite,
            1.0,
            Threads::One,
        );
        assert_eq!(err, Err(MatmulError::OutOfBounds("destination")));
        // Empty inner dimension: overwrite zeroes, accumulate scales.
        let mut d = vec![2.0; 4];
        matmul(
            MatMut::new(&mut d, 2, 2),
            MatRef::new(&[], 2, 0),
            MatRef::new(&[], 0, 2),
            Accumulate::Scaled(0.5),
            1.0,
            Threads::One,
        )
        .unwrap();
        assert_eq!(d, vec![1.0; 4]);
    }
}
