"""``grailc eval MODEL --tasks T1,T2``: zero-shot tasks of lm-evaluation-harness on a dense or compressed decoder LM.

The model is loaded as ``grailc ppl`` loads it (an output folder of ``grailc compress hf:...`` through grailc's loader,
per-layer widths included; ``hf:PATH`` the dense model), wrapped in lm-eval's ``HFLM`` and run by its evaluator
(``TaskManager.load`` then ``evaluator.evaluate``: ``simple_evaluate`` would also shell out to git and collect the
whole environment). Tasks are resolved and their data loaded before the model, so a bad name or missing data fails
fast. The local task ``shakespeare_next_line`` (:mod:`grailc.llm.next_line`) is always registered;
``--include-path DIR`` adds the task YAMLs in DIR. The last stdout line is one JSON object.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from grailc.errors import GrailcError, RecipeError, did_you_mean

INSTALL = "pip install 'grailc[eval]' (or pip install lm_eval==0.4.13)"
OFFLINE_FIX = ("run where the Hugging Face hub is reachable (HF_DATASETS_OFFLINE and HF_HUB_OFFLINE unset), or "
               "copy the data here and point a task YAML at it (dataset_path: json, dataset_kwargs: data_files) in a "
               "folder given with --include-path DIR")


def _lm_eval():
    try:
        import lm_eval
        from lm_eval import evaluator
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise GrailcError(f"grailc eval needs lm-evaluation-harness, which is not installed ({e})",
                          fix=INSTALL) from None
    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its INFO lines would bury the result
    return lm_eval, evaluator, HFLM, TaskManager


def parse_tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise RecipeError(f"no task in --tasks {text!r}", fix="give --tasks NAME[,NAME...], e.g. shakespeare_next_line")
    return list(dict.fromkeys(tasks))


def include_paths(extra: list[str] | None) -> list[Path]:
    """The local task folder, then every --include-path (each must be a folder)."""
    from grailc.llm.next_line import task_folder

    paths = [task_folder()]
    for name in extra or []:
        path = Path(name)
        if not path.is_dir():
            raise RecipeError(f"--include-path {name} is not a folder",
                              fix="give a folder that holds lm-eval task YAML files")
        paths.append(path)
    return paths


def task_manager(tasks: list[str], paths: list[Path], TaskManager):
    """A TaskManager that knows every task in ``tasks``: the local folders alone when they hold them all (indexing
    lm-eval's thousands of built-in YAMLs takes seconds), else with the built-ins too; unknown names are refused."""
    local = TaskManager(include_path=[str(p) for p in paths], include_defaults=False)
    if all(t in local.all_tasks for t in tasks):
        return local
    manager = TaskManager(include_path=[str(p) for p in paths])
    for task in tasks:
        if task not in manager.all_tasks:
            raise RecipeError(
                f"unknown lm-eval task {task!r}{did_you_mean(task, manager.all_tasks)}",
                fix="give a task, group or tag name that lm-eval knows (lm-eval ls tasks lists them), "
                "shakespeare_next_line, or one defined by a YAML in a folder given with --include-path DIR",
            )
    return manager


def load_tasks(manager, tasks: list[str]) -> dict:
    """lm-eval's task dict, each task's data loaded now; a task whose data cannot be had is named."""
    loaded = {"tasks": {}, "groups": {}, "group_map": {}}
    for task in tasks:
        try:
            part = manager.load([task])
        except (KeyboardInterrupt, GrailcError):
            raise
        except Exception as e:
            text = " ".join(str(e).split())[:300]
            if isinstance(e, FileNotFoundError):
                fix = ("check dataset_path and data_files in the task's YAML: they must name existing files or a "
                       "hub dataset")
            elif isinstance(e, (ConnectionError, OSError)) or "offline" in text.lower() or "hub" in text.lower():
                fix = OFFLINE_FIX
            else:
                fix = "check the task's YAML (dataset_path, data_files, splits) in lm-eval or in --include-path"
            raise GrailcError(f"the data of lm-eval task {task!r} could not be loaded ({type(e).__name__}: {text})",
                              fix=fix) from None
        for key in loaded:
            loaded[key].update(part[key])
    for task in loaded["tasks"].values():  # zero-shot unless the task's YAML says otherwise, as simple_evaluate does
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=1234)
    return loaded


def metrics(results: dict) -> dict:
    """{task: {metric: value, ..., "samples": n}} from lm-eval's results; the filter suffix (",none") dropped."""
    out = {}
    for task, values in results["results"].items():
        row = {}
        for key, value in values.items():
            name, _, flt = key.partition(",")
            if not flt or key == "alias":
                continue
            row[name if flt == "none" else key] = None if value == "N/A" else value
        n = results.get("n-samples", {}).get(task)
        if n is not None:
            row["samples"] = n["effective"]
        out[task] = row
    return out


def run_eval(args) -> int:
    """Evaluate a model on lm-eval tasks; the last stdout line is {"tasks": {...}, "model": ..., ...}."""
    import torch

    from grailc.cli import device_for
    from grailc.llm.commands import model_folder
    from grailc.llm.hf import load_causal_lm

    start = time.perf_counter()
    if args.limit is not None and args.limit < 1:
        raise RecipeError(f"--limit {args.limit} is not a positive number of examples", fix="give --limit N, N >= 1")
    if args.batch_size < 1:
        raise RecipeError(f"--batch-size {args.batch_size} is not positive", fix="give --batch-size B, B >= 1")
    lm_eval, evaluator, HFLM, TaskManager = _lm_eval()
    tasks = parse_tasks(args.tasks)
    device = device_for(args)  # before anything is loaded: a device that is not there is refused first
    folder = model_folder(args.model)
    if not (folder / "config.json").is_file():  # before the tasks, whose data may take a while
        raise GrailcError(f"{folder} is not a Hugging Face model folder (no config.json)",
                          fix="give hf:PATH with a folder saved by save_pretrained, or an output folder of grailc "
                          "compress hf:...")
    loaded = load_tasks(task_manager(tasks, include_paths(args.include_path), TaskManager), tasks)
    model, tokenizer = load_causal_lm(folder)
    model.to(device)
    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)  # its two warnings say that a built model is passed in, as intended
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
    finally:
        hf_logger.setLevel(level)
    with torch.no_grad():
        results = evaluator.evaluate(lm=lm, task_dict=loaded, limit=args.limit, log_samples=False)
    result = {"tasks": metrics(results), "model": args.model, "limit": args.limit, "batch_size": args.batch_size,
              "device": str(device), "lm_eval": lm_eval.__version__,
              "seconds": round(time.perf_counter() - start, 2)}
    print(json.dumps(result))
    sys.stdout.flush()
    return 0


def add_parser(sub, epilog: str | None = None) -> None:
    """The ``eval`` subcommand."""
    e = sub.add_parser("eval", help="zero-shot lm-evaluation-harness tasks on a decoder LM (last stdout line: JSON)",
                       epilog=epilog)
    e.add_argument("model", help="hf:FOLDER (the dense model), or an output folder of grailc compress hf:...")
    e.add_argument("--tasks", required=True,
                   help="comma-separated lm-eval tasks, e.g. shakespeare_next_line (local, shipped) or "
                   "hellaswag,arc_easy,piqa,winogrande (hub data: needs internet)")
    e.add_argument("--limit", type=int, help="evaluate the first N examples of each task (default all)")
    e.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto: CUDA when available)")
    e.add_argument("--include-path", action="append", metavar="DIR",
                   help="a folder of lm-eval task YAMLs to register too (repeatable)")
    e.add_argument("--debug", action="store_true", help="show tracebacks")
