"""Hostile input, outside pytest: the image door, every layer and the run loader against bad input.

    python bench/hostile.py [--cases 500] [--seed 0] [--out bench/results/hostile.json]

Three doors, each with fixed hand-made cases and ``--cases`` seeded random ones:

* ``cbnorm.images.load_image``: random bytes, and valid PNG / JPEG / GIF / BMP / TIFF / WebP files (16-bit,
  palette, animated, EXIF-rotated, ...) that are truncated, have bytes flipped, inserted or repeated, or
  declare huge dimensions in their header;
* every layer of ``cbnorm.NORMS`` (and the variants moving_average / channel posteriors / tokens), train and
  eval mode, fresh or warmed up: tensors of rank 1..5, N in {0, 1, 2, 7}, matching or wrong C, NaN, +-inf,
  huge, tiny, zeros, float16 / bfloat16 / float32 / float64 and integer / bool / complex dtypes, non-tensors,
  and context ids in and out of range, of the wrong length, float, bool, 2-D, lists, strings (random cases
  come in three kinds: "chaos", any argument hostile; "values", a well-formed call with hostile values;
  "well_formed", finite values from 1e-30 to 1e15, which must be accepted);
* ``cbnorm.load_run``: pickled files renamed ``.safetensors``, truncated files, headers claiming huge sizes,
  mismatched architectures, tampered configs (unknown norms, absurd widths), paths escaping the run directory
  (``..``, absolute, symbolic links), malformed metrics, empty directories; plus random mutations of
  config.json and of the safetensors header. Unpickling is trapped: any call to ``pickle.load(s)``,
  ``pickle.Unpickler`` or ``torch.load`` counts as a crash.

The contract checked on each case (``check_image``, ``check_layer_call``, ``check_load_run``) is the one the
tests assert (tests/test_fuzz.py, tests/test_hostile_runs.py import it from here):

* the only outcomes are a result or ``ValueError`` / ``TypeError`` with a non-empty message (``ValueError``
  only, for load_run); anything else, or a broken promise below, is a crash;
* a layer call that raised leaves every parameter and buffer bit-for-bit as it was; after any call that
  returned, parameters and buffers are finite;
* a layer's output has the input's shape and dtype; sample n of the output may be non-finite only when
  sample n of the input holds NaN/inf or a value beyond ``HUGE`` = 1e15 in magnitude (per-sample
  propagation; batch statistics of a non-finite batch are refused in train mode instead). float16 /
  bfloat16 output is exactly the float32 computation on the same values cast to that dtype, so it is inf
  only where the exact result exceeds the dtype's range (e.g. eval-mode output above 65504 in float16);
* ``load_image`` returns a fully decoded image within ``MAX_PIXELS`` that ``to_rgb_array`` turns into
  uint8 (H, W, 3) (or refuses with ``ValueError``).

Writes JSON: per door and category, cases tried / refused with a message / accepted / crashes (with the
first few crash descriptions), and the machine.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.hostile_common import HUGE, ContractViolation  # noqa: E402,F401
from bench.hostile_images import *  # noqa: E402,F401,F403  (the contract and cases: tests import them from here)
from bench.hostile_images import IMAGE_MUTATIONS, check_image, mutate_image, seed_images  # noqa: E402,F401
from bench.hostile_layers import *  # noqa: E402,F401,F403
from bench.hostile_runs import *  # noqa: E402,F401,F403


# ============================================================================================ driver
class Tally:
    """Per category: tried, refused (with a message), accepted, crashes (and the first crash messages)."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.crash_examples: dict[str, list[str]] = defaultdict(list)

    def run(self, category: str, fn: Callable[[], str], label: str = "") -> None:
        c = self.counts[category]
        c["tried"] += 1
        try:
            outcome = fn()
        except Exception as err:  # noqa: BLE001 - a crash is what we count
            c["crashes"] += 1
            if len(self.crash_examples[category]) < 5:
                tb = traceback.extract_tb(err.__traceback__)[-1]
                self.crash_examples[category].append(
                    f"{label}: {type(err).__name__}: {str(err)[:200]} @ {Path(tb.filename).name}:{tb.lineno}")
            return
        c[outcome] += 1

    def as_dict(self) -> dict:
        out = {}
        for cat, c in self.counts.items():
            out[cat] = {"tried": c["tried"], "refused_with_message": c["refused"], "accepted": c["accepted"],
                        "crashes": c["crashes"]}
            if self.crash_examples.get(cat):
                out[cat]["crash_examples"] = self.crash_examples[cat]
        return out


