"""`make demo`: time the attention on a synthetic slide, then run the whole Hepato-LLaVA pipeline
(on the GPU with the Triton kernels when there is one, else on the CPU with the portable path).

Steps (embedded defaults, nothing downloaded):
  1. attention: build a layout, time TopoPackAttention against dense SDPA (a few seconds);
  2. data: synthetic training and held-out slides (separate seeds) + VQA / caption JSON (topopack.model.synth, vqa_data),
     on every core;
  3. MAE: quick pretraining of the slide encoder on the training slides (topopack.model.pretrain);
     on CUDA also the encoder's throughput, Triton against portable, on a large synthetic grid;
  4. encode: every slide once into OUT/summary-cache, on every core;
  5. connector: Q-Former on captions, tiny LLM frozen; 6. VQA: Q-Former + LoRA on the VQA;
  7. blind control: the same VQA training with the visual tokens zeroed (on a multi-core CPU in a second
     process, alongside step 6);
  8. eval on the held-out slides by level x format -> OUT/eval.json, OUT/eval.md;
  9. evidence: OUT/evidence.png for one held-out slide, and how much evidence lands on the largest nodule.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from topopack import RULES_BY_NAME, TopoLayout, TopoPackAttention, topo_pack_attention
from topopack.model.config import NON_NEGATIVE, POSITIVE, add_config_arguments, config_from_args, option, validate
from topopack.model.timing import median_seconds


@dataclass
class DemoConfig:
    # attention timing (step 1)
    side: int = option(96, "grid side of the synthetic slide (patches); 96 is the CPU bar", check=POSITIVE)
    pack_size: int = option(3, "pack side k", check=POSITIVE)
    heads: int = option(8, "attention heads", check=POSITIVE)
    head_dim: int = option(64, "head dim", check=POSITIVE)
    rules: str = option("paper", "attention rules", choices=tuple(RULES_BY_NAME))
    repeats: int = option(5, "timed repeats (median)", check=POSITIVE)
    device: str = option("cuda" if torch.cuda.is_available() else "cpu", "device")
    backend: str = option("auto", "attention backend of the encoder: auto (triton on CUDA, portable on the CPU), "
                                  "triton, portable, flex, reference")
    # pipeline (steps 2-7)
    out: str = option("demo-out", "output directory (the demo replaces its own runs there)")
    attention_only: bool = option(False, "stop after the attention timing")
    train_slides: int = option(4000, "synthetic training slides (cheap to make; the nodule count needs thousands "
                                     "to generalise)", check=POSITIVE)
    test_slides: int = option(60, "held-out slides", check=POSITIVE)
    min_patches: int = option(300, "smallest slide (patches)", check=POSITIVE)
    max_patches: int = option(900, "largest slide (patches)", check=POSITIVE)
    per_slide: int = option(12, "VQA questions per slide", check=POSITIVE)
    mae_steps: int = option(60, "MAE pretraining steps", check=POSITIVE)
    connector_steps: int = option(100, "stage A steps (the frozen random LLM teaches the connector little)",
                                  check=POSITIVE)
    vqa_steps: int = option(1500, "stage B steps (and the blind control's)", check=POSITIVE)
    batch_size: int = option(16, "questions per step", check=POSITIVE)
    family_weights: str = option("location=8,count=4,size=2", "VQA sampling share per question family (default 1): "
                                 "more steps on the hard whole-slide families; the blind control uses the same recipe")
    anchors: int = option(3, "side of the Q-Former's grid of anchored queries (0 = none)", check=NON_NEGATIVE)
    lr: float = option(3e-4, "stages A and B (3e-4 learned the whole-slide families better than 1e-3 or 1e-4)",
                       check=POSITIVE)
    qformer_dim: int = option(128, "Q-Former width (512 in the full model)", check=POSITIVE)
    threads: int = option(1, "torch CPU threads per process for the small models (1 is fastest for them on a "
                             "busy 2-core CPU)", check=POSITIVE)
    throughput_side: int = option(192, "grid side of the slide the encoder throughput is measured on (CUDA only)",
                                  check=POSITIVE)
    seed: int = option(0, "seed of the data and every stage")
    parallel_blind: bool | None = option(None, "train the blind control in a second process alongside stage B "
                                               "(default: on the CPU when this process may use 2+ cores)")

    def __post_init__(self):
        validate(self)
        if self.min_patches > self.max_patches:
            raise ValueError(f"--min-patches {self.min_patches} exceeds --max-patches {self.max_patches}")


def add_arguments(p):
    add_config_arguments(p, DemoConfig)


def time_attention(args) -> None:
    """Step 1: the main job on one synthetic slide -- build the layout, run the layer, time it against dense."""
    rules, device = RULES_BY_NAME[args.rules], torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    layout = TopoLayout.from_grid(args.side, args.side, args.pack_size, device=device)
    build_ms = 1e3 * (time.perf_counter() - t0)
    dim = args.heads * args.head_dim
    layer = TopoPackAttention(dim, args.heads, rules=rules, backend=args.backend).to(device, dtype).eval()
    x = layout.tokens_from_patches(torch.randn(1, layout.num_patches, dim, device=device, dtype=dtype))
    q, k, v = (torch.randn(1, args.heads, layout.num_tokens, args.head_dim, device=device, dtype=dtype)
               for _ in range(3))
    print(f"{layout}  (built in {build_ms:.1f} ms)")
    print(f"rules={rules.name}: {layout.num_allowed_pairs(rules):,} allowed pairs = "
          f"{100 * layout.sparsity(rules):.2f}% of dense attention")

    def median_ms(fn, repeats=args.repeats):
        return 1e3 * median_seconds(fn, repeats, device)

    with torch.no_grad():
        y = layer(x, layout)
        layer_ms = median_ms(lambda: layer(x, layout))
        sparse_ms = median_ms(lambda: topo_pack_attention(q, k, v, layout, rules=rules, backend=args.backend))
        dense_ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v), max(1, args.repeats // 2))
    print(f"TopoPackAttention layer ({device.type}, {str(dtype)[6:]}): out {tuple(y.shape)}, {layer_ms:.1f} ms")
    print(f"attention forward, median of {args.repeats}: topopack {sparse_ms:.1f} ms, "
          f"dense SDPA (no mask) {dense_ms:.1f} ms -> speed-up {dense_ms / sparse_ms:.1f}x")


def make_data(out: Path, args) -> Path:
    """Step 2: training and held-out slides in separate folders; captions.json, vqa_train.json, vqa_test.json."""
    from .parallel import usable_cores
    from .synth import write_synthetic
    from topopack.model.vqa_data import answer_stats, generate_captions, generate_vqa, write_json

    workers = usable_cores()
    kw = dict(min_patches=args.min_patches, max_patches=args.max_patches, workers=workers)
    train = write_synthetic(out / "slides" / "train", args.train_slides, seed=args.seed, **kw)
    test = write_synthetic(out / "slides" / "test", args.test_slides, seed=args.seed + 1, **kw)
    data = out / "data"
    write_json(data / "captions.json", generate_captions(train, args.seed, root=data, workers=workers))
    write_json(data / "vqa_train.json", generate_vqa(train, args.seed, args.per_slide, root=data, workers=workers))
    test_records = generate_vqa(test, args.seed + 1, args.per_slide, root=data)
    write_json(data / "vqa_test.json", test_records)
    stats = answer_stats(test_records)
    print(f"data: {len(train)} training + {len(test)} held-out slides, {len(test_records)} held-out questions; "
          f"blind-majority accuracy by family: " +
          ", ".join(f"{k} {v['blind_majority']:.2f} (chance {v['chance']:.2f})" for k, v in stats.items()))
    return data


def clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def chance_by_scale(data: Path) -> dict[str, float]:
    from topopack.model.records import load_records
    from topopack.model.vqa_data import chance_accuracy

    recs = load_records(data, "eval")
    return {s: chance_accuracy([r for r in recs if r["scale"] == s]) for s in ("WSI", "ROI", "Patch")}


def device_label(device) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def measure_throughput(encoder_path: Path, args) -> dict:
    """Patches/s of the demo's encoder on a throughput_side^2 synthetic grid, triton against portable (CUDA)."""
    from topopack.model.encoder import encoder_throughput, load_encoder

    device = torch.device(args.device)
    enc = load_encoder(encoder_path, map_location=device).eval()
    layout = TopoLayout.from_grid(args.throughput_side, args.throughput_side, enc.cfg.pack_size, device=device)
    x = torch.randn(1, layout.num_patches, enc.cfg.in_dim, device=device)
    result = {"patches": layout.num_patches, "device": device_label(device)}
    for backend, rate in encoder_throughput(enc, layout, x, ("triton", "portable")).items():
        result[f"{backend}_patches_per_s"] = round(rate)
        print(f"encoder throughput, {backend:8s}: {round(rate):>12,} patches/s ({layout.num_patches:,} patches, bf16)")
    result["speedup"] = round(result["triton_patches_per_s"] / result["portable_patches_per_s"], 2)
    return result


