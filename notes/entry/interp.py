import sys
def load(f):
    return [(float(p[6]), float(p[2]), float(p[4]), int(p[1])) for p in (l.split() for l in open(f)) if len(p) > 6 and p[0] == 'graph']
def interp(rows, x, col):
    rows = sorted(rows)
    for a, b in zip(rows, rows[1:]):
        if a[0] <= x <= b[0]:
            return a[col] + (x - a[0]) / (b[0] - a[0]) * (b[col] - a[col])
    return float('nan')
base, new, col = load(sys.argv[1]), load(sys.argv[2]), {'recall': 1, 'mass': 2}[sys.argv[3]]
for r in new:
    b = interp(base, r[0], col)
    print(f"L {r[3]} scored {r[0]:.2f}% new {r[col]:.4f} base {b:.4f} diff {r[col] - b:+.4f}")
