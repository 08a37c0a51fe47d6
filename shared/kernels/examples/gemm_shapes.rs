//! GFLOP/s of the GEMM shapes a CNN step at batch 10 runs, `fedge_kernels::gemm::matmul` beside
//! matrixmultiply (ndarray's GEMM) on the same operands: a profiling aid.
//! `cargo run -p fedge-kernels --example gemm_shapes`
use fedge_kernels::Threads;
use fedge_kernels::gemm::{Accumulate, MatMut, MatRef, matmul};
use std::time::Instant;

fn main() {
    // (name, m, n, k, lhs transposed, rhs transposed)
    let shapes = [
        ("square", 1024, 1024, 1024, false, false),
        ("conv2 fwd T", 64, 1960, 800, false, false),
        ("conv2 fwd n128", 1960, 128, 800, false, false),
        ("conv2 fwd k200", 1960, 64, 200, false, false),
        ("conv1 fwd", 7840, 32, 25, false, false),
        ("conv2 fwd", 1960, 64, 800, false, false),
        ("fc1 fwd", 10, 512, 3136, false, false),
        ("conv2 dcols", 1960, 800, 64, false, true),
        ("conv2 dW", 800, 64, 1960, true, false),
        ("conv1 dW", 25, 32, 7840, true, false),
        ("fc1 dX", 10, 3136, 512, false, true),
        ("fc1 dW", 3136, 512, 10, true, false),
    ];
    for (name, m, n, k, ta, tb) in shapes {
        let a = vec![0.5f32; m * k];
        let b = vec![0.25f32; k * n];
        let mut d = vec![0.0f32; m * n];
        let run = |d: &mut Vec<f32>| {
            let lhs = if ta { MatRef::new(&a, k, m).t() } else { MatRef::new(&a, m, k) };
            let rhs = if tb { MatRef::new(&b, n, k).t() } else { MatRef::new(&b, k, n) };
            matmul(MatMut::new(d, m, n), lhs, rhs, Accumulate::Scaled(1.0), -0.01, Threads::One).unwrap();
        };
        for _ in 0..3 {
            run(&mut d);
        }
        let reps = 50;
        let t = Instant::now();
        for _ in 0..reps {
            run(&mut d);
        }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        let mm = |d: &mut Vec<f32>| {
            let (rsa, csa) = if ta { (1, m as isize) } else { (k as isize, 1) };
            let (rsb, csb) = if tb { (1, k as isize) } else { (n as isize, 1) };
            #[allow(unsafe_code)]
            // SAFETY: dense buffers of the right sizes.
            unsafe {
                matrixmultiply::sgemm(
                    m,
                    k,
                    n,
                    -0.01,
                    a.as_ptr(),
                    rsa,
                    csa,
                    b.as_ptr(),
                    rsb,
                    csb,
                    1.0,
                    d.as_mut_ptr(),
                    n as isize,
                    1,
                )
            }
        };
        for _ in 0..3 {
            mm(&mut d);
        }
        let t = Instant::now();
        for _ in 0..reps {
            mm(&mut d);
        }
        let s2 = t.elapsed().as_secs_f64() / reps as f64;
        println!(
            "{name:12} {m:5}x{n:5}x{k:5}  fedge {:8.3} ms {:6.1} GFLOP/s   matrixmultiply {:8.3} ms {:6.1} GFLOP/s",
            s * 1e3,
            2.0 * (m * n * k) as f64 / s / 1e9,
            s2 * 1e3,
            2.0 * (m * n * k) as f64 / s2 / 1e9
        );
    }
}
