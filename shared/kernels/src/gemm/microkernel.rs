//! The AVX-512 register tile: `tile[r][c] = sum_p a(r, p) * b[p][c]` for up to [`MR`] rows and
//! [`NR`] columns, from packed panels (see [`super::packed`]) or from A and B in place.
//!
//! 2 x `rows` accumulators of 16 lanes stay in registers for the whole `kc` loop; each step
//! loads one 32-wide row of the B panel and broadcasts `rows` values of the A panel into
//! 2 x `rows` FMAs; at the end they are merged into C with masked stores. The wrapper
//! [`tile_into`] checks every length, so the unchecked loads inside
//! never leave the panels.
#![allow(unsafe_code)]

/// Rows of a register tile (of the packed A panel).
pub const MR: usize = 8;
/// Columns of a register tile (of the packed B panel): two 16-lane vectors.
pub const NR: usize = 32;

/// Whether this CPU runs the AVX-512 tile (checked once, cached by std).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Where a tile's A values lie: `a(r, p)` for row `r < MR` and step `p`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ALayout {
    /// `a[p * step + r]`: a packed panel (`step = MR`), or a transposed row-major matrix read
    /// in place (`step` its row length), whose 8 rows are contiguous at every step.
    Panel {
        /// Floats from one step to the next.
        step: usize,
    },
    /// `a[r * stride + p]`: a row-major matrix read in place.
    Rows {
        /// Floats from one row to the next.
        stride: usize,
    },
}

impl ALayout {
    /// The largest offset the tile reads for `kc >= 1` steps of `rows >= 1` rows.
    fn reach(self, kc: usize, rows: usize) -> usize {
        match self {
            // Saturating: a stride too large for the address space fails the length check.
            ALayout::Panel { step } => (kc - 1).saturating_mul(step).saturating_add(rows - 1),
            ALayout::Rows { stride } => (rows - 1).saturating_mul(stride).saturating_add(kc - 1),
        }
    }
}

/// How a tile lands in C: `c = beta * t`, `c = alpha * c + beta * t`, or `c += beta * t`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Merge {
    /// `c = beta * t`.
    Overwrite(f32),
    /// `c = alpha * c + beta * t`: `Scale(alpha, beta)`.
    Scale(f32, f32),
    /// `c += beta * t`.
    Add(f32),
}

/// Computes the first `rows` rows and `cols` columns of the tile from `kc` steps of the panels
/// and merges them into a row-major C at `c` (row stride `ldc`) straight from the registers.
/// `a` holds the A values as `layout` says; step `p` of `b` is the [`NR`] values at `b[p * ldb..]`
/// (a packed panel has `ldb = NR`; an unpacked row-major B its row stride). Rows past `rows`
/// and columns past `cols` of C are not touched.
///
/// # Panics
/// If A or B is shorter than `kc` steps, `rows` is 0 or exceeds [`MR`], `cols` is 0 or
/// exceeds [`NR`], C is shorter than `(rows - 1) * ldc + cols`, or AVX-512 is absent (callers
/// check [`available`] first).
#[allow(clippy::too_many_arguments, reason = "one tile: two panels and a strided destination")]
pub fn tile_into(
    kc: usize,
    rows: usize,
    cols: usize,
    a: &[f32],
    layout: ALayout,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    merge: Merge,
) {
    assert!(kc > 0 && (1..=MR).contains(&rows) && ldb >= NR, "bad tile arguments");
    assert!(a.len() > layout.reach(kc, rows), "A shorter than kc steps");
    assert!(b.len() >= (kc - 1) * ldb + NR, "B panel shorter than kc steps");
    assert!((1..=NR).contains(&cols) && ldc >= cols && c.len() >= (rows - 1) * ldc + cols, "C too short");
    assert!(available(), "the AVX-512 tile needs avx512f");
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! call {
            ($($n:literal)*) => {
                match rows {
                    // SAFETY: avx512f is present; A holds a(r, p) for r < rows, p < kc at the
                    // offsets `layout` gives (its reach asserted above) and B kc steps; C holds
                    // `cols` values from c + r * ldc for every r < rows (asserted above), and
                    // `kernel_into` reads and writes only those lanes (masked loads and stores).
                    $($n => unsafe {
                        let (a, b, c) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
                        match layout {
                            ALayout::Panel { step } => avx512::kernel_into::<$n, false>(kc, a, step, b, ldb, c, ldc, cols, merge),
                            ALayout::Rows { stride } => avx512::kernel_into::<$n, true>(kc, a, stride, b, ldb, c, ldc, cols, merge),
                        }
                    },)*
                    _ => {}
                }
            };
        }
        call!(1 2 3 4 5 6 7 8);
    }
}

/// Columns of a dot tile.
pub const DOT_COLS: usize = 3;

