"""Turn a gpu_check.sh output folder into rows of bench/RESULTS.md and files in bench/results/.

    python bench/record.py OUTDIR [--results bench/RESULTS.md] [--store bench/results]

Every figure it writes is read from a JSON that a benchmark wrote (STYLE 12: a figure is
measured, never typed), with the date, card and commit that JSON records. The JSON is copied
into the store and linked from its rows. RESULTS.md holds GPU figures only, so a JSON measured
on a CPU is refused unless --allow-cpu (the tests use it, on a scratch copy). New rows go at the
end of their section's table; rows already there are never edited.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # as a script: bench.*
import srdit.io  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
NO_ROWS_YET = re.compile(r"^No GPU measurement yet")


def value(name: str, spec: str = ".3g"):
    """A column read from a row: the figure formatted, '-' where the row has none (a failed run)."""
    def read(d: dict, r: dict) -> str:
        v = r.get(name)
        if v is None or (isinstance(v, float) and v != v):
            return "-"
        return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)
    return read


def percent(name: str):
    def read(d: dict, r: dict) -> str:
        return "-" if r.get(name) is None else f"{100 * r[name]:.1f}%"
    return read


def of_json(name: str):
    """A column that is the same for the whole JSON (the preset, say)."""
    return lambda d, r: str(d[name])


def note(d: dict, r: dict) -> str:
    return r.get("error", "").replace("|", "/")


# section title -> (columns between date/card/commit and the JSON link: (header, reader)), the rows of a JSON)
SECTIONS = {
    "Training throughput (`bench/throughput.py`)": (
        [("preset", of_json("preset")), ("batch", of_json("batch")), ("variant", value("variant")),
         ("step ms", value("step_ms")), ("img/s", value("images_per_s", ".0f")), ("MFU (student)", percent("mfu")),
         ("MFU (+teacher)", percent("mfu_with_teacher")), ("peak GB", value("peak_mem_gb")),
         ("vs eager", value("speedup")), ("loss vs eager", value("loss_rel_diff", ".1e")), ("note", note)],
        lambda d: d["rows"]),
    "Kernels (`bench/kernels.py`)": (
        [("op", value("op")), ("batch", value("batch")), ("variant", value("variant")), ("ms", value("ms")),
         ("GB/s", value("gb_per_s")), ("% of copy bandwidth", percent("of_copy_bw")), ("vs eager", value("vs_eager")),
         ("vs compile", value("vs_compile")), ("note", note)],
        lambda d: d["rows"]),
    "Launch settings (`bench/kernels.py --sweep`)": (
        [("kernel", value("kernel")), ("op", value("op")), ("batch", value("batch")),
         ("elements", value("elements")), ("warps", value("warps")), ("default", value("default")),
         ("ms", value("ms")), ("vs default", value("vs_default")), ("note", note)],
        lambda d: d.get("sweep", [])),
    "Measured peaks (denominators)": (
        [("copy bandwidth (GB/s)", value("copy_gbps", ".0f")), ("bf16 matmul (TFLOP/s)", value("matmul_tflops", ".0f"))],
        lambda d: [d]),
    "Data loading (`bench/data.py`)": (
        [("config", value("config")), ("backend", value("backend")),
         ("data", lambda d, r: "synthetic" if d.get("synthetic") else "prepared"), ("batch", value("batch")),
         ("workers", value("workers")), ("samples/s", value("samples_per_s", ".0f")),
         ("ImageNet GB", value("imagenet_gb")), ("note", note)],
        lambda d: d["rows"]),
    "Counted vs measured (`bench/traffic.py --measure`)": (
        [("preset", of_json("preset")), ("batch", of_json("batch")), ("variant", value("variant")),
         ("phase", value("phase")), ("counted GB", value("gb")), ("modelled ms", value("model_ms")),
         ("measured ms", value("measured_ms")), ("note", note)],
        lambda d: [{"variant": v["variant"], "phase": p, "gb": r["bytes"] / 1e9, "model_ms": r["model_ms"],
                    "measured_ms": r.get("measured_ms")} for v in d["variants"] for p, r in v["phases"].items()
                   if r["launches"]]),
    "Sampling (`bench/sample.py`)": (
        [("preset", of_json("preset")), ("stage", value("stage")), ("precision", value("precision")),
         ("NFE", value("nfe")), ("batch", value("batch")), ("ms", value("ms")), ("samples/s", value("samples_per_s")),
         ("note", note)],
        lambda d: d["rows"]),
}


def sections_of(name: str) -> list[str]:
    """The RESULTS.md sections a gpu_check JSON file feeds, by its name."""
    if name.startswith("throughput"):
        return ["Training throughput (`bench/throughput.py`)"]
    if name == "kernels":
        return ["Kernels (`bench/kernels.py`)", "Launch settings (`bench/kernels.py --sweep`)",
                "Measured peaks (denominators)"]
    if name.startswith("kernels_"):  # kernels_before: the same benchmark on an older commit
        return ["Kernels (`bench/kernels.py`)"]
    return {"data": ["Data loading (`bench/data.py`)"], "sample": ["Sampling (`bench/sample.py`)"],
            "traffic_gpu": ["Counted vs measured (`bench/traffic.py --measure`)"]}.get(name, [])


def header_lines(title: str) -> list[str]:
    columns = ["date", "card", "commit", *(header for header, _ in SECTIONS[title][0]), "JSON"]
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def add_rows(text: str, title: str, rows: list[str]) -> str:
    """`text` with `rows` at the end of the table under `## title` (made if missing)."""
    lines = text.rstrip("\n").split("\n")
    heading = f"## {title}"
    if heading not in lines:
        lines += ["", heading, "", *header_lines(title)]
    start = lines.index(heading)
    first = next(i for i in range(start, len(lines)) if lines[i].startswith("|"))
    if lines[first:first + 2] != header_lines(title):
        raise SystemExit(f"RESULTS.md: the table under '{heading}' has other columns than bench/record.py writes; "
                         "add these rows by hand or update SECTIONS")
    end = first
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    lines[end:end] = rows
    after = end + len(rows)
    while after < len(lines) and not lines[after].strip():
        after += 1
    if after < len(lines) and NO_ROWS_YET.match(lines[after]):  # the placeholder paragraph goes
        stop = after
        while stop < len(lines) and lines[stop].strip():
            stop += 1
        del lines[after:stop]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)) + "\n"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


def record(outdir: str, results: str, store: str, allow_cpu: bool = False) -> list[str]:
    """Append the rows of every gpu_check JSON in outdir; returns the stored JSON paths."""
    files = sorted(f for f in glob.glob(os.path.join(outdir, "*.json"))
                   if sections_of(os.path.basename(f)[:-5]))
    if not files:
        raise SystemExit(f"{outdir}: no benchmark JSON (throughput_*.json, kernels.json, data.json, sample.json)")
    loaded = {f: json.load(open(f)) for f in files}
    for f, d in loaded.items():
        if d["device_name"].lower().startswith("cpu") and not allow_cpu:
            raise SystemExit(f"{f} was measured on '{d['device_name']}': RESULTS.md holds GPU figures only")
    with open(results) as fh:
        text = fh.read()
    os.makedirs(store, exist_ok=True)
    stored = []
    for f, d in loaded.items():
        name = os.path.basename(f)[:-5]
        target = os.path.join(store, f"{d['date']}_{slug(d['device_name'])}_{slug(d['commit'])}_{name}.json")
        shutil.copyfile(f, target)
        stored.append(target)
        link = f"[{name}]({os.path.relpath(target, os.path.dirname(os.path.abspath(results)))})"
        for title in sections_of(name):
            columns, rows_of = SECTIONS[title]
            rows = ["| " + " | ".join([d["date"], d["device_name"], d["commit"],
                                       *(read(d, r) for _, read in columns), link]) + " |" for r in rows_of(d)]
            if rows:  # (no sweep in this run: the section keeps its placeholder)
                text = add_rows(text, title, rows)
    srdit.io.write_text(results, text)  # a kill mid-write must not cost the table
    return stored


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", help="the folder bench/gpu_check.sh wrote")
    parser.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    parser.add_argument("--store", default=os.path.join(HERE, "results"))
    parser.add_argument("--allow-cpu", action="store_true", help="accept CPU measurements (tests, on a scratch copy)")
    args = parser.parse_args(argv)
    for path in record(args.outdir, args.results, args.store, args.allow_cpu):
        print(f"stored {path}")
    print(f"rows added to {args.results}")


if __name__ == "__main__":
    main()
