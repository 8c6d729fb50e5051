"""bench/variant.py: a library built from the baseline build's own commands with some sources swapped.

The integration tests use the repository's `build/` directory (`make build`, which CI runs before pytest): the CPU
library always, the CUDA library where the build has it (CI compiles it; nvcc is there). The baseline build and its
library are checked to stay untouched.
"""

import ctypes
import difflib
import hashlib
import json
import os

import pytest

from bitsandbytes_lowra.bench import variant

BUILD = variant.ROOT / "build"
PROBE = '\nextern "C" __attribute__((visibility("default"))) int lowra_variant_probe() { return 42; }\n'


def test_header_changes_rebuild_everything_and_other_sources_nothing():
    sources = ["csrc/c_api.cpp", "csrc/cuda_gemv1.cu", "csrc/cuda_kernels.cu"]
    assert variant.to_rebuild(["csrc/cuda_kernels.cu"], sources) == ["csrc/cuda_kernels.cu"]
    assert variant.to_rebuild(["csrc/cuda_common.cuh", "csrc/cuda_gemv1.cu"], sources) == sorted(sources)
    assert variant.to_rebuild(["csrc/tests/test_kernels.cu"], sources) == []  # not in the library


def test_compile_args_take_the_variant_source_and_object_without_dependency_files(tmp_path):
    entry = {"directory": "/b", "file": "/r/csrc/x.cu", "output": "CMakeFiles/t.dir/csrc/x.cu.o",
             "command": "nvcc -O3 -MD -MT CMakeFiles/t.dir/csrc/x.cu.o -MF dep.d -x cu -c /r/csrc/x.cu "
                        "-o CMakeFiles/t.dir/csrc/x.cu.o"}
    args = variant.compile_args(entry, tmp_path / "x.cu", tmp_path / "x.o")
    assert args == ["nvcc", "-O3", "-x", "cu", "-c", str(tmp_path / "x.cu"), "-o", str(tmp_path / "x.o")]
    assert variant.entry_output(entry) == variant.Path("/b/CMakeFiles/t.dir/csrc/x.cu.o")


def _build_or_skip(target: str) -> None:
    db = BUILD / "compile_commands.json"
    if not db.is_file():
        if os.environ.get("CI"):  # CI always builds first (make test): a missing database is a failure there
            pytest.fail(f"{db} missing: CMakeLists.txt should export it")
        pytest.skip("needs the repository's build/ (make build)")
    if not any(f"CMakeFiles/{target}.dir/" in e.get("output", "") for e in json.loads(db.read_text())):
        pytest.skip(f"build/ has no {target} (the CUDA library needs nvcc)")


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _diff(source: str, new: str) -> str:
    """A unified diff of one file of the checkout, as `git diff` would write it."""
    old = (variant.ROOT / source).read_text()
    return "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), f"a/{source}", f"b/{source}"))


@pytest.mark.parametrize("target, source, how", [("cpu", "csrc/c_api.cpp", "file"), ("cpu", "csrc/c_api.cpp", "patch"),
                                                 ("cuda", "csrc/cuda_gemv1.cu", "file")])
def test_a_swapped_source_is_compiled_and_linked_beside_the_untouched_build(target, source, how, tmp_path, capsys):
    name = variant.TARGETS[target]
    _build_or_skip(name)
    own = variant.ROOT / "bitsandbytes_lowra" / f"lib{name}.so"
    before, source_before = _digest(own), _digest(variant.ROOT / source)
    swapped = tmp_path / "swapped.src"
    swapped.write_text((variant.ROOT / source).read_text() + PROBE)
    if how == "patch":
        patch = tmp_path / "probe.diff"
        patch.write_text(_diff(source, swapped.read_text()))
        change = ["--patch", str(patch)]
    else:
        change = ["--file", f"{source}={swapped}"]
    out = tmp_path / "variants" / "lib_probe.so"
    assert variant.main(["--build", str(BUILD), "--target", target, *change, "-o", str(out)]) == 0
    assert _digest(variant.ROOT / source) == source_before  # a patch is applied to a copy
    assert f"compiling {source}" in capsys.readouterr().out
    lib = ctypes.CDLL(str(out))
    assert lib.lowra_variant_probe() == 42  # the swapped source is in it
    assert hasattr(lib, "lowra_quantize_cpu")  # and the build's other objects
    assert _digest(own) == before