/// `out[i][j] = sum_p a[i * lda + p] * bt[cols[j] * ldb + p]` for `i < rows` and the three
/// rows `cols` of `bt`, `p < k`: products whose inner dimension is contiguous in both operands
/// (a skinny `A * B^T`, e.g. a dense layer's input gradient), without packing either.
///
/// # Panics
/// If a row reaches past its slice, `rows` exceeds [`MR`], or AVX-512 is absent.
#[allow(clippy::too_many_arguments, reason = "one tile over two strided operands")]
pub fn dot_tile(
    k: usize,
    rows: usize,
    a: &[f32],
    lda: usize,
    bt: &[f32],
    ldb: usize,
    cols: [usize; DOT_COLS],
    out: &mut [[f32; DOT_COLS]; MR],
) {
    assert!((1..=MR).contains(&rows) && (rows - 1) * lda + k <= a.len(), "A rows past the slice");
    assert!(cols.iter().all(|&j| j * ldb + k <= bt.len()), "B rows past the slice");
    assert!(available(), "the AVX-512 tile needs avx512f");
    #[cfg(target_arch = "x86_64")]
    {
        let b = cols.map(|j| bt[j * ldb..].as_ptr());
        macro_rules! call {
            ($($n:literal)*) => {
                match rows {
                    // SAFETY: avx512f is present; every A row r < rows has k values from
                    // a + r * lda and each of the three B rows k values from b[j] (asserted
                    // above), which is all `dot` reads (the tail through masked loads that touch
                    // only lanes < k); it writes only `out`.
                    $($n => unsafe { avx512::dot::<$n>(k, a.as_ptr(), lda, b, out) },)*
                    _ => {}
                }
            };
        }
        call!(1 2 3 4 5 6 7 8);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::MR;

    /// # Safety
    /// avx512f must be available; for r < ROWS, `a + r * lda` must be valid for `k` reads, and
    /// so must each `b[j]`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dot<const ROWS: usize>(
        k: usize,
        a: *const f32,
        lda: usize,
        b: [*const f32; super::DOT_COLS],
        out: &mut [[f32; super::DOT_COLS]; MR],
    ) {
        let mut acc = [[_mm512_setzero_ps(); super::DOT_COLS]; ROWS];
        let mut p = 0;
        while p < k {
            let left = k - p;
            let mask: __mmask16 = if left >= 16 { 0xffff } else { (1u16 << left) - 1 };
            // SAFETY: lanes p .. p + min(16, k - p) of each row are inside it (the caller
            // vouched for k values per row); masked-off lanes are not read.
            let bv = b.map(|bj| unsafe { _mm512_maskz_loadu_ps(mask, bj.add(p)) });
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: as above, for row r < ROWS of A.
                let av = unsafe { _mm512_maskz_loadu_ps(mask, a.add(r * lda + p)) };
                for (acc, &bv) in acc.iter_mut().zip(&bv) {
                    *acc = _mm512_fmadd_ps(av, bv, *acc);
                }
            }
            p += 16;
        }
        for (o, acc) in out.iter_mut().zip(&acc) {
            for (o, &acc) in o.iter_mut().zip(acc) {
                *o = _mm512_reduce_add_ps(acc);
            }
        }
    }

    /// # Safety
    /// avx512f must be available; `a` must be valid for reads of `a(r, p)` for r < ROWS, p < kc
    /// (at `a + p * lda + r`, or `a + r * lda + p` when `BY_ROWS`) and `b` for
    /// `(kc - 1) * ldb + NR`; for r < ROWS, `c + r * ldc` must be valid for `cols <= NR` reads
    /// and writes.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments, reason = "one tile: two operands and a strided destination")]
    pub(super) unsafe fn kernel_into<const ROWS: usize, const BY_ROWS: bool>(
        kc: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        cols: usize,
        merge: super::Merge,
    ) {
        // SAFETY: the caller's contract includes `accumulate`'s.
        let acc = unsafe { accumulate::<ROWS, BY_ROWS>(kc, a, lda, b, ldb) };
        let lanes = |n: usize| -> __mmask16 { if n >= 16 { 0xffff } else { (1u16 << n) - 1 } };
        let masks = [lanes(cols), lanes(cols.saturating_sub(16))];
        let (alpha, beta) = match merge {
            super::Merge::Overwrite(beta) => (0.0, beta),
            super::Merge::Scale(alpha, beta) => (alpha, beta),
            super::Merge::Add(beta) => (1.0, beta),
        };
        let (alpha_v, beta_v) = (_mm512_set1_ps(alpha), _mm512_set1_ps(beta));
        let read_c = !matches!(merge, super::Merge::Overwrite(_));
        for (r, acc) in acc.iter().enumerate() {
            for (h, (&acc, &mask)) in acc.iter().zip(&masks).enumerate() {
                // SAFETY: r < ROWS and the mask keeps lanes h * 16 + l < cols, all inside the
                // caller's row of C; masked-off lanes are neither read nor written.
                unsafe {
                    let o = c.add(r * ldc + h * 16);
                    let t = _mm512_mul_ps(acc, beta_v);
                    let v = if read_c { _mm512_fmadd_ps(alpha_v, _mm512_maskz_loadu_ps(mask, o), t) } else { t };
                    _mm512_mask_storeu_ps(o, mask, v);
                }
            }
        }
    }

    /// The `kc` steps of the tile, in registers.
    ///
    /// # Safety
    /// As for [`kernel_into`]: `a(r, p)` readable for r < ROWS, p < kc, and `b` for
    /// `(kc - 1) * ldb + NR`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn accumulate<const ROWS: usize, const BY_ROWS: bool>(
        kc: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
    ) -> [[__m512; 2]; ROWS] {
        let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
        // Where a(r, p) lies relative to a(0, p), and from one step to the next.
        let (row_step, p_step) = if BY_ROWS { (lda, 1) } else { (1, lda) };
        for p in 0..kc {
            // SAFETY: p < kc, so b + p * ldb .. + NR lies inside B, and a + p * p_step is
            // a(0, p), inside A (the caller vouched for every a(r, p), r < ROWS, p < kc).
            let (b0, b1, ap) = unsafe {
                let bp = b.add(p * ldb);
                (_mm512_loadu_ps(bp), _mm512_loadu_ps(bp.add(16)), a.add(p * p_step))
            };
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: a + r * row_step + p * p_step is a(r, p) with r < ROWS (see above).
                let x = _mm512_set1_ps(unsafe { *ap.add(r * row_step) });
                acc[0] = _mm512_fmadd_ps(x, b0, acc[0]);
                acc[1] = _mm512_fmadd_ps(x, b1, acc[1]);
            }
        }
        acc
    }
}
