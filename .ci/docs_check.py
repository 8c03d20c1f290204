"""Offline docs check (Quarto, which nbdev_docs needs, cannot be installed here).

Renders every notebook in nbs/ to HTML with nbconvert, loads each page in headless Chromium, and checks it
as a reader would see it: the page renders (Chromium's DOM has the notebook's text), every saved figure is on
the page, no cell shows an error or a traceback, and a screenshot is written for a person to look at.
Usage: python .ci/docs_check.py OUTDIR  (needs `pip install nbconvert` and `apt-get install chromium`)."""
import json, re, subprocess, sys, shutil
from pathlib import Path

CHROME = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars"]

def check(nb_path:Path, out:Path)->list:
    "Problems found in one notebook's rendered page (empty list: fine)."
    nb = json.loads(nb_path.read_text())
    problems, figures = [], 0
    for c in nb["cells"]:
        for o in c.get("outputs", []):
            if o.get("output_type") == "error": problems.append(f"error output: {o.get('ename')}: {o.get('evalue')}")
            if o.get("name") == "stderr" and "Traceback" in "".join(o.get("text", "")): problems.append("traceback on stderr")
            if "image/png" in o.get("data", {}): figures += 1
    html = out/f"{nb_path.stem}.html"
    subprocess.run([sys.executable, "-m", "nbconvert", "--to", "html", "--output-dir", str(out), str(nb_path)],
                   check=True, capture_output=True)
    user_dir = out/".chrome"
    dom = subprocess.run([CHROME, *FLAGS, f"--user-data-dir={user_dir}", "--dump-dom", html.absolute().as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    imgs = len(re.findall(r'<img[^>]+src="data:image/png', dom))
    title = next((("".join(c["source"]).splitlines() or [""])[0].lstrip("# ") for c in nb["cells"] if c["cell_type"] == "markdown"), "")
    if title and title not in dom: problems.append(f"the page does not show its title {title!r}")
    if imgs < figures: problems.append(f"{figures} figures saved in the notebook, {imgs} on the page")
    subprocess.run([CHROME, *FLAGS, f"--user-data-dir={user_dir}", f"--screenshot={out/(nb_path.stem + '.png')}",
                    "--window-size=1000,2400", html.absolute().as_uri()], capture_output=True, timeout=120)
    print(f"{nb_path.name}: {figures} figures saved, {imgs} on the page, {len(dom):,} characters of DOM"
          + (f"; PROBLEMS: {problems}" if problems else ""))
    return problems

if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "_docs_check"); out.mkdir(parents=True, exist_ok=True)
    if not CHROME: sys.exit("chromium not found: apt-get install chromium")
    nbs = sorted(p for p in Path("nbs").glob("*.ipynb") if not p.name.startswith(("_", ".")))
    bad = {p.name: check(p, out) for p in nbs}
    bad = {k: v for k, v in bad.items() if v}
    print(f"docs check: {len(nbs) - len(bad)} pages fine, {len(bad)} with problems")
    sys.exit(1 if bad else 0)
