"""`ggtriton batch --ray` and the Ray Data recipe on a local Ray cluster of 2 CPUs, 2 replicas: the responses of
the single-process batch command, in input order, a bad line answered by its own error, and a resumed job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray

from ggtriton.runtime.entrypoints.cli import main
from ggtriton.runtime.synthetic import SyntheticModel, write_synthetic_model

from test_tensor_parallel import time_limit  # noqa: F401 - each test here is bounded in time too


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> tuple[Path, Path, list[dict]]:
    """A model, a batch file (chat and completion lines, an invalid line, a line with a bad field) and the
    single-process command's responses to it."""
    d = tmp_path_factory.mktemp("ray")
    model, requests = d / "tiny.gguf", d / "in.jsonl"
    write_synthetic_model(model, SyntheticModel("llama", vocab=300, seed=8))
    lines = []
    for i in range(7):
        body = ({"prompt": f"text {i}", "max_tokens": 3 + i, "temperature": 0.0} if i % 2 else
                {"messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 4, "temperature": 0.0})
        lines.append(json.dumps({"custom_id": f"req-{i}", "method": "POST",
                                 "url": "/v1/completions" if i % 2 else "/v1/chat/completions", "body": body}))
    lines.insert(2, "{not json")
    lines.insert(5, json.dumps({"custom_id": "bad-field", "url": "/v1/completions",
                                "body": {"prompt": "x", "max_tokens": "many"}}))
    requests.write_text("\n".join(lines) + "\n")
    assert main(["batch", "-m", str(model), str(requests), str(d / "ref.jsonl")]) == 0
    return model, requests, _read(d / "ref.jsonl")


def _read(path: Path) -> list[dict]:
    """The response lines, less what differs between runs (random ids, times, engine request ids)."""
    out = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        del r["id"]
        if r["response"]:
            del r["response"]["request_id"], r["response"]["body"]["id"], r["response"]["body"]["created"]
        out.append(r)
    return out


def test_ray_batch_matches_single_process(cluster, job, tmp_path, capsys):
    model, requests, ref = job
    out = tmp_path / "out.jsonl"
    assert main(["batch", "-m", str(model), "--ray", "--num-replicas", "2", str(requests), str(out)]) == 0
    assert _read(out) == ref
    errors = {r["custom_id"]: r["error"]["message"] for r in ref if r["error"]}
    assert errors == {None: "line 3: invalid JSON: Expecting property name enclosed in double quotes at column 2",
                      "bad-field": "line 6: body.max_tokens must be an integer, got 'many'"}
    assert sum(r["response"] is not None for r in ref) == 7
    assert "7 requests done, 2 failed, 0 already in the output" in capsys.readouterr().err


def test_ray_batch_resumes(cluster, job, tmp_path, capsys):
    model, requests, ref = job
    out = tmp_path / "out.jsonl"
    ref_lines = (requests.parent / "ref.jsonl").read_text().splitlines(keepends=True)
    # an interrupted run: the first four responses, and a fifth cut short
    out.write_text("".join(ref_lines[:4]) + ref_lines[4][:20])
    assert main(["batch", "-m", str(model), "--ray", "--num-replicas", "2", str(requests), str(out)]) == 0
    # the invalid line has no custom_id to skip it by: it is answered again, in its place among the rest
    assert ref[2]["custom_id"] is None
    assert _read(out) == ref[:4] + [ref[2]] + ref[4:]
    assert "4 requests done, 2 failed, 3 already in the output" in capsys.readouterr().err


def test_recipe_read_json(cluster, job):
    """The README's recipe: ray.data.read_json, map_batches with the BatchPredictor class."""
    from ggtriton.runtime.entrypoints.ray_batch import BatchPredictor

    model, requests, ref = job
    valid = requests.parent / "valid.jsonl"
    valid.write_text("".join(line for line in requests.read_text().splitlines(keepends=True) if "req-" in line))
    ds = ray.data.read_json(str(valid)).map_batches(BatchPredictor, fn_constructor_args=(str(model),),
                                                     compute=ray.data.ActorPoolStrategy(size=2), batch_size=4,
                                                     num_cpus=0.5)  # half a CPU each: the read needs one free
    got = sorted((json.loads(row["output"]) for row in ds.iter_rows()), key=lambda r: r["custom_id"])
    for r in got:
        del r["id"], r["response"]["request_id"], r["response"]["body"]["id"], r["response"]["body"]["created"]
    assert got == sorted((r for r in ref if r["error"] is None), key=lambda r: r["custom_id"])
