//! The data movement around a convolution as a GEMM, in NHWC: whole-batch `im2col` and its
//! adjoint `col2im` for a `k x k` kernel, stride 1, "same" zero padding; 2x2 max-pooling with
//! the winner remembered, and its adjoint.
//!
//! Column layout: row `(b * h + y) * w + x` of the column matrix holds the receptive field of
//! output pixel `(b, y, x)`, entry `(ky * k + kx) * c + ci`. For a fixed `ky` the `k * c` entries
//! are one contiguous run of the input row (NHWC), so both directions move whole runs.

/// Geometry of one "same" convolution layer's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Input channels.
    pub c: usize,
    /// Kernel side (odd).
    pub k: usize,
}

impl Geometry {
    /// Columns of the column matrix: `k * k * c`.
    pub fn patch(&self) -> usize {
        self.k * self.k * self.c
    }

    /// Elements of one image.
    pub fn image(&self) -> usize {
        self.h * self.w * self.c
    }

    /// For output row `y` (or column), the kernel offsets `ko` whose input coordinate
    /// `y + ko - pad` lies inside `0..len`: `(first ko, input start, count)`.
    fn span(len: usize, pos: usize, k: usize) -> (usize, usize, usize) {
        let pad = k / 2;
        let first = pad.saturating_sub(pos);
        let last = (len + pad - pos).min(k); // exclusive
        (first, pos + first - pad, last.saturating_sub(first))
    }
}

