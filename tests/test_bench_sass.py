"""bench/sass.py: loops and instruction mixes from nvdisasm listings (the tool future kernel work sizes itself with)."""

import shutil

import pytest

from bitsandbytes_lowra.bench import sass

# The shape of `nvdisasm -c` output: a function, labels, addressed instructions, predicated ones, a forward branch
# (not a loop), a loop nested in another.
LISTING = """
	.section	.text._Z3fooPf,"ax",@progbits
.text._Z3fooPf:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   ISETP.GE.AND P0, PT, R2, RZ, PT ;
        /*0030*/               @P0 BRA `(.L_x_2) ;
.L_x_1:
        /*0040*/                   FFMA R3, R2, R2, R3 ;
        /*0050*/              @!P1 LDS.64 R6, [R7+0x80] ;
        /*0060*/                   IADD3 R8, R8, 0x1, RZ ;
        /*0070*/               @P2 BRA `(.L_x_1) ;
.L_x_2:
        /*0080*/                   STG.E desc[UR4][R4.64], R3 ;
        /*0090*/               @P3 BRA `(.L_x_0) ;
        /*00a0*/                   EXIT ;
.text._Z3barv:
        /*0000*/                   EXIT ;
"""


def test_parse_finds_loops_and_mixes():
    foo, bar = sass.parse(LISTING)
    assert (foo.name, len(foo.instructions)) == ("_Z3fooPf", 11)
    assert (bar.name, len(bar.instructions), bar.loops) == ("_Z3barv", 1, [])
    # outer loop .L_x_0 .. the branch at 9; inner .L_x_1 .. 7; the forward branch to .L_x_2 is not a loop
    assert [(lp.start, lp.end, lp.size, lp.innermost) for lp in foo.loops] == [(1, 9, 9, False), (4, 7, 4, True)]
    inner = foo.loops[1]
    assert inner.ops == {"FFMA": 1, "LDS": 1, "IADD3": 1, "BRA": 1}
    assert foo.loops[0].ops["BRA"] == 3 and foo.loops[0].ops["STG"] == 1


def test_opcode_strips_predicates_and_modifiers():
    assert sass.opcode("@!P0 LDG.E.128.CONSTANT R4, desc[UR4][R2.64]") == "LDG"
    assert sass.opcode("@UP1 ULDC.64 UR4, c[0x0][0x208]") == "ULDC"
    assert sass.opcode("PRMT R3, R2, 0x7650, R5") == "PRMT"


def test_report_filters_by_kernel_name():
    text = sass.report(sass.parse(LISTING), "foo")
    assert "_Z3fooPf" in text.splitlines()[0] or "foo(float*)" in text.splitlines()[0]
    assert "bar" not in text
    assert "*[4-7]" in text and " [1-9]" in text and "FFMA:1" in text


def test_missing_listing_is_a_clear_error(tmp_path, capsys):
    assert sass.main(["--sass", str(tmp_path / "none.sass")]) == 2
    assert "none.sass" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (CI has it; CUDA-less dev machines do not)")
def test_real_kernels_compile_and_show_their_step_loops():
    """The batch-1 GEMV compiled for sm_90: every instance is found, with the per-precision step loops."""
    try:
        sass.find_nvdisasm()
    except FileNotFoundError as e:
        pytest.fail(f"{e} (the test extra installs nvidia-cuda-nvdisasm)")
    kernels = [k for k in sass.parse(sass.disassemble(sass.ROOT / "csrc" / "cuda_gemv1.cu", "sm_90", []))
               if "gemv1_kernel" in k.name]
    # {half, bf16} x {2, 4 rows} x {float32, double-quantized scales} x {1024-column, wide steps}
    assert len(kernels) == 16
    wide = [k for k in kernels if "Lb1EE" in k.name]  # the last template argument, WIDE, true
    assert len(wide) == 8
    for k in wide:  # the 2-bit rows' wide step: HFMA2 on float16 activation pairs
        assert any(lp.innermost and lp.ops["HFMA2"] >= 32 for lp in k.loops)
    for k in kernels:
        assert len(k.instructions) > 1000
        # the step loops (innermost, table lookups and FMAs): 2- and 4-bit rows through byte permutes, 1-bit rows
        # through the subset sums (few permutes); one step is a few hundred to about a thousand instructions
        steps = [lp for lp in k.loops if lp.innermost and lp.ops["LDS"] >= 8 and lp.ops["FFMA"] + lp.ops["FADD"] >= 8]
        assert any(lp.ops["PRMT"] >= 32 for lp in steps) and any(lp.ops["PRMT"] < lp.ops["LDS"] // 4 for lp in steps)
        assert all(lp.size < 2000 for lp in steps)
