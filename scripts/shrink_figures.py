"""Shrink the PNG outputs saved in the notebooks: no wider than the docs page shows them (800 px), 256 colours.

Usage: python scripts/shrink_figures.py [NOTEBOOK ...]   (default: every notebook in nbs/; prints the sizes before and after)
The pictures keep what they show; only pixels the page never displays, and colours beyond 256, go. Run it after re-running
a notebook, before committing, so that every re-run does not add megabytes of images to the history.
"""
import sys, json, base64, io
from pathlib import Path
from PIL import Image

MAX_WIDTH, COLOURS = 800, 256

def shrink(png:bytes)->bytes:
    im = Image.open(io.BytesIO(png)); im.load()
    if im.width > MAX_WIDTH: im = im.resize((MAX_WIDTH, round(im.height * MAX_WIDTH / im.width)), Image.LANCZOS)
    rgba = im.convert("RGBA")
    q = rgba.quantize(COLOURS, method=Image.Quantize.FASTOCTREE)
    buf = io.BytesIO(); q.save(buf, "PNG", optimize=True)
    return buf.getvalue() if len(buf.getvalue()) < len(png) else png

def main(paths):
    for f in paths:
        d = json.loads(f.read_text()); before = f.stat().st_size
        for c in d["cells"]:
            for o in c.get("outputs", []):
                data = o.get("data", {})
                if "image/png" in data: data["image/png"] = base64.b64encode(shrink(base64.b64decode(data["image/png"]))).decode() + "\n"
                for k in [k for k in data if k.startswith("image/") and k != "image/png" and "image/png" in data]: del data[k]
        f.write_text(json.dumps(d, indent=1, ensure_ascii=False) + "\n")
        print(f"{f.name}: {before / 1e3:.0f} KB -> {f.stat().st_size / 1e3:.0f} KB")

if __name__ == "__main__": main([Path(p) for p in sys.argv[1:]] or sorted(Path("nbs").glob("*.ipynb")))
