"""Offline docs check (Quarto, which nbdev_docs needs, cannot be installed here).

Renders every notebook in nbs/ to HTML with nbconvert as the docs site shows it (cells marked `#| hide` left out, the
code of `#| echo: false` cells hidden), loads each page in headless Chromium, and checks it as a reader would see it:
the page renders (Chromium's DOM has the notebook's text), every saved figure is on the page, the step's picture is on
the first screen (an image starts within the first 1,200 pixels of a 1000-pixel-wide window), no picture is shown twice
(two identical images), no cell shows an error or a traceback, and a screenshot is written for a person to look at.
Usage: python .ci/docs_check.py OUTDIR  (needs `pip install nbconvert selenium`, `apt-get install chromium chromium-driver`)."""
import json, re, subprocess, sys, shutil, hashlib
from pathlib import Path

FIRST_SCREEN = 1200  # pixels: where the first picture must start

def as_docs(nb:dict)->dict:
    "The notebook as the docs site shows it: `#| hide` cells dropped, the code of `#| echo: false` cells removed."
    cells = []
    for c in nb["cells"]:
        src = "".join(c["source"]); head = [l.replace(" ", "") for l in src.splitlines() if l.startswith("#|")]
        if c["cell_type"] == "code" and any(h.startswith("#|hide") or h == "#|include:false" for h in head): continue
        if c["cell_type"] == "code" and "#|echo:false" in head: c = dict(c, source=[])
        cells.append(c)
    return dict(nb, cells=cells)

def first_picture(html:Path)->tuple:
    "(top of the first embedded picture in CSS pixels or None, number of pictures shown more than once) in headless Chromium."
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    opts = Options(); opts.binary_location = CHROME
    for f in FLAGS: opts.add_argument(f)
    opts.add_argument("--window-size=1000,1200")
    drv = webdriver.Chrome(options=opts, service=Service(shutil.which("chromedriver")))
    try:
        drv.get(html.absolute().as_uri())
        tops = drv.execute_script("return Array.from(document.images).filter(i => i.src.startsWith('data:image'))"
                                  ".map(i => [i.getBoundingClientRect().top + window.scrollY, i.src.length])")
        srcs = drv.execute_script("return Array.from(document.images).filter(i => i.src.startsWith('data:image')).map(i => i.src)")
    finally: drv.quit()
    digests = [hashlib.sha1(s.encode()).hexdigest() for s in srcs]
    return (min((t for t, _ in tops), default=None), len(digests) - len(set(digests)))

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
    html = out/f"{nb_path.stem}.html"; shown = out/nb_path.name
    shown.write_text(json.dumps(as_docs(nb)))
    subprocess.run([sys.executable, "-m", "nbconvert", "--to", "html", "--output-dir", str(out), str(shown)],
                   check=True, capture_output=True)
    user_dir = out/".chrome"
    dom = subprocess.run([CHROME, *FLAGS, f"--user-data-dir={user_dir}", "--dump-dom", html.absolute().as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    imgs = len(re.findall(r'<img[^>]+src="data:image/png', dom))
    title = next((("".join(c["source"]).splitlines() or [""])[0].lstrip("# ") for c in nb["cells"] if c["cell_type"] == "markdown"), "")
    if title and title not in dom: problems.append(f"the page does not show its title {title!r}")
    if imgs < figures: problems.append(f"{figures} figures saved in the notebook, {imgs} on the page")
    top, twice = first_picture(html)
    if top is None or top > FIRST_SCREEN: problems.append(f"no picture on the first screen (first at {top if top is None else round(top)} px, want <= {FIRST_SCREEN})")
    if twice: problems.append(f"{twice} picture(s) shown twice")
    subprocess.run([CHROME, *FLAGS, f"--user-data-dir={user_dir}", f"--screenshot={out/(nb_path.stem + '.png')}",
                    "--window-size=1000,2400", html.absolute().as_uri()], capture_output=True, timeout=120)
    print(f"{nb_path.name}: {figures} figures saved, {imgs} on the page, first at {top if top is None else round(top)} px, {len(dom):,} characters of DOM"
          + (f"; PROBLEMS: {problems}" if problems else ""))
    return problems

if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "_docs_check"); out.mkdir(parents=True, exist_ok=True)
    if not CHROME: sys.exit("chromium not found: apt-get install chromium")
    nbs = sorted(p for p in Path("nbs").glob("*.ipynb") if not p.name.startswith(("_", ".")))
    if len(sys.argv) > 2: nbs = [p for p in nbs if any(a in p.name for a in sys.argv[2:])]  # OUTDIR NAME...: only these
    bad = {p.name: check(p, out) for p in nbs}
    bad = {k: v for k, v in bad.items() if v}
    print(f"docs check: {len(nbs) - len(bad)} pages fine, {len(bad)} with problems")
    sys.exit(1 if bad else 0)