def bench_images(tally: Tally, cases: int, seed: int) -> None:
    seeds = seed_images()
    for kind, data in seeds.items():
        tally.run("images/valid", lambda: check_image(data), kind)
    fixed = {"empty": b"", "text": b"hello, this is a text file\n" * 20, "zip": b"PK\x03\x04" + b"\x00" * 200,
             "png_signature_only": b"\x89PNG\r\n\x1a\n", "not_bytes_str": "photo.png", "not_bytes_none": None,
             "png_100000x100000": png_claiming(100_000, 100_000), "png_8000x8000": png_claiming(8000, 8000),
             "png_1x60000000": png_claiming(1, 60_000_000), "png_0x0": png_claiming(0, 0),
             "dds_unknown_pixel_format": dds_unknown_flags()}
    if fixed["dds_unknown_pixel_format"] is None:
        del fixed["dds_unknown_pixel_format"]
    for name, data in fixed.items():
        tally.run("images/fixed", lambda: check_image(data), name)
    for kind, data in seeds.items():
        for side in (20000, 65535, 2**31 - 1):
            bomb = claim_size(data, kind, side, side)
            if bomb is not None:
                tally.run("images/huge_dims", lambda: check_image(bomb), f"{kind} {side}")
    for kind, data in seeds.items():  # every prefix of every valid file
        for cut in range(len(data)):
            tally.run("images/every_truncation", lambda: check_image(data[:cut]), f"{kind}[:{cut}]")
    r = random.Random(seed)
    for i in range(cases):
        if i % 5 == 0:
            blob = bytes(r.randrange(256) for _ in range(r.randrange(0, 512)))
            tally.run("images/random_bytes", lambda: check_image(blob), f"random #{i}")
            continue
        kind = r.choice(list(seeds))
        op = r.choice(IMAGE_MUTATIONS)
        blob = mutate_image(seeds[kind], kind, op, r)
        tally.run(f"images/mutated_{op}", lambda: check_image(blob), f"{kind} {op} #{i}")


