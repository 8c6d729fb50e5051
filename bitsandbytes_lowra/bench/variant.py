"""A build of the native library with some sources taken from a git ref, a file or a diff: what bench.ab compares.

    python -m bitsandbytes_lowra.bench.variant --build build-gpu --ref my-branch -o variants/lib_my-branch.so
    python -m bitsandbytes_lowra.bench.variant --build build-gpu --file csrc/cuda_gemv1.cu=try.cu -o lib_try.so
    python -m bitsandbytes_lowra.bench.variant --build build-gpu --patch docs/experiments/x.diff -o lib_x.so

Reuses a configured and built CMake directory (`cmake -S . -B build-gpu -DLOWRA_CUDA=ON ...`; CMakeLists.txt
exports compile_commands.json): only the sources that differ are compiled again, with the build's own commands,
into a scratch directory, and the library is relinked there from the build's other objects. The build directory
and its library are not touched, so one build serves as the baseline and as the base of every variant.

With --ref, the sources are compared with the working tree (which the build is assumed to match): a changed
source is compiled again, and a changed header of csrc/ recompiles every source of the library. Either way each
compiled source sees the variant's csrc/ (a copy with the changes), as its headers are included by quotes. With
--patch, the diff is applied to a copy of the working tree's csrc/: docs/experiments/ keeps the diffs of measured
kernel changes that did not land, since branches do not outlive a session's checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import describe

ROOT = Path(__file__).resolve().parents[2]
TARGETS = {"cuda": "bitsandbytes_lowra_cuda", "cpu": "bitsandbytes_lowra_cpu"}
HEADER_SUFFIXES = (".h", ".cuh", ".hpp")


class VariantError(RuntimeError):
    """A problem with the arguments, the build directory or the ref, in words the user can act on."""


def target_commands(build: Path, target: str) -> dict[str, dict]:
    """Source path relative to the repository ("csrc/x.cu") -> its compile_commands.json entry, for one library."""
    db = build / "compile_commands.json"
    if not db.is_file():
        raise VariantError(f"{db} not found: configure the build with CMake first (cmake -S . -B {build} "
                           "-DLOWRA_CUDA=ON), which exports it")
    marker = f"CMakeFiles/{target}.dir/"
    out = {}
    for entry in json.loads(db.read_text()):
        if marker in entry.get("output", "") or marker in entry.get("command", ""):
            src = Path(entry["file"]).resolve()
            try:
                out[src.relative_to(ROOT).as_posix()] = entry
            except ValueError:
                continue  # a build of another checkout
    if not out:
        raise VariantError(f"{build} builds no {target} from this checkout ({ROOT}): for the CUDA library, "
                           "configure with -DLOWRA_CUDA=ON")
    return out


def link_command(build: Path, target: str) -> list[str]:
    """The library's link command (run in `build`), from the generator's own files."""
    txt = build / "CMakeFiles" / f"{target}.dir" / "link.txt"  # Unix Makefiles
    if txt.is_file():
        return shlex.split(txt.read_text().strip().splitlines()[0])
    if (build / "build.ninja").is_file():
        ninja = shutil.which("ninja")
        if ninja is None:
            raise VariantError("the build uses Ninja but no ninja is on PATH")
        proc = subprocess.run([ninja, "-C", str(build), "-t", "commands", target], capture_output=True, text=True)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            raise VariantError(f"ninja -C {build} -t commands {target} gave no link command: "
                               f"{(proc.stderr or proc.stdout).strip() or 'no output'}")
        cmd = lines[-1].strip()
        cmd = cmd.removeprefix(": &&").removesuffix("&& :").strip()  # Ninja wraps links in `: && ... && :`
        return shlex.split(cmd)
    raise VariantError(f"{build}: neither a Makefiles nor a Ninja build (no link.txt or build.ninja for {target})")


def git(*args: str) -> str:
    proc = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise VariantError(f"git {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def ref_changes(ref: str) -> dict[str, bytes | None]:
    """csrc/ files that differ between the working tree and `ref`: path -> ref's content (None: not in ref)."""
    names = [n for n in git("diff", "--name-only", ref, "--", "csrc").splitlines() if n]
    out: dict[str, bytes | None] = {}
    for name in names:
        proc = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:{name}"], capture_output=True)
        out[name] = proc.stdout if proc.returncode == 0 else None
    return out


