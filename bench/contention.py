"""Training beside generation: how much a generation loop slows training, and what the OpenMP wait
policy does about it.

torch runs its CPU ops on an OpenMP team per calling thread, as many threads as cores. GNU OpenMP
lets a team's idle threads spin (300k iterations by default) before sleeping, so two teams on the
same cores -- a second process, or the UI's generation thread beside its training thread -- keep
each other's cores busy spinning. Settings compared (each a fresh process: libgomp reads them when
torch loads it): the default, OMP_WAIT_POLICY=PASSIVE (sleep at once), and shorter spins
(GOMP_SPINCOUNT). The `stylelora` command sets GOMP_SPINCOUNT=100000 unless the user exported one.

Cases:
  alone       stylelora training (embedded base, dots dataset, defaults, no calibration)
  2 procs     the same training while another process generates images in a loop (same setting)
  in-process  training in the main thread while a thread of the same process generates in a loop
              (what the web UI does when a user keeps generating during a training run)
steps/s = 1 / median step time after warm-up (per-step timestamps from train()'s on_log hook);
"x slower" is against the first setting's training alone. Run it alone on the machine.

    python bench/contention.py --settings default,GOMP_SPINCOUNT=100000   # ~5 min on 2 cores
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
                      steps=STEPS, grad_accum=1, log_every=1, sample_every=0, checkpoint_every=0, progress=False,
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
        gen.join()
        print(json.dumps({"steps_per_s": rate}), flush=True)
        os._exit(0)  # skip interpreter teardown: with a second thread having run torch it can abort


def run_case(case: str, setting: str, tmp: str) -> float:
    """setting: "default", or NAME=VALUE of the OpenMP environment (OMP_WAIT_POLICY, GOMP_SPINCOUNT)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        env.pop(name, None)
    if setting != "default":
        name, _, value = setting.partition("=")
        env[name] = value
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
    ap.add_argument("--settings", default="default,OMP_WAIT_POLICY=PASSIVE,GOMP_SPINCOUNT=10000,GOMP_SPINCOUNT=100000")
    ap.add_argument("--cases", default="alone,2 procs,in-process")
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker)
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for setting in args.settings.split(","):
            rates = {case: run_case(case, setting, tmp) for case in args.cases.split(",")}
            rows.append((setting, rates))
            print(setting, rates, flush=True)
    base = rows[0][1]["alone"]  # the first setting's training alone: what the others are compared with
    lines = [f"| OpenMP setting | {' | '.join(rows[0][1])} |", "|---" * (len(rows[0][1]) + 1) + "|"]
    for setting, r in rows:
        lines.append(f"| {setting} | " + " | ".join(f"{v:.2f} steps/s ({base / v:.1f}x slower)" for v in r.values()) + " |")
    table = "\n".join(lines)
    print(table)
    Path(args.out).write_text(f"# Training beside generation (python bench/contention.py)\n\n{table}\n")


if __name__ == "__main__":
    main()
