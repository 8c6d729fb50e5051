"""CPU benchmarks, side by side in one process: what `lowra eval`, `lowra finetune` and the sweep run on a machine
without a GPU.

    python -m bitsandbytes_lowra.bench.cpu [--json out.json] [--quick]

1. Dequantize to float32 and bfloat16: LowRA (1.75-bit mix, 4-bit) against bitsandbytes' CPU NF4
   `dequantize_4bit`, on a SmolLM2-135M MLP shape and a Llama-2-7B attention shape.
2. One training step of one layer + LoRA (forward + backward, float32, base frozen): nn.Linear, LinearLowRA
   (1.75-bit mix, 4-bit) and bitsandbytes' Linear4bit (NF4), on the SmolLM2-135M MLP shape.
3. Decoding: one layer's forward under inference_mode on 1 and 8 float32 activation rows (a generation step, a
   small batch of them): LinearLowRA (its CPU matmul), the dequantize + linear it replaces, bitsandbytes'
   Linear4bit and nn.Linear, on the dequantize shapes.
4. With --generate: greedy generation with SmolLM2-135M loaded in float32, with bitsandbytes NF4
   (BitsAndBytesConfig, double quantization) and with LowRA 1.75 bits (LowRAConfig; planning from the plan cache
   when it has the fits): tokens per second and load time.
Both scales are double-quantized (the default of LowRAConfig, and of QLoRA scripts). Times are medians of wall-clock
repeats on the threads torch uses (`torch.get_num_threads()`, set by OMP_NUM_THREADS).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time

import torch

from . import describe

DEQUANTIZE_SHAPES = ((1536, 576), (4096, 4096))
DECODE_ROWS = (1, 8)
TRAIN_SHAPE, TRAIN_TOKENS, LORA_R = (1536, 576), 512, 16
BLOCKSIZE = 64


def median_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def _bits(rows: int, name: str) -> torch.Tensor:
    from .kernels import mixed_bits

    if name == "1.75bit":
        return mixed_bits(rows, torch.Generator().manual_seed(rows))
    return torch.full((rows,), 4, dtype=torch.uint8)


def dequantize_bench(shapes, repeats: int) -> list[dict]:
    """Double-quantized scales for both. "ms": a call as users make it (a fresh output each time, as bitsandbytes'
    CPU dequantize_4bit, which has no out= form); "out_ms_by_isa": LowRA into a preallocated output (no page
    faults: the kernel and its call) at every instruction-set level the CPU has."""
    import bitsandbytes as bnb

    from ..backends import native
    from ..codebooks import nf_tables
    from ..functional import dequantize_lowra, quantize_lowra

    levels = [isa for isa in native.CPU_ISAS if native.set_cpu_isa(isa) == isa]
    native.set_cpu_isa()
    out = []
    for rows, cols in shapes:
        W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 0.02
        row = {"shape": [rows, cols]}
        for name in ("1.75bit", "4bit"):
            bits = _bits(rows, name)
            code, thr = nf_tables(bits)
            packed, qs = quantize_lowra(W, bits, code, thr, blocksize=BLOCKSIZE, compress_statistics=True)
            absmax, *nested = qs.scale_args()
            args = (packed, absmax, qs.bits, qs.code, qs.row_offsets, qs.blocksize, [rows, cols])
            for dt in (torch.float32, torch.bfloat16):
                ms = median_ms(lambda: dequantize_lowra(packed, qs, dtype=dt), repeats)
                buf = torch.empty(rows, cols, dtype=dt)
                by_isa = {}
                for isa in levels:
                    native.set_cpu_isa(isa)
                    by_isa[isa] = median_ms(lambda: torch.ops.lowra.dequantize.out(*args, dt, *nested, out=buf),
                                            repeats)
                native.set_cpu_isa()
                row[f"lowra_{name}_{str(dt)[6:]}"] = dict(ms=ms, gelem_s=rows * cols / ms / 1e6, out_ms_by_isa=by_isa)
        for dt in (torch.float32, torch.bfloat16):
            p, qs = bnb.functional.quantize_4bit(W.to(dt), blocksize=BLOCKSIZE, quant_type="nf4",
                                                 compress_statistics=True)
            ms = median_ms(lambda: bnb.functional.dequantize_4bit(p, qs), repeats)
            row[f"bnb_nf4_{str(dt)[6:]}"] = dict(ms=ms, gelem_s=rows * cols / ms / 1e6)
        out.append(row)
    return out


def _layers(shape) -> dict:
    """nn.Linear (float32, random weight), bitsandbytes' Linear4bit NF4 and LinearLowRA (1.75-bit mix, 4-bit) of it;
    double-quantized scales."""
    import bitsandbytes as bnb

    from ..nn import LinearLowRA

    rows, cols = shape
    lin = torch.nn.Linear(cols, rows, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 0.02)
    b4 = bnb.nn.Linear4bit(cols, rows, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                           compress_statistics=True)
    b4.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                  compress_statistics=True)
    b4 = b4.to("cpu")  # bitsandbytes quantizes the weight when the module is moved
    layers = {"nn_linear": lin, "bnb_nf4": b4}
    for name in ("1.75bit", "4bit"):
        layers[f"lowra_{name}"] = LinearLowRA.from_linear(lin, bits=_bits(rows, name), compute_dtype=torch.float32)
    return layers


def decode_bench(shapes, rows_list, repeats: int) -> list[dict]:
    """Forward under inference_mode: what a generation step runs per layer."""
    from ..functional import dequantize_lowra

    out = []
    for shape in shapes:
        # eval(): bitsandbytes' Linear4bit takes its CPU inference kernel only outside training mode
        layers = {name: layer.eval() for name, layer in _layers(shape).items()}
        low = layers["lowra_1.75bit"]
        packed, qs = low._packed_and_state()
        contenders = dict(layers)
        contenders["lowra_1.75bit_dequantize_linear"] = lambda x: torch.nn.functional.linear(
            x, dequantize_lowra(packed, qs, torch.float32))
        row = {"shape": list(shape)}
        for m in rows_list:
            x = torch.randn(m, shape[1], generator=torch.Generator().manual_seed(m))
            with torch.inference_mode():
                row[str(m)] = {name: dict(ms=median_ms(lambda f=f: f(x), repeats)) for name, f in contenders.items()}
        out.append(row)
    return out


GENERATE_PROMPT = "The history of the city of Paris begins"


def generate_bench(new_tokens: int, repeats: int) -> dict:
    """Tokens per second of `generate` (greedy, exactly new_tokens) for each way of loading the default model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from ..data import smollm2_checkpoint
    from ..integrations.transformers import LowRAConfig

    path = smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(GENERATE_PROMPT, return_tensors="pt")
    configs = {
        "float32": None,
        "bnb_nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32),
        "lowra_1.75bit": LowRAConfig(bits=1.75),
    }
    res = {"model": "SmolLM2-135M", "prompt_tokens": int(enc["input_ids"].shape[1]), "new_tokens": new_tokens}
    for name, config in configs.items():
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu",
                                                     quantization_config=config).eval()
        load_s = time.perf_counter() - t
        gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        with torch.inference_mode():
            model.generate(**enc, max_new_tokens=4, do_sample=False)  # warm-up
            ms = median_ms(lambda m=model: m.generate(**enc, **gen), repeats, warmup=0)
            text = tok.decode(model.generate(**enc, **gen)[0, enc["input_ids"].shape[1]:][:12])
        res[name] = dict(tok_s=new_tokens / ms * 1e3, load_s=load_s, start=text)
        model = None  # the next contender loads into freed memory
    return res


