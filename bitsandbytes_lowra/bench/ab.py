"""Builds of our native library against each other, side by side: the way a kernel change is judged.

    python -m bitsandbytes_lowra.bench.ab --lib main=build-a/lib.so --lib new=build-b/lib.so [--rounds 2]
        [--time-limit 540] [--json ab.json] -- --only matmul --no-sweep --batches 1

Runs `python -m bitsandbytes_lowra.bench <the arguments after -->` once per library and round, one process each
with LOWRA_LIBRARY set, alternating the libraries and reversing their order every other round (a, b, b, a, ...)
so that a drift of the device's clocks or temperature does not favour one. Every run times the bitsandbytes and
bf16 contenders again, so each library's figures sit next to references measured minutes apart, in the same
call. Prints, per timed operation, each library's mean over its runs, its ratio to the first library and the
spread of the runs (the largest (max - min) / mean of any library); a ratio further from 1 than that spread is
marked *. Writes every run's JSON with the order they ran in.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import describe


def parse_lib(spec: str) -> tuple[str, Path]:
    """`name=path` -> (name, path); the path must be an existing file."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--lib wants NAME=PATH, got {spec!r}")
    p = Path(path)
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"--lib {name}: no such library file: {path}")
    return name, p


def schedule(names: list[str], rounds: int) -> list[str]:
    """The run order: every library once per round, in reverse order every other round."""
    return [n for r in range(rounds) for n in (names if r % 2 == 0 else names[::-1])]


def timings(res: dict) -> dict[str, float]:
    """Every timed figure of a bench result, flattened: "matmul/28672x8192/m=1/lowra_1.75bit" -> ms, and the training
    steps: "training/4096x4096/512tok/lowra-1.75/graph" -> ms."""
    out: dict[str, float] = {}

    def walk(node, path):
        if isinstance(node, dict):
            ms = node.get("ms")
            if isinstance(ms, (int, float)) and not isinstance(ms, bool):
                out["/".join(path)] = float(ms)
            for k, v in node.items():
                walk(v, path + [str(k)])
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, path + [str(i)])

    for shape in res.get("shapes", []):
        tag = "x".join(map(str, shape.get("shape", [])))
        for kind, block in shape.items():
            if kind == "matmul" and isinstance(block, dict):  # keyed by batch size
                for m, per_m in block.items():
                    walk(per_m, [kind, tag, f"m={m}"])
            elif kind != "shape":
                walk(block, [kind, tag])
    for row in res.get("training", []):  # bench's training step: eager and graph-replayed, per shape, tokens, layer
        for key, label in (("fwd_bwd_ms", "eager"), ("graph_ms", "graph")):
            if isinstance(row.get(key), (int, float)):
                out[f"training/{row['shape']}/{row['tokens']}tok/{row['base']}/{label}"] = float(row[key])
    return out


def per_library(runs: list[tuple[str, dict]], names: list[str]) -> dict[str, dict[str, list[float]]]:
    """metric -> library -> its runs' ms, for the metrics every library measured."""
    per: dict[str, dict[str, list[float]]] = {}
    for name, res in runs:
        for k, v in timings(res).items():
            per.setdefault(k, {}).setdefault(name, []).append(v)
    return {k: v for k, v in per.items() if all(n in v for n in names)}


def summarize(runs: list[tuple[str, dict]], names: list[str]) -> dict[str, dict[str, float]]:
    """metric -> library -> mean ms over that library's runs (metrics every library measured)."""
    return {k: {n: statistics.fmean(v[n]) for n in names} for k, v in per_library(runs, names).items()}


def spreads(runs: list[tuple[str, dict]], names: list[str]) -> dict[str, float]:
    """metric -> the largest (max - min) / mean over any library's runs: how far apart runs of one build land.
    Only where every library ran at least twice."""
    return {k: max((max(v[n]) - min(v[n])) / statistics.fmean(v[n]) for n in names)
            for k, v in per_library(runs, names).items() if all(len(v[n]) > 1 for n in names)}


