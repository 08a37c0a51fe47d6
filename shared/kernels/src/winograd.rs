//! Winograd minimal filtering F(2x2, 5x5) (Lavin & Gray 2016) for a 5x5, stride-1, "same"
//! convolution in NHWC: the transforms around the 36 GEMMs that replace one im2col GEMM, for
//! all three passes of a layer.
//!
//! Each 2x2 block of output pixels (a tile; `h` and `w` are even, so the tiles are exactly the
//! 2x2 pooling windows) is `Y = A^T [ (G g G^T) . (B^T d B) ] A` over the 6x6 input tile `d`
//! around it (zero outside the image) and the 5x5 kernel `g`, summed over input channels: per
//! tile position `xi` of the 6x6 transform domain that sum is one GEMM, tiles x `C_in` times
//! `C_in x C_out`. The multiplications in the GEMMs drop from 25 to 9 per output pixel (2.8x);
//! the transforms are a few additions per element, vectorised over the channels, which are
//! innermost everywhere:
//!
//! - transformed data ([`input_transform`], [`grad_transform`]): 36 matrices, `[xi][tile][c]`;
//! - GEMM results ([`output_transform`] reads them): the same layout with the output channels;
//! - transformed kernels ([`filter_transform`], [`filter_gradient`]): 36 matrices `[xi][ci][co]`,
//!   beside the weights' own layout, `[(ky * 5 + kx)][ci][co]`.
//!
//! The input gradient is the same "same" convolution of the output gradient with the kernel
//! turned 180 degrees and the channel roles swapped (the transformed kernel read transposed).
//! The weight gradient is the adjoint: `dg = G^T [ sum over tiles (A dY A^T) . (B^T d B) ] G`.
//!
//! The interpolation points are 0, 1, -1, 2, -2 and infinity: `B^T` and `A^T` are small
//! integers (exact in f32) and the f32 error stays a few 1e-6 of the magnitude (tested against
//! the im2col path in `net`). Every loop has a fixed order, so results are bit-for-bit
//! repeatable.

use crate::conv::Geometry;

/// Side of an input tile in the transform domain.
pub const ALPHA: usize = 6;
/// Positions of the transform domain (one GEMM each).
pub const POSITIONS: usize = ALPHA * ALPHA;
/// Kernel side handled.
const R: usize = 5;
/// Output tile side.
const M: usize = 2;

/// `B^T`: data into the transform domain (applied by `bt_rows`; the tests check it is this).
#[cfg(test)]
const BT: [[f32; ALPHA]; ALPHA] = [
    [4.0, 0.0, -5.0, 0.0, 1.0, 0.0],
    [0.0, -4.0, -4.0, 1.0, 1.0, 0.0],
    [0.0, 4.0, -4.0, -1.0, 1.0, 0.0],
    [0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
    [0.0, 2.0, -1.0, -2.0, 1.0, 0.0],
    [0.0, 4.0, 0.0, -5.0, 0.0, 1.0],
];

/// `G`: the kernel into the transform domain.
const G: [[f32; R]; ALPHA] = [
    [1.0 / 4.0, 0.0, 0.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0, 1.0 / 3.0, 2.0 / 3.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0, -1.0 / 3.0, 2.0 / 3.0],
    [0.0, 0.0, 0.0, 0.0, 1.0],
];

/// `A^T`: products back to the 2x2 output tile (applied by `at_rows` and, transposed,
/// `a_rows`; the tests check they are this).
#[cfg(test)]
const AT: [[f32; ALPHA]; M] = [[1.0, 1.0, 1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, 2.0, -2.0, 1.0]];

/// Which way a convolution layer computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConvAlgorithm {
    /// Whole-batch im2col and one GEMM per pass ([`crate::conv`]); every layer can.
    Im2col,
    /// Winograd F(2x2, 5x5) where [`applies`], im2col elsewhere.
    #[default]
    Winograd,
}

/// Fewest input channels for Winograd. The transforms cost per channel, what the GEMMs save
/// per channel pair, so a 1-channel input (the CNN's first layer) stays on im2col; the
/// threshold itself is a judgement, not a measurement (only the CNN's 32-channel layer was timed).
const MIN_CHANNELS: usize = 4;

/// Whether [`ConvAlgorithm::Winograd`] handles a layer of geometry `g` (5x5 kernel, even sides,
/// enough input channels).
pub fn applies(g: Geometry) -> bool {
    g.k == R && g.h.is_multiple_of(M) && g.w.is_multiple_of(M) && g.c >= MIN_CHANNELS
}

