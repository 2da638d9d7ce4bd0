"""`ggtriton inspect` on the real models, and the package layout it is installed with."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ggtriton.gguf import GGUFFile
from ggtriton.gguf.describe import JSON_ARRAY_LIMIT
from ggtriton.runtime.entrypoints.cli import main

REPO = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_summary_of_smollm2(capsys, smollm2_path):
    code, out, _ = run_cli(capsys, "inspect", str(smollm2_path))
    assert code == 0
    for expected in ("architecture   llama", "file type      Q4_1", "parameters     134.52M (134,515,008)",
                     "gpt2, pre-tokenizer smollm, 49,152 tokens", "chat template  present", "block_count",
                     "attention.head_count_kv           3"):
        assert expected in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[-3:]}
    assert rows["Q4_1"][1] == "210" and rows["Q8_0"][1] == "1" and rows["F32"][1] == "61"


def test_inspect_summary_of_gemma3(capsys, gemma3_path):
    code, out, _ = run_cli(capsys, "inspect", "-m", str(gemma3_path))
    assert code == 0
    for expected in ("architecture   gemma3", "file type      Q4_K_M", "262,144 tokens", "chat template  absent",
                     "attention.sliding_window          512"):
        assert expected in out


def test_inspect_json_matches_the_reader(capsys, real_model_path):
    code, out, _ = run_cli(capsys, "inspect", str(real_model_path), "--json")
    assert code == 0
    doc = json.loads(out)
    f = GGUFFile(real_model_path)
    assert doc["version"] == f.version
    assert list(doc["metadata"]) == list(f.metadata)
    for key, value in f.metadata.items():
        if isinstance(value, list) and len(value) > JSON_ARRAY_LIMIT:
            assert doc["metadata"][key] == {"type": f.value_types[key][1].name, "length": len(value)}
        else:
            assert doc["metadata"][key] == value
    assert doc["tensors"] == [
        {"name": t.name, "type": t.ggml_type.name, "shape": list(t.shape), "offset": t.offset, "nbytes": t.nbytes}
        for t in f.tensors.values()
    ]


def test_inspect_defaults_to_the_bundled_model(capsys, smollm2_path):
    code, out, _ = run_cli(capsys, "inspect")
    assert code == 0 and out.startswith(smollm2_path.name)


def test_inspect_bad_file_is_a_clean_error(capsys, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(30))
    code, out, err = run_cli(capsys, "inspect", str(bad))
    assert code == 1 and out == ""
    assert err.startswith("ggtriton: error: ") and str(bad) in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "inspect", str(tmp_path / "missing.gguf"))
    assert code == 1 and "cannot open" in err


def test_console_script_and_module_entry_point(smollm2_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = Path(sys.executable).with_name("ggtriton")
    for cmd in ([str(script), "inspect", str(smollm2_path), "--json"],
                [sys.executable, "-m", "ggtriton.runtime", "inspect", str(smollm2_path), "--json"]):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO / "tests", timeout=120)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["metadata"]["general.architecture"] == "llama"


def test_package_layout_keeps_pypi_names_free():
    # The code folders install only under the `ggtriton` namespace; `gguf` stays the PyPI package.
    import gguf

    import ggtriton.gguf
    import ggtriton.kernels
    import ggtriton.runtime

    assert Path(ggtriton.gguf.__file__).parent == REPO / "gguf" or "site-packages" in ggtriton.gguf.__file__
    assert Path(gguf.__file__).parent != REPO / "gguf"
    assert hasattr(gguf, "GGUFReader")
    spec = importlib.util.find_spec("kernels")
    assert spec is None or Path(spec.origin or "").parent != REPO / "kernels"
    import ggtriton

    assert not hasattr(ggtriton, "__file__") or ggtriton.__file__ is None, "ggtriton must be a namespace package"


@pytest.mark.parametrize("argv", [["inspect", "--bogus"], []])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