def test_errors_name_the_problem(tmp_path, capsys):
    empty = tmp_path / "empty-build"
    empty.mkdir()
    src = tmp_path / "x.cu"
    src.write_text("// nothing\n")
    swap = f"csrc/cuda_gemv1.cu={src}"
    assert variant.main(["--build", str(empty), "--file", swap, "-o", str(tmp_path / "a.so")]) == 2
    assert "compile_commands.json not found" in capsys.readouterr().err
    assert variant.main(["--build", str(empty), "--ref", "no-such-ref-here", "-o", str(tmp_path / "a.so")]) == 2
    assert "no-such-ref-here" in capsys.readouterr().err
    assert variant.main(["--build", str(empty), "--file", swap,
                         "-o", str(variant.ROOT / "bitsandbytes_lowra" / "libbitsandbytes_lowra_cuda.so")]) == 2
    assert "outside the package" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        variant.main(["--build", str(empty), "--file", "csrc/x.cu", "-o", "a.so"])
    assert "wants csrc/PATH=LOCAL_FILE" in capsys.readouterr().err


def test_a_ninja_build_without_the_target_is_told_so(tmp_path, monkeypatch):
    (tmp_path / "build.ninja").write_text("# no rules\n")
    fake = tmp_path / "ninja"  # stands in for ninja: fails the way it does for an unknown target
    fake.write_text("#!/bin/sh\necho \"ninja: error: unknown target 'bitsandbytes_lowra_cuda'\" >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(variant.shutil, "which", lambda name: str(fake))
    with pytest.raises(variant.VariantError, match="unknown target 'bitsandbytes_lowra_cuda'"):
        variant.link_command(tmp_path, "bitsandbytes_lowra_cuda")


def test_an_installed_package_without_sources_is_told_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(variant, "ROOT", tmp_path)  # as in site-packages: no csrc/ beside the package
    src = tmp_path / "x.cu"
    src.write_text("// nothing\n")
    swap = f"csrc/cuda_gemv1.cu={src}"
    assert variant.main(["--build", str(tmp_path), "--file", swap, "-o", str(tmp_path / "o.so")]) == 2
    assert "run from a source checkout" in capsys.readouterr().err


def test_a_change_outside_the_library_builds_nothing(tmp_path, capsys):
    _build_or_skip(variant.TARGETS["cpu"])
    src = tmp_path / "t.cu"
    src.write_text("// a test source\n")
    assert variant.main(["--build", str(BUILD), "--target", "cpu", "--file", f"csrc/tests/new_test.cu={src}",
                         "-o", str(tmp_path / "a.so")]) == 2
    assert "no source of bitsandbytes_lowra_cpu differs" in capsys.readouterr().err


def test_a_patch_that_cannot_be_used_is_told_so(tmp_path):
    with pytest.raises(variant.VariantError, match="no such file"):
        variant.patch_changes(tmp_path / "missing.diff")
    readme = tmp_path / "readme.diff"
    readme.write_text(_diff("README.md", "# changed\n"))
    with pytest.raises(variant.VariantError, match=r"only files under csrc/ can change, not \['README.md'\]"):
        variant.patch_changes(readme)
    stale = tmp_path / "stale.diff"  # context that the checkout no longer has
    stale.write_text("--- a/csrc/lowra.h\n+++ b/csrc/lowra.h\n@@ -1,2 +1,2 @@\n-no such line\n+new line\n"
                     " nor this one\n")
    with pytest.raises(variant.VariantError, match="does not apply to this checkout's csrc/"):
        variant.patch_changes(stale)
    empty = tmp_path / "empty.diff"
    empty.write_text("just text\n")
    with pytest.raises(variant.VariantError, match="not a diff git can read"):
        variant.patch_changes(empty)


@pytest.mark.parametrize("diff", sorted((variant.ROOT / "docs" / "experiments").glob("*.diff")), ids=lambda p: p.stem)
def test_every_kept_experiment_applies_and_says_what_it_measured(diff):
    """docs/experiments/ keeps measured kernel changes that did not land; each must still build as a variant. When a
    change to csrc/ breaks one, rebase it (git apply --3way, then git diff) or delete it with a word in the docs."""
    header = diff.read_text().split("diff --git", 1)[0]
    assert "Measured:" in header  # every kept experiment states its result
    changes = variant.patch_changes(diff)
    assert changes and all(path.startswith("csrc/") and content for path, content in changes.items())
    assert diff.name in (variant.ROOT / "docs" / "experiments" / "README.md").read_text()
