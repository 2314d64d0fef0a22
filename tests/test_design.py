"""The design's promises about the code itself: read in one sitting (a token budget, short functions, lines
that fit), imports that flow one way, and none of the constructs a reader trips on."""

import ast
import io
import tokenize
from pathlib import Path

ORDER = ["data", "lora", "readout", "eval", "train", "ablate"]
ROOT = Path(__file__).resolve().parents[1]
BUDGET = 17_000  # code tokens of the six modules together, as ../shared/tools/budget.py counts them
SKIP = {
    tokenize.COMMENT,
    tokenize.NL,
    tokenize.NEWLINE,
    tokenize.INDENT,
    tokenize.DEDENT,
    tokenize.ENCODING,
    tokenize.ENDMARKER,
}


def source(module):
    return (ROOT / f"{module}.py").read_text()


def code_tokens(text):
    """Python tokens less comments, docstrings and layout (the counting of ../shared/tools/budget.py)."""
    spans = []
    for node in ast.walk(ast.parse(text)):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and body:
            first = body[0]
            text_first = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            if text_first and isinstance(first.value.value, str):
                spans.append((first.lineno, first.end_lineno))
    count = 0
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        docstring = tok.type == tokenize.STRING and any(
            a <= tok.start[0] and tok.end[0] <= b for a, b in spans
        )
        if tok.type not in SKIP and not docstring:
            count += 1
    return count


def test_the_six_modules_fit_the_token_budget_with_lines_that_fit():
    tokens = sum(code_tokens(source(m)) for m in ORDER)
    lines = [line for m in ORDER for line in source(m).splitlines()]
    wide = sum(len(line) > 100 for line in lines)
    assert tokens <= BUDGET, f"{tokens} code tokens, budget {BUDGET}"
    assert wide <= 0.08 * len(lines), f"{wide} of {len(lines)} lines over 100 characters"


def test_the_token_count_is_the_budget_tools():
    counted = code_tokens(
        '"""A docstring."""\nx = f(1, 2)  # a comment\n\n\ndef g():\n    """Free."""\n    return x\n'
    )
    assert counted == 3 + 5 + 5 + 2  # x = f ( 1 , 2 ) | def g ( ) : | return x


def test_imports_flow_one_way_and_functions_stay_short():
    against, long = [], []
    for i, module in enumerate(ORDER + ["bench", "probe", "pooled"]):
        later = ["bench", "probe", "pooled"]  # nothing imports the analysis scripts
        if module in ORDER:
            later += ORDER[i + 1 :]
        for node in ast.walk(ast.parse(source(module))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            against += [f"{module} imports {n}" for n in names if n in later]
            function = isinstance(node, ast.FunctionDef) and module in ORDER
            if function and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{module}.{node.name}")
    assert against == [] and long == []


def test_no_backslash_continuations_and_no_chained_conditional_expressions():
    found = []
    for module in ORDER:
        text = source(module)
        for n, line in enumerate(text.splitlines(), 1):
            if line.rstrip().endswith("\\"):
                found.append(f"{module}.py:{n}: a backslash continuation")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.IfExp) and (
                isinstance(node.body, ast.IfExp) or isinstance(node.orelse, ast.IfExp)
            ):
                found.append(f"{module}.py:{node.lineno}: a chained conditional expression")
    assert found == []