def patch_changes(patch: Path) -> dict[str, bytes | None]:
    """csrc/ files a unified diff (as `git diff` writes it) changes when applied to the working tree: path -> new
    content (None: deleted). Nothing in the checkout is touched: the diff is applied to a copy of csrc/."""
    if not patch.is_file():
        raise VariantError(f"--patch {patch}: no such file")
    proc = subprocess.run(["git", "apply", "--numstat", str(patch.resolve())], capture_output=True, text=True,
                          cwd=ROOT)
    if proc.returncode != 0:
        raise VariantError(f"--patch {patch}: not a diff git can read: {proc.stderr.strip()}")
    touched = [line.split("\t", 2)[2] for line in proc.stdout.splitlines() if line.count("\t") >= 2]
    if not touched:
        raise VariantError(f"--patch {patch}: the diff changes no file")
    outside = [t for t in touched if not t.startswith("csrc/")]
    if outside:
        raise VariantError(f"--patch {patch}: only files under csrc/ can change, not {outside}")
    with tempfile.TemporaryDirectory(prefix="lowra-patch-") as tmp:
        copy = Path(tmp)
        shutil.copytree(ROOT / "csrc", copy / "csrc")
        # outside a repository, git apply is a plain patch tool on the current directory
        proc = subprocess.run(["git", "apply", "--whitespace=nowarn", str(patch.resolve())], capture_output=True,
                              text=True, cwd=copy, env=dict(os.environ, GIT_CEILING_DIRECTORIES=tmp))
        if proc.returncode != 0:
            raise VariantError(f"--patch {patch} does not apply to this checkout's csrc/ (rebase it): "
                               f"{proc.stderr.strip()}")
        out: dict[str, bytes | None] = {}
        for name in touched:
            new = copy / name
            content = new.read_bytes() if new.is_file() else None
            old = ROOT / name
            if content != (old.read_bytes() if old.is_file() else None):
                out[name] = content
    return out


def to_rebuild(changed: list[str], sources: list[str]) -> list[str]:
    """The library's sources to compile again: all of them when a header changed, else the changed ones among them
    (other sources, such as csrc/tests/, are not in the library)."""
    if any(c.endswith(HEADER_SUFFIXES) for c in changed):
        return sorted(sources)
    return sorted(c for c in changed if c in sources)


def entry_args(entry: dict) -> list[str]:
    return entry["arguments"] if "arguments" in entry else shlex.split(entry["command"])


def entry_output(entry: dict) -> Path:
    """The object a compile command writes (older CMake writes no "output" key)."""
    args = entry_args(entry)
    return Path(entry["directory"], entry.get("output") or args[args.index("-o") + 1]).resolve()


def compile_args(entry: dict, src: Path, obj: Path) -> list[str]:
    """The build's command for one source, on `src` (the variant's copy) into `obj`, without dependency files."""
    out, args, i = [], entry_args(entry), 0
    while i < len(args):
        a = args[i]
        if a in ("-MT", "-MF", "-MQ", "-o"):  # dependency files: the build's own; the object: ours
            out += ["-o", str(obj)] if a == "-o" else []
            i += 2
            continue
        if a not in ("-MD", "-MMD"):
            out.append(str(src) if a == entry["file"] else a)
        i += 1
    return out


