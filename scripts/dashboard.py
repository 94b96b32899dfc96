#!/usr/bin/env python3
"""Renders deploy/grafana/kmesh.json to a PNG from a real Prometheus.

No Grafana server can be installed on the machines this project is built on
(it is neither a Debian package nor on PyPI), so this draws the dashboard's
own panels: each panel's PromQL runs unchanged against Prometheus's
query_range API over the window given, and the series land where the panel's
gridPos puts them. Grafana's variables are given the values a viewer of
"All" would see.

usage: dashboard.py PROMETHEUS_URL DASHBOARD_JSON OUT_PNG START END [STEP]
"""
import json
import sys
import urllib.parse
import urllib.request

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

RATE_INTERVAL = "30s"
UNIT = {"cps": "/s", "Bps": "B/s", "ops": "/s", "bytes": "B", "s": "s"}


def query(url, expr, start, end, step):
    q = urllib.parse.urlencode(
        {"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{url}/api/v1/query_range?{q}", timeout=30) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise SystemExit(f"PromQL refused: {expr}: {body}")
    return body["data"]["result"]


def legend(fmt, labels):
    out = fmt
    for k, v in labels.items():
        out = out.replace("{{" + k + "}}", v)
    # A label the series lacks renders empty in Grafana too.
    while "{{" in out:
        a = out.index("{{")
        out = out[:a] + out[out.index("}}", a) + 2:]
    return out.strip() or "value"


def human(unit):
    def f(v, _pos):
        if unit == "percentunit":
            return f"{v * 100:.0f}%"
        if unit == "s" and 0 < abs(v) < 1e-3:
            return f"{v * 1e9:.0f} ns" if abs(v) < 1e-6 else f"{v * 1e6:.0f} µs"
        for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(v) >= div:
                return f"{v / div:.1f}{suffix}"
        return f"{v:.3g}"
    return FuncFormatter(f)


def main():
    url, path, out, start, end = sys.argv[1:6]
    step = sys.argv[6] if len(sys.argv) > 6 else "5"
    dash = json.load(open(path))
    # Every query variable at "All"; the rate window Grafana would pick for
    # a 2 s scrape interval.
    names = [v["name"] for v in dash.get("templating", {}).get("list", [])
             if v.get("type") == "query"]
    subs = [("$__rate_interval", RATE_INTERVAL)]
    for n in sorted(names, key=len, reverse=True):
        subs += [("${" + n + "}", ".*"), ("$" + n, ".*")]
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dash["panels"])
    fig = plt.figure(figsize=(20, rows * 0.42), dpi=80)
    grid = fig.add_gridspec(rows, 24, hspace=2.2, wspace=1.6,
                            top=0.96, bottom=0.02, left=0.04, right=0.99)
    t0 = float(start)
    empty = []
    for r in (p for p in dash["panels"] if p["type"] == "row"):
        ax = fig.add_subplot(grid[r["gridPos"]["y"], :])
        ax.axis("off")
        ax.text(0, 0, r["title"], fontsize=13, weight="bold", transform=ax.transAxes)
    for p in panels:
        g = p["gridPos"]
        ax = fig.add_subplot(grid[g["y"]:g["y"] + g["h"] - 1, g["x"]:g["x"] + g["w"]])
        ax.set_title(p["title"], fontsize=11, loc="left")
        unit = p["fieldConfig"]["defaults"].get("unit", "short")
        drawn = 0
        for t in p["targets"]:
            expr = t["expr"]
            for k, v in subs:
                expr = expr.replace(k, v)
            for s in query(url, expr, start, end, step):
                xs = [(float(ts) - t0) / 60 for ts, _ in s["values"]]
                ys = [float(v) for _, v in s["values"]]
                ax.plot(xs, ys, linewidth=1.2,
                        label=legend(t.get("legendFormat", ""), s["metric"]))
                drawn += 1
        if drawn:
            ax.legend(fontsize=7, loc="upper left", ncol=2, framealpha=0.6)
        else:
            empty.append(p["title"])
            ax.text(0.5, 0.5, "No data", ha="center", va="center",
                    transform=ax.transAxes, color="grey")
        ax.yaxis.set_major_formatter(human(unit))
        ax.set_ylabel(UNIT.get(unit, ""), fontsize=8)
        ax.set_xlabel("minutes", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(dash["title"], fontsize=15, x=0.04, y=0.985, ha="left")
    fig.savefig(out, bbox_inches="tight")
    print(f"{out}: {len(panels)} panels, {len(empty)} without data: {empty}")


if __name__ == "__main__":
    main()