def training_bench(shape, tokens: int, r: int, repeats: int) -> dict:
    from .e2e import LoRA

    rows, cols = shape
    contenders = _layers(shape)
    x = torch.randn(tokens, cols, requires_grad=True)
    res = {"shape": [rows, cols], "tokens": tokens, "lora_r": r}
    for name, base in contenders.items():
        layer = LoRA(base.requires_grad_(False), cols, rows, r, device="cpu", dtype=torch.float32)
        res[name] = dict(ms=median_ms(lambda: layer(x).sum().backward(), repeats))
    for name in ("lowra_1.75bit", "lowra_4bit"):
        res[f"{name}_vs_bnb"] = res[name]["ms"] / res["bnb_nf4"]["ms"]
    return res


def environment() -> dict:
    import bitsandbytes

    from .. import __version__
    from ..backends import native

    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                cpu=platform.processor() or platform.machine(), isa=native.cpu_isa(), threads=torch.get_num_threads(),
                torch=torch.__version__, bitsandbytes=bitsandbytes.__version__, bitsandbytes_lowra=__version__,
                python=platform.python_version())


def run(quick: bool = False, dequantize_shapes=DEQUANTIZE_SHAPES, train_shape=TRAIN_SHAPE,
        tokens: int = TRAIN_TOKENS, decode_rows=DECODE_ROWS) -> dict:
    repeats = 3 if quick else 10
    return dict(environment=environment(), dequantize=dequantize_bench(dequantize_shapes, repeats),
                training=training_bench(train_shape, tokens, LORA_R, repeats),
                decode=decode_bench(dequantize_shapes, decode_rows, repeats))


