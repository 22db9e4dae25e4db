"""The `diredi-sim` command line. Each subcommand converts its flags into the typed config once.

What a command is for (tables, JSON, the paths asked for) goes to stdout with print(); progress
and diagnostics go through logging (stderr, at ``--log-level`` or ``--quiet``'s WARNING, and
each run folder's ``log.txt``: :mod:`diredi_sim.logs`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from diredi_sim.config import parse_overrides
from experiments.offline import stay_offline

stay_offline()  # no outbound traffic from anything this process starts (Flower, Ray)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def overrides_of(args) -> dict:
    """The command's ``--set`` pairs, and ``--device`` as the ``device`` key when given."""
    overrides = parse_overrides(args.set)
    if getattr(args, "device", None):
        overrides["device"] = args.device
    return overrides


def cmd_train(args) -> int:
    from diredi_sim.config import load_config
    from experiments.direct import run_direct_training

    config = load_config(args.config, overrides_of(args))
    run_direct_training(config)
    return 0


def check_seeds(seeds: int) -> None:
    from diredi_sim.config import ConfigError

    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: must be >= 1")


def cmd_paper_summary(args) -> int:
    from experiments.paper import summarize_paper_run

    print(summarize_paper_run(args.run_dir))
    return 0


def cmd_paper(args) -> int:
    from experiments.api import load_paper_job
    from experiments.paper import run_paper

    check_seeds(args.seeds)
    overrides = overrides_of(args)
    for key, value in (("data.source", args.data), ("data.voc_root", args.voc_root), ("preset", args.preset), ("seed", args.seed)):
        if value is not None:
            overrides[key] = value
    config, pipeline = load_paper_job(args.experiment, args.config, overrides)
    run_paper(config, args.experiment, pipeline, seeds=args.seeds, customer_seeds=parse_customer_seeds(args))
    return 0


def parse_customer_seeds(args) -> list[int] | None:
    """``--customer-seeds 2`` or ``0,2``: the customer seeds to run, instead of ``--seeds``."""
    from diredi_sim.config import ConfigError

    if args.customer_seeds is None:
        return None
    if args.seeds != 1:
        raise ConfigError(f"--seeds {args.seeds} and --customer-seeds {args.customer_seeds}: give one of them")
    try:
        return [int(part) for part in args.customer_seeds.split(",")]
    except ValueError:
        raise ConfigError(f"--customer-seeds {args.customer_seeds!r}: comma-separated integers, e.g. 2 or 0,2") from None


def cmd_paper_merge(args) -> int:
    from experiments.paper import write_merged_summary

    print(write_merged_summary(args.inputs, args.out))
    print(f"\nmerged summary: {args.out}")
    return 0


def cmd_simulate(args) -> int:
    from experiments.api import load_federation
    from experiments.simulate import run_simulate

    config = load_federation(args.config, overrides_of(args))
    run_simulate(config, verbose=args.verbose)
    return 0


def cmd_resume(args) -> int:
    from experiments.resume import run_resume

    run_resume(args.run_dir, verbose=args.verbose)
    return 0


def cmd_compare(args) -> int:
    from experiments.api import load_federation
    from experiments.compare import run_compare

    check_seeds(args.seeds)
    config = load_federation(args.config, overrides_of(args))
    run_compare(config, seeds=args.seeds)
    return 0


def cmd_demo(args) -> int:
    """The main job: the comparison on the demo config, then its HTML report."""
    from experiments.api import load_federation
    from experiments.compare import run_compare
    from experiments.report import render_report

    config = load_federation(args.config, overrides_of(args))
    folder = run_compare(config, seeds=1)
    report = render_report(folder)
    print(f"report: {report} (plots in {folder / 'plots'})")
    return 0


def cmd_plot(args) -> int:
    from experiments.plots import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0


def cmd_report(args) -> int:
    from experiments.report import render_report

    print(render_report(args.run_dir))
    return 0


def cmd_generate_data(args) -> int:
    from diredi_sim.config import load_config
    from diredi_sim.data.sources import resolve_data_folder

    config = load_config(args.config, overrides_of(args))
    print(resolve_data_folder(config.data))
    return 0