/// Tiles of one `h x w` image.
pub fn tiles(h: usize, w: usize) -> usize {
    (h / M) * (w / M)
}

/// Scratch floats the data transforms need for maps `w` wide with `c` channels.
pub fn scratch_len(w: usize, c: usize) -> usize {
    (ALPHA * (w + 4) + w).max(2 * ALPHA) * c
}

/// `dst = sum_j coefs[j] * src(j)`, terms with a zero coefficient skipped, in order of `j`.
#[inline(always)]
fn combine<'a>(dst: &mut [f32], coefs: &[f32], src: impl Fn(usize) -> &'a [f32]) {
    let len = dst.len();
    dst.fill(0.0);
    for (j, &k) in coefs.iter().enumerate() {
        if k != 0.0 {
            dst.iter_mut().zip(&src(j)[..len]).for_each(|(d, s)| *d += k * s);
        }
    }
}

/// `out[r] = (B^T x)[r]` elementwise over six equal-length vectors `x` (the matrix written
/// out with its shared terms: no multiplications by 0 or 1).
#[inline(always)]
fn bt_rows(x: [&[f32]; ALPHA], out: [&mut [f32]; ALPHA]) {
    let [o0, o1, o2, o3, o4, o5] = out;
    let n = o0.len();
    let (o1, o2, o3, o4, o5) = (&mut o1[..n], &mut o2[..n], &mut o3[..n], &mut o4[..n], &mut o5[..n]);
    let [x0, x1, x2, x3, x4, x5] = x.map(|v| &v[..n]);
    for i in 0..n {
        let (a, b) = (x4[i] - 4.0 * x2[i], x3[i] - 4.0 * x1[i]);
        let (c, e) = (x4[i] - x2[i], 2.0 * (x3[i] - x1[i]));
        o0[i] = 4.0 * x0[i] - 5.0 * x2[i] + x4[i];
        o1[i] = a + b;
        o2[i] = a - b;
        o3[i] = c + e;
        o4[i] = c - e;
        o5[i] = 4.0 * x1[i] - 5.0 * x3[i] + x5[i];
    }
}

/// `(y0, y1) = A^T x` elementwise over six equal-length vectors `x`.
#[inline(always)]
fn at_rows(x: [&[f32]; ALPHA], y0: &mut [f32], y1: &mut [f32]) {
    let n = y0.len();
    let y1 = &mut y1[..n];
    let [x0, x1, x2, x3, x4, x5] = x.map(|v| &v[..n]);
    for i in 0..n {
        y0[i] = x0[i] + (x1[i] + x2[i]) + (x3[i] + x4[i]);
        y1[i] = (x1[i] - x2[i]) + 2.0 * (x3[i] - x4[i]) + x5[i];
    }
}

/// `out = A (x0, x1)` elementwise: the six rows of `A` (`A^T` transposed) times two vectors.
#[inline(always)]
fn a_rows(x0: &[f32], x1: &[f32], out: [&mut [f32]; ALPHA]) {
    let [o0, o1, o2, o3, o4, o5] = out;
    let n = o0.len();
    let (o1, o2, o3, o4, o5) = (&mut o1[..n], &mut o2[..n], &mut o3[..n], &mut o4[..n], &mut o5[..n]);
    let (x0, x1) = (&x0[..n], &x1[..n]);
    for i in 0..n {
        o0[i] = x0[i];
        o1[i] = x0[i] + x1[i];
        o2[i] = x0[i] - x1[i];
        o3[i] = x0[i] + 2.0 * x1[i];
        o4[i] = x0[i] - 2.0 * x1[i];
        o5[i] = x1[i];
    }
}

/// The six `c`-long rows of `v` at `[(a * 6 + bx) * rows + t]` for `bx` in `0..6`: one tile's
/// row `a` of the transform domain, in the six GEMM operands.
#[inline(always)]
fn position_rows(v: &mut [f32], a: usize, rows: usize, t: usize, c: usize) -> [&mut [f32]; ALPHA] {
    let at = |bx: usize| ((a * ALPHA + bx) * rows + t) * c;
    v.get_disjoint_mut(std::array::from_fn::<_, ALPHA, _>(|bx| at(bx)..at(bx) + c))
        .expect("six distinct rows inside the buffer")
}

/// The six consecutive `len`-long pieces of `s`.
#[inline(always)]
fn six(s: &[f32], len: usize) -> [&[f32]; ALPHA] {
    std::array::from_fn(|j| &s[j * len..][..len])
}

