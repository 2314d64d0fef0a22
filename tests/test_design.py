"""The design's promises about the code itself: read in one sitting (the core's token budget, no module too big,
short functions, lines that fit, few names imported from one module), imports that flow one way, and none of
the constructs a reader trips on. The measures are ../shared/tools/budget.py's."""

import ast
import io
import tokenize
from pathlib import Path

# The core, in the order imports flow: a module imports only those before it
ORDER = [
    "util",
    "data",
    "batches",
    "lora",
    "settings",
    "backbone",
    "readout",
    "runs",
    "eval",
    "train",
    "ablate",
]
ANALYSIS = [
    "probe",
    "pooled",
    "explain",
]  # scripts that nothing imports (and bench/, a folder of them)
ROOT = Path(__file__).resolve().parents[1]
LIMITS = dict(total=19_500, module=4_000, function=50, names=12)
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


def test_the_core_is_every_top_level_module_but_the_analysis_scripts():
    assert sorted(p.stem for p in ROOT.glob("*.py")) == sorted(ORDER + ANALYSIS)


def test_the_core_fits_its_token_budget_with_lines_that_fit():
    tokens = {m: code_tokens(source(m)) for m in ORDER}
    lines = [line for m in ORDER for line in source(m).splitlines()]
    wide = sum(len(line) > 100 for line in lines)
    assert sum(tokens.values()) <= LIMITS["total"], tokens
    assert max(tokens.values()) <= LIMITS["module"], tokens
    assert wide <= 0.08 * len(lines), f"{wide} of {len(lines)} lines over 100 characters"


def test_the_token_count_is_the_budget_tools():
    counted = code_tokens(
        '"""A docstring."""\nx = f(1, 2)  # a comment\n\n\ndef g():\n    """Free."""\n    return x\n'
    )
    assert counted == 3 + 5 + 5 + 2  # x = f ( 1 , 2 ) | def g ( ) : | return x


def test_imports_flow_one_way_and_functions_stay_short():
    against, long, many = [], [], []
    for i, module in enumerate(ORDER + ANALYSIS):
        later = ANALYSIS + (ORDER[i + 1 :] if module in ORDER else [])
        names = {}
        for node in ast.walk(ast.parse(source(module))):
            if isinstance(node, ast.Import):
                against += [f"{module} imports {a.name}" for a in node.names if a.name in later]
            elif isinstance(node, ast.ImportFrom) and node.module:
                against += [f"{module} imports {node.module}"] if node.module in later else []
                names.setdefault(node.module, set()).update(a.name for a in node.names)
            function = isinstance(node, ast.FunctionDef) and module in ORDER
            if function and node.end_lineno - node.lineno + 1 > LIMITS["function"]:
                long.append(f"{module}.{node.name}")
        ours = {m: n for m, n in names.items() if m in ORDER and module in ORDER}
        many += [
            f"{module} imports {len(n)} names from {m}" for m, n in ours.items() if len(n) > 12
        ]
    assert against == [] and long == [] and many == []


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


def test_the_benchmarks_are_scripts_of_at_most_300_lines_that_use_public_names():
    files = sorted((ROOT / "bench").glob("*.py"))
    assert len(files) > 1
    for file in files:
        text = file.read_text()
        assert len(text.splitlines()) <= 300, file.name
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.module in ORDER:
                assert not [a.name for a in node.names if a.name.startswith("_")], file.name
