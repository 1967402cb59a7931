"""Run the named experiments of bench/results.py side by side, a few at a time, one thread each, each one resumed
where it stopped; a finished one is skipped. For long CPU runs that must survive being stopped:

    python bench/run_queue.py long_textures_s0 long_artifacts_r0 long_textures_s1 --lanes 2 --runs-dir runs

Every run is `python dinov3_mini.py <its flags> --out-dir RUNS_DIR/NAME` (`--resume` when it has a checkpoint), its
output appended to RUNS_DIR/NAME.log. SIGTERM or Ctrl-C to this script is passed on to the runs: each saves its
checkpoint and stops; the same command continues them. On 2 cores, two runs with one thread each keep a step at
about 2.4 s; two processes of 2 threads each wait on each other and take 4-6x longer. Then measure and draw:
`python bench/results.py --no-train --only storage_long` (or signal_long, learnable, storage_screens).
"""
import argparse
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import results  # noqa: E402  (the registry of experiments: LEARNABLE and LONG)


def registry():
    """name -> flags of every experiment results.py knows by name."""
    out = dict(results.LEARNABLE)
    for runs in results.LONG.values():
        out.update(runs)
    return out


def command(name, flags, runs_dir):
    out = os.path.join(runs_dir, name)
    resume = ["--resume"] if os.path.exists(os.path.join(out, "checkpoint.pt")) else []
    return [sys.executable, os.path.join(HERE, "..", "dinov3_mini.py")] + flags + ["--out-dir", out, "--no-progress"] + resume


def main(argv=None):
    known = registry()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="+", help=f"Experiments, in the order to start them: {', '.join(known)}.")
    p.add_argument("--lanes", type=int, default=2, help="Runs at the same time.")
    p.add_argument("--threads", type=int, default=1, help="Threads per run (OMP_NUM_THREADS).")
    p.add_argument("--runs-dir", default=os.path.join(HERE, "..", "runs"), help="One folder (and .log) per run.")
    a = p.parse_args(argv)
    unknown = [n for n in a.names if n not in known]
    if unknown:
        p.error(f"unknown experiment(s) {', '.join(unknown)}; known: {', '.join(known)}")
    os.makedirs(a.runs_dir, exist_ok=True)
    todo = [n for n in a.names if not os.path.exists(os.path.join(a.runs_dir, n, "summary.json"))]
    for n in sorted(set(a.names) - set(todo)):
        print(f"{n}: finished, skipped")
    running, stopping = {}, []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    failed = []
    try:
        while (todo or running) and not stopping:
            while todo and len(running) < a.lanes:
                n = todo.pop(0)
                cmd = command(n, known[n], a.runs_dir)
                print(f"{time.strftime('%H:%M:%S')} start {n}: {' '.join(cmd[1:])}", flush=True)
                with open(os.path.join(a.runs_dir, n + ".log"), "a") as log:
                    running[n] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            for n, proc in list(running.items()):
                if proc.poll() is not None:
                    print(f"{time.strftime('%H:%M:%S')} {n} exited with {proc.returncode}", flush=True)
                    if proc.returncode != 0:
                        failed.append(n)
                    del running[n]
            time.sleep(0.5 if not running else 5)
    except KeyboardInterrupt:
        pass
    for n, proc in running.items():  # stopped from outside: every run saves its checkpoint
        proc.send_signal(signal.SIGTERM)
    for n, proc in running.items():
        proc.wait()
        print(f"{n}: stopped and saved (exit {proc.returncode}); the same command continues it", flush=True)
    if failed:
        sys.exit(f"failed: {', '.join(failed)} (see their .log files)")


if __name__ == "__main__":
    main()
