"""bench/ab.py: builds of the native library run alternately through the bench, their timings averaged side by side.

The bench itself needs a GPU; here a stand-in module plays it, timing each "library" by the number its file holds,
so the orchestration (order, environment, forwarded arguments, means, failures, limits) is checked on any machine.
"""

import json
import sys
import textwrap

import pytest

from bitsandbytes_lowra.bench import ab

FAKE = textwrap.dedent('''
    import json, os, sys, time
    args = sys.argv[1:]
    out = args[args.index("--json") + 1]
    lib = os.environ["LOWRA_LIBRARY"]
    ms = float(open(lib).read())
    if ms < 0:
        print("bench: exploded", file=sys.stderr)
        sys.exit(3)
    time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(json.dumps({"lib": lib, "args": args}) + "\\n")
    res = {"shapes": [{"shape": [4, 8],
                       "quantize": {"lowra_4bit": {"ms": ms, "tb_s": 1.0}, "bnb_nf4": {"ms": 5.0},
                                    "speedup_4bit_vs_bnb": 5.0 / ms},
                       "matmul": {"1": {"lowra_1.75bit": {"ms": 2 * ms, "frac_of_bound_codes": 0.5}}}}]}
    json.dump(res, open(out, "w"))
''')


@pytest.fixture
def fake(tmp_path, monkeypatch):
    (tmp_path / "fakebench.py").write_text(FAKE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    log = tmp_path / "log.jsonl"
    monkeypatch.setenv("FAKE_LOG", str(log))

    def lib(name, ms):
        p = tmp_path / f"{name}.so"
        p.write_text(str(ms))
        return f"{name}={p}"

    def calls():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return lib, calls


def test_schedule_alternates_and_reverses_every_other_round():
    assert ab.schedule(["a", "b"], 3) == ["a", "b", "b", "a", "a", "b"]
    assert ab.schedule(["a", "b", "c"], 2) == ["a", "b", "c", "c", "b", "a"]


def test_timings_flatten_every_timed_figure_and_label_batches():
    res = {"shapes": [{"shape": [2, 3], "quantize": {"x": {"ms": 1.5}, "speedup": 2.0},
                       "matmul": {"4": {"y": {"ms": 0.25, "frac": 0.1}}}}]}
    assert ab.timings(res) == {"quantize/2x3/x": 1.5, "matmul/2x3/m=4/y": 0.25}


def test_timings_take_the_training_steps_and_skip_a_failed_graph():
    res = {"training": [{"shape": "4x8", "tokens": 512, "base": "bf16", "fwd_bwd_ms": 0.5, "graph_ms": 0.25,
                         "graph_vs_bf16": 1.0},
                        {"shape": "4x8", "tokens": 512, "base": "lowra-1.75", "fwd_bwd_ms": 0.75,
                         "graph_error": "RuntimeError: capture failed"}]}
    assert ab.timings(res) == {"training/4x8/512tok/bf16/eager": 0.5, "training/4x8/512tok/bf16/graph": 0.25,
                               "training/4x8/512tok/lowra-1.75/eager": 0.75}


def test_runs_alternate_with_each_library_and_report_means(fake, tmp_path, capsys):
    lib, calls = fake
    out = tmp_path / "ab.json"
    rc = ab.main(["--lib", lib("base", 1.0), "--lib", lib("new", 2.0), "--rounds", "2", "--json", str(out),
                  "--module", "fakebench", "--", "--only", "quantize"])
    assert rc == 0
    seen = calls()
    assert [c["lib"].rsplit("/", 1)[1] for c in seen] == ["base.so", "new.so", "new.so", "base.so"]
    assert all(c["args"][:2] == ["--only", "quantize"] for c in seen)  # forwarded, then ab's own --json
    record = json.loads(out.read_text())
    assert record["order"] == ["1_base", "2_new", "3_new", "4_base"]
    assert record["means_ms"]["quantize/4x8/lowra_4bit"] == {"base": 1.0, "new": 2.0}
    assert record["means_ms"]["matmul/4x8/m=1/lowra_1.75bit"] == {"base": 2.0, "new": 4.0}
    assert record["means_ms"]["quantize/4x8/bnb_nf4"] == {"base": 5.0, "new": 5.0}
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("quantize/4x8/lowra_4bit"))
    # us per library, new / base (marked: beyond the runs' scatter), then that scatter
    assert row.split()[1:] == ["1000.0", "2000.0", "2.000*", "0.0%"]
    assert record["spread"]["quantize/4x8/lowra_4bit"] == 0.0


def _res(ms, other=5.0):
    return {"shapes": [{"shape": [4, 8], "quantize": {"lowra_4bit": {"ms": ms}, "bnb_nf4": {"ms": other}}}]}


