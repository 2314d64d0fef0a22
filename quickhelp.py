"""`--help` without loading torch: each script imports this module first. A script that builds its parser
saves the parser's help text here (`save`); `SCRIPT --help` prints that saved text and exits before torch is
imported, as long as nothing it was made from has changed: the sources beside this file, the terminal
width argparse wraps to, and what decides `--device`'s default (a GPU driver, CUDA_VISIBLE_DEVICES).
Otherwise the script runs as before: builds its parser, saves the text, and argparse prints it.

Imports nothing but the standard library, so that the saved help costs no more than Python's start.
"""

import hashlib
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).parent
SAVED = HERE / "cache" / "help"


def saved_file(script):
    """Where the help of `script` (a path as in sys.argv[0]) is kept, named by what it depends on."""
    h = hashlib.sha256()
    for source in sorted(HERE.glob("*.py")):
        h.update(source.read_bytes())
    width = shutil.get_terminal_size().columns  # argparse wraps its help to this width
    gpu = (
        Path("/dev/nvidiactl").exists(),
        os.environ.get("CUDA_VISIBLE_DEVICES"),
    )  # --device's default
    h.update(repr((Path(script).name, width, gpu, sys.version)).encode())
    return SAVED / f"{Path(script).stem}-{h.hexdigest()[:16]}.txt"


def save(parser):
    """Keep `parser`'s help for the next `--help`, when it is the parser of the script being run (not of
    a test that imports it); a folder that cannot be written keeps none."""
    file = saved_file(sys.argv[0])
    if Path(sys.argv[0]).resolve().parent != HERE.resolve() or file.exists():
        return
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(parser.format_help())
        os.replace(tmp, file)
    except OSError:
        tmp.unlink(missing_ok=True)


def answer_help():
    """`-h`/`--help` on the command line and the help saved for it: print it and exit."""
    if not {"-h", "--help"} & set(sys.argv[1:]):
        return
    file = saved_file(sys.argv[0])
    if file.exists():
        sys.stdout.write(file.read_text())
        raise SystemExit(0)


answer_help()
