"""Run notebooks in place and save their outputs, skipping what nbdev_test skips (`#| eval: false` and the tst_flags
cells: install, slow, hub, cuda, notest). For the saved figures and prints that the docs and the README show.
Usage: OMP_NUM_THREADS=1 python .ci/run_nb.py [--flags slow] [--also CELL_ID] nbs/index.ipynb [more notebooks]   (then nbdev_clean)"""
import os, sys
from pathlib import Path
from execnb.nbio import read_nb, write_nb
from execnb.shell import CaptureShell
from nbdev.config import get_config
from nbdev.process import NBProcessor
from nbdev.frontmatter import FrontmatterProc

def run_nb(path:Path, flags=(), also=()):
    skip = set(get_config().tst_flags.split()) - set(flags)
    def no_eval(cell):
        if cell.cell_type != "code": return True
        if cell.get("id") in also: return False
        d = getattr(cell, "directives_", {}) or {}
        return d.get("eval:", [""])[0].lower() == "false" or bool(skip & d.keys())
    nb = NBProcessor(path, procs=FrontmatterProc, process=True).nb  # parses the directives as nbdev_test does
    raw = read_nb(path)
    cwd = os.getcwd(); os.chdir(path.parent)
    try: CaptureShell(path).run_all(nb, exc_stop=True, preproc=no_eval)
    finally: os.chdir(cwd)
    for c, r in zip(nb.cells, raw.cells):  # keep the sources as they are, take the new outputs
        if r.cell_type == "code": r.outputs, r.execution_count = c.get("outputs", []), None
    write_nb(raw, path)

if __name__ == "__main__":  # --flags slow: run the slow cells too
    args = sys.argv[1:]; opt = lambda o: args[args.index(o) + 1].split() if o in args else []
    for p in [a for a in args if a.endswith(".ipynb")]: run_nb(Path(p).absolute(), opt("--flags"), opt("--also")); print("ran", p)