def quiet_worker() -> None:
    from .llm import quiet_transformers
    from .progress import QUIET

    os.environ[QUIET] = "1"  # one progress report on the terminal: the main process's
    quiet_transformers()


def train_blind(data, encoder, out, init, steps, kw) -> dict:
    """The blind control: stage B with the visual tokens zeroed (a top-level function, so a process pool can run it;
    there it builds its own summary cache and keeps quiet)."""
    from topopack.model.encoder import load_encoder
    from topopack.model.finetune import finetune
    from topopack.model.summaries import SummaryCache

    kw = dict(kw)
    backend, threads = kw.pop("backend"), kw.pop("threads")
    if kw["cache"] is None:
        torch.set_num_threads(threads)
        kw["cache"] = SummaryCache(load_encoder(encoder, backend=backend), kw["device"], cache_dir=out.parent / CACHE)
    return finetune("vqa", data, encoder, out, init=init, blind=True, steps=steps, desc="blind control", **kw)


CACHE = "summary-cache"  # OUT/summary-cache
EVIDENCE_QUESTION = "Where is the largest tumor nodule?\nAnswer briefly."


def demo_evidence(out: Path, args) -> dict:
    """OUT/evidence.png (+ .json) for the first held-out slide with tumour, and how much of the evidence falls on the
    largest nodule over the held-out slides (model/evidence.nodule_evidence_ratio), for both methods."""
    from topopack.io import load_slide

    from .ask import Assistant
    from .evidence import nodule_evidence_ratio, write_evidence

    assistant = Assistant(out / "vqa", args.device, cache_dir=out / CACHE)
    slides = sorted((out / "slides" / "test").glob("*.h5"))
    first = next(p for p in slides if (load_slide(p).facts or {}).get("nodules"))
    answer = assistant(first, EVIDENCE_QUESTION)
    png, _ = write_evidence(assistant, first, EVIDENCE_QUESTION, None, answer, out / "evidence.png")
    result = {"map": str(png), "slide": first.name, "answer": answer}
    for method in ("attention", "gradient"):
        r = nodule_evidence_ratio(assistant, slides, EVIDENCE_QUESTION, method=method, seed=args.seed)
        result[method] = {k: r[k] for k in ("median_ratio", "control_median_ratio")} | {"slides": len(r["ratios"])}
        print(f"evidence ({method}): mass on the largest nodule's packs / their share, median over "
              f"{len(r['ratios'])} held-out slides: {r['median_ratio']:.2f} (permuted control "
              f"{r['control_median_ratio']:.2f})")
    return result


