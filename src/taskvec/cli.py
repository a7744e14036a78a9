"""The ``taskvec`` command line: a thin layer over the library.

Each subcommand parses its arguments, calls one library function, and prints or writes the result.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import import_module
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

EPILOG = """\
examples:
  taskvec demo                                   # the main job on the embedded MobileNetV2 + real datasets
  taskvec bank build                             # fine-tune the six-task bank (cached, resumable)
  taskvec bank list                              # what the bank holds, accuracy before/after
  taskvec vector make base.safetensors ft.safetensors -o tau.safetensors --dtype bf16
  taskvec vector info tau.safetensors
  taskvec merge base_dir tau.safetensors ft_dir adapter_dir --method ties -o merged_dir
  taskvec bench step                             # coefficient step vs fine-tuning step, time and memory
"""


def _print_table(rows: list[dict], columns: Sequence[str] | None = None) -> None:
    if not rows:
        print("(empty)")
        return
    columns = list(columns or rows[0].keys())

    def cell(value: object) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |")


# -- vector ------------------------------------------------------------------------------------


def _vector_make(args: argparse.Namespace) -> int:
    from taskvec.hf.checkpoints import is_adapter_dir
    from taskvec.vectors import TaskVector

    if is_adapter_dir(args.finetuned):  # a PEFT LoRA adapter: an exact LoRA task vector
        from taskvec.hf.adapters import load_adapter

        lora = load_adapter(args.finetuned, args.base, name=args.name or Path(args.finetuned).name,
                            base_model_name_or_path=args.adapter_base)
        lora = lora.to(DTYPES[args.dtype]) if args.dtype else lora
        print(f"wrote {lora.save(args.output)}: {lora}")
        return 0
    vector = TaskVector.from_checkpoints(
        args.base, args.finetuned, name=args.name or Path(args.finetuned).stem, allow_pickle=args.allow_pickle
    )
    if args.dtype:
        vector = vector.to(DTYPES[args.dtype])  # what is printed is what is stored
    path = vector.save(args.output)
    print(f"wrote {path}: {vector}")
    return 0


def _vector_info(args: argparse.Namespace) -> int:
    from taskvec.quantize import QuantizedTaskVector
    from taskvec.vectors import load_task_vector

    for file in args.files:
        vector = load_task_vector(file)
        print(f"{file}: {vector!r}")
        for key, value in sorted(vector.metadata.items()):
            if key not in ("order", "shapes", "scales", "fingerprint_blocks"):
                print(f"  {key}: {value}")
        if isinstance(vector, QuantizedTaskVector):  # how it is stored and what that costs
            print(f"  scheme: {vector.scheme}\n  bytes: {vector.nbytes()}")
        print(f"  norm: {(vector.to_dense() if hasattr(vector, 'to_dense') else vector).norm():.6g}")
    return 0


# -- bank ------------------------------------------------------------------------------------


def _bank_config(args: argparse.Namespace):
    from taskvec.bank import BankConfig

    return BankConfig(
        backbone=args.backbone,
        resolution=args.resolution,
        epochs=args.epochs,
        lr=args.lr,
        seed=args.seed,
        linearized=args.linearized,
    )


def _text_suite(args: argparse.Namespace, *, linearized: bool | None = None):
    """The text suite for `--suite text`: its own config (MiniLM, step budget); --seed/--linearized/--lr apply."""
    from taskvec.suites.text import TEXT_TASKS_DEFAULT, TextBankConfig, TextSuite

    lin = args.linearized if linearized is None else linearized
    config = TextBankConfig(seed=args.seed, linearized=lin, lr=args.lr)
    root = args.root if linearized is None else None
    return TextSuite(config=config, root=root, tasks=args.tasks or TEXT_TASKS_DEFAULT, progress=True)


def _text_rows(args: argparse.Namespace) -> list[dict]:
    """Per task: zero-shot and fine-tuned test accuracy (+ balanced), and linearised when that bank exists."""
    suite = _text_suite(args)
    rows = suite.bank.table()
    if not args.linearized and args.root is None:
        linear = _text_suite(args, linearized=True).bank
        for row in rows:
            if linear.has(row["task"]):
                row["linearized_test_acc"] = linear.meta(row["task"])["finetuned_test_acc"]
    return rows


def _bank_build(args: argparse.Namespace) -> int:
    from taskvec.bank import Bank

    if args.suite == "text":
        suite = _text_suite(args)
        suite.build(args.tasks or suite.tasks, workers=args.workers, force=args.force)
        print(f"bank: {suite.bank.root}")
        _print_table(_text_rows(args))
        return 0
    from functools import partial

    bank = Bank(_bank_config(args), root=args.root)
    bank.build(args.tasks or list(_vision_tasks()), force=args.force, workers=args.workers or 1,
               factory=partial(Bank, bank.config, bank.root))
    print(f"bank: {bank.root}")
    _print_table(bank.table())
    return 0


def _vision_tasks():
    from taskvec.bank import DEFAULT_TASKS

    return DEFAULT_TASKS


def _bank_list(args: argparse.Namespace) -> int:
    from taskvec.bank import Bank

    if args.suite == "text":
        rows = _text_rows(args)
        root = _text_suite(args).bank.root
        incomplete: dict[str, str] = {}
    else:
        bank = Bank(_bank_config(args), root=args.root)
        rows, root = bank.table(), bank.root
        incomplete = bank.incomplete()
    if getattr(args, "json", False):
        import json

        print(json.dumps(rows, indent=1))
        return 0
    print(f"bank: {root}")
    _print_table(rows)
    for task, problem in incomplete.items():
        print(f"incomplete: {task}: {problem}")
    return 0


def _add_bank_options(parser: argparse.ArgumentParser) -> None:
    from taskvec.bank import DEFAULT_TASKS, BankConfig

    defaults = BankConfig()
    add = parser.add_argument
    add("--backbone", default=defaults.backbone, help="registered backbone (default: %(default)s)")
    add("--resolution", type=int, default=defaults.resolution, help="input size in px (default: %(default)s)")
    add("--epochs", type=int, default=defaults.epochs, help="fine-tuning epochs per task (default: %(default)s)")
    add("--lr", type=float, default=defaults.lr, help="fine-tuning learning rate (default: %(default)s)")
    add("--seed", type=int, default=defaults.seed, help="splits and training seed (default: %(default)s)")
    add("--linearized", action="store_true", help="fine-tune in tangent space (linearised task vectors)")
    add("--root", type=Path, default=None, help="bank directory (default: under $TASKVEC_CACHE/banks)")
    parser.add_argument("--tasks", nargs="+", default=None,
                        help=f"tasks (default: the suite's: {', '.join(DEFAULT_TASKS)} for vision, "
                             "seven zero-shot text tasks for text)")
    parser.add_argument("--suite", choices=("vision", "text"), default="vision",
                        help="vision (MobileNetV2, probe heads) or text (MiniLM, zero-shot heads); text ignores "
                             "--backbone/--resolution/--epochs (default: %(default)s)")


# -- bench -----------------------------------------------------------------------------------


def _bench_step(args: argparse.Namespace) -> int:
    from taskvec.bench import format_step_table, step_table

    rows = step_table(
        args.models, args.vectors, batch=args.batch, resolution=args.resolution, storage=args.storage, steps=args.steps,
        rounds=args.rounds, threads=args.threads or 2, device=args.device, autocast=args.autocast, warmup=args.warmup,
        bank_dir=args.bank_dir, recompute=args.recompute,
        cuda_graphs={"off": (False,), "on": (True,), "both": (False, True)}[args.cuda_graphs],
    )
    print(format_step_table(rows))
    if args.json:
        from taskvec.io import write_json

        write_json(args.json, rows)
    return 0


# -- main ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taskvec",
        description="Compose task vectors: learn anisotropic coefficients (aTLAS) over a bank of fine-tuned "
        "checkpoints, merge them, and compare with the usual baselines.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    vector = commands.add_parser("vector", help="make and inspect task vectors").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    make = vector.add_parser("make", help="task vector = fine-tuned - base, saved as safetensors")
    make.add_argument("base", help="pre-trained checkpoint (.safetensors, .pt/.bin, or a model directory)")
    make.add_argument("finetuned", help="fine-tuned checkpoint of the same architecture")
    make.add_argument("-o", "--output", required=True, help="output .safetensors file")
    make.add_argument("--name", default="", help="task name stored in the metadata (default: file stem)")
    make.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="storage dtype (default: as stored)")
    make.add_argument("--force", action="store_true", help="replace an existing output file")
    make.add_argument(
        "--allow-pickle", action="store_true", help="allow full unpickling of .pt/.bin files (only for trusted files)"
    )
    make.add_argument("--adapter-base", default=None, metavar="NAME",
                      help="refuse a PEFT adapter whose base_model_name_or_path is not NAME")
    make.set_defaults(run=_vector_make)
    info = vector.add_parser("info", help="print a task vector's metadata and norm")
    info.add_argument("files", nargs="+")
    info.set_defaults(run=_vector_info)

    bank = commands.add_parser("bank", help="build and list the bank of fine-tuned task vectors").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    build = bank.add_parser("build", help="fit heads and fine-tune one task vector per task (cached, resumable)")
    _add_bank_options(build)
    build.add_argument("--force", action="store_true", help="rebuild entries that already exist")
    build.add_argument("--workers", type=int, default=None,
                       help="entries built side by side in this many processes, each with its share of --threads "
                            "(default: text, one per thread; vision, 1). The vectors do not depend on it")
    build.set_defaults(run=_bank_build)
    listing = bank.add_parser("list", help="show the bank's entries and their accuracies")
    _add_bank_options(listing)
    listing.add_argument("--json", action="store_true", help="print the rows as a JSON list (one object per task)")
    listing.set_defaults(run=_bank_list)

    bench = commands.add_parser("bench", help="benchmarks that print tables").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    step = bench.add_parser("step", help="time and memory of a coefficient step vs a fine-tuning step")
    step.add_argument("--models", nargs="+", default=["mobilenet_v2", "vit_small"])
    step.add_argument("--vectors", nargs="+", type=int, default=[1, 4, 16])
    step.add_argument("--batch", type=int, default=64)
    step.add_argument("--resolution", type=int, default=None, help="input size (default: 224 for vit-b32, else 32)")
    step.add_argument("--storage", nargs="+", choices=sorted(DTYPES), default=["fp32"],
                      help="task vector storage dtypes (one table row per bank size and dtype)")
    step.add_argument("--device", default="cpu", help="cpu or cuda (cuda: see benchmarks/gpu.sh)")
    step.add_argument("--autocast", action="store_true", help="bf16 autocast of the network (CUDA runs)")
    step.add_argument("--recompute", action="store_true",
                      help="compose module by module and again in the backward pass (no whole composed copy)")
    step.add_argument("--cuda-graphs", choices=("off", "on", "both"), default="off",
                      help="replay the composition as CUDA graphs (CUDA runs); both: a row with and one without "
                           "(default: %(default)s)")
    step.add_argument("--steps", type=int, default=10, help="timed steps per case (median reported)")
    step.add_argument("--warmup", type=int, default=3, help="untimed steps per case first (default: 3)")
    step.add_argument("--bank-dir", type=Path, default=None,
                      help="keep the generated stand-in banks here and reuse them (default: a temporary folder)")
    step.add_argument("--rounds", type=int, default=3,
                      help="interleaved repetitions of every case; each keeps its fastest (default: 3)")
    step.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    step.add_argument("--force", action="store_true", help="replace an existing --json file")
    step.set_defaults(run=_bench_step)

    demo = commands.add_parser(
        "demo", help="the main job: few-shot aTLAS on a task held out of the bank, against the baselines"
    )
    demo.add_argument("--suite", choices=("vision", "text"), default="vision",
                      help="vision (MobileNetV2 bank) or text (MiniLM bank, zero-shot heads) (default: %(default)s)")
    demo.add_argument("--target", default=None,
                      help="held-out target task (default: emoji_twitter; wordnet_noun with --suite text)")
    demo.add_argument("--shots", type=int, default=16, help="labelled images per class (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="few-shot sampling and training seed")
    demo.add_argument("--head-from", default="auto", metavar="TASK",
                      help="whose head scores the target: 'auto' (default: a same-class partner's head when the bank "
                           "has one, e.g. emoji_google's for emoji_twitter, a head that never saw a target label), "
                           "'own' (the target's head, fitted on its full training split), or a task name")
    demo.add_argument("--epochs", type=int, default=None,
                      help="coefficient-training epochs (default: 10; 6 with --suite text)")
    demo.add_argument("--out", type=Path, default=DEMO_OUT,
                      help="results directory (default: %(default)s; runs/demo-text with --suite text)")
    demo.add_argument("--force", action="store_true", help="replace results already in --out")
    demo.set_defaults(run=_demo)

    _add_hf_commands(commands)

    run = commands.add_parser("run", help="the paper's experiments as recipes (tables, JSON, plots)")
    recipes = run.add_subparsers(dest="recipe", metavar="RECIPE", required=True)
    for name in RECIPES:
        import_module(f"taskvec.recipes.{name}").register_cli(recipes)
    return parser


# -- Hugging Face: merge into a model directory, convert old pickles ------------------------------

_MERGE_KEYS = ("base", "vectors", "method", "coefficients", "output", "force", "max_shard_size")


def _merge_params() -> dict[str, list]:
    """Every parameter name the merge registry declares, with its declarations (one per method)."""
    from taskvec.hf.export import STREAMING
    from taskvec.methods import list_methods

    found: dict[str, list] = {}
    for method in list_methods():
        if method.name in STREAMING:
            for param in method.params:
                found.setdefault(param.name, []).append((method.name, param))
    return found


def _list_methods() -> int:
    from taskvec.hf.export import LEARNED, STREAMING
    from taskvec.methods import list_methods

    for method in list_methods():
        if method.name in STREAMING:
            print(method.describe())
    print(f"{LEARNED}: the coefficients a Composer learned (aTLAS, AdaMerging, variational), from --coefficients; "
          "no parameters")
    return 0


def _merge_config(path: Path) -> dict:
    """A mergekit-style YAML/JSON merge file; relative paths are taken from the file's own directory."""
    import json

    import yaml

    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: not a readable merge config ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a merge config is a mapping with keys {list(_MERGE_KEYS)}")
    allowed = [*_MERGE_KEYS, *_merge_params()]
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; allowed: {allowed}")
    for key in ("base", "vectors", "output"):
        if not data.get(key):
            raise ValueError(f"{path}: '{key}' is required")
    vectors = data["vectors"]
    if not isinstance(vectors, list):
        raise ValueError(f"{path}: 'vectors' must be a list of paths")

    def here(item: object) -> Path:
        item = Path(str(item)).expanduser()
        return item if item.is_absolute() else path.parent / item

    data["base"], data["output"] = here(data["base"]), here(data["output"])
    data["vectors"] = [here(v) for v in vectors]
    if data.get("coefficients"):
        data["coefficients"] = here(data["coefficients"])
    from taskvec.hf.export import merge_parameters

    params = {key: data[key] for key in _merge_params() if key in data}
    try:  # the registry's check, before any file is opened
        merge_parameters(str(data.get("method", "sum")), params, coefficients=data.get("coefficients"))
    except (ValueError, KeyError) as err:
        raise ValueError(f"{path}: {err}") from err
    return data