/// The six consecutive `len`-long pieces of `s`, mutable.
#[inline(always)]
fn six_mut(s: &mut [f32], len: usize) -> [&mut [f32]; ALPHA] {
    let mut rest = &mut s[..ALPHA * len];
    std::array::from_fn(|_| {
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(len);
        rest = tail;
        head
    })
}

/// `v[xi][t][..c] = (B^T d_t B)[xi]` for every tile `t` of `batch` NHWC maps `h x w x c` in
/// `input` (tile `(b * h/2 + ty) * w/2 + tx`), `d_t` the 6x6 input around output pixels
/// `(2ty.., 2tx..)`, zero outside the map. `scratch`: [`scratch_len`]`(w, c)` floats.
pub fn input_transform(h: usize, w: usize, c: usize, batch: usize, input: &[f32], v: &mut [f32], scratch: &mut [f32]) {
    let (th, tw) = (h / M, w / M);
    let rows = batch * th * tw;
    let v = &mut v[..POSITIONS * rows * c];
    // `B^T d` along the columns is shared by the three tiles that overlap each column, so it is
    // computed once per tile row over the whole width, into rows padded with two zero columns
    // on each side (the tiles' reach past the map).
    let (run, line) = ((w + 4) * c, w * c);
    let (tmp, zeros) = scratch[..ALPHA * run + line].split_at_mut(ALPHA * run);
    tmp.fill(0.0);
    zeros.fill(0.0);
    for b in 0..batch {
        let image = &input[b * h * w * c..][..h * w * c];
        for ty in 0..th {
            let d: [&[f32]; ALPHA] = std::array::from_fn(|dy| match (2 * ty + dy).checked_sub(2) {
                Some(iy) if iy < h => &image[iy * line..][..line],
                _ => &zeros[..],
            });
            let out: [&mut [f32]; ALPHA] = six_mut(tmp, run).map(|r| &mut r[2 * c..][..line]);
            bt_rows(d, out);
            for tx in 0..tw {
                let t = (b * th + ty) * tw + tx;
                // Each row of the tile's B^T d (padded columns 2tx..2tx+6) times B.
                for a in 0..ALPHA {
                    bt_rows(six(&tmp[a * run + 2 * tx * c..], c), position_rows(v, a, rows, t, c));
                }
            }
        }
    }
}

/// `z[xi][t][..c] = (A dY_t A^T)[xi]` for every 2x2 tile `dY_t` of `batch` NHWC maps
/// `h x w x c` in `grad` (the weight gradient's transform of the output gradient).
/// `scratch`: [`scratch_len`]`(w, c)` floats.
pub fn grad_transform(h: usize, w: usize, c: usize, batch: usize, grad: &[f32], z: &mut [f32], scratch: &mut [f32]) {
    let (th, tw) = (h / M, w / M);
    let rows = batch * th * tw;
    let z = &mut z[..POSITIONS * rows * c];
    let tmp = &mut scratch[..ALPHA * M * c];
    for b in 0..batch {
        let map = &grad[b * h * w * c..][..h * w * c];
        for ty in 0..th {
            for tx in 0..tw {
                let t = (b * th + ty) * tw + tx;
                // A dY over the tile's two rows (two pixels each, contiguous), then each row of
                // that times A^T.
                let row = |i: usize| &map[((2 * ty + i) * w + 2 * tx) * c..][..M * c];
                a_rows(row(0), row(1), six_mut(tmp, M * c));
                for a in 0..ALPHA {
                    let r = &tmp[a * M * c..][..M * c];
                    let (x0, x1) = r.split_at(c);
                    a_rows(x0, x1, position_rows(z, a, rows, t, c));
                }
            }
        }
    }
}

/// The 2x2 output tiles `A^T m_t A` of the GEMM results `m` (`[xi][t][c]`, [`input_transform`]'s
/// tile order) into `batch` NHWC maps `h x w x c`: every element of `out` is written once.
/// `scratch`: [`scratch_len`]`(w, c)` floats.
pub fn output_transform(h: usize, w: usize, c: usize, batch: usize, m: &[f32], out: &mut [f32], scratch: &mut [f32]) {
    let (th, tw) = (h / M, w / M);
    let rows = batch * th * tw;
    let m = &m[..POSITIONS * rows * c];
    let tmp = &mut scratch[..M * ALPHA * c];
    for b in 0..batch {
        let map = &mut out[b * h * w * c..][..h * w * c];
        for ty in 0..th {
            for tx in 0..tw {
                let t = (b * th + ty) * tw + tx;
                // A^T m: column bx of the tile from the six operands' rows, into tmp[0..2][bx].
                let (t0, t1) = tmp.split_at_mut(ALPHA * c);
                for (bx, (y0, y1)) in t0.chunks_exact_mut(c).zip(t1.chunks_exact_mut(c)).enumerate() {
                    let x = std::array::from_fn(|a| &m[((a * ALPHA + bx) * rows + t) * c..][..c]);
                    at_rows(x, y0, y1);
                }
                // Then each of its two rows times A: two output pixels side by side.
                for i in 0..M {
                    let (y0, y1) = map[((2 * ty + i) * w + 2 * tx) * c..][..M * c].split_at_mut(c);
                    at_rows(six(&tmp[i * ALPHA * c..], c), y0, y1);
                }
            }
        }
    }
}

