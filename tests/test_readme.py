"""The README's "Use it from Python" snippet runs exactly as printed, from a clean directory."""

import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_snippet():
    section = README.read_text().split("## Use it from Python", 1)[1].split("\n## ", 1)[0]
    [code] = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return code


def test_snippet_is_at_most_15_lines():
    assert len(python_snippet().strip().splitlines()) <= 15


def test_snippet_cuts_trains_evaluates_and_exports(tmp_path):
    code = python_snippet()
    assert "tfsplit.split_model(" in code and ".fit(" in code and "export_head(" in code
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    printed = [line for line in result.stdout.splitlines() if "'payload_bytes_up'" in line]
    assert [line.split()[0] for line in printed] == ["16", "8"]
    assert all("'accuracy'" in line for line in printed)
    assert (tmp_path / "my_head" / "head_int8.tflite").is_file()
