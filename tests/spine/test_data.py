"""SFT data: formats, assistant-only targets, and errors that name the file, row and field."""

import json

import numpy as np
import pytest

from nova_rt.data.chat import IGNORE
from nova_rt.data.io import DataError
from nova_rt.data.sft import load_sft_samples
from nova_rt.models.tiny import byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_targets_cover_exactly_the_assistant_text(tmp_path, tok):
    f = _jsonl(tmp_path / "a.jsonl", [
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"},
                      {"role": "assistant", "content": "hello!"}, {"role": "user", "content": "again"},
                      {"role": "assistant", "content": "ok"}]},
        {"prompt": "2+2?", "response": "4"},
    ])
    samples, counts = load_sft_samples([f], tok, max_seq_len=4096)
    assert counts["samples"] == 2
    s0 = samples[0]
    sup = tok.decode([int(t) for t in s0.targets if t != IGNORE])
    assert sup == "hello!<|im_end|>\nok<|im_end|>\n"
    # targets are the next tokens: targets[t] == input_ids[t+1] wherever supervised
    idx = np.nonzero(s0.targets != IGNORE)[0]
    assert (s0.targets[idx] == s0.input_ids[idx + 1]).all() and s0.targets[-1] == IGNORE
    assert tok.decode([int(t) for t in samples[1].targets if t != IGNORE]) == "4<|im_end|>\n"


def test_parquet_json_and_datasets_dir(tmp_path, tok):
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(5)]
    (tmp_path / "r.json").write_text(json.dumps(rows))
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "r.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    for src in ("r.json", "r.parquet", "ds"):
        samples, counts = load_sft_samples([str(tmp_path / src)], tok, max_seq_len=512)
        assert counts["samples"] == 5, src


@pytest.mark.parametrize("bad, field", [
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 3}]}',
     "messages[1].content"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "messages[0].role"),
    ('{"prompt": "x"}', "response"),
    ('{"messages": []}', "messages"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "messages"),
    ('{"text": "x"}', None),
    ('{"prompt": "x", "response": ', None),
])
def test_bad_row_names_file_row_field(tmp_path, tok, bad, field):
    f = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "response": "fine"}, bad])
    with pytest.raises(DataError) as e:
        load_sft_samples([f], tok, max_seq_len=512)
    msg = str(e.value)
    assert "bad.jsonl" in msg and "row 2" in msg, msg
    if field:
        assert f"'{field}'" in msg, msg
    samples, counts = load_sft_samples([f], tok, max_seq_len=512, on_error="skip")
    assert counts["skipped_bad_rows"] == 1 and counts["samples"] == 1


def test_overlong_truncate_and_drop(tmp_path, tok):
    rng = np.random.default_rng()
    long = "x" * int(rng.integers(300, 400))
    f = _jsonl(tmp_path / "l.jsonl", [{"prompt": "p", "response": long}, {"prompt": "p", "response": "short"}])
    samples, counts = load_sft_samples([f], tok, max_seq_len=128, overlong="truncate")
    assert counts["truncated"] == 1 and max(len(s) for s in samples) == 128
    assert samples[0].targets[-1] == IGNORE
    samples, counts = load_sft_samples([f], tok, max_seq_len=128, overlong="drop")
    assert counts["dropped_overlong"] == 1 and counts["samples"] == 1