def table(res: dict) -> str:
    e = res["environment"]
    lines = [f"{e['cpu']} ({e['isa']}), {e['threads']} threads  torch {e['torch']}  "
             f"bitsandbytes {e['bitsandbytes']}  {e['date']}",
             "dequantize ms (f32 / bf16):"]
    for d in res["dequantize"]:
        cells = [f"{n} {d[n + '_float32']['ms']:.2f} / {d[n + '_bfloat16']['ms']:.2f}"
                 for n in ("lowra_1.75bit", "lowra_4bit", "bnb_nf4")]
        lines.append(f"  {d['shape'][0]}x{d['shape'][1]}: " + " | ".join(cells))
        by = d["lowra_1.75bit_bfloat16"]["out_ms_by_isa"]
        lines.append("    LowRA 1.75 bf16 into a preallocated output, by instruction set: "
                     + ", ".join(f"{k} {v:.2f}" for k, v in by.items()))
    lines.append("decode, one layer's forward under inference_mode, ms (LowRA 1.75 | its dequantize + linear | "
                 "LowRA 4-bit | bnb NF4 | nn.Linear):")
    names = ("lowra_1.75bit", "lowra_1.75bit_dequantize_linear", "lowra_4bit", "bnb_nf4", "nn_linear")
    for d in res["decode"]:
        cells = [f"{m} rows " + " | ".join(f"{d[m][n]['ms']:.3f}" for n in names)
                 for m in d if m != "shape"]
        lines.append(f"  {d['shape'][0]}x{d['shape'][1]}: " + "; ".join(cells))
    g = res.get("generate")
    if g:
        lines.append(f"generate ({g['model']}, {g['new_tokens']} new tokens, greedy): "
                     + " | ".join(f"{n} {g[n]['tok_s']:.1f} tok/s (load {g[n]['load_s']:.1f} s)"
                                  for n in ("float32", "bnb_nf4", "lowra_1.75bit")))
    t = res["training"]
    lines.append(f"training step ms ({t['shape'][0]}x{t['shape'][1]}, {t['tokens']} tokens, LoRA r={t['lora_r']}): "
                 + " | ".join(f"{n} {t[n]['ms']:.2f}" for n in ("nn_linear", "lowra_1.75bit", "lowra_4bit", "bnb_nf4")))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bitsandbytes_lowra.bench.cpu", description=describe(__doc__))
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--quick", action="store_true", help="fewer repeats (smoke test)")
    ap.add_argument("--generate", type=int, default=0, metavar="N",
                    help="also time greedy generation of N tokens with SmolLM2-135M (float32, bnb NF4, LowRA 1.75)")
    from ..backends import native

    ap.add_argument("--isa", choices=native.CPU_ISAS, default=None,
                    help="cap LowRA's CPU dequantize at this instruction set (default: the CPU's best)")
    args = ap.parse_args(argv)
    if args.isa:
        got = native.set_cpu_isa(args.isa)
        if got != args.isa:
            ap.error(f"this CPU has no {args.isa} (best: {got})")
    res = run(quick=args.quick)
    if args.generate:
        res["generate"] = generate_bench(args.generate, 2 if args.quick else 5)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    print(table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
