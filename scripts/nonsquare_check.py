"""Held-out colour edits at non-square sizes with the bundled shapes model and its painter: textured one-object scenes drawn at
96x96 (`rich_scene`, seeds 0-59, objects of 4-30 %), cropped to a 96x64 band holding the object, edited at 96x64 and enlarged to
300x200 (nearest neighbour: hard edges kept). Prints mask IoU, colour right, painted IoU, the rim of the old colour (`rim_share`)
and whether the pixels outside the mask are the input's.  Usage: python scripts/nonsquare_check.py [FIRST_SEED LAST_SEED+1]"""
import sys, warnings
import numpy as np
from PIL import Image
from diffedit_nb.pipeline import DiffEdit
from diffedit_nb.shapes import rich_scene, COLORS, nearest_color, object_color, iou
from diffedit_nb.bench_inpaint import TEXTURED, rim_share
from diffedit_nb.bench import painted

def rows(de, seeds):
    for s in seeds:
        sc = rich_scene(s, n=1, area=(0.04, 0.3), kind=TEXTURED[s % 4], size=96)
        ys = np.nonzero(sc.mask.any(1))[0]
        if ys[-1] - ys[0] >= 64: continue                                   # the object does not fit in a 64-row band
        y0 = int(np.clip((ys[0] + ys[-1]) // 2 - 32, 0, 32)); t = [c for c in COLORS if c != sc.color][s % 3]
        for W, H in ((96, 64), (300, 200)):
            im = Image.fromarray(np.asarray(sc.image)[y0:y0 + 64]).resize((W, H), Image.Resampling.NEAREST)
            obj = np.asarray(Image.fromarray(sc.mask[y0:y0 + 64]).resize((W, H), Image.Resampling.NEAREST))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = de(im, ref=sc.caption, query=f"a {t} {sc.shape}", seed=s, progress=False)
            o, m = np.asarray(r.image.convert("RGB")), np.asarray(r.mask) > 0
            yield dict(seed=s, size=f"{W}x{H}", iou=iou(m, obj), color_ok=float(nearest_color(object_color(o, obj)) == t),
                       painted=iou(painted(o, t), obj), rim=rim_share(o, obj, sc.color), outside_same=float((o[~m] == np.asarray(im)[~m]).all()))

if __name__ == "__main__":
    lo, hi = (int(a) for a in sys.argv[1:3]) if len(sys.argv) > 2 else (0, 60)
    rs = list(rows(DiffEdit.from_pretrained("shapes"), range(lo, hi)))
    for size in ("96x64", "300x200"):
        r = [x for x in rs if x["size"] == size]; ok = [x for x in r if x["iou"] > 0.9 and x["color_ok"]]
        print(f"{size}: {len(r)} scenes, mask IoU {np.mean([x['iou'] for x in r]):.3f}, colour right {np.mean([x['color_ok'] for x in r]):.3f}, "
              f"painted IoU {np.mean([x['painted'] for x in r]):.3f}, rim {np.mean([x['rim'] for x in r]):.4f} ({sum(x['rim'] > 0.02 for x in r)} above 2 %; "
              f"{np.mean([x['rim'] for x in ok]) if ok else float('nan'):.4f} on the {len(ok)} with the mask and colour right), outside the mask the input's in {sum(x['outside_same'] for x in r):.0f}")
