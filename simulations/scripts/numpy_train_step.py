"""Baseline for `cargo bench -p fedge-learn --bench train_step`: the same 2NN step (784-200-200-10,
ReLU, softmax cross-entropy, plain SGD, minibatch 10) written directly in numpy, timed the same
way (10 steps over 100 examples). Usage: python3 numpy_train_step.py [repeats]"""
import sys, time
import numpy as np

rng = np.random.default_rng(0)
X = rng.standard_normal((100, 784)).astype(np.float32)
Y = rng.integers(0, 10, 100)


def lin(i, o):
    b = 1 / np.sqrt(i)
    return [rng.uniform(-b, b, (i, o)).astype(np.float32), rng.uniform(-b, b, o).astype(np.float32)]


W = [lin(784, 200), lin(200, 200), lin(200, 10)]


def epoch(lr=0.01):
    for s in range(0, 100, 10):
        x, y = X[s:s + 10], Y[s:s + 10]
        h1 = np.maximum(x @ W[0][0] + W[0][1], 0)
        h2 = np.maximum(h1 @ W[1][0] + W[1][1], 0)
        z = h2 @ W[2][0] + W[2][1]
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g = p
        g[np.arange(len(y)), y] -= 1
        g /= len(y)
        grads = []
        for i, h in ((2, h2), (1, h1), (0, x)):
            grads.append((h.T @ g, g.sum(0)))
            if i:
                g = (g @ W[i][0].T) * (h > 0)
        for (w, b), (gw, gb) in zip(W, reversed(grads)):
            w -= lr * gw
            b -= lr * gb


repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 300
for _ in range(20):
    epoch()
times = []
for _ in range(repeats):
    t = time.perf_counter()
    epoch()
    times.append(time.perf_counter() - t)
times.sort()
print(f"numpy 2nn 10 steps b10: median {times[len(times) // 2] * 1e3:.3f} ms")