def run_pipeline(args) -> dict:
    from topopack.model.encoder import load_encoder
    from topopack.model.evaluate import evaluate, markdown_table
    from topopack.model.finetune import finetune
    from topopack.model.pretrain import pretrain
    from topopack.model.qformer import QFormerConfig
    from topopack.model.summaries import SummaryCache, fill_cache

    from .parallel import usable_cores

    out = Path(args.out)
    t0 = time.perf_counter()
    timings = {}
    cuda = torch.device(args.device).type == "cuda"
    plan = ["data", "MAE pretraining", *(["encoder throughput"] if cuda else []), "encode slides", "connector (stage A)",
            "VQA (stage B) + blind control alongside" if args.parallel_blind else "VQA (stage B)",
            *([] if args.parallel_blind else ["blind control"]), "eval", "eval blind", "evidence"]

    def step(name, fn):
        i, t = plan.index(name), time.perf_counter()
        left = ", ".join(plan[i + 1:]) or "nothing"
        print(f"\n== [{i + 1}/{len(plan)}] {name}  ({clock(t - t0)} elapsed; then {left})", flush=True)
        result = fn()
        timings[name] = round(time.perf_counter() - t, 1)
        print(f"== {name}: {clock(timings[name])}", flush=True)
        return result

    data = step("data", lambda: make_data(out, args))
    mae = step("MAE pretraining", lambda: pretrain("mae", out / "slides" / "train", out / "mae", quick=True, overwrite=True,
                                                     steps=args.mae_steps, seed=args.seed, device=args.device,
                                                     backend=args.backend))
    encoder = out / "mae" / "encoder.pt"
    throughput = step("encoder throughput", lambda: measure_throughput(encoder, args)) if cuda else None
    # the frozen encoder runs once per slide for all steps below
    # one on-disk summary cache for every stage (and the blind control's process: it reads, not re-encodes),
    # filled by every core
    slides = sorted((out / "slides").glob("*/*.h5"))
    step("encode slides", lambda: fill_cache(encoder, slides, out / CACHE, backend=args.backend, device=args.device,
                                             workers=1 if cuda else usable_cores()))
    cache = SummaryCache(load_encoder(encoder, backend=args.backend), args.device, cache_dir=out / CACHE)
    # brief defaults otherwise (32 queries, r 128)
    small = dict(qformer_cfg=QFormerConfig(dim=args.qformer_dim, anchors=args.anchors))
    # the demo owns OUT: a rerun replaces its runs
    common = dict(batch_size=args.batch_size, seed=args.seed, device=args.device, cache=cache, lr=args.lr,
                  overwrite=True)
    vqa_kw = dict(common, family_weights=args.family_weights or None)
    step("connector (stage A)", lambda: finetune("connector", data, encoder, out / "connector",
                                                 steps=args.connector_steps, **small, **common))
    vqa = lambda: finetune("vqa", data, encoder, out / "vqa", init=out / "connector", steps=args.vqa_steps, **vqa_kw)
    blind_job = (data, encoder, out / "blind", out / "connector", args.vqa_steps)
    blind_kw = dict(vqa_kw, backend=args.backend, threads=max(1, args.threads))
    if args.parallel_blind:  # the control trains in a second process, on the second core, with its own cache
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=quiet_worker) as pool:
            blind_future = pool.submit(train_blind, *blind_job, dict(blind_kw, cache=None))
            step("VQA (stage B) + blind control alongside", vqa)
            blind_future.result()
    else:
        step("VQA (stage B)", vqa)
        step("blind control", lambda: train_blind(*blind_job, blind_kw))
    real = step("eval", lambda: evaluate(out / "vqa", data, out / "vqa", cache=cache, device=args.device))
    blind = step("eval blind", lambda: evaluate(out / "blind", data, out / "blind", cache=cache, device=args.device))
    evidence = step("evidence", lambda: demo_evidence(out, args))
    chance = chance_by_scale(data)
    scales = {}
    for s, m in real["scales"].items():
        blind_sc = blind["scales"].get(s, {}).get("single_choice")
        scales[s] = {"single_choice": m.get("single_choice"), "multi_choice": m.get("multi_choice"),
                     "open_f1": m.get("open_f1"), "blind_single_choice": blind_sc, "chance_single_choice": chance[s]}
    acceptance = {s: {"single_choice_ge_0.8": (v["single_choice"] or 0) >= 0.8,
                      "blind_within_0.1_of_chance":
                          abs((v["blind_single_choice"] or 0) - v["chance_single_choice"]) <= 0.1}
                  for s, v in scales.items()}
    wall = round(time.perf_counter() - t0, 1)
    result = {"scales": scales, "acceptance": acceptance, "families": real["families"],
              "blind_families": blind["families"],
              "mae": {k: v for k, v in (mae or {}).items() if k.startswith("heldout_")},
              "wall_s": wall, "timings_s": timings, "device": device_label(args.device), "backend": args.backend}
    if throughput:
        result["encoder_throughput"] = throughput
    result["evidence"] = evidence
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    table = markdown_table(real, {"blind_single_choice": {s: v["blind_single_choice"] for s, v in scales.items()}})
    (out / "eval.md").write_text(table)
    print("\nheld-out eval by scale:\n" + table)
    print(f"pipeline wall time {wall:.0f} s ({', '.join(f'{k} {v:.0f}s' for k, v in timings.items())}); "
          f"wrote {out / 'eval.json'}")
    return result


def main(args) -> int:
    from .parallel import usable_cores

    args = config_from_args(DemoConfig, args)
    t0 = time.perf_counter()
    print("== attention timing")
    time_attention(args)
    if args.attention_only:
        return 0
    if args.parallel_blind is None:
        args.parallel_blind = torch.device(args.device).type == "cpu" and usable_cores() >= 2
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, args.threads))
    try:
        run_pipeline(args)
    finally:
        torch.set_num_threads(threads)
    print(f"demo total {clock(time.perf_counter() - t0)}")
    return 0
