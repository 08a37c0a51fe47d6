//! Cache-blocked GEMM over packed panels (the BLIS loop order) around the AVX-512 register tile.
//!
//! For each block of `KC` steps of the inner dimension, B's rows are packed into 32-column
//! panels (zero-padded) that stay in L1/L2 while every row panel of A passes over them; A is
//! packed `MC` rows at a time into 8-row panels, unless few column panels pass over it (then
//! each register tile reads it in place, rows or transposed rows). Each tile is merged into C with the caller's
//! scaling straight from the registers: the first inner block applies `alpha` (or overwrites),
//! later blocks add.
//! Single-threaded; [`super::matmul`] splits C's rows over threads.

use std::cell::RefCell;

use super::MatRef;
use super::microkernel::{self, ALayout, MR, Merge, NR};

/// Inner-dimension block: an A panel of 8 x 128 and a B panel of 128 x 32 floats (16 KB, with
/// room in a 48 KB L1 for the A panel and C; 256 measured 40% slower on a 1024^3 product).
const KC: usize = 128;
/// Rows of A packed at a time (a multiple of MR).
const MC: usize = 128;

thread_local! {
    /// Packed A and B, reused call after call on each thread.
    static PACKS: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// `dst = alpha * dst + beta * lhs * rhs`, or `beta * lhs * rhs` when `alpha` is `None`, with
/// `dst` row-major (element `(i, j)` at `i * n + j`). Shapes and bounds were checked by the
/// caller; `k > 0`.
pub(super) fn sgemm(dst: &mut [f32], lhs: MatRef<'_>, rhs: MatRef<'_>, alpha: Option<f32>, beta: f32) {
    let (m, n, k) = (lhs.rows, rhs.cols, lhs.cols);
    let n_panels = n.div_ceil(NR);
    PACKS.with(|packs| {
        let (ap, bp) = &mut *packs.borrow_mut();
        // Inner blocks of equal depth (800 = 4 x 200, not 3 x 256 + 32).
        let step = k.div_ceil(k.div_ceil(KC));
        for pc in (0..k).step_by(step) {
            let kc = step.min(k - pc);
            // A row-major B that only a few row panels pass over is read in place (its full
            // panels): packing would cost as much as the product. Otherwise it is packed
            // (reading in place with a large row stride thrashes L1's sets).
            let direct = rhs.col_stride == 1 && m <= 4 * MR;
            bp.resize(n_panels * kc * NR, 0.0);
            if !direct {
                pack_b(rhs, pc, kc, bp);
            } else if n % NR != 0 {
                pack_b_panel(rhs, pc, kc, n_panels - 1, &mut bp[(n_panels - 1) * kc * NR..][..kc * NR]);
            }
            // Likewise A, when at most four column panels pass over each of its row panels
            // (the Winograd GEMMs: 64 or 32 columns): its panel stays in L1 between them, and
            // packing would cost a third of the product.
            let in_place = match (lhs.row_stride, lhs.col_stride) {
                _ if n_panels > 4 => None,
                (rs, 1) => Some(ALayout::Rows { stride: rs }),
                (1, cs) => Some(ALayout::Panel { step: cs }),
                _ => None,
            };
            for ic in (0..m).step_by(MC) {
                let mc = MC.min(m - ic);
                let m_panels = mc.div_ceil(MR);
                if in_place.is_none() {
                    ap.resize(m_panels * kc * MR, 0.0);
                    pack_a(lhs, ic, mc, pc, kc, ap);
                }
                for (jp, packed) in bp.chunks_exact(kc * NR).enumerate() {
                    let (j0, cols) = (jp * NR, NR.min(n - jp * NR));
                    let (bpanel, ldb) = if direct && cols == NR {
                        (&rhs.data[pc * rhs.row_stride + j0..], rhs.row_stride)
                    } else {
                        (packed, NR)
                    };
                    for ip in 0..m_panels {
                        let (i0, rows) = (ic + ip * MR, MR.min(mc - ip * MR));
                        let (apanel, layout) = match in_place {
                            Some(layout) => (&lhs.data[i0 * lhs.row_stride + pc * lhs.col_stride..], layout),
                            None => (&ap[ip * kc * MR..][..kc * MR], ALayout::Panel { step: MR }),
                        };
                        // Straight from the registers into C.
                        let merge = match (pc, alpha) {
                            (0, None) => Merge::Overwrite(beta),
                            (0, Some(a)) => Merge::Scale(a, beta),
                            _ => Merge::Add(beta),
                        };
                        let c = &mut dst[i0 * n + j0..];
                        microkernel::tile_into(kc, rows, cols, apanel, layout, bpanel, ldb, c, n, merge);
                    }
                }
            }
        }
    });
}

/// Whether [`dot`] suits the product: a few rows of a row-major A times a B whose columns are
/// contiguous rows (a transposed row-major matrix), with a long inner dimension.
pub(super) fn dot_suits(lhs: MatRef<'_>, rhs: MatRef<'_>) -> bool {
    lhs.col_stride == 1 && rhs.row_stride == 1 && lhs.rows <= 2 * MR && lhs.cols >= 64
}

/// The same product as [`sgemm`] by dot tiles (see [`microkernel::dot_tile`]): neither operand
/// is packed, each row of B is read once per 8 rows of A.
pub(super) fn dot(dst: &mut [f32], lhs: MatRef<'_>, rhs: MatRef<'_>, alpha: Option<f32>, beta: f32) {
    use microkernel::DOT_COLS;
    let (m, n, k) = (lhs.rows, rhs.cols, lhs.cols);
    for i0 in (0..m).step_by(MR) {
        let rows = MR.min(m - i0);
        let a = &lhs.data[i0 * lhs.row_stride..];
        for j0 in (0..n).step_by(DOT_COLS) {
            let cols = DOT_COLS.min(n - j0);
            // Missing columns repeat the last real one; their results are dropped.
            let js = std::array::from_fn(|c| j0 + c.min(cols - 1));
            let mut tile = [[0.0f32; DOT_COLS]; MR];
            microkernel::dot_tile(k, rows, a, lhs.row_stride, rhs.data, rhs.col_stride, js, &mut tile);
            for (r, t) in tile.iter().enumerate().take(rows) {
                for (c, &t) in t.iter().enumerate().take(cols) {
                    let d = &mut dst[(i0 + r) * n + j0 + c];
                    *d = match alpha {
                        None => beta * t,
                        Some(a) => a * *d + beta * t,
                    };
                }
            }
        }
    }
}

/// Packs rows `pc..pc + kc` of `rhs` into 32-column panels: panel `jp`, step `p`, lane `c`
/// holds `rhs[pc + p][jp * 32 + c]` (zero past the last column).
fn pack_b(rhs: MatRef<'_>, pc: usize, kc: usize, bp: &mut [f32]) {
    for (jp, panel) in bp.chunks_exact_mut(kc * NR).enumerate() {
        pack_b_panel(rhs, pc, kc, jp, panel);
    }
}

/// Packs panel `jp` of [`pack_b`].
fn pack_b_panel(rhs: MatRef<'_>, pc: usize, kc: usize, jp: usize, panel: &mut [f32]) {
    let n = rhs.cols;
    {
        let (j0, cols) = (jp * NR, NR.min(n - jp * NR));
        if rhs.col_stride == 1 {
            for (p, dst) in panel.chunks_exact_mut(NR).enumerate() {
                let start = (pc + p) * rhs.row_stride + j0;
                if cols == NR {
                    let src: &[f32; NR] = rhs.data[start..start + NR].try_into().expect("NR values");
                    dst.copy_from_slice(src);
                } else {
                    dst[..cols].copy_from_slice(&rhs.data[start..start + cols]);
                    dst[cols..].fill(0.0);
                }
            }
        } else if rhs.row_stride == 1 {
            // B is a transposed row-major matrix: read its rows (our columns) contiguously.
            if cols < NR {
                panel.fill(0.0);
            }
            for c in 0..cols {
                let src = &rhs.data[(j0 + c) * rhs.col_stride + pc..][..kc];
                for (p, &v) in src.iter().enumerate() {
                    panel[p * NR + c] = v;
                }
            }
        } else {
            for (p, dst) in panel.chunks_exact_mut(NR).enumerate() {
                for (c, d) in dst.iter_mut().enumerate() {
                    *d = if c < cols { rhs.data[(pc + p) * rhs.row_stride + (j0 + c) * rhs.col_stride] } else { 0.0 };
                }
            }
        }
    }
}

/// Packs rows `ic..ic + mc`, columns `pc..pc + kc` of `lhs` into 8-row panels: panel `ip`,
/// step `p`, lane `r` holds `lhs[ic + ip * 8 + r][pc + p]` (lanes past the last row unused).
fn pack_a(lhs: MatRef<'_>, ic: usize, mc: usize, pc: usize, kc: usize, ap: &mut [f32]) {
    for (ip, panel) in ap.chunks_exact_mut(kc * MR).enumerate() {
        let (i0, rows) = (ic + ip * MR, MR.min(mc - ip * MR));
        if lhs.col_stride == 1 {
            for r in 0..rows {
                let src = &lhs.data[(i0 + r) * lhs.row_stride + pc..][..kc];
                for (p, &v) in src.iter().enumerate() {
                    panel[p * MR + r] = v;
                }
            }
        } else if lhs.row_stride == 1 {
            for (p, dst) in panel.chunks_exact_mut(MR).enumerate() {
                let start = (pc + p) * lhs.col_stride + i0;
                // Element by element: a memcpy call per 8 floats costs more than the copy.
                dst.iter_mut().zip(&lhs.data[start..start + rows]).for_each(|(d, s)| *d = *s);
            }
        } else {
            for (p, dst) in panel.chunks_exact_mut(MR).enumerate() {
                for (r, d) in dst.iter_mut().take(rows).enumerate() {
                    *d = lhs.data[(i0 + r) * lhs.row_stride + (pc + p) * lhs.col_stride];
                }
            }
        }
    }
}