/// Fills `cols` (`batch * h * w` rows of `patch()` columns) from `input` (`batch` NHWC images).
pub fn im2col(g: Geometry, batch: usize, input: &[f32], cols: &mut [f32]) {
    let (patch, run) = (g.patch(), g.k * g.c);
    let cols = &mut cols[..batch * g.h * g.w * patch];
    for (b, image) in input.chunks_exact(g.image()).take(batch).enumerate() {
        for y in 0..g.h {
            let (ky0, iy0, ny) = Geometry::span(g.h, y, g.k);
            for x in 0..g.w {
                let row = &mut cols[((b * g.h + y) * g.w + x) * patch..][..patch];
                let (kx0, ix0, nx) = Geometry::span(g.w, x, g.k);
                if ny < g.k || nx < g.k {
                    row.fill(0.0);
                }
                for dy in 0..ny {
                    let src = &image[((iy0 + dy) * g.w + ix0) * g.c..][..nx * g.c];
                    let dst = &mut row[(ky0 + dy) * run + kx0 * g.c..][..nx * g.c];
                    if src.len() >= 32 {
                        dst.copy_from_slice(src);
                    } else {
                        dst.iter_mut().zip(src).for_each(|(d, s)| *d = *s);
                    }
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: `input_grad` (`batch` NHWC images) = sum over every place each
/// input element was copied to of `cols_grad` there. Overwrites `input_grad`.
pub fn col2im(g: Geometry, batch: usize, cols_grad: &[f32], input_grad: &mut [f32]) {
    let (patch, run) = (g.patch(), g.k * g.c);
    let input_grad = &mut input_grad[..batch * g.image()];
    input_grad.fill(0.0);
    for (b, image) in input_grad.chunks_exact_mut(g.image()).enumerate() {
        for y in 0..g.h {
            let (ky0, iy0, ny) = Geometry::span(g.h, y, g.k);
            for x in 0..g.w {
                let row = &cols_grad[((b * g.h + y) * g.w + x) * patch..][..patch];
                let (kx0, ix0, nx) = Geometry::span(g.w, x, g.k);
                for dy in 0..ny {
                    let dst = &mut image[((iy0 + dy) * g.w + ix0) * g.c..][..nx * g.c];
                    let src = &row[(ky0 + dy) * run + kx0 * g.c..][..nx * g.c];
                    dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
                }
            }
        }
    }
}

/// Marks a pooled output whose maximum was not positive: ReLU passes no gradient back to it.
pub const DEAD: u8 = 4;

/// Bias, ReLU, then 2x2 max-pooling (stride 2) of `batch` NHWC maps `h x w x c` (even `h`, `w`):
/// `out[b, y, x, ch] = max(0, bias[ch] + max of the 2x2 window)` (the bias is per channel, so it
/// is added once after the maximum), and `winner` records which of the four (0..4, row-major in
/// the window) was the maximum, or [`DEAD`] when the result was not positive.
#[allow(clippy::too_many_arguments, reason = "one fused pass over plain slices")]
pub fn relu_pool(
    h: usize,
    w: usize,
    c: usize,
    batch: usize,
    input: &[f32],
    bias: &[f32],
    out: &mut [f32],
    winner: &mut [u8],
) {
    let (oh, ow) = (h / 2, w / 2);
    for b in 0..batch {
        for oy in 0..oh {
            for ox in 0..ow {
                let o = ((b * oh + oy) * ow + ox) * c;
                let at = |dy: usize, dx: usize| ((b * h + 2 * oy + dy) * w + 2 * ox + dx) * c;
                let (t0, t1, t2, t3) = (
                    &input[at(0, 0)..][..c],
                    &input[at(0, 1)..][..c],
                    &input[at(1, 0)..][..c],
                    &input[at(1, 1)..][..c],
                );
                let (out, winner, bias) = (&mut out[o..o + c], &mut winner[o..o + c], &bias[..c]);
                // Branch-free selects over whole channel runs, so the loop vectorises.
                for ch in 0..c {
                    let (mut m, mut win) = (t0[ch], 0u8);
                    win = if t1[ch] > m { 1 } else { win };
                    m = if t1[ch] > m { t1[ch] } else { m };
                    win = if t2[ch] > m { 2 } else { win };
                    m = if t2[ch] > m { t2[ch] } else { m };
                    win = if t3[ch] > m { 3 } else { win };
                    m = if t3[ch] > m { t3[ch] } else { m };
                    let v = m + bias[ch];
                    out[ch] = if v > 0.0 { v } else { 0.0 };
                    winner[ch] = if v > 0.0 { win } else { DEAD };
                }
            }
        }
    }
}

/// The adjoint of [`relu_pool`]: `input_grad` (`batch x h x w x c`, overwritten) is zero except
/// at each window's winner, which receives the pooled output's gradient.
pub fn relu_pool_backward(
    h: usize,
    w: usize,
    c: usize,
    batch: usize,
    out_grad: &[f32],
    winner: &[u8],
    input_grad: &mut [f32],
) {
    let (oh, ow) = (h / 2, w / 2);
    input_grad[..batch * h * w * c].fill(0.0);
    for b in 0..batch {
        for oy in 0..oh {
            for ox in 0..ow {
                let o = ((b * oh + oy) * ow + ox) * c;
                for ch in 0..c {
                    let t = winner[o + ch] as usize;
                    if t < DEAD as usize {
                        let (dy, dx) = (t / 2, t % 2);
                        input_grad[((b * h + 2 * oy + dy) * w + 2 * ox + dx) * c + ch] = out_grad[o + ch];
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// im2col by definition, one element at a time.
    fn im2col_naive(g: Geometry, batch: usize, input: &[f32]) -> Vec<f32> {
        let pad = g.k as isize / 2;
        let mut cols = vec![0.0; batch * g.h * g.w * g.patch()];
        for b in 0..batch {
            for y in 0..g.h {
                for x in 0..g.w {
                    for ky in 0..g.k {
                        for kx in 0..g.k {
                            let (iy, ix) = (y as isize + ky as isize - pad, x as isize + kx as isize - pad);
                            if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
                                continue;
                            }
                            for c in 0..g.c {
                                cols[((b * g.h + y) * g.w + x) * g.patch() + (ky * g.k + kx) * g.c + c] =
                                    input[((b * g.h + iy as usize) * g.w + ix as usize) * g.c + c];
                            }
                        }
                    }
                }
            }
        }
        cols
    }

    #[test]
    fn im2col_matches_the_definition_and_col2im_is_its_adjoint() {
        for g in [
            Geometry { h: 28, w: 28, c: 1, k: 5 },
            Geometry { h: 14, w: 14, c: 3, k: 5 },
            Geometry { h: 3, w: 5, c: 2, k: 5 },
            Geometry { h: 4, w: 4, c: 2, k: 3 },
        ] {
            let batch = 2;
            let input: Vec<f32> = (0..batch * g.image()).map(|i| (i as f32 * 0.37).sin()).collect();
            let mut cols = vec![f32::NAN; batch * g.h * g.w * g.patch()];
            im2col(g, batch, &input, &mut cols);
            assert_eq!(cols, im2col_naive(g, batch, &input), "{g:?}");
            // <im2col(x), y> == <x, col2im(y)> for any y.
            let y: Vec<f32> = (0..cols.len()).map(|i| (i as f32 * 0.11).cos()).collect();
            let mut back = vec![f32::NAN; input.len()];
            col2im(g, batch, &y, &mut back);
            let lhs: f64 = cols.iter().zip(&y).map(|(a, b)| *a as f64 * *b as f64).sum();
            let rhs: f64 = input.iter().zip(&back).map(|(a, b)| *a as f64 * *b as f64).sum();
            let scale: f64 = cols.iter().zip(&y).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
            assert!((lhs - rhs).abs() < 1e-6 * scale, "{g:?}: {lhs} vs {rhs}");
        }
    }

    #[test]
    fn pooling_takes_the_positive_maximum_and_routes_its_gradient() {
        // One 4x4 map with 1 channel, batch 1.
        let input = [1.0, 5.0, -1.0, -2.0, 3.0, 2.0, -3.0, -0.5, 0.0, 0.0, 7.0, 1.0, 0.0, 0.0, 2.0, 8.0];
        let (mut out, mut win) = ([0.0; 4], [0u8; 4]);
        relu_pool(4, 4, 1, 1, &input, &[-1.0], &mut out, &mut win);
        assert_eq!(out, [4.0, 0.0, 0.0, 7.0]);
        assert_eq!(win, [1, DEAD, DEAD, 3]);
        let mut grad = [f32::NAN; 16];
        relu_pool_backward(4, 4, 1, 1, &[10.0, 20.0, 30.0, 40.0], &win, &mut grad);
        let mut want = [0.0; 16];
        want[1] = 10.0;
        want[15] = 40.0;
        assert_eq!(grad, want);
    }
}
