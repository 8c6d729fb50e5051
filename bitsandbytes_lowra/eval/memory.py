"""Memory model of LoRA fine-tuning and inference on quantized base weights (the paper's Appendix C).

The model is built from its transformers config on the meta device, so no weight is ever allocated: we only read
the linear layers' shapes and the count of the other parameters. Every byte size below is a parameter of
`memory_breakdown` (docs/evaluation.md has the formulas and a worked table).

Components, in bytes (Q = quantized linear layers = every nn.Linear but the output embedding, R x C each):

- quantized_weights: LowRA packs each row's codes at the average `bits` over rows padded to the block size:
  bits * R * ceil(C / blocksize) * blocksize / 8. QLoRA NF4: 4 bits per weight (bnb blocks span the flattened weight).
- metadata (LowRA, our storage format, bitsandbytes_lowra.format): absmax per block of a row (float32, or with
  double quantization uint8 + a float32 absmax per `dq_blocksize` first-level values + the 256-entry float32 code
  table + one float32 offset per layer, as bitsandbytes' compress_statistics), per row a float16 codebook of 16 slots
  and float16 thresholds of 15 slots (shared_codebooks=True: one set per layer and precision instead), row byte
  offsets int64 [R + 1], bits uint8 [R].
  QLoRA NF4: absmax per 64 weights (same double quantization) + its float32 16-entry code table per layer.
- nonquantized_params: every other parameter (embeddings, norms, untied lm_head) at `param_bytes` (bf16 = 2).
- lora_params: rank r adapters on every quantized layer, r * (C + R) each, at `lora_bytes`; lora_grads likewise at
  `grad_bytes`; optimizer_states: Adam's two float32 moments (`optimizer_bytes` = 8 per LoRA parameter).
- activations (fine-tuning only; linear layers only, as the paper's Appendix C and QLoRA's Figure 6): each LoRA
  adapter saves its input (C values per token; its own copy, as when LoRA dropout is on) and its rank-r
  intermediate (r values per token) for the backward pass. Without gradient checkpointing all layers' are alive at
  once: tokens * sum_Q (C + r) * act_bytes. With it (the default) only one decoder layer's are, plus the checkpointed
  hidden state entering each layer: tokens * (L * hidden + sum_Q (C + r) / L) * act_bytes, tokens = batch * seq.
  Attention scores, nonlinearities and the logits are not counted (include_logits=True adds float32 logits).
- inference_total = quantized_weights + metadata + nonquantized_params + lora_params (unmerged adapters; no KV cache).
- finetune_total = inference_total + lora_grads + optimizer_states + activations.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import torch

from ..format import ALLOWED_BITS, CODEBOOK_SLOTS, DEFAULT_BLOCKSIZE, THRESHOLD_SLOTS, LowRAFormatError, check_blocksize

CONFIG_DIR = Path(__file__).parent / "configs"
MIB = 2**20
NF4_BLOCKSIZE = 64  # QLoRA's NF4 block size
NF4_CODE_BYTES = 16 * 4  # bnb's float32 NF4 quant_map, one per layer
DQ_CODE_BYTES = 256 * 4  # bnb's float32 dynamic 8-bit map used by double quantization, one per layer
DQ_OFFSET_BYTES = 4  # the float32 mean subtracted from absmax before double quantization, one per layer

INFERENCE_COMPONENTS = ("quantized_weights", "metadata", "nonquantized_params", "lora_params")
COMPONENTS = (
    "quantized_weights",
    "metadata",
    "nonquantized_params",
    "lora_params",
    "lora_grads",
    "optimizer_states",
    "activations",
)


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_config(config_or_path):
    """A transformers config from a config object, a dict, a .json path, or a shipped name (available_configs())."""
    from transformers import PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if isinstance(config_or_path, PretrainedConfig):
        return config_or_path
    if isinstance(config_or_path, (str, os.PathLike)):
        path = Path(config_or_path)
        if not path.suffix and (CONFIG_DIR / f"{path.name}.json").is_file() and not path.exists():
            path = CONFIG_DIR / f"{path.name}.json"
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"no config file at {str(config_or_path)!r}; shipped configs: {available_configs()}")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a JSON model config ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path} is not a model config: its JSON is a {type(d).__name__}, not an object")
    elif isinstance(config_or_path, dict):
        d = dict(config_or_path)
    else:
        raise ValueError(f"expected a config, dict, path or shipped name, got {type(config_or_path).__name__}")
    d = {k: v for k, v in d.items() if not k.startswith("_")}  # comments such as "_source"
    model_type = d.pop("model_type", None)
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"config needs a known model_type, got {model_type!r}")
    return CONFIG_MAPPING[model_type].from_dict(d)


@functools.lru_cache(maxsize=16)
def _shapes_cached(config_json: str):
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    d = json.loads(config_json)
    config = CONFIG_MAPPING[d["model_type"]].from_dict(d)
    # The meta device allocates no storage: a 65B model costs no memory here.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if any(p.device.type != "meta" for p in model.parameters()):
        raise RuntimeError("model construction allocated real weights; refusing to continue")
    out_emb = model.get_output_embeddings()
    quantized = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not out_emb]
    linears = tuple((n, m.out_features, m.in_features) for n, m in quantized)
    quantized_weights = {id(m.weight) for _, m in quantized}
    # Everything else (embeddings, norms, untied lm_head, biases) stays unquantized; named_parameters() lists a tied
    # weight once, so tied embeddings are counted once.
    other = sum(p.numel() for _, p in model.named_parameters() if id(p) not in quantized_weights)
    return linears, other


def model_shapes(config_or_path) -> tuple[list[tuple[str, int, int]], int]:
    """([(name, out_features, in_features)] of the quantizable linears, count of all other parameters)."""
    config = load_config(config_or_path)
    linears, other = _shapes_cached(config.to_json_string(use_diff=False))
    return list(linears), other


def _model_name(config_or_path, config) -> str:
    if isinstance(config_or_path, (str, os.PathLike)):
        p = Path(config_or_path)
        return p.parent.name if p.name == "config.json" else p.stem
    return getattr(config, "name_or_path", "") or config.model_type


def _absmax_bytes(n_blocks: int, double_quant: bool, dq_blocksize: int) -> int:
    if not double_quant:
        return 4 * n_blocks
    return n_blocks + 4 * math.ceil(n_blocks / dq_blocksize) + DQ_CODE_BYTES + DQ_OFFSET_BYTES


def lowra_metadata_bytes(rows: int, cols: int, blocksize: int = DEFAULT_BLOCKSIZE, double_quant: bool = True,
                         dq_blocksize: int = 256, shared_codebooks: bool = False) -> dict:
    """Bytes of the metadata our storage format keeps for one quantized [rows, cols] weight.

    shared_codebooks=True models the option of one codebook/threshold set per (layer, precision) instead of per row.
    """
    n_blocks = rows * math.ceil(cols / blocksize)
    tables = len(ALLOWED_BITS) if shared_codebooks else rows
    return {
        "absmax": _absmax_bytes(n_blocks, double_quant, dq_blocksize),
        "codebooks": tables * CODEBOOK_SLOTS * 2,  # float16
        "thresholds": tables * THRESHOLD_SLOTS * 2,  # float16
        "row_offsets": (rows + 1) * 8,  # int64
        "bits": rows,  # uint8
    }


def nf4_metadata_bytes(rows: int, cols: int, double_quant: bool = True, dq_blocksize: int = 256) -> dict:
    n_blocks = math.ceil(rows * cols / NF4_BLOCKSIZE)
    return {"absmax": _absmax_bytes(n_blocks, double_quant, dq_blocksize), "quant_map": NF4_CODE_BYTES}


def memory_breakdown(
    config_or_path,
    bits: float,
    lora_r: int = 64,
    *,
    blocksize: int = DEFAULT_BLOCKSIZE,
    double_quant: bool = True,
    dq_blocksize: int = 256,
    shared_codebooks: bool = False,
    batch_size: int = 1,
    seq_len: int = 512,
    gradient_checkpointing: bool = True,
    param_bytes: int = 2,
    lora_bytes: int = 2,
    grad_bytes: int = 2,
    optimizer_bytes: int = 8,
    act_bytes: int = 2,
    include_logits: bool = False,
) -> dict:
    """Fine-tuning and inference memory (bytes) of LowRA at `bits` average code bits, and of QLoRA NF4 (4 bits).

    Returns {"model", "settings", "counts", "lowra": {component: bytes, ..., "finetune_total", "inference_total",
    "effective_bits", "metadata_detail"}, "qlora_nf4": {same}}. Formulas: module docstring.
    """
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not 1.0 <= bits <= 4.0:
        raise ValueError(f"bits must be an average precision in [1, 4] (LowRA rows use 1, 2 or 4 bits), got {bits!r}")
    for name, v in (("lora_r", lora_r), ("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "lora_r" else 1):
            kind = "non-negative" if name == "lora_r" else "positive"
            raise ValueError(f"{name} must be a {kind} integer, got {v!r}")
    try:
        blocksize = check_blocksize(blocksize)
    except LowRAFormatError as e:
        raise ValueError(str(e)) from None
    if not isinstance(dq_blocksize, int) or dq_blocksize < 1:
        raise ValueError(f"dq_blocksize must be a positive integer, got {dq_blocksize!r}")

    config = load_config(config_or_path)
    linears, other_params = model_shapes(config)
    if not linears:
        raise ValueError("the model has no linear layers to quantize")
    n_layers = getattr(config, "num_hidden_layers", None)
    hidden = getattr(config, "hidden_size", None)
    if not n_layers or not hidden:
        raise ValueError("config needs num_hidden_layers and hidden_size for the activation estimate")

    q_params = sum(r * c for _, r, c in linears)
    rows = sum(r for _, r, _ in linears)
    lora_params = sum(lora_r * (r + c) for _, r, c in linears)
    lora_inputs = sum(c + lora_r for _, _, c in linears)  # values saved per token by all adapters
    tokens = batch_size * seq_len
    if gradient_checkpointing:
        activations = tokens * (n_layers * hidden + lora_inputs / n_layers) * act_bytes
    else:
        activations = tokens * lora_inputs * act_bytes
    if include_logits:
        activations += tokens * config.vocab_size * 4
    activations = int(math.ceil(activations))

    common = {
        "nonquantized_params": other_params * param_bytes,
        "lora_params": lora_params * lora_bytes,
        "lora_grads": lora_params * grad_bytes,
        "optimizer_states": lora_params * optimizer_bytes,
        "activations": activations,
    }

    def column(codes: int, meta: dict) -> dict:
        col = {"quantized_weights": codes, "metadata": sum(meta.values()), **common}
        col["inference_total"] = sum(col[k] for k in INFERENCE_COMPONENTS)
        col["finetune_total"] = sum(col[k] for k in COMPONENTS)
        col["effective_bits"] = 8 * (codes + col["metadata"]) / q_params
        col["metadata_detail"] = meta
        return col

    def add(dicts):
        out: dict[str, int] = {}
        for d in dicts:
            for k, v in d.items():
                out[k] = out.get(k, 0) + v
        return out

    lowra_codes = int(math.ceil(sum(bits * r * math.ceil(c / blocksize) * blocksize / 8 for _, r, c in linears)))
    lowra_meta = add(
        lowra_metadata_bytes(r, c, blocksize, double_quant, dq_blocksize, shared_codebooks) for _, r, c in linears
    )
    nf4_codes = sum(math.ceil(r * c / 2) for _, r, c in linears)
    nf4_meta = add(nf4_metadata_bytes(r, c, double_quant, dq_blocksize) for _, r, c in linears)

    return {
        "model": _model_name(config_or_path, config),
        "settings": {
            "bits": float(bits), "lora_r": lora_r, "blocksize": blocksize, "double_quant": double_quant,
            "dq_blocksize": dq_blocksize, "shared_codebooks": shared_codebooks, "batch_size": batch_size,
            "seq_len": seq_len,
            "gradient_checkpointing": gradient_checkpointing, "param_bytes": param_bytes, "lora_bytes": lora_bytes,
            "grad_bytes": grad_bytes, "optimizer_bytes": optimizer_bytes, "act_bytes": act_bytes,
            "include_logits": include_logits,
        },
        "counts": {
            "quantized_layers": len(linears), "quantized_params": q_params, "quantized_rows": rows,
            "nonquantized_params": other_params, "lora_params": lora_params,
            "num_hidden_layers": n_layers, "hidden_size": hidden,
        },
        "lowra": column(lowra_codes, lowra_meta),
        "qlora_nf4": column(nf4_codes, nf4_meta),
    }


def format_table(breakdowns: list[dict], unit: int = MIB, unit_name: str = "MiB", title: str | None = None) -> str:
    """Markdown table: components as rows; a QLoRA NF4 column (from the first breakdown) then one LowRA column each."""
    if not breakdowns:
        raise ValueError("no breakdowns to format")
    cols = [("QLoRA NF4", breakdowns[0]["qlora_nf4"])]
    cols += [(f"LowRA {b['settings']['bits']:g} bit", b["lowra"]) for b in breakdowns]
    rows = list(COMPONENTS) + ["inference_total", "finetune_total"]
    lines = []
    if title:
        lines += [f"**{title}** ({unit_name}; LoRA r={breakdowns[0]['settings']['lora_r']}, "
                  f"batch {breakdowns[0]['settings']['batch_size']} x seq {breakdowns[0]['settings']['seq_len']})", ""]
    lines.append("| component | " + " | ".join(name for name, _ in cols) + " |")
    lines.append("|---|" + "---:|" * len(cols))
    for r in rows:
        lines.append(f"| {r} | " + " | ".join(f"{c[r] / unit:,.1f}" for _, c in cols) + " |")
    bits_cells = " | ".join(f"{c['effective_bits']:.3f}" for _, c in cols)
    lines.append(f"| effective bits (codes + metadata) | {bits_cells} |")
    return "\n".join(lines)


def memory_table(config_or_path, bits_list, lora_r: int = 64, **kwargs) -> str:
    title = kwargs.pop("title", None)
    breakdowns = [memory_breakdown(config_or_path, b, lora_r, **kwargs) for b in bits_list]
    return format_table(breakdowns, title=title or breakdowns[0]["model"])


def main(argv=None) -> None:
    """`python -m bitsandbytes_lowra.eval.memory llama-2-7b 4 2 1.75`: print the memory table."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("config", help=f"a config.json path or one of {available_configs()}")
    p.add_argument("bits", type=float, nargs="+")
    p.add_argument("--lora-r", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--no-double-quant", action="store_true")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--shared-codebooks", action="store_true")
    args = p.parse_args(argv)
    print(memory_table(args.config, args.bits, args.lora_r, seq_len=args.seq_len, batch_size=args.batch_size,
                       double_quant=not args.no_double_quant, shared_codebooks=args.shared_codebooks,
                       gradient_checkpointing=not args.no_gradient_checkpointing))


if __name__ == "__main__":
    main()