def test_spread_marks_only_ratios_beyond_the_runs_scatter():
    runs = [("a", _res(1.0)), ("b", _res(1.0, 10.0)), ("b", _res(1.1, 10.0)), ("a", _res(1.0))]
    spread = ab.spreads(runs, ["a", "b"])
    assert spread["quantize/4x8/lowra_4bit"] == pytest.approx(0.1 / 1.05)
    assert spread["quantize/4x8/bnb_nf4"] == 0.0
    rows = {line.split()[0]: line.split()[1:] for line in
            ab.table(ab.summarize(runs, ["a", "b"]), ["a", "b"], spread).splitlines()[1:]}
    assert rows["quantize/4x8/lowra_4bit"] == ["1000.0", "1050.0", "1.050", "9.5%"]  # within b's own scatter
    assert rows["quantize/4x8/bnb_nf4"] == ["5000.0", "10000.0", "2.000*", "0.0%"]


def test_one_round_has_no_spread():
    runs = [("a", _res(1.0)), ("b", _res(2.0))]
    assert ab.spreads(runs, ["a", "b"]) == {}
    lines = ab.table(ab.summarize(runs, ["a", "b"]), ["a", "b"], {}).splitlines()
    row = next(line for line in lines if line.startswith("quantize/4x8/lowra_4bit"))
    assert row.split()[1:] == ["1000.0", "2000.0", "2.000", "-"]  # unmarked: nothing to judge a ratio by


def test_a_failed_run_is_reported_and_fails_the_command(fake, tmp_path, capsys):
    lib, _ = fake
    out = tmp_path / "ab.json"
    rc = ab.main(["--lib", lib("base", 1.0), "--lib", lib("broken", -1), "--rounds", "1", "--json", str(out),
                  "--module", "fakebench"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "run 2_broken failed (exit 3)" in err and "bench: exploded" in err
    assert "no comparison" in err
    record = json.loads(out.read_text())
    assert list(record["runs"]) == ["1_base"] and record["failed"]["2_broken"]["returncode"] == 3
    assert record["means_ms"] == {}


def test_time_limit_stops_starting_runs(fake, monkeypatch, capsys):
    lib, calls = fake
    monkeypatch.setenv("FAKE_SLEEP", "0.5")
    rc = ab.main(["--lib", lib("a", 1.0), "--lib", lib("b", 1.0), "--time-limit", "0.2", "--module", "fakebench"])
    assert rc == 1  # only `a` ran: nothing to compare it with
    assert len(calls()) == 1
    assert "time limit reached after 1 of 4 runs" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--lib", "nopath"], "wants NAME=PATH"),
    (["--lib", "a=/no/such/lib.so", "--lib", "b=/no/such/lib.so"], "no such library file"),
])
def test_bad_library_arguments_name_the_problem(args, message, capsys):
    with pytest.raises(SystemExit):
        ab.main(args)
    assert message in capsys.readouterr().err


def test_one_library_duplicate_names_and_bench_json_are_refused(fake, capsys):
    lib, _ = fake
    for args, message in [
        (["--lib", lib("a", 1.0)], "two or more libraries"),
        (["--lib", lib("a", 1.0), "--lib", lib("a", 2.0)], "distinct names"),
        (["--lib", lib("a", 1.0), "--lib", lib("b", 1.0), "--rounds", "0"], "at least 1"),
        (["--lib", lib("a", 1.0), "--lib", lib("b", 1.0), "--", "--json", "x.json"], "set by ab itself"),
    ]:
        with pytest.raises(SystemExit):
            ab.main(args)
        assert message in capsys.readouterr().err


def test_command_line_help_runs():
    import subprocess

    out = subprocess.run([sys.executable, "-m", "bitsandbytes_lowra.bench.ab", "--help"], capture_output=True,
                         text=True)
    assert out.returncode == 0 and "NAME=PATH" in out.stdout and "--rounds" in out.stdout


def test_long_library_names_keep_their_columns_apart():
    means = {"matmul/8x8/m=1/lowra_1.75bit": {"main": 0.043, "nomath_prefetch": 0.0341, "noload_half2": 0.0343}}
    names = ["main", "nomath_prefetch", "noload_half2"]
    head, row = ab.table(means, names, {"matmul/8x8/m=1/lowra_1.75bit": 0.016}).splitlines()
    assert head.split()[5:] == ["main", "nomath_prefetch", "noload_half2", "nomath_prefetch/main",
                                "noload_half2/main", "spread"]
    assert row.split()[1:] == ["43.0", "34.1", "34.3", "0.793*", "0.798*", "1.6%"]
    # each figure ends where its column's title ends
    assert row.index("0.798*") + len("0.798*") == head.index("noload_half2/main") + len("noload_half2/main")
    assert row.index("34.1") + len("34.1") == head.index("nomath_prefetch ") + len("nomath_prefetch")
