"""bench/serve.py --structured json_schema on the CPU with the tiny shape: one call measures the unconstrained
baseline and the JSON-schema run on the same server and prompts, their throughput ratio, and the grammar's compile
times (its real figures come from the GPU)."""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_structured_serve_reports_baseline_ratio_and_compile_times(tmp_path):
    out = tmp_path / "result.json"
    printed = subprocess.run([sys.executable, str(ROOT / "bench" / "serve.py"), "--launch", "tiny-llama", "--device",
                              "cpu", "--num-prompts", "4", "--input-len", "16", "--output-len", "6",
                              "--max-num-seqs", "4", "--client-processes", "1", "--structured", "json_schema",
                              "--json", str(out)], check=True, timeout=300, capture_output=True, text=True).stdout
    result = json.loads(out.read_text())
    baseline = result["baseline"]
    # every request of both runs produced its output_len tokens (the schema's array cannot close sooner)
    assert result["completed"] == baseline["completed"] == 4 and result["failed"] == baseline["failed"] == 0
    assert result["structured_over_baseline"] == result["output_tokens_per_s"] / baseline["output_tokens_per_s"] > 0
    grammar = result["grammar_compile_s"]
    assert grammar["vocabulary_s"] > 0 and grammar["schema_first_s"] > 0 and grammar["schema_cached_s"] > 0
    assert result["args"]["structured"] == "json_schema" and result["args"]["tokenizer"] == "qwen"
    ratio = re.search(r"^json_schema / baseline output throughput: ([\d.]+) ", printed, re.MULTILINE)
    assert ratio and float(ratio[1]) == round(result["structured_over_baseline"], 3), printed
    assert printed.index("baseline (no structured output):") < printed.index("structured (json_schema):")