/// `u[xi] = (G g G^T)[xi]` for every channel pair at once: `weight` is `[(ky * 5 + kx)][n]`
/// (`n = C_in * C_out`, the layer's layout), `u` is `[xi][n]`. With `rotate`, `g` is the kernel
/// turned 180 degrees (`g[ky][kx] = weight[4 - ky][4 - kx]`, the input gradient's kernel).
/// `scratch`: [`filter_scratch_len`]`(n)` floats.
pub fn filter_transform(n: usize, weight: &[f32], rotate: bool, u: &mut [f32], scratch: &mut [f32]) {
    let tap = |ky: usize, kx: usize| {
        let (ky, kx) = if rotate { (R - 1 - ky, R - 1 - kx) } else { (ky, kx) };
        &weight[(ky * R + kx) * n..][..n]
    };
    let tmp = &mut scratch[..ALPHA * R * n];
    // tmp[a][kx] = sum_ky G[a][ky] g[ky][kx]
    for a in 0..ALPHA {
        for kx in 0..R {
            combine(&mut tmp[(a * R + kx) * n..][..n], &G[a], |ky| tap(ky, kx));
        }
    }
    // u[a][bx] = sum_kx tmp[a][kx] G[bx][kx]
    for a in 0..ALPHA {
        for (bx, coefs) in G.iter().enumerate() {
            combine(&mut u[(a * ALPHA + bx) * n..][..n], coefs, |kx| &tmp[(a * R + kx) * n..][..n]);
        }
    }
}

/// Scratch floats [`filter_transform`] and [`filter_gradient`] need for `n` channel pairs.
pub fn filter_scratch_len(n: usize) -> usize {
    ALPHA * R * n
}

