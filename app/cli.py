"""``lorastudio`` command line: serve, train, generate, worker, jobs, adapters, bench, eval, world."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

from services.settings import Settings, parse_auth

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".txt", ".zip"}


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, help="where the catalog and files live (env LORASTUDIO_HOME)")
    parser.add_argument("--db-url", help="SQLAlchemy URL of the catalog (default: SQLite in the data dir)")
    parser.add_argument("--base-model", help="builtin:tiny-sd, a diffusers folder, a .safetensors file or a hub id")
    parser.add_argument("--base-model-config", help="diffusers folder with the configs of a single-file checkpoint")
    parser.add_argument("--device", help="auto (default), cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", help="auto (default), float32, float16, bfloat16")


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env().with_overrides(
        data_dir=args.data_dir, db_url=args.db_url, base_model=args.base_model,
        base_model_config=args.base_model_config, device=args.device, dtype=args.dtype,
    )


def _weight_arg(value: str):
    from services.generation import parse_adapter_arg

    return parse_adapter_arg(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorastudio", description="Train, catalog and compose diffusion adapters.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the web app (with its built-in worker)")
    _common(serve)
    serve.add_argument("--host", help="interface to bind (default 127.0.0.1; anything else requires --auth)")
    serve.add_argument("--port", type=int, help="port (default 7860)")
    serve.add_argument("--auth", help="user:password (or env LORASTUDIO_AUTH); required with --host/--share")
    serve.add_argument("--share", action="store_true", help="open a public Gradio share link (requires --auth)")
    serve.add_argument("--no-worker", action="store_true", help="do not run jobs in this process")

    train = sub.add_parser("train", help="train an adapter from a folder of images and wait for it")
    _common(train)
    train.add_argument("--images", type=Path, required=True, help="folder (or .zip) of images with .txt captions")
    train.add_argument("--name", required=True, help="name of the adapter in the catalog")
    train.add_argument("--method", default="lora", help="training method (see `lorastudio methods`)")
    train.add_argument("--kind", default="subject", choices=["subject", "style", "motion"])
    train.add_argument("--trigger", default="sks", help="trigger word of a subject (default sks)")
    train.add_argument("--steps", type=int, help="optimizer steps")
    train.add_argument("--rank", type=int, help="adapter rank")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any method setting")

    gen = sub.add_parser("generate", help="generate one image, optionally with adapters (or compare composers)")
    _common(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--adapter", action="append", default=[], type=_weight_arg, metavar="NAME[:WEIGHT]")
    gen.add_argument("--concept", action="append", default=[], metavar="NAME=WORD[,WORD]",
                     help="the prompt word(s) adapter NAME stands for (CLoRA); NAME as given to --adapter")
    gen.add_argument("--composer", default="merge", help="how the adapters are combined (merge, switch, composite, "
                                                         "clora, cmlora)")
    gen.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="a setting of the composer (e.g. --set interval=3 for switch)")
    gen.add_argument("--compare", metavar="NAME,NAME", help="run the same prompt, seed and adapters through each of "
                                                            "these composers; writes OUT-<composer>.png per image")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int, default=20)
    gen.add_argument("--guidance", type=float, default=7.5)
    gen.add_argument("--out", type=Path, required=True, help="PNG file to write")

    worker = sub.add_parser("worker", help="run queued jobs (alongside or instead of the app's worker)")
    _common(worker)
    worker.add_argument("--once", action="store_true", help="exit when the queue is empty")
    worker.add_argument("--devices", help="comma-separated devices, one worker thread each: cpu,cpu or "
                                          "cuda:0,cuda:1 (default: one worker on --device)")
    worker.add_argument("--memory-gb", type=float, help="memory to route jobs by (default: measured; GPU memory, "
                                                        "system RAM for the CPU); jobs with a larger "
                                                        "min_gpu_memory_gb are left to others")
    worker.add_argument("--lease-seconds", type=float, help="a job silent this long is requeued (default 60)")
    worker.add_argument("--heartbeat-seconds", type=float, help="lease renewal period (default 5)")

    jobs_cmd = sub.add_parser("jobs", help="the job queue: list, cancel, retry, move to top")
    jobs_sub = jobs_cmd.add_subparsers(dest="jobs_command", required=True)
    jobs_list = jobs_sub.add_parser("list", help="newest jobs first")
    _common(jobs_list)
    jobs_list.add_argument("--limit", type=int, default=50)
    jobs_list.add_argument("--status", action="append", help="only these statuses (repeatable)")
    jobs_list.add_argument("--json", action="store_true", help="machine-readable output")
    for name, text in (("cancel", "cancel a queued or running job"),
                       ("retry", "queue a failed, cancelled or interrupted job again"),
                       ("top", "move a queued job to the front of the queue"),
                       ("log", "print a job's log")):
        action = jobs_sub.add_parser(name, help=text)
        _common(action)
        action.add_argument("job_id", metavar="ID")

    adapters = sub.add_parser("adapters", help="the adapter catalog")
    adapters_sub = adapters.add_subparsers(dest="adapters_command", required=True)
    listing = adapters_sub.add_parser("list", help="list adapters")
    _common(listing)
    listing.add_argument("--search", help="filter by name, trigger word, method or tag")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    export = adapters_sub.add_parser("export", help="write an adapter as a kohya .safetensors file (A1111, ComfyUI, "
                                                    "diffusers) or as the native file")
    _common(export)
    export.add_argument("adapter", metavar="ID", help="adapter id or name")
    export.add_argument("out", metavar="OUT", type=Path, help=".safetensors file to write (or a folder)")
    export.add_argument("--format", default="kohya", choices=["kohya", "native"],
                        help="kohya (default; methods that are not plain low-rank fall back to native) or native")
    export.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"],
                        help="kohya tensor precision (default fp16)")
    importing = adapters_sub.add_parser("import", help="add a kohya, diffusers or peft LoRA .safetensors file to "
                                                       "the catalog")
    _common(importing)
    importing.add_argument("file", metavar="FILE", type=Path, help="the LoRA .safetensors file")
    importing.add_argument("--name", required=True, help="name of the adapter in the catalog")
    importing.add_argument("--kind", choices=["subject", "style"],
                           help="default: from the file's header, else subject with --trigger, style without")
    importing.add_argument("--trigger", help="trigger word (default: from the file's header)")
    importing.add_argument("--base", help="base model the LoRA is for (default: --base-model / the default base)")
    importing.add_argument("--alpha", type=float, help="LoRA alpha for files that do not carry one (peft "
                                                       "adapter_model.safetensors: lora_alpha of adapter_config.json)")

    bench = sub.add_parser("bench", help="benchmarks (writes JSON)")
    bench.add_argument("suite", choices=["loop", "compose", "queue", "training"],
                       help="loop: 20-step generation and 50-step training; compose: every composer at N=1..4 "
                            "adapters against the base model; queue: claim throughput, queue-view latency and "
                            "requeue time on SQLite and PostgreSQL; training: steps/s and memory of every training "
                            "method against a plain diffusers+peft loop")
    _common(bench)
    bench.add_argument("--json", type=Path, help="write the results here")
    bench.add_argument("--pg-url", help="queue: PostgreSQL admin URL; a throwaway database is created there "
                                        "(default: env LORASTUDIO_BENCH_PG_URL or postgres@127.0.0.1:5432; "
                                        "'none' skips PostgreSQL)")
    bench.add_argument("--methods", help="training: comma-separated methods (default: every registered one)")
    bench.add_argument("--quick", action="store_true", help="training: few steps, one round")
    bench.add_argument("--steps", type=int, help="training: timed steps per run (default 30)")
    bench.add_argument("--rounds", type=int, help="training: alternating rounds, best kept (default 3)")
    bench.add_argument("--threads", type=int, help="training: torch threads of every loop (default 1; 0 = each "
                                                   "loop's own: torch's for the baseline, the trainer's policy)")

    evaluate = sub.add_parser("eval", help="the customization and composition benchmark on the shapes world "
                                           "(writes results.json and results.md)")
    which = evaluate.add_mutually_exclusive_group()
    which.add_argument("--profile", choices=["ci", "quick", "full"], default="full",
                       help="ci: a tiny smoke run; quick: every method and composer, fewer steps, subjects and "
                            "images (under 10 minutes on 2 CPU cores); full: everything (default)")
    which.add_argument("--quick", dest="profile", action="store_const", const="quick", help="same as --profile quick")
    evaluate.add_argument("--base", help="base model (default: the default built-in model)")
    evaluate.add_argument("--out", type=Path, help="folder for the results (default benchmarks/results/<profile>)")
    evaluate.add_argument("--seed", type=int, default=0, help="the same seed and profile give the same numbers")
    evaluate.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0 = torch's own)")
    evaluate.add_argument("--data-dir", type=Path, help="where built-in models are kept (env LORASTUDIO_HOME)")
    evaluate.add_argument("--device", help="auto (default), cpu, cuda, cuda:1 ...")

    world = sub.add_parser("world", help="the procedural shapes world: render datasets, list its concepts")
    world_sub = world.add_subparsers(dest="world_command", required=True)
    render = world_sub.add_parser("render", help="write PNGs (GIFs for clips), .txt captions and labels.jsonl")
    render.add_argument("--out", type=Path, required=True, help="folder to write")
    render.add_argument("--count", type=int, default=100, help="number of renders (default 100)")
    render.add_argument("--seed", type=int, default=0, help="the same seed always gives the same files")
    render.add_argument("--concept", help="a held-out concept (see `lorastudio world list`); default: the base "
                                          "set, held-in concepts only")
    render.add_argument("--clips", action="store_true", help="8-frame clips (always for a held-out motion)")
    render.add_argument("--trigger", help="trigger word (default sks for a subject; styles and motions: none)")
    world_sub.add_parser("list", help="the concepts, held-in and held-out")

    methods = sub.add_parser("methods", help="list training methods and their settings")
    methods.add_argument("name", nargs="?")
    return parser


def _parse_sets(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def _collect_images(path: Path) -> list[Path]:
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{path}: no .png/.jpg/.webp/.zip files in this folder")
    return files


def _follow(services, job_id: str, desc: str) -> int:
    """Run the job here unless another worker already has it, and show a progress bar until it ends."""
    from tqdm import tqdm

    runner = threading.Thread(target=services.worker.run_once, args=(job_id,), daemon=True)
    runner.start()
    bar = tqdm(total=1, desc=desc, unit="step", dynamic_ncols=True)

    def update(job) -> None:
        p = job.progress
        if p.total_steps and bar.total != p.total_steps:
            bar.total = p.total_steps
        bar.n = p.step
        post = {"status": job.status}
        if p.loss is not None:
            post["loss"] = f"{p.loss:.4f}"
        bar.set_postfix(post, refresh=False)
        bar.refresh()

    try:
        job = services.jobs.wait(job_id, on_update=update)
    except KeyboardInterrupt:
        services.jobs.cancel(job_id)
        bar.close()
        print("cancelling…", file=sys.stderr)
        runner.join()
        return 130
    runner.join()
    bar.close()
    if job.status != "succeeded":
        print(f"error: job {job.status}: {job.error or ''}", file=sys.stderr)
        return 1
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args).with_overrides(host=args.host, port=args.port,
                                              auth=args.auth or os.environ.get("LORASTUDIO_AUTH"))
    settings = settings.with_overrides(share=args.share or None)
    check_exposure(settings.host, settings.share, settings.auth)  # before the slow imports: refuse at once
    from app.main import launch

    return launch(settings, run_worker=not args.no_worker)


def check_exposure(host: str, share: bool, auth: str | None) -> None:
    """Refuse to listen beyond this machine without a login."""
    parse_auth(auth)  # validates the format even on localhost
    local = host in ("127.0.0.1", "localhost", "::1")
    if (share or not local) and not auth:
        where = "a public share link" if share else f"host {host}"
        raise ValueError(f"refusing to serve on {where} without a login: add --auth user:password "
                         "(or set LORASTUDIO_AUTH)")


def cmd_train(args: argparse.Namespace) -> int:
    from services.container import build_services

    config = _parse_sets(args.set)
    if args.steps is not None:
        config["max_steps"] = args.steps
    if args.rank is not None:
        config["rank"] = args.rank
    files = _collect_images(args.images)
    services = build_services(_settings(args), worker_suffix=f"cli-{os.getpid()}")
    try:
        dataset, job = services.train_from_upload(
            files, name=args.name, method=args.method, kind=args.kind,
            trigger_word=args.trigger if args.kind == "subject" else "", config=config)
        for rejection in dataset.rejected:
            print(f"skipped {rejection}", file=sys.stderr)
        print(f"dataset {dataset.name}: {dataset.image_count} image(s); job {job.id}")
        code = _follow(services, job.id, f"train {args.name}")
        if code == 0:
            adapter = services.catalog.get_adapter(services.jobs.get(job.id).result_ref)
            print(f"adapter {adapter.name} ({adapter.id}) saved: {adapter.file_path}")
        return code
    finally:
        services.close()


def _with_concepts(adapters: list, concepts: list[str]) -> tuple:
    """``--adapter`` picks with the words of the matching ``--concept NAME=WORD`` (NAME as given to --adapter)."""
    from dataclasses import replace

    from services.generation import parse_concept_arg

    words = dict(parse_concept_arg(c) for c in concepts)
    unknown = sorted(set(words) - {a.adapter for a in adapters})
    if unknown:
        raise ValueError(f"--concept names {', '.join(unknown)}, which no --adapter picks")
    return tuple(replace(a, prompt=words[a.adapter]) if a.adapter in words else a for a in adapters)


def _write_result(services, job_id: str, out: Path) -> None:
    image = services.generation.get_image(services.jobs.get(job_id).result_ref)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(services.catalog.artifact_path(image.path).read_bytes())
    notes = "".join(f" ({note})" for note in image.notes)
    print(f"wrote {out} ({image.composer}, {image.params.get('sample_seconds', image.params.get('seconds'))} s)"
          f"{notes}")


def cmd_generate(args: argparse.Namespace) -> int:
    from core.types import GenerationRequest
    from services.container import build_services

    request = GenerationRequest(prompt=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed,
                                steps=args.steps, guidance_scale=args.guidance,
                                adapters=_with_concepts(args.adapter, args.concept), composer=args.composer,
                                composer_config=_parse_sets(args.set))
    services = build_services(_settings(args), worker_suffix=f"cli-{os.getpid()}")
    try:
        if not args.compare:
            job = services.generation.submit(request)
            code = _follow(services, job.id, "generate")
            if code == 0:
                _write_result(services, job.id, args.out)
            return code
        composers = [c.strip() for c in args.compare.split(",") if c.strip()]
        queued = services.generation.compare(request, composers)
        code = 0
        for name, job in zip(composers, queued):
            code = _follow(services, job.id, name) or code
            if services.jobs.get(job.id).status == "succeeded":
                _write_result(services, job.id, args.out.with_name(f"{args.out.stem}-{name}{args.out.suffix}"))
        return code
    finally:
        services.close()


def cmd_worker(args: argparse.Namespace) -> int:
    from services.container import build_device_workers, build_services

    settings = _settings(args).with_overrides(lease_seconds=args.lease_seconds,
                                              heartbeat_seconds=args.heartbeat_seconds)
    if args.heartbeat_seconds is None and settings.heartbeat_seconds >= settings.lease_seconds / 2:
        settings = settings.with_overrides(heartbeat_seconds=settings.lease_seconds / 4)
    services = build_services(settings, worker_suffix=f"worker-{os.getpid()}")
    pool = []
    try:
        if args.devices:
            devices = [d.strip() for d in args.devices.split(",") if d.strip()]
            pool = build_device_workers(services, devices, memory_gb=args.memory_gb)
            workers = [p.worker for p in pool]
        else:
            services.worker.memory_gb = args.memory_gb
            workers = [services.worker]
        for worker in workers:
            worker.recover()
        if args.once:
            threads = [threading.Thread(target=_drain, args=(w,), daemon=True) for w in workers]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return 0
        names = ", ".join(w.worker_id for w in workers)
        print(f"worker(s) {names} waiting for jobs (Ctrl+C to stop)", flush=True)
        for worker in workers:
            worker.start()
        try:
            while any(w.running for w in workers):
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        for worker in [p.worker for p in pool]:
            worker.stop()
        for entry in pool:
            entry.runtime.release()
        services.close()


def _drain(worker) -> None:
    while worker.run_once():
        pass


def cmd_jobs(args: argparse.Namespace) -> int:
    from services.container import build_services

    services = build_services(_settings(args), worker_suffix="cli")
    try:
        if args.jobs_command == "list":
            found = services.jobs.list_jobs(limit=args.limit, statuses=args.status)
            if args.json:
                print(json.dumps([{"id": j.id, "kind": j.kind, "status": j.status, "title": j.title,
                                   "priority": j.priority, "attempts": j.attempts, "max_attempts": j.max_attempts,
                                   "step": j.progress.step, "total_steps": j.progress.total_steps,
                                   "worker_id": j.worker_id, "error": j.error, "result_ref": j.result_ref,
                                   "created_at": j.created_at.isoformat()} for j in found], indent=2))
                return 0
            if not found:
                print("no jobs")
            for j in found:
                steps = f"{j.progress.step}/{j.progress.total_steps or '?'}"
                print(f"{j.id}  {j.status:10} prio {j.priority:>3}  try {j.attempts}/{j.max_attempts}  "
                      f"{steps:>11}  {j.title}" + (f"  error: {j.error}" if j.error else ""))
            return 0
        if args.jobs_command == "cancel":
            print(f"{args.job_id}: {services.jobs.cancel(args.job_id)}")
        elif args.jobs_command == "retry":
            print(f"{args.job_id}: {services.jobs.retry(args.job_id).status}")
        elif args.jobs_command == "top":
            print(f"{args.job_id}: priority {services.jobs.move_to_top(args.job_id).priority}")
        else:
            from app.formatting import job_log_text

            print(job_log_text(services.jobs.get(args.job_id)))
        return 0
    finally:
        services.close()


def _import_adapter(services, args: argparse.Namespace) -> int:
    """Queue an ``import`` job for the file and run it here (unless another worker took it first)."""
    job = services.interchange.submit_import(args.file, name=args.name, kind=args.kind, trigger=args.trigger,
                                             base=args.base, alpha=args.alpha)
    code = _follow(services, job.id, f"import {job.payload['name']}")
    if code == 0:
        adapter = services.catalog.get_adapter(services.jobs.get(job.id).result_ref)
        config = adapter.training_config
        print(f"imported {adapter.name} ({adapter.id}): {config['format']} LoRA, {config['layers']} layers, "
              f"rank {adapter.rank}")
    return code


def cmd_adapters(args: argparse.Namespace) -> int:
    from services.container import build_services

    services = build_services(_settings(args), worker_suffix=f"cli-{os.getpid()}")
    try:
        if args.adapters_command == "export":
            result = services.interchange.export_adapter(args.adapter, args.out, fmt=args.format,
                                                         precision=args.precision)
            if result.note:
                print(f"note: {result.note}", file=sys.stderr)
            layers = f", {result.layers} layers" if result.layers else ""
            print(f"wrote {result.path} ({result.format}{layers})")
            return 0
        if args.adapters_command == "import":
            return _import_adapter(services, args)
        adapters = services.catalog.list_adapters(search=args.search)
        if args.json:
            print(json.dumps([{"id": a.id, "name": a.name, "method": a.method, "kind": a.kind,
                               "base_model": a.base_model, "trigger_words": list(a.trigger_words),
                               "rank": a.rank, "steps": a.steps, "tags": list(a.tags), "sha256": a.sha256}
                              for a in adapters], indent=2))
            return 0
        if not adapters:
            print("no adapters yet: train one with `lorastudio train` or in the app")
        for a in adapters:
            tags = f" [{', '.join(a.tags)}]" if a.tags else ""
            print(f"{a.name:24} {a.method:8} {a.kind:8} rank {a.rank or '-':>3} steps {a.steps:>5}  {a.id}{tags}")
        return 0
    finally:
        services.close()


def cmd_methods(args: argparse.Namespace) -> int:
    from services.training import describe_method, list_methods

    for name in [args.name] if args.name else list_methods():
        description = describe_method(name)
        print(f"{name}: {description.summary}")
        for f in description.fields:
            print(f"  {f['name']:22} {f['type']:6} default {f['default']!r:12} {f['help']}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.suite == "queue":
        from app.formatting import job_table_html
        from services.queue_bench import DEFAULT_PG_ADMIN_URL, run_queue_benchmark

        pg_url = args.pg_url or os.environ.get("LORASTUDIO_BENCH_PG_URL") or DEFAULT_PG_ADMIN_URL
        results = run_queue_benchmark(pg_admin_url=None if pg_url == "none" else pg_url, render=job_table_html)
        failed = bool(results.get("errors"))
    elif args.suite == "compose":
        from services.benchmarks import run_compose_benchmark

        results = run_compose_benchmark()
        failed = any("error" in entry for row in results["n"].values() for entry in row.values())
    elif args.suite == "training":
        return _bench_training(args)
    else:
        from services.benchmarks import run_loop_benchmark

        results = run_loop_benchmark(_settings(args))
        failed = any("error" in r for r in results.values())
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    return 1 if failed else 0


def _bench_training(args: argparse.Namespace) -> int:
    from services.benchmarks import run_training_benchmark, training_table

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    results = run_training_benchmark(methods, quick=args.quick, steps=args.steps, rounds=args.rounds,
                                     threads=args.threads)
    print(training_table(results))
    text = json.dumps(results, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
        print(f"wrote {args.json}")
    else:
        print(text)
    failed = "error" in results["baseline"] or any("error" in e for e in results["methods"].values())
    return 1 if failed else 0


def cmd_eval(args: argparse.Namespace) -> int:
    import shlex

    from services.evaluation import DEFAULT_BASE, run_evaluation

    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    settings = Settings.from_env().with_overrides(data_dir=args.data_dir)
    started = time.perf_counter()

    def progress(line: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {line}", file=sys.stderr, flush=True)

    base = args.base or DEFAULT_BASE
    command = ["lorastudio", "eval", "--profile", args.profile, "--base", base, "--seed", str(args.seed),
               "--threads", str(args.threads)]
    command += ["--out", str(args.out)] if args.out else []
    command += ["--device", args.device] if args.device else []
    result = run_evaluation(args.profile, base=base, out=args.out, seed=args.seed, threads=args.threads or None,
                            models_dir=settings.models_dir, device=args.device, command=shlex.join(command),
                            progress=progress)
    print(f"wrote {result.json_path} and {result.markdown_path}")
    return 0


def cmd_world(args: argparse.Namespace) -> int:
    from services.world import list_concepts, render_world, world_attributes

    if args.world_command == "list":
        for name, values in world_attributes().items():
            print(f"{name}: {', '.join(values)}")
        for held_out in (False, True):
            print("held-out (never in base training data):" if held_out else "held-in (base training data):")
            for c in (c for c in list_concepts() if c["held_out"] == held_out):
                print(f"  {c['name']:12} {c['kind']:8} {c['description']}")
        return 0
    summary = render_world(args.out, args.count, seed=args.seed, concept=args.concept, clips=args.clips,
                           trigger=args.trigger)
    kind = "clips" if summary.clips else "images"
    print(f"wrote {summary.count} {kind} of {summary.dataset} (seed {args.seed}) to {summary.out}")
    return 0


COMMANDS = {"serve": cmd_serve, "train": cmd_train, "generate": cmd_generate, "worker": cmd_worker,
            "jobs": cmd_jobs, "adapters": cmd_adapters, "methods": cmd_methods,
            "bench": cmd_bench, "eval": cmd_eval, "world": cmd_world}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
