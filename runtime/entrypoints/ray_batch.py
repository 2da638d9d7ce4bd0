"""OpenAI batch jobs across GPUs and machines on Ray: one engine per Ray actor, through Ray Data's map_batches.

`BatchPredictor` is the callable class map_batches runs in each actor: it loads one `LLM` (tensor-parallel over
its actor's GPUs when `tensor_parallel_size` > 1) and answers each batch of request lines with `run_batch`, the
single-process batch command's own code, so that every line gets the same response either way (its own error
object when it cannot run). `run_ray_batch` is `ggtriton batch --ray`: it skips the custom_ids an earlier,
interrupted run already wrote, and appends the other responses in input order as they arrive.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..llm import LLM
from .openai_batch import custom_id_of, resume, run_batch

_REQUEST_FIELDS = ("custom_id", "method", "url", "body")
BATCH_SIZE = 64  # request lines per map_batches call: one continuous batch of the actor's engine


class BatchPredictor:
    """Ray Data's map_batches callable class (see the README's recipe): one engine per actor.

    A batch holds request lines as text (a "line" column, with their numbers in the file in "line_number";
    or the "text" column of `ray.data.read_text`) or as the columns of `ray.data.read_json` (custom_id, method,
    url, body; the null fields Arrow adds when it merges the lines' bodies are dropped). Returns {"output": one
    OpenAI batch response line (JSON text) per request} in the batch's order, with "line_number" passed through.
    Errors name a line by its "line_number", else by its place in the batch.
    """

    def __init__(self, model: str | os.PathLike, *, chat_template: str | None = None, **llm_kwargs: Any):
        from .cli import _use_chat_template

        self.llm = LLM(model, **llm_kwargs)
        _use_chat_template(self.llm, chat_template)  # as `ggtriton batch` does: the same prompts either way
        self.model_name = Path(model).name

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list]:
        if "line" in batch or "text" in batch:
            lines = [str(x) for x in batch["line" if "line" in batch else "text"]]
        else:
            columns = [k for k in _REQUEST_FIELDS if k in batch]
            rows = len(batch[columns[0]]) if columns else 0
            lines = [json.dumps({k: _plain(batch[k][i]) for k in columns}) for i in range(rows)]
        numbers = [int(n) for n in batch["line_number"]] if "line_number" in batch else None
        # a blank line would get no response: every row here must get one, in its place
        lines = [line if line.strip() else "null" for line in lines]
        out = {"output": [json.dumps(r, ensure_ascii=False) for r in run_batch(self.llm, lines, self.model_name,
                                                                               numbers)]}
        if numbers is not None:
            out["line_number"] = numbers
        return out


def _plain(value: Any) -> Any:
    """A value of a Ray batch as plain JSON data: arrays as lists, numpy scalars as Python's, no null fields."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.dtype != object else [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def run_ray_batch(input_path: str | os.PathLike, output_path: str | os.PathLike, model: str | os.PathLike, *,
                  num_replicas: int | None = None, tensor_parallel_size: int = 1, use_gpus: bool | None = None,
                  chat_template: str | None = None, **llm_kwargs: Any) -> tuple[int, int, int]:
    """Run the batch file `input_path` on `num_replicas` Ray actors (default: as many as the cluster's GPUs hold,
    `tensor_parallel_size` GPUs each; one on a cluster without GPUs), appending the responses to `output_path`
    in input order. Connects to the Ray cluster `ray.init()` finds (RAY_ADDRESS), or starts a local one, unless
    Ray is already initialized. Returns (responses written, of which errors, lines skipped as already done)."""
    import ray

    with open(input_path, encoding="utf-8") as f:
        numbered = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    done = resume(output_path)
    todo = [(n, line) for n, line in numbered
            if (cid := custom_id_of(line)) is None or json.dumps(cid) not in done]
    written = failed = 0
    with open(output_path, "a", encoding="utf-8") as out:
        if not todo:
            return 0, 0, len(numbered)
        if not ray.is_initialized():
            ray.init()
        gpus = ray.cluster_resources().get("GPU", 0) if use_gpus is not False else 0
        if use_gpus and not gpus:
            raise ValueError("the Ray cluster has no GPUs")
        if num_replicas is None:
            num_replicas = max(1, int(gpus) // tensor_parallel_size)
        resources = {"num_gpus": tensor_parallel_size} if gpus else {"num_cpus": tensor_parallel_size}
        ray.data.DataContext.get_current().execution_options.preserve_order = True  # responses in input order
        ds = ray.data.from_items([{"line_number": n, "line": line} for n, line in todo])
        answers = ds.map_batches(BatchPredictor, batch_size=BATCH_SIZE,
                                 compute=ray.data.ActorPoolStrategy(size=num_replicas),
                                 fn_constructor_args=(str(model),),
                                 fn_constructor_kwargs={"chat_template": chat_template,
                                                        "tensor_parallel_size": tensor_parallel_size, **llm_kwargs},
                                 **resources)
        for row in answers.iter_rows():
            out.write(row["output"] + "\n")
            out.flush()  # what an interruption leaves is whole lines, and the next run skips them
            written += 1
            failed += json.loads(row["output"])["error"] is not None
    return written, failed, len(numbered) - len(todo)