/// The adjoint of [`filter_transform`] (unrotated), scaled into the weights:
/// `weight[ky][kx] += scale * (G^T du G)[ky][kx]`, `du` in [`filter_transform`]'s layout.
/// With `scale = -lr` that is the SGD update from the transform-domain gradient.
pub fn filter_gradient(n: usize, du: &[f32], scale: f32, weight: &mut [f32], scratch: &mut [f32]) {
    let tmp = &mut scratch[..ALPHA * R * n];
    let g_col = |k: usize| std::array::from_fn::<f32, ALPHA, _>(|a| G[a][k]); // column k of G
    // tmp[a][kx] = sum_bx du[a][bx] G[bx][kx]
    for a in 0..ALPHA {
        for kx in 0..R {
            combine(&mut tmp[(a * R + kx) * n..][..n], &g_col(kx), |bx| &du[(a * ALPHA + bx) * n..][..n]);
        }
    }
    // weight[ky][kx] += scale * sum_a G[a][ky] tmp[a][kx]
    for ky in 0..R {
        let coefs = g_col(ky);
        for kx in 0..R {
            let dst = &mut weight[(ky * R + kx) * n..][..n];
            let mut acc = [0.0f32; 64];
            for start in (0..n).step_by(acc.len()) {
                let len = acc.len().min(n - start);
                let acc = &mut acc[..len];
                combine(acc, &coefs, |a| &tmp[(a * R + kx) * n + start..][..len]);
                dst[start..start + len].iter_mut().zip(acc.iter()).for_each(|(w, g)| *w += scale * g);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// "Same" 5x5 correlation of one channel by definition, in f64.
    fn direct(h: usize, w: usize, x: &[f64], g: &[f64]) -> Vec<f64> {
        let mut y = vec![0.0; h * w];
        for oy in 0..h {
            for ox in 0..w {
                for ky in 0..R {
                    for kx in 0..R {
                        let (iy, ix) = ((oy + ky) as isize - 2, (ox + kx) as isize - 2);
                        if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                            y[oy * w + ox] += g[ky * R + kx] * x[iy as usize * w + ix as usize];
                        }
                    }
                }
            }
        }
        y
    }

    #[test]
    fn one_channel_pair_matches_the_definition() {
        // c = 1 in and out: the GEMMs are scalar products per position.
        let (h, w) = (6, 8);
        let x: Vec<f32> = (0..h * w).map(|i| (i as f32 * 0.71).sin()).collect();
        let g: Vec<f32> = (0..R * R).map(|i| (i as f32 * 0.37).cos()).collect();
        let rows = tiles(h, w);
        let (mut v, mut u, mut y) = (vec![f32::NAN; POSITIONS * rows], vec![0.0; POSITIONS], vec![f32::NAN; h * w]);
        let mut scratch = vec![0.0; scratch_len(w, 1).max(filter_scratch_len(1))];
        input_transform(h, w, 1, 1, &x, &mut v, &mut scratch);
        filter_transform(1, &g, false, &mut u, &mut scratch);
        let m: Vec<f32> = (0..POSITIONS * rows).map(|i| v[i] * u[i / rows]).collect();
        output_transform(h, w, 1, 1, &m, &mut y, &mut scratch);
        let want = direct(
            h,
            w,
            &x.iter().map(|&v| v as f64).collect::<Vec<_>>(),
            &g.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        );
        for (i, (a, b)) in y.iter().zip(&want).enumerate() {
            assert!((*a as f64 - b).abs() < 1e-5, "{i}: {a} vs {b}");
        }
    }

    #[test]
    fn the_written_out_transforms_are_the_matrices() {
        let x: Vec<Vec<f32>> = (0..ALPHA).map(|j| (0..3).map(|i| ((j * 3 + i) as f32 * 0.9).sin()).collect()).collect();
        let xs: [&[f32]; ALPHA] = std::array::from_fn(|j| &x[j][..]);
        let mut out = vec![vec![0.0f32; 3]; ALPHA];
        let (o0, rest) = out.split_at_mut(1);
        let (o1, rest) = rest.split_at_mut(1);
        let (o2, rest) = rest.split_at_mut(1);
        let (o3, rest) = rest.split_at_mut(1);
        let (o4, o5) = rest.split_at_mut(1);
        bt_rows(xs, [&mut o0[0], &mut o1[0], &mut o2[0], &mut o3[0], &mut o4[0], &mut o5[0]]);
        let close = |a: f32, b: f32| (a - b).abs() <= 1e-5 * (1.0 + b.abs());
        for r in 0..ALPHA {
            for i in 0..3 {
                let want: f32 = (0..ALPHA).map(|j| BT[r][j] * x[j][i]).sum();
                assert!(close(out[r][i], want), "B^T row {r}");
            }
        }
        let (mut y0, mut y1) = (vec![0.0f32; 3], vec![0.0f32; 3]);
        at_rows(xs, &mut y0, &mut y1);
        for i in 0..3 {
            for (r, y) in [&y0, &y1].into_iter().enumerate() {
                let want: f32 = (0..ALPHA).map(|j| AT[r][j] * x[j][i]).sum();
                assert!(close(y[i], want), "A^T row {r}");
            }
        }
        let mut flat = vec![0.0f32; ALPHA * 3];
        a_rows(&x[0], &x[1], six_mut(&mut flat, 3));
        for r in 0..ALPHA {
            for i in 0..3 {
                let want = AT[0][r] * x[0][i] + AT[1][r] * x[1][i];
                assert!(close(flat[r * 3 + i], want), "A row {r}");
            }
        }
    }

    #[test]
    fn the_filter_gradient_is_the_transforms_adjoint() {
        // <filter_transform(g), du> == <g, filter_gradient(du)> for any du.
        let n = 3;
        let g: Vec<f32> = (0..R * R * n).map(|i| (i as f32 * 0.3).sin()).collect();
        let du: Vec<f32> = (0..POSITIONS * n).map(|i| (i as f32 * 0.17).cos()).collect();
        let mut scratch = vec![0.0; filter_scratch_len(n)];
        let mut u = vec![0.0; POSITIONS * n];
        filter_transform(n, &g, false, &mut u, &mut scratch);
        let mut back = vec![0.0; R * R * n];
        filter_gradient(n, &du, 1.0, &mut back, &mut scratch);
        let lhs: f64 = u.iter().zip(&du).map(|(a, b)| *a as f64 * *b as f64).sum();
        let rhs: f64 = g.iter().zip(&back).map(|(a, b)| *a as f64 * *b as f64).sum();
        assert!((lhs - rhs).abs() < 1e-5 * lhs.abs().max(1.0), "{lhs} vs {rhs}");
    }
}