def _merge_params_from_flags(method: str, given: dict[str, str]) -> dict:
    """Command-line parameter strings parsed by the chosen method's own declarations."""
    from taskvec.hf.export import LEARNED, merge_parameters
    from taskvec.methods import get_method

    if method == LEARNED or not given:
        return dict(given)  # merge_to_directory refuses learned's parameters, naming them
    merge_parameters(method, {})  # an unknown method: one line naming it and the known ones
    declared = get_method(method)
    return {name: declared.param(name).parse(text, method) for name, text in given.items()}


def _merge(args: argparse.Namespace) -> int:
    from taskvec.hf.export import merge_to_directory

    if args.list_methods:
        return _list_methods()
    given = {name: getattr(args, name) for name in _merge_params() if getattr(args, name) is not None}
    if args.config is not None:
        if args.paths or args.output:
            raise ValueError("give either --config or BASE VECTOR... -o OUT_DIR, not both")
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise ValueError(f"with --config the merge parameters go in the file; got {flags}")
        spec = _merge_config(args.config)
        spec["force"] = bool(spec.get("force")) or args.force
    else:
        if len(args.paths) < 2 or args.output is None:
            raise ValueError("taskvec merge needs BASE, at least one VECTOR and -o OUT_DIR (or --config FILE)")
        spec = {"base": args.paths[0], "vectors": args.paths[1:], "output": args.output, "method": args.method,
                "coefficients": args.coefficients, "force": args.force, "max_shard_size": args.max_shard_size,
                **_merge_params_from_flags(args.method, given)}
    spec = {k: v for k, v in spec.items() if v is not None}
    out = merge_to_directory(spec.pop("base"), spec.pop("vectors"), spec.pop("output"), **spec)
    print(f"wrote {out}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from taskvec.hf.unpickle import convert_pickle

    path = convert_pickle(args.source, args.output, strip_prefix=args.strip_prefix)
    print(f"wrote {path}")
    return 0


def _add_hf_commands(commands) -> None:
    merge = commands.add_parser(
        "merge", help="merge task vectors into a base and write a Hugging Face model directory",
        description="BASE is a model directory or file; each VECTOR is a task-vector file, a fine-tuned model "
        "directory or a PEFT adapter directory. sum: theta_0 + alpha * sum tau_i.",
    )
    merge.add_argument("paths", nargs="*", metavar="BASE VECTOR", help="base, then one or more vectors")
    merge.add_argument("--config", type=Path, default=None, help="a YAML/JSON merge file instead of arguments")
    from taskvec.hf.export import merge_method_names

    merge.add_argument("--method", default="sum", help=f"one of {', '.join(merge_method_names())} (default: sum; "
                       "see --list-methods)")
    merge.add_argument("--list-methods", action="store_true", help="print each method's parameters and reference")
    for name, declared in _merge_params().items():  # one flag per declared parameter, checked per method
        param = declared[0][1]
        users = ", ".join(method for method, _ in declared)
        defaults = sorted({repr(p.default) for _, p in declared})
        merge.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, metavar=param.kind.__name__.upper(),
                           help=f"{users}: {param.help}; {param.range_text()} (default: {', '.join(defaults)})")
    merge.add_argument("--coefficients", type=Path, default=None, help="learned: a Composer coefficients file")
    merge.add_argument("--max-shard-size", default="5GB", help="shard the safetensors above this (default: 5GB)")
    merge.add_argument("-o", "--output", type=Path, default=None, help="output model directory")
    merge.add_argument("--force", action="store_true", help="replace an existing output directory")
    merge.set_defaults(run=_merge)
    convert = commands.add_parser(
        "convert", help="old torch.save(model) pickle -> safetensors, through a restricted unpickler"
    )
    convert.add_argument("source", type=Path, help="a .pt file from torch.save (module or state dict)")
    convert.add_argument("-o", "--output", type=Path, required=True, help="output .safetensors file")
    convert.add_argument("--strip-prefix", default="", help="drop this leading key part (e.g. 'model.')")
    convert.set_defaults(run=_convert)


