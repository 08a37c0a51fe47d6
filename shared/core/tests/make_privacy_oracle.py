#!/usr/bin/env python3
"""Records reference values from Google's dp-accounting for fedge-core's privacy tests.

Run from the repository root:
    python3 -m venv /tmp/dpvenv && /tmp/dpvenv/bin/pip install dp-accounting==0.6.0
    /tmp/dpvenv/bin/python shared/core/tests/make_privacy_oracle.py > shared/core/tests/data/privacy_oracle.json

The Rust test `privacy_oracle.rs` reads the JSON and requires agreement to 1e-6 relative.
Orders where dp-accounting's fractional series does not converge are recorded as null
(dp-accounting then skips them; so must we).
"""
import json
import math
import sys
import warnings

import dp_accounting
from dp_accounting.rdp import rdp_privacy_accountant as rdp

warnings.filterwarnings("ignore")
import logging  # noqa: E402

logging.getLogger("absl").setLevel(logging.ERROR)


def fin(x):
    x = float(x)
    return x if math.isfinite(x) else None


QS = [1e-4, 1e-3, 0.01, 0.05, 0.1, 0.3, 0.5, 0.9, 1.0]
ZS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 4.0, 10.0]
STEPS = [1, 10, 100, 1000, 10000]
DELTAS = [1e-3, 1e-5, 1e-8]
CUSTOM_ORDERS = [1.25, 1.75, 2.0, 2.75, 3.5, 5.5, 8.0, 12.5, 20.0, 33.3, 64.0, 100.5, 200.0]


def accountant_eps(events, delta, orders=None):
    acc = rdp.RdpAccountant(orders) if orders else rdp.RdpAccountant()
    for q, z, steps in events:
        acc.compose(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps
        )
    eps, order = acc.get_epsilon_and_optimal_order(delta)
    return fin(eps), float(order)


out = {
    "source": f"dp-accounting {dp_accounting.__version__ if hasattr(dp_accounting, '__version__') else '0.6.0'}",
    "default_orders": [float(o) for o in rdp.DEFAULT_RDP_ORDERS],
    "rdp": [],
    "epsilon": [],
    "heterogeneous": [],
    "custom_orders": [],
    "calibrate": [],
    "analytic_gaussian": [],
}

for q in QS:
    for z in ZS:
        r = rdp._compute_rdp_poisson_subsampled_gaussian(q, z, rdp.DEFAULT_RDP_ORDERS)
        out["rdp"].append({"q": q, "z": z, "rdp": [fin(x) for x in r]})
        for steps in STEPS:
            for delta in DELTAS:
                eps, order = accountant_eps([(q, z, steps)], delta)
                out["epsilon"].append(
                    {"q": q, "z": z, "steps": steps, "delta": delta, "epsilon": eps, "order": order}
                )

HETERO = [
    [(0.01, 1.0, 100), (0.05, 2.0, 50)],
    [(0.1, 0.8, 10), (0.001, 0.5, 1000), (1.0, 10.0, 3)],
    [(0.3, 1.5, 20), (0.3, 3.0, 20), (0.02, 1.1, 500)],
    [(0.0001, 0.3, 10000), (0.5, 4.0, 7)],
]
for events in HETERO:
    for delta in DELTAS:
        eps, order = accountant_eps(events, delta)
        out["heterogeneous"].append(
            {"events": [list(e) for e in events], "delta": delta, "epsilon": eps, "order": order}
        )

for q, z, steps in [(0.01, 1.1, 1000), (0.2, 0.9, 30), (0.5, 2.5, 100), (0.001, 0.6, 5000)]:
    r = rdp._compute_rdp_poisson_subsampled_gaussian(q, z, CUSTOM_ORDERS)
    eps, order = accountant_eps([(q, z, steps)], 1e-5, CUSTOM_ORDERS)
    out["custom_orders"].append(
        {"q": q, "z": z, "steps": steps, "orders": CUSTOM_ORDERS, "rdp": [fin(x) for x in r],
         "delta": 1e-5, "epsilon": eps, "order": order}
    )

for target, delta, q, steps in [(1.0, 1e-5, 0.01, 1000), (3.0, 1e-5, 0.1, 100), (8.0, 1e-6, 0.02, 2000),
                                (0.5, 1e-3, 0.001, 10000), (10.0, 1e-5, 1.0, 10)]:
    def make_event(z, q=q, steps=steps):
        return dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
    z = dp_accounting.calibrate_dp_mechanism(
        rdp.RdpAccountant, make_event, target, delta,
        dp_accounting.LowerEndpointAndGuess(1e-3, 1.0), tol=1e-10)
    out["calibrate"].append({"target_epsilon": target, "delta": delta, "q": q, "steps": steps,
                             "noise_multiplier": float(z)})

for eps in [0.01, 0.1, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 50.0]:
    for delta in [1e-2, 1e-5, 1e-10]:
        out["analytic_gaussian"].append(
            {"epsilon": eps, "delta": delta, "sigma": float(dp_accounting.get_sigma_gaussian(eps, delta))})

json.dump(out, sys.stdout, indent=None, separators=(",", ":"))
sys.stdout.write("\n")
