"""Execute notebooks as nbdev_test does (the same cells skipped: `#| eval: false` and the test flags not asked for) and save
their outputs into the notebooks, so the docs show what the code does. Quarto is not installable here, so this stands in for
running the notebooks in Jupyter.

Usage: python scripts/run_nb.py [--flags "slow"] [--skip TEXT] [--only TEXT] nbs/07_bench.ipynb [more.ipynb ...]   (then nbdev_clean)"""
import argparse, os, sys, time
from pathlib import Path
from execnb.nbio import read_nb, write_nb
from execnb.shell import CaptureShell
from fastcore.xtras import working_directory
from nbdev.config import get_config
from nbdev.process import NBProcessor, extract_directives

def run(fn:Path, run_flags:set, skip_text:str|None=None, only_text:str|None=None):
    skip = set(get_config().tst_flags.split()) - run_flags
    nb = read_nb(fn)
    def no_eval(cell):
        if cell.cell_type != "code": return True
        d = extract_directives(cell, remove=False) if not hasattr(cell, "directives_") else cell.directives_
        if d.get("eval:", [""])[0].lower() == "false": return True
        if skip_text and any(t in cell.source for t in skip_text.split("||")): return True
        if only_text and (run_flags & set(d)) and not any(t in cell.source for t in only_text.split("||")): return True  # a flagged cell only if named
        return bool(skip & set(d))
    for cell in nb.cells:  # a cell that runs gets only its new outputs (an old error output was otherwise left in place)
        if cell.cell_type == "code" and not no_eval(cell): cell.outputs = []
    os.environ["IN_TEST"] = "1"
    k = CaptureShell(fn)
    t0 = time.time()
    with working_directory(fn.parent): k.run_all(nb, exc_stop=True, preproc=no_eval, postproc=lambda c: write_nb(nb, fn))  # saved cell by cell
    write_nb(nb, fn)
    print(f"{fn}: {time.time() - t0:.0f} s", flush=True)

if __name__ == "__main__":
    ap = argparse.ArgumentParser(); ap.add_argument("notebooks", nargs="+"); ap.add_argument("--flags", default=""); ap.add_argument("--skip", default=None, help="also skip the cells containing this text (several: joined by ||)")
    ap.add_argument("--only", default=None, help="of the cells with a --flags flag, run only those containing this text (several: joined by ||)")
    a = ap.parse_args()
    for f in a.notebooks: run(Path(f).resolve(), set(a.flags.split()), a.skip, a.only)
