"""The design's promises about the code itself: imports flow one way, no function is long."""

import ast
from pathlib import Path

ORDER = ["data", "lora", "readout", "eval", "train", "ablate"]
ROOT = Path(__file__).resolve().parents[1]


def test_imports_flow_one_way_and_functions_stay_short():
    against, long = [], []
    for i, module in enumerate(ORDER + ["bench"]):
        for node in ast.walk(ast.parse((ROOT / f"{module}.py").read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module]
                if isinstance(node, ast.ImportFrom) and node.module
                else []
            )
            later = ["bench"] + (
                ORDER[i + 1 :] if module != "bench" else []
            )  # nothing imports bench.py
            against += [f"{module} imports {n}" for n in names if n in later]
            if (
                isinstance(node, ast.FunctionDef)
                and node.end_lineno - node.lineno + 1 > 60
                and module != "bench"
            ):
                long.append(f"{module}.{node.name}")
    assert against == [] and long == []
