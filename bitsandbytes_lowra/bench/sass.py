"""Static instruction counts of our CUDA kernels, without a GPU: where a kernel's instructions go, per loop.

    python -m bitsandbytes_lowra.bench.sass [--src csrc/cuda_gemv1.cu] [--kernel gemv1_kernel] [--arch sm_90]

Compiles one source file of csrc/ to a cubin with nvcc, disassembles it with nvdisasm (not in every CUDA install;
`pip install nvidia-cuda-nvdisasm` ships it) and prints, per kernel, its size and each loop (a backward branch) with
its instruction count and mix (* marks innermost loops). A loop's count is what one iteration costs when it runs
straight through, so dividing by the elements an iteration handles gives instructions per element: the figure an
issue-bound kernel is judged by (docs/benchmarks.md, ncu's "executed instructions"), here in seconds and before any
device time is spent.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from . import describe

ROOT = Path(__file__).resolve().parents[2]
_FUNC = re.compile(r"^\.text\.(\S+):")
_LABEL = re.compile(r"^(\.L_\S+):")
_INSTR = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA\b.*?(\.L_\S+?)\)?$")
_PRED = re.compile(r"^@!?U?P\w+\s+")


@dataclass
class Loop:
    start: int  # index of the loop's first instruction in its function
    end: int  # index of its backward branch
    ops: collections.Counter = field(default_factory=collections.Counter)
    innermost: bool = True  # no other loop inside it: a hot loop body

    @property
    def size(self) -> int:
        return self.end - self.start + 1


@dataclass
class Kernel:
    name: str
    instructions: list[str]
    loops: list[Loop]


def opcode(instr: str) -> str:
    """`@!P0 LDG.E.128 R4, desc[...]` -> `LDG`: the operation without predicate and modifiers."""
    return _PRED.sub("", instr).split()[0].split(".")[0]


def parse(sass: str) -> list[Kernel]:
    """Kernels (functions) of `nvdisasm -c` output with their loops: every branch to a label at or before it."""
    kernels: list[Kernel] = []
    name, instrs, labels, branches = None, [], {}, []

    def close():
        if name is None:
            return
        loops = []
        for at, target in branches:
            if target in labels and labels[target] <= at:
                lp = Loop(labels[target], at)
                lp.ops.update(opcode(s) for s in instrs[lp.start:at + 1])
                loops.append(lp)
        for lp in loops:
            lp.innermost = not any(o is not lp and lp.start <= o.start and o.end <= lp.end for o in loops)
        kernels.append(Kernel(name, instrs, sorted(loops, key=lambda lp: (lp.start, -lp.end))))

    for line in sass.splitlines():
        m = _FUNC.match(line)
        if m:
            close()
            name, instrs, labels, branches = m.group(1), [], {}, []
            continue
        if name is None:
            continue
        m = _LABEL.match(line)
        if m:
            labels[m.group(1)] = len(instrs)
            continue
        m = _INSTR.match(line)
        if m:
            text = m.group(1)
            b = _BRANCH.search(text)
            if b:
                branches.append((len(instrs), b.group(1)))
            instrs.append(text)
    close()
    return kernels


def find_nvdisasm() -> str:
    """nvdisasm on PATH, next to nvcc, or from the nvidia-cuda-nvdisasm wheel."""
    nvcc = shutil.which("nvcc")
    for cand in (shutil.which("nvdisasm"), nvcc and str(Path(nvcc).with_name("nvdisasm"))):
        if cand and os.access(cand, os.X_OK):
            return cand
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        for cand in sorted(glob.glob(os.path.join(site, "nvidia", "*", "bin", "nvdisasm"))):
            if os.access(cand, os.X_OK):
                return cand
    raise FileNotFoundError("nvdisasm not found: install it with `pip install nvidia-cuda-nvdisasm` "
                            "(or put a CUDA toolkit's bin/ on PATH)")


def disassemble(src: Path, arch: str, defines: list[str]) -> str:
    """`nvcc -cubin` of one csrc/ file with the build's flags, then `nvdisasm -c`."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise FileNotFoundError("nvcc not found on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cmd = [nvcc, f"-arch={arch}", "-O3", "-std=c++17", "-DLOWRA_WITH_CUDA", *[f"-D{d}" for d in defines],
               "-cubin", f"-I{ROOT / 'csrc'}", str(src), "-o", str(cubin)]
        subprocess.run(cmd, check=True)
        return subprocess.run([find_nvdisasm(), "-c", str(cubin)], check=True, capture_output=True,
                              text=True).stdout


def demangled(names: list[str]) -> dict[str, str]:
    """Readable kernel names (c++filt where present)."""
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def report(kernels: list[Kernel], match: str | None, top: int = 12) -> str:
    kernels = [k for k in kernels if not match or match in k.name]
    pretty = demangled([k.name for k in kernels])
    lines = []
    for k in kernels:
        lines.append(f"{pretty[k.name]}: {len(k.instructions)} instructions, {len(k.loops)} loops")
        for lp in k.loops:
            mix = " ".join(f"{op}:{n}" for op, n in lp.ops.most_common(top))
            lines.append(f"  {'*' if lp.innermost else ' '}[{lp.start}-{lp.end}] {lp.size:>5}  {mix}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bitsandbytes_lowra.bench.sass", description=describe(__doc__))
    ap.add_argument("--src", default="csrc/cuda_gemv1.cu", help="CUDA source, relative to the repository root")
    ap.add_argument("--kernel", help="only kernels whose (mangled) name contains this")
    ap.add_argument("--arch", default="sm_90", help="target, as nvcc's -arch (default: sm_90, the H200)")
    ap.add_argument("-D", dest="defines", action="append", default=[], help="extra preprocessor define (repeatable)")
    ap.add_argument("--sass", help="read this `nvdisasm -c` listing instead of compiling")
    args = ap.parse_args(argv)
    try:
        text = Path(args.sass).read_text() if args.sass else disassemble(ROOT / args.src, args.arch, args.defines)
    except (FileNotFoundError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report(parse(text), args.kernel))
    return 0


if __name__ == "__main__":
    sys.exit(main())