def build_variant(build: Path, target: str, changes: dict[str, bytes | None], output: Path,
                  log=print) -> list[str]:
    """Compile the sources `changes` touches (repository-relative path -> new content, None = deleted) and link
    the library to `output`. Returns the sources compiled."""
    if not (ROOT / "csrc").is_dir():
        raise VariantError(f"{ROOT} has no csrc/: run from a source checkout, not an installed package")
    build = build.resolve()
    commands = target_commands(build, target)
    unknown = [p for p in changes if not p.startswith("csrc/")]
    if unknown:
        raise VariantError(f"only files under csrc/ can change, not {unknown}")
    rebuild = to_rebuild(list(changes), list(commands))
    if not rebuild:
        raise VariantError(f"no source of {target} differs: nothing to build (changed: {sorted(changes) or 'none'})")
    link = link_command(build, target)
    with tempfile.TemporaryDirectory(prefix="lowra-variant-") as tmp:
        scratch = Path(tmp)
        shutil.copytree(ROOT / "csrc", scratch / "csrc")
        for path, content in changes.items():
            dst = scratch / path
            if content is None:
                dst.unlink(missing_ok=True)
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(content)
        missing = [p for p in rebuild if not (scratch / p).exists()]
        if missing:
            raise VariantError(f"{missing} are built into {target} but the variant deletes them")

        def compile_one(path: str) -> tuple[Path, Path]:
            entry, obj = commands[path], scratch / (path.replace("/", "_") + ".o")
            log(f"variant: compiling {path}")
            proc = subprocess.run(compile_args(entry, scratch / path, obj), cwd=entry["directory"],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise VariantError(f"compiling {path} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
            return entry_output(entry), obj

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # nvcc runs are independent
            objects = dict(pool.map(compile_one, rebuild))
        cmd, i = [], 0
        while i < len(link):
            a = link[i]
            if a == "-o":
                cmd += ["-o", str(output.resolve())]
                i += 2
                continue
            cmd.append(str(objects.get(Path(build, a).resolve(), a)) if a.endswith(".o") else a)
            i += 1
        output.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(cmd, cwd=build, capture_output=True, text=True)
        if proc.returncode != 0:
            raise VariantError(f"linking {output} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    log(f"variant: {output} ({len(rebuild)} of {len(commands)} sources compiled again)")
    return rebuild


def parse_file(spec: str) -> tuple[str, bytes]:
    path, sep, local = spec.partition("=")
    if not sep or not path or not local:
        raise argparse.ArgumentTypeError(f"--file wants csrc/PATH=LOCAL_FILE, got {spec!r}")
    if not Path(local).is_file():
        raise argparse.ArgumentTypeError(f"--file {path}: no such file: {local}")
    return Path(path).as_posix(), Path(local).read_bytes()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bitsandbytes_lowra.bench.variant",
                                 description=describe(__doc__))
    ap.add_argument("--build", type=Path, required=True, help="a configured, built CMake directory (the baseline)")
    ap.add_argument("--target", choices=sorted(TARGETS), default="cuda", help="which library (default cuda)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--ref", help="take csrc/ from this git ref (a branch, tag or commit)")
    src.add_argument("--file", action="append", type=parse_file, metavar="csrc/PATH=FILE",
                     help="replace one file of csrc/ (repeatable)")
    src.add_argument("--patch", type=Path, metavar="DIFF",
                     help="apply a unified diff of csrc/ (git diff's output), e.g. one of docs/experiments/")
    ap.add_argument("-o", "--output", type=Path, required=True, help="the variant library to write")
    args = ap.parse_args(argv)
    try:
        changes = (ref_changes(args.ref) if args.ref else patch_changes(args.patch) if args.patch
                   else dict(args.file))
        if args.output.resolve().parent == ROOT / "bitsandbytes_lowra":  # where the package loads its own from
            raise VariantError(f"-o {args.output}: write variants outside the package (bench.ab loads them by path)")
        build_variant(args.build, TARGETS[args.target], changes, args.output)
    except VariantError as e:
        print(f"variant: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