def cmd_check_data(args) -> int:
    from diredi_sim.data.voc import check_dataset

    problems = check_dataset(args.root, args.image_set)
    for line in problems:
        print(line)
    print(f"{len(problems)} problem(s) found in {args.root}", file=sys.stderr)
    return 1 if problems else 0


def cmd_export_public(args) -> int:
    from diredi_sim.datasets import export_pool
    from experiments.api import load_federation

    config = load_federation(args.config, overrides_of(args))
    counts = export_pool(config.data, args.destination)
    print(f"{args.destination}: the manufacturer's public pool, " + ", ".join(f"{n} {s} images" for s, n in counts.items()) +
          f"; run the federation with --set data.manufacturer_root=\"{args.destination}\" so that its process reads only these")
    return 0


def cmd_eval_detections(args) -> int:
    from diredi_sim.evaluate import evaluate_detection_folder
    from diredi_sim.runs import to_jsonable

    try:
        result = evaluate_detection_folder(args.voc_root, args.detections, args.classes, image_set=args.image_set,
                                           score_threshold=args.score_threshold)
    except ValueError as exc:  # a detection file's bad line, named with its file and line number
        print(f"diredi-sim: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(to_jsonable(result), indent=2))
    return 0


def build_logging_options() -> argparse.ArgumentParser:
    """``--log-level`` and ``--quiet``: a parent of every subcommand's parser."""
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_mutually_exclusive_group()
    group.add_argument("--log-level", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                       help="the least severe messages shown on stderr (default INFO); a run folder's log.txt gets INFO "
                            "and above (DEBUG too at DEBUG) whatever this is")
    group.add_argument("--quiet", action="store_const", dest="log_level", const="WARNING",
                       help="warnings and errors only on stderr (= --log-level WARNING); results still go to stdout")
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diredi-sim", description="Simulate DiReDi on Flower.")
    sub = parser.add_subparsers(dest="command", required=True)
    logging_options = build_logging_options()

    def add_command(name: str, **kwargs) -> argparse.ArgumentParser:
        """A subcommand, with the logging options every subcommand has."""
        return sub.add_parser(name, parents=[logging_options], **kwargs)

    def add_config(p, default: str | None):
        p.add_argument("config", nargs="?" if default else None, default=default, help="TOML config file")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
        add_device(p)

    def add_device(p):
        p.add_argument("--device", help="cpu, cuda, cuda:N or auto (the first GPU this process sees, else the CPU); "
                                        "the config's `device` key otherwise")

    p = add_command("demo", help="the main job: the DiReDi federation (4 customers, 1 round), FedAvg and direct "
                                    "training on the embedded synthetic data; comparison, plots and report")
    add_config(p, str(CONFIG_DIR / "demo.toml"))
    p.set_defaults(func=cmd_demo)

    p = add_command("train", help="direct training of one role on one split")
    add_config(p, None)
    p.set_defaults(func=cmd_train)

    p = add_command("paper", help="the paper's Exp 1 / Exp 2 (Table III) in one process, without Flower")
    p.add_argument("--experiment", choices=["exp1", "exp2"], required=True)
    p.add_argument("--config", default=None, help="TOML config (default experiments/configs/<experiment>.toml)")
    p.add_argument("--data", choices=["synthetic", "voc"])
    p.add_argument("--voc-root")
    p.add_argument("--preset", choices=["cpu", "paper"])
    p.add_argument("--seed", type=int)
    p.add_argument("--seeds", type=int, default=1,
                   help="replicates: customer seeds seed, seed+1, ... (the manufacturer keeps seed); each seed's "
                        "outputs in seed-<s>/ and mean ± std, paired differences and 95%% intervals over seeds at the top")
    p.add_argument("--customer-seeds", metavar="S[,S...]",
                   help="run these customer seeds instead of --seeds (e.g. 2: the third replicate alone, on another machine); "
                        "`paper-merge` puts runs of one manufacturer into one table")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    add_device(p)
    p.set_defaults(func=cmd_paper)

    p = add_command("paper-merge", help="one summary over the seeds of several paper runs of one config and one manufacturer "
                                        "(their table.json or run folders), written to OUT")
    p.add_argument("out", help="the merged table.json to write (may be one of the inputs)")
    p.add_argument("inputs", nargs="+", help="paper summaries: a run folder or its table.json (e.g. docs/results/paper-exp1.json)")
    p.set_defaults(func=cmd_paper_merge)

    p = add_command("paper-summary", help="rewrite a paper run's table.json, table.md and results.csv from its seed-<s>/ folders")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_paper_summary)

    p = add_command("simulate", help="the federation: a Flower ServerApp (manufacturer) and ClientApps (customers) on Ray")
    add_config(p, str(CONFIG_DIR / "federation.toml"))
    p.add_argument("--verbose", action="store_true", help="Flower's debug log")
    p.set_defaults(func=cmd_simulate)

    p = add_command("resume", help="finish a killed federation run in its folder, after its last completed round, "
                                   "or a paper run: the seeds it did not finish")
    p.add_argument("run_dir")
    p.add_argument("--verbose", action="store_true", help="Flower's debug log")
    p.set_defaults(func=cmd_resume)

    p = add_command("compare", help="DiReDi against FedAvg, FedProx, direct training and local fine-tuning")
    add_config(p, str(CONFIG_DIR / "federation.toml"))
    p.add_argument("--seeds", type=int, default=1,
                   help="replicates (the customers' seeds change); mean and std over them, and DiReDi's paired differences "
                        "against each method with 95%% intervals")
    p.set_defaults(func=cmd_compare)

    p = add_command("plot", help="redraw a run's plots (compare, simulate or paper) from its saved results")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_plot)

    p = add_command("report", help="one self-contained HTML report of a compare, simulate or paper run")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    p = add_command("generate-data", help="generate (or find) the synthetic dataset of a config and print its folder")
    add_config(p, str(CONFIG_DIR / "edge.toml"))
    p.set_defaults(func=cmd_generate_data)

    p = add_command("export-public", help="copy the manufacturer's public pool of a config's data into a new VOC folder "
                                             "(for data.manufacturer_root: its process then reaches no customer file)")
    add_config(p, str(CONFIG_DIR / "federation.toml"))
    p.add_argument("destination", help="a new, empty folder")
    p.set_defaults(func=cmd_export_public)

    p = add_command("check-data", help="report every problem of a VOC-format dataset in one pass")
    p.add_argument("root", help="a VOC year folder, a VOCdevkit folder, or a parent of VOCdevkit/")
    p.add_argument("--image-set", default=None, help="an ImageSets/Main list (default: every annotation)")
    p.set_defaults(func=cmd_check_data)

    p = add_command("eval-detections", help="VOC and COCO AP of detection files against VOC annotations")
    p.add_argument("--voc-root", required=True)
    p.add_argument("--detections", required=True, help="folder with one <image_id>.txt per image: class score x1 y1 x2 y2")
    p.add_argument("--classes", required=True, help="class names, one per line, in class-index order")
    p.add_argument("--image-set", default=None)
    p.add_argument("--score-threshold", type=float, default=0.5, help="for precision / recall / F1")
    p.set_defaults(func=cmd_eval_detections)
    return parser


def main(argv=None) -> int:
    from diredi_sim.compute import DeviceError
    from diredi_sim.models import WeightsError
    from diredi_sim.config import ConfigError
    from diredi_sim.data.voc import DataProblem
    from diredi_sim.runs import CheckpointError

    from diredi_sim.logs import configure_logging
    from diredi_sim.runs import close_runs

    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        return args.func(args)
    except (ConfigError, DeviceError, WeightsError, CheckpointError, DataProblem, FileNotFoundError, FileExistsError) as exc:
        print(f"diredi-sim: error: {exc}", file=sys.stderr)
        return 2
    finally:
        close_runs()  # every run folder's log.txt ends with the command


if __name__ == "__main__":
    sys.exit(main())
