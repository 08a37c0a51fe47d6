"""PyTorch CUDA reference for Fedge's GPU path (simulations/bench/gpu/run.sh).

For McMahan et al.'s MNIST CNN and 2NN at each batch size: the first step of a fresh model in
this process (the first measurement also pays CUDA's and cuDNN's start-up) and the steady
milliseconds per SGD step (forward, cross-entropy, backward, update, then a synchronisation, as
Fedge reads its loss back every step). With --devices: N models trained one after another,
E steps each (PyTorch's one-device-at-a-time rate, the baseline of devices per launch).
One JSON line per figure.
"""
import argparse, json, time
import torch
import torch.nn as nn


def cnn():
    return nn.Sequential(nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(3136, 512), nn.ReLU(), nn.Linear(512, 10))


def two_nn():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(),
                         nn.Linear(200, 10))


def step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return float(loss.detach())  # a synchronisation, as Fedge's loss read-back


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="cnn,2nn")
    ap.add_argument("--batches", default="10,64,256")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--devices", default="1,8,64", help="models trained one after another")
    ap.add_argument("--device-steps", type=int, default=20, help="steps per device (batch 10)")
    a = ap.parse_args()
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(0)
    first_in_process = True
    for m in a.models.split(","):
        for b in (int(v) for v in a.batches.split(",")):
            torch.manual_seed(0)
            x = torch.rand(b, 1, 28, 28, device=dev)
            y = torch.randint(0, 10, (b,), device=dev)
            t0 = time.perf_counter()
            model = (cnn() if m == "cnn" else two_nn()).to(dev)
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            step(model, opt, x, y)
            first = (time.perf_counter() - t0) * 1e3
            times = []
            for _ in range(a.repeat):
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    step(model, opt, x, y)
                times.append((time.perf_counter() - t0) * 1e3 / a.steps)
            per = sorted(times)[len(times) // 2]
            print(json.dumps({"system": f"torch {torch.__version__} cuda ({name})", "model": m, "batch": b,
                              "process_first": first_in_process, "first_step_ms": round(first, 3),
                              "ms_per_step": round(per, 4), "samples_per_s": round(b * 1e3 / per, 1)}), flush=True)
            first_in_process = False
    for m in a.models.split(","):
        for n in (int(v) for v in a.devices.split(",")):
            x = torch.rand(10, 1, 28, 28, device=dev)
            y = torch.randint(0, 10, (10,), device=dev)
            t0 = time.perf_counter()
            for _ in range(n):
                model = (cnn() if m == "cnn" else two_nn()).to(dev)
                opt = torch.optim.SGD(model.parameters(), lr=0.01)
                for _ in range(a.device_steps):
                    step(model, opt, x, y)
            secs = time.perf_counter() - t0
            print(json.dumps({"system": f"torch {torch.__version__} cuda ({name})", "model": m, "devices": n,
                              "one_at_a_time": True, "steps_per_device": a.device_steps,
                              "samples_per_s": round(n * a.device_steps * 10 / secs, 1)}), flush=True)


if __name__ == "__main__":
    main()