DEMO_OUT = Path("runs/demo")

# Each recipe module exposes register_cli(subparsers) adding `taskvec run <name>`.
RECIPES = ("addition", "negation", "fewshot", "tta", "variational",
           "precision", "gradient_free", "selection", "subspace", "lora", "peft")


def _demo(args: argparse.Namespace) -> int:
    from taskvec.workflow import CoefficientSchedule

    if args.suite == "text":
        from taskvec.recipes.suite_demo import SuiteDemoConfig, run_suite_demo
        from taskvec.suites.text import TextSuite

        config = SuiteDemoConfig(shots=args.shots, seed=args.seed)
        config.target = args.target or config.target
        config.schedule.epochs = args.epochs or config.schedule.epochs
        from taskvec.validate import demo_out

        config.out = demo_out(args)
        result = run_suite_demo(TextSuite(), config)
    else:
        from taskvec.recipes.demo import DemoConfig, run_demo

        result = run_demo(
            DemoConfig(
                target=args.target or "emoji_twitter",
                shots=args.shots,
                seed=args.seed,
                head_from=args.head_from,
                schedule=CoefficientSchedule(epochs=args.epochs or 10),
                out=args.out,
            )
        )
    print(result["table"])
    print(f"\nresults: {result['files']['json']}\ntable:   {result['files']['markdown']}")
    print(f"heatmap: {result['files']['heatmap']}\ntotal {result['seconds']:.0f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from taskvec.validate import validate

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        validate(args)  # every argument, input and output location, before any work
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        from taskvec import distributed

        distributed.init()  # under torchrun: join the process group (fit then trains data-parallel); else a no-op
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; finished work is kept and a rerun resumes", file=sys.stderr)
        return 130
    except OSError as err:  # read-only folder, output that is a directory, full disk: one line with the path
        where = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
        detail = err.strerror or str(err)
        print(f"taskvec: error: {where}: {detail}" if where else f"taskvec: error: {detail}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"taskvec: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