def bench_layers(tally: Tally, cases: int, seed: int) -> None:
    r = random.Random(seed)
    for i in range(cases):
        kind = LAYER_CASE_KINDS[i % 3]
        case = random_layer_case(r, kind)

        def one() -> str:
            outcome = run_layer_case(**case)
            if kind == "well_formed" and outcome != "accepted":
                raise ContractViolation("a well-formed call with finite values was refused")
            return outcome
        tally.run(f"layers/random_{kind}", one, json.dumps(case, default=str))
    for label in LAYER_SPECS:  # the named hostile inputs, on every layer and mode
        for train in (True, False):
            c = 4
            fixed = {"nan": dict(inject=(("nan", 0.3),)), "inf": dict(inject=(("inf", 0.6),)),
                     "-inf": dict(inject=(("-inf", 0.1),)), "huge_1e30": dict(scale=1e30),
                     "huge_1e15": dict(scale=1e15), "tiny_1e-30": dict(scale=1e-30), "zeros": dict(scale=0.0),
                     "empty_batch": dict(n=0), "one_sample": dict(n=1), "rank_1": dict(rank=1),
                     "wrong_c": dict(c_in=c + 1), "int64": dict(dtype="int64"), "float16": dict(dtype="float16",
                                                                                                   scale=3e4),
                     "bfloat16": dict(dtype="bfloat16", scale=1e15), "float64": dict(dtype="float64", scale=1e30)}
            for name, over in fixed.items():
                kw = dict(rank=3 if LAYER_SPECS[label][1].get("channel_last") else 4, n=7, c_in=c, dims=(3, 2, 1),
                          dtype="float32", scale=1.0, offset=0.0)
                kw.update(over)
                tally.run("layers/named_inputs", lambda: run_layer_case(label=label, c=c, warm=True, train=train,
                                                                         **kw), f"{label} {train} {name}")
    for label in LAYER_SPECS:
        for dtype in (torch.float16, torch.bfloat16):
            for magnitude in ("huge", "tiny"):
                def autocast_check() -> str:
                    y_train, y_eval = autocast_case(label, dtype, magnitude)
                    if not (torch.isfinite(y_train).all() and torch.isfinite(y_eval).all()):
                        raise ContractViolation(f"{label} {dtype} {magnitude}: non-finite output")
                    return "accepted"
                tally.run("layers/autocast", autocast_check, f"{label} {dtype} {magnitude}")


def bench_runs(tally: Tally, cases: int, seed: int, tmp: Path) -> None:
    template = make_template_run(tmp / "template")
    tally.run("runs/valid", lambda: check_load_run(template, snapshot=True, expect_refusal=False), "template")
    i = 0
    for category, named in RUN_CASES.items():
        for name, damage in named.items():
            d = tmp / f"case{i}"
            i += 1
            shutil.copytree(template, d)
            damage(d, tmp)
            tally.run(f"runs/{category}", lambda: check_load_run(d, snapshot=name in SNAPSHOT_CASES), name)
    r = random.Random(seed)
    for j in range(cases):
        d = tmp / f"random{j}"
        kind = random_run_mutation(template, d, r)
        tally.run(f"runs/random_{kind}", lambda: check_load_run(d, snapshot=True, expect_refusal=False),
                  f"random {kind} #{j}")
        shutil.rmtree(d, ignore_errors=True)


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=500, help="random cases per door (images, layers, runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "hostile.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from bench.speed import machine

    info = machine("cpu")
    tally = Tally()
    times = {}
    t0 = time.perf_counter()
    bench_images(tally, args.cases, args.seed)
    times["images"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    bench_layers(tally, args.cases, args.seed)
    times["layers"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        bench_runs(tally, args.cases, args.seed, Path(tmp))
    times["runs"] = time.perf_counter() - t0
    per_cat = tally.as_dict()
    doors = {}
    for door in ("images", "layers", "runs"):
        cats = [v for k, v in per_cat.items() if k.startswith(door + "/")]
        doors[door] = {key: sum(c[key] for c in cats) for key in ("tried", "refused_with_message", "accepted",
                                                                   "crashes")}
        doors[door]["seconds"] = round(times[door], 2)
    result = {
        "what": "hostile input against cbnorm.images.load_image, every layer (train/eval) and cbnorm.load_run; "
                "outcomes must be a result or ValueError/TypeError with a message (ValueError for load_run), "
                "layer state untouched by a refused call and finite after any call; see bench/hostile.py",
        "seed": args.seed, "random_cases_per_door": args.cases,
        "totals": {key: sum(d[key] for d in doors.values()) for key in ("tried", "refused_with_message", "accepted",
                                                                        "crashes")},
        "doors": doors, "categories": dict(sorted(per_cat.items())), "machine": info,
        "date": time.strftime("%Y-%m-%d"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"totals": result["totals"], "doors": doors}, indent=1))
    crashes = {k: v for k, v in per_cat.items() if v["crashes"]}
    if crashes:
        print("CRASHES:", json.dumps(crashes, indent=1))
    return result


if __name__ == "__main__":
    main()
