"""Training beside generation: how much a generation loop slows training, and what the OpenMP wait
policy does about it.

torch runs its CPU ops on an OpenMP team per calling thread, as many threads as cores. GNU OpenMP's
default lets a team's idle threads spin for a while before sleeping, so two teams on the same cores
(a second process, or the UI's generation thread beside its training thread) keep each other's cores
busy with spinning. OMP_WAIT_POLICY=PASSIVE puts idle threads to sleep at once. The `stylelora`
command (cli.process_defaults) and the UI set PASSIVE unless the user exported a policy.

Cases, each a fresh process (the policy is read when torch loads its OpenMP runtime):
  alone       stylelora training (embedded base, dots dataset, defaults, no calibration)
  2 procs     the same training while another process generates images in a loop
  in-process  training in the main thread while a thread of the same process generates in a loop
              (what the web UI does when a user keeps generating during a training run)
for the OpenMP default (active spinning, GOMP's) and for PASSIVE. steps/s = 1 / median step time
after warm-up (per-step timestamps from train()'s on_log hook). Run it alone on the machine.

    python bench/contention.py            # ~8 min on 2 cores
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS, WARMUP = 60, 10


def _train_rate(out_dir: str) -> float:
    from stylelora.config import TrainConfig
    from stylelora.train import train

    stamps = []
    cfg = TrainConfig(dataset=str(ROOT / "datasets" / "dots"), out=str(Path(out_dir) / "dots.safetensors"),
                      steps=STEPS, log_every=1, sample_every=0, checkpoint_every=0, progress=False,
                      calibrate_strength=False)
    train(cfg, on_log=lambda e: stamps.append(time.perf_counter()) if "loss" in e else None)
    gaps = [b - a for a, b in zip(stamps[WARMUP:], stamps[WARMUP + 1:])]
    return 1 / statistics.median(gaps)


def _generate_forever(stop=None) -> None:
    from stylelora.base import load_base
    from stylelora.generate import generate_images

    pipe = load_base()
    i = 0
    while stop is None or not stop.is_set():
        generate_images(pipe, ["a red star on a white background"], [i])
        i += 1


def worker(case: str, out_dir: str) -> None:
    if case == "gen":
        _generate_forever()
    elif case == "train":
        print(json.dumps({"steps_per_s": _train_rate(out_dir)}), flush=True)
    elif case == "train+thread":
        import threading

        stop = threading.Event()
        gen = threading.Thread(target=_generate_forever, args=(stop,), daemon=True)
        gen.start()
        time.sleep(5)  # the generation loop is running before training starts
        rate = _train_rate(out_dir)
        stop.set()
        print(json.dumps({"steps_per_s": rate}), flush=True)


def run_case(case: str, policy: str | None, tmp: str) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    env.pop("OMP_WAIT_POLICY", None)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    me = [sys.executable, __file__, "--worker"]
    side = None
    if case == "2 procs":
        side = subprocess.Popen(me + ["gen", tmp], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(8)  # loaded and generating
    try:
        which = "train+thread" if case == "in-process" else "train"
        out = subprocess.run(me + [which, tmp], env=env, capture_output=True, text=True, check=True).stdout
    finally:
        if side is not None:
            side.kill()
            side.wait()
    return json.loads(out.strip().splitlines()[-1])["steps_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "contention.md"))
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker)
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for policy in (None, "PASSIVE"):
            rates = {case: run_case(case, policy, tmp) for case in ("alone", "2 procs", "in-process")}
            rows.append((policy or "default (active spin)", rates))
            print(policy, rates, flush=True)
    lines = ["| OMP_WAIT_POLICY | alone (steps/s) | beside a generating process | beside a generating thread |",
             "|---|---|---|---|"]
    for policy, r in rows:
        a = r["alone"]
        lines.append(f"| {policy} | {a:.2f} | {r['2 procs']:.2f} ({a / r['2 procs']:.1f}x slower) | "
                     f"{r['in-process']:.2f} ({a / r['in-process']:.1f}x slower) |")
    table = "\n".join(lines)
    print(table)
    Path(args.out).write_text(f"# Training beside generation (python bench/contention.py)\n\n{table}\n")


if __name__ == "__main__":
    main()