def table(means: dict[str, dict[str, float]], names: list[str], spread: dict[str, float] | None = None) -> str:
    base, spread = names[0], spread or {}
    # columns at least two wider than their titles, so that long library names stay apart
    width = {n: max(12, len(n) + 2) for n in names}
    ratio = {n: max(14, len(f"{n}/{base}") + 2) for n in names[1:]}
    head = "operation (us, mean of runs)".ljust(56) + "".join(n.rjust(width[n]) for n in names)
    head += "".join(f"{n}/{base}".rjust(ratio[n]) for n in names[1:]) + "spread".rjust(9)
    lines = [head]
    for k in sorted(means):
        m, sp = means[k], spread.get(k)
        row = k.ljust(56) + "".join(f"{m[n] * 1e3:{width[n]}.1f}" for n in names)
        for n in names[1:]:
            r = m[n] / m[base]
            mark = "*" if sp is not None and abs(r - 1) > sp else " "  # beyond the runs' own scatter
            row += f"{r:{ratio[n] - 1}.3f}{mark}"
        row += f"{sp * 100:8.1f}%" if sp is not None else "-".rjust(9)
        lines.append(row)
    return "\n".join(lines)


def run(libs: list[tuple[str, Path]], bench_args: list[str], rounds: int, time_limit: float | None,
        module: str = "bitsandbytes_lowra.bench") -> dict:
    names = [n for n, _ in libs]
    paths = dict(libs)
    order = schedule(names, rounds)
    runs: list[tuple[str, dict]] = []
    record: dict = {"command": [sys.executable, "-m", module] + bench_args,
                    "libraries": {n: str(p) for n, p in libs}, "order": [], "runs": {}, "failed": {}}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(order, 1):
            if time_limit is not None and time.monotonic() - t0 > time_limit:
                print(f"ab: time limit reached after {i - 1} of {len(order)} runs", file=sys.stderr)
                break
            out = Path(tmp) / f"{i}.json"
            env = dict(os.environ, LOWRA_LIBRARY=str(paths[name].resolve()))
            proc = subprocess.run([sys.executable, "-m", module] + bench_args + ["--json", str(out)], env=env,
                                  capture_output=True, text=True)
            key = f"{i}_{name}"
            record["order"].append(key)
            if proc.returncode != 0 or not out.exists():
                tail = (proc.stdout + proc.stderr)[-2000:]
                record["failed"][key] = {"returncode": proc.returncode, "output_tail": tail}
                print(f"ab: run {key} failed (exit {proc.returncode}):\n{tail}", file=sys.stderr)
                continue
            res = json.loads(out.read_text())
            record["runs"][key] = res
            runs.append((name, res))
            print(f"ab: run {key} done, {time.monotonic() - t0:.0f} s", file=sys.stderr)
    record["means_ms"] = summarize(runs, names)  # empty unless every library finished a run
    record["spread"] = spreads(runs, names)
    return record


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    bench_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, bench_args = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(prog="python -m bitsandbytes_lowra.bench.ab", description=describe(__doc__),
                                 epilog="Arguments after -- go to python -m bitsandbytes_lowra.bench (not --json).")
    ap.add_argument("--lib", action="append", type=parse_lib, required=True, metavar="NAME=PATH",
                    help="a build of the native library; the first is the baseline (give two or more)")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each library (default 2)")
    ap.add_argument("--time-limit", type=float, help="start no run after this many seconds (a device call's limit)")
    ap.add_argument("--json", help="write every run and the means here")
    ap.add_argument("--module", default="bitsandbytes_lowra.bench", help=argparse.SUPPRESS)  # tests
    args = ap.parse_args(argv)
    names = [n for n, _ in args.lib]
    if len(names) < 2 or len(set(names)) != len(names):
        ap.error(f"give two or more libraries with distinct names, got {names}")
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    if "--json" in bench_args:
        ap.error("the bench's --json is set by ab itself: give ab's --json instead")
    record = run(args.lib, bench_args, args.rounds, args.time_limit, module=args.module)
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))
    if not record["means_ms"]:
        print("ab: not every library has a finished run: no comparison", file=sys.stderr)
        return 1
    print(table(record["means_ms"], names, record["spread"]))
    return 1 if record["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
